//! `flotilla run`: one module, once, with its output on ours and its exit code as ours, as
//! `docker run` and `kubectl run --rm -i --restart=Never` do.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_model::{
    EmptyDirVolume, EnvVar, HostPathVolume, ModuleRef, ResourceList, Resources, RestartPolicy,
    Volume, VolumeMount, Workload, WorkloadSpec,
};
use flotilla_proto::agent::v1::{LogChunk, LogOptions, Termination};
use flotilla_proto::control::v1::{
    ApplyRequest, AttachRequest, AttachResponse, DeleteRequest, GetRequest,
    SandboxRef as ProtoSandboxRef, attach_request,
};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::control::{self, Client, SandboxRef};
use crate::output::{LogView, copy_logs};

/// Exit code of a run that Flotilla could not carry out (as `docker run`'s 125): the control
/// plane unreachable, an invalid manifest, a workload that never started.
pub const EXIT_FLOTILLA_ERROR: u8 = 125;

/// `flotilla run` arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The workload's name.
    name: String,
    /// The module: a local file (pushed first), an `https://` URL or an `oci://` reference.
    #[arg(long)]
    module: String,
    /// The workload's namespace.
    #[arg(short, long, default_value = flotilla_model::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Delete the workload when it ends, or when this command is interrupted.
    #[arg(long)]
    rm: bool,
    /// Connect our stdin to the guest's (`spec.stdin`); the guest reads EOF when ours ends.
    /// Without it the guest's stdin is empty.
    #[arg(short = 'i', long = "stdin")]
    stdin: bool,
    /// What the agent does when the sandbox ends; output follows it across restarts.
    #[arg(long, value_enum, default_value_t = Restart::Never)]
    restart: Restart,
    /// An environment variable, `NAME=VALUE`; repeatable.
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// A directory for the guest: `HOST_PATH:GUEST_PATH[:ro]` mounts a directory of the node
    /// (the agent must allow it with --allow-host-path); `GUEST_PATH` alone is an empty
    /// scratch directory of the sandbox's own.
    #[arg(short, long = "volume", value_name = "[HOST_PATH:]GUEST_PATH[:ro]")]
    volume: Vec<String>,
    /// Limits, e.g. `memory=64Mi,cpu=500m,cpuTime=10s,logs=1Mi`.
    #[arg(long, value_name = "NAME=QUANTITY,...")]
    limits: Option<String>,
    /// Requests for placement, e.g. `memory=16Mi,cpu=100m`.
    #[arg(long, value_name = "NAME=QUANTITY,...")]
    requests: Option<String>,
    /// WebAssembly proposals the module may use beyond the default set (`spec.wasm.features`):
    /// gc, exceptions, wide-arithmetic, custom-page-sizes. Repeat or separate with commas.
    #[arg(long = "wasm-feature", value_name = "FEATURE", value_delimiter = ',')]
    wasm_features: Vec<flotilla_model::WasmFeature>,
    /// How long to wait for the sandbox to be placed and started.
    #[arg(long, default_value = "1m")]
    start_timeout: humantime::Duration,
    /// Arguments for the guest (argv[1..]), after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// `--restart`, as a Pod's restartPolicy.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Restart {
    Never,
    OnFailure,
    Always,
}

/// Runs the workload, copies its output and returns its exit code.
pub async fn run(server: &str, args: RunArgs) -> u8 {
    let rm = args.rm;
    let key = (args.namespace.clone(), args.name.clone());
    let mut created = false;
    let outcome = tokio::select! {
        outcome = run_to_end(server, args, &mut created) => outcome,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("flotilla: interrupted");
            Ok(Ended::Interrupted)
        }
    };
    if rm
        && created
        && let Err(error) = delete(server, &key.0, &key.1).await
    {
        eprintln!("flotilla: deleting workload {}: {error:#}", key.1);
    }
    match outcome {
        Ok(ended) => ended.exit_code(),
        Err(error) => {
            eprintln!("error: {error:#}");
            EXIT_FLOTILLA_ERROR
        }
    }
}

/// How a run ended, from this command's point of view.
#[derive(Debug)]
enum Ended {
    /// The sandbox ended for good.
    Sandbox(Termination),
    /// Ctrl-C.
    Interrupted,
}

impl Ended {
    fn exit_code(&self) -> u8 {
        match self {
            Ended::Sandbox(termination) => exit_code(termination),
            // 128 + SIGINT, as a shell reports it.
            Ended::Interrupted => 130,
        }
    }
}

