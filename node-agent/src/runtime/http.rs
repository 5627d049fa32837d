//! HTTP workloads: a fresh sandbox for every request.
//!
//! A replica of an HTTP workload is a [`HttpPool`] registered in the ingress's [`HttpRoutes`]
//! under its host and path prefix for as long as the replica runs. The pool owns nothing per
//! request: each request gets a new `Store` and instance of the pre-linked handler component
//! (from the pooling allocator's warm slots), runs under the workload's memory, CPU-time and
//! wall-clock limits, and is dropped when the guest returns. No state survives a request.
//!
//! Handlers are WASI 0.2 `wasi:http/proxy` components (`incoming-handler`, answering through
//! a response outparam) or, on engines with the component model's async ABI, WASI 0.3
//! `wasi:http/service` components (`handler.handle`, an async function returning the
//! response, whose body a guest task may still be writing). wasmtime-wasi-http 48 marks its
//! WASI 0.3 support experimental, without patch releases for fixes limited to it: a workload
//! opts in with `spec.wasm.features: [component-model-async]`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use super::cpu::CpuUsage;
use super::environment::Environment;
use super::exit::{Exit, classify};
use super::limits::{Limiter, SandboxLimits};
use super::logs::LogBuffer;
use super::store::{P2State, Stores};
use super::volumes::Mounts;
use crate::ingress::routes::{Backend, Registration, RouteKey, Routes};
use crate::metrics::WorkloadHttpMetrics;
use flotilla_proto::agent::v1::LogStream;

/// The body of every response the ingress sends: the guest's stream, or a short error text.
pub(crate) type ResponseBody = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Wall-clock limit of one request when the workload sets none.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The route table of this agent's HTTP replicas.
pub(crate) type HttpRoutes = Routes<HttpPool>;

/// What each request's sandbox of one replica is made from.
pub struct RequestSandbox {
    /// Makes the stores.
    pub stores: Stores,
    /// The workload's name on this agent.
    pub workload: Arc<str>,
    /// The workload's arguments and environment.
    pub environment: Arc<Environment>,
    /// The limits of each request's sandbox.
    pub limits: SandboxLimits,
    /// The replica's name, each request's `metadata.name`.
    pub sandbox: Arc<str>,
    /// The replica's log ring, shared by its requests.
    pub logs: Arc<LogBuffer>,
    /// The replica's CPU used, charged by its requests.
    pub cpu: Arc<CpuUsage>,
    /// The replica's volumes, mounted by every request's sandbox.
    pub mounts: Option<Arc<Mounts>>,
}

// === impl RequestSandbox ===

impl RequestSandbox {
    fn store(&self) -> Result<Store<P2State>, Exit> {
        self.stores.component_store(
            &self.environment,
            &self.limits,
            &self.sandbox,
            &self.logs,
            &self.cpu,
            self.mounts.as_ref(),
        )
    }
}

/// A pre-linked HTTP handler component.
#[derive(Clone)]
pub enum HandlerPre {
    /// WASI 0.2: exports `wasi:http/incoming-handler`.
    P2(ProxyPre<P2State>),
    /// WASI 0.3: exports `wasi:http/handler`.
    P3(ServicePre<P2State>),
}

// === impl HandlerPre ===

impl HandlerPre {
    /// Instantiates the handler in `store` without calling it.
    ///
    /// # Errors
    /// The instance could not be created (no pool slot, a start function that traps).
    pub async fn instantiate(&self, store: &mut Store<P2State>) -> wasmtime::Result<()> {
        match self {
            Self::P2(pre) => pre.instantiate_async(store).await.map(drop),
            Self::P3(pre) => pre.instantiate_async(store).await.map(drop),
        }
    }
}

/// One replica of an HTTP workload: what every request needs to get its own sandbox.
pub struct HttpPool {
    sandbox: RequestSandbox,
    pre: HandlerPre,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    timeout: Duration,
    metrics: WorkloadHttpMetrics,
}

// === impl HttpPool ===

impl HttpPool {
    /// A replica serving `settings`' route with `pre`, each request in a sandbox made from
    /// `sandbox`.
    pub fn new(
        sandbox: RequestSandbox,
        pre: HandlerPre,
        settings: &HttpSettings,
        metrics: WorkloadHttpMetrics,
    ) -> Self {
        let max_concurrency = settings.max_concurrency as usize;
        Self {
            permits: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
            timeout: settings.timeout,
            sandbox,
            pre,
            metrics,
        }
    }

    /// The workload's metric handles.
    pub fn metrics(&self) -> &WorkloadHttpMetrics {
        &self.metrics
    }

    /// The workload's name on this agent.
    pub fn workload(&self) -> &str {
        &self.sandbox.workload
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
        let store = match self.sandbox.store() {
            Ok(store) => store,
            Err(exit) => {
                let line = format!("request failed: {}: {}\n", exit.reason(), exit.message());
                self.sandbox.logs.write(LogStream::Stderr, line.as_bytes());
                return text_response(500, &format!("{}: {}\n", exit.reason(), exit.message()));
            }
        };
        match self.pre.clone() {
            HandlerPre::P2(pre) => self.handle_p2(pre, store, request, permit).await,
            HandlerPre::P3(pre) => self.handle_p3(pre, store, request, permit).await,
        }
    }

