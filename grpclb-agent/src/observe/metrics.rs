//! Prometheus metrics and health endpoints on `--metrics-addr`.
//!
//! The source and the sync task record into [`Metrics`]; map contents are
//! read at scrape time (so connection counts are current) through a
//! callback. [`render`] turns both into the text exposition format and is
//! pure. `/healthz` answers while the process serves; `/readyz` is 200 while
//! the agent is ready (see `readiness`: programs attached, the last sync
//! applied the whole desired state), else 503 with the reason (the
//! DaemonSet's readiness probe).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use grpclb_common::frame::Phase;
use grpclb_common::{names, Backend, BackendSlotKey, ServiceKey, TrackedConnection};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::dataplane::sync::SyncReport;
use crate::dataplane::tables::ServiceTables;
use crate::observe::readiness::Readiness;
use crate::observe::status::{self, socket_label};

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9925";

/// Upper bounds (seconds) of the map sync latency histogram.
const SYNC_SECONDS_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// The kinds of Kubernetes object the kube source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Watched {
    Services,
    EndpointSlices,
}

impl Watched {
    pub fn label(self) -> &'static str {
        match self {
            Watched::Services => "services",
            Watched::EndpointSlices => "endpointslices",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Cumulative counts, one per [`SYNC_SECONDS_BUCKETS`] bound.
    pub buckets: [u64; SYNC_SECONDS_BUCKETS.len()],
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(SYNC_SECONDS_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.sum_seconds += seconds;
        self.count += 1;
    }
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

/// Everything recorded by the source and the sync task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub syncs: u64,
    pub sync_failures: u64,
    pub sync_seconds: Histogram,
    /// Desired states the source published (after coalescing).
    pub states_published: u64,
    pub watches: BTreeMap<Watched, WatchCounters>,
    /// GOAWAYs written into connections, per rebalancing reason.
    pub goaways: BTreeMap<&'static str, u64>,
    /// Moves given up, per cause (the gate's last answer, or why none came).
    pub moves_abandoned: BTreeMap<&'static str, u64>,
    /// Calls per second of each tracked connection of this node's pods, by
    /// (backend, client) `ip:port`, as the rebalancer last measured them.
    pub call_rates: BTreeMap<(String, String), f64>,
    /// The rule of each frontend and the Services left alone, as of the
    /// latest published state.
    pub selection: status::Selection,
    /// Moves reported as waiting, by (backend `ip:port`, last refusal).
    pub moves_waiting: BTreeMap<(String, &'static str), u64>,
    pub readiness: Readiness,
    /// Maps the last completed sync found too small, and the frontends it
    /// could not apply.
    pub full_maps: BTreeSet<&'static str>,
    pub frontends_not_applied: u64,
}

/// Shared between the source, the sync task and the metrics server.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // Counters stay consistent even if a holder panicked mid-update:
        // every update is a handful of additions.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Counters {
        self.lock().clone()
    }

    pub fn readiness(&self) -> Readiness {
        self.lock().readiness.clone()
    }

    pub fn set_readiness(&self, readiness: Readiness) {
        self.lock().readiness = readiness;
    }

