//! A fake OCI registry for tests: the pull side of the OCI distribution API over real HTTP on
//! loopback (`/v2/`, manifests by tag or digest, blobs by digest), holding wasm artifacts in the
//! layout runwasi and SpinKube use: an image manifest with a `application/vnd.wasm.config.v0+json`
//! config and one `application/vnd.wasm.content.layer.v1+wasm` layer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode, header};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A running fake registry; stops when dropped.
pub struct FakeRegistry {
    addr: SocketAddr,
    content: Arc<Mutex<Content>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Content {
    /// `repository/reference` (a tag or a digest) → manifest bytes.
    manifests: BTreeMap<String, Vec<u8>>,
    /// Digest → bytes.
    blobs: BTreeMap<String, Vec<u8>>,
    /// Set by [`FakeRegistry::require_token`]: (token realm URL, token).
    token: Option<(String, String)>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl FakeRegistry {
    /// Starts serving on a free loopback port.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start() -> Self {
        let content = Arc::new(Mutex::new(Content::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let server = crate::serve(listener, {
            let content = content.clone();
            move |request: Request<Body>| {
                let content = content.clone();
                async move { serve(&content, &request) }
            }
        });
        Self {
            addr,
            content,
            server,
        }
    }

    /// `host:port` of the registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Stores an artifact whose layers are `(media type, bytes)`, tagged `tag`; returns the
    /// manifest's digest.
    pub fn push(&self, repository: &str, tag: &str, layers: &[(&str, &[u8])]) -> String {
        let config = b"{}".to_vec();
        let descriptors: Vec<_> = layers
            .iter()
            .map(|(media_type, bytes)| {
                json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": "application/vnd.wasm.config.v0+json",
                "digest": digest(&config),
                "size": config.len(),
            },
            "layers": descriptors,
        })
        .to_string()
        .into_bytes();
        let manifest_digest = digest(&manifest);
        let mut content = self.content.lock().unwrap_or_else(|e| e.into_inner());
        content.blobs.insert(digest(&config), config);
        for (_, bytes) in layers {
            content.blobs.insert(digest(bytes), bytes.to_vec());
        }
        content
            .manifests
            .insert(format!("{repository}/{tag}"), manifest.clone());
        content
            .manifests
            .insert(format!("{repository}/{manifest_digest}"), manifest);
        manifest_digest
    }

    /// From now on, answers `401` with a `Bearer` challenge unless a request carries `token`,
    /// which `GET /token` hands out, as Docker Hub and GHCR do for anonymous pulls.
    pub fn require_token(&self, token: &str) {
        let realm = format!("http://{}/token", self.addr);
        self.content.lock().unwrap_or_else(|e| e.into_inner()).token =
            Some((realm, token.to_string()));
    }

    /// Stores a wasm module as an artifact; returns the manifest's digest.
    pub fn push_wasm(&self, repository: &str, tag: &str, module: &[u8]) -> String {
        self.push(
            repository,
            tag,
            &[("application/vnd.wasm.content.layer.v1+wasm", module)],
        )
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn serve(content: &Mutex<Content>, request: &Request<Body>) -> Response<Body> {
    let path = request.uri().path();
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "", Vec::new());
    }
    let token = content
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .token
        .clone();
    if let Some((realm, token)) = token {
        if path == "/token" {
            let answer = json!({ "token": token }).to_string().into_bytes();
            return respond(StatusCode::OK, "application/json", answer);
        }
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if presented != Some(&format!("Bearer {token}")) {
            let mut response = respond(StatusCode::UNAUTHORIZED, "", Vec::new());
            let challenge = format!("Bearer realm=\"{realm}\",service=\"fake-registry\"");
            if let Ok(value) = header::HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            return response;
        }
    }
    if path == "/v2/" || path == "/v2" {
        return respond(StatusCode::OK, "application/json", b"{}".to_vec());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return respond(StatusCode::NOT_FOUND, "", Vec::new());
    };
    let content = content.lock().unwrap_or_else(|e| e.into_inner());
    let found = if let Some((repository, reference)) = rest.split_once("/manifests/") {
        content
            .manifests
            .get(&format!("{repository}/{reference}"))
            .map(|m| (MANIFEST_MEDIA_TYPE, m.clone()))
    } else if let Some((_, blob)) = rest.split_once("/blobs/") {
        content
            .blobs
            .get(blob)
            .map(|b| ("application/octet-stream", b.clone()))
    } else {
        None
    };
    match found {
        Some((media_type, bytes)) => {
            let mut response = respond(StatusCode::OK, media_type, bytes.clone());
            if let Ok(value) = header::HeaderValue::from_str(&digest(&bytes)) {
                response
                    .headers_mut()
                    .insert("docker-content-digest", value);
            }
            if request.method() == Method::HEAD {
                *response.body_mut() = Body::empty();
            }
            response
        }
        None => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not found"}]}"#.to_vec(),
        ),
    }
}

fn respond(status: StatusCode, media_type: &str, body: Vec<u8>) -> Response<Body> {
    let length = body.len();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    if !media_type.is_empty()
        && let Ok(value) = header::HeaderValue::from_str(media_type)
    {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(length));
    response
}
