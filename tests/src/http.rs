//! A minimal HTTP/1.1 client for the ingress tests: one connection per request, on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// A response read to its end.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Longest a test waits for a whole response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `method path` with `Host: host` and `body` to `addr`, and reads the whole response.
///
/// # Errors
/// Fails when the connection or the exchange fails, or takes longer than [`RESPONSE_TIMEOUT`].
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> anyhow::Result<Response> {
    let exchange = async {
        let mut sender = connect(addr).await?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .body(Full::new(body.into()))?;
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
        .await
        .context("no whole response in time")?
}

/// `GET path` with the address as the host.
///
/// # Errors
/// As [`request`].
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    request(addr, "GET", &addr.to_string(), path, Bytes::new()).await
}

/// An HTTP/1.1 connection to `addr`, for requests whose bodies the test streams itself.
///
/// # Errors
/// Fails when the connection or the handshake fails.
pub async fn connect<B>(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}
