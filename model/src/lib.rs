//! Flotilla's domain types: `WasmWorkload` objects, their validation, and Kubernetes quantities.
//!
//! The schema is the one the Kubernetes CRD uses (API group `flotilla.dev`, version `v1alpha1`):
//! the control plane's stores, the CLI, the node agent's static manifests and the operator all
//! read and write these types. Serde only by default; the `kube` feature adds the custom
//! resource types (`WasmWorkload`, and [`node::WasmNode`]) with their JSON schemas, from which
//! the CRDs are generated.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub mod config;
pub mod limits;
pub mod module;
pub mod network;
pub mod node;
pub mod rollout;
pub mod volumes;
pub mod wasm;

pub use config::{EnvFromSource, EnvVarSource, KeySelector, ObjectRef};
pub use limits::{Requests, SandboxLimits};
pub use network::{EgressRule, NetworkSpec};
pub use rollout::{IntOrPercent, RevisionStatus, RollingUpdate, Strategy, StrategyType};
pub use volumes::{
    ConfigMapVolume, EmptyDirVolume, HostPathVolume, KeyToPath, SecretVolume, StorageMedium,
    Volume, VolumeMount,
};
pub use wasm::{WasmFeature, WasmSpec};

/// `apiVersion` of every Flotilla object.
pub const API_VERSION: &str = "flotilla.dev/v1alpha1";
/// `kind` of a workload.
pub const WORKLOAD_KIND: &str = "WasmWorkload";
/// Namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Ceiling of every duration in seconds (`activeDeadlineSeconds`, `progressDeadlineSeconds`,
/// `minReadySeconds`, `resources.limits.cpuTime`, `http.timeout`): Kubernetes' int32 range, about
/// 68 years, so that no deadline added to a clock can overflow it.
pub const MAX_DURATION_SECONDS: i64 = i32::MAX as i64;
/// Log ring of a sandbox that sets no `resources.limits.logs`.
pub const DEFAULT_LOG_BYTES: u64 = 64 << 10;
/// Ceiling of `resources.limits.logs`: the ring lives in the agent's heap, so one sandbox may not
/// hold more than this (Kubernetes rotates a container's log at 10 MiB by default).
pub const MAX_LOG_BYTES: u64 = 16 << 20;

/// Largest object the control plane stores: a workload's manifest, or the data of one
/// ConfigMap or Secret (keys and values), as Kubernetes bounds ConfigMaps and Secrets. Every
/// object is sent to agents, so one tenant's object may not crowd others off the session.
pub const MAX_OBJECT_BYTES: usize = 1 << 20;

/// A `WasmWorkload`: desired state (`spec`) and observed state (`status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// Always [`WORKLOAD_KIND`].
    pub kind: String,
    /// Identity and versioning.
    pub metadata: ObjectMeta,
    /// Desired state.
    pub spec: WorkloadSpec,
    /// Observed state, written by the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkloadStatus>,
}

