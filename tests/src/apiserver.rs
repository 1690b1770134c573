//! A small Kubernetes API server for tests of the kube source: Services and
//! EndpointSlices only, over real HTTP on 127.0.0.1, speaking the protocol
//! kube's watcher uses.
//!
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices` and
//!   their `namespaces/{ns}/…` forms list objects (`limit`/`continue`
//!   paging), with `metadata.resourceVersion` on the list.
//! - `?watch=true&resourceVersion=RV` streams newline-delimited
//!   `{"type":…,"object":…}` events after RV from the history, a BOOKMARK
//!   once caught up (when `allowWatchBookmarks=true`), then live events until
//!   `timeoutSeconds`.
//! - A watch from a resourceVersion older than the last
//!   [`ApiServer::expire_watches`] gets the in-stream `ERROR` 410 `Expired`,
//!   as real API servers send it (HTTP 200, then the Status event).
//! - Outages: [`ApiServer::stop`] closes the port and every connection
//!   (connection refused until [`ApiServer::start`]);
//!   [`ApiServer::fail_requests`] answers every request with an HTTP error.
//!
//! Objects are the JSON the test gives (real Kubernetes JSON); the server
//! fills in `metadata.resourceVersion` and a default namespace. It runs on
//! its own tokio runtime so both plain and async tests can drive it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// The kinds this server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Cluster-scoped; served by name only (the agent gets its own Node).
    Node,
}

impl Kind {
    fn of(object: &Value) -> Result<Kind> {
        match (object["apiVersion"].as_str(), object["kind"].as_str()) {
            (Some("v1"), Some("Service")) => Ok(Kind::Service),
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => Ok(Kind::EndpointSlice),
            (Some("v1"), Some("Node")) => Ok(Kind::Node),
            (api, kind) => bail!(
                "the test API server serves v1 Service, discovery.k8s.io/v1 EndpointSlice \
                 and v1 Node, not {api:?} {kind:?}"
            ),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The request path's kind and namespace (`None`: all namespaces).
    fn from_path(path: &str) -> Option<(Kind, Option<String>)> {
        let (kind, plural, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
            (Kind::Service, "services", rest)
        } else if let Some(rest) = path.strip_prefix("/apis/discovery.k8s.io/v1/") {
            (Kind::EndpointSlice, "endpointslices", rest)
        } else {
            return None;
        };
        let segments: Vec<&str> = rest.split('/').collect();
        match segments.as_slice() {
            [p] if *p == plural => Some((kind, None)),
            ["namespaces", ns, p] if *p == plural => Some((kind, Some(ns.to_string()))),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    kind: Kind,
    namespace: String,
    name: String,
}

struct HistoryEvent {
    resource_version: u64,
    key: ObjectKey,
    event_type: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<HistoryEvent>,
    /// Watches from a resourceVersion below this get 410 Expired.
    oldest_watchable: u64,
    /// Bumped to end every running watch.
    watch_epoch: u64,
    failure: Option<StatusCode>,
    kind_failures: BTreeMap<Kind, StatusCode>,
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change so watches look at the history again.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

pub struct ApiServer {
    runtime: Option<Runtime>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop, owning every connection; `None` while stopped.
    listening: Mutex<Option<JoinHandle<()>>>,
}

impl ApiServer {
    /// Listening on 127.0.0.1 at a free port, with no objects.
    pub fn start_new() -> Result<ApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-apiserver")
            .enable_all()
            .build()
            .context("starting the test API server's runtime")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("binding the test API server to 127.0.0.1")?;
        let addr = listener.local_addr().context("test API server address")?;
        let server = ApiServer {
            runtime: Some(runtime),
            addr,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    resource_version: 1,
                    ..State::default()
                }),
                changes: watch::channel(0).0,
            }),
            listening: Mutex::new(None),
        };
        server.listen(listener)?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    fn listen(&self, listener: std::net::TcpListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .context("making the test API server socket non-blocking")?;
        let _context = self.runtime().enter();
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("registering the test API server socket")?;
        let shared = self.shared.clone();
        let task = self.runtime().spawn(async move {
            // Dropped with the accept loop: aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.listening.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }

    /// Closes the port and every open connection: clients get connection
    /// refused, as from an API server that is down.
    pub fn stop(&self) {
        if let Some(task) = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
            // The abort completes asynchronously; wait until the port is free.
            while std::net::TcpListener::bind(self.addr).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Listens again on the same address after [`ApiServer::stop`].
    pub fn start(&self) -> Result<()> {
        if self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("rebinding the test API server to {}", self.addr))?;
        self.listen(listener)
    }

    /// Answers every request with `status` (a Kubernetes Status body) and ends
    /// running watches; `None` serves normally again.
    pub fn fail_requests(&self, status: Option<u16>) {
        let mut state = self.shared.lock();
        state.failure = status.map(|s| StatusCode::from_u16(s).expect("valid HTTP status"));
        state.watch_epoch += 1;
        drop(state);
        self.shared.notify();
    }

    /// Like [`ApiServer::fail_requests`] for one kind only (say, RBAC that
    /// forbids EndpointSlices).
    pub fn fail_requests_for(&self, kind: Kind, status: Option<u16>) {
        let mut state = self.shared.lock();
        match status {
            Some(s) => {
                state
                    .kind_failures
                    .insert(kind, StatusCode::from_u16(s).expect("valid HTTP status"));
            }
            None => {
                state.kind_failures.remove(&kind);
            }
        }
        state.watch_epoch += 1;
        drop(state);
        self.shared.notify();
    }

    /// Creates or replaces objects (ADDED or MODIFIED events), all at once.
    pub fn apply_all(&self, objects: impl IntoIterator<Item = Value>) -> Result<()> {
        let mut state = self.shared.lock();
        for mut object in objects {
            let kind = Kind::of(&object)?;
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                bail!("object without metadata.name: {object}");
            };
            let namespace = match kind {
                Kind::Node => String::new(),
                _ => object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
            };
            state.resource_version += 1;
            let rv = state.resource_version;
            if kind != Kind::Node {
                object["metadata"]["namespace"] = json!(namespace);
            }
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = ObjectKey {
                kind,
                namespace,
                name,
            };
            let event_type = if state.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.history.push(HistoryEvent {
                resource_version: rv,
                key: key.clone(),
                event_type,
                object: object.clone(),
            });
            state.objects.insert(key, object);
        }
        drop(state);
        self.shared.notify();
        Ok(())
    }

    pub fn apply(&self, object: Value) -> Result<()> {
        self.apply_all([object])
    }

    /// Deletes an object (a DELETED event carrying its last state).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut state = self.shared.lock();
        let key = ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let Some(mut object) = state.objects.remove(&key) else {
            bail!("no {} {namespace}/{name} to delete", kind.name());
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push(HistoryEvent {
            resource_version: rv,
            key,
            event_type: "DELETED",
            object,
        });
        drop(state);
        self.shared.notify();
        Ok(())
    }

    /// Forgets the event history and ends every running watch: a client
    /// watching again from any resourceVersion it has seen gets 410 Expired
    /// and must relist.
    pub fn expire_watches(&self) {
        let mut state = self.shared.lock();
        state.resource_version += 1;
        state.oldest_watchable = state.resource_version;
        state.history.clear();
        state.watch_epoch += 1;
        drop(state);
        self.shared.notify();
    }

    /// Ends every running watch cleanly; clients watch again from their
    /// last resourceVersion.
    pub fn end_watches(&self) {
        self.shared.lock().watch_epoch += 1;
        self.shared.notify();
    }

    /// Every request so far, as `GET path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// A kubeconfig pointing at this server (no credentials).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: test\n  cluster:\n    server: {}\n\
             contexts:\n\
             - name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n\
             users:\n\
             - name: test\n  user: {{}}\n",
            self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig_yaml`] to `dir/kubeconfig`.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Does not block, so tests may drop the server inside a runtime.
            runtime.shutdown_background();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let query = parse_query(request.uri().query().unwrap_or(""));
    let mut state = shared.lock();
    state.requests.push(format!(
        "{} {}",
        request.method(),
        request
            .uri()
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str())
    ));
    if let Some(status) = state.failure {
        return status_response(status, "InternalError", "injected failure");
    }
    if request.method() != hyper::Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server is read-only",
        );
    }
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        return get_node(&state, name);
    }
    let Some((kind, namespace)) = Kind::from_path(&path) else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the test API server does not serve {path}"),
        );
    };
    if let Some(status) = state.kind_failures.get(&kind) {
        return status_response(*status, "Forbidden", "injected failure for this kind");
    }
    if query.get("watch").map(String::as_str) == Some("true") {
        if query.contains_key("sendInitialEvents") {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the test API server does not implement streaming lists",
            );
        }
        let Some(from) = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse::<u64>().ok())
        else {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "a watch needs a numeric resourceVersion",
            );
        };
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290);
        let watch = Watch {
            kind,
            namespace,
            from,
            timeout: Duration::from_secs(timeout),
            bookmarks: query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
            epoch: state.watch_epoch,
        };
        drop(state);
        return watch.start(shared.clone());
    }
    list(&state, kind, namespace.as_deref(), &query)
}

/// One Node by name, or 404 as a real API server answers.
fn get_node(state: &State, name: &str) -> Response<Body> {
    if let Some(status) = state.kind_failures.get(&Kind::Node) {
        return status_response(*status, "Forbidden", "injected failure for this kind");
    }
    let key = ObjectKey {
        kind: Kind::Node,
        namespace: String::new(),
        name: name.to_string(),
    };
    match state.objects.get(&key) {
        Some(node) => json_response(StatusCode::OK, node),
        None => status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        ),
    }
}

/// `key=value&…`; the kube client sends only unreserved characters in the
/// parameters this server reads.
fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A page of the current objects. Every page carries the resourceVersion
/// of the first one (in the continue token): a watch from there replays
/// whatever changed while the pages were fetched.
fn list(
    state: &State,
    kind: Kind,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let (list_rv, offset) = match query.get("continue") {
        Some(token) => match token
            .split_once('-')
            .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)))
        {
            Some(parsed) => parsed,
            None => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "malformed continue token",
                )
            }
        },
        None => (state.resource_version, 0),
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let matching: Vec<&Value> = state
        .objects
        .iter()
        .filter(|(k, _)| k.kind == kind && namespace.is_none_or(|ns| k.namespace == ns))
        .map(|(_, v)| v)
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|object| {
            // Real API servers leave kind and apiVersion out of list items.
            let mut item = (*object).clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    let next = offset + page.len();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if next < matching.len() {
        metadata["continue"] = json!(format!("{list_rv}-{next}"));
        metadata["remainingItemCount"] = json!(matching.len() - next);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": metadata,
            "items": page,
        }),
    )
}

struct Watch {
    kind: Kind,
    namespace: Option<String>,
    from: u64,
    timeout: Duration,
    bookmarks: bool,
    epoch: u64,
}

impl Watch {
    /// HTTP 200 now; the events follow on the body.
    fn start(self, shared: Arc<Shared>) -> Response<Body> {
        let (lines, body) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        tokio::spawn(self.stream(shared, lines));
        let body = StreamBody::new(tokio_stream_from(body));
        let mut response = Response::new(BodyExt::boxed(body));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }

    async fn stream(
        self,
        shared: Arc<Shared>,
        lines: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    ) {
        let mut changes = shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut seen = self.from;
        let mut caught_up_once = false;
        loop {
            changes.borrow_and_update();
            let (batch, last, expired) = {
                let state = shared.lock();
                if state.watch_epoch != self.epoch
                    || state.failure.is_some()
                    || state.kind_failures.contains_key(&self.kind)
                {
                    return;
                }
                if seen < state.oldest_watchable {
                    let expired = json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {seen} ({})", state.oldest_watchable),
                    }});
                    (Vec::new(), seen, Some(line(&expired)))
                } else {
                    let start = state
                        .history
                        .partition_point(|e| e.resource_version <= seen);
                    let batch: Vec<Bytes> = state.history[start..]
                        .iter()
                        .filter(|e| {
                            e.key.kind == self.kind
                                && self
                                    .namespace
                                    .as_ref()
                                    .is_none_or(|ns| &e.key.namespace == ns)
                        })
                        .map(|e| line(&json!({"type": e.event_type, "object": e.object})))
                        .collect();
                    (batch, state.resource_version, None)
                }
            };
            if let Some(expired) = expired {
                let _ = lines.send(Ok(Frame::data(expired))).await;
                return;
            }
            seen = last;
            for event in batch {
                if lines.send(Ok(Frame::data(event))).await.is_err() {
                    return;
                }
            }
            if self.bookmarks && !caught_up_once {
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "kind": self.kind.name(), "apiVersion": self.kind.api_version(),
                    "metadata": {"resourceVersion": seen.to_string()},
                }});
                if lines.send(Ok(Frame::data(line(&bookmark)))).await.is_err() {
                    return;
                }
            }
            caught_up_once = true;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = lines.closed() => return,
            }
        }
    }
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn tokio_stream_from<T>(
    mut receiver: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
{
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status_response(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "message": message,
            "code": status.as_u16(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_kind_and_namespace() {
        assert_eq!(
            Kind::from_path("/api/v1/services"),
            Some((Kind::Service, None))
        );
        assert_eq!(
            Kind::from_path("/apis/discovery.k8s.io/v1/namespaces/apps/endpointslices"),
            Some((Kind::EndpointSlice, Some("apps".into())))
        );
        assert_eq!(Kind::from_path("/api/v1/pods"), None);
        assert_eq!(Kind::from_path("/api/v1/namespaces/a/endpointslices"), None);
    }

    fn service(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "apps"},
               "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}})
    }

    /// Status code and body of a GET, over a plain TCP connection.
    fn get(server: &ApiServer, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let code = response[9..12].parse().unwrap();
        (code, response.split_once("\r\n\r\n").unwrap().1.to_string())
    }

    #[test]
    fn lists_page_with_continue_and_keep_the_first_resource_version() {
        let server = ApiServer::start_new().unwrap();
        server
            .apply_all((0..3).map(|i| service(&format!("s{i}"))))
            .unwrap();
        let (code, body) = get(&server, "/api/v1/services?limit=2");
        assert_eq!(code, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page["kind"], "ServiceList");
        assert_eq!(page["items"].as_array().unwrap().len(), 2);
        assert_eq!(page["items"][0].get("kind"), None);
        assert_eq!(page["items"][0]["metadata"]["resourceVersion"], "2");
        let rv = page["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(rv, "4");
        let token = page["metadata"]["continue"].as_str().unwrap().to_string();
        server.apply(service("s3")).unwrap();
        let (_, body) = get(
            &server,
            &format!("/api/v1/services?limit=2&continue={token}"),
        );
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page["metadata"]["resourceVersion"], "4");
        assert_eq!(page["items"].as_array().unwrap().len(), 2);
        assert_eq!(page["metadata"].get("continue"), None);
        let (_, body) = get(&server, "/api/v1/namespaces/other/services");
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page["items"], json!([]));
    }

    #[test]
    fn an_expired_watch_gets_an_in_stream_410() {
        let server = ApiServer::start_new().unwrap();
        server.apply(service("s0")).unwrap();
        server.expire_watches();
        let (code, body) = get(&server, "/api/v1/services?watch=true&resourceVersion=2");
        assert_eq!(code, 200);
        let event: Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
        assert_eq!(event["type"], "ERROR");
        assert_eq!(event["object"]["code"], 410);
        assert_eq!(event["object"]["reason"], "Expired");
    }

    #[test]
    fn a_watch_replays_history_then_bookmarks_and_ends_at_its_timeout() {
        let server = ApiServer::start_new().unwrap();
        server.apply(service("s0")).unwrap();
        server.apply(service("s0")).unwrap();
        server.delete(Kind::Service, "apps", "s0").unwrap();
        let (code, body) = get(
            &server,
            "/api/v1/services?watch=true&resourceVersion=1&timeoutSeconds=1&allowWatchBookmarks=true",
        );
        assert_eq!(code, 200);
        let events: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]);
        assert_eq!(events[3]["object"]["metadata"]["resourceVersion"], "4");
    }

    #[test]
    fn outages_refuse_connections_and_failures_answer_with_a_status() {
        let server = ApiServer::start_new().unwrap();
        server.stop();
        assert!(std::net::TcpStream::connect(server.addr()).is_err());
        server.start().unwrap();
        server.fail_requests(Some(503));
        let (code, body) = get(&server, "/api/v1/services");
        assert_eq!(code, 503);
        assert!(body.contains("\"kind\":\"Status\""), "{body}");
        server.fail_requests(None);
        assert_eq!(get(&server, "/api/v1/services").0, 200);
        assert_eq!(server.requests().len(), 2);
    }
}