    /// A sync that left frontends out counts as a failure.
    pub fn record_sync(&self, elapsed: Duration, outcome: Result<&SyncReport, &anyhow::Error>) {
        let mut c = self.lock();
        match outcome {
            Ok(report) => {
                if report.complete() {
                    c.syncs += 1;
                } else {
                    c.sync_failures += 1;
                }
                c.full_maps = report.full.keys().copied().collect();
                c.frontends_not_applied = report.failed.len() as u64;
            }
            Err(_) => c.sync_failures += 1,
        }
        c.sync_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn record_publish(&self) {
        self.lock().states_published += 1;
    }

    pub fn record_list(&self, kind: Watched, objects: usize) {
        let mut c = self.lock();
        let w = c.watches.entry(kind).or_default();
        w.lists += 1;
        w.objects = objects as u64;
    }

    pub fn record_objects(&self, kind: Watched, objects: usize) {
        self.lock().watches.entry(kind).or_default().objects = objects as u64;
    }

    pub fn record_watch_error(&self, kind: Watched) {
        self.lock().watches.entry(kind).or_default().errors += 1;
    }

    pub fn record_goaway(&self, reason: &'static str) {
        *self.lock().goaways.entry(reason).or_default() += 1;
    }

    pub fn record_move_abandoned(&self, cause: &'static str) {
        *self.lock().moves_abandoned.entry(cause).or_default() += 1;
    }

    pub fn record_selection(&self, state: &crate::state::model::DesiredState) {
        self.lock().selection = status::Selection::of(state);
    }

    /// Replaces the waiting moves (ended ones go).
    pub fn record_moves_waiting(&self, waiting: BTreeMap<(String, &'static str), u64>) {
        self.lock().moves_waiting = waiting;
    }

    /// Replaces the per-connection call rates (closed connections go).
    pub fn record_call_rates(&self, rates: BTreeMap<(String, String), f64>) {
        self.lock().call_rates = rates;
    }
}

/// Map sizes the agent was started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacities {
    pub frontends: u32,
    pub backend_slots: u32,
    pub backend_load: u32,
}

/// What the maps hold at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableGauges {
    /// (frontend name, `VIP:port`, eligible backends in its active set); a
    /// dual-stack Service port has one name and two addresses.
    pub frontends: Vec<(String, String, u64)>,
    /// (backend `ip:port`, live connections from this node)
    pub connections: Vec<(String, u64)>,
    /// (map name, entries, capacity)
    pub maps: Vec<(&'static str, u64, u32)>,
    /// Server-side frame tracking of this node's pods, per backend.
    pub local: BTreeMap<String, LocalBackendGauges>,
}

/// What the kernel's frame tracking saw for one local backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalBackendGauges {
    /// Open connections it follows.
    pub tracked: u64,
    /// Open connections it gave up on (not HTTP/2 as expected, or unseen bytes).
    pub untracked: u64,
    /// Responses sent since the agent started (END_STREAM: one
    /// per completed gRPC call), over tracked connections.
    pub responses: u64,
}

/// Turns the per-connection response counts the kernel keeps (which vanish
/// when a connection closes) into monotonic per-backend totals.
#[derive(Debug, Default)]
pub struct ResponseTotals {
    /// Last count seen per socket cookie.
    last: BTreeMap<u64, u64>,
    totals: BTreeMap<Backend, u64>,
}

impl ResponseTotals {
    /// Adds what each connection answered since the previous call and
    /// returns the gauges per backend. Responses a connection sent between
    /// the previous call and its close are not seen.
    pub fn update(
        &mut self,
        connections: &[(u64, TrackedConnection)],
    ) -> BTreeMap<String, LocalBackendGauges> {
        let mut gauges: BTreeMap<Backend, LocalBackendGauges> = BTreeMap::new();
        let mut last = BTreeMap::new();
        for (cookie, connection) in connections {
            let responses = connection.tracker.responses();
            let before = self.last.get(cookie).copied().unwrap_or(0);
            *self.totals.entry(connection.backend).or_insert(0) += responses.saturating_sub(before);
            last.insert(*cookie, responses);
            let gauge = gauges.entry(connection.backend).or_default();
            if connection.tracker.phase() == Phase::Untracked {
                gauge.untracked += 1;
            } else {
                gauge.tracked += 1;
            }
        }
        self.last = last;
        for (backend, total) in &self.totals {
            gauges.entry(*backend).or_default().responses = *total;
        }
        gauges
            .into_iter()
            .map(|(backend, gauge)| (socket_label(&backend.addr, backend.port), gauge))
            .collect()
    }
}

