//! Commands against the control plane's user API.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flotilla_control_plane::model::Workload;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    ApplyRequest, DeleteRequest, GetRequest, ListRequest, PushModuleRequest, WorkloadObject,
};
use serde::Deserialize;
use tonic::transport::Channel;

use crate::{Output, endpoint};

async fn connect(server: &str) -> anyhow::Result<WorkloadsClient<Channel>> {
    let endpoint = endpoint(server);
    WorkloadsClient::connect(endpoint.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {endpoint}: {e}"))
}

/// A manifest document and the directory its relative paths resolve against.
struct Document {
    source: String,
    base: PathBuf,
    workload: Workload,
}

/// `flotilla apply -f FILE|DIR|-`; returns the applied workloads.
pub async fn apply(server: &str, files: &[String]) -> anyhow::Result<Vec<Workload>> {
    let mut documents = Vec::new();
    for file in files {
        read_documents(file, &mut documents)?;
    }
    if documents.is_empty() {
        bail!("no manifests found in {files:?}");
    }
    let mut client = connect(server).await?;
    let mut applied_all = Vec::with_capacity(documents.len());
    for mut doc in documents {
        if let Some(path) = doc.workload.spec.module.path.take() {
            let path = doc.base.join(path);
            let module = std::fs::read(&path).with_context(|| {
                format!(
                    "{}: reading spec.module.path {}",
                    doc.source,
                    path.display()
                )
            })?;
            let pushed = client
                .push_module(PushModuleRequest {
                    module,
                    sha256: doc.workload.spec.module.sha256.clone(),
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "{}: pushing {}: {}",
                        doc.source,
                        path.display(),
                        s.message()
                    )
                })?
                .into_inner();
            doc.workload.spec.module.sha256 = pushed.sha256;
        }
        let manifest = serde_json::to_vec(&doc.workload)?;
        let applied = client
            .apply(ApplyRequest { manifest })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", doc.source, s.message()))?
            .into_inner();
        let applied = decode(&applied)?;
        println!(
            "wasmworkload.flotilla.dev/{} applied (generation {})",
            applied.metadata.name, applied.metadata.generation
        );
        applied_all.push(applied);
    }
    Ok(applied_all)
}

fn read_documents(file: &str, out: &mut Vec<Document>) -> anyhow::Result<()> {
    if file == "-" {
        let text = std::io::read_to_string(std::io::stdin()).context("reading standard input")?;
        return parse_documents(&text, "<stdin>", Path::new("."), out);
    }
    let path = Path::new(file);
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        entries.sort();
        for entry in entries {
            read_documents(&entry.to_string_lossy(), out)?;
        }
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_documents(&text, file, path.parent().unwrap_or(Path::new(".")), out)
}

fn parse_documents(
    text: &str,
    source: &str,
    base: &Path,
    out: &mut Vec<Document>,
) -> anyhow::Result<()> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let workload = Workload::deserialize(doc).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        out.push(Document {
            source: source.to_string(),
            base: base.to_path_buf(),
            workload,
        });
    }
    Ok(())
}

fn decode(object: &WorkloadObject) -> anyhow::Result<Workload> {
    serde_json::from_slice(&object.json).context("decoding a workload from the server")
}

/// `flotilla get workloads [NAME]`.
pub async fn get(server: &str, name: Option<&str>, output: Output) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let single = name.is_some();
    let workloads: Vec<Workload> = match name {
        Some(name) => vec![decode(
            &client
                .get(GetRequest {
                    namespace: String::new(),
                    name: name.to_string(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner(),
        )?],
        None => client
            .list(ListRequest::default())
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner()
            .items
            .iter()
            .map(decode)
            .collect::<anyhow::Result<_>>()?,
    };
    match output {
        // As kubectl: one named object prints as itself, anything else as a List.
        Output::Json | Output::Yaml => {
            let value = match (single, workloads.as_slice()) {
                (true, [one]) => serde_json::to_value(one)?,
                _ => serde_json::json!({"apiVersion": "v1", "kind": "List", "items": workloads}),
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", serde_yaml::to_string(&value)?);
            }
        }
        Output::Table | Output::Wide => {
            println!(
                "{:<12} {:<32} {:>8} {:>8} {:>10}",
                "NAMESPACE", "NAME", "READY", "REPLICAS", "GENERATION"
            );
            for w in &workloads {
                let ready = w.status.as_ref().map_or(0, |s| s.ready_replicas);
                println!(
                    "{:<12} {:<32} {:>8} {:>8} {:>10}",
                    w.key().namespace,
                    w.metadata.name,
                    ready,
                    w.spec.replicas,
                    w.metadata.generation
                );
            }
        }
    }
    Ok(())
}

/// `flotilla delete workload NAME`.
pub async fn delete(server: &str, name: &str) -> anyhow::Result<()> {
    connect(server)
        .await?
        .delete(DeleteRequest {
            namespace: String::new(),
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("wasmworkload.flotilla.dev/{name} deleted");
    Ok(())
}