/// Object metadata, Kubernetes-style.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name (an RFC 1123 subdomain).
    pub name: String,
    /// Namespace; [`DEFAULT_NAMESPACE`] when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Unique id assigned on creation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Incremented by the store whenever `spec` changes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Incremented by the store on every write; used for optimistic concurrency.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Creation time, RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub creation_timestamp: String,
    /// Work that must finish before the object goes: while any is listed, deleting it only
    /// sets `deletionTimestamp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    /// When deletion was requested, RFC 3339; set while finalizers hold the object.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub deletion_timestamp: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Identifies a workload: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl WorkloadKey {
    /// A key; an empty namespace means [`DEFAULT_NAMESPACE`].
    pub fn new(namespace: &str, name: &str) -> Self {
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The desired state of a WasmWorkload: its module, arguments, environment, replicas,
/// resources, restart policy and placement rules.
// With the `kube` feature this is also the custom resource `WasmWorkload` (namespaced, with the
// `status` and `scale` subresources, so that `kubectl scale` and a HorizontalPodAutoscaler work).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
// Each printcolumn(...) repeats name/type_/json_path, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "flotilla.dev",
        version = "v1alpha1",
        kind = "WasmWorkload",
        namespaced,
        status = "WorkloadStatus",
        shortname = "ww",
        category = "flotilla",
        doc = "A workload of WebAssembly sandboxes, run by Flotilla's node agents.",
        scale(
            spec_replicas_path = ".spec.replicas",
            status_replicas_path = ".status.replicas"
        ),
        printcolumn(
            name = "Ready",
            type_ = "integer",
            json_path = ".status.readyReplicas",
            description = "Replicas running"
        ),
        printcolumn(
            name = "Up-to-date",
            type_ = "integer",
            json_path = ".status.updatedReplicas",
            description = "Replicas of the current revision placed"
        ),
        printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
        printcolumn(
            name = "Status",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
        ),
        printcolumn(
            name = "Module",
            type_ = "string",
            json_path = ".spec.module.sha256",
            priority = "1"
        ),
        printcolumn(
            name = "Endpoints",
            type_ = "string",
            json_path = ".status.endpoints",
            priority = "1"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The module to run.
    pub module: ModuleRef,
    /// Arguments after argv[0].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Environment variables from every key of ConfigMaps and Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Directories sandboxes can mount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Where volumes appear in the guest; nothing else of the host's filesystem is reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Sandboxes to run across the cluster. Default 1.
    #[serde(default = "one")]
    #[cfg_attr(feature = "kube", schemars(range(min = 0)))]
    pub replicas: i64,
    /// Requests and limits.
    #[serde(default)]
    pub resources: Resources,
    /// `Always` (default), `OnFailure` or `Never`.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Wall-clock limit of one run, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1, max = 2_147_483_647)))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds the workload may take to make a new template available before `Progressing`
    /// turns `False` with `ProgressDeadlineExceeded` (default 600), as for a Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1, max = 2_147_483_647)))]
    pub progress_deadline_seconds: Option<i64>,
    /// Seconds a running sandbox must run before it counts as available (default 0), as for a
    /// Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 0, max = 2_147_483_647)))]
    pub min_ready_seconds: Option<i64>,
    /// How a template change replaces sandboxes: a rolling update (default) or `Recreate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Old revisions kept for rollback (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 0)))]
    pub revision_history_limit: Option<i64>,
    /// Labels a node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints this workload tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Serve HTTP: the module is a `wasi:http/incoming-handler` component, each replica is a
    /// route in its node's ingress, and every request runs in a fresh sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// What sandboxes may reach on the network: nothing unless `egress` lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// Give each sandbox a stdin that one client at a time may write to (`flotilla run -i`, the
    /// user API's `Attach`); when that client closes its input the guest reads EOF, in later
    /// runs too, as a Pod's `stdin` with `stdinOnce`. Default: stdin is empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// WebAssembly proposals beyond the default set that the module may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmSpec>,
}

fn one() -> i64 {
    1
}

/// How an HTTP workload is reached through the node agents' ingress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct HttpSpec {
    /// The host (the `Host` header without its port) the route answers, e.g.
    /// `hello.example.com`; any host when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix the route answers, matched on whole segments (`/api` matches `/api` and
    /// `/api/x`, not `/apix`). Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Requests one replica serves at once, each in a sandbox of its own; more are answered
    /// `503` with `Retry-After`. A replica is placed and admitted for this many sandboxes and
    /// this many times its memory request. Default 80, at most 10,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1, max = 10000)))]
    pub max_concurrency: Option<u32>,
    /// Wall-clock limit of one request, e.g. `10s` or `500ms`. Default: the agent's (30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A path a replica must answer 2xx to (a `GET` in a fresh sandbox) before it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
}

impl HttpSpec {
    /// Requests a replica serves at once when `maxConcurrency` is unset (Cloud Run's default).
    pub const DEFAULT_MAX_CONCURRENCY: u32 = 80;
    /// Most requests a replica may serve at once.
    pub const MAX_MAX_CONCURRENCY: u32 = 10_000;

    /// Requests a replica serves at once: `maxConcurrency`, or the default.
    pub fn max_concurrency(&self) -> u32 {
        self.max_concurrency
            .unwrap_or(Self::DEFAULT_MAX_CONCURRENCY)
    }

    /// The path prefix, `/` when unset.
    pub fn path_prefix(&self) -> &str {
        self.path_prefix.as_deref().unwrap_or("/")
    }

