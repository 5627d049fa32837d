//! The route table of the agent's HTTP replicas, and the cluster's routes served by other
//! nodes: which replica, or which other node's ingress, answers a host and path.
//!
//! Generic over the [`Backend`] that serves a route (the runtime's HTTP pool), so the table
//! knows nothing of sandboxes: only that a backend has a number of request slots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use flotilla_proto::control::v1::ClusterRoute;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What serves a route on this node: one replica of an HTTP workload.
pub trait Backend: Send + Sync + 'static {
    /// The replica's request slots; a request is dispatched to it only with a permit.
    fn permits(&self) -> &Arc<Semaphore>;
}

/// Which requests a workload answers: a host (any when `None`) and a path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteKey {
    /// Lower-case host without port.
    pub host: Option<Box<str>>,
    /// Path prefix without a trailing `/` (the root prefix is the empty string).
    pub prefix: Box<str>,
}

impl RouteKey {
    /// The key for a spec's host and prefix (`""` meaning any host and `/`).
    pub fn new(host: &str, prefix: &str) -> Self {
        let host = host.trim().to_ascii_lowercase();
        Self {
            host: (!host.is_empty()).then(|| host.into()),
            prefix: prefix.trim_end_matches('/').into(),
        }
    }

    /// Whether a request for `host` (without port, in any case) and `path` matches, on whole
    /// path segments.
    fn matches(&self, host: &str, path: &str) -> bool {
        if self
            .host
            .as_deref()
            .is_some_and(|h| !h.eq_ignore_ascii_case(host))
        {
            return false;
        }
        match path.strip_prefix(&*self.prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// Whether the key names `host` (not any host).
    fn names(&self, host: &str) -> bool {
        self.host
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(host))
    }

    /// How specific the key is: a host beats any host, then longer prefixes win.
    fn specificity(&self) -> (bool, usize) {
        (self.host.is_some(), self.prefix.len())
    }

    /// The key as users write it: `host/prefix`, `*` for any host.
    pub fn display(&self) -> String {
        let prefix = if self.prefix.is_empty() {
            "/"
        } else {
            &self.prefix
        };
        match &self.host {
            Some(host) => format!("{host}{prefix}"),
            None => format!("*{prefix}"),
        }
    }
}

/// A snapshot of the local routes, most specific first.
type Table<B> = Arc<Vec<Arc<Route<B>>>>;

/// One route: its key, the workload it belongs to and the replicas serving it on this node.
struct Route<B> {
    key: RouteKey,
    workload: Arc<str>,
    pools: Vec<Arc<B>>,
    /// Where the next request starts looking for a free replica.
    next: AtomicUsize,
}

/// A route served by other nodes, as the control plane last described it.
struct RemoteRoute {
    key: RouteKey,
    workload: Arc<str>,
    endpoints: Vec<Arc<str>>,
    next: AtomicUsize,
}

/// The routes of every HTTP replica on this agent, and the cluster's routes served elsewhere.
/// Cheap to clone.
///
/// Copy-on-write: a lookup clones one `Arc` under a read lock and scans without holding it;
/// replicas coming and going rebuild the small list.
pub struct Routes<B> {
    table: Arc<RwLock<Table<B>>>,
    remote: Arc<RwLock<Arc<Vec<RemoteRoute>>>>,
}

impl<B> Clone for Routes<B> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
            remote: self.remote.clone(),
        }
    }
}

impl<B> Default for Routes<B> {
    fn default() -> Self {
        Self {
            table: Arc::default(),
            remote: Arc::default(),
        }
    }
}

/// Where a request goes.
pub enum Dispatch<B> {
    /// A replica with a free slot, and the permit that holds the slot.
    Serve(Arc<B>, OwnedSemaphorePermit),
    /// Every replica of the matching workload is at its concurrency limit; one of them.
    Busy(Arc<B>),
    /// Another node serves the route: pass the request on to its ingress.
    Forward {
        /// The workload.
        workload: Arc<str>,
        /// Base URL of the ingress to pass the request to.
        endpoint: Arc<str>,
    },
    /// No workload on this node answers the host and path.
    NotFound,
}

/// A route taken by another workload on this node.
#[derive(Debug, thiserror::Error)]
#[error("route {route} is already served by workload {owner} on this node")]
pub struct RouteConflict {
    route: String,
    owner: Arc<str>,
}

/// Removes its replica from the route table when dropped.
pub struct Registration<B: Backend> {
    routes: Routes<B>,
    pool: Arc<B>,
}