/// Our exit code for how a sandbox ended, following the shell's and Docker's conventions:
/// the guest's own code when it exited (codes beyond 0-255 become 255), 128 + a signal's number
/// where a process would have had one, 124 as `timeout(1)` for a deadline, 126 for a module that
/// cannot run and 127 for one that cannot be fetched.
pub fn exit_code(termination: &Termination) -> u8 {
    match termination.reason.as_str() {
        "Completed" | "Error" => termination
            .exit_code
            .map_or(1, |code| u8::try_from(code).unwrap_or(255)),
        // A crash: 128 + SIGABRT, as the wasmtime CLI exits on a trap.
        "Trap" => 134,
        // Killed for memory: 128 + SIGKILL, as Docker reports an OOM kill.
        "OutOfMemory" => 137,
        // Out of CPU time: 128 + SIGXCPU, as RLIMIT_CPU ends a process.
        "CpuLimit" => 152,
        "DeadlineExceeded" => 124,
        // Stopped by someone else: 128 + SIGTERM.
        "Stopped" => 143,
        "ModuleUnavailable" => 127,
        // InvalidModule, ModuleTooCostly, a volume or config that cannot be set up, ...
        _ => 126,
    }
}

async fn run_to_end(server: &str, args: RunArgs, created: &mut bool) -> anyhow::Result<Ended> {
    let mut client = control::connect(server).await?;
    let mut workload = workload(&args)?;
    if !args.module.contains("://") {
        let path = Path::new(&args.module);
        workload.spec.module.sha256 =
            control::push_module(&mut client, path, "", &args.namespace).await?;
    }
    let exists = client
        .get(GetRequest {
            namespace: args.namespace.clone(),
            name: args.name.clone(),
        })
        .await;
    match exists {
        Ok(_) => bail!(
            "workload {} already exists in namespace {}; delete it or choose another name",
            args.name,
            args.namespace
        ),
        Err(status) if status.code() == Code::NotFound => {}
        Err(status) => bail!("{}", status.message()),
    }
    let manifest = serde_json::to_vec(&workload)?;
    client
        .apply(ApplyRequest { manifest })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    *created = true;
    let sandbox = SandboxRef {
        namespace: args.namespace.clone(),
        name: args.name.clone(),
        node: String::new(),
        replica: 0,
    };
    let stream = open_when_started(&mut client, &sandbox, *args.start_timeout).await?;
    if args.stdin {
        let attach = attach_stdin(client.clone(), sandbox, *args.start_timeout);
        tokio::spawn(async move {
            if let Err(error) = attach.await {
                eprintln!("flotilla: stdin: {error:#}");
            }
        });
    }
    let view = LogView {
        timestamps: false,
        split: true,
    };
    match copy_logs(stream, view).await? {
        Some(termination) => {
            report(&args.name, &termination);
            Ok(Ended::Sandbox(termination))
        }
        None => bail!(
            "the log stream of {} ended before the sandbox did; `flotilla logs {}` shows the rest",
            args.name,
            args.name
        ),
    }
}

/// Says on stderr why a sandbox ended when it did not simply exit.
fn report(name: &str, termination: &Termination) {
    match termination.reason.as_str() {
        "Completed" => {}
        "Error" if termination.exit_code.is_some() => {}
        reason => eprintln!("flotilla: {name} ended: {reason}: {}", termination.message),
    }
}

