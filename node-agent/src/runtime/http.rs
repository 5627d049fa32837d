//! HTTP workloads: the route table the ingress reads, and a fresh sandbox for every request.
//!
//! A replica of an HTTP workload is a [`HttpPool`] registered in [`HttpRoutes`] under its host
//! and path prefix for as long as the replica runs. The pool owns nothing per request: each
//! request gets a new `Store` and instance of the pre-linked `wasi:http/proxy` component (from
//! the pooling allocator's warm slots), runs under the workload's memory, CPU-time and
//! wall-clock limits, and is dropped when the guest returns. No state survives a request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::control::v1::ClusterRoute;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use super::Exit;
use super::logs::LogBuffer;
use super::volumes::Mounts;
use super::wasmtime::{P2State, PreparedWorkload, WasmtimeRuntime, classify};
use crate::metrics::WorkloadHttpMetrics;

/// The body of every response the ingress sends: the guest's stream, or a short error text.
pub type ResponseBody = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Requests one replica serves at once when the workload sets no limit.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 1000;

/// Wall-clock limit of one request when the workload sets none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// How specific the key is: a host beats any host, then longer prefixes win.
    fn specificity(&self) -> (bool, usize) {
        (self.host.is_some(), self.prefix.len())
    }

    fn display(&self) -> String {
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

/// One route: its key, the workload it belongs to and the replicas serving it on this node.
struct Route {
    key: RouteKey,
    workload: Arc<str>,
    pools: Vec<Arc<HttpPool>>,
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
#[derive(Clone, Default)]
pub struct HttpRoutes {
    table: Arc<RwLock<Arc<Vec<Arc<Route>>>>>,
    remote: Arc<RwLock<Arc<Vec<RemoteRoute>>>>,
}

/// Where a request goes.
pub enum Dispatch {
    /// A replica with a free slot, and the permit that holds the slot.
    Serve(Arc<HttpPool>, OwnedSemaphorePermit),
    /// Every replica of the matching workload is at its concurrency limit; one of them.
    Busy(Arc<HttpPool>),
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
pub struct Registration {
    routes: HttpRoutes,
    pool: Arc<HttpPool>,
}

impl Drop for Registration {
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

// === impl HttpRoutes ===

impl HttpRoutes {
    fn update(&self, f: impl FnOnce(&mut Vec<Arc<Route>>)) {
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut table = (**guard).clone();
        f(&mut table);
        // Most specific first: a host before any host, then longer prefixes.
        table.sort_by_key(|route| std::cmp::Reverse(route.key.specificity()));
        *guard = Arc::new(table);
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Route>>> {
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
        pool: Arc<HttpPool>,
    ) -> Result<Registration, RouteConflict> {
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
    pub fn dispatch(&self, host: &str, path: &str, forward: bool) -> Dispatch {
        let table = self.snapshot();
        let local = table.iter().find(|r| r.key.matches(host, path));
        if forward {
            let remote = self
                .remote
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let elsewhere = remote.iter().find(|r| {
                r.key.matches(host, path)
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
            if let Ok(permit) = pool.permits.clone().try_acquire_owned() {
                return Dispatch::Serve(pool.clone(), permit);
            }
        }
        match route.pools.first() {
            Some(pool) => Dispatch::Busy(pool.clone()),
            None => Dispatch::NotFound,
        }
    }
}

/// One replica of an HTTP workload: what every request needs to get its own sandbox.
pub struct HttpPool {
    runtime: WasmtimeRuntime,
    prepared: Arc<PreparedWorkload>,
    /// The replica's name, each request's `metadata.name`.
    sandbox: Arc<str>,
    pre: ProxyPre<P2State>,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    timeout: Duration,
    logs: Arc<LogBuffer>,
    metrics: WorkloadHttpMetrics,
    /// The replica's volumes, mounted by every request's sandbox.
    mounts: Option<Arc<Mounts>>,
}

// === impl HttpPool ===

impl HttpPool {
    pub(super) fn new(
        runtime: WasmtimeRuntime,
        prepared: Arc<PreparedWorkload>,
        sandbox: Arc<str>,
        pre: ProxyPre<P2State>,
        settings: &HttpSettings,
        logs: Arc<LogBuffer>,
        mounts: Option<Arc<Mounts>>,
    ) -> Self {
        let max_concurrency = settings.max_concurrency as usize;
        let metrics = runtime.http_metrics().workload(&settings.owner);
        Self {
            permits: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
            timeout: settings.timeout,
            runtime,
            prepared,
            sandbox,
            pre,
            logs,
            metrics,
            mounts,
        }
    }

    /// The workload's metric handles.
    pub fn metrics(&self) -> &WorkloadHttpMetrics {
        &self.metrics
    }

    /// The workload's name on this agent.
    pub fn workload(&self) -> &str {
        self.prepared.name()
    }

    /// Requests this replica serves at once.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// Serves one request in a fresh sandbox and returns the response once the guest has set
    /// it; the body then streams while the guest keeps running. A sandbox that fails before
    /// responding gets `500` (`504` past its deadline); one that fails later cuts the body.
    /// `permit` holds the replica's concurrency slot until the guest returns.
    pub async fn handle<B>(
        self: Arc<Self>,
        request: hyper::Request<B>,
        permit: OwnedSemaphorePermit,
    ) -> hyper::Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let mut store = match self.runtime.request_store(
            &self.prepared,
            &self.sandbox,
            &self.logs,
            self.mounts.as_ref(),
        ) {
            Ok(store) => store,
            Err(exit) => {
                let line = format!("request failed: {}: {}\n", exit.reason(), exit.message());
                self.logs.write(line.as_bytes());
                return text_response(500, &format!("{}: {}\n", exit.reason(), exit.message()));
            }
        };
        let mut http = store.data_mut().http();
        let resources = http
            .new_incoming_request(Scheme::Http, request)
            .and_then(|request| Ok((request, http.new_response_outparam(sender)?)));
        let (request, outparam) = match resources {
            Ok(resources) => resources,
            Err(error) => return text_response(400, &format!("bad request: {error:#}\n")),
        };

        let pool = self.clone();
        let guest = async move {
            let _permit = permit;
            let instances = pool.metrics.instances();
            instances.inc();
            let run = async {
                let proxy = pool.pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, outparam)
                    .await
            };
            let exit = match tokio::time::timeout(pool.timeout, run).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(classify_request_error(error)),
                Err(_) => Some(RequestFailure::Exit(Exit::DeadlineExceeded(pool.timeout))),
            };
            drop(store);
            instances.dec();
            if let Some(failure) = &exit {
                pool.record_failure(failure);
            }
            exit
        };

        // The guest runs in this task until it has answered. Most handlers also finish their
        // body by then, so the request costs no task of its own and no cross-thread wakeup;
        // one still writing its body (or working after it) moves to a task of its own.
        let mut guest = Box::pin(guest);
        let mut receiver = receiver;
        let exit = tokio::select! {
            biased;
            exit = &mut guest => exit,
            answer = &mut receiver => {
                tokio::spawn(guest);
                return match answer {
                    Ok(Ok(response)) => response,
                    Ok(Err(code)) => handler_error(&code),
                    Err(_) => text_response(500, "the handler dropped its response\n"),
                };
            }
        };
        match receiver.try_recv() {
            Ok(Ok(response)) => response,
            Ok(Err(code)) => handler_error(&code),
            // The guest ended without a response: say why.
            Err(_) => match exit {
                Some(RequestFailure::PoolExhausted) => {
                    busy_response("the agent has no free sandbox slot; try again shortly\n".into())
                }
                Some(RequestFailure::Exit(exit @ Exit::DeadlineExceeded(_))) => {
                    text_response(504, &format!("{}\n", exit.message()))
                }
                Some(RequestFailure::Exit(exit)) => text_response(
                    500,
                    &format!(
                        "the handler failed: {}: {}\n",
                        exit.reason(),
                        first_line(&exit)
                    ),
                ),
                None => text_response(500, "the handler returned without a response\n"),
            },
        }
    }

    /// Sends `GET path` through a fresh sandbox, as a request for the route would be; the
    /// replica may serve only if it answers 2xx.
    ///
    /// # Errors
    /// [`Exit::NotReady`] with the status and the start of the body.
    pub(super) async fn check_ready(
        self: &Arc<Self>,
        key: &RouteKey,
        path: &str,
    ) -> Result<(), Exit> {
        let host = key.host.as_deref().unwrap_or("localhost");
        let request = hyper::Request::get(path)
            .header(http::header::HOST, host)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| Exit::NotReady(format!("readiness path {path:?}: {e}")))?;
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Err(Exit::NotReady(
                "no free request slot for the readiness check".into(),
            ));
        };
        let response = self.clone().handle(request, permit).await;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string();
        Err(Exit::NotReady(format!(
            "readiness request GET {path} answered {status}: {text}"
        )))
    }

    fn record_failure(&self, failure: &RequestFailure) {
        let RequestFailure::Exit(exit) = failure else {
            self.metrics.failed("PoolExhausted");
            return;
        };
        self.metrics.failed(exit.reason());
        let message = exit.message();
        tracing::warn!(
            workload = %self.prepared.name(),
            reason = exit.reason(),
            %message,
            "request sandbox failed"
        );
        self.logs
            .write(format!("flotilla: request failed: {}: {message}\n", exit.reason()).as_bytes());
    }
}

/// Why a request's sandbox did not finish.
enum RequestFailure {
    /// The guest failed: trapped, ran out of memory or CPU time, or passed its deadline.
    Exit(Exit),
    /// The pooling allocator had no free slot for the instance.
    PoolExhausted,
}

fn classify_request_error(error: wasmtime::Error) -> RequestFailure {
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return RequestFailure::PoolExhausted;
    }
    RequestFailure::Exit(classify(error))
}

fn handler_error(code: &impl std::fmt::Debug) -> hyper::Response<ResponseBody> {
    text_response(
        500,
        &format!("the handler answered with an error: {code:?}\n"),
    )
}

fn first_line(exit: &Exit) -> String {
    exit.message()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A short `text/plain` response from the agent itself.
pub fn text_response(status: u16, text: &str) -> hyper::Response<ResponseBody> {
    let body = http_body_util::Full::new(Bytes::from(text.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `503 Service Unavailable` with `Retry-After: 1`.
pub fn busy_response(text: String) -> hyper::Response<ResponseBody> {
    let mut response = text_response(503, &text);
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

/// The per-request limits and route of an HTTP workload, resolved from its spec.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// The workload the route belongs to: the spec's owner, or its name when it has none.
    /// Revisions of one owner serve the same route side by side during an update.
    pub owner: Arc<str>,
    /// Where it answers.
    pub route: RouteKey,
    /// Requests one replica serves at once.
    pub max_concurrency: u32,
    /// Wall-clock limit of one request.
    pub timeout: Duration,
    /// The path that must answer 2xx before the replica serves, if any.
    pub readiness_path: Option<String>,
}

/// A replica of an HTTP workload, routed to from creation until it is dropped (the replica
/// stopped); in-flight requests then finish in their own tasks.
pub struct HttpReplica {
    _registration: Registration,
}

impl HttpReplica {
    /// Registers the replica's route, so that it serves before the supervisor reports it
    /// running.
    ///
    /// # Errors
    /// [`Exit::RouteConflict`] when another workload holds the route on this node.
    pub(super) fn register(
        routes: &HttpRoutes,
        key: RouteKey,
        workload: &Arc<str>,
        pool: Arc<HttpPool>,
    ) -> Result<Self, Exit> {
        routes
            .register(key, workload, pool)
            .map(|registration| Self {
                _registration: registration,
            })
            .map_err(|conflict| Exit::RouteConflict(conflict.to_string()))
    }

    /// Serves until the future is dropped.
    pub async fn run(self) -> Exit {
        std::future::pending().await
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

    fn forwarded_to(dispatch: Dispatch) -> Option<(String, String)> {
        match dispatch {
            Dispatch::Forward { workload, endpoint } => {
                Some((workload.to_string(), endpoint.to_string()))
            }
            _ => None,
        }
    }

    #[test]
    fn routes_served_elsewhere_are_forwarded_round_robin_and_never_twice() {
        let routes = HttpRoutes::default();
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
}