impl<B: Backend> Drop for Registration<B> {
    fn drop(&mut self) {
        self.routes.update(|table| {
            for route in table.iter_mut() {
                if route.pools.iter().any(|p| Arc::ptr_eq(p, &self.pool)) {
                    let pools = route
                        .pools
                        .iter()
                        .filter(|p| !Arc::ptr_eq(p, &self.pool))
                        .cloned()
                        .collect();
                    *route = Arc::new(Route {
                        key: route.key.clone(),
                        workload: route.workload.clone(),
                        pools,
                        next: AtomicUsize::new(0),
                    });
                }
            }
            table.retain(|route| !route.pools.is_empty());
        });
    }
}

// === impl Routes ===

impl<B: Backend> Routes<B> {
    fn update(&self, f: impl FnOnce(&mut Vec<Arc<Route<B>>>)) {
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut table = (**guard).clone();
        f(&mut table);
        // Most specific first: a host before any host, then longer prefixes.
        table.sort_by_key(|route| std::cmp::Reverse(route.key.specificity()));
        *guard = Arc::new(table);
    }

    fn snapshot(&self) -> Table<B> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds a replica of `workload` under `key` until the returned registration is dropped.
    ///
    /// # Errors
    /// Fails when another workload serves the same host and prefix here.
    pub fn register(
        &self,
        key: RouteKey,
        workload: &Arc<str>,
        pool: Arc<B>,
    ) -> Result<Registration<B>, RouteConflict> {
        let mut conflict = None;
        self.update(|table| match table.iter_mut().find(|r| r.key == key) {
            Some(route) if route.workload != *workload => {
                conflict = Some(RouteConflict {
                    route: key.display(),
                    owner: route.workload.clone(),
                });
            }
            Some(route) => {
                let mut pools = route.pools.clone();
                pools.push(pool.clone());
                *route = Arc::new(Route {
                    key: key.clone(),
                    workload: workload.clone(),
                    pools,
                    next: AtomicUsize::new(0),
                });
            }
            None => table.push(Arc::new(Route {
                key: key.clone(),
                workload: workload.clone(),
                pools: vec![pool.clone()],
                next: AtomicUsize::new(0),
            })),
        });
        match conflict {
            Some(conflict) => Err(conflict),
            None => Ok(Registration {
                routes: self.clone(),
                pool,
            }),
        }
    }

    /// Replaces the cluster's routes (from the control plane), leaving out `own_url`: this
    /// agent's replicas are found in its own table.
    pub fn set_remote(&self, routes: Vec<ClusterRoute>, own_url: &str) {
        let own_url = own_url.trim_end_matches('/');
        let mut remote: Vec<RemoteRoute> = routes
            .into_iter()
            .filter_map(|route| {
                let endpoints: Vec<Arc<str>> = route
                    .endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/'))
                    .filter(|e| *e != own_url && !e.is_empty())
                    .map(Arc::from)
                    .collect();
                (!endpoints.is_empty()).then(|| RemoteRoute {
                    key: RouteKey::new(&route.host, &route.path_prefix),
                    workload: route.workload.into(),
                    endpoints,
                    next: AtomicUsize::new(0),
                })
            })
            .collect();
        remote.sort_by_key(|r| std::cmp::Reverse(r.key.specificity()));
        *self.remote.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(remote);
    }

