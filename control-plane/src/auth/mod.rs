//! Who may use the user API: authentication of the caller and authorization of each call by
//! verb, resource and namespace, with an audit line for every call that changes something.
//!
//! Three ways, chosen at startup:
//! - open: without credentials every caller is `system:anonymous`, allowed everything;
//!   `flotilla-control-plane` refuses to serve it so beyond loopback unless told
//!   `--insecure-allow-anonymous`;
//! - standalone: bearer tokens from a static token file (kube-apiserver's `--token-auth-file`)
//!   and/or client certificates from the users' CA ([`ClientCerts`]), and a small RBAC-like
//!   policy file ([`Policy`]);
//! - Kubernetes: the caller's own Kubernetes token, checked with a TokenReview, and each call
//!   checked with a SubjectAccessReview, so the cluster's RBAC decides ([`KubernetesAuth`]).

mod certs;
mod kubernetes;
mod policy;
mod tokens;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use tonic::Status;

pub use self::certs::{ClientCaError, ClientCerts};
pub use self::kubernetes::KubernetesAuth;
pub use self::policy::{Policy, PolicyError};
pub use self::tokens::{MIN_TOKEN_CHARS, TokenFile, TokenFileError};

/// The name of a caller without credentials on an open user API.
pub const ANONYMOUS: &str = "system:anonymous";
/// The group every authenticated user is in.
pub const AUTHENTICATED: &str = "system:authenticated";

/// An authenticated caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its unique id, when the authenticator gives one.
    pub uid: String,
    /// Its groups (authenticated users are in [`AUTHENTICATED`] too).
    pub groups: Vec<String>,
    /// Whatever else the authenticator says about it (Kubernetes' `userInfo.extra`), passed
    /// on to authorization.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// Read one object.
    Get,
    /// Read many.
    List,
    /// Follow changes.
    Watch,
    /// Create or update.
    Apply,
    /// Delete.
    Delete,
    /// Create something new (a module blob, an attachment).
    Create,
}

/// What a call acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// WasmWorkload objects.
    Workloads,
    /// A sandbox's output (as a Pod's `pods/log`).
    WorkloadLogs,
    /// A sandbox's stdin (as a Pod's `pods/attach`).
    WorkloadAttach,
    /// Sandbox failure events.
    Events,
    /// ConfigMaps.
    ConfigMaps,
    /// Secrets.
    Secrets,
    /// Module blobs, pushed for the workloads of a namespace (empty: any).
    Modules,
    /// Nodes (cluster-wide).
    Nodes,
}

/// One call: its verb, resource, namespace and object.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    /// What it does.
    pub verb: Verb,
    /// What on.
    pub resource: Resource,
    /// Where; empty: cluster-wide, or every namespace.
    pub namespace: &'a str,
    /// Which object; empty: many, or a new one without a name yet.
    pub name: &'a str,
    /// For [`Verb::Apply`]: the object does not exist yet, so the apply creates it (in
    /// Kubernetes terms `create`, otherwise `update`).
    pub creates: bool,
}

/// How callers are known.
#[derive(Debug, Default)]
enum Authentication {
    /// Everyone is anonymous.
    #[default]
    Open,
    /// Users by token, by client certificate, or both (at least one).
    Standalone {
        tokens: Option<TokenFile>,
        certs: Option<ClientCerts>,
    },
    /// TokenReview.
    Kubernetes(std::sync::Arc<KubernetesAuth>),
}

/// How calls are decided.
#[derive(Debug, Default)]
enum Authorization {
    /// Every caller may do everything.
    #[default]
    Everyone,
    /// The policy file's rules.
    Policy(Policy),
    /// SubjectAccessReview.
    Kubernetes(std::sync::Arc<KubernetesAuth>),
}

/// How the user API decides who may do what.
#[derive(Debug, Default)]
pub struct UserAuth {
    authentication: Authentication,
    authorization: Authorization,
}

// === impl UserAuth ===

impl UserAuth {
    /// An open user API: no authentication, everything allowed.
    pub fn open() -> Self {
        Self::default()
    }

