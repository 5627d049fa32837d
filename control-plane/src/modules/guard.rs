//! [`FetchGuard`]: the addresses module downloads (`spec.module.url`, OCI pulls, registry
//! token requests) may not reach (`--fetch-deny`).
//!
//! A URL is the tenant's to write, so without a guard the control plane would GET whatever it
//! names: the cloud metadata address, its own pod's ports, a node's kubelet. The guard sits in
//! the HTTP client itself: its resolver drops denied addresses from every name lookup (so a
//! name cannot be re-pointed between a check and the connect), address literals are checked
//! before a request is sent, and every redirect is checked again before it is followed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use flotilla_model::network::{DeniedRanges, canonical_ip};
use ipnet::IpNet;

/// Redirects one download may follow, as browsers and reqwest allow.
const MAX_REDIRECTS: usize = 10;
/// How long one name lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Address ranges module downloads may not reach. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FetchGuard {
    denied: DeniedRanges,
}

/// A download refused because of where it would connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{addr} is in the control plane's denied range {range} (--fetch-deny)")]
pub struct DeniedAddress {
    /// The address.
    pub addr: IpAddr,
    /// The denied range holding it.
    pub range: IpNet,
}

// === impl FetchGuard ===

impl FetchGuard {
    /// A guard denying `ranges`.
    pub fn new(ranges: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            denied: DeniedRanges::new(ranges),
        }
    }

    /// A guard denying [`DEFAULT_DENIED_RANGES`](flotilla_model::network::DEFAULT_DENIED_RANGES):
    /// loopback, link-local (cloud metadata), multicast.
    pub fn defaults() -> Self {
        Self {
            denied: DeniedRanges::defaults(),
        }
    }

    /// Whether downloads may connect to `ip`.
    ///
    /// # Errors
    /// The denied range that holds it.
    pub fn check(&self, ip: IpAddr) -> Result<(), DeniedAddress> {
        match self.denied.holding(ip) {
            Some(range) => Err(DeniedAddress {
                addr: canonical_ip(ip),
                range,
            }),
            None => Ok(()),
        }
    }

    /// Whether a request to `url` may be sent: its host, when it is an address literal (names
    /// are checked by the resolver as they resolve).
    ///
    /// # Errors
    /// The denied range that holds the address.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), DeniedAddress> {
        let host = url.host_str().unwrap_or_default();
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }

    /// An HTTP client builder whose every connection and redirect this guard checks.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let guard = self.clone();
        reqwest::Client::builder()
            .dns_resolver(GuardedResolver(self.clone()))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match guard.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(denied) => attempt.error(denied),
                }
            }))
    }
}

impl Default for FetchGuard {
    fn default() -> Self {
        Self::defaults()
    }
}

/// The system resolver, without the denied addresses; a name with nothing else is an error.
struct GuardedResolver(FetchGuard);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0)))
                    .await
                    .map_err(|_| format!("{host}: no answer within {LOOKUP_TIMEOUT:?}"))??
                    .collect();
            let mut first_denied = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match guard.check(addr.ip()) {
                    Ok(()) => true,
                    Err(denied) => {
                        first_denied.get_or_insert(denied);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), first_denied) {
                (true, Some(denied)) => Err(format!("{host}: {denied}").into()),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_addresses_are_refused_however_they_are_written() {
        let guard = FetchGuard::defaults();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:7080/",
            "http://[::1]/",
            "http://[::ffff:169.254.169.254]/",
        ] {
            let url = reqwest::Url::parse(url).expect("url");
            assert!(guard.check_url(&url).is_err(), "{url}");
        }
        for url in ["https://ghcr.io/v2/", "http://10.0.0.7:5000/m.wasm"] {
            let url = reqwest::Url::parse(url).expect("url");
            assert_eq!(guard.check_url(&url), Ok(()), "{url}");
        }
    }

    #[tokio::test]
    async fn names_that_resolve_to_denied_addresses_fail_at_connect() {
        // A server on loopback: reachable by address literal or by `localhost` only when the
        // guard allows loopback.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let url = format!("http://localhost:{port}/m.wasm");

        let strict = FetchGuard::defaults()
            .client_builder()
            .build()
            .expect("client");
        let error = strict.get(&url).send().await.expect_err("denied");
        let chain = flotilla_telemetry::error_chain(&error);
        assert!(chain.contains("denied range 127.0.0.0/8"), "{chain}");

        // Loopback allowed: the request goes out, and the redirect to the metadata address is
        // refused before it is followed.
        let loose = FetchGuard::new(["169.254.0.0/16".parse().expect("range")])
            .client_builder()
            .build()
            .expect("client");
        let error = loose.get(&url).send().await.expect_err("redirect denied");
        let chain = flotilla_telemetry::error_chain(&error);
        assert!(chain.contains("denied range 169.254.0.0/16"), "{chain}");
        server.abort();
    }
}