/// Opens the sandbox's followed log stream once it exists: until it is placed and its agent
/// has it, the control plane or the agent answers NOT_FOUND (or UNAVAILABLE while the node
/// reconnects), and we ask again.
async fn open_when_started(
    client: &mut Client,
    sandbox: &SandboxRef,
    timeout: Duration,
) -> anyhow::Result<futures::stream::BoxStream<'static, Result<LogChunk, tonic::Status>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        // Every byte, however slowly we read: the guest waits for us rather than drop output.
        let options = LogOptions {
            wait_for_reader: true,
            ..LogOptions::default()
        };
        let last = match control::open_logs(client, sandbox, true, options).await {
            Ok(mut stream) => match stream.next().await {
                Some(Err(status)) => status,
                first => {
                    let first = futures::stream::iter(first);
                    return Ok(first.chain(stream).boxed());
                }
            },
            Err(status) => status,
        };
        if !matches!(last.code(), Code::NotFound | Code::Unavailable) {
            bail!("{}", last.message());
        }
        if tokio::time::Instant::now() + delay > deadline {
            let why = scheduling(client, sandbox).await;
            bail!(
                "{} did not start within {timeout:?}: {}{why}",
                sandbox.name,
                last.message()
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// How the agent ends its refusal to attach to a sandbox that has ended
/// (`AttachError::Ended`).
const ENDED: &str = "the sandbox has ended";

/// Copies our stdin to the sandbox's until ours ends (the guest then reads EOF) or the sandbox
/// does. Our stdin is read only once the sandbox's is attached, so retries lose nothing.
async fn attach_stdin(
    mut client: Client,
    sandbox: SandboxRef,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    let (input, mut responses) = loop {
        let (input, rx) = mpsc::channel(2);
        let first = AttachRequest {
            kind: Some(attach_request::Kind::Sandbox(ProtoSandboxRef {
                namespace: sandbox.namespace.clone(),
                name: sandbox.name.clone(),
                node: sandbox.node.clone(),
                replica: sandbox.replica,
            })),
        };
        input.try_send(first)?;
        let status = match client.attach(ReceiverStream::new(rx)).await {
            Ok(response) => {
                let mut responses = response.into_inner();
                match responses.next().await {
                    Some(Ok(AttachResponse { attached: true })) => break (input, responses),
                    Some(Ok(_)) => bail!("the control plane did not attach"),
                    Some(Err(status)) => status,
                    None => return Ok(()),
                }
            }
            Err(status) => status,
        };
        // A guest that ended before we attached did not want our stdin: nothing to say.
        if status.code() == Code::FailedPrecondition && status.message().ends_with(ENDED) {
            return Ok(());
        }
        if !matches!(status.code(), Code::NotFound | Code::Unavailable)
            || tokio::time::Instant::now() + delay > deadline
        {
            bail!("{}", status.message());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    };
    let mut stdin = tokio::io::stdin();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = stdin.read(&mut buffer) => {
                let n = read.context("reading stdin")?;
                if n == 0 {
                    break;
                }
                let chunk = AttachRequest {
                    kind: Some(attach_request::Kind::Stdin(buffer[..n].to_vec())),
                };
                if input.send(chunk).await.is_err() {
                    break;
                }
            }
            // The call ended: the sandbox has.
            _ = responses.next() => return Ok(()),
        }
    }
    // Closing our side is the guest's EOF; the call ends once the agent has it all.
    drop(input);
    while responses.next().await.is_some() {}
    Ok(())
}

/// The workload's `Scheduled` condition when it is not met, for a run that did not start.
async fn scheduling(client: &mut Client, sandbox: &SandboxRef) -> String {
    let Ok(workload) = control::get_workload(client, &sandbox.namespace, &sandbox.name).await
    else {
        return String::new();
    };
    workload
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Scheduled" && c.status != "True")
        .map(|c| format!(" ({}: {})", c.reason, c.message))
        .unwrap_or_default()
}

/// Deletes the workload and waits (up to 30 s) until it is gone, its sandboxes stopped, so that
/// its name can be used again at once.
async fn delete(server: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
    let mut client = control::connect(server).await?;
    client
        .delete(DeleteRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let get = GetRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match client.get(get).await {
            Err(status) if status.code() == Code::NotFound => return Ok(()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    bail!("it was still being deleted after 30 s")
}

/// The one-replica workload `args` describe.
fn workload(args: &RunArgs) -> anyhow::Result<Workload> {
    let module = if args.module.contains("://") {
        ModuleRef {
            url: Some(args.module.clone()),
            ..ModuleRef::default()
        }
    } else {
        ModuleRef::default()
    };
    let env = args
        .env
        .iter()
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair:?}: expected NAME=VALUE"))?;
            Ok(EnvVar {
                name: name.to_string(),
                value: value.to_string(),
                value_from: None,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let mut volumes = Vec::new();
    let mut volume_mounts = Vec::new();
    for (i, flag) in args.volume.iter().enumerate() {
        let (volume, mount) = volume(flag, &format!("volume-{i}"))?;
        volumes.push(volume);
        volume_mounts.push(mount);
    }
    let restart_policy = match args.restart {
        Restart::Never => RestartPolicy::Never,
        Restart::OnFailure => RestartPolicy::OnFailure,
        Restart::Always => RestartPolicy::Always,
    };
    let resources = Resources {
        requests: resource_list(args.requests.as_deref(), "--requests")?,
        limits: resource_list(args.limits.as_deref(), "--limits")?,
    };
    let spec = WorkloadSpec {
        stdin: args.stdin,
        module,
        args: args.args.clone(),
        env,
        volumes,
        volume_mounts,
        replicas: 1,
        resources,
        restart_policy,
        wasm: (!args.wasm_features.is_empty()).then(|| flotilla_model::WasmSpec {
            features: args.wasm_features.clone(),
        }),
        ..WorkloadSpec::default()
    };
    let mut workload = Workload::new(&args.namespace, &args.name, spec);
    workload
        .metadata
        .labels
        .insert("flotilla.dev/run".into(), args.name.clone());
    Ok(workload)
}

/// `HOST:GUEST[:ro]` as a hostPath volume, `GUEST` as an emptyDir.
fn volume(flag: &str, name: &str) -> anyhow::Result<(Volume, VolumeMount)> {
    let mut parts: Vec<&str> = flag.split(':').collect();
    let read_only = parts.last() == Some(&"ro");
    if read_only || parts.last() == Some(&"rw") {
        parts.pop();
    }
    let (host, guest) = match parts[..] {
        [guest] => (None, guest),
        [host, guest] => (Some(host), guest),
        _ => bail!("--volume {flag:?}: expected [HOST_PATH:]GUEST_PATH[:ro]"),
    };
    let volume = Volume {
        name: name.to_string(),
        empty_dir: host.is_none().then(EmptyDirVolume::default),
        host_path: host.map(|path| HostPathVolume {
            path: path.to_string(),
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: name.to_string(),
        mount_path: guest.to_string(),
        read_only: Some(read_only),
        sub_path: None,
    };
    Ok((volume, mount))
}

/// `memory=64Mi,cpu=500m` as a resource list; the control plane validates the quantities.
fn resource_list(flag: Option<&str>, option: &str) -> anyhow::Result<ResourceList> {
    let mut list = ResourceList::default();
    let Some(flag) = flag else {
        return Ok(list);
    };
    let mut seen = BTreeMap::new();
    for pair in flag.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("{option} {pair:?}: expected NAME=QUANTITY"))?;
        if seen.insert(name, value).is_some() {
            bail!("{option}: {name} given twice");
        }
        let slot = match name {
            "memory" => &mut list.memory,
            "cpu" => &mut list.cpu,
            "cpuTime" => &mut list.cpu_time,
            "logs" => &mut list.logs,
            _ => bail!("{option}: unknown resource {name:?} (memory, cpu, cpuTime or logs)"),
        };
        *slot = Some(value.to_string());
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(reason: &str, exit_code: Option<i32>) -> Termination {
        Termination {
            reason: reason.into(),
            exit_code,
            ..Termination::default()
        }
    }

    #[test]
    fn exit_codes_follow_docker_and_the_shell() {
        assert_eq!(exit_code(&ended("Completed", Some(0))), 0);
        assert_eq!(exit_code(&ended("Error", Some(3))), 3);
        assert_eq!(exit_code(&ended("Error", Some(1000))), 255);
        assert_eq!(exit_code(&ended("Error", Some(-1))), 255);
        assert_eq!(exit_code(&ended("Error", None)), 1);
        assert_eq!(exit_code(&ended("Trap", None)), 134);
        assert_eq!(exit_code(&ended("OutOfMemory", None)), 137);
        assert_eq!(exit_code(&ended("CpuLimit", None)), 152);
        assert_eq!(exit_code(&ended("DeadlineExceeded", None)), 124);
        assert_eq!(exit_code(&ended("Stopped", None)), 143);
        assert_eq!(exit_code(&ended("InvalidModule", None)), 126);
        assert_eq!(exit_code(&ended("ModuleUnavailable", None)), 127);
    }

    #[test]
    fn volumes_and_resources_parse_like_docker_and_kubectl() {
        let (v, m) = volume("/srv/data:/data:ro", "v").expect("host path");
        assert_eq!(v.host_path.expect("host path").path, "/srv/data");
        assert_eq!((m.mount_path.as_str(), m.read_only), ("/data", Some(true)));
        let (v, m) = volume("/scratch", "v").expect("empty dir");
        assert!(v.empty_dir.is_some() && v.host_path.is_none());
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("/scratch", Some(false))
        );
        assert!(volume("a:b:c:d", "v").is_err());

        let list = resource_list(Some("memory=64Mi,cpu=500m"), "--limits").expect("list");
        assert_eq!(list.memory.as_deref(), Some("64Mi"));
        assert_eq!(list.cpu.as_deref(), Some("500m"));
        assert!(resource_list(Some("gpu=1"), "--limits").is_err());
        assert!(resource_list(Some("memory"), "--limits").is_err());
        assert!(resource_list(Some("cpu=1,cpu=2"), "--limits").is_err());
    }
}