    /// Loads the token file and/or the users' CA (at least one) and, when given, the policy
    /// file (without one, every authenticated user may do everything).
    ///
    /// # Errors
    /// A file cannot be read or parsed.
    pub fn load(
        tokens: Option<&Path>,
        user_ca: Option<&Path>,
        policy: Option<&Path>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            tokens.is_some() || user_ca.is_some(),
            "users need a token file or a users' CA"
        );
        Ok(Self::standalone(
            tokens.map(TokenFile::load).transpose()?,
            user_ca.map(ClientCerts::load).transpose()?,
            policy.map(Policy::load).transpose()?,
        ))
    }

    /// Users from `tokens` and/or `certs`, their rights from `policy`.
    pub fn standalone(
        tokens: Option<TokenFile>,
        certs: Option<ClientCerts>,
        policy: Option<Policy>,
    ) -> Self {
        Self {
            authentication: Authentication::Standalone { tokens, certs },
            authorization: policy.map_or(Authorization::Everyone, Authorization::Policy),
        }
    }

    /// Callers present their Kubernetes tokens, and the cluster's RBAC decides each call.
    pub fn kubernetes(reviews: KubernetesAuth) -> Self {
        let reviews = std::sync::Arc::new(reviews);
        Self {
            authentication: Authentication::Kubernetes(reviews.clone()),
            authorization: Authorization::Kubernetes(reviews),
        }
    }

    /// Whether an apply's decision depends on the object existing ([`Access::creates`]): only
    /// the cluster's RBAC tells `create` from `update`.
    pub fn distinguishes_creates(&self) -> bool {
        matches!(self.authorization, Authorization::Kubernetes(_))
    }

    /// Whether callers need no credentials.
    pub fn is_open(&self) -> bool {
        matches!(self.authentication, Authentication::Open)
    }

    /// The caller of `request`.
    ///
    /// # Errors
    /// UNAUTHENTICATED without a token, or with one that is not valid; UNAVAILABLE when the
    /// Kubernetes API cannot say.
    pub async fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<User, Status> {
        let presented = request
            .metadata()
            .get(flotilla_proto::auth::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match &self.authentication {
            Authentication::Open => Ok(User {
                name: ANONYMOUS.to_string(),
                ..User::default()
            }),
            Authentication::Standalone { tokens, certs } => {
                // A certificate from the users' CA first (as kube-apiserver tries x509 before
                // tokens), then a token.
                let by_cert = certs.as_ref().and_then(|certs| {
                    let chain = request.peer_certs()?;
                    certs.user(&chain)
                });
                if let Some(user) = by_cert {
                    return Ok(user);
                }
                match (tokens, presented) {
                    (Some(tokens), Some(presented)) => tokens
                        .user(presented)
                        .cloned()
                        .ok_or_else(|| Status::unauthenticated("the token is not valid")),
                    _ => Err(Status::unauthenticated(format!(
                        "this control plane requires authentication: give flotilla {}",
                        match (tokens.is_some(), certs.is_some()) {
                            (true, false) => "a token with --token-file (or FLOTILLA_TOKEN_FILE)",
                            (false, _) => {
                                "a client certificate from the users' CA with \
                                 --client-certificate and --client-key"
                            }
                            (true, true) => {
                                "a token with --token-file (or FLOTILLA_TOKEN_FILE), or a client \
                                 certificate from the users' CA with --client-certificate and \
                                 --client-key"
                            }
                        }
                    ))),
                }
            }
            Authentication::Kubernetes(reviews) => {
                let presented = presented.ok_or_else(|| {
                    Status::unauthenticated(
                        "this control plane authenticates users with their Kubernetes \
                         credentials: run flotilla with --token-from-kubeconfig (or \
                         FLOTILLA_TOKEN_FROM_KUBECONFIG=1), or give a token with --token-file",
                    )
                })?;
                reviews.authenticate(presented).await
            }
        }
    }

    /// Whether `user` may do `access`; every decision on something that changes, and every
    /// denial, is logged.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the user, verb, resource and namespace; UNAVAILABLE when the
    /// Kubernetes API cannot say.
    pub async fn authorize(&self, user: &User, access: Access<'_>) -> Result<(), Status> {
        let denial = match &self.authorization {
            Authorization::Everyone => None,
            Authorization::Policy(policy) => {
                (!policy.allows(user, access)).then(|| "no rule of the policy allows it".into())
            }
            Authorization::Kubernetes(reviews) => reviews.authorize(user, access).await?,
        };
        let mutating = matches!(access.verb, Verb::Apply | Verb::Delete | Verb::Create);
        if let Some(reason) = denial {
            tracing::warn!(
                target: "flotilla::audit",
                user = %user.name,
                verb = %access.verb,
                resource = %access.resource,
                namespace = access.namespace,
                name = access.name,
                %reason,
                "denied"
            );
            return Err(Status::permission_denied(format!(
                "user {:?} may not {} {} {}: {reason}",
                user.name,
                access.verb,
                access.resource,
                scope(access)
            )));
        }
        if mutating {
            tracing::info!(
                target: "flotilla::audit",
                user = %user.name,
                verb = %access.verb,
                resource = %access.resource,
                namespace = access.namespace,
                name = access.name,
                "allowed"
            );
        }
        Ok(())
    }

    /// [`Self::authenticate`], then [`Self::authorize`].
    ///
    /// # Errors
    /// As they fail.
    pub async fn check<T>(
        &self,
        request: &tonic::Request<T>,
        access: Access<'_>,
    ) -> Result<User, Status> {
        let user = self.authenticate(request).await?;
        self.authorize(&user, access).await?;
        Ok(user)
    }
}

/// Where an access applies, for messages.
fn scope(access: Access<'_>) -> String {
    match (access.resource, access.namespace) {
        (Resource::Nodes, _) => "(cluster-wide)".to_string(),
        (_, "") => "in every namespace".to_string(),
        (_, namespace) => format!("in namespace {namespace:?}"),
    }
}

impl<'a> Access<'a> {
    /// `verb` on `resource` `name` (empty: many) in `namespace` (empty: every namespace, or
    /// cluster-wide).
    pub fn new(verb: Verb, resource: Resource, namespace: &'a str, name: &'a str) -> Self {
        Self {
            verb,
            resource,
            namespace,
            name,
            creates: false,
        }
    }

    /// Whether the resource is cluster-wide in the policy file (no namespace).
    pub fn cluster_wide(&self) -> bool {
        matches!(self.resource, Resource::Nodes)
    }
}

impl Verb {
    /// Its name in policies.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Apply => "apply",
            Verb::Delete => "delete",
            Verb::Create => "create",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Resource {
    /// Its name in policies.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Workloads => "workloads",
            Resource::WorkloadLogs => "workloads/log",
            Resource::WorkloadAttach => "workloads/attach",
            Resource::Events => "events",
            Resource::ConfigMaps => "configmaps",
            Resource::Secrets => "secrets",
            Resource::Modules => "modules",
            Resource::Nodes => "nodes",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
