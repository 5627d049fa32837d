//! A fake Kubernetes API server for tests: real HTTP on a loopback socket, objects in memory.
//!
//! It serves the REST verbs that kube-rs clients, watchers and recorders use, for any resource
//! path (`/api/v1/...` and `/apis/{group}/{version}/...`, namespaced or cluster-scoped), with the
//! API server's semantics where Flotilla depends on them:
//!
//! - `resourceVersion` from one counter; a write naming a stale one fails with 409 `Conflict`.
//! - `metadata.generation` starts at 1 and grows when anything but `metadata` and `status` changes.
//! - Resources registered with [`FakeApiServer::with_status_subresource`] ignore `status` on the
//!   main resource and take only `status` on `/status`.
//! - `DELETE` of an object with finalizers sets `deletionTimestamp`; the object goes once an
//!   update empties its finalizers.
//! - Watches (`?watch=true`) replay history after the given `resourceVersion`, then stream live
//!   events; a version older than the retained history gets a 410 `Expired` error event.
//!   Streaming lists (`sendInitialEvents=true`) end their initial events with the marked
//!   bookmark that newer clients wait for.
//! - Patches: JSON merge patch and strategic merge patch (treated as merge patch), JSON patch,
//!   and server-side apply, approximated for one manager per field: each top-level field the
//!   applied object sets replaces the stored one (and `metadata.labels`, `annotations` and
//!   `finalizers` likewise). Managed fields are not tracked, so apply never conflicts.
//!
//! Discovery (`/api`, `/apis`, resource lists) covers built-in resources Flotilla touches and
//! the custom resources registered with [`FakeApiServer::with_crds_in`], so kubectl can talk to
//! it; `scale` subresources follow the CRD's replica paths. List and watch honour `key=value`
//! label selectors and `metadata.name`/`metadata.namespace` field selectors. OpenAPI v3
//! documents say only that every resource takes `fieldValidation` (so kubectl leaves
//! validation to the server); they hold no schemas. Tables (`kubectl get` columns) are not
//! served.
//!
//! TokenReviews and SubjectAccessReviews are answered from the users and rules given with
//! [`FakeApiServer::with_user`] and [`FakeApiServer::with_rule`].
//!
//! It does not validate objects against schemas. [`FakeApiServer::fail_next`] injects errors,
//! and [`FakeApiServer::requests`] records every request for assertions.

mod discovery;
mod reviews;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
pub use axum::http::Method;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Watch events kept for watchers that resume from an older `resourceVersion`.
const HISTORY: usize = 10_000;

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Query parameters.
    pub query: BTreeMap<String, String>,
    /// The `Content-Type` header, if any.
    pub content_type: String,
    /// The body, parsed as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

/// Where an object lives: its collection (`group/version/plural`), namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    collection: String,
    namespace: String,
    name: String,
}

#[derive(Clone)]
struct Change {
    version: u64,
    key: ObjectKey,
    kind: &'static str,
    object: Value,
}

struct Fault {
    method: Option<Method>,
    path_contains: String,
    code: u16,
    remaining: usize,
}

#[derive(Default)]
struct Store {
    version: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Change>,
    /// The oldest version a watch can resume from.
    compacted: u64,
}

