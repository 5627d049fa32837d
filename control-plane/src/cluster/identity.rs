//! Node identity: which credential may register each node name.
//!
//! Every agent holds a random credential of its own, kept in its state directory across
//! restarts (as a kubelet keeps its client certificate). The first agent to register a node
//! name, admitted by the join token, binds that name to its credential; from then on the name
//! registers only with the same credential, whether or not the node is live, until an operator
//! releases it (`flotilla delete node`). So whoever holds the shared join token can add nodes,
//! but never take over another node's name, its placements or its routes.
//!
//! Only a SHA-256 digest of each credential is kept, in memory and, once
//! [`persist`](NodeIdentities::persist) names a file, in a redb table there, so bindings
//! survive control-plane restarts. An agent that presents a credential for a name with no
//! binding binds it, which also lets every replica of a highly available control plane (each
//! with its own data directory) learn the same binding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use flotilla_proto::auth::{MAX_NODE_CREDENTIAL_CHARS, MIN_NODE_CREDENTIAL_CHARS};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("node_credentials");

/// Node name → credential digest. Cheap to share behind the [`Cluster`](super::Cluster).
#[derive(Default)]
pub struct NodeIdentities {
    bound: Mutex<HashMap<String, [u8; 32]>>,
    db: OnceLock<Database>,
    /// Taken by [`admit_queued`](Self::admit_queued) around each write, so that a burst of
    /// registrations queues as tasks rather than as blocking-pool threads that each wait on
    /// `bound` across another's durable commit (1,000 agents registering at once grew the
    /// control plane by hundreds of MiB of per-thread allocator heaps).
    writes: tokio::sync::Mutex<()>,
}

/// How a registration's credential stands against its node name.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    /// The name had no binding; it is now bound to this credential.
    Bound,
    /// The credential is the one the name is bound to.
    Matched,
}

/// Why a credential was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No credential, or one that is too short, too long or not base64url.
    #[error(
        "node_credential: must be {MIN_NODE_CREDENTIAL_CHARS} to {MAX_NODE_CREDENTIAL_CHARS} characters of \
         base64url (the agent generates one in its --state-dir)"
    )]
    Malformed,
    /// The name is bound to another credential.
    #[error(
        "node {0} is bound to another agent's credential; if that agent lost its state \
         directory, release the name with `flotilla delete node {0}`"
    )]
    Taken(String),
    /// The binding could not be written.
    #[error("storing the node's credential")]
    Storage(#[source] redb::Error),
}

impl NodeIdentities {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps bindings in the redb file at `path` from now on, after loading those it holds.
    ///
    /// # Errors
    /// The file cannot be opened or read, or bindings were already persisted elsewhere.
    pub fn persist(&self, path: &Path) -> Result<(), redb::Error> {
        let db = Database::create(path)?;
        let write = db.begin_write()?;
        write.open_table(BINDINGS)?;
        write.commit()?;
        let mut loaded = HashMap::new();
        {
            let read = db.begin_read()?;
            let table = read.open_table(BINDINGS)?;
            for entry in table.iter()? {
                let (name, digest) = entry?;
                if let Ok(digest) = <[u8; 32]>::try_from(digest.value()) {
                    loaded.insert(name.value().to_string(), digest);
                }
            }
        }
        self.lock().extend(loaded);
        self.db
            .set(db)
            .map_err(|_| redb::Error::Corrupted("node identities persisted twice".into()))
    }

    /// Admits `credential` for `node`: binds an unbound name, or checks a bound one.
    ///
    /// # Errors
    /// A malformed credential, a name bound to another credential, or a binding that could not
    /// be stored (then the name stays unbound).
    pub fn admit(&self, node: &str, credential: &str) -> Result<Admitted, IdentityError> {
        let digest = digest(credential)?;
        let mut bound = self.lock();
        if let Some(answer) = known(&bound, node, &digest) {
            return answer;
        }
        // Written under the lock: two agents racing for one name cannot both bind it.
        self.store(node, Some(&digest))
            .map_err(IdentityError::Storage)?;
        bound.insert(node.to_string(), digest);
        Ok(Admitted::Bound)
    }

    /// [`admit`](Self::admit) from async code: a name already bound is checked in memory; a
    /// new binding is written on the blocking pool, one at a time.
    ///
    /// # Errors
    /// As [`admit`](Self::admit); a write task that failed is a storage error.
    pub async fn admit_queued(
        self: &std::sync::Arc<Self>,
        node: &str,
        credential: &str,
    ) -> Result<Admitted, IdentityError> {
        if let Some(answer) = known(&self.lock(), node, &digest(credential)?) {
            return answer;
        }
        let _one_writer = self.writes.lock().await;
        let (identities, node, credential) =
            (self.clone(), node.to_string(), credential.to_string());
        tokio::task::spawn_blocking(move || identities.admit(&node, &credential))
            .await
            .map_err(|e| {
                IdentityError::Storage(redb::Error::Corrupted(format!(
                    "the write task failed: {e}"
                )))
            })?
    }

