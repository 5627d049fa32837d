//! Commands against the control plane's user API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use flotilla_control_plane::kubernetes;
use flotilla_model::{Condition, Workload};
use flotilla_proto::agent::v1::{ConfigObject, LogChunk, LogOptions};
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    ApplyConfigRequest, ApplyRequest, DeleteNodeRequest, DeleteRequest, GetRequest,
    ListEventsRequest, ListNodesRequest, ListRequest, Node, PushModuleRequest, WatchRequest,
    WorkloadLogsRequest, WorkloadObject, watch_event,
};
use serde::Deserialize;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::output::{LogView, copy_logs, print_structured};
use crate::{Output, endpoint};

/// The largest answer the CLI reads: a list holds whole objects (each up to 1 MiB), and the
/// user API does not page lists yet.
const MAX_ANSWER_BYTES: usize = 256 << 20;

/// A client of the user API that presents the user's token, when given.
pub(crate) type Client = WorkloadsClient<InterceptedService<Channel, crate::BearerToken>>;

pub(crate) async fn connect(server: &str) -> anyhow::Result<Client> {
    let token = crate::user_token().await?;
    crate::channel(server)
        .await
        .map(|channel| {
            WorkloadsClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_ANSWER_BYTES)
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the control plane at {}: {e}",
                endpoint(server)
            )
        })
}

