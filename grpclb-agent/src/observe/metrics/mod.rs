//! Prometheus metrics and health endpoints on `--metrics-addr`.
//!
//! The sources, the sync and the mover record into [`Metrics`] (counters
//! and a histogram of `prometheus-client`, plus the latest values they
//! replace wholesale); map contents are read at scrape time (so connection
//! counts are current) through a callback returning [`TableGauges`].
//! [`exposition::render`] turns both into the Prometheus text format, with
//! as many series as [`MetricsDetail`] allows. `/healthz` answers while the
//! process serves; `/readyz` is 200 while the agent is ready (see
//! `readiness`: programs attached, the last sync applied the whole desired
//! state), else 503 with the reason (the DaemonSet's readiness probe).

pub mod exposition;
pub mod gauges;
pub mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use grpclb_common::names;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::dataplane::sync::SyncReport;
use crate::observe::readiness::Readiness;
use crate::observe::status;
use crate::rebalance::inject::ABANDON_CAUSES;
use crate::rebalance::planner::Reason;
use crate::state::model::DesiredState;

pub use exposition::render;
pub use gauges::{FrontendGauges, LocalBackendGauges, MapCapacities, TableGauges};
pub use server::{bind, serve, GaugeReader, StatusPage, StatusReader};

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9925";

/// Upper bounds (seconds) of the map sync latency histogram.
const SYNC_SECONDS_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// The maps `grpclb_map_full` always reports on (0 or 1), so an alert on
/// it sees every map from the first scrape.
const SYNCED_MAPS: [&str; 4] = [
    names::FRONTENDS,
    names::SERVICE_NAMES,
    names::BACKEND_SLOTS,
    names::BACKEND_LOAD,
];

/// How many series `/metrics` carries (`--metrics-detail`). Each level adds
/// to the one before; counts are for a node of a cluster with S Services
/// and B endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum MetricsDetail {
    /// Totals of this node only, plus this node's own pods (bounded by the
    /// pods a node runs): a few dozen series whatever S and B.
    Node,
    /// Also one series per frontend for its eligible backends and for its
    /// endpoint rule, one per frontend this node has connections to, and
    /// one per Service left to another proxy: O(S).
    #[default]
    Service,
    /// Also the connections from this node to every backend (alone and
    /// per frontend, for a Service's balance over its pods) and the call
    /// rate of every tracked connection: O(B).
    Backend,
}

/// The kinds of Kubernetes object the kube source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Watched {
    Services,
    EndpointSlices,
    Nodes,
}

impl Watched {
    pub fn label(self) -> &'static str {
        match self {
            Watched::Services => "services",
            Watched::EndpointSlices => "endpointslices",
            Watched::Nodes => "nodes",
        }
    }
}

/// The recorded counters read back, for tests and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub syncs: u64,
    pub sync_failures: u64,
    pub states_published: u64,
    /// Per watched resource, from its first event on.
    pub watches: BTreeMap<Watched, WatchCounters>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchCounters {
    /// Complete lists received (the first, and every relist after an
    /// expired watch or a restart).
    pub lists: u64,
    /// Errors from the API server or the connection to it; each is followed
    /// by a backoff.
    pub errors: u64,
    /// Objects in the store after the last list or event.
    pub objects: u64,
}

/// One label, with a name and value known at compile time.
type StaticLabel = [(&'static str, &'static str); 1];

