//! The exchange's I/O: the HTTP server peers ask, the client that asks
//! them every interval, the logs and metrics. What to ask and what to make
//! of answers is [`Exchange`]'s.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::exchange::core::{Config, Exchange, Kind, Outcome};
use crate::exchange::model::{ClusterView, LocalLoads, PlacementLoads};
use crate::exchange::placement::placement_loads;
use crate::exchange::tree::Peer;
use crate::exchange::wire::{self, Reason, MAX_BODY};
use crate::observe::metrics::Metrics;
use crate::state::model::DesiredState;

/// Default `--exchange-port`.
pub const DEFAULT_PORT: u16 = 9926;
/// Default `--exchange-interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
/// A peer that has not answered completely within this is failing.
pub const TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name (`--node-name`): its place in the tree.
    pub node_name: Arc<str>,
    /// `--exchange-port` (not 0): where this agent listens and its peers do.
    pub port: u16,
    /// `--exchange-addr`: the IP to listen on, instead of this node's
    /// InternalIP.
    pub listen_ip: Option<IpAddr>,
    /// `--exchange-interval`
    pub interval: Duration,
    pub timeout: Duration,
    pub config: Config,
}

/// What the exchange publishes: the placement loads (for the data plane
/// owner) and the cluster view (for the planner).
#[derive(Clone, Debug)]
pub struct Outputs {
    pub placement: watch::Receiver<Arc<PlacementLoads>>,
    pub cluster: watch::Receiver<Arc<ClusterView>>,
}

/// The sending ends of [`Outputs`], handed to [`run`].
#[derive(Debug)]
pub struct Publishers {
    placement: watch::Sender<Arc<PlacementLoads>>,
    cluster: watch::Sender<Arc<ClusterView>>,
}

/// Channels that start empty: nothing covered, every placement by this
/// node's own counts, until the exchange learns something.
pub fn channels() -> (Publishers, Outputs) {
    let (placement, placement_rx) = watch::channel(Arc::default());
    let (cluster, cluster_rx) = watch::channel(Arc::default());
    (
        Publishers { placement, cluster },
        Outputs {
            placement: placement_rx,
            cluster: cluster_rx,
        },
    )
}

