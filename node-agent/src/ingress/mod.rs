//! The agent's HTTP ingress: hyper (HTTP/1.1 and h2c) on one port, routing each request by
//! host and path prefix to a replica of the HTTP workload placed here, which runs it in a fresh
//! sandbox (see [`crate::runtime::http`]); [`routes`] holds the route table.
//!
//! A request for a route that only other nodes serve (the control plane sends the cluster's
//! routes) is passed on to one of their ingresses, once: a Service over every agent then
//! reaches every HTTP workload. Answers of the ingress itself: `404` when no workload serves the
//! host and path, `503` with `Retry-After` when the workload's replicas are at their
//! concurrency limit, `502` when the node it passed the request to failed. On shutdown it stops
//! accepting, lets in-flight requests finish within the grace period, then closes.

pub(crate) mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::routes::Dispatch;
use crate::metrics::HttpMetrics;
use crate::runtime::http::{HttpRoutes, ResponseBody, busy_response, text_response};

/// Marks a request one ingress passed to another, naming the node; it is never passed again.
const FORWARDED_BY: &str = "x-flotilla-forwarded-by";

/// Longest the ingress waits for another node's response headers.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers of one connection, not of the request (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// What the ingress needs besides the routes: this node's name, the client that passes
/// requests on, and the metrics.
pub(crate) struct Ingress {
    routes: HttpRoutes,
    metrics: HttpMetrics,
    node_name: Arc<str>,
    client: Client<HttpConnector, Incoming>,
}

impl Ingress {
    /// An ingress over `routes`, on the node `node_name`.
    pub(crate) fn new(routes: HttpRoutes, metrics: HttpMetrics, node_name: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            routes,
            metrics,
            node_name: node_name.into(),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector),
        }
    }
}

/// Ingress settings.
#[derive(Clone, Debug)]
pub struct IngressConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The base URL the control plane shows for this node's ingress; default: derived from
    /// the bound address (the node name for an unspecified address).
    pub advertise_url: Option<String>,
}

/// Longest a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The URL the control plane is told: the configured one, or the bound address.
pub(crate) fn advertise_url(config: &IngressConfig, bound: SocketAddr, node_name: &str) -> String {
    if let Some(url) = &config.advertise_url {
        return url.trim_end_matches('/').to_string();
    }
    if bound.ip().is_unspecified() {
        format!("http://{node_name}:{}", bound.port())
    } else {
        format!("http://{bound}")
    }
}

/// Serves `listener` until `shutdown`, then drains in-flight requests for up to `grace`.
///
/// Everything runs on the runtime this is spawned on: the agent spawns it on the requests'
/// runtime, whose threads are latency-scheduled ([`crate::guests`]). The listener and every
/// connection register with that runtime's I/O driver, so no step of a request waits for a
/// thread of another runtime to be scheduled.
///
/// # Panics
/// Outside a tokio runtime.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    ingress: Ingress,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "the HTTP ingress cannot listen");
            return;
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Shared by every connection and request: one reference count per request.
    let ingress = Arc::new(ingress);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: back off rather than spin.
                    tracing::warn!(%error, "ingress cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Responses are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let ingress = ingress.clone();
        let service = service_fn(move |request| route(Arc::clone(&ingress), request));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let served = async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "ingress connection ended with an error");
            }
        };
        drop(tokio::spawn(served));
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("ingress drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "ingress requests still in flight after the grace period");
        }
    }
}

