//! How every Flotilla gRPC server accepts its connections.

use tonic::transport::server::TcpIncoming;

/// The connections accepted on `listener`, with Nagle's algorithm off (`TCP_NODELAY`).
///
/// tonic sets it on the listeners it binds itself, not on one handed to
/// `serve_with_incoming`. Without it, a message written in two segments waits for the peer's
/// delayed ACK before its second one goes out: 40 ms on Linux, on every watch event, status
/// report and desired state that happens to be split.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connecting");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("reading TCP_NODELAY"));
    }
}