/// A manifest document and the directory its relative paths resolve against: a workload, or a
/// ConfigMap or Secret (`v1`, as kubectl writes them).
struct Document {
    source: String,
    base: PathBuf,
    workload: Workload,
    config: Option<ConfigObject>,
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
    // ConfigMaps and Secrets first: the workloads of the same apply may need them to start.
    let (config, documents): (Vec<Document>, Vec<Document>) =
        documents.into_iter().partition(|d| d.config.is_some());
    for doc in config {
        let Some(object) = doc.config else { continue };
        let kind = object.kind().noun();
        let name = object.name.clone();
        client
            .apply_config(ApplyConfigRequest {
                object: Some(object),
                create_only: false,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", doc.source, s.message()))?;
        println!("{kind}/{name} applied");
    }
    for mut doc in documents {
        if let Some(path) = doc.workload.spec.module.path.take() {
            let path = doc.base.join(path);
            let sha256 = &doc.workload.spec.module.sha256;
            let namespace = doc.workload.key().namespace;
            doc.workload.spec.module.sha256 = push_module(&mut client, &path, sha256, &namespace)
                .await
                .with_context(|| format!("{}: spec.module.path", doc.source))?;
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

/// Pushes the module at `path` (which must have `sha256` when that is not empty) for the
/// workloads of `namespace` and returns its digest.
pub(crate) async fn push_module(
    client: &mut Client,
    path: &Path,
    sha256: &str,
    namespace: &str,
) -> anyhow::Result<String> {
    let module = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let pushed = client
        .push_module(PushModuleRequest {
            module,
            sha256: sha256.to_string(),
            namespace: namespace.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("pushing {}: {}", path.display(), s.message()))?
        .into_inner();
    Ok(pushed.sha256)
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
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        if value.is_null() {
            continue;
        }
        let config = serde_json::to_value(&value)
            .map_err(anyhow::Error::from)
            .and_then(|json| Ok(kubernetes::config::from_manifest(json)?))
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        let workload = match config {
            Some(_) => Workload::new("", "", Default::default()),
            None => serde_yaml::from_value(value).map_err(|e| anyhow::anyhow!("{source}: {e}"))?,
        };
        out.push(Document {
            source: source.to_string(),
            base: base.to_path_buf(),
            workload,
            config,
        });
    }
    Ok(())
}

/// Every workload of `namespace` (empty: of every namespace), then each change.
pub(crate) async fn watch_workloads(
    client: &mut Client,
    namespace: &str,
) -> anyhow::Result<tonic::Streaming<flotilla_proto::control::v1::WatchEvent>> {
    Ok(client
        .watch(WatchRequest {
            namespace: namespace.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("watching workloads: {}", s.message()))?
        .into_inner())
}

pub(crate) fn decode(object: &WorkloadObject) -> anyhow::Result<Workload> {
    serde_json::from_slice(&object.json).context("decoding a workload from the server")
}

/// `flotilla get workloads [NAME] [-n NAMESPACE]`: every namespace's without a name.
pub async fn get(
    server: &str,
    name: Option<&str>,
    namespace: &str,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let single = name.is_some();
    let workloads: Vec<Workload> = match name {
        Some(name) => vec![decode(
            &client
                .get(GetRequest {
                    namespace: namespace.to_string(),
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
        Output::Json | Output::Yaml => print_structured(&workloads, single, output)?,
        Output::Table | Output::Wide => {
            let wide = output == Output::Wide;
            print!(
                "{:<12} {:<24} {:>11} {:>10} {:<20} {:>10}",
                "NAMESPACE", "NAME", "READY", "UP-TO-DATE", "STATUS", "GENERATION"
            );
            println!("{}", if wide { "  NODES  ENDPOINTS" } else { "" });
            for w in &workloads {
                let status = w.status.clone().unwrap_or_default();
                let state = match condition(w, "Ready") {
                    Some(c) if c.reason == "AllReplicasReady" => "Running".to_string(),
                    Some(c) => c.reason.clone(),
                    None => "Pending".to_string(),
                };
                print!(
                    "{:<12} {:<24} {:>11} {:>10} {:<20} {:>10}",
                    w.key().namespace,
                    w.metadata.name,
                    format!("{}/{}", status.ready_replicas, w.spec.replicas),
                    status.updated_replicas,
                    state,
                    w.metadata.generation
                );
                if wide {
                    let nodes: Vec<String> = status
                        .placements
                        .iter()
                        .map(|(node, n)| format!("{node}={n}"))
                        .collect();
                    let endpoints = if status.endpoints.is_empty() {
                        "<none>".to_string()
                    } else {
                        status.endpoints.join(",")
                    };
                    print!("  {}  {endpoints}", nodes.join(","));
                }
                println!();
            }
        }
    }
    Ok(())
}

/// `flotilla delete workload NAME [-n NAMESPACE]`.
pub async fn delete(server: &str, name: &str, namespace: &str) -> anyhow::Result<()> {
    connect(server)
        .await?
        .delete(DeleteRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("wasmworkload.flotilla.dev/{name} deleted");
    Ok(())
}

/// Forgets a node and releases its name, as `kubectl delete node` does.
pub async fn delete_node(server: &str, name: &str) -> anyhow::Result<()> {
    let deleted = connect(server)
        .await?
        .delete_node(DeleteNodeRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if deleted.registered {
        println!("node/{name} deleted");
    } else {
        println!("node/{name} released (it was not registered)");
    }
    Ok(())
}

pub(crate) async fn get_workload(
    client: &mut Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Workload> {
    let object = client
        .get(GetRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    decode(&object)
}

pub(crate) fn condition<'a>(workload: &'a Workload, type_: &str) -> Option<&'a Condition> {
    workload
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Whether the status describes the current spec and says every replica is ready.
fn is_ready(workload: &Workload) -> bool {
    let current = workload
        .status
        .as_ref()
        .is_some_and(|s| s.observed_generation >= workload.metadata.generation);
    // An update is done when the current revision runs everywhere, not when old replicas
    // still make up the count.
    let rolled_out =
        condition(workload, "Progressing").is_none_or(|c| c.reason == "TemplateAvailable");
    current && rolled_out && condition(workload, "Ready").is_some_and(|c| c.status == "True")
}

/// `flotilla apply --wait`: follows the status of `applied` until all are ready, printing
/// progress and failure reasons as they change.
pub async fn wait_ready(
    server: &str,
    applied: &[Workload],
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    // One namespace's watch when they share one: a user may watch no further.
    let namespaces: BTreeSet<String> = applied.iter().map(|w| w.key().namespace).collect();
    let namespace = match namespaces.len() {
        1 => namespaces.first().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let mut watch = watch_workloads(&mut client, &namespace).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut waiting: BTreeMap<String, Workload> = applied
        .iter()
        .map(|w| (w.key().to_string(), w.clone()))
        .collect();
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    while !waiting.is_empty() {
        let event = match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => {
                let left: Vec<String> = waiting
                    .values()
                    .map(|w| format!("{} ({})", w.metadata.name, progress(w)))
                    .collect();
                bail!(
                    "timed out after {} waiting for: {}",
                    humantime::format_duration(timeout),
                    left.join(", ")
                );
            }
            Ok(None) => bail!("the control plane closed the watch"),
            Ok(Some(event)) => event.map_err(|s| anyhow::anyhow!("watch: {}", s.message()))?,
        };
        let deleted = event.r#type == watch_event::Type::Deleted as i32;
        for object in &event.objects {
            let workload = decode(object)?;
            let key = workload.key().to_string();
            let Some(target) = waiting.get(&key) else {
                continue;
            };
            if deleted {
                bail!("workload {key} was deleted while waiting");
            }
            if workload.metadata.generation < target.metadata.generation {
                continue;
            }
            let line = progress(&workload);
            if shown.get(&key) != Some(&line) {
                println!("{}: {line}", workload.metadata.name);
                shown.insert(key.clone(), line);
            }
            if let Some(c) = condition(&workload, "Progressing")
                .filter(|c| c.reason == "ProgressDeadlineExceeded")
            {
                bail!(
                    "{}: the update failed: {}",
                    workload.metadata.name,
                    c.message
                );
            }
            if is_ready(&workload) {
                waiting.remove(&key);
            } else {
                waiting.insert(key, workload);
            }
        }
    }
    Ok(())
}

/// `3/10 ready`, with the reason when something is wrong.
fn progress(workload: &Workload) -> String {
    let status = workload.status.clone().unwrap_or_default();
    let mut line = format!("{}/{} ready", status.ready_replicas, workload.spec.replicas);
    if status.updated_replicas < status.replicas {
        line.push_str(&format!(
            ", {} of revision {}",
            status.updated_replicas, status.revision
        ));
    }
    if status.succeeded_replicas > 0 {
        line.push_str(&format!(", {} completed", status.succeeded_replicas));
    }
    for type_ in ["Scheduled", "Ready", "Progressing"] {
        if let Some(c) = condition(workload, type_).filter(|c| c.status == "False")
            && c.reason != "ReplicasNotReady"
        {
            line.push_str(&format!(" ({}: {})", c.reason, c.message));
        }
    }
    line
}

/// `flotilla scale NAME --replicas N`: changes only the replica count, retrying when the
/// workload changed underneath.
pub async fn scale(server: &str, name: &str, replicas: u32) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    for _ in 0..5 {
        let mut workload = get_workload(&mut client, "", name).await?;
        workload.spec.replicas = i64::from(replicas);
        workload.status = None;
        let manifest = serde_json::to_vec(&workload)?;
        match client.apply(ApplyRequest { manifest }).await {
            Ok(_) => {
                println!("wasmworkload.flotilla.dev/{name} scaled to {replicas}");
                return Ok(());
            }
            // Someone else wrote in between (resourceVersion is stale): read again.
            Err(status) if status.code() == Code::Aborted => continue,
            Err(status) => bail!("{}", status.message()),
        }
    }
    bail!("workload {name} kept changing; try again")
}

/// One sandbox of a workload, as the control plane finds it.
pub struct SandboxRef {
    pub namespace: String,
    pub name: String,
    /// The node; empty for the first the workload is placed on.
    pub node: String,
    /// Its replica index on that node.
    pub replica: u32,
}

/// Opens one sandbox's log stream through the control plane.
pub(crate) async fn open_logs(
    client: &mut Client,
    sandbox: &SandboxRef,
    follow: bool,
    options: LogOptions,
) -> Result<tonic::Streaming<LogChunk>, tonic::Status> {
    client
        .logs(WorkloadLogsRequest {
            namespace: sandbox.namespace.clone(),
            name: sandbox.name.clone(),
            node: sandbox.node.clone(),
            replica: sandbox.replica,
            follow,
            options: Some(options),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `flotilla logs NAME`: one sandbox's output, through the control plane.
pub async fn logs(
    server: &str,
    sandbox: SandboxRef,
    follow: bool,
    options: LogOptions,
    view: LogView,
) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let stream = open_logs(&mut client, &sandbox, follow, options)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    copy_logs(stream, view).await.map(drop)
}

/// A node as `-o json|yaml` prints it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeView<'a> {
    name: &'a str,
    ready: bool,
    labels: BTreeMap<&'a str, &'a str>,
    taints: Vec<String>,
    allocatable: ResourcesView,
    allocated: ResourcesView,
    running: u64,
    last_heartbeat_age_ms: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    ingress_url: &'a str,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourcesView {
    memory_bytes: u64,
    cpu_millis: u64,
    sandboxes: u64,
}

fn node_view(node: &Node) -> NodeView<'_> {
    let resources = |r: Option<&flotilla_proto::control::v1::NodeResources>| {
        let r = r.cloned().unwrap_or_default();
        ResourcesView {
            memory_bytes: r.memory_bytes,
            cpu_millis: r.cpu_millis,
            sandboxes: r.sandboxes,
        }
    };
    NodeView {
        name: &node.name,
        ready: node.ready,
        labels: node
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        taints: node
            .taints
            .iter()
            .map(|t| format!("{}={}:{}", t.key, t.value, t.effect))
            .collect(),
        allocatable: resources(node.allocatable.as_ref()),
        allocated: resources(node.allocated.as_ref()),
        running: node.running,
        last_heartbeat_age_ms: node.last_heartbeat_age_ms,
        ingress_url: &node.ingress_url,
    }
}

/// `flotilla get nodes [NAME]`.
pub async fn get_nodes(server: &str, name: Option<&str>, output: Output) -> anyhow::Result<()> {
    let mut nodes = connect(server)
        .await?
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .nodes;
    if let Some(name) = name {
        nodes.retain(|n| n.name == name);
        if nodes.is_empty() {
            bail!("node {name} not found");
        }
    }
    match output {
        Output::Json | Output::Yaml => {
            let views: Vec<NodeView<'_>> = nodes.iter().map(node_view).collect();
            print_structured(&views, name.is_some(), output)?;
        }
        Output::Table | Output::Wide => {
            let wide = output == Output::Wide;
            print!(
                "{:<24} {:<9} {:<6} {:>20} {:>21} {:>10}",
                "NAME", "STATUS", "ARCH", "RUNNING/PLACED/MAX", "MEMORY PLACED/MAX", "HEARTBEAT"
            );
            println!("{}", if wide { "  INGRESS  LABELS" } else { "" });
            for node in &nodes {
                let view = node_view(node);
                print!(
                    "{:<24} {:<9} {:<6} {:>20} {:>21} {:>10}",
                    node.name,
                    if node.ready { "Ready" } else { "NotReady" },
                    node.labels
                        .get("kubernetes.io/arch")
                        .map_or("-", String::as_str),
                    format!(
                        "{}/{}/{}",
                        node.running, view.allocated.sandboxes, view.allocatable.sandboxes
                    ),
                    format!(
                        "{}/{}",
                        bytes(view.allocated.memory_bytes),
                        bytes(view.allocatable.memory_bytes)
                    ),
                    format!("{:.1}s ago", node.last_heartbeat_age_ms as f64 / 1000.0),
                );
                if wide {
                    let labels: Vec<String> = view
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let ingress = if node.ingress_url.is_empty() {
                        "<none>"
                    } else {
                        &node.ingress_url
                    };
                    print!("  {ingress}  {}", labels.join(","));
                }
                println!();
            }
        }
    }
    Ok(())
}

/// Binary units, as kubectl shows quantities.
fn bytes(value: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut v = value as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value}")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// `flotilla describe workload NAME`.
pub async fn describe(server: &str, name: &str, namespace: &str) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let workload = get_workload(&mut client, namespace, name).await?;
    let events = client
        .list_events(ListEventsRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .events;
    let spec = &workload.spec;
    let status = workload.status.clone().unwrap_or_default();
    println!("Name:           {}", workload.metadata.name);
    println!("Namespace:      {}", workload.key().namespace);
    println!("Generation:     {}", workload.metadata.generation);
    let module = match (&spec.module.url, spec.module.sha256.as_str()) {
        (Some(url), sha) => format!("{url} (sha256 {sha})"),
        (None, sha) => format!("sha256 {sha}"),
    };
    println!("Module:         {module}");
    if !spec.args.is_empty() {
        println!("Args:           {}", spec.args.join(" "));
    }
    println!("Restart policy: {:?}", spec.restart_policy);
    let features = spec.wasm_features();
    if !features.is_empty() {
        println!("Wasm features:  {features}");
    }
    for line in crate::describe::template_sections(spec) {
        println!("{line}");
    }
    println!(
        "Replicas:       {} desired | {} placed | {} ready | {} completed",
        spec.replicas, status.replicas, status.ready_replicas, status.succeeded_replicas
    );
    if !spec.node_selector.is_empty() {
        let selector: Vec<String> = spec
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("Node selector:  {}", selector.join(","));
    }
    println!("Placements:");
    if status.placements.is_empty() {
        println!("  <none>");
    }
    for (node, count) in &status.placements {
        println!("  {node:<24} {count}");
    }
    if !status.revisions.is_empty() {
        println!("Revisions:");
        for r in &status.revisions {
            let current = if r.revision == status.revision {
                " (current)"
            } else {
                ""
            };
            println!(
                "  {:<4} {} placed | {} ready | {} available{current}",
                r.revision, r.replicas, r.ready_replicas, r.available_replicas
            );
        }
    }
    println!("Conditions:");
    println!("  {:<10} {:<7} {:<22} MESSAGE", "TYPE", "STATUS", "REASON");
    for c in &status.conditions {
        println!(
            "  {:<10} {:<7} {:<22} {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    println!("Events:");
    if events.is_empty() {
        println!("  <none>");
    } else {
        println!(
            "  {:<10} {:<18} {:<16} {:>6}  MESSAGE",
            "LAST SEEN", "REASON", "NODE", "COUNT"
        );
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for e in &events {
        let age = Duration::from_secs(u64::try_from((now_ms - e.last_at_ms) / 1000).unwrap_or(0));
        let first_line = e.message.lines().next().unwrap_or_default();
        println!(
            "  {:<10} {:<18} {:<16} {:>6}  {first_line}",
            format!("{} ago", humantime::format_duration(age)),
            e.reason,
            e.node,
            e.count
        );
    }
    Ok(())
}
