//! The authorization policy file: rules that each let some users and groups do some verbs on
//! some resources in some namespaces, as RBAC's RoleBindings do; anything no rule allows is
//! denied.
//!
//! ```yaml
//! rules:
//!   - groups: [admins]
//!     verbs: ["*"]
//!     resources: ["*"]
//!     namespaces: ["*"]
//!   - users: [alice]
//!     verbs: [get, list, watch, apply, delete]
//!     resources: [workloads, workloads/log, configmaps]
//!     namespaces: [team-a]
//! ```
//!
//! Verbs: get, list, watch, apply, delete, create. Resources: workloads, workloads/log,
//! workloads/attach, events, configmaps, secrets, modules (pushing blobs for a namespace's
//! workloads), nodes. Nodes are cluster-wide, as are calls across every namespace (a list
//! without a namespace, a watch, a module push that names no namespace): only a rule with
//! `namespaces: ["*"]` allows those.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Access, User};

const VERBS: [&str; 6] = ["get", "list", "watch", "apply", "delete", "create"];
const RESOURCES: [&str; 8] = [
    "workloads",
    "workloads/log",
    "workloads/attach",
    "events",
    "configmaps",
    "secrets",
    "modules",
    "nodes",
];

/// The rules of a policy file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// One rule: who, what, where.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    verbs: Vec<String>,
    resources: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// It could not be read.
    #[error("reading the policy file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It is not a policy.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Policy {
    /// Reads `path`.
    ///
    /// # Errors
    /// [`PolicyError`] when it cannot be read or names an unknown verb or resource.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses a policy's YAML.
    ///
    /// # Errors
    /// A message naming the bad rule.
    pub fn parse(text: &str) -> Result<Self, String> {
        let policy: Policy = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        for (i, rule) in policy.rules.iter().enumerate() {
            let field = |name: &str| format!("rules[{i}].{name}");
            if rule.users.is_empty() && rule.groups.is_empty() {
                return Err(format!("{}: name users or groups", field("users")));
            }
            for verb in &rule.verbs {
                if verb != "*" && !VERBS.contains(&verb.as_str()) {
                    return Err(format!(
                        "{}: unknown verb {verb:?} (one of {}, or \"*\")",
                        field("verbs"),
                        VERBS.join(", ")
                    ));
                }
            }
            for resource in &rule.resources {
                if resource != "*" && !RESOURCES.contains(&resource.as_str()) {
                    return Err(format!(
                        "{}: unknown resource {resource:?} (one of {}, or \"*\")",
                        field("resources"),
                        RESOURCES.join(", ")
                    ));
                }
            }
        }
        Ok(policy)
    }

    /// Whether some rule lets `user` do `access`.
    pub fn allows(&self, user: &User, access: Access<'_>) -> bool {
        self.rules.iter().any(|rule| rule.allows(user, access))
    }
}

impl Rule {
    fn allows(&self, user: &User, access: Access<'_>) -> bool {
        let any = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
        let who = self.users.iter().any(|u| u == &user.name)
            || self.groups.iter().any(|g| user.groups.contains(g));
        let everywhere = self.namespaces.iter().any(|n| n == "*");
        let place = if access.cluster_wide() || access.namespace.is_empty() {
            everywhere
        } else {
            any(&self.namespaces, access.namespace)
        };
        who && place
            && any(&self.verbs, access.verb.name())
            && any(&self.resources, access.resource.name())
    }
}
