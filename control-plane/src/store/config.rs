//! [`ConfigStore`]: where ConfigMaps and Secrets are written.
//!
//! In standalone mode they live in a redb file of their own next to the workload store, each
//! write one durable transaction, and every change is published to the cluster's
//! [`ConfigSet`](crate::cluster::ConfigSet), from which agent sessions send them to the nodes
//! that use them. With the Kubernetes store they are the cluster's ConfigMaps and Secrets,
//! which [`crate::kubernetes::config`] watches; users write them with kubectl, so this store
//! refuses writes.

use std::path::Path;
use std::sync::{Arc, Mutex};

use flotilla_proto::agent::v1::ConfigObject;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::Error;
use crate::cluster::Cluster;
use crate::cluster::config::{ConfigKey, ConfigObjectsByKey};

/// `configmap|secret/namespace/name` → the protobuf-encoded object.
const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");

/// Writes ConfigMaps and Secrets. Cheap to clone.
#[derive(Clone)]
pub struct ConfigStore {
    embedded: Option<Arc<Embedded>>,
    cluster: Arc<Cluster>,
}

struct Embedded {
    db: Database,
    /// Held across commit and publish, so the published set follows commit order.
    order: Mutex<()>,
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
    /// With the Kubernetes store, ConfigMaps and Secrets are written with kubectl.
    #[error(
        "ConfigMaps and Secrets live in the Kubernetes cluster: use kubectl create configmap|secret"
    )]
    ReadOnly,
    /// `create_only` and the object exists.
    #[error("{0} already exists")]
    AlreadyExists(ConfigKey),
    /// No such object.
    #[error("{0} not found")]
    NotFound(ConfigKey),
    /// A name or key is not valid.
    #[error("{0}")]
    Invalid(String),
}

fn id(key: &ConfigKey) -> String {
    format!("{}/{}/{}", key.kind.noun(), key.namespace, key.name)
}

impl ConfigStore {
    /// Opens (or creates) the embedded store at `path` and publishes what it holds.
    ///
    /// # Errors
    /// [`Error::Open`] or [`Error::Read`] when the file cannot be used.
    pub fn open(path: &Path, cluster: Arc<Cluster>) -> Result<Self, Error> {
        let db = Database::create(path).map_err(|e| Error::Open(e.into()))?;
        let txn = db.begin_write().map_err(|e| Error::Open(e.into()))?;
        txn.open_table(CONFIG).map_err(|e| Error::Open(e.into()))?;
        txn.commit().map_err(|e| Error::Open(e.into()))?;
        let store = Self {
            embedded: Some(Arc::new(Embedded {
                db,
                order: Mutex::new(()),
            })),
            cluster,
        };
        let all = store.read_all()?;
        store.cluster.config.publish(all);
        Ok(store)
    }

    /// The store of Kubernetes mode: reads come from the cluster's watch, writes are refused.
    pub fn kubernetes(cluster: Arc<Cluster>) -> Self {
        Self {
            embedded: None,
            cluster,
        }
    }

    fn read_all(&self) -> Result<ConfigObjectsByKey, Error> {
        let Some(embedded) = &self.embedded else {
            return Ok(ConfigObjectsByKey::new());
        };
        let txn = embedded
            .db
            .begin_read()
            .map_err(|e| Error::Read(e.into()))?;
        let table = txn.open_table(CONFIG).map_err(|e| Error::Read(e.into()))?;
        let mut out = ConfigObjectsByKey::new();
        for entry in table.iter().map_err(|e| Error::Read(e.into()))? {
            let (key, value) = entry.map_err(|e| Error::Read(e.into()))?;
            let object = ConfigObject::decode(value.value())
                .map_err(|e| Error::Unavailable(format!("decoding stored {}: {e}", key.value())))?;
            out.insert(ConfigKey::of(&object), Arc::new(object));
        }
        Ok(out)
    }

    /// Every ConfigMap and Secret now.
    pub fn current(&self) -> Arc<ConfigObjectsByKey> {
        self.cluster.config.current()
    }

    /// Creates or replaces an object (only creates, with `create_only`).
    ///
    /// # Errors
    /// [`ConfigError::ReadOnly`] in Kubernetes mode, [`ConfigError::Invalid`] for a bad name or
    /// key, [`ConfigError::AlreadyExists`], or a store failure.
    pub async fn apply(&self, object: ConfigObject, create_only: bool) -> Result<(), ConfigError> {
        if self.embedded.is_none() {
            return Err(ConfigError::ReadOnly);
        }
        let key = ConfigKey::of(&object);
        flotilla_model::validate_name(&key.name)
            .map_err(|m| ConfigError::Invalid(format!("name: {m}")))?;
        flotilla_model::validate_name(&key.namespace)
            .map_err(|m| ConfigError::Invalid(format!("namespace: {m}")))?;
        let size: usize = object.data.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > flotilla_model::MAX_OBJECT_BYTES {
            return Err(ConfigError::Invalid(format!(
                "data: {size} bytes, over the limit of {} (1 MiB, as Kubernetes)",
                flotilla_model::MAX_OBJECT_BYTES
            )));
        }
        if let Some(bad) = object
            .data
            .keys()
            .find(|k| !flotilla_model::config::is_config_key(k))
        {
            return Err(ConfigError::Invalid(format!(
                "key {bad:?}: must consist of alphanumerics, '-', '_' or '.'"
            )));
        }
        self.write(move |table, all| {
            let exists = table
                .get(id(&key).as_str())
                .map_err(Error::write)?
                .is_some();
            if create_only && exists {
                return Err(ConfigError::AlreadyExists(key));
            }
            table
                .insert(id(&key).as_str(), object.encode_to_vec().as_slice())
                .map_err(Error::write)?;
            all.insert(key, Arc::new(object));
            Ok(())
        })
        .await
    }

