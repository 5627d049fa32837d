//! Names of ConfigMaps and Secrets, shared by the control plane, the agent and the CLI.

use std::fmt;

use crate::agent::v1::{ConfigKind, ConfigObject};

impl ConfigKind {
    /// `configmap` or `secret`, as kubectl names one object of the kind.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::ConfigMap | Self::Unspecified => "configmap",
        }
    }
}

/// A ConfigMap or Secret, by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigKey {
    /// ConfigMap or Secret.
    pub kind: ConfigKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ConfigKey {
    /// The key of `object`.
    pub fn of(object: &ConfigObject) -> Self {
        Self {
            kind: object.kind(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
        }
    }
}

/// `secret default/creds`, as errors name it.
impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.noun(), self.namespace, self.name)
    }
}
