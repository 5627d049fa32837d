//! `flotilla create configmap|secret`, `get configmaps|secrets` and `delete configmap|secret`,
//! with kubectl's flags. Listings show keys and sizes, never values.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use flotilla_proto::agent::v1::{ConfigKind, ConfigObject};
use flotilla_proto::control::v1::{
    ApplyConfigRequest, ConfigSummary, DeleteConfigRequest, ListConfigRequest,
};

use crate::control::connect;
use crate::{Output, output::print_structured};

/// What `create` takes the data from, as kubectl's `--from-literal` and `--from-file`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Sources {
    /// `KEY=VALUE`; repeatable.
    #[arg(long = "from-literal")]
    pub literals: Vec<String>,
    /// `PATH` (the key is the file name) or `KEY=PATH`; a directory adds each regular file in
    /// it. Repeatable.
    #[arg(long = "from-file")]
    pub files: Vec<String>,
    /// The namespace.
    #[arg(short, long, default_value = flotilla_model::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

/// The data of `sources`, keyed.
fn data(sources: &Sources) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut data = BTreeMap::new();
    let mut add = |key: String, value: Vec<u8>| -> anyhow::Result<()> {
        if !flotilla_model::config::is_config_key(&key) {
            bail!("key {key:?}: must consist of alphanumerics, '-', '_' or '.'");
        }
        if data.insert(key.clone(), value).is_some() {
            bail!("key {key:?} is given twice");
        }
        Ok(())
    };
    for literal in &sources.literals {
        let (key, value) = literal
            .split_once('=')
            .with_context(|| format!("--from-literal {literal:?}: expected KEY=VALUE"))?;
        add(key.to_string(), value.as_bytes().to_vec())?;
    }
    for file in &sources.files {
        let (key, path) = match file.split_once('=') {
            Some((key, path)) => (Some(key.to_string()), Path::new(path)),
            None => (None, Path::new(file.as_str())),
        };
        if path.is_dir() {
            if key.is_some() {
                bail!("--from-file {file:?}: a directory takes no key");
            }
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .collect::<Result<_, _>>()?;
            entries.sort_by_key(std::fs::DirEntry::file_name);
            for entry in entries.into_iter().filter(|e| e.path().is_file()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                add(name, std::fs::read(entry.path())?)?;
            }
            continue;
        }
        let key = match key {
            Some(key) => key,
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("--from-file {file:?}: no file name"))?,
        };
        let value = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        add(key, value)?;
    }
    Ok(data)
}

/// `flotilla create configmap|secret generic NAME ...`.
pub async fn create(
    server: &str,
    kind: ConfigKind,
    name: &str,
    sources: &Sources,
) -> anyhow::Result<()> {
    let object = ConfigObject {
        kind: kind as i32,
        namespace: sources.namespace.clone(),
        name: name.to_string(),
        data: data(sources)?.into_iter().collect(),
    };
    connect(server)
        .await?
        .apply_config(ApplyConfigRequest {
            object: Some(object),
            create_only: true,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("{}/{name} created", kind.noun());
    Ok(())
}

/// `flotilla get configmaps|secrets [NAME]`: names, keys and sizes.
pub async fn get(
    server: &str,
    kind: ConfigKind,
    name: Option<&str>,
    namespace: &str,
    output: Output,
) -> anyhow::Result<()> {
    let items = connect(server)
        .await?
        .list_config(ListConfigRequest {
            kind: kind as i32,
            namespace: namespace.to_string(),
            name: name.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .items;
    if let Some(name) = name
        && items.is_empty()
    {
        bail!("{} {namespace}/{name} not found", kind.noun());
    }
    match output {
        Output::Json | Output::Yaml => {
            let views: Vec<SummaryView<'_>> = items.iter().map(SummaryView::from).collect();
            print_structured(&views, name.is_some(), output)?;
        }
        Output::Table | Output::Wide => {
            println!("{:<12} {:<32} {:>5}  KEYS", "NAMESPACE", "NAME", "DATA");
            for item in &items {
                let keys: Vec<String> = item
                    .sizes
                    .iter()
                    .map(|(k, size)| format!("{k} ({size} B)"))
                    .collect();
                println!(
                    "{:<12} {:<32} {:>5}  {}",
                    item.namespace,
                    item.name,
                    item.sizes.len(),
                    keys.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// A summary for `-o yaml|json`: kind, name and the sizes of the values.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SummaryView<'a> {
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    sizes: &'a std::collections::HashMap<String, u64>,
}

impl<'a> From<&'a ConfigSummary> for SummaryView<'a> {
    fn from(s: &'a ConfigSummary) -> Self {
        Self {
            kind: match s.kind() {
                ConfigKind::Secret => "Secret",
                _ => "ConfigMap",
            },
            namespace: &s.namespace,
            name: &s.name,
            sizes: &s.sizes,
        }
    }
}

/// `flotilla delete configmap|secret NAME`.
pub async fn delete(
    server: &str,
    kind: ConfigKind,
    name: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    connect(server)
        .await?
        .delete_config(DeleteConfigRequest {
            kind: kind as i32,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("{}/{name} deleted", kind.noun());
    Ok(())
}