/// Runs the exchange until the task is dropped or the desired states end:
/// waits for this node's InternalIP (unless `listen_ip` gives one), serves
/// its views there, asks its peers every interval, and publishes the
/// placement loads and the cluster view.
pub async fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    mut states: watch::Receiver<Option<DesiredState>>,
    mut local: watch::Receiver<Arc<LocalLoads>>,
    out: Publishers,
) -> Result<()> {
    let me = settings.node_name.clone();
    let ip = match settings.listen_ip {
        Some(ip) => ip,
        None => {
            tracing::info!(
                "load exchange: waiting for Node {me}'s InternalIP (status.addresses) to listen \
                 on; --exchange-addr sets it"
            );
            let state = states
                .wait_for(|s| s.as_ref().is_some_and(|s| s.nodes.contains_key(&me)))
                .await
                .context("the desired states ended before this node's InternalIP was known")?;
            state.as_ref().expect("waited for a state").nodes[&me]
        }
    };
    let addr = SocketAddr::new(ip, settings.port);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("listening for the load exchange on {addr} (--exchange-port, --exchange-addr)")
    })?;
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let shared = Arc::new(Mutex::new(Exchange::new(
        me.clone(),
        settings.config,
        start,
    )));
    let _server = AbortOnDrop(tokio::spawn(serve(
        listener,
        shared.clone(),
        metrics.clone(),
    )));
    let mut client = Client {
        settings: settings.clone(),
        local_ip: ip,
        metrics,
        shared,
        out,
        connections: HashMap::new(),
        in_flight: HashSet::new(),
        foreign_logged: HashSet::new(),
        answered: HashSet::new(),
        desired: None,
        desired_changed: false,
    };
    client.take_desired(states.borrow_and_update().clone());
    client.take_local(&mut local);
    {
        let x = client.lock();
        let tree = x.tree();
        if !tree.contains(&me) {
            tracing::warn!(
                "load exchange: Node {me} is not in the exchange tree (no Node of that name with \
                 an InternalIP yet): peers do not ask it and it asks nobody until its Node has \
                 an InternalIP (is --node-name the Node's name?)"
            );
        }
        tracing::info!(
            "load exchange: listening on {addr}; {} nodes in the tree (fan-out {}, depth {}), \
             parent {}, {} children, asked every {:?}",
            tree.len(),
            tree.fanout(),
            tree.depth(),
            tree.parent(&me)
                .map_or("none (root)".to_string(), |p| p.name.to_string()),
            tree.children(&me).len(),
            settings.interval,
        );
    }
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut requests: JoinSet<Answer> = JoinSet::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                client.take_local(&mut local);
                client.refresh();
                let plan = client.lock().plan();
                for request in plan {
                    if !client.in_flight.insert(request.peer.name.clone()) {
                        continue;
                    }
                    let connection = client.connections.remove(&request.peer.name);
                    requests.spawn(fetch(
                        request.peer,
                        request.kind,
                        request.since,
                        (client.local_ip, settings.port),
                        connection,
                        settings.timeout,
                    ));
                }
            }
            Some(answer) = requests.join_next(), if !requests.is_empty() => {
                let answer = answer.context("a load exchange request panicked")?;
                client.on_answer(answer);
                // The round's answers are in: use them now rather than at
                // the next tick.
                if requests.is_empty() {
                    client.refresh();
                }
            }
            changed = states.changed() => {
                if changed.is_err() {
                    bail!("the desired states ended");
                }
                // Taken now: `changed` marked it seen. Used at the next tick.
                client.take_desired(states.borrow_and_update().clone());
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One request's result.
struct Answer {
    peer: Peer,
    kind: Kind,
    body: Result<Option<Bytes>, Reason>,
    /// The connection, to reuse when it is still good.
    connection: Option<SendRequest<Empty<Bytes>>>,
}

struct Client {
    settings: Settings,
    local_ip: IpAddr,
    metrics: Arc<Metrics>,
    shared: Arc<Mutex<Exchange>>,
    out: Publishers,
    /// Open connections to peers, by node name.
    connections: HashMap<Arc<str>, SendRequest<Empty<Bytes>>>,
    /// Peers with a request under way: not asked again until it ends.
    in_flight: HashSet<Arc<str>>,
    /// Peers already reported for foreign entries.
    foreign_logged: HashSet<Arc<str>>,
    /// Peers that answered at least once: one that never did is most likely
    /// still starting (a DaemonSet rollout), not worth a warning.
    answered: HashSet<Arc<str>>,
    desired: Option<DesiredState>,
    /// The placement is due again even if the view is not.
    desired_changed: bool,
}

impl Client {
    fn lock(&self) -> MutexGuard<'_, Exchange> {
        // Every update of the exchange is complete or not made at all.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_desired(&mut self, state: Option<DesiredState>) {
        if let Some(state) = state {
            let mut x = self.lock();
            x.set_nodes(&state.nodes);
            x.set_desired(&state);
            drop(x);
            self.desired = Some(state);
            self.desired_changed = true;
        }
    }

    fn take_local(&mut self, local: &mut watch::Receiver<Arc<LocalLoads>>) {
        let own = local.borrow_and_update().clone();
        self.lock().set_own(own);
    }

    fn on_answer(&mut self, answer: Answer) {
        let Answer {
            peer,
            kind,
            body,
            connection,
        } = answer;
        self.in_flight.remove(&peer.name);
        if let Some(connection) = connection {
            self.connections.insert(peer.name.clone(), connection);
        }
        let bytes = body
            .as_ref()
            .map_or(0, |b| b.as_ref().map_or(0, |b| b.len()));
        self.metrics.record_exchange_request(kind.label(), bytes);
        let now = Instant::now();
        let outcome = self.lock().on_answer(
            &peer.name,
            kind,
            body.as_ref().map(|b| b.as_deref()).map_err(|r| *r),
            now,
        );
        self.report(&peer, kind, outcome);
    }

    fn report(&mut self, peer: &Peer, kind: Kind, outcome: Outcome) {
        let name = &peer.name;
        let address = SocketAddr::new(peer.ip, self.settings.port);
        if let Some(reason) = outcome.failed.or(outcome.failing) {
            self.metrics
                .record_exchange_peer_error(name, reason.label());
            self.connections.remove(name);
        }
        let first_answer = outcome.failed.is_none()
            && outcome.failing.is_none()
            && self.answered.insert(name.clone());
        if let Some(reason) = outcome.failed {
            let (role, fallback) = match kind {
                Kind::Cluster => ("parent", "asking its parent meanwhile"),
                Kind::Subtree => ("child", "asking its children directly meanwhile"),
            };
            if !self.answered.contains(name) {
                tracing::info!(
                    "load exchange: {role} {name} ({address}) has not answered yet ({}); its \
                     agent may still be starting; {fallback}",
                    reason.describe(),
                );
                return;
            }
            tracing::warn!(
                "load exchange: {role} {name} ({address}) {}; {fallback}; the loads it reported \
                 expire {}s after its last answer, and placement then uses this node's own \
                 counts for its pods",
                reason.describe(),
                self.settings.config.ttl.as_secs(),
            );
        }
        if outcome.recovered {
            let again = if first_answer { "now" } else { "again" };
            tracing::info!("load exchange: {name} ({address}) answers {again}");
        }
        if outcome.foreign > 0 {
            self.metrics
                .record_exchange_peer_error(name, Reason::Foreign.label());
            if self.foreign_logged.insert(name.clone()) {
                tracing::warn!(
                    "load exchange: {name} ({address}) reported {} pods that neither it nor its \
                     subtree hosts (per the EndpointSlices' nodeName); those entries are ignored \
                     (logged once per peer)",
                    outcome.foreign
                );
            }
        }
    }

    /// Recomputes the views and publishes what changed.
    fn refresh(&mut self) {
        let now = Instant::now();
        let mut x = self.lock();
        let changed = x.refresh(now);
        let (subtree, cluster) = x.sizes();
        let age = x
            .oldest_answer()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let view = changed.then(|| x.cluster_view());
        drop(x);
        self.metrics.record_exchange_view(subtree, cluster, age);
        let desired_changed = std::mem::take(&mut self.desired_changed);
        let Some(desired) = &self.desired else {
            return;
        };
        let view = match view {
            Some(view) => {
                let view = Arc::new(view);
                self.out.cluster.send_replace(view.clone());
                view
            }
            None if desired_changed => self.out.cluster.borrow().clone(),
            None => return,
        };
        let placement = placement_loads(&view, desired);
        self.out.placement.send_if_modified(|current| {
            if **current == placement {
                return false;
            }
            *current = Arc::new(placement);
            true
        });
    }
}

