//! Names of ConfigMaps and Secrets, shared by the control plane, the agent and the CLI.

use std::fmt;

use crate::agent::v1::{ConfigKind, ConfigObject};
use crate::control::v1::ConfigObjectKey;

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

/// A key as the control plane sends it when the object leaves an agent.
impl From<&ConfigKey> for ConfigObjectKey {
    fn from(key: &ConfigKey) -> Self {
        Self {
            kind: key.kind as i32,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        }
    }
}

/// A key as the agent receives it.
impl From<ConfigObjectKey> for ConfigKey {
    fn from(key: ConfigObjectKey) -> Self {
        Self {
            kind: key.kind(),
            namespace: key.namespace,
            name: key.name,
        }
    }
}

/// `secret default/creds`, as errors name it.
impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.noun(), self.namespace, self.name)
    }
}