/// Routes one request.
async fn route(
    ingress: Arc<Ingress>,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<ResponseBody>, Infallible> {
    let arrived = Instant::now();
    let host = request_host(&request);
    let forwardable = !request.headers().contains_key(FORWARDED_BY);
    match ingress
        .routes
        .dispatch(host, request.uri().path(), forwardable)
    {
        Dispatch::Forward { workload, endpoint } => {
            ingress.metrics.forwarded(&workload);
            Ok(forward(&ingress, request, &endpoint).await)
        }
        Dispatch::Serve(pool, permit) => {
            let metrics = pool.metrics().clone();
            let response = pool.handle(request, permit).await;
            metrics.responded(response.status().as_u16(), arrived.elapsed());
            Ok(response)
        }
        Dispatch::Busy(pool) => {
            pool.metrics().responded(503, arrived.elapsed());
            Ok(busy_response(format!(
                "workload {} is serving its limit of {} concurrent requests per replica; try \
                 again shortly\n",
                pool.workload(),
                pool.max_concurrency()
            )))
        }
        Dispatch::NotFound => Ok(text_response(
            404,
            &format!(
                "no workload on this node serves host {host:?} and path {:?}\n",
                request.uri().path()
            ),
        )),
    }
}

/// Passes `request` on to the ingress at `endpoint` and relays its response.
async fn forward(
    ingress: &Ingress,
    mut request: hyper::Request<Incoming>,
    endpoint: &str,
) -> hyper::Response<ResponseBody> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let uri = match format!("{endpoint}{path}").parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(error) => return text_response(502, &format!("bad upstream {endpoint}: {error}\n")),
    };
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    let headers = request.headers_mut();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Ok(node) = http::HeaderValue::from_str(&ingress.node_name) {
        headers.insert(FORWARDED_BY, node);
    }
    let response =
        match tokio::time::timeout(FORWARD_TIMEOUT, ingress.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                return text_response(
                    502,
                    &format!("passing the request to {endpoint} failed: {error}\n"),
                );
            }
            Err(_) => {
                return text_response(
                    504,
                    &format!("{endpoint} did not answer within {FORWARD_TIMEOUT:?}\n"),
                );
            }
        };
    let (mut parts, body) = response.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    if let Ok(via) = http::HeaderValue::from_str(&format!("1.1 {}", ingress.node_name)) {
        parts.headers.append(http::header::VIA, via);
    }
    let body = body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync();
    hyper::Response::from_parts(parts, body)
}

/// The request's host without its port: the URI's authority (HTTP/2) or the Host header.
fn request_host<B>(request: &hyper::Request<B>) -> &str {
    let authority = request.uri().host().or_else(|| {
        request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let host = authority.unwrap_or_default();
    // Strip a port, keeping IPv6 literals ("[::1]:8080") whole.
    match host.rfind(':') {
        Some(colon) if !host[colon..].contains(']') => &host[..colon],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(uri: &str, header: Option<&str>) -> String {
        let mut builder = hyper::Request::builder().uri(uri);
        if let Some(header) = header {
            builder = builder.header("host", header);
        }
        let request = builder.body(()).expect("request");
        request_host(&request).to_string()
    }

    #[test]
    fn host_comes_from_the_authority_or_the_host_header_without_port() {
        assert_eq!(
            host_of("/x", Some("hello.example.com:8080")),
            "hello.example.com"
        );
        assert_eq!(
            host_of("/x", Some("hello.example.com")),
            "hello.example.com"
        );
        assert_eq!(
            host_of("http://a.example/x", Some("b.example")),
            "a.example"
        );
        assert_eq!(host_of("/x", Some("[::1]:8080")), "[::1]");
        assert_eq!(host_of("/x", Some("[::1]")), "[::1]");
        assert_eq!(host_of("/x", None), "");
    }

    #[test]
    fn advertised_url_prefers_the_flag_then_the_bound_address() {
        let config = IngressConfig {
            listen: "0.0.0.0:8080".parse().expect("addr"),
            advertise_url: None,
        };
        let any: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        assert_eq!(advertise_url(&config, any, "node-a"), "http://node-a:8080");
        assert_eq!(
            advertise_url(&config, local, "node-a"),
            "http://127.0.0.1:9000"
        );
        let config = IngressConfig {
            advertise_url: Some("http://10.0.0.7:8080/".into()),
            ..config
        };
        assert_eq!(
            advertise_url(&config, any, "node-a"),
            "http://10.0.0.7:8080"
        );
    }
}