    fn validate(&self, fail: &mut impl FnMut(&str, String)) {
        if let Some(host) = &self.host
            && let Err(message) = validate_name(host)
        {
            fail("spec.http.host", message.to_string());
        }
        let prefix = self.path_prefix();
        if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) || prefix.contains("//") {
            fail(
                "spec.http.pathPrefix",
                format!("{prefix:?}: must be a path starting with '/', without '?', '#' or '//'"),
            );
        }
        if let Some(path) = &self.readiness_path
            && (!path.starts_with('/') || path.contains(['#', ' ']))
        {
            fail(
                "spec.http.readinessPath",
                format!("{path:?}: must be a path starting with '/', without '#' or spaces"),
            );
        }
        match self.max_concurrency {
            Some(0) => fail("spec.http.maxConcurrency", "must be >= 1".into()),
            Some(n) if n > Self::MAX_MAX_CONCURRENCY => fail(
                "spec.http.maxConcurrency",
                format!("{n}: must be at most {}", Self::MAX_MAX_CONCURRENCY),
            ),
            _ => {}
        }
        if let Some(timeout) = &self.timeout {
            match parse_bounded_duration(timeout) {
                Ok(d) if d.is_zero() => fail("spec.http.timeout", "must be > 0".into()),
                Ok(_) => {}
                Err(message) => fail("spec.http.timeout", message.to_string()),
            }
        }
    }

    /// `timeout` in milliseconds; 0 when unset or invalid (the agent's default applies).
    pub fn timeout_ms(&self) -> u64 {
        self.timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Where a module comes from: pinned by digest, fetched from `url` or the module store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ModuleRef {
    /// Lower-case hex SHA-256 of the module; agents verify it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[cfg_attr(feature = "kube", schemars(regex(pattern = r"^[0-9a-f]{64}$")))]
    pub sha256: String,
    /// Where to fetch the module: an `http`/`https` URL, or an OCI artifact
    /// (`oci://registry/repository@sha256:<manifest digest>` or `:tag`) whose wasm layer is the
    /// module. Without it the control plane's module store serves the blob pushed under
    /// `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(regex(pattern = r"^(https?|oci)://")))]
    pub url: Option<String>,
    /// A local file, only in manifests given to `flotilla apply`, which pushes it and replaces it
    /// with `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One environment variable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// Where the value comes from instead: a ConfigMap or Secret key, read when a sandbox
    /// starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// What a sandbox requests (for placement) and may use (enforced by the agent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Resources {
    /// Placement requests.
    #[serde(default)]
    pub requests: ResourceList,
    /// Enforced limits.
    #[serde(default)]
    pub limits: ResourceList,
}

/// Kubernetes quantities per resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ResourceList {
    /// Memory, e.g. `16Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU, e.g. `100m` or `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// CPU time of one run, e.g. `2s` (limits only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<String>,
    /// Log ring size, e.g. `64Ki` (limits only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

/// Restart policy of a workload's sandboxes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum RestartPolicy {
    /// Restart whenever a sandbox ends.
    #[default]
    Always,
    /// Restart sandboxes that fail.
    OnFailure,
    /// Never restart.
    Never,
}

/// A toleration, as on a Pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Toleration {
    /// Taint key; empty with `Exists` tolerates every taint.
    #[serde(default)]
    pub key: String,
    /// `Equal` (default) or `Exists`.
    #[serde(default)]
    pub operator: TolerationOperator,
    /// Value for `Equal`.
    #[serde(default)]
    pub value: String,
    /// Effect tolerated; empty tolerates every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

/// How a toleration matches a taint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum TolerationOperator {
    /// Key and value must match.
    #[default]
    Equal,
    /// The key must exist.
    Exists,
}

/// What a taint does to workloads that do not tolerate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum TaintEffect {
    /// Not placed on the node.
    NoSchedule,
    /// Avoided when possible.
    PreferNoSchedule,
    /// Not placed, and evicted.
    NoExecute,
}

/// A node taint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
    /// Effect.
    pub effect: TaintEffect,
}

impl Toleration {
    /// Whether this toleration tolerates `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        match self.operator {
            TolerationOperator::Exists => self.key.is_empty() || self.key == taint.key,
            TolerationOperator::Equal => self.key == taint.key && self.value == taint.value,
        }
    }
}

