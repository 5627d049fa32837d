//! Kubernetes mode: callers present their own Kubernetes bearer tokens, which a TokenReview
//! checks, and each call is allowed only if a SubjectAccessReview for that user, verb,
//! resource and namespace says so. The cluster's RBAC decides, as it does for kubectl.
//!
//! Why reviews and not impersonation: to impersonate, the control plane's ServiceAccount would
//! need `impersonate` on every user, group and ServiceAccount, which is the power to act as
//! cluster-admin. Reviews need only `create` on `tokenreviews` and `subjectaccessreviews`
//! (the `system:auth-delegator` role every aggregated API server holds), and the control
//! plane's writes stay limited to its own resources. The cost: the API server's audit log
//! names the control plane as the writer; Flotilla's own audit line names the user.
//!
//! Answers are kept for [`CACHE_TTL`] (as kube-apiserver's delegated authentication and
//! authorization do), at most [`CACHE_ENTRIES`] of each kind, so that a flood of calls costs
//! the API server little; at most [`REVIEWS_IN_FLIGHT`] reviews run at once, so that a flood
//! of made-up tokens cannot open unbounded requests to it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::Status;

use super::{AUTHENTICATED, Access, Resource, User, Verb};

/// How long a review's answer is reused.
pub(super) const CACHE_TTL: Duration = Duration::from_secs(10);
/// Most answers kept of each kind (tokens, decisions).
pub(super) const CACHE_ENTRIES: usize = 8192;
/// Most reviews sent to the API server at once.
pub(super) const REVIEWS_IN_FLIGHT: usize = 32;
/// Longest wait for a review, queueing included.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// The API group of Flotilla's resources.
const GROUP: &str = "flotilla.dev";

/// Checks callers' tokens and rights with the Kubernetes API.
pub struct KubernetesAuth {
    client: kube::Client,
    /// Users by the SHA-256 of their token; `Err`: the API server's reason for refusing it.
    tokens: TtlCache<[u8; 32], Result<User, String>>,
    /// Decisions by the SHA-256 of the review's attributes; `Some`: the denial's reason.
    decisions: TtlCache<[u8; 32], Option<String>>,
    in_flight: Semaphore,
}

impl std::fmt::Debug for KubernetesAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesAuth").finish_non_exhaustive()
    }
}

/// What a SubjectAccessReview asks about one call.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attributes {
    /// The API group (empty: core).
    group: &'static str,
    /// The resource's plural name.
    resource: &'static str,
    /// Its subresource, if any.
    subresource: Option<&'static str>,
    /// The Kubernetes verb.
    verb: &'static str,
}

