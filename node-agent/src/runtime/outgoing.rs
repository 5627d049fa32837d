//! Outgoing HTTP requests of guests (`wasi:http/outgoing-handler`), sent by the agent under the
//! workload's [`EgressPolicy`].
//!
//! wasmtime's own sender connects to whatever the guest names. This one asks the policy for
//! the addresses it may connect to (after name resolution, so a name cannot be re-pointed
//! between check and connect), connects to those and only those, speaks TLS with the name
//! the guest asked for (webpki's public roots), and then HTTP/1.1 over hyper. Redirects are
//! the guest's to follow: each is a new request, checked again.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::egress::{EgressPolicy, Refusal};
use super::logs::LogBuffer;
use flotilla_proto::agent::v1::LogStream;

/// Timeouts of a request whose guest sets none, as wasmtime's sender has them.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The `wasi:http` hooks of one sandbox: its requests go out under `policy`, or not at all,
/// and each refusal is a line in the sandbox's log.
pub(super) struct EgressHooks {
    policy: Option<EgressPolicy>,
    logs: Arc<LogBuffer>,
}

// === impl EgressHooks ===

impl EgressHooks {
    /// Hooks that send under `policy` (`None` refuses every request), telling `logs` why a
    /// request was refused.
    pub(super) fn new(policy: Option<EgressPolicy>, logs: Arc<LogBuffer>) -> Self {
        Self { policy, logs }
    }
}

/// What [`WasiHttpHooks::send_request`] returns: the response, and the connection's remaining
/// work.
type Sent = Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), Error>> + Send>,
)>;
type Result<T, E = Error> = std::result::Result<T, E>;

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        // The guest's response-processing result: nothing to do with it here.
        drop(fut);
        let policy = self.policy.clone();
        let logs = self.logs.clone();
        Box::new(async move { send(policy, &logs, request, options.unwrap_or_default()).await })
    }
}

/// Sends `request` to an address `policy` allows.
async fn send(
    policy: Option<EgressPolicy>,
    logs: &LogBuffer,
    mut request: http::Request<WasiBody>,
    options: RequestOptions,
) -> Sent {
    let uri = request.uri();
    let tls = uri.scheme() == Some(&Scheme::HTTPS);
    let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let Some(policy) = policy else {
        logs.write(
            LogStream::Stderr,
            format!("flotilla: egress refused: {host}:{port}: spec.network.egress lists nothing\n")
                .as_bytes(),
        );
        return Err(Error::HttpRequestDenied);
    };
    let addrs = policy.resolve(&host, port).await.map_err(|refusal| {
        logs.write(
            LogStream::Stderr,
            format!("flotilla: egress refused: {refusal}\n").as_bytes(),
        );
        match refusal {
            Refusal::NotListed { .. } => Error::HttpRequestDenied,
            Refusal::Denied { .. } | Refusal::Private { .. } => Error::DestinationIpProhibited,
            Refusal::Lookup { message, .. } => Error::DnsError {
                rcode: Some(message),
                info_code: None,
            },
        }
    })?;
    let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_TIMEOUT);
    let stream = tokio::time::timeout(connect_timeout, connect(&addrs))
        .await
        .map_err(|_| Error::ConnectionTimeout)??;
    let io: Box<dyn Io> = if tls {
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|_| Error::HttpRequestUriInvalid)?;
        let tls = tokio::time::timeout(connect_timeout, TLS.connect(name, stream))
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(stream)
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(Error::from)?;
    // The request line carries the path only; `Host` was set from the authority already.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    *request.uri_mut() = path;

    let mut connection = Box::pin(connection);
    let first_byte = options.first_byte_timeout.unwrap_or(DEFAULT_TIMEOUT);
    let response = tokio::time::timeout(first_byte, async {
        let mut response = std::pin::pin!(sender.send_request(request));
        tokio::select! {
            response = &mut response => response.map_err(Error::from).map(|r| (r, false)),
            // The connection must be driven for the response to arrive; it may also end first.
            ended = &mut connection => {
                ended.map_err(Error::from)?;
                response.await.map_err(Error::from).map(|r| (r, true))
            }
        }
    })
    .await
    .map_err(|_| Error::ConnectionReadTimeout)??;
    let (response, connection_ended) = response;
    let between_bytes = options.between_bytes_timeout.unwrap_or(DEFAULT_TIMEOUT);
    let response = response.map(|incoming| TimedBody::new(incoming, between_bytes).boxed_unsync());
    let rest: Box<dyn Future<Output = Result<(), Error>> + Send> = if connection_ended {
        Box::new(async { Ok(()) })
    } else {
        Box::new(async move { connection.await.map_err(Error::from) })
    };
    Ok((response, rest))
}

/// A connection to the first of `addrs` that answers.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Requests are small and latency-bound, as in wasmtime's sender.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
        Some(e) => Error::Connect(e),
        None => Error::DestinationNotFound,
    })
}

/// The process's TLS client for guests: rustls on ring, webpki's roots, HTTP/1.1.
static TLS: LazyLock<tokio_rustls::TlsConnector> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
});

/// A plain or TLS connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A response body that fails when no frame arrives for `timeout`
/// (`between-bytes-timeout`).
struct TimedBody {
    incoming: Incoming,
    timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

// === impl TimedBody ===

impl TimedBody {
    fn new(incoming: Incoming, timeout: Duration) -> Self {
        Self {
            incoming,
            timeout,
            idle: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Error::from)))
            }
            Poll::Pending => {
                ready!(this.idle.as_mut().poll(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
