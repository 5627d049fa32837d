//! Modules from OCI registries: `oci://registry/repository@sha256:...` (or `:tag`), the wasm
//! artifact format of runwasi, SpinKube and `wasm-to-oci`: an OCI image manifest whose layer of
//! type [`WASM_LAYER_MEDIA_TYPES`] is the module itself.
//!
//! Spoken over the distribution API on the module fetcher's own HTTP client, so that every
//! connection, redirect and token request passes the [`FetchGuard`], and every answer is
//! bounded while it streams: the manifest (4 MiB, as containerd) is checked against the
//! reference's digest when it has one; the wasm layer's descriptor must carry the digest
//! `spec.module.sha256` pins and a size within the limit before a byte of it is downloaded,
//! and the blob is bounded by that limit while it streams and checked against its digest once
//! it has arrived. Registries on loopback are spoken to over plain HTTP, as Docker and
//! containerd treat `127.0.0.0/8`; every other registry over HTTPS. Pulls are anonymous
//! (public artifacts), with the bearer token a registry hands out for them.

use std::net::IpAddr;
use std::time::Duration;

use flotilla_model::module::{self, Download, ModuleCheckError};
use oci_client::Reference;
use oci_client::manifest::OciManifest;
use sha2::{Digest, Sha256};

use super::guard::{DeniedAddress, FetchGuard};

/// Media types of a wasm module layer: the CNCF wasm OCI artifact layer and `application/wasm`.
pub(crate) const WASM_LAYER_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/wasm",
];

/// Largest manifest (or token answer) read, as containerd bounds manifests: 4 MiB.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The manifest formats asked for: OCI and Docker image manifests, and indexes (refused with a
/// message naming the way out).
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json";

/// Why an OCI module could not be pulled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OciError {
    /// The reference does not parse.
    #[error("{url}: not an OCI reference")]
    Reference {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: oci_client::ParseError,
    },
    /// The registry is at an address the control plane may not reach.
    #[error("pulling {reference}")]
    Denied {
        /// The reference.
        reference: String,
        /// The denied range.
        #[source]
        source: DeniedAddress,
    },
    /// The registry could not be reached, or the transfer failed.
    #[error("pulling {reference}: {what}")]
    Request {
        /// The reference.
        reference: String,
        /// What was being fetched.
        what: &'static str,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error("pulling {reference}: the registry answered {status} for the {what}")]
    Status {
        /// The reference.
        reference: String,
        /// What was being fetched.
        what: &'static str,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// The manifest (or the registry's token answer) is too large, malformed, an index, or not
    /// the one the reference's digest pins.
    #[error("pulling {reference}: {message}")]
    Manifest {
        /// The reference.
        reference: String,
        /// What is wrong with it.
        message: String,
    },
    /// The manifest has no wasm layer.
    #[error("{reference}: the artifact has no wasm layer (layer media types: {found})")]
    NoWasmLayer {
        /// The reference.
        reference: String,
        /// The layer media types it has.
        found: String,
    },
    /// The wasm layer is over the size limit, not binary wasm, or not the module the manifest
    /// pins; its descriptor is checked before a byte of it is downloaded, and the blob as it
    /// arrives.
    #[error("{reference}: its wasm layer is refused")]
    Refused {
        /// The reference.
        reference: String,
        /// What is wrong with the layer.
        #[source]
        source: ModuleCheckError,
    },
    /// The pull took longer than the timeout.
    #[error("pulling {reference}: no answer within {timeout:?}")]
    Timeout {
        /// The reference.
        reference: String,
        /// The timeout.
        timeout: Duration,
    },
}

/// Pulls the module `sha256` from the OCI artifact at `url` (`oci://...`) with `client`, whose
/// resolver and redirects `guard` checks, within `max_bytes` and `timeout`.
///
/// # Errors
/// See [`OciError`]; nothing is returned unless the layer matches `sha256`.
pub(crate) async fn pull(
    client: &reqwest::Client,
    guard: &FetchGuard,
    url: &str,
    sha256: &str,
    max_bytes: u64,
    timeout: Duration,
) -> Result<Vec<u8>, OciError> {
    let text = url.strip_prefix("oci://").unwrap_or(url);
    let reference: Reference = text.parse().map_err(|source| OciError::Reference {
        url: url.to_string(),
        source,
    })?;
    let shown = reference.whole();
    let mut registry = Registry::new(client, guard, &reference);
    tokio::time::timeout(timeout, registry.pull(&reference, sha256, max_bytes))
        .await
        .unwrap_or(Err(OciError::Timeout {
            reference: shown,
            timeout,
        }))
}