    /// Finds the route for `host` (without port) and `path`: a local replica with a free slot
    /// or, when `forward` allows and the most specific match is served only elsewhere, another
    /// node's ingress.
    ///
    /// A host that some route names is served by such routes alone, as a web server's named
    /// virtual host is: its other paths answer 404 rather than fall to an any-host route, which
    /// may belong to another namespace and would receive the host's cookies.
    pub fn dispatch(&self, host: &str, path: &str, forward: bool) -> Dispatch<B> {
        let table = self.snapshot();
        let remote = self
            .remote
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let named =
            table.iter().any(|r| r.key.names(host)) || remote.iter().any(|r| r.key.names(host));
        let candidate = |key: &RouteKey| key.matches(host, path) && (key.host.is_some() || !named);
        let local = table.iter().find(|r| candidate(&r.key));
        if forward {
            let elsewhere = remote.iter().find(|r| {
                candidate(&r.key)
                    && local.is_none_or(|l| {
                        l.workload != r.workload && r.key.specificity() > l.key.specificity()
                    })
            });
            if let Some(route) = elsewhere {
                let i = route.next.fetch_add(1, Ordering::Relaxed) % route.endpoints.len();
                return Dispatch::Forward {
                    workload: route.workload.clone(),
                    endpoint: route.endpoints[i].clone(),
                };
            }
        }
        let Some(route) = local else {
            return Dispatch::NotFound;
        };
        let start = route.next.fetch_add(1, Ordering::Relaxed);
        let count = route.pools.len();
        for i in 0..count {
            let pool = &route.pools[(start + i) % count];
            if let Ok(permit) = pool.permits().clone().try_acquire_owned() {
                return Dispatch::Serve(pool.clone(), permit);
            }
        }
        match route.pools.first() {
            Some(pool) => Dispatch::Busy(pool.clone()),
            None => Dispatch::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_hosts_and_whole_path_segments() {
        let api = RouteKey::new("API.example.com", "/api/");
        assert_eq!(api.host.as_deref(), Some("api.example.com"));
        assert!(api.matches("api.example.com", "/api"));
        assert!(api.matches("api.example.com", "/api/v1/x"));
        assert!(!api.matches("api.example.com", "/apix"));
        assert!(!api.matches("other.example.com", "/api"));
        let root = RouteKey::new("", "/");
        assert!(root.matches("anything", "/"));
        assert!(root.matches("", "/a/b"));
        assert!(api.specificity() > RouteKey::new("", "/api/longer").specificity());
    }

    fn route(workload: &str, host: &str, prefix: &str, endpoints: &[&str]) -> ClusterRoute {
        ClusterRoute {
            workload: workload.into(),
            host: host.into(),
            path_prefix: prefix.into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// A backend that is never asked for: the tests route to other nodes only.
    struct NoBackend(Arc<Semaphore>);

    impl Backend for NoBackend {
        fn permits(&self) -> &Arc<Semaphore> {
            &self.0
        }
    }

    fn forwarded_to(dispatch: Dispatch<NoBackend>) -> Option<(String, String)> {
        match dispatch {
            Dispatch::Forward { workload, endpoint } => {
                Some((workload.to_string(), endpoint.to_string()))
            }
            _ => None,
        }
    }

    #[test]
    fn routes_served_elsewhere_are_forwarded_round_robin_and_never_twice() {
        let routes = Routes::<NoBackend>::default();
        routes.set_remote(
            vec![
                route(
                    "default.web",
                    "",
                    "/",
                    &["http://a:8080", "http://me:8080/"],
                ),
                route(
                    "default.api",
                    "",
                    "/api",
                    &["http://a:8080", "http://b:8080"],
                ),
                route("default.gone", "", "/gone", &["http://me:8080"]),
            ],
            "http://me:8080",
        );
        // The most specific route wins; this node's own URL is never a target.
        assert_eq!(
            forwarded_to(routes.dispatch("x", "/index.html", true)),
            Some(("default.web".into(), "http://a:8080".into()))
        );
        let targets: Vec<_> = (0..4)
            .filter_map(|_| forwarded_to(routes.dispatch("x", "/api/v1", true)))
            .map(|(_, endpoint)| endpoint)
            .collect();
        assert_eq!(
            targets,
            [
                "http://a:8080",
                "http://b:8080",
                "http://a:8080",
                "http://b:8080"
            ]
        );
        // A route only this node serves is not forwarded; nor is an already forwarded request.
        assert!(matches!(
            routes.dispatch("x", "/gone", true),
            Dispatch::Forward { ref workload, .. } if &**workload == "default.web"
        ));
        assert!(matches!(
            routes.dispatch("x", "/api", false),
            Dispatch::NotFound
        ));
        routes.set_remote(vec![], "http://me:8080");
        assert!(matches!(
            routes.dispatch("x", "/api", true),
            Dispatch::NotFound
        ));
    }

    #[test]
    fn a_named_host_never_falls_to_an_any_host_route() {
        let routes = Routes::<NoBackend>::default();
        routes.set_remote(
            vec![
                route("team-a.catch-all", "", "/", &["http://a:8080"]),
                route(
                    "team-b.shop",
                    "shop.example.com",
                    "/api",
                    &["http://b:8080"],
                ),
            ],
            "http://me:8080",
        );
        assert_eq!(
            forwarded_to(routes.dispatch("shop.example.com", "/api/cart", true)),
            Some(("team-b.shop".into(), "http://b:8080".into()))
        );
        // Another path of the shop's host is the shop's to answer (404), not team-a's.
        assert!(matches!(
            routes.dispatch("shop.example.com", "/login", true),
            Dispatch::NotFound
        ));
        assert_eq!(
            forwarded_to(routes.dispatch("other.example.com", "/login", true)),
            Some(("team-a.catch-all".into(), "http://a:8080".into()))
        );
    }
}