struct State {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    status_subresources: Mutex<Vec<String>>,
    resources: Mutex<Vec<discovery::Resource>>,
    address: std::sync::OnceLock<String>,
    faults: Mutex<Vec<Fault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    reviews: Mutex<reviews::Reviews>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeApiServer {
    /// Starts serving on a free loopback port.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(HISTORY);
        let state = Arc::new(State {
            store: Mutex::new(Store::default()),
            changes,
            status_subresources: Mutex::new(Vec::new()),
            resources: Mutex::new(discovery::builtins()),
            address: std::sync::OnceLock::new(),
            faults: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            reviews: Mutex::new(reviews::Reviews::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let _ = state.address.set(addr.to_string());
        let server = crate::serve(listener, {
            let state = state.clone();
            move |request: Request<Body>| {
                let state = state.clone();
                async move { state.handle(request).await }
            }
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// Gives the resources with this plural name a status subresource, as their CRD would.
    #[must_use]
    pub fn with_status_subresource(self, plural: &str) -> Self {
        lock(&self.state.status_subresources).push(plural.to_string());
        self
    }

    /// Registers the custom resources of every CustomResourceDefinition (`*.yaml`) in `dir`:
    /// discovery lists them, and their status and scale subresources work as the CRDs say.
    ///
    /// # Panics
    /// If the directory or a file in it cannot be read or parsed.
    #[must_use]
    pub fn with_crds_in(self, dir: &std::path::Path) -> Self {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .expect("read the CRD directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read a CRD");
            let crd: Value = serde_yaml::from_str(&text).expect("parse a CRD");
            lock(&self.state.resources).extend(discovery::from_crd(&crd));
        }
        self
    }

    /// Makes `token` a user's credential: TokenReviews of it answer `name`, in `groups` and
    /// `system:authenticated`. Other tokens are not authenticated.
    #[must_use]
    pub fn with_user(self, token: &str, name: &str, groups: &[&str]) -> Self {
        lock(&self.state.reviews).add_user(token, name, groups);
        self
    }

    /// Lets `subject` (a user or group name) do `verbs` on `resources` (`group/plural`, or
    /// `group/plural/subresource`; the core group is empty: `/secrets`) in `namespace` (`"*"`:
    /// every namespace and cluster-wide), as a RoleBinding or ClusterRoleBinding would;
    /// SubjectAccessReviews allow what some such rule allows and nothing else.
    #[must_use]
    pub fn with_rule(
        self,
        subject: &str,
        verbs: &[&str],
        resources: &[&str],
        namespace: &str,
    ) -> Self {
        lock(&self.state.reviews).allow(subject, verbs, resources, namespace);
        self
    }

    /// The base URL, `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server, for processes under test.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    \
             namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// Makes the next `count` requests whose path contains `path_contains` (and whose method is
    /// `method`, if given) fail with `code`.
    pub fn fail_next(&self, method: Option<Method>, path_contains: &str, code: u16, count: usize) {
        lock(&self.state.faults).push(Fault {
            method,
            path_contains: path_contains.to_string(),
            code,
            remaining: count,
        });
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// The stored object at `path` (as a client would GET it), if any.
    pub fn object(&self, path: &str) -> Option<Value> {
        let route = Route::parse(path)?;
        let key = route.key()?;
        lock(&self.state.store).objects.get(&key).cloned()
    }

    /// Every stored object of the collection `path` (e.g. `/api/v1/namespaces/default/events`).
    pub fn objects(&self, path: &str) -> Vec<Value> {
        let Some(route) = Route::parse(path) else {
            return Vec::new();
        };
        lock(&self.state.store)
            .objects
            .iter()
            .filter(|(key, _)| route.matches_collection(key))
            .map(|(_, object)| object.clone())
            .collect()
    }
}

impl FakeApiServer {
    /// Creates the object in the collection `path`, or replaces the stored one's spec and
    /// labels, as `kubectl apply` would; returns the stored object or the error `Status`.
    ///
    /// # Errors
    /// The API error, as a `Status` object.
    pub async fn apply_object(&self, path: &str, object: Value) -> Result<Value, Value> {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let item = format!("{}/{name}", path.trim_end_matches('/'));
        match self.object(&item) {
            None => {
                self.request(Method::POST, path, "application/json", object)
                    .await
            }
            Some(mut existing) => {
                existing["spec"] = object["spec"].clone();
                existing["metadata"]["labels"] = object["metadata"]["labels"].clone();
                self.request(Method::PUT, &item, "application/json", existing)
                    .await
            }
        }
    }

    /// Applies a JSON merge patch to the object at `path`, as `kubectl patch --type merge`.
    ///
    /// # Errors
    /// The API error, as a `Status` object.
    pub async fn patch_object(&self, path: &str, patch: Value) -> Result<Value, Value> {
        self.request(Method::PATCH, path, "application/merge-patch+json", patch)
            .await
    }

    /// Deletes the object at `path`, as `kubectl delete`.
    ///
    /// # Errors
    /// The API error, as a `Status` object.
    pub async fn delete_object(&self, path: &str) -> Result<Value, Value> {
        self.request(Method::DELETE, path, "", Value::Null).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Value,
    ) -> Result<Value, Value> {
        let mut request = Request::builder().method(method).uri(path);
        if !content_type.is_empty() {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let request = request
            .body(body)
            .map_err(|e| json!({"message": e.to_string()}))?;
        let response = self.state.handle(request).await;
        let ok = response.status().is_success();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .map_err(|e| json!({"message": e.to_string()}))?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if ok { Ok(value) } else { Err(value) }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A parsed resource path.
#[derive(Debug)]
struct Route {
    collection: String,
    /// `None` for a cluster-wide path (cluster-scoped objects, or every namespace).
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group_version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ((*version).to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some((*namespace).to_string()), rest)
            }
            rest => (None, rest),
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some((*name).to_string()), None),
            [plural, name, sub] => (*plural, Some((*name).to_string()), Some((*sub).to_string())),
            _ => return None,
        };
        Some(Self {
            collection: format!("{group_version}/{plural}"),
            namespace,
            name,
            subresource,
        })
    }

    fn plural(&self) -> &str {
        self.collection.rsplit('/').next().unwrap_or_default()
    }

    fn key(&self) -> Option<ObjectKey> {
        Some(ObjectKey {
            collection: self.collection.clone(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: self.name.clone()?,
        })
    }

    fn matches_collection(&self, key: &ObjectKey) -> bool {
        key.collection == self.collection
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
    }
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Everything but `metadata` and `status`: a change here bumps the generation.
fn spec_of(object: &Value) -> Value {
    let mut spec = object.clone();
    if let Some(map) = spec.as_object_mut() {
        for field in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(field);
        }
    }
    spec
}

fn metadata_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or_default()
}

fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

impl State {
    async fn handle(self: &Arc<Self>, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20)
            .await
            .unwrap_or_else(|_| Bytes::new());
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let path = parts.uri.path().to_string();
        let content_type = content_type(&parts.headers);
        // Apply patches may come as YAML.
        let body: Value = serde_json::from_slice(&bytes)
            .or_else(|_| serde_yaml::from_slice(&bytes))
            .unwrap_or(Value::Null);
        lock(&self.requests).push(RecordedRequest {
            method: parts.method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: body.clone(),
        });
        if let Some(code) = self.take_fault(&parts.method, &path) {
            return status_error(code, "InternalError", "injected failure");
        }
        if let Some(response) = self.discovery(&path) {
            return response;
        }
        if parts.method == Method::POST {
            match path.as_str() {
                "/apis/authentication.k8s.io/v1/tokenreviews" => {
                    return json_response(201, &lock(&self.reviews).token_review(body));
                }
                "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                    return json_response(201, &lock(&self.reviews).subject_access_review(body));
                }
                _ => {}
            }
        }
        let Some(route) = Route::parse(&path) else {
            return status_error(404, "NotFound", &format!("no route for {path}"));
        };
        if !bytes.is_empty() && body.is_null() {
            return status_error(400, "BadRequest", "the body is not JSON");
        }
        if route.subresource.as_deref() == Some("scale") {
            return self.scale(&route, &parts.method, body, &content_type);
        }
        let selector = Selector::parse(&query);
        match (&parts.method, route.name.is_some()) {
            (&Method::GET, false)
                if query.get("watch").is_some_and(|w| w == "true" || w == "1") =>
            {
                self.watch(&route, &query, selector)
            }
            (&Method::GET, false) => self.list(&route, &selector),
            (&Method::GET, true) => self.get(&route),
            (&Method::POST, false) => self.create(&route, body),
            (&Method::PUT, true) => self.update(&route, body),
            (&Method::PATCH, true) => self.patch(&route, body, &content_type, &query),
            (&Method::DELETE, true) => self.delete(&route, &body),
            _ => status_error(405, "MethodNotAllowed", "method not allowed"),
        }
    }

    fn take_fault(&self, method: &Method, path: &str) -> Option<u16> {
        let mut faults = lock(&self.faults);
        let fault = faults.iter_mut().find(|f| {
            f.remaining > 0
                && f.method.as_ref().is_none_or(|m| m == method)
                && path.contains(&f.path_contains)
        })?;
        fault.remaining -= 1;
        Some(fault.code)
    }

    fn has_status_subresource(&self, route: &Route) -> bool {
        lock(&self.status_subresources)
            .iter()
            .any(|p| p == route.plural())
            || self.resource(route).is_some_and(|r| r.status)
    }

    fn resource(&self, route: &Route) -> Option<discovery::Resource> {
        lock(&self.resources)
            .iter()
            .find(|r| format!("{}/{}", r.group_version(), r.plural) == route.collection)
            .cloned()
    }

    /// `/version`, `/api`, `/apis` and resource lists; `None` for any other path.
    fn discovery(&self, path: &str) -> Option<Response<Body>> {
        let path = path.trim_end_matches('/');
        let resources = lock(&self.resources).clone();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let found = match segments.as_slice() {
            ["version"] => Some(json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-flotilla-fake",
                "platform": "linux/amd64",
            })),
            ["api"] => Some(discovery::api_versions(
                self.address.get().map_or("", String::as_str),
            )),
            ["apis"] => Some(discovery::group_list(&resources)),
            ["openapi", "v3"] => Some(discovery::openapi_index(&resources)),
            ["openapi", "v3", "api", version] => discovery::openapi_document(&resources, version),
            ["openapi", "v3", "apis", group, version] => {
                discovery::openapi_document(&resources, &format!("{group}/{version}"))
            }
            ["api", version] => discovery::resource_list(&resources, version),
            ["apis", group, version] => {
                discovery::resource_list(&resources, &format!("{group}/{version}"))
            }
            _ => return None,
        };
        Some(match found {
            Some(document) => json_response(200, &document),
            None => status_error(404, "NotFound", &format!("no group-version at {path}")),
        })
    }

    /// The `scale` subresource: an `autoscaling/v1` Scale over the CRD's replica paths.
    fn scale(
        &self,
        route: &Route,
        method: &Method,
        body: Value,
        content_type: &str,
    ) -> Response<Body> {
        let (Some(key), Some((spec_path, status_path))) =
            (route.key(), self.resource(route).and_then(|r| r.scale))
        else {
            return status_error(404, "NotFound", "no scale subresource");
        };
        let mut store = lock(&self.store);
        let Some(object) = store.objects.get(&key).cloned() else {
            return not_found(&key);
        };
        let scale = json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": key.name,
                "namespace": key.namespace,
                "uid": object["metadata"]["uid"],
                "resourceVersion": object["metadata"]["resourceVersion"],
            },
            "spec": {"replicas": discovery::at_path(&object, &spec_path)},
            "status": {"replicas": discovery::at_path(&object, &status_path), "selector": ""},
        });
        let wanted = match *method {
            Method::GET => return json_response(200, &scale),
            Method::PUT => body,
            Method::PATCH if content_type == "application/json-patch+json" => {
                let mut next = scale.clone();
                match serde_json::from_value::<json_patch::Patch>(body) {
                    Ok(patch) if json_patch::patch(&mut next, &patch).is_ok() => next,
                    _ => return status_error(422, "Invalid", "bad JSON patch"),
                }
            }
            Method::PATCH => {
                let mut next = scale.clone();
                json_patch::merge(&mut next, &body);
                next
            }
            _ => return status_error(405, "MethodNotAllowed", "method not allowed"),
        };
        let Some(replicas) = wanted["spec"]["replicas"].as_i64() else {
            return status_error(422, "Invalid", "spec.replicas: Required value");
        };
        let mut next = object;
        discovery::set_path(&mut next, &spec_path, json!(replicas));
        let main = Route {
            collection: route.collection.clone(),
            namespace: route.namespace.clone(),
            name: route.name.clone(),
            subresource: None,
        };
        let response = self.update_locked(&mut store, &main, next);
        if !response.status().is_success() {
            return response;
        }
        let mut scaled = scale;
        scaled["spec"]["replicas"] = json!(replicas);
        json_response(200, &scaled)
    }

    fn get(&self, route: &Route) -> Response<Body> {
        let Some(key) = route.key() else {
            return status_error(404, "NotFound", "no name");
        };
        match lock(&self.store).objects.get(&key) {
            Some(object) => json_response(200, object),
            None => not_found(&key),
        }
    }

    /// Lists a collection, filtered by `selector`.
    fn list(&self, route: &Route, selector: &Selector) -> Response<Body> {
        let store = lock(&self.store);
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|(key, object)| route.matches_collection(key) && selector.matches(object))
            .map(|(_, object)| object.clone())
            .collect();
        json_response(
            200,
            &json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": {"resourceVersion": store.version.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(
        self: &Arc<Self>,
        route: &Route,
        query: &BTreeMap<String, String>,
        selector: Selector,
    ) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
        // Subscribe under the lock, so that nothing falls between the replay and live events.
        let (replay, mut live) = {
            let store = lock(&self.store);
            let live = self.changes.subscribe();
            let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
            let replay: Vec<Value> = if from == 0 || initial_events {
                let mut events: Vec<Value> = store
                    .objects
                    .iter()
                    .filter(|(key, object)| {
                        route.matches_collection(key) && selector.matches(object)
                    })
                    .map(|(_, object)| json!({"type": "ADDED", "object": object}))
                    .collect();
                // A streaming list ends its initial events with a marked bookmark.
                if initial_events {
                    let resource = self.resource(route);
                    events.push(json!({"type": "BOOKMARK", "object": {
                        "apiVersion": resource.as_ref().map(discovery::Resource::group_version),
                        "kind": resource.as_ref().map(|r| r.kind.clone()),
                        "metadata": {
                            "resourceVersion": store.version.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    }}));
                }
                events
            } else if from < store.compacted {
                vec![json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({})", store.compacted),
                }})]
            } else {
                store
                    .history
                    .iter()
                    .filter(|c| {
                        c.version > from
                            && route.matches_collection(&c.key)
                            && selector.matches(&c.object)
                    })
                    .map(|c| json!({"type": c.kind, "object": c.object}))
                    .collect()
            };
            (replay, live)
        };
        let collection = Route {
            collection: route.collection.clone(),
            namespace: route.namespace.clone(),
            name: None,
            subresource: None,
        };
        let stream = async_stream_lines(replay, move |sender| async move {
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => return,
                    change = live.recv() => match change {
                        Ok(change)
                            if collection.matches_collection(&change.key)
                                && selector.matches(&change.object) =>
                        {
                            let line = json!({"type": change.kind, "object": change.object});
                            if sender.send(line).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // A watcher this slow is cut off; the client lists again.
                        Err(_) => return,
                    }
                }
            }
        });
        let mut response = Response::new(stream);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }

    fn create(&self, route: &Route, object: Value) -> Response<Body> {
        let mut store = lock(&self.store);
        self.create_locked(&mut store, route, object)
    }

    fn create_locked(&self, store: &mut Store, route: &Route, mut object: Value) -> Response<Body> {
        let Some(map) = object.as_object_mut() else {
            return status_error(400, "BadRequest", "the body is not an object");
        };
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        if meta["name"].as_str().is_none_or(str::is_empty) {
            match meta["generateName"].as_str() {
                Some(prefix) => {
                    // Five random characters, as the API server appends.
                    let suffix = uuid::Uuid::new_v4().simple().to_string();
                    meta["name"] = json!(format!("{prefix}{}", &suffix[..5]));
                }
                None => return status_error(422, "Invalid", "metadata.name: Required value"),
            }
        }
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let key = ObjectKey {
            collection: route.collection.clone(),
            namespace: route.namespace.clone().unwrap_or_default(),
            name,
        };
        if self.has_status_subresource(route) {
            map.remove("status");
        }
        if store.objects.contains_key(&key) {
            return status_error(
                409,
                "AlreadyExists",
                &format!("{} \"{}\" already exists", route.plural(), key.name),
            );
        }
        let meta = &mut object["metadata"];
        if let Some(namespace) = &route.namespace {
            meta["namespace"] = json!(namespace);
        }
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["generation"] = json!(1);
        meta["creationTimestamp"] = json!(now());
        let stored = self.commit(store, key, "ADDED", object);
        json_response(201, &stored)
    }

    fn update(&self, route: &Route, body: Value) -> Response<Body> {
        let mut store = lock(&self.store);
        self.update_locked(&mut store, route, body)
    }

    /// A PUT, or the result of a patch.
    fn update_locked(&self, store: &mut Store, route: &Route, body: Value) -> Response<Body> {
        let Some(key) = route.key() else {
            return status_error(404, "NotFound", "no name");
        };
        let Some(existing) = store.objects.get(&key).cloned() else {
            return not_found(&key);
        };
        let wanted = metadata_str(&body, "resourceVersion");
        if !wanted.is_empty() && wanted != metadata_str(&existing, "resourceVersion") {
            return status_error(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    route.plural(),
                    key.name
                ),
            );
        }
        let mut next = existing.clone();
        let status_only = route.subresource.as_deref() == Some("status");
        if status_only {
            next["status"] = body.get("status").cloned().unwrap_or(Value::Null);
        } else {
            let keep_status = self.has_status_subresource(route);
            let mut replaced = body;
            if keep_status {
                match existing.get("status") {
                    Some(status) => replaced["status"] = status.clone(),
                    None => {
                        if let Some(map) = replaced.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            }
            // Server-managed metadata stays; the rest comes from the request.
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "namespace",
                "name",
            ] {
                match existing["metadata"].get(field) {
                    Some(value) => replaced["metadata"][field] = value.clone(),
                    None => {
                        if let Some(meta) = replaced["metadata"].as_object_mut() {
                            meta.remove(field);
                        }
                    }
                }
            }
            if spec_of(&replaced) != spec_of(&existing) {
                let generation = existing["metadata"]["generation"].as_u64().unwrap_or(0) + 1;
                replaced["metadata"]["generation"] = json!(generation);
            }
            next = replaced;
        }
        if next == existing {
            return json_response(200, &existing);
        }
        if !metadata_str(&next, "deletionTimestamp").is_empty() && !has_finalizers(&next) {
            let stored = self.commit_delete(store, key, next);
            return json_response(200, &stored);
        }
        let stored = self.commit(store, key, "MODIFIED", next);
        json_response(200, &stored)
    }

    /// A patch is computed and stored under one lock, so it never races another write.
    fn patch(
        &self,
        route: &Route,
        patch: Value,
        content_type: &str,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let Some(key) = route.key() else {
            return status_error(404, "NotFound", "no name");
        };
        let mut store = lock(&self.store);
        let store = &mut *store;
        let existing = store.objects.get(&key).cloned();
        let status_only = route.subresource.as_deref() == Some("status");
        match content_type {
            "application/apply-patch+yaml" => {
                if query.get("fieldManager").is_none_or(String::is_empty) {
                    return status_error(
                        400,
                        "BadRequest",
                        "PATCH with apply requires a fieldManager",
                    );
                }
                let Some(existing) = existing else {
                    if status_only {
                        return not_found(&key);
                    }
                    return self.create_locked(store, route, patch);
                };
                let mut next = existing.clone();
                if let (Some(next), Some(applied)) = (next.as_object_mut(), patch.as_object()) {
                    for (field, value) in applied {
                        match field.as_str() {
                            "apiVersion" | "kind" => {}
                            "metadata" => {
                                for part in ["labels", "annotations", "finalizers"] {
                                    if let Some(value) = value.get(part) {
                                        next.entry("metadata").or_insert_with(|| json!({}))[part] =
                                            value.clone();
                                    }
                                }
                            }
                            _ => {
                                next.insert(field.clone(), value.clone());
                            }
                        }
                    }
                }
                self.update_locked(store, route, strip_version(next))
            }
            "application/json-patch+json" => {
                let Some(existing) = existing else {
                    return not_found(&key);
                };
                let operations: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(operations) => operations,
                    Err(error) => return status_error(400, "BadRequest", &error.to_string()),
                };
                let mut next = existing.clone();
                if let Err(error) = json_patch::patch(&mut next, &operations) {
                    return status_error(422, "Invalid", &error.to_string());
                }
                self.update_locked(store, route, next)
            }
            // Merge patch; strategic merge patch is treated alike (good enough for the fields
            // Flotilla's clients patch).
            _ => {
                let Some(existing) = existing else {
                    return not_found(&key);
                };
                let mut next = existing.clone();
                let names_version = !metadata_str(&patch, "resourceVersion").is_empty();
                json_patch::merge(&mut next, &patch);
                if !names_version {
                    next = strip_version(next);
                }
                self.update_locked(store, route, next)
            }
        }
    }

    fn delete(&self, route: &Route, options: &Value) -> Response<Body> {
        let Some(key) = route.key() else {
            return status_error(404, "NotFound", "no name");
        };
        let mut store = lock(&self.store);
        let Some(existing) = store.objects.get(&key).cloned() else {
            return not_found(&key);
        };
        let wanted = options["preconditions"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if !wanted.is_empty() && wanted != metadata_str(&existing, "resourceVersion") {
            return status_error(409, "Conflict", "precondition failed: resourceVersion");
        }
        if has_finalizers(&existing) {
            if !metadata_str(&existing, "deletionTimestamp").is_empty() {
                return json_response(200, &existing);
            }
            let mut next = existing;
            next["metadata"]["deletionTimestamp"] = json!(now());
            let stored = self.commit(&mut store, key, "MODIFIED", next);
            return json_response(200, &stored);
        }
        let stored = self.commit_delete(&mut store, key, existing);
        json_response(200, &stored)
    }

    fn commit(
        &self,
        store: &mut Store,
        key: ObjectKey,
        kind: &'static str,
        mut object: Value,
    ) -> Value {
        if key.collection == discovery::CRDS {
            // A CRD created or changed: its resources appear in discovery, as they would.
            let defined = discovery::from_crd(&object);
            let mut resources = lock(&self.resources);
            resources.retain(|r| {
                !defined
                    .iter()
                    .any(|d| d.group_version() == r.group_version() && d.plural == r.plural)
            });
            resources.extend(defined);
        }
        store.version += 1;
        object["metadata"]["resourceVersion"] = json!(store.version.to_string());
        store.objects.insert(key.clone(), object.clone());
        self.record(store, key, kind, object.clone());
        object
    }

    fn commit_delete(&self, store: &mut Store, key: ObjectKey, mut object: Value) -> Value {
        store.version += 1;
        object["metadata"]["resourceVersion"] = json!(store.version.to_string());
        store.objects.remove(&key);
        self.record(store, key, "DELETED", object.clone());
        object
    }

    fn record(&self, store: &mut Store, key: ObjectKey, kind: &'static str, object: Value) {
        let change = Change {
            version: store.version,
            key,
            kind,
            object,
        };
        store.history.push_back(change.clone());
        if store.history.len() > HISTORY
            && let Some(dropped) = store.history.pop_front()
        {
            store.compacted = dropped.version;
        }
        // Nobody watching is fine.
        let _ = self.changes.send(change);
    }
}

