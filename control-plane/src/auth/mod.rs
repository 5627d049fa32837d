//! Who may use the user API: authentication of the caller (bearer tokens from a static token
//! file, as kube-apiserver's `--token-auth-file`) and authorization of each call by verb,
//! resource and namespace (a small RBAC-like policy file), with an audit line for every call
//! that changes something.
//!
//! Without a token file the user API is open: every caller is `system:anonymous`, allowed
//! everything. `flotilla-control-plane` refuses to serve it so beyond loopback unless told
//! `--insecure-allow-anonymous`.

mod policy;
mod tokens;

use std::fmt;
use std::path::Path;

use tonic::Status;

pub use self::policy::{Policy, PolicyError};
pub use self::tokens::{MIN_TOKEN_CHARS, TokenFile, TokenFileError};

/// The name of a caller without credentials on an open user API.
pub const ANONYMOUS: &str = "system:anonymous";
/// The group every authenticated user is in.
pub const AUTHENTICATED: &str = "system:authenticated";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its groups (authenticated users are in [`AUTHENTICATED`] too).
    pub groups: Vec<String>,
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
    /// Module blobs (cluster-wide).
    Modules,
    /// Nodes (cluster-wide).
    Nodes,
}

/// One call's verb, resource and namespace (empty for cluster-wide resources and for calls
/// across every namespace).
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    /// What it does.
    pub verb: Verb,
    /// What on.
    pub resource: Resource,
    /// Where; empty: cluster-wide, or every namespace.
    pub namespace: &'a str,
}

/// How the user API decides who may do what.
#[derive(Debug, Default)]
pub struct UserAuth {
    /// Users by token; `None`: the API is open.
    tokens: Option<TokenFile>,
    /// Rules; `None`: every authenticated user may do everything.
    policy: Option<Policy>,
}

// === impl UserAuth ===

impl UserAuth {
    /// An open user API: no authentication, everything allowed.
    pub fn open() -> Self {
        Self::default()
    }

    /// Loads the token file and, when given, the policy file.
    ///
    /// # Errors
    /// A file cannot be read or parsed.
    pub fn load(tokens: &Path, policy: Option<&Path>) -> anyhow::Result<Self> {
        let tokens = TokenFile::load(tokens)?;
        let policy = policy.map(Policy::load).transpose()?;
        Ok(Self {
            tokens: Some(tokens),
            policy,
        })
    }

    /// Whether callers must authenticate.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none()
    }

    /// The caller of `request`.
    ///
    /// # Errors
    /// UNAUTHENTICATED without a token, or with one the token file does not know.
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<User, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(User {
                name: ANONYMOUS.to_string(),
                groups: Vec::new(),
            });
        };
        let presented = request
            .metadata()
            .get(flotilla_proto::auth::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented else {
            return Err(Status::unauthenticated(
                "this control plane requires authentication: give flotilla a token with \
                 --token-file (or FLOTILLA_TOKEN_FILE)",
            ));
        };
        tokens
            .user(presented)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the token is not valid"))
    }

    /// Whether `user` may do `access`; every decision on something that changes is logged.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the user, verb, resource and namespace.
    pub fn authorize(&self, user: &User, access: Access<'_>, name: &str) -> Result<(), Status> {
        let allowed = self
            .policy
            .as_ref()
            .is_none_or(|policy| policy.allows(user, access));
        let mutating = matches!(access.verb, Verb::Apply | Verb::Delete | Verb::Create);
        if !allowed {
            tracing::warn!(
                target: "flotilla::audit",
                user = %user.name,
                verb = %access.verb,
                resource = %access.resource,
                namespace = access.namespace,
                name,
                "denied"
            );
            return Err(Status::permission_denied(format!(
                "user {:?} may not {} {} {}",
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
                name,
                "allowed"
            );
        }
        Ok(())
    }

    /// [`Self::authenticate`], then [`Self::authorize`].
    ///
    /// # Errors
    /// As they fail.
    pub fn check<T>(
        &self,
        request: &tonic::Request<T>,
        access: Access<'_>,
        name: &str,
    ) -> Result<User, Status> {
        let user = self.authenticate(request)?;
        self.authorize(&user, access, name)?;
        Ok(user)
    }
}

/// Where an access applies, for messages.
fn scope(access: Access<'_>) -> String {
    match (access.resource, access.namespace) {
        (Resource::Modules | Resource::Nodes, _) => "(cluster-wide)".to_string(),
        (_, "") => "in every namespace".to_string(),
        (_, namespace) => format!("in namespace {namespace:?}"),
    }
}

impl Access<'_> {
    /// Whether the resource is cluster-wide (no namespace).
    pub fn cluster_wide(&self) -> bool {
        matches!(self.resource, Resource::Modules | Resource::Nodes)
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
