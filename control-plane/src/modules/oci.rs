//! Modules from OCI registries: `oci://registry/repository@sha256:...` (or `:tag`), the wasm
//! artifact format of runwasi, SpinKube and `wasm-to-oci`: an OCI image manifest whose layer of
//! type [`WASM_LAYER_MEDIA_TYPES`] is the module itself.
//!
//! The manifest is pulled first (and checked against the reference's digest, when it has one);
//! the wasm layer's descriptor must carry the digest `spec.module.sha256` pins and a size within
//! the limit before a byte of it is downloaded, and the blob is bounded by that limit while it
//! streams and checked against its digest once it has arrived. Registries on loopback are spoken to over plain HTTP, as Docker and containerd treat
//! `127.0.0.0/8`; every other registry over HTTPS. Pulls are anonymous (public artifacts).

use std::net::IpAddr;
use std::time::Duration;

use flotilla_model::module::{self, Download, ModuleCheckError};
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// Media types of a wasm module layer: the CNCF wasm OCI artifact layer and `application/wasm`.
pub(crate) const WASM_LAYER_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/wasm",
];

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
    /// The registry refused or failed the request.
    #[error("pulling {reference}")]
    Pull {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: oci_client::errors::OciDistributionError,
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
    /// The layer's transfer failed.
    #[error("pulling the wasm layer of {reference}")]
    Blob {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: std::io::Error,
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

/// Pulls the module `sha256` from the OCI artifact at `url` (`oci://...`).
///
/// # Errors
/// See [`OciError`]; nothing is returned unless the layer matches `sha256`.
pub(crate) async fn pull(
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
    tokio::time::timeout(timeout, pull_reference(&reference, sha256, max_bytes))
        .await
        .unwrap_or(Err(OciError::Timeout {
            reference: shown,
            timeout,
        }))
}

async fn pull_reference(
    reference: &Reference,
    sha256: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, OciError> {
    let shown = reference.whole();
    let pull_error = |source| OciError::Pull {
        reference: shown.clone(),
        source,
    };
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_loopback(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    super::fetch::install_crypto_provider();
    let client = Client::new(ClientConfig {
        protocol,
        ..ClientConfig::default()
    });
    let (manifest, _digest) = client
        .pull_image_manifest(reference, &RegistryAuth::Anonymous)
        .await
        .map_err(pull_error)?;
    let layer = manifest
        .layers
        .iter()
        .find(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
        .ok_or_else(|| OciError::NoWasmLayer {
            reference: shown.clone(),
            found: manifest
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
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
    let mut blob = client
        .pull_blob_stream(reference, layer)
        .await
        .map_err(pull_error)?;
    if let Some(length) = blob.content_length {
        module::check_size(length, max_bytes).map_err(refused)?;
    }
    while let Some(chunk) = blob.stream.next().await {
        let chunk = chunk.map_err(|source| OciError::Blob {
            reference: shown.clone(),
            source,
        })?;
        download.push(&chunk).map_err(refused)?;
    }
    let (bytes, _digest) = download.finish(Some(sha256)).map_err(refused)?;
    Ok(bytes)
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
        assert!(matches!(err, OciError::Pull { .. }), "{err}");
        let err = pull("oci://UPPER CASE/x", &sha(WASM), LIMIT, TIMEOUT)
            .await
            .expect_err("not a reference");
        assert!(matches!(err, OciError::Reference { .. }), "{err}");
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