/// One GET to a peer, with the timeout over connecting, the answer and its
/// body; the connection comes back when it can be reused.
async fn fetch(
    peer: Peer,
    kind: Kind,
    since: Option<u64>,
    (local_ip, port): (IpAddr, u16),
    connection: Option<SendRequest<Empty<Bytes>>>,
    timeout: Duration,
) -> Answer {
    let address = SocketAddr::new(peer.ip, port);
    let work = async {
        let mut sender = match connection {
            Some(sender) if sender.is_ready() => sender,
            _ => connect(local_ip, address).await?,
        };
        let uri = match since {
            Some(version) => format!("{}?since={version}", kind.path()),
            None => kind.path().to_string(),
        };
        let request = Request::get(uri)
            .header(hyper::header::HOST, address.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|_| Reason::Status)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| Reason::Connect)?;
        match response.status() {
            StatusCode::NOT_MODIFIED => Ok((None, sender)),
            StatusCode::OK => {
                let declared = response
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                if declared.is_some_and(|n| n > MAX_BODY) {
                    return Err(Reason::Oversized);
                }
                let body = Limited::new(response.into_body(), MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            Reason::Oversized
                        } else {
                            Reason::Connect
                        }
                    })?;
                Ok((Some(body.to_bytes()), sender))
            }
            _ => Err(Reason::Status),
        }
    };
    let (body, connection) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok((body, sender))) => (Ok(body), Some(sender)),
        Ok(Err(reason)) => (Err(reason), None),
        Err(_) => (Err(Reason::Timeout), None),
    };
    Answer {
        peer,
        kind,
        body,
        connection,
    }
}

/// A connection from this node's address (so peers see the node's own
/// address as the source), HTTP/1.1.
async fn connect(
    local_ip: IpAddr,
    address: SocketAddr,
) -> Result<SendRequest<Empty<Bytes>>, Reason> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|_| Reason::Connect)?;
    if local_ip.is_ipv4() == address.is_ipv4() && !local_ip.is_unspecified() {
        socket
            .bind(SocketAddr::new(local_ip, 0))
            .map_err(|_| Reason::Connect)?;
    }
    let stream = socket.connect(address).await.map_err(|_| Reason::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Reason::Connect)?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the peer closes.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Answers `GET /v1/subtree?since=N` and `GET /v1/cluster?since=N`.
async fn serve(listener: TcpListener, shared: Arc<Mutex<Exchange>>, metrics: Arc<Metrics>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("load exchange listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let metrics = metrics.clone();
        // Finished connections are reaped; the rest end with the server
        // (the set aborts them when dropped), so a stopped exchange stops
        // answering on kept-alive connections too.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &shared, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("load exchange connection from {peer}: {e}");
            }
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    shared: &Mutex<Exchange>,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"only GET\n"),
        );
    }
    let kind = match request.uri().path() {
        "/v1/subtree" => Kind::Subtree,
        "/v1/cluster" => Kind::Cluster,
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"try /v1/subtree?since=N or /v1/cluster?since=N\n"),
            )
        }
    };
    let since = match request.uri().query() {
        None | Some("") => None,
        Some(query) => match query.strip_prefix("since=").map(str::parse::<u64>) {
            Some(Ok(version)) => Some(version),
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"the only parameter is since=<version>\n"),
                )
            }
        },
    };
    let delta = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .serve(kind, since);
    let response = match delta {
        None => reply(StatusCode::NOT_MODIFIED, Bytes::new()),
        Some(delta) => {
            let mut response = reply(StatusCode::OK, Bytes::from(wire::encode(&delta)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
    };
    let bytes = hyper::body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    metrics.record_exchange_served(kind.label(), bytes as usize);
    response
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}