impl TableGauges {
    pub fn collect<T: ServiceTables>(tables: &T, capacities: MapCapacities) -> Result<Self> {
        let status = status::collect(tables)?;
        let frontends = status
            .frontends
            .iter()
            .map(|f| {
                let address = socket_label(&f.key.addr, f.key.port);
                let name = if f.name.is_empty() {
                    address.clone()
                } else {
                    f.name.clone()
                };
                (name, address, f.backends.len() as u64)
            })
            .collect();
        let loads = tables.loads().context("reading BACKEND_LOAD")?;
        let connections = loads
            .iter()
            .map(|(b, count)| (socket_label(&b.addr, b.port), *count))
            .collect();
        let mut slot_entries = 0;
        for f in &status.frontends {
            for slot in 0..2 {
                slot_entries += slot_len(tables, &f.key, slot)?;
            }
        }
        Ok(TableGauges {
            local: BTreeMap::new(),
            frontends,
            connections,
            maps: vec![
                (
                    "FRONTENDS",
                    status.frontends.len() as u64,
                    capacities.frontends,
                ),
                ("BACKEND_SLOTS", slot_entries, capacities.backend_slots),
                ("BACKEND_LOAD", loads.len() as u64, capacities.backend_load),
            ],
        })
    }
}

/// Entries in one slot: the sync keeps each slot a contiguous run `0..m`.
fn slot_len<T: ServiceTables>(tables: &T, service: &ServiceKey, slot: u32) -> Result<u64> {
    let mut index = 0;
    while tables
        .slot(&BackendSlotKey {
            service: *service,
            slot,
            index,
        })
        .context("reading BACKEND_SLOTS")?
        .is_some()
    {
        index += 1;
    }
    Ok(u64::from(index))
}