/// What the sources, the sync and the mover replace wholesale; read at
/// each scrape.
#[derive(Clone, Debug, Default)]
struct Latest {
    readiness: Readiness,
    /// The published states, read when asked for the rule of each
    /// frontend and the Services left alone: at 10,000 Services, working
    /// that out on every change cost 3 ms of the 20 a change took, and it
    /// is asked for only at a scrape or a `status`.
    states: Option<watch::Receiver<Option<DesiredState>>>,
    /// Moves reported as waiting, by (backend `ip:port`, last refusal).
    moves_waiting: Arc<BTreeMap<(String, &'static str), u64>>,
    /// Calls per second of each tracked connection of this node's pods, by
    /// (backend, client) `ip:port`, as the rebalancer last measured them.
    call_rates: Arc<BTreeMap<(String, String), f64>>,
}

/// Shared between the sources, the sync task, the mover and the metrics
/// server. Counters are `prometheus-client` metrics (atomics, cloned into
/// each scrape's registry); what is replaced wholesale sits behind a mutex.
#[derive(Debug)]
pub struct Metrics {
    syncs: Counter,
    sync_failures: Counter,
    sync_seconds: Histogram,
    ready: Gauge,
    map_full: Family<StaticLabel, Gauge>,
    frontends_not_applied: Gauge,
    states_published: Counter,
    kube_lists: Family<StaticLabel, Counter>,
    kube_watch_errors: Family<StaticLabel, Counter>,
    kube_objects: Family<StaticLabel, Gauge>,
    goaways: Family<StaticLabel, Counter>,
    moves_abandoned: Family<StaticLabel, Counter>,
    exchange: ExchangeMetrics,
    latest: Mutex<Latest>,
}

/// The load exchange's requests, answers and view (`exchange`).
#[derive(Debug, Default)]
struct ExchangeMetrics {
    /// By endpoint (`subtree`, `cluster`).
    requests: Family<StaticLabel, Counter>,
    served: Family<StaticLabel, Counter>,
    /// By direction (`received`: answer bodies read, `sent`: served).
    bytes: Family<StaticLabel, Counter>,
    /// By peer node name and reason.
    peer_errors: Family<[(&'static str, String); 2], Counter>,
    /// By view (`subtree`, `cluster`).
    entries: Family<StaticLabel, Gauge>,
    /// Seconds since the oldest answer the cluster view still uses.
    age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let map_full = Family::<StaticLabel, Gauge>::default();
        for map in SYNCED_MAPS {
            let _ = map_full.get_or_create(&[("map", map)]);
        }
        // Every reason from 0: a counter's first sample already at 1 is an
        // increase `rate()` never sees, so an agent's first GOAWAY of a
        // reason would go missing from every rate of it.
        let goaways = Family::<StaticLabel, Counter>::default();
        for reason in Reason::ALL {
            let _ = goaways.get_or_create(&[("reason", reason.label())]);
        }
        let moves_abandoned = Family::<StaticLabel, Counter>::default();
        for cause in ABANDON_CAUSES {
            let _ = moves_abandoned.get_or_create(&[("cause", cause)]);
        }
        Metrics {
            syncs: Counter::default(),
            sync_failures: Counter::default(),
            sync_seconds: Histogram::new(SYNC_SECONDS_BUCKETS),
            ready: Gauge::default(),
            map_full,
            frontends_not_applied: Gauge::default(),
            states_published: Counter::default(),
            kube_lists: Family::default(),
            kube_watch_errors: Family::default(),
            kube_objects: Family::default(),
            goaways,
            moves_abandoned,
            exchange: ExchangeMetrics::default(),
            latest: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn lock(&self) -> MutexGuard<'_, Latest> {
        // The values stay consistent even if a holder panicked mid-update:
        // every update is one assignment.
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn readiness(&self) -> Readiness {
        self.lock().readiness.clone()
    }

    pub fn set_readiness(&self, readiness: Readiness) {
        self.ready.set(i64::from(readiness.ready));
        self.lock().readiness = readiness;
    }

    /// What `/selection` serves (for `status`), as of the latest state.
    pub fn selection(&self) -> status::Selection {
        // The receiver is cloned so the lock is not held while it is read.
        let states = self.lock().states.clone();
        states
            .and_then(|states| states.borrow().as_ref().map(status::Selection::of))
            .unwrap_or_default()
    }

    /// Follows the states the source publishes, for [`Metrics::selection`].
    pub fn follow_states(&self, states: watch::Receiver<Option<DesiredState>>) {
        self.lock().states = Some(states);
    }

    pub fn snapshot(&self) -> Counters {
        let watches = [Watched::Services, Watched::EndpointSlices, Watched::Nodes]
            .into_iter()
            .filter_map(|kind| {
                let label = [("resource", kind.label())];
                let lists = self.kube_lists.get(&label)?.get();
                let errors = self.kube_watch_errors.get(&label)?.get();
                let objects = self.kube_objects.get(&label)?.get();
                let objects = u64::try_from(objects).unwrap_or(0);
                Some((
                    kind,
                    WatchCounters {
                        lists,
                        errors,
                        objects,
                    },
                ))
            })
            .collect();
        Counters {
            syncs: self.syncs.get(),
            sync_failures: self.sync_failures.get(),
            states_published: self.states_published.get(),
            watches,
        }
    }

    /// A sync that left frontends out counts as a failure.
    pub fn record_sync(&self, elapsed: Duration, outcome: Result<&SyncReport, &anyhow::Error>) {
        match outcome {
            Ok(report) => {
                if report.complete() {
                    self.syncs.inc();
                } else {
                    self.sync_failures.inc();
                }
                for map in SYNCED_MAPS {
                    let full = report.full.contains_key(map);
                    self.map_full
                        .get_or_create(&[("map", map)])
                        .set(i64::from(full));
                }
                self.frontends_not_applied
                    .set(i64::try_from(report.failed.len()).unwrap_or(i64::MAX));
            }
            Err(_) => {
                self.sync_failures.inc();
            }
        }
        self.sync_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn record_publish(&self) {
        self.states_published.inc();
    }

    /// Every family of a watched resource gets its series at the first
    /// event, so a watch that never listed shows 0 lists.
    fn watched(&self, kind: Watched) -> StaticLabel {
        let label = [("resource", kind.label())];
        let _ = self.kube_lists.get_or_create(&label);
        let _ = self.kube_watch_errors.get_or_create(&label);
        let _ = self.kube_objects.get_or_create(&label);
        label
    }

    pub fn record_list(&self, kind: Watched, objects: usize) {
        let label = self.watched(kind);
        self.kube_lists.get_or_create(&label).inc();
        self.kube_objects.get_or_create(&label).set(count(objects));
    }

    pub fn record_objects(&self, kind: Watched, objects: usize) {
        let label = self.watched(kind);
        self.kube_objects.get_or_create(&label).set(count(objects));
    }

    pub fn record_watch_error(&self, kind: Watched) {
        let label = self.watched(kind);
        self.kube_watch_errors.get_or_create(&label).inc();
    }

    pub fn record_goaway(&self, reason: &'static str) {
        self.goaways.get_or_create(&[("reason", reason)]).inc();
    }

    /// `cause` is one of [`ABANDON_CAUSES`].
    pub fn record_move_abandoned(&self, cause: &'static str) {
        debug_assert!(ABANDON_CAUSES.contains(&cause), "{cause}");
        self.moves_abandoned
            .get_or_create(&[("cause", cause)])
            .inc();
    }

    /// A request made to a peer (`endpoint`: `subtree` or `cluster`) and
    /// the bytes of its answer.
    pub fn record_exchange_request(&self, endpoint: &'static str, bytes: usize) {
        let e = &self.exchange;
        e.requests.get_or_create(&[("endpoint", endpoint)]).inc();
        e.bytes
            .get_or_create(&[("direction", "received")])
            .inc_by(bytes as u64);
    }

    pub fn record_exchange_served(&self, endpoint: &'static str, bytes: usize) {
        let e = &self.exchange;
        e.served.get_or_create(&[("endpoint", endpoint)]).inc();
        e.bytes
            .get_or_create(&[("direction", "sent")])
            .inc_by(bytes as u64);
    }

    pub fn record_exchange_peer_error(&self, peer: &str, reason: &'static str) {
        self.exchange
            .peer_errors
            .get_or_create(&[("peer", peer.to_string()), ("reason", reason.to_string())])
            .inc();
    }

    /// Entries of the subtree and cluster views, and the age of the oldest
    /// answer in use.
    pub fn record_exchange_view(&self, subtree: usize, cluster: usize, age: Duration) {
        let e = &self.exchange;
        e.entries
            .get_or_create(&[("view", "subtree")])
            .set(count(subtree));
        e.entries
            .get_or_create(&[("view", "cluster")])
            .set(count(cluster));
        e.age.set(age.as_secs_f64());
    }

    /// Requests made and served so far (all endpoints), for tests.
    pub fn exchange_requests(&self) -> (u64, u64) {
        let sum = |family: &Family<StaticLabel, Counter>| {
            ["subtree", "cluster"]
                .iter()
                .filter_map(|e| family.get(&[("endpoint", *e)]).map(|c| c.get()))
                .sum()
        };
        (sum(&self.exchange.requests), sum(&self.exchange.served))
    }

    /// Errors counted for `peer` with `reason`, for tests.
    pub fn exchange_peer_errors(&self, peer: &str, reason: &'static str) -> u64 {
        self.exchange
            .peer_errors
            .get(&[("peer", peer.to_string()), ("reason", reason.to_string())])
            .map_or(0, |c| c.get())
    }

    /// Replaces the waiting moves (ended ones go).
    pub fn record_moves_waiting(&self, waiting: BTreeMap<(String, &'static str), u64>) {
        self.lock().moves_waiting = Arc::new(waiting);
    }

    /// Replaces the per-connection call rates (closed connections go).
    pub fn record_call_rates(&self, rates: BTreeMap<(String, String), f64>) {
        self.lock().call_rates = Arc::new(rates);
    }

    /// Registers the recorded metrics (handles sharing their values) in a
    /// scrape's registry.
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "grpclb_map_syncs",
            "Successful applications of a desired state to the maps",
            self.syncs.clone(),
        );
        registry.register(
            "grpclb_map_sync_failures",
            "Applications of a desired state that failed or left frontends out (retried)",
            self.sync_failures.clone(),
        );
        registry.register(
            "grpclb_ready",
            "1 while the programs are attached and the last sync applied the whole desired state",
            self.ready.clone(),
        );
        registry.register(
            "grpclb_map_full",
            "1 when the last sync found no room in the map for some frontend (see the log \
             for the --max-* flag that raises it)",
            self.map_full.clone(),
        );
        registry.register(
            "grpclb_map_sync_frontends_not_applied",
            "Frontends whose change the last sync could not make",
            self.frontends_not_applied.clone(),
        );
        registry.register(
            "grpclb_map_sync_duration_seconds",
            "Time to apply one desired state to the maps",
            self.sync_seconds.clone(),
        );
        registry.register(
            "grpclb_states_published",
            "Desired states the source published after coalescing bursts of changes",
            self.states_published.clone(),
        );
        registry.register(
            "grpclb_kube_lists",
            "Complete lists received per resource; every one after the first is a watch restart",
            self.kube_lists.clone(),
        );
        registry.register(
            "grpclb_kube_watch_errors",
            "API server errors per resource; each is retried with exponential backoff while the \
             maps keep their last state",
            self.kube_watch_errors.clone(),
        );
        registry.register(
            "grpclb_kube_objects",
            "Objects in the agent's store per resource",
            self.kube_objects.clone(),
        );
        registry.register(
            "grpclb_goaways",
            "GOAWAYs written into connections of this node's pods, per rebalancing reason",
            self.goaways.clone(),
        );
        registry.register(
            "grpclb_moves_abandoned",
            "Connections chosen to move that got no GOAWAY, per cause",
            self.moves_abandoned.clone(),
        );
        let e = &self.exchange;
        registry.register(
            "grpclb_exchange_requests",
            "Load exchange requests this agent made to its peers, per endpoint",
            e.requests.clone(),
        );
        registry.register(
            "grpclb_exchange_served",
            "Load exchange requests this agent answered, per endpoint",
            e.served.clone(),
        );
        registry.register(
            "grpclb_exchange_bytes",
            "Load exchange answer bytes received from peers and sent to them",
            e.bytes.clone(),
        );
        registry.register(
            "grpclb_exchange_peer_errors",
            "Load exchange answers not used, per peer node and reason (connect, timeout, status, \
             oversized, json, too_many, absurd; foreign counts dropped entries)",
            e.peer_errors.clone(),
        );
        registry.register(
            "grpclb_exchange_view_entries",
            "Pods in this agent's subtree and cluster views",
            e.entries.clone(),
        );
        registry.register(
            "grpclb_exchange_view_age_seconds",
            "Seconds since the oldest peer answer the cluster view still uses",
            e.age.clone(),
        );
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