impl KubernetesAuth {
    /// Reviews with `client`, whose credentials need `create` on `tokenreviews` and
    /// `subjectaccessreviews`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            tokens: TtlCache::new(CACHE_TTL, CACHE_ENTRIES),
            decisions: TtlCache::new(CACHE_TTL, CACHE_ENTRIES),
            in_flight: Semaphore::new(REVIEWS_IN_FLIGHT),
        }
    }

    /// The user whose token is `token`.
    ///
    /// # Errors
    /// UNAUTHENTICATED when the API server does not accept it, UNAVAILABLE when it cannot be
    /// asked.
    pub async fn authenticate(&self, token: &str) -> Result<User, Status> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let answer = match self.tokens.get(&key) {
            Some(answer) => answer,
            None => {
                let answer = self.review_token(token).await?;
                self.tokens.insert(key, answer.clone());
                answer
            }
        };
        answer.map_err(|reason| {
            Status::unauthenticated(format!(
                "the Kubernetes API did not accept the token: {reason}"
            ))
        })
    }

    /// `None` when `user` may do `access`, else the reason it may not.
    ///
    /// # Errors
    /// UNAVAILABLE when the API server cannot be asked.
    pub async fn authorize(
        &self,
        user: &User,
        access: Access<'_>,
    ) -> Result<Option<String>, Status> {
        let review = subject_access_review(user, access);
        let key: [u8; 32] = match serde_json::to_vec(&review.spec) {
            Ok(bytes) => Sha256::digest(bytes).into(),
            Err(error) => return Err(Status::internal(format!("encoding a review: {error}"))),
        };
        if let Some(decision) = self.decisions.get(&key) {
            return Ok(decision);
        }
        let answer = self
            .send("SubjectAccessReview", || async {
                Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
            })
            .await?;
        let decision = match answer.status {
            Some(status) if status.allowed => None,
            Some(status) => Some(
                status
                    .reason
                    .filter(|r| !r.is_empty())
                    .or(status.evaluation_error.filter(|e| !e.is_empty()))
                    .unwrap_or_else(|| "the cluster's RBAC does not allow it".to_string()),
            ),
            None => Some("the Kubernetes API gave no decision".to_string()),
        };
        self.decisions.insert(key, decision.clone());
        Ok(decision)
    }

    async fn review_token(&self, token: &str) -> Result<Result<User, String>, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = self
            .send("TokenReview", || async {
                Api::<TokenReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
            })
            .await?;
        let status = answer.status.unwrap_or_default();
        let user = status.user.unwrap_or_default();
        match (status.authenticated, user.username) {
            (Some(true), Some(name)) if !name.is_empty() => {
                let mut groups = user.groups.unwrap_or_default();
                if !groups.iter().any(|g| g == AUTHENTICATED) {
                    groups.push(AUTHENTICATED.to_string());
                }
                Ok(Ok(User {
                    name,
                    uid: user.uid.unwrap_or_default(),
                    groups,
                    extra: user.extra.unwrap_or_default(),
                }))
            }
            _ => Ok(Err(status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".to_string()))),
        }
    }

    /// Sends one review, at most [`REVIEWS_IN_FLIGHT`] at once, within [`REVIEW_TIMEOUT`].
    async fn send<T, F, Fut>(&self, kind: &str, request: F) -> Result<T, Status>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let sent = tokio::time::timeout(REVIEW_TIMEOUT, async {
            let _permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| Status::unavailable("the control plane is shutting down"))?;
            request().await.map_err(|error| {
                tracing::warn!(%kind, error = %crate::kubernetes::error_line(&error), "review failed");
                Status::unavailable(format!(
                    "cannot check the caller with the Kubernetes API ({kind}): {}",
                    crate::kubernetes::error_line(&error)
                ))
            })
        })
        .await;
        sent.unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "cannot check the caller with the Kubernetes API ({kind}): no answer within {}s",
                REVIEW_TIMEOUT.as_secs()
            )))
        })
    }
}

/// The review that asks whether `user` may do `access`.
fn subject_access_review(user: &User, access: Access<'_>) -> SubjectAccessReview {
    let attributes = attributes(access);
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_string());
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: optional(&user.uid),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(attributes.group.to_string()),
                resource: Some(attributes.resource.to_string()),
                subresource: attributes.subresource.map(str::to_string),
                verb: Some(attributes.verb.to_string()),
                namespace: optional(access.namespace),
                name: optional(access.name),
                ..ResourceAttributes::default()
            }),
            non_resource_attributes: None,
        },
        ..SubjectAccessReview::default()
    }
}