/// `labelSelector` terms `key=value` and `fieldSelector` terms on `metadata.name` and
/// `metadata.namespace`.
#[derive(Clone, Default)]
struct Selector {
    labels: Vec<(String, String)>,
    fields: Vec<(String, String)>,
}

impl Selector {
    fn parse(query: &BTreeMap<String, String>) -> Self {
        let terms = |key: &str| -> Vec<(String, String)> {
            query
                .get(key)
                .map(|s| {
                    s.split(',')
                        .filter_map(|t| t.split_once('='))
                        .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            labels: terms("labelSelector"),
            fields: terms("fieldSelector"),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v.as_str()))
            && self.fields.iter().all(|(k, v)| match k.as_str() {
                "metadata.name" | "metadata.namespace" => {
                    let field = k.trim_start_matches("metadata.");
                    object["metadata"][field].as_str() == Some(v.as_str())
                }
                _ => true,
            })
    }
}

fn strip_version(mut object: Value) -> Value {
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    object
}

fn not_found(key: &ObjectKey) -> Response<Body> {
    let plural = key.collection.rsplit('/').next().unwrap_or_default();
    status_error(
        404,
        "NotFound",
        &format!("{plural} \"{}\" not found", key.name),
    )
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

/// A streaming body of JSON lines: `first`, then whatever `produce` sends.
fn async_stream_lines<F, Fut>(first: Vec<Value>, produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel::<Value>(1024);
    tokio::spawn(async move {
        for line in first {
            if sender.send(line).await.is_err() {
                return;
            }
        }
        produce(sender).await;
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(bytes)), receiver))
    });
    Body::from_stream(stream)
}
