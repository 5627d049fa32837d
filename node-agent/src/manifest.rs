//! Static workload manifests: `WasmWorkload` YAML files the agent runs without a control plane,
//! like kubelet's static pods.
//!
//! ```yaml
//! apiVersion: flotilla.dev/v1alpha1
//! kind: WasmWorkload
//! metadata:
//!   name: hello
//! spec:
//!   module:
//!     path: hello.wasm        # relative to the manifest file
//!     sha256: 3f2a...         # optional; verified when set
//!   args: ["--verbose"]
//!   env: [{ name: GREETING, value: hi }]
//!   replicas: 2
//!   restartPolicy: OnFailure  # Always (default) | OnFailure | Never
//!   activeDeadlineSeconds: 30 # wall-clock limit of one run
//!   resources:
//!     requests: { memory: 1Mi }
//!     limits: { memory: 16Mi, cpuTime: 2s, logs: 64Ki }
//! ```
//!
//! Unknown fields are rejected, and every error names the file and the field.

use std::path::{Path, PathBuf};

use flotilla_proto::agent::v1::{
    EnvVar as EnvVarMessage, ModuleSource, Resources as ResourcesMessage, RestartPolicy,
    WorkloadSpec, module_source,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The API version static manifests use.
pub const API_VERSION: &str = "flotilla.dev/v1alpha1";
/// The kind static manifests use.
pub const KIND: &str = "WasmWorkload";

/// A `WasmWorkload` object as written in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmWorkload {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Object metadata.
    pub metadata: Metadata,
    /// Desired state.
    pub spec: Spec,
}

/// The subset of Kubernetes object metadata a static manifest uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// Workload name.
    pub name: String,
    /// Accepted for compatibility with `kubectl apply` files; static workloads share one namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `spec` of a `WasmWorkload`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    /// The module to run.
    pub module: Module,
    /// Arguments after argv[0].
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Sandboxes to run. Default 1.
    #[serde(default = "one")]
    pub replicas: u32,
    /// `Always` (default), `OnFailure` or `Never`.
    #[serde(default)]
    pub restart_policy: Option<String>,
    /// Wall-clock limit of one run, in seconds.
    #[serde(default)]
    pub active_deadline_seconds: Option<u64>,
    /// Memory, CPU and log limits.
    #[serde(default)]
    pub resources: Resources,
}

/// Where the module comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Module {
    /// A wasm file, relative to the manifest.
    pub path: String,
    /// The module's SHA-256 in hex, verified when set.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// One environment variable.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// Requests and limits, Kubernetes-style.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// What admission accounts for.
    #[serde(default)]
    pub requests: Requests,
    /// What the sandbox may use.
    #[serde(default)]
    pub limits: Limits,
}

/// `resources.requests`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requests {
    /// Memory quantity such as `1Mi`.
    pub memory: Option<String>,
}

/// `resources.limits`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    /// Memory quantity such as `16Mi`, summed over all memories and tables.
    pub memory: Option<String>,
    /// CPU time one run may use, such as `500ms` or `2s`.
    pub cpu_time: Option<String>,
    /// Log ring size, such as `64Ki`.
    pub logs: Option<String>,
}

fn one() -> u32 {
    1
}

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The YAML does not match the schema.
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    /// A field has an invalid value.
    #[error("{file}: {field}: {message}")]
    Field {
        /// The manifest file.
        file: PathBuf,
        /// The field's path, e.g. `spec.resources.limits.memory`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Reads every `*.yaml`/`*.yml` file in `dir` (sorted) into workload specs. Each file may hold
/// several documents separated by `---`.
///
/// # Errors
/// Stops at the first unreadable directory; a bad file is returned as an error in its slot so the
/// caller can report it and go on with the others.
pub fn load_dir(dir: &Path) -> std::io::Result<Vec<Result<WorkloadSpec, ManifestError>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut specs = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => specs.extend(parse(&text, &file)),
            Err(e) => specs.push(Err(ManifestError::Read(file, e))),
        }
    }
    Ok(specs)
}

/// Parses the documents of one manifest file. Module paths resolve against the file's directory.
pub fn parse(text: &str, file: &Path) -> Vec<Result<WorkloadSpec, ManifestError>> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let workload = WasmWorkload::deserialize(doc)
                .map_err(|e| ManifestError::Parse(file.to_path_buf(), e.to_string()))?;
            to_spec(workload, file)
        })
        .collect()
}