/// One repository of one registry, spoken to over the distribution API, anonymously (with a
/// bearer token when the registry asks for one, as for public images on Docker Hub or GHCR).
struct Registry<'a> {
    client: &'a reqwest::Client,
    guard: &'a FetchGuard,
    /// `http(s)://host[:port]/v2/<repository>`.
    base: String,
    repository: String,
    shown: String,
    token: Option<String>,
}

impl<'a> Registry<'a> {
    fn new(client: &'a reqwest::Client, guard: &'a FetchGuard, reference: &Reference) -> Self {
        let host = reference.resolve_registry();
        // Registries on loopback speak plain HTTP, as Docker and containerd treat 127.0.0.0/8.
        let scheme = if is_loopback(host) { "http" } else { "https" };
        Self {
            client,
            guard,
            base: format!("{scheme}://{host}/v2/{}", reference.repository()),
            repository: reference.repository().to_string(),
            shown: reference.whole(),
            token: None,
        }
    }

    async fn pull(
        &mut self,
        reference: &Reference,
        sha256: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, OciError> {
        let name = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let response = self
            .get(&format!("manifests/{name}"), MANIFEST_ACCEPT, "manifest")
            .await?;
        let bytes = read_bounded(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|message| self.manifest_error(format!("manifest: {message}")))?;
        if let Some(pinned) = reference.digest() {
            let got = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            if got != pinned {
                return Err(
                    self.manifest_error(format!("the registry sent manifest {got}, not {pinned}"))
                );
            }
        }
        let manifest = match serde_json::from_slice::<OciManifest>(&bytes) {
            Ok(OciManifest::Image(image)) => image,
            Ok(OciManifest::ImageIndex(_)) => {
                return Err(self.manifest_error(
                    "an image index, not an artifact manifest; name the wasm artifact's \
                     manifest by its digest"
                        .into(),
                ));
            }
            Err(e) => return Err(self.manifest_error(format!("manifest: {e}"))),
        };
        let layer = manifest
            .layers
            .iter()
            .find(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
            .ok_or_else(|| OciError::NoWasmLayer {
                reference: self.shown.clone(),
                found: manifest
                    .layers
                    .iter()
                    .map(|l| l.media_type.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let shown = self.shown.clone();
        let refused = |source| OciError::Refused {
            reference: shown.clone(),
            source,
        };
        // The descriptor is checked before a byte of the layer is downloaded.
        let layer_digest = layer
            .digest
            .strip_prefix("sha256:")
            .unwrap_or(&layer.digest);
        module::check_digest(Some(sha256), layer_digest.to_string()).map_err(refused)?;
        // A negative size is no size: refused as the largest.
        let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
        let mut download = Download::new(max_bytes, Some(size)).map_err(refused)?;
        let mut blob = self
            .get(
                &format!("blobs/{}", layer.digest),
                "application/octet-stream",
                "wasm layer",
            )
            .await?;
        if let Some(length) = blob.content_length() {
            module::check_size(length, max_bytes).map_err(refused)?;
        }
        while let Some(chunk) = blob.chunk().await.map_err(|source| OciError::Request {
            reference: self.shown.clone(),
            what: "wasm layer",
            source,
        })? {
            download.push(&chunk).map_err(refused)?;
        }
        let (bytes, _digest) = download.finish(Some(sha256)).map_err(refused)?;
        Ok(bytes)
    }

    /// `GET <base>/<path>`, with a bearer token once the registry has asked for one.
    async fn get(
        &mut self,
        path: &str,
        accept: &str,
        what: &'static str,
    ) -> Result<reqwest::Response, OciError> {
        let url = format!("{}/{path}", self.base);
        for attempt in 0..2 {
            let parsed =
                reqwest::Url::parse(&url).map_err(|e| self.manifest_error(e.to_string()))?;
            self.guard
                .check_url(&parsed)
                .map_err(|source| OciError::Denied {
                    reference: self.shown.clone(),
                    source,
                })?;
            let mut request = self
                .client
                .get(parsed)
                .header(reqwest::header::ACCEPT, accept);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.map_err(|source| OciError::Request {
                reference: self.shown.clone(),
                what,
                source,
            })?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 && self.token.is_none() {
                let challenge = response
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Some(challenge) = challenge {
                    self.token = Some(self.fetch_token(&challenge).await?);
                    continue;
                }
            }
            if !status.is_success() {
                return Err(OciError::Status {
                    reference: self.shown.clone(),
                    what,
                    status,
                });
            }
            return Ok(response);
        }
        Err(OciError::Status {
            reference: self.shown.clone(),
            what,
            status: reqwest::StatusCode::UNAUTHORIZED,
        })
    }

    /// An anonymous pull token from the realm of a `Bearer` challenge.
    async fn fetch_token(&self, challenge: &str) -> Result<String, OciError> {
        let params = parse_bearer_challenge(challenge)
            .ok_or_else(|| self.manifest_error(format!("unsupported challenge {challenge:?}")))?;
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| self.manifest_error("a Bearer challenge without a realm".into()))?;
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| self.manifest_error(format!("token realm {realm:?}: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
                query.append_pair("service", service);
            }
            let scope = params.iter().find(|(k, _)| k == "scope").map_or_else(
                || format!("repository:{}:pull", self.repository),
                |(_, v)| v.clone(),
            );
            query.append_pair("scope", &scope);
        }
        self.guard
            .check_url(&url)
            .map_err(|source| OciError::Denied {
                reference: self.shown.clone(),
                source,
            })?;
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|source| OciError::Request {
                reference: self.shown.clone(),
                what: "pull token",
                source,
            })?;
        if !response.status().is_success() {
            return Err(OciError::Status {
                reference: self.shown.clone(),
                what: "pull token",
                status: response.status(),
            });
        }
        let body = read_bounded(response, 64 << 10)
            .await
            .map_err(|message| self.manifest_error(format!("pull token: {message}")))?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: Token = serde_json::from_slice(&body)
            .map_err(|e| self.manifest_error(format!("pull token: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| self.manifest_error("the token answer holds no token".into()))
    }

    fn manifest_error(&self, message: String) -> OciError {
        OciError::Manifest {
            reference: self.shown.clone(),
            message,
        }
    }
}

/// The body of `response`, refused past `max` bytes (declared or sent).
async fn read_bounded(mut response: reqwest::Response, max: u64) -> Result<Vec<u8>, String> {
    let too_large = || format!("larger than {max} bytes");
    if response.content_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() as u64 + chunk.len() as u64 > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The parameters of a `Bearer k="v",...` challenge (RFC 6750), `None` for another scheme.
fn parse_bearer_challenge(header: &str) -> Option<Vec<(String, String)>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.push((key.trim().to_ascii_lowercase(), value.to_string()));
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    Some(params)
}

/// Whether a registry (`host[:port]`) is on loopback.
fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(host, port)| !host.is_empty() && port.chars().all(|c| c.is_ascii_digit()))
        .map_or(registry, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use flotilla_tests::registry::{FakeRegistry, digest};

    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0";
    const LIMIT: u64 = 1 << 20;
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The fetcher's client with loopback allowed (the fake registries live there).
    fn client() -> (reqwest::Client, FetchGuard) {
        let guard = FetchGuard::new(["169.254.0.0/16".parse().expect("range")]);
        super::super::fetch::install_crypto_provider();
        let client = guard.client_builder().build().expect("client");
        (client, guard)
    }

    async fn pull(
        url: &str,
        sha256: &str,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, OciError> {
        let (client, guard) = client();
        super::pull(&client, &guard, url, sha256, max_bytes, timeout).await
    }

    fn sha(bytes: &[u8]) -> String {
        digest(bytes).trim_start_matches("sha256:").to_string()
    }

    #[tokio::test]
    async fn pulls_the_wasm_layer_by_digest_and_by_tag() {
        let registry = FakeRegistry::start().await;
        let manifest = registry.push_wasm("flotilla/hello", "v1", WASM);
        let by_digest = format!("oci://{}/flotilla/hello@{manifest}", registry.host());
        assert_eq!(
            pull(&by_digest, &sha(WASM), LIMIT, TIMEOUT)
                .await
                .expect("pull"),
            WASM
        );
        let by_tag = format!("oci://{}/flotilla/hello:v1", registry.host());
        assert_eq!(
            pull(&by_tag, &sha(WASM), LIMIT, TIMEOUT)
                .await
                .expect("pull"),
            WASM
        );
    }

    #[tokio::test]
    async fn refuses_what_the_manifest_does_not_pin() {
        let registry = FakeRegistry::start().await;
        let host = registry.host();
        registry.push_wasm("flotilla/hello", "v1", WASM);
        registry.push(
            "flotilla/image",
            "v1",
            &[("application/vnd.oci.image.layer.v1.tar", b"tar")],
        );
        let url = format!("oci://{host}/flotilla/hello:v1");

        let err = pull(&url, &"0".repeat(64), LIMIT, TIMEOUT)
            .await
            .expect_err("other digest");
        assert!(
            matches!(
                err,
                OciError::Refused {
                    source: ModuleCheckError::DigestMismatch { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = pull(&url, &sha(WASM), 4, TIMEOUT)
            .await
            .expect_err("over the limit");
        assert!(
            matches!(
                err,
                OciError::Refused {
                    source: ModuleCheckError::TooLarge { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = pull(
            &format!("oci://{host}/flotilla/image:v1"),
            &sha(WASM),
            LIMIT,
            TIMEOUT,
        )
        .await
        .expect_err("no wasm layer");
        assert!(
            err.to_string()
                .contains("application/vnd.oci.image.layer.v1.tar"),
            "{err}"
        );
        let err = pull(
            &format!("oci://{host}/flotilla/missing:v1"),
            &sha(WASM),
            LIMIT,
            TIMEOUT,
        )
        .await
        .expect_err("unknown repository");
        assert!(
            matches!(
                err,
                OciError::Status {
                    status: reqwest::StatusCode::NOT_FOUND,
                    ..
                }
            ),
            "{err}"
        );
        let err = pull("oci://UPPER CASE/x", &sha(WASM), LIMIT, TIMEOUT)
            .await
            .expect_err("not a reference");
        assert!(matches!(err, OciError::Reference { .. }), "{err}");
    }

    #[tokio::test]
    async fn anonymous_pulls_take_the_token_the_registry_hands_out() {
        let registry = FakeRegistry::start().await;
        registry.push_wasm("flotilla/hello", "v1", WASM);
        registry.require_token("t0k3n");
        let url = format!("oci://{}/flotilla/hello:v1", registry.host());
        assert_eq!(
            pull(&url, &sha(WASM), LIMIT, TIMEOUT).await.expect("pull"),
            WASM
        );
    }

    #[tokio::test]
    async fn a_manifest_that_never_ends_is_cut_at_its_bound() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A registry that streams one manifest forever, in chunks, without a length.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let host = listener.local_addr().expect("addr");
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = sent.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
                while stream.write_all(chunk.as_bytes()).await.is_ok() {
                    counted.fetch_add(0x10000, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        let url = format!("oci://{host}/flotilla/endless:v1");
        let err = pull(&url, &sha(WASM), LIMIT, TIMEOUT)
            .await
            .expect_err("cut");
        assert!(
            err.to_string().contains("larger than 4194304 bytes"),
            "{err}"
        );
        // Refused at the bound, not after the whole timeout's worth of bytes.
        let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < 64 << 20, "{sent} bytes read");
        server.abort();
    }

    #[tokio::test]
    async fn registries_at_denied_addresses_are_not_contacted() {
        let registry = FakeRegistry::start().await;
        registry.push_wasm("flotilla/hello", "v1", WASM);
        let strict = FetchGuard::defaults();
        super::super::fetch::install_crypto_provider();
        let client = strict.client_builder().build().expect("client");
        for url in [
            format!("oci://{}/flotilla/hello:v1", registry.host()),
            "oci://169.254.169.254/latest/meta-data:v1".to_string(),
        ] {
            let err = super::pull(&client, &strict, &url, &sha(WASM), LIMIT, TIMEOUT)
                .await
                .expect_err("denied");
            assert!(matches!(err, OciError::Denied { .. }), "{url}: {err}");
        }
    }

    #[test]
    fn bearer_challenges_parse() {
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull""#
            ),
            Some(vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/x:pull".into()),
            ])
        );
        assert_eq!(parse_bearer_challenge("Basic realm=\"x\""), None);
    }

    #[test]
    fn loopback_registries_are_recognised() {
        for registry in [
            "localhost:5000",
            "127.0.0.1:5001",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(registry), "{registry}");
        }
        for registry in ["ghcr.io", "registry.example.com:5000", "10.0.0.1:5000"] {
            assert!(!is_loopback(registry), "{registry}");
        }
    }
}