/// Observed state of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct WorkloadStatus {
    /// The generation this status describes.
    #[serde(default)]
    pub observed_generation: u64,
    /// Sandboxes placed, of every revision.
    #[serde(default)]
    pub replicas: u64,
    /// Sandboxes of the current revision placed.
    #[serde(default)]
    pub updated_replicas: u64,
    /// Sandboxes running, of every revision.
    #[serde(default)]
    pub ready_replicas: u64,
    /// Sandboxes running for at least `minReadySeconds`, of every revision.
    #[serde(default)]
    pub available_replicas: u64,
    /// Sandboxes that ran to completion and, by their restart policy, stay done.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub succeeded_replicas: u64,
    /// The generation that introduced the current revision's sandbox template (everything
    /// agents run, not the replica count, placement rules or update settings): agents report
    /// its sandboxes under it, and scaling alone restarts nothing.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub template_generation: u64,
    /// A digest of that template, to notice when it changes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template_hash: String,
    /// When the template last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template_time: String,
    /// When the update last made progress (RFC 3339): a new revision, more of it placed or
    /// available, fewer old sandboxes. The progress deadline counts from it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub progress_time: String,
    /// The current revision's number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// Every revision that has sandboxes or is kept for rollback, newest first: the current
    /// one, then the old ones with their templates and placements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionStatus>,
    /// Conditions such as `Scheduled`, `Available`, `Progressing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Sandboxes of the current revision placed per node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placements: BTreeMap<String, u64>,
    /// For an HTTP workload: the URLs of the node ingresses that serve it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// A status condition, Kubernetes-style.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Condition {
    /// Condition type, e.g. `Scheduled`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason, e.g. `Unschedulable`.
    #[serde(default)]
    pub reason: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed, RFC 3339.
    #[serde(default)]
    pub last_transition_time: String,
}

/// Where a workload's module may come from, which depends on who reads the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleRule {
    /// The control plane: pinned by `sha256`, pushed or fetched from `url`. Local paths must
    /// have been resolved by `flotilla apply`.
    Pinned,
    /// A node agent's static manifest: a local `path`, optionally pinned by `sha256`.
    LocalPath,
}

/// One invalid field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path such as `spec.replicas`.
    pub field: String,
    /// What is wrong, e.g. `must be >= 0`.
    pub message: String,
}

/// Every invalid field of an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
pub struct ValidationError(pub Vec<FieldError>);

// === impl Workload ===

impl Workload {
    /// A new workload object.
    pub fn new(namespace: &str, name: &str, spec: WorkloadSpec) -> Self {
        Self {
            api_version: API_VERSION.to_string(),
            kind: WORKLOAD_KIND.to_string(),
            metadata: ObjectMeta {
                name: name.to_string(),
                namespace: namespace.to_string(),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }

    /// This workload's key.
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey::new(&self.metadata.namespace, &self.metadata.name)
    }

    /// Parses every document of a YAML manifest. Unknown fields are errors.
    ///
    /// # Errors
    /// The first document that does not parse or validate, with its field path.
    pub fn from_yaml(text: &str) -> Result<Vec<Workload>, ValidationError> {
        serde_yaml::Deserializer::from_str(text)
            .map(|doc| {
                let workload = Workload::deserialize(doc).map_err(|e| {
                    ValidationError(vec![FieldError {
                        field: e
                            .location()
                            .map_or("manifest".into(), |l| format!("line {}", l.line())),
                        message: e.to_string(),
                    }])
                })?;
                workload.validate()?;
                Ok(workload)
            })
            .collect()
    }

    /// Checks everything that can be checked without the cluster, with the control plane's
    /// module rule ([`ModuleRule::Pinned`]).
    ///
    /// # Errors
    /// Every invalid field, each with its path.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_with(ModuleRule::Pinned)
    }