    /// Releases `node`'s binding; returns whether it had one.
    ///
    /// # Errors
    /// The binding could not be removed from the file (it stays).
    pub fn release(&self, node: &str) -> Result<bool, redb::Error> {
        let mut bound = self.lock();
        if !bound.contains_key(node) {
            return Ok(false);
        }
        self.store(node, None)?;
        bound.remove(node);
        Ok(true)
    }

    /// Whether `node` is bound to a credential.
    pub fn is_bound(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    fn store(&self, node: &str, digest: Option<&[u8; 32]>) -> Result<(), redb::Error> {
        let Some(db) = self.db.get() else {
            return Ok(());
        };
        let write = db.begin_write()?;
        {
            let mut table = write.open_table(BINDINGS)?;
            match digest {
                Some(digest) => {
                    table.insert(node, digest.as_slice())?;
                }
                None => {
                    table.remove(node)?;
                }
            }
        }
        write.commit()?;
        Ok(())
    }
}

/// The answer for a name already bound: the credential matches its binding or not; `None`
/// for a name not bound yet.
fn known(
    bound: &HashMap<String, [u8; 32]>,
    node: &str,
    digest: &[u8; 32],
) -> Option<Result<Admitted, IdentityError>> {
    let held = bound.get(node)?;
    Some(if flotilla_proto::auth::constant_time_eq(held, digest) {
        Ok(Admitted::Matched)
    } else {
        Err(IdentityError::Taken(node.to_string()))
    })
}

fn digest(credential: &str) -> Result<[u8; 32], IdentityError> {
    if !flotilla_proto::auth::is_node_credential(credential) {
        return Err(IdentityError::Malformed);
    }
    Ok(Sha256::digest(credential.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const MALLORY: &str = "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm";

    #[test]
    fn a_name_stays_with_its_first_credential_until_released() {
        let identities = NodeIdentities::default();
        assert_eq!(
            identities.admit("node-a", ALICE).expect("ok"),
            Admitted::Bound
        );
        assert_eq!(
            identities.admit("node-a", ALICE).expect("ok"),
            Admitted::Matched
        );
        let refused = identities.admit("node-a", MALLORY).expect_err("an error");
        assert!(matches!(refused, IdentityError::Taken(ref n) if n == "node-a"));
        assert!(refused.to_string().contains("flotilla delete node node-a"));
        assert!(identities.release("node-a").expect("ok"));
        assert!(!identities.release("node-a").expect("ok"));
        assert_eq!(
            identities.admit("node-a", MALLORY).expect("ok"),
            Admitted::Bound
        );
    }

    /// Registrations in a burst bind each name once, to the first credential, and persist it,
    /// through one writer at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_registrations_binds_each_name_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let identities = std::sync::Arc::new(NodeIdentities::default());
        identities
            .persist(&dir.path().join("nodes.redb"))
            .expect("persist");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let identities = identities.clone();
            let credential = if i % 2 == 0 { ALICE } else { MALLORY };
            tasks.spawn(async move {
                identities
                    .admit_queued(&format!("node-{}", i / 2), credential)
                    .await
            });
        }
        let (mut bound, mut taken) = (0, 0);
        while let Some(answer) = tasks.join_next().await {
            match answer.expect("task") {
                Ok(Admitted::Bound) => bound += 1,
                Err(IdentityError::Taken(_)) => taken += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((bound, taken), (100, 100));
        assert!(matches!(
            identities.admit_queued("node-7", "short").await,
            Err(IdentityError::Malformed)
        ));
        // What was bound is in the file.
        drop(identities);
        let reopened = NodeIdentities::default();
        reopened
            .persist(&dir.path().join("nodes.redb"))
            .expect("reopen");
        assert!((0..100).all(|i| reopened.is_bound(&format!("node-{i}"))));
    }

    #[test]
    fn malformed_credentials_bind_nothing() {
        let identities = NodeIdentities::default();
        for bad in [
            "",
            "short",
            &"a".repeat(MAX_NODE_CREDENTIAL_CHARS + 1),
            &format!("{ALICE} "),
        ] {
            assert!(matches!(
                identities.admit("node-a", bad),
                Err(IdentityError::Malformed)
            ));
        }
        assert!(!identities.is_bound("node-a"));
    }

    #[test]
    fn bindings_survive_a_restart_and_a_release_too() {
        let dir = tempfile::tempdir().expect("ok");
        let path = dir.path().join("nodes.redb");
        {
            let identities = NodeIdentities::default();
            identities.persist(&path).expect("ok");
            identities.admit("node-a", ALICE).expect("ok");
            identities.admit("node-b", ALICE).expect("ok");
            identities.release("node-b").expect("ok");
        }
        let identities = NodeIdentities::default();
        identities.persist(&path).expect("ok");
        assert!(matches!(
            identities.admit("node-a", MALLORY),
            Err(IdentityError::Taken(_))
        ));
        assert_eq!(
            identities.admit("node-b", MALLORY).expect("ok"),
            Admitted::Bound
        );
    }
}