    /// [`Self::handle`] for a WASI 0.2 handler, which answers through a response outparam.
    async fn handle_p2<B>(
        self: Arc<Self>,
        pre: ProxyPre<P2State>,
        mut store: Store<P2State>,
        request: hyper::Request<B>,
        permit: OwnedSemaphorePermit,
    ) -> hyper::Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let (sender, receiver) = tokio::sync::oneshot::channel();
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
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, outparam)
                    .await
            };
            let result = tokio::time::timeout(pool.timeout, run).await;
            let exit = pool.end_request(result, store);
            instances.dec();
            exit
        };

        answer(guest, receiver).await
    }

    /// [`Self::handle`] for a WASI 0.3 handler: `handle` returns the response, and the guest's
    /// tasks (writing the body, or working after it) run as long as the store's event loop
    /// does, which is until the body has been sent or dropped, or the request's deadline; then
    /// the sandbox ends. `permit` is held until then.
    async fn handle_p3<B>(
        self: Arc<Self>,
        pre: ServicePre<P2State>,
        mut store: Store<P2State>,
        request: hyper::Request<B>,
        permit: OwnedSemaphorePermit,
    ) -> hyper::Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        let guest = async move {
            let instances = pool.metrics.instances();
            instances.inc();
            let run = async {
                let service = pre.instantiate_async(&mut store).await?;
                let (request, request_io) = wasmtime_wasi_http::p3::Request::from_http(
                    store.data_mut().http().hooks,
                    request,
                );
                store
                    .run_concurrent(async move |accessor| {
                        let response = match service.handle(accessor, request).await? {
                            Ok(response) => response,
                            Err(code) => {
                                let _ = sender.send(Err(code));
                                return Ok(());
                            }
                        };
                        let response = accessor
                            .with(|mut store| response.into_http(&mut store, request_io))?;
                        // Dropped with the body, once hyper has sent it or given up on it.
                        // The replica's concurrency slot goes with it: a client that sends its
                        // next request as soon as it has read this response finds the slot
                        // free, though this task has yet to see the body go and end the
                        // sandbox (which it does at once).
                        let (body_dropped, body_gone) = tokio::sync::oneshot::channel::<()>();
                        let response = response.map(|body| {
                            body.map_err(move |error| {
                                let _keep_until_the_body_drops = (&body_dropped, &permit);
                                error
                            })
                            .boxed_unsync()
                        });
                        if sender.send(Ok(response)).is_ok() {
                            let _ = body_gone.await;
                        }
                        wasmtime::Result::<()>::Ok(())
                    })
                    .await?
            };
            let result = tokio::time::timeout(pool.timeout, run).await;
            let exit = pool.end_request(result, store);
            instances.dec();
            exit
        };

        answer(guest, receiver).await
    }

    /// How a request's sandbox ended, from its run under the request's timeout: `None` when
    /// it returned. Drops the sandbox and counts a failure.
    fn end_request(
        &self,
        result: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
        store: Store<P2State>,
    ) -> Option<RequestFailure> {
        let exit = match result {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(classify_request_error(error, &store.data().limiter)),
            Err(_) => Some(RequestFailure::Exit(Exit::DeadlineExceeded(self.timeout))),
        };
        drop(store);
        if let Some(failure) = &exit {
            self.record_failure(failure);
        }
        exit
    }

    /// Sends `GET path` through a fresh sandbox, as a request for the route would be; the
    /// replica may serve only if it answers 2xx.
    ///
    /// # Errors
    /// [`Exit::NotReady`] with the status and the start of the body.
    pub async fn check_ready(self: &Arc<Self>, key: &RouteKey, path: &str) -> Result<(), Exit> {
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
            workload = %self.sandbox.workload,
            reason = exit.reason(),
            %message,
            "request sandbox failed"
        );
        self.sandbox.logs.write(
            LogStream::Stderr,
            format!("flotilla: request failed: {}: {message}\n", exit.reason()).as_bytes(),
        );
    }
}

impl Backend for HttpPool {
    fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }
}

/// Why a request's sandbox did not finish.
enum RequestFailure {
    /// The guest failed: trapped, ran out of memory or CPU time, or passed its deadline.
    Exit(Exit),
    /// The pooling allocator had no free slot for the instance.
    PoolExhausted,
}

fn classify_request_error(error: wasmtime::Error, limiter: &Limiter) -> RequestFailure {
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return RequestFailure::PoolExhausted;
    }
    RequestFailure::Exit(classify(error, limiter))
}

/// Runs `guest` in this task until it has answered on `receiver`, then returns the answer.
/// Most handlers also finish their body by then, so the request costs no task of its own and
/// no cross-thread wakeup; one still writing its body (or working after it) moves to a task
/// of its own.
async fn answer<E: std::fmt::Debug>(
    guest: impl Future<Output = Option<RequestFailure>> + Send + 'static,
    mut receiver: tokio::sync::oneshot::Receiver<Result<hyper::Response<ResponseBody>, E>>,
) -> hyper::Response<ResponseBody> {
    let mut guest = Box::pin(guest);
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
        Err(_) => no_response(exit),
    }
}

/// The answer to a request whose guest ended without a response: why it did.
fn no_response(exit: Option<RequestFailure>) -> hyper::Response<ResponseBody> {
    match exit {
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
    }
}

/// The answer to a request the handler refused with a `wasi:http` error code.
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
pub(crate) fn text_response(status: u16, text: &str) -> hyper::Response<ResponseBody> {
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
pub(crate) fn busy_response(text: String) -> hyper::Response<ResponseBody> {
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
    _registration: Registration<HttpPool>,
}

impl HttpReplica {
    /// Registers the replica's route, so that it serves before the supervisor reports it
    /// running.
    ///
    /// # Errors
    /// [`Exit::RouteConflict`] when another workload holds the route on this node.
    pub fn register(
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