    /// Like [`validate`](Self::validate), with the given rule for `spec.module`.
    ///
    /// # Errors
    /// Every invalid field, each with its path.
    pub fn validate_with(&self, rule: ModuleRule) -> Result<(), ValidationError> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.to_string(),
                message,
            });
        };
        if self.api_version != API_VERSION {
            fail("apiVersion", format!("must be {API_VERSION}"));
        }
        if self.kind != WORKLOAD_KIND {
            fail("kind", format!("must be {WORKLOAD_KIND}"));
        }
        if let Err(message) = validate_name(&self.metadata.name) {
            fail("metadata.name", message.to_string());
        }
        if !self.metadata.namespace.is_empty()
            && let Err(message) = validate_name(&self.metadata.namespace)
        {
            fail("metadata.namespace", message.to_string());
        }
        let spec = &self.spec;
        if spec.replicas < 0 {
            fail("spec.replicas", "must be >= 0".into());
        }
        let module = &spec.module;
        match rule {
            ModuleRule::Pinned => {
                if module.path.is_some() {
                    fail(
                        "spec.module.path",
                        "local paths are resolved by `flotilla apply`, which pushes the file; \
                         the server needs spec.module.sha256"
                            .into(),
                    );
                } else if !is_sha256(&module.sha256) {
                    fail(
                        "spec.module.sha256",
                        format!("{:?}: must be 64 lower-case hex digits", module.sha256),
                    );
                }
                if let Some(url) = &module.url
                    && !(url.starts_with("https://")
                        || url.starts_with("http://")
                        || url.starts_with("oci://"))
                {
                    fail(
                        "spec.module.url",
                        format!("{url:?}: must be an http, https or oci URL"),
                    );
                }
            }
            ModuleRule::LocalPath => {
                if module.path.as_deref().is_none_or(str::is_empty) {
                    fail("spec.module.path", "required in a static manifest".into());
                }
                if !module.sha256.is_empty() && !is_sha256(&module.sha256) {
                    fail(
                        "spec.module.sha256",
                        format!("{:?}: must be 64 lower-case hex digits", module.sha256),
                    );
                }
                if module.url.is_some() {
                    fail(
                        "spec.module.url",
                        "not supported in static manifests; use spec.module.path".into(),
                    );
                }
            }
        }
        for (i, env) in spec.env.iter().enumerate() {
            if env.name.is_empty() || env.name.contains('=') {
                fail(
                    &format!("spec.env[{i}].name"),
                    "must be non-empty and contain no '='".into(),
                );
            }
        }
        for (path, list) in [
            ("spec.resources.requests", &spec.resources.requests),
            ("spec.resources.limits", &spec.resources.limits),
        ] {
            if let Some(memory) = &list.memory
                && let Err(message) = parse_bytes(memory)
            {
                fail(&format!("{path}.memory"), message.to_string());
            }
            if let Some(cpu) = &list.cpu
                && let Err(message) = parse_cpu_millis(cpu)
            {
                fail(&format!("{path}.cpu"), message.to_string());
            }
        }
        if spec.resources.requests.cpu_time.is_some() || spec.resources.requests.logs.is_some() {
            fail(
                "spec.resources.requests",
                "cpuTime and logs are limits, not requests".into(),
            );
        }
        if let Some(t) = &spec.resources.limits.cpu_time
            && let Err(message) = parse_bounded_duration(t)
        {
            fail("spec.resources.limits.cpuTime", message.to_string());
        }
        if let Some(logs) = &spec.resources.limits.logs {
            match parse_bytes(logs) {
                Ok(bytes) if bytes > MAX_LOG_BYTES => fail(
                    "spec.resources.limits.logs",
                    format!("{logs:?}: must be at most 16Mi"),
                ),
                Ok(_) => {}
                Err(message) => fail("spec.resources.limits.logs", message.to_string()),
            }
        }
        if let (Ok(request), Ok(limit)) = (
            spec.resources
                .requests
                .memory
                .as_deref()
                .map_or(Ok(0), parse_bytes),
            spec.resources
                .limits
                .memory
                .as_deref()
                .map_or(Ok(u64::MAX), parse_bytes),
        ) && request > limit
        {
            fail(
                "spec.resources.requests.memory",
                "must be <= spec.resources.limits.memory".into(),
            );
        }
        if let (Ok(request), Ok(limit)) = (
            spec.resources
                .requests
                .cpu
                .as_deref()
                .map_or(Ok(0), parse_cpu_millis),
            spec.resources
                .limits
                .cpu
                .as_deref()
                .map_or(Ok(u64::MAX), parse_cpu_millis),
        ) && request > limit
        {
            fail(
                "spec.resources.requests.cpu",
                "must be <= spec.resources.limits.cpu".into(),
            );
        }
        for (field, seconds, min) in [
            (
                "spec.activeDeadlineSeconds",
                spec.active_deadline_seconds,
                (1, "must be > 0"),
            ),
            (
                "spec.progressDeadlineSeconds",
                spec.progress_deadline_seconds,
                (1, "must be > 0"),
            ),
            (
                "spec.minReadySeconds",
                spec.min_ready_seconds,
                (0, "must be >= 0"),
            ),
        ] {
            match seconds {
                Some(s) if s < min.0 => fail(field, min.1.into()),
                Some(s) if s > MAX_DURATION_SECONDS => {
                    fail(field, format!("must be <= {MAX_DURATION_SECONDS}"));
                }
                _ => {}
            }
        }
        if let Some(http) = &spec.http {
            http.validate(&mut fail);
            if spec.stdin {
                fail(
                    "spec.stdin",
                    "HTTP workloads read requests, not stdin: unset one of spec.stdin and \
                     spec.http"
                        .into(),
                );
            }
        }
        if let Some(network) = &spec.network {
            network::validate(network, &mut fail);
        }
        config::validate(&spec.env, &spec.env_from, &mut fail);
        volumes::validate(&spec.volumes, &spec.volume_mounts, &mut fail);
        if let Some(strategy) = &spec.strategy {
            strategy.validate(&mut fail);
        }
        if let Some(wasm) = &spec.wasm {
            for (i, feature) in wasm.features.iter().enumerate() {
                if wasm.features[..i].contains(feature) {
                    fail(
                        &format!("spec.wasm.features[{i}]"),
                        format!("{feature} is listed twice"),
                    );
                }
            }
        }
        if spec.revision_history_limit.is_some_and(|n| n < 0) {
            fail("spec.revisionHistoryLimit", "must be >= 0".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationError(errors))
        }
    }
}