fn to_spec(w: WasmWorkload, file: &Path) -> Result<WorkloadSpec, ManifestError> {
    let field = |field: &'static str, message: String| ManifestError::Field {
        file: file.to_path_buf(),
        field,
        message,
    };
    if w.api_version != API_VERSION {
        return Err(field("apiVersion", format!("must be {API_VERSION}")));
    }
    if w.kind != KIND {
        return Err(field("kind", format!("must be {KIND}")));
    }
    let restart_policy = match w.spec.restart_policy.as_deref() {
        None | Some("Always") => RestartPolicy::Always,
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        Some(other) => {
            return Err(field(
                "spec.restartPolicy",
                format!("{other:?}: must be Always, OnFailure or Never"),
            ));
        }
    };
    let quantity = |name: &'static str, value: &Option<String>| -> Result<u64, ManifestError> {
        value
            .as_deref()
            .map(parse_quantity)
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(|m| field(name, m))
    };
    let limits = &w.spec.resources.limits;
    let cpu_limit_ms = limits
        .cpu_time
        .as_deref()
        .map(|t| {
            humantime::parse_duration(t)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| field("spec.resources.limits.cpuTime", format!("{t:?}: {e}")))
        })
        .transpose()?
        .unwrap_or_default();
    let resources = ResourcesMessage {
        memory_limit_bytes: quantity("spec.resources.limits.memory", &limits.memory)?,
        memory_request_bytes: quantity(
            "spec.resources.requests.memory",
            &w.spec.resources.requests.memory,
        )?,
        cpu_limit_ms,
        deadline_ms: w
            .spec
            .active_deadline_seconds
            .map_or(0, |s| s.saturating_mul(1000)),
        log_limit_bytes: quantity("spec.resources.limits.logs", &limits.logs)?,
        max_table_elements: 0,
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let module_path = base.join(&w.spec.module.path);
    let mut spec = WorkloadSpec {
        name: w.metadata.name,
        generation: 0,
        module: Some(ModuleSource {
            source: Some(module_source::Source::Path(
                module_path.to_string_lossy().into_owned(),
            )),
            sha256: w.spec.module.sha256.unwrap_or_default(),
        }),
        args: w.spec.args,
        env: w
            .spec
            .env
            .into_iter()
            .map(|e| EnvVarMessage {
                name: e.name,
                value: e.value,
            })
            .collect(),
        replicas: w.spec.replicas,
        resources: Some(resources),
        restart_policy: restart_policy as i32,
    };
    spec.generation = generation_of(&spec);
    Ok(spec)
}

/// A generation derived from the spec's content, so that an edited manifest replaces sandboxes
/// and an unchanged one does not.
fn generation_of(spec: &WorkloadSpec) -> u64 {
    let mut without_replicas = spec.clone();
    without_replicas.replicas = 0;
    let digest = Sha256::digest(prost::Message::encode_to_vec(&without_replicas));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // Keep it positive and readable in sandbox ids.
    u64::from_be_bytes(bytes) >> 40
}

/// Parses a Kubernetes quantity of bytes: `123`, `64Ki`, `16Mi`, `1Gi`, `1k`, `5M`, `2G`.
///
/// # Errors
/// Returns a message naming the bad value.
pub fn parse_quantity(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?}: not a quantity (e.g. 64Mi)"))?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(format!("{value:?}: unknown suffix {suffix:?}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{value:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: WasmWorkload
metadata:
  name: hello
spec:
  module:
    path: hello.wasm
  replicas: 3
  restartPolicy: OnFailure
  activeDeadlineSeconds: 5
  resources:
    requests: { memory: 1Mi }
    limits: { memory: 16Mi, cpuTime: 1500ms, logs: 4Ki }
"#;

    #[test]
    fn parses_a_full_manifest() {
        let specs = parse(HELLO, Path::new("/srv/manifests/hello.yaml"));
        let spec = specs.into_iter().next().expect("one doc").expect("valid");
        assert_eq!(spec.name, "hello");
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.restart_policy, RestartPolicy::OnFailure as i32);
        let res = spec.resources.expect("resources");
        assert_eq!(res.memory_limit_bytes, 16 << 20);
        assert_eq!(res.memory_request_bytes, 1 << 20);
        assert_eq!(res.cpu_limit_ms, 1500);
        assert_eq!(res.deadline_ms, 5000);
        assert_eq!(res.log_limit_bytes, 4096);
        let source = spec.module.and_then(|m| m.source);
        assert_eq!(
            source,
            Some(module_source::Source::Path(
                "/srv/manifests/hello.wasm".into()
            ))
        );
    }

    #[test]
    fn generation_follows_content_not_replicas() {
        let a = parse(HELLO, Path::new("a.yaml")).remove(0).expect("valid");
        let scaled = HELLO.replace("replicas: 3", "replicas: 5");
        let b = parse(&scaled, Path::new("a.yaml"))
            .remove(0)
            .expect("valid");
        assert_eq!(a.generation, b.generation);
        let edited = HELLO.replace("cpuTime: 1500ms", "cpuTime: 2s");
        let c = parse(&edited, Path::new("a.yaml"))
            .remove(0)
            .expect("valid");
        assert_ne!(a.generation, c.generation);
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let cases = [
            (HELLO.replace("replicas: 3", "replicas: -1"), "replicas"),
            (
                HELLO.replace("replicas: 3", "replicaz: 3"),
                "unknown field `replicaz`",
            ),
            (
                HELLO.replace("OnFailure", "Sometimes"),
                "spec.restartPolicy",
            ),
            (
                HELLO.replace("16Mi", "16Mo"),
                "spec.resources.limits.memory",
            ),
            (
                HELLO.replace("1500ms", "fast"),
                "spec.resources.limits.cpuTime",
            ),
            (HELLO.replace("v1alpha1", "v9"), "apiVersion"),
        ];
        for (text, needle) in cases {
            let err = parse(&text, Path::new("bad.yaml"))
                .remove(0)
                .expect_err(needle);
            let shown = err.to_string();
            assert!(shown.contains(needle), "{needle}: {shown}");
            assert!(shown.contains("bad.yaml"), "{shown}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("123"), Ok(123));
        assert_eq!(parse_quantity("64Ki"), Ok(65_536));
        assert_eq!(parse_quantity("2G"), Ok(2_000_000_000));
        assert!(parse_quantity("Mi").is_err());
        assert!(parse_quantity("1Xi").is_err());
        assert!(parse_quantity("99999999999Ti").is_err());
    }
}
