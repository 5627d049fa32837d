//! Regenerates `src/gen` from `proto/` and fails if the committed code differs.

use std::path::{Path, PathBuf};

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("proto");
    let mut files = Vec::new();
    find_protos(&proto_dir, &mut files);
    files.sort();
    let descriptors = protox::compile(&files, [&proto_dir]).expect("protos compile");

    let out = tempfile::tempdir().expect("create temp dir");
    let out_dir = out.path();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out_dir)
        .compile_fds(descriptors)
        .expect("code generation succeeds");

    let gen_dir = root.join("src/gen");
    let generated: Vec<std::ffi::OsString> = std::fs::read_dir(out_dir)
        .expect("read generated dir")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    // A committed file that generation no longer makes (a package renamed or removed).
    let extra: Vec<String> = std::fs::read_dir(&gen_dir)
        .expect("read committed dir")
        .map(|e| e.expect("dir entry").file_name())
        .filter(|name| !generated.contains(name))
        .map(|name| gen_dir.join(name).display().to_string())
        .collect();
    assert!(
        extra.is_empty(),
        "committed generated files that no proto makes any more; remove them: {extra:?}"
    );
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(out_dir).expect("read generated dir") {
        let entry = entry.expect("dir entry");
        let fresh = std::fs::read_to_string(entry.path()).expect("read fresh file");
        let committed_path = gen_dir.join(entry.file_name());
        let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
        if fresh != committed {
            std::fs::write(&committed_path, fresh).expect("write regenerated file");
            stale.push(committed_path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "generated code was stale and has been rewritten; commit it: {stale:?}"
    );
}

/// Every `.proto` file under `dir`, so that a new one cannot be left out of generation.
fn find_protos(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            find_protos(&path, out);
        } else if path.extension().and_then(|e| e.to_str()) == Some("proto") {
            out.push(path);
        }
    }
}