/// The Prometheus text exposition of `counters` and, when the maps could be
/// read, `tables`.
pub fn render(counters: &Counters, tables: Option<&TableGauges>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let plain = |v: u64| vec![(String::new(), v.to_string())];
    family(
        "grpclb_map_syncs_total",
        "counter",
        "Successful applications of a desired state to the maps.",
        &plain(counters.syncs),
    );
    family(
        "grpclb_map_sync_failures_total",
        "counter",
        "Applications of a desired state that failed or left frontends out (retried).",
        &plain(counters.sync_failures),
    );
    family(
        "grpclb_ready",
        "gauge",
        "1 while the programs are attached and the last sync applied the whole desired state.",
        &plain(u64::from(counters.readiness.ready)),
    );
    let full: Vec<(String, String)> = [
        names::FRONTENDS,
        names::SERVICE_NAMES,
        names::BACKEND_SLOTS,
        names::BACKEND_LOAD,
    ]
    .iter()
    .map(|map| {
        let full = counters.full_maps.contains(map);
        (labels(&[("map", map)]), u64::from(full).to_string())
    })
    .collect();
    family(
        "grpclb_map_full",
        "gauge",
        "1 when the last sync found no room in the map for some frontend (see the log \
         for the --max-* flag that raises it).",
        &full,
    );
    family(
        "grpclb_map_sync_frontends_not_applied",
        "gauge",
        "Frontends whose change the last sync could not make.",
        &plain(counters.frontends_not_applied),
    );
    let h = &counters.sync_seconds;
    let mut samples: Vec<(String, String)> = SYNC_SECONDS_BUCKETS
        .iter()
        .zip(h.buckets)
        .map(|(bound, n)| (format!("_bucket{{le=\"{bound}\"}}"), n.to_string()))
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
    samples.push(("_sum".into(), h.sum_seconds.to_string()));
    samples.push(("_count".into(), h.count.to_string()));
    family(
        "grpclb_map_sync_duration_seconds",
        "histogram",
        "Time to apply one desired state to the maps.",
        &samples,
    );
    family(
        "grpclb_states_published_total",
        "counter",
        "Desired states the source published after coalescing bursts of changes.",
        &plain(counters.states_published),
    );
    let per_watch = |value: fn(&WatchCounters) -> u64| -> Vec<(String, String)> {
        counters
            .watches
            .iter()
            .map(|(kind, w)| (labels(&[("resource", kind.label())]), value(w).to_string()))
            .collect()
    };
    family(
        "grpclb_kube_lists_total",
        "counter",
        "Complete lists received per resource; every one after the first is a watch restart.",
        &per_watch(|w| w.lists),
    );
    family(
        "grpclb_kube_watch_errors_total",
        "counter",
        "API server errors per resource; each is retried with exponential backoff while the maps keep their last state.",
        &per_watch(|w| w.errors),
    );
    family(
        "grpclb_kube_objects",
        "gauge",
        "Objects in the agent's store per resource.",
        &per_watch(|w| w.objects),
    );
    let per_label = |counts: &BTreeMap<&'static str, u64>, key: &str| -> Vec<(String, String)> {
        counts
            .iter()
            .map(|(label, n)| (labels(&[(key, label)]), n.to_string()))
            .collect()
    };
    family(
        "grpclb_goaways_total",
        "counter",
        "GOAWAYs written into connections of this node's pods, per rebalancing reason.",
        &per_label(&counters.goaways, "reason"),
    );
    family(
        "grpclb_moves_abandoned_total",
        "counter",
        "Connections chosen to move that got no GOAWAY, per cause.",
        &per_label(&counters.moves_abandoned, "cause"),
    );
    let waiting: Vec<(String, String)> = counters
        .moves_waiting
        .iter()
        .map(|((backend, cause), n)| {
            let labels = labels(&[("backend", backend), ("cause", cause)]);
            (labels, n.to_string())
        })
        .collect();
    family(
        "grpclb_moves_waiting",
        "gauge",
        "Drains of this node's pods the gate has refused for 5 s and more, still tried, per pod and last refusal (send_queue_busy: a reader slower than the pod, with large HTTP/2 windows).",
        &waiting,
    );
    let rates: Vec<(String, String)> = counters
        .call_rates
        .iter()
        .map(|((backend, client), rate)| {
            let labels = labels(&[("backend", backend), ("client", client)]);
            (labels, format!("{rate:.1}"))
        })
        .collect();
    family(
        "grpclb_local_connection_calls_per_second",
        "gauge",
        "Completed calls per second of each tracked connection of this node's pods (the rebalancer's measure, smoothed over about a second).",
        &rates,
    );
    let mut per_pod: BTreeMap<&str, f64> = BTreeMap::new();
    for ((backend, _), rate) in &counters.call_rates {
        *per_pod.entry(backend).or_insert(0.0) += rate;
    }
    let per_pod: Vec<(String, String)> = per_pod
        .into_iter()
        .map(|(backend, rate)| (labels(&[("backend", backend)]), format!("{rate:.1}")))
        .collect();
    family(
        "grpclb_local_calls_per_second",
        "gauge",
        "Completed calls per second of each pod of this node over its tracked connections.",
        &per_pod,
    );
    family(
        "grpclb_frontend_rule",
        "gauge",
        "1 for the rule that chose each frontend's endpoints (ready, terminating-fallback, local-only, zone hints Z, node hints N, ...).",
        &counters
            .selection
            .rules
            .iter()
            .map(|(address, rule)| (labels(&[("address", address), ("rule", rule)]), "1".into()))
            .collect::<Vec<_>>(),
    );
    family(
        "grpclb_service_not_balanced",
        "gauge",
        "1 for each Service with balanced ports that grpclb leaves to another proxy, and why.",
        &counters
            .selection
            .not_balanced
            .iter()
            .map(|(service, reason)| {
                (
                    labels(&[("service", service), ("reason", reason)]),
                    "1".into(),
                )
            })
            .collect::<Vec<_>>(),
    );
    let Some(tables) = tables else {
        return out;
    };
    family(
        "grpclb_frontends",
        "gauge",
        "Balanced (ClusterIP, port) frontends in the maps.",
        &plain(tables.frontends.len() as u64),
    );
    family(
        "grpclb_backends",
        "gauge",
        "Eligible backends summed over all frontends.",
        &plain(tables.frontends.iter().map(|(_, _, n)| n).sum()),
    );
    family(
        "grpclb_frontend_backends",
        "gauge",
        "Eligible backends of each frontend.",
        &tables
            .frontends
            .iter()
            .map(|(name, address, n)| {
                (
                    labels(&[("frontend", name), ("address", address)]),
                    n.to_string(),
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        "grpclb_backend_connections",
        "gauge",
        "Live balanced connections from this node to each backend.",
        &tables
            .connections
            .iter()
            .map(|(backend, n)| (labels(&[("backend", backend)]), n.to_string()))
            .collect::<Vec<_>>(),
    );
    family(
        "grpclb_map_entries",
        "gauge",
        "Entries in each eBPF map.",
        &tables
            .maps
            .iter()
            .map(|(map, n, _)| (labels(&[("map", map)]), n.to_string()))
            .collect::<Vec<_>>(),
    );
    let local = |value: fn(&LocalBackendGauges) -> u64| {
        tables
            .local
            .iter()
            .map(|(backend, g)| (labels(&[("backend", backend)]), value(g).to_string()))
            .collect::<Vec<_>>()
    };
    family(
        "grpclb_local_responses_total",
        "counter",
        "Responses a pod on this node sent on tracked connections (HTTP/2 frames with END_STREAM: one per completed gRPC call or HTTP/2 response).",
        &local(|g| g.responses),
    );
    family(
        "grpclb_local_tracked_connections",
        "gauge",
        "Open connections of a pod on this node whose HTTP/2 frames the kernel follows.",
        &local(|g| g.tracked),
    );
    family(
        "grpclb_local_untracked_connections",
        "gauge",
        "Open connections of a pod on this node the kernel stopped following (not HTTP/2 as expected, e.g. TLS, or bytes it did not see).",
        &local(|g| g.untracked),
    );
    family(
        "grpclb_map_capacity",
        "gauge",
        "Maximum entries of each eBPF map.",
        &tables
            .maps
            .iter()
            .map(|(map, _, cap)| (labels(&[("map", map)]), cap.to_string()))
            .collect::<Vec<_>>(),
    );
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Reads the maps for a scrape; `None` when they cannot be read (the
/// counters are still served).
pub type GaugeReader = Arc<dyn Fn() -> Result<TableGauges> + Send + Sync>;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr}"))
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/selection` (for
/// `status`) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, gauges: GaugeReader) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let gauges = gauges.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &metrics, &gauges);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection from {peer}: {e}");
            }
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    gauges: &GaugeReader,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let tables = match gauges() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("metrics: reading the maps failed: {e:#}");
                    None
                }
            };
            let mut response = text(StatusCode::OK, render(&metrics.snapshot(), tables.as_ref()));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/selection" => text(StatusCode::OK, metrics.snapshot().selection.to_text()),
        "/readyz" => match metrics.readiness() {
            r if r.ready => text(StatusCode::OK, "ready\n".into()),
            r => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", r.reason),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz, /readyz or /selection\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::sync::apply;
    use crate::dataplane::tables::MemoryTables;
    use crate::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
    use crate::state::topology::Rule;
    use grpclb_common::{Addr, Backend};

    const CAPACITIES: MapCapacities = MapCapacities {
        frontends: 100,
        backend_slots: 1000,
        backend_load: 500,
    };

    fn tables_with(sets: &[&[u8]]) -> MemoryTables {
        let mut t = MemoryTables::default();
        for sets in sets {
            let mut state = DesiredState::default();
            state.services.insert(
                ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 50051),
                DesiredService {
                    name: "apps/echo:grpc".into(),
                    endpoints: sets
                        .iter()
                        .map(|n| Endpoint {
                            backend: Backend::new(Addr::from_v4([10, 0, 0, *n]), 8080),
                            node_name: None,
                            condition: EndpointCondition::Ready,
                        })
                        .collect(),
                    track_frames: false,
                    rule: Rule::Ready,
                }
                .into(),
            );
            apply(&mut t, &state).unwrap();
        }
        t
    }

    #[test]
    fn gauges_count_both_slots_and_report_loads() {
        // Second apply fills slot 0 with one backend; slot 1 keeps three.
        let mut t = tables_with(&[&[1, 2, 3], &[1]]);
        *t.loads
            .get_mut(&Backend::new(Addr::from_v4([10, 0, 0, 1]), 8080))
            .unwrap() = 7;
        let g = TableGauges::collect(&t, CAPACITIES).unwrap();
        assert_eq!(
            g.frontends,
            vec![(
                "apps/echo:grpc".to_string(),
                "10.96.0.1:50051".to_string(),
                1
            )]
        );
        assert_eq!(g.connections, vec![("10.0.0.1:8080".to_string(), 7)]);
        assert_eq!(
            g.maps,
            vec![
                ("FRONTENDS", 1, 100),
                ("BACKEND_SLOTS", 4, 1000),
                ("BACKEND_LOAD", 1, 500)
            ]
        );
    }

    #[test]
    fn render_exposes_counters_histogram_and_tables() {
        let metrics = Metrics::default();
        metrics.record_sync(Duration::from_millis(3), Ok(&SyncReport::default()));
        metrics.record_sync(
            Duration::from_millis(700),
            Err(&anyhow::anyhow!("map full")),
        );
        metrics.record_list(Watched::Services, 4);
        metrics.record_list(Watched::Services, 5);
        metrics.record_watch_error(Watched::EndpointSlices);
        metrics.record_objects(Watched::EndpointSlices, 2);
        metrics.record_publish();
        metrics.record_goaway("drain");
        metrics.record_move_abandoned("socket_gone");
        metrics.record_moves_waiting(BTreeMap::from([(
            ("10.244.0.1:8080".to_string(), "send_queue_busy"),
            2,
        )]));
        metrics.record_call_rates(BTreeMap::from([
            (("10.244.0.1:8080".into(), "10.244.1.9:40000".into()), 120.0),
            (("10.244.0.1:8080".into(), "10.244.1.9:40002".into()), 80.25),
        ]));
        metrics.set_readiness(Readiness::ready());
        let tables = TableGauges {
            frontends: vec![
                ("a/b:grpc".into(), "10.96.0.1:80".into(), 2),
                ("a/b:grpc".into(), "[fd00::1]:80".into(), 2),
                ("a/\"q\":1".into(), "10.96.0.2:1".into(), 1),
            ],
            connections: vec![("10.0.0.1:80".into(), 3)],
            maps: vec![("FRONTENDS", 2, 100)],
            local: BTreeMap::from([(
                "10.244.0.1:8080".to_string(),
                LocalBackendGauges {
                    tracked: 2,
                    untracked: 1,
                    responses: 40,
                },
            )]),
        };
        let text = render(&metrics.snapshot(), Some(&tables));
        for line in [
            "grpclb_map_syncs_total 1",
            "grpclb_map_sync_failures_total 1",
            "grpclb_map_sync_duration_seconds_bucket{le=\"0.001\"} 0",
            "grpclb_map_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "grpclb_map_sync_duration_seconds_bucket{le=\"0.5\"} 1",
            "grpclb_map_sync_duration_seconds_bucket{le=\"1\"} 2",
            "grpclb_map_sync_duration_seconds_bucket{le=\"+Inf\"} 2",
            "grpclb_map_sync_duration_seconds_count 2",
            "grpclb_ready 1",
            "grpclb_map_full{map=\"BACKEND_SLOTS\"} 0",
            "grpclb_map_sync_frontends_not_applied 0",
            "grpclb_states_published_total 1",
            "grpclb_kube_lists_total{resource=\"services\"} 2",
            "grpclb_kube_lists_total{resource=\"endpointslices\"} 0",
            "grpclb_kube_watch_errors_total{resource=\"endpointslices\"} 1",
            "grpclb_kube_objects{resource=\"services\"} 5",
            "grpclb_frontends 3",
            "grpclb_backends 5",
            "grpclb_frontend_backends{frontend=\"a/b:grpc\",address=\"10.96.0.1:80\"} 2",
            "grpclb_frontend_backends{frontend=\"a/b:grpc\",address=\"[fd00::1]:80\"} 2",
            "grpclb_frontend_backends{frontend=\"a/\\\"q\\\":1\",address=\"10.96.0.2:1\"} 1",
            "grpclb_backend_connections{backend=\"10.0.0.1:80\"} 3",
            "grpclb_map_entries{map=\"FRONTENDS\"} 2",
            "grpclb_map_capacity{map=\"FRONTENDS\"} 100",
            "grpclb_local_responses_total{backend=\"10.244.0.1:8080\"} 40",
            "grpclb_local_tracked_connections{backend=\"10.244.0.1:8080\"} 2",
            "grpclb_local_untracked_connections{backend=\"10.244.0.1:8080\"} 1",
            "# TYPE grpclb_map_sync_duration_seconds histogram",
            "grpclb_goaways_total{reason=\"drain\"} 1",
            "grpclb_moves_abandoned_total{cause=\"socket_gone\"} 1",
            "grpclb_moves_waiting{backend=\"10.244.0.1:8080\",cause=\"send_queue_busy\"} 2",
            "grpclb_local_connection_calls_per_second{backend=\"10.244.0.1:8080\",client=\"10.244.1.9:40000\"} 120.0",
            "grpclb_local_connection_calls_per_second{backend=\"10.244.0.1:8080\",client=\"10.244.1.9:40002\"} 80.2",
            "grpclb_local_calls_per_second{backend=\"10.244.0.1:8080\"} 200.2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        let sum_line = text
            .lines()
            .find(|l| l.starts_with("grpclb_map_sync_duration_seconds_sum "))
            .unwrap();
        let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 0.703).abs() < 1e-9, "{sum_line}");
    }

    #[test]
    fn render_without_tables_still_serves_counters() {
        let text = render(&Counters::default(), None);
        assert!(text.contains("grpclb_map_syncs_total 0\n"));
        assert!(!text.contains("grpclb_frontends"));
    }

    fn tracked(backend: u8, responses: usize, untracked: bool) -> TrackedConnection {
        let backend = Backend::new(Addr::from_v4([10, 244, 0, backend]), 8080);
        let mut connection = crate::testing::answered(backend, responses);
        if untracked {
            connection.tracker = grpclb_common::frame::FrameTracker::new();
            connection.tracker.observe(0, b"HTTP/1.1 200 OK\r\n");
        }
        connection
    }

    #[test]
    fn response_totals_only_grow_and_survive_closed_connections() {
        let mut totals = ResponseTotals::default();
        let g = totals.update(&[
            (1, tracked(1, 3, false)),
            (2, tracked(1, 2, false)),
            (3, tracked(2, 0, true)),
        ]);
        assert_eq!(
            g["10.244.0.1:8080"],
            LocalBackendGauges {
                tracked: 2,
                untracked: 0,
                responses: 5
            }
        );
        assert_eq!(
            g["10.244.0.2:8080"],
            LocalBackendGauges {
                tracked: 0,
                untracked: 1,
                responses: 0
            }
        );
        // Connection 1 answered 4 more, then connection 2 closed.
        let g = totals.update(&[(1, tracked(1, 7, false))]);
        assert_eq!(
            g["10.244.0.1:8080"],
            LocalBackendGauges {
                tracked: 1,
                untracked: 0,
                responses: 9
            }
        );
        // Every connection closed: the total stays.
        let g = totals.update(&[]);
        assert_eq!(g["10.244.0.1:8080"].responses, 9);
        assert_eq!(g["10.244.0.1:8080"].tracked, 0);
    }

    #[tokio::test]
    async fn server_answers_metrics_health_readiness_and_selection() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let gauges: GaugeReader =
            Arc::new(|| TableGauges::collect(&tables_with(&[&[1, 2]]), CAPACITIES));
        let server = tokio::spawn(serve(listener, metrics.clone(), gauges));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: starting\n".into())
        );
        metrics.set_readiness(Readiness::ready());
        assert_eq!(get(addr, "/readyz").await.0, 200);
        metrics.set_readiness(Readiness::not_ready("FRONTENDS is full"));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: FRONTENDS is full\n".into())
        );
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("grpclb_frontend_backends{frontend=\"apps/echo:grpc\",address=\"10.96.0.1:50051\"} 2"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
        let mut state = DesiredState::default();
        state.not_balanced.insert(
            "apps/sticky".into(),
            "sessionAffinity: ClientIP: left to kube-proxy".into(),
        );
        metrics.record_selection(&state);
        let fetched = tokio::task::spawn_blocking(move || status::fetch_selection(addr))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fetched, status::Selection::of(&state));
        let (_, body) = get(addr, "/metrics").await;
        assert!(
            body.contains("grpclb_service_not_balanced{service=\"apps/sticky\",reason=\"sessionAffinity: ClientIP: left to kube-proxy\"} 1"),
            "{body}"
        );
        server.abort();
    }

    /// A minimal HTTP/1.0 client: status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }
}