/// The Kubernetes resource and verb a call is checked as: Flotilla's resources are
/// `wasmworkloads` (with the `log` and `attach` subresources, as a Pod's) and `modules` in
/// `flotilla.dev`; ConfigMaps, Secrets, Events and Nodes are the cluster's own. An apply is a
/// `create` of a new object and an `update` of an existing one, as the control plane then
/// writes it.
fn attributes(access: Access<'_>) -> Attributes {
    let (group, resource, subresource) = match access.resource {
        Resource::Workloads => (GROUP, "wasmworkloads", None),
        Resource::WorkloadLogs => (GROUP, "wasmworkloads", Some("log")),
        Resource::WorkloadAttach => (GROUP, "wasmworkloads", Some("attach")),
        Resource::Modules => (GROUP, "modules", None),
        Resource::Events => ("", "events", None),
        Resource::ConfigMaps => ("", "configmaps", None),
        Resource::Secrets => ("", "secrets", None),
        Resource::Nodes => ("", "nodes", None),
    };
    let verb = match access.verb {
        Verb::Get => "get",
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Apply if access.creates => "create",
        Verb::Apply => "update",
        Verb::Delete => "delete",
        Verb::Create => "create",
    };
    Attributes {
        group,
        resource,
        subresource,
        verb,
    }
}

/// A map whose entries expire, bounded in size: when full, expired entries go, and if none
/// had expired, all go (the next calls ask again).
struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Instant, V)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.lock();
        let (at, value) = entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    fn insert(&self, key: K, value: V) {
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_map_to_kubernetes_resources_and_verbs() {
        let apply = Access::new(Verb::Apply, Resource::Workloads, "team-a", "web");
        let created = attributes(Access {
            creates: true,
            ..apply
        });
        assert_eq!(
            (created.group, created.resource, created.verb),
            (GROUP, "wasmworkloads", "create")
        );
        assert_eq!(attributes(apply).verb, "update");
        let logs = attributes(Access::new(Verb::Get, Resource::WorkloadLogs, "a", "web"));
        assert_eq!(
            (logs.resource, logs.subresource, logs.verb),
            ("wasmworkloads", Some("log"), "get")
        );
        let attach = attributes(Access::new(
            Verb::Create,
            Resource::WorkloadAttach,
            "a",
            "w",
        ));
        assert_eq!(
            (attach.subresource, attach.verb),
            (Some("attach"), "create")
        );
        let secrets = attributes(Access::new(Verb::List, Resource::Secrets, "a", ""));
        assert_eq!((secrets.group, secrets.resource), ("", "secrets"));
    }

    #[test]
    fn a_review_carries_the_user_and_the_call() {
        let user = User {
            name: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["dev".into(), AUTHENTICATED.into()],
            extra: [("scopes".to_string(), vec!["x".to_string()])].into(),
        };
        let review = subject_access_review(
            &user,
            Access::new(Verb::Delete, Resource::Workloads, "team-a", "web"),
        );
        let spec = review.spec;
        assert_eq!(spec.user.as_deref(), Some("alice"));
        assert_eq!(spec.uid.as_deref(), Some("u-1"));
        assert_eq!(spec.groups, Some(user.groups.clone()));
        assert_eq!(spec.extra, Some(user.extra.clone()));
        let attributes = spec.resource_attributes.expect("resource attributes");
        assert_eq!(attributes.verb.as_deref(), Some("delete"));
        assert_eq!(attributes.namespace.as_deref(), Some("team-a"));
        assert_eq!(attributes.name.as_deref(), Some("web"));
        assert_eq!(attributes.group.as_deref(), Some(GROUP));
        // Every namespace: no namespace in the review, as for `kubectl get -A`.
        let all =
            subject_access_review(&user, Access::new(Verb::List, Resource::Workloads, "", ""));
        let attributes = all.spec.resource_attributes.expect("resource attributes");
        assert_eq!(attributes.namespace, None);
        assert_eq!(attributes.name, None);
    }

    #[test]
    fn the_cache_forgets_after_its_ttl_and_stays_bounded() {
        let cache = TtlCache::new(Duration::from_millis(50), 4);
        cache.insert(1, "one");
        assert_eq!(cache.get(&1), Some("one"));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&1), None);
        for i in 0..100 {
            cache.insert(i, "x");
            assert!(cache.len() <= 4, "{} entries", cache.len());
        }
        assert_eq!(cache.get(&99), Some("x"));
    }
}
