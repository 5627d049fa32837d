//! The house rule of the source tree: no module imports a module that imports it back, in any
//! crate, directly or through others.
//!
//! A module's imports are the `crate::`, `super::` and `self::` paths in its file (comments and
//! its inline `mod tests` left out), each resolved to the file of the deepest module it names. A
//! parent naming its own children (declaring them, re-exporting from them) is no import: the
//! parent is what the children belong to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source roots of the workspace's crates.
const CRATES: [&str; 6] = [
    "proto/src",
    "model/src",
    "telemetry/src",
    "node-agent/src",
    "control-plane/src",
    "cli/src",
];

/// Module path (`runtime::http`, empty for the crate root) to its file's text.
type Modules = BTreeMap<Vec<String>, String>;

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cycles = Vec::new();
    for krate in CRATES {
        let modules = modules(&root.join(krate));
        assert!(
            modules.len() > 1 || krate.starts_with("telemetry"),
            "{krate}: no modules found"
        );
        let graph = imports(&modules);
        for cycle in find_cycles(&graph) {
            cycles.push(format!("{krate}: {}", cycle.join(" -> ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_checker_finds_cycles_and_ignores_parents_naming_children() {
    let modules: Modules = [
        (vec![], "mod a; mod b; mod c; pub use self::a::A;"),
        (vec!["a".into()], "use super::b::B; // crate::c"),
        (vec!["b".into()], "use crate::{a::A, c::{self, C}};"),
        (vec!["c".into()], "pub struct C;"),
        (vec!["a".into(), "inner".into()], "use super::A;"),
    ]
    .map(|(path, text)| (path, without_tests_and_comments(text)))
    .into();
    let module = |path: &str| -> Vec<String> { path.split("::").map(String::from).collect() };
    let graph = imports(&modules);
    // Comments are no imports; groups are expanded.
    assert_eq!(graph[&module("a")], BTreeSet::from([module("b")]));
    assert_eq!(
        graph[&module("b")],
        BTreeSet::from([module("a"), module("c")])
    );
    // A parent naming its children is no import; a child using its parent is one.
    assert!(graph[&Vec::new()].is_empty());
    assert_eq!(graph[&module("a::inner")], BTreeSet::from([module("a")]));
    assert_eq!(find_cycles(&graph), [["a", "b", "a"]]);
}

/// Every module file under `src`, by module path.
fn modules(src: &Path) -> Modules {
    let mut files = Vec::new();
    collect(src, &mut files);
    files
        .into_iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "gen"))
        .filter_map(|file| {
            let relative = file.strip_prefix(src).ok()?.with_extension("");
            let mut path: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                path.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                path.pop();
            }
            if path.first().is_some_and(|p| p == "bin") {
                return None;
            }
            let text = std::fs::read_to_string(&file).ok()?;
            Some((path, without_tests_and_comments(&text)))
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text without `//` comments and without an inline `#[cfg(test)] mod tests { .. }`,
/// which by this codebase's convention closes its file.
fn without_tests_and_comments(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests {"))
        {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Each module's imports of other modules, parents naming their children left out.
fn imports(modules: &Modules) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut graph = BTreeMap::new();
    for (module, text) in modules {
        let mut targets = BTreeSet::new();
        for path in paths(text) {
            let Some(absolute) = absolute(module, &path) else {
                continue;
            };
            let Some(target) = deepest_module(modules, &absolute) else {
                continue;
            };
            if !target.starts_with(module) {
                targets.insert(target);
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// The `crate::`/`super::`/`self::` paths in `text`, with `a::{b, c::d}` groups expanded.
fn paths(text: &str) -> Vec<Vec<String>> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        let rest = &text[i..];
        let starts = ["crate::", "super::", "self::"]
            .iter()
            .any(|p| rest.starts_with(p));
        if at_word_start && starts {
            let (path, used) = path_at(rest);
            found.extend(path);
            i += used.max(1);
        } else {
            i += 1;
        }
    }
    found
}

/// The path (or paths, for a group) starting `text`, and the bytes it spans.
fn path_at(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut segments = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    loop {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if i > start {
            segments.push(text[start..i].to_string());
        }
        if text[i..].starts_with("::{") {
            i += 3;
            let mut depth = 1;
            let group_start = i;
            while i < bytes.len() && depth > 0 {
                match bytes[i] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                i += 1;
            }
            let group = &text[group_start..i.saturating_sub(1)];
            let mut paths = Vec::new();
            for element in split_top_level(group) {
                let element = element.trim();
                let (inner, _) = path_at(element);
                for mut tail in inner {
                    let mut full = segments.clone();
                    full.append(&mut tail);
                    paths.push(full);
                }
                if inner_is_empty(element) {
                    paths.push(segments.clone());
                }
            }
            return (paths, i);
        }
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![segments], i);
        }
    }
}

fn inner_is_empty(element: &str) -> bool {
    element.is_empty() || element == "self"
}

fn split_top_level(group: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&group[start..]);
    parts
}

/// `path` as seen from `module`, from the crate root.
fn absolute(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut segments = path.iter().peekable();
    let mut base: Vec<String> = match segments.next()?.as_str() {
        "crate" => Vec::new(),
        "self" => module.to_vec(),
        "super" => module.get(..module.len().checked_sub(1)?)?.to_vec(),
        _ => return None,
    };
    while segments.peek().is_some_and(|s| *s == "super") {
        segments.next();
        base.pop()?;
    }
    base.extend(segments.cloned());
    Some(base)
}

/// The deepest module whose path starts `path`.
fn deepest_module(modules: &Modules, path: &[String]) -> Option<Vec<String>> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|candidate| modules.contains_key(candidate))
}

/// One cycle through each strongly connected group of modules, as `a -> b -> a`.
fn find_cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    let name = |m: &Vec<String>| {
        if m.is_empty() {
            "(root)".to_string()
        } else {
            m.join("::")
        }
    };
    let mut cycles = Vec::new();
    let mut reported: BTreeSet<Vec<String>> = BTreeSet::new();
    for start in graph.keys() {
        if reported.contains(start) {
            continue;
        }
        // A path back to `start`, breadth first, so the shortest cycle is shown.
        let mut previous: BTreeMap<&Vec<String>, &Vec<String>> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closing = None;
        while let Some(module) = queue.pop_front() {
            for next in graph.get(module).into_iter().flatten() {
                if next == start {
                    closing = Some(module);
                    break;
                }
                if !previous.contains_key(next) && graph.contains_key(next) {
                    previous.insert(next, module);
                    queue.push_back(next);
                }
            }
            if closing.is_some() {
                break;
            }
        }
        let Some(mut module) = closing else {
            continue;
        };
        // From the module that closes the cycle back to `start`, then turned around.
        let mut members = vec![module.clone()];
        while module != start {
            module = previous[module];
            members.push(module.clone());
        }
        members.reverse();
        let mut cycle: Vec<String> = members.iter().map(name).collect();
        cycle.push(name(start));
        reported.extend(members);
        cycles.push(cycle);
    }
    cycles
}
