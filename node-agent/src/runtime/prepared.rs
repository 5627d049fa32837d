//! [`PreparedWorkload`]: a workload ready to start any number of sandboxes: its compiled
//! artifact, its environment, its limits and, for an HTTP workload, its route.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::agent::v1::{Volume, WorkloadSpec};

use super::artifacts::Artifact;
use super::environment::Environment;
use super::error::SandboxError;
use super::http::{DEFAULT_REQUEST_TIMEOUT, HttpSettings};
use super::limits::SandboxLimits;
use super::sandbox::Prepared;
use crate::ingress::routes::RouteKey;
use flotilla_model::HttpSpec;

/// A workload ready to be instantiated: its artifact plus the per-workload configuration.
pub struct PreparedWorkload {
    pub(super) name: Arc<str>,
    pub(super) digest: String,
    pub(super) artifact: Arc<Artifact>,
    /// Set for an HTTP workload.
    pub(super) http: Option<HttpSettings>,
    pub(super) environment: Arc<Environment>,
    /// Directories each sandbox mounts.
    pub(super) volumes: Box<[Volume]>,
    pub(super) limits: SandboxLimits,
}

// === impl PreparedWorkload ===

impl PreparedWorkload {
    /// `spec` with its compiled `artifact` (of the module whose digest is `digest`) and its
    /// resolved `limits`. An HTTP workload's wall-clock deadline bounds each request; the
    /// replica itself serves until stopped.
    ///
    /// # Errors
    /// [`SandboxError::NotHttpHandler`] for `spec.http` on anything but an HTTP handler,
    /// [`SandboxError::HttpWithoutRoute`] for an HTTP handler without `spec.http`.
    pub fn new(
        spec: &WorkloadSpec,
        digest: String,
        artifact: Arc<Artifact>,
        mut limits: SandboxLimits,
    ) -> Result<Self, SandboxError> {
        let http = match (&spec.http, &*artifact) {
            (Some(route), Artifact::Proxy(_)) => {
                let timeout = match route.timeout_ms {
                    0 => limits.deadline.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
                    ms => Duration::from_millis(ms),
                };
                limits.deadline = None;
                let owner = if spec.owner.is_empty() {
                    &spec.name
                } else {
                    &spec.owner
                };
                Some(HttpSettings {
                    owner: owner.as_str().into(),
                    route: RouteKey::new(&route.host, &route.path_prefix),
                    max_concurrency: match route.max_concurrency {
                        0 => HttpSpec::DEFAULT_MAX_CONCURRENCY,
                        n if n > HttpSpec::MAX_MAX_CONCURRENCY => {
                            return Err(SandboxError::Http(format!(
                                "maxConcurrency {n}: must be at most {}",
                                HttpSpec::MAX_MAX_CONCURRENCY
                            )));
                        }
                        n => n,
                    },
                    timeout,
                    readiness_path: (!route.readiness_path.is_empty())
                        .then(|| route.readiness_path.clone()),
                })
            }
            (Some(_), _) => return Err(SandboxError::NotHttpHandler),
            (None, Artifact::Proxy(_)) => return Err(SandboxError::HttpWithoutRoute),
            (None, _) => None,
        };
        Ok(Self {
            name: spec.name.as_str().into(),
            digest,
            artifact,
            http,
            environment: Arc::new(Environment::configure(spec).map_err(SandboxError::Egress)?),
            volumes: spec.volumes.clone().into(),
            limits,
        })
    }

    /// The workload's name on this agent.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The route and per-request limits, for an HTTP workload.
    pub fn http(&self) -> Option<&HttpSettings> {
        self.http.as_ref()
    }
}

impl Prepared for PreparedWorkload {
    fn digest(&self) -> &str {
        &self.digest
    }

    fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    fn slots(&self) -> u32 {
        self.http.as_ref().map_or(1, |http| http.max_concurrency)
    }
}