/// A name that is no lowercase RFC 1123 subdomain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?}: must be a lowercase RFC 1123 subdomain (a-z, 0-9, '-', '.'; alphanumeric at both \
     ends; at most 253 characters)"
)]
pub struct InvalidName(pub String);

/// A quantity that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// No number where a byte quantity was expected.
    #[error("{0:?}: not a quantity (e.g. 64Mi)")]
    NotAQuantity(String),
    /// A suffix that is no unit.
    #[error("{value:?}: unknown suffix {suffix:?}")]
    UnknownSuffix {
        /// The quantity.
        value: String,
        /// The suffix.
        suffix: String,
    },
    /// A quantity past `u64`.
    #[error("{0:?}: too large")]
    TooLarge(String),
    /// Not a CPU quantity.
    #[error("{0:?}: not a CPU quantity (e.g. 250m or 0.5)")]
    NotACpuQuantity(String),
}

/// A duration that does not parse or is over [`MAX_DURATION_SECONDS`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration.
    #[error("{value:?}: {cause}")]
    Invalid {
        /// The value.
        value: String,
        /// Why it does not parse.
        cause: humantime::DurationError,
    },
    /// Longer than the ceiling of every duration.
    #[error("{0:?}: must be at most {MAX_DURATION_SECONDS}s")]
    OverMaximum(String),
}

/// Object names follow Kubernetes: lowercase RFC 1123 subdomains.
///
/// # Errors
/// [`InvalidName`].
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let alnum_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 253 || !valid_chars || !alnum_ends {
        return Err(InvalidName(name.to_string()));
    }
    Ok(())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a Kubernetes byte quantity: `123`, `64Ki`, `16Mi`, `1Gi`, `1k`, `5M`, `2G`.
///
/// # Errors
/// [`QuantityError`] naming the bad value.
pub fn parse_bytes(value: &str) -> Result<u64, QuantityError> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| QuantityError::NotAQuantity(value.to_string()))?;
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
        _ => {
            return Err(QuantityError::UnknownSuffix {
                value: value.to_string(),
                suffix: suffix.to_string(),
            });
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| QuantityError::TooLarge(value.to_string()))
}

/// Parses a duration such as `2s` or `500ms`, at most [`MAX_DURATION_SECONDS`].
///
/// # Errors
/// [`DurationError`] naming the bad value.
pub fn parse_bounded_duration(value: &str) -> Result<std::time::Duration, DurationError> {
    let duration = humantime::parse_duration(value).map_err(|cause| DurationError::Invalid {
        value: value.to_string(),
        cause,
    })?;
    if duration.as_secs() > MAX_DURATION_SECONDS as u64 {
        return Err(DurationError::OverMaximum(value.to_string()));
    }
    Ok(duration)
}

/// Parses a CPU quantity into millicores: `250m`, `1`, `0.5`, `2.25`.
///
/// # Errors
/// [`QuantityError::NotACpuQuantity`].
pub fn parse_cpu_millis(value: &str) -> Result<u64, QuantityError> {
    let value = value.trim();
    let bad = || QuantityError::NotACpuQuantity(value.to_string());
    if let Some(millis) = value.strip_suffix('m') {
        return millis.parse().map_err(|_| bad());
    }
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(1000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests;