    /// Deletes an object.
    ///
    /// # Errors
    /// [`ConfigError::ReadOnly`] in Kubernetes mode, [`ConfigError::NotFound`], or a store
    /// failure.
    pub async fn delete(&self, key: ConfigKey) -> Result<Arc<ConfigObject>, ConfigError> {
        self.write(move |table, all| {
            let removed = table
                .remove(id(&key).as_str())
                .map_err(Error::write)?
                .is_some();
            match all.remove(&key) {
                Some(object) if removed => Ok(object),
                _ => Err(ConfigError::NotFound(key)),
            }
        })
        .await
    }

    /// Runs `change` on the table and on a copy of the published set in one write
    /// transaction; once it commits, publishes the copy. A failed change writes nothing.
    async fn write<T: Send + 'static>(
        &self,
        change: impl FnOnce(
            &mut redb::Table<'_, &str, &[u8]>,
            &mut ConfigObjectsByKey,
        ) -> Result<T, ConfigError>
        + Send
        + 'static,
    ) -> Result<T, ConfigError> {
        let embedded = self.embedded.clone().ok_or(ConfigError::ReadOnly)?;
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || {
            let _order = embedded.order.lock().unwrap_or_else(|e| e.into_inner());
            let txn = embedded.db.begin_write().map_err(Error::write)?;
            let mut all = (*cluster.config.current()).clone();
            let result = {
                let mut table = txn.open_table(CONFIG).map_err(Error::write)?;
                change(&mut table, &mut all)?
            };
            txn.commit().map_err(Error::write)?;
            cluster.config.publish(all);
            Ok(result)
        })
        .await
        .map_err(|e| ConfigError::Store(Error::Task(e.to_string())))?
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::agent::v1::ConfigKind;

    use super::*;

    fn object(name: &str, value: &str) -> ConfigObject {
        ConfigObject {
            kind: ConfigKind::Secret as i32,
            namespace: "default".into(),
            name: name.into(),
            data: [("password".to_string(), value.as_bytes().to_vec())].into(),
        }
    }

    #[tokio::test]
    async fn objects_survive_a_reopen_and_every_change_is_published() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.redb");
        let cluster = Arc::new(Cluster::default());
        let store = ConfigStore::open(&path, cluster.clone()).expect("open");
        let changes = cluster.config.subscribe();
        store
            .apply(object("creds", "a"), true)
            .await
            .expect("create");
        assert!(changes.has_changed().expect("open"));
        assert!(matches!(
            store.apply(object("creds", "b"), true).await,
            Err(ConfigError::AlreadyExists(_))
        ));
        store
            .apply(object("creds", "b"), false)
            .await
            .expect("replace");
        let bad = ConfigObject {
            data: [("a/b".to_string(), vec![])].into(),
            ..object("bad", "")
        };
        assert!(matches!(
            store.apply(bad, false).await,
            Err(ConfigError::Invalid(_))
        ));
        // Over 1 MiB of data, as Kubernetes refuses it: every object goes to agents.
        let huge = object("huge", &"x".repeat(flotilla_model::MAX_OBJECT_BYTES));
        assert!(matches!(
            store.apply(huge, false).await,
            Err(ConfigError::Invalid(message)) if message.contains("over the limit")
        ));
        store
            .apply(object("other", "c"), false)
            .await
            .expect("create");
        let key = ConfigKey::of(&object("other", ""));
        store.delete(key.clone()).await.expect("delete");
        assert!(matches!(
            store.delete(key).await,
            Err(ConfigError::NotFound(_))
        ));
        drop(store);

        let cluster = Arc::new(Cluster::default());
        let _store = ConfigStore::open(&path, cluster.clone()).expect("reopen");
        let all = cluster.config.current();
        assert_eq!(all.len(), 1);
        let creds = all.values().next().expect("creds");
        assert_eq!(creds.data["password"], b"b");

        let read_only = ConfigStore::kubernetes(cluster);
        assert!(matches!(
            read_only.apply(object("x", "y"), false).await,
            Err(ConfigError::ReadOnly)
        ));
    }
}
