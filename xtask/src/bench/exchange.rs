//! `cargo xtask bench exchange`: what the load exchange costs each node, on
//! simulated clusters of N and 2N nodes (issue 12): one agent per node with
//! its own cgroup, bpffs and loopback InternalIP, the exchange on with its
//! defaults. The figures come from the agents' own counters
//! (`grpclb_exchange_requests_total`, `_served_total`, `_bytes_total`), read
//! from every agent's `/metrics` before and after each phase:
//! - idle: nothing changes, every answer is a `304 Not Modified`;
//! - churn: client nodes connect one after another and the connections
//!   close at the end of each round ([`Placement`] trials), so pod loads
//!   change all the time and deltas flow.
//!
//! The design (docs/exchange.md) says requests per node and bytes per
//! request do not grow with the node count; the table shows whether they do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::multinode::{Placement, PlacementSpec};
use prometheus_parse::{Scrape, Value};
use serde::Serialize;

use crate::simulation;

/// Between client nodes' connects in the churn phase.
const CHURN_SPACING: Duration = Duration::from_millis(250);
/// Services (one per [`Placement`] trial), each with every pod as endpoint.
const SERVICES: usize = 4;
const PODS_PER_SERVER_NODE: usize = 2;
/// How long the first full answers may take to reach every agent.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent's defaults, passed explicitly so the design figures printed
/// next to the measured ones are those of the agents measured.
const INTERVAL_MS: u64 = 250;
const FANOUT: usize = 16;

/// Requests per interval the design predicts per node, (mean, busiest): in
/// the F-ary tree of docs/exchange.md node i asks each of its children and
/// its parent (the root has none), and serves as many requests.
pub fn tree_requests_per_interval(nodes: usize, fanout: usize) -> (f64, f64) {
    let requests = |i: usize| {
        let children = (fanout * i + 1..=fanout * i + fanout)
            .filter(|&c| c < nodes)
            .count();
        children + usize::from(i > 0)
    };
    let total: usize = (0..nodes).map(requests).sum();
    let busiest = (0..nodes).map(requests).max().unwrap_or(0);
    (total as f64 / nodes.max(1) as f64, busiest as f64)
}

/// One agent's exchange counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counters {
    /// Requests this agent made to its peers.
    pub made: f64,
    /// Requests it answered.
    pub served: f64,
    /// Answer bodies received from peers, bytes.
    pub received_bytes: f64,
    pub sent_bytes: f64,
    /// Answers not used, per reason (all peers).
    pub peer_errors: BTreeMap<String, f64>,
    /// Pods in the agent's cluster view.
    pub cluster_entries: f64,
}

impl Counters {
    /// From an agent's `/metrics` (Prometheus text).
    pub fn parse(metrics: &str) -> Result<Counters> {
        let scrape = Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
            .context("parsing the agent's /metrics")?;
        let sum = |name: &str, label: Option<(&str, &str)>| -> f64 {
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == name)
                .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .filter_map(|s| number(&s.value))
                .sum()
        };
        Ok(Counters {
            made: sum("grpclb_exchange_requests_total", None),
            served: sum("grpclb_exchange_served_total", None),
            received_bytes: sum(
                "grpclb_exchange_bytes_total",
                Some(("direction", "received")),
            ),
            sent_bytes: sum("grpclb_exchange_bytes_total", Some(("direction", "sent"))),
            peer_errors: scrape
                .samples
                .iter()
                .filter(|s| s.metric == "grpclb_exchange_peer_errors_total")
                .fold(BTreeMap::new(), |mut reasons, s| {
                    if let (Some(reason), Some(v)) = (s.labels.get("reason"), number(&s.value)) {
                        *reasons.entry(reason.to_string()).or_insert(0.0) += v;
                    }
                    reasons
                }),
            cluster_entries: sum("grpclb_exchange_view_entries", Some(("view", "cluster"))),
        })
    }
}

/// A counter's or a gauge's value, whichever type the parser gave it.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        _ => None,
    }
}

/// One phase on one cluster: per-node rates over the phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub nodes: usize,
    pub pods: usize,
    pub phase: String,
    pub seconds: f64,
    pub made_per_node_mean: f64,
    pub made_per_node_max: f64,
    pub served_per_node_mean: f64,
    pub served_per_node_max: f64,
    /// Answer body bytes per request made, all nodes together.
    pub bytes_per_request: f64,
    /// Answer body bytes received per second, mean over nodes.
    pub received_bytes_per_node_per_second: f64,
    /// The busiest node's answer body bytes sent per second.
    pub sent_bytes_per_second_max: f64,
    /// Requests per second per node made (and served) by design: mean,
    /// busiest.
    pub design_per_node_mean: f64,
    pub design_per_node_max: f64,
    /// Answers not used during the phase, per reason.
    pub peer_errors: BTreeMap<String, f64>,
}

/// Rates from the counters of every node before and after a phase.
pub fn row(
    nodes: usize,
    pods: usize,
    phase: &str,
    seconds: f64,
    before: &[Counters],
    after: &[Counters],
) -> Row {
    let deltas: Vec<Counters> = before
        .iter()
        .zip(after)
        .map(|(b, a)| Counters {
            made: a.made - b.made,
            served: a.served - b.served,
            received_bytes: a.received_bytes - b.received_bytes,
            sent_bytes: a.sent_bytes - b.sent_bytes,
            peer_errors: a
                .peer_errors
                .iter()
                .map(|(reason, n)| {
                    let before = b.peer_errors.get(reason).copied().unwrap_or(0.0);
                    (reason.clone(), n - before)
                })
                .filter(|(_, n)| *n > 0.0)
                .collect(),
            cluster_entries: a.cluster_entries,
        })
        .collect();
    let n = deltas.len().max(1) as f64;
    let per_second = |f: fn(&Counters) -> f64| -> (f64, f64) {
        let values: Vec<f64> = deltas.iter().map(|d| f(d) / seconds).collect();
        let mean = values.iter().sum::<f64>() / n;
        (mean, values.iter().copied().fold(0.0, f64::max))
    };
    let (made_mean, made_max) = per_second(|d| d.made);
    let (served_mean, served_max) = per_second(|d| d.served);
    let (received_mean, _) = per_second(|d| d.received_bytes);
    let (_, sent_max) = per_second(|d| d.sent_bytes);
    let made: f64 = deltas.iter().map(|d| d.made).sum();
    let (design_mean, design_max) = tree_requests_per_interval(nodes, FANOUT);
    let per_second = 1000.0 / INTERVAL_MS as f64;
    let mut peer_errors = BTreeMap::new();
    for d in &deltas {
        for (reason, n) in &d.peer_errors {
            *peer_errors.entry(reason.clone()).or_insert(0.0) += n;
        }
    }
    let received: f64 = deltas.iter().map(|d| d.received_bytes).sum();
    Row {
        nodes,
        pods,
        phase: phase.into(),
        seconds,
        made_per_node_mean: made_mean,
        made_per_node_max: made_max,
        served_per_node_mean: served_mean,
        served_per_node_max: served_max,
        bytes_per_request: if made > 0.0 { received / made } else { 0.0 },
        received_bytes_per_node_per_second: received_mean,
        sent_bytes_per_second_max: sent_max,
        design_per_node_mean: design_mean * per_second,
        design_per_node_max: design_max * per_second,
        peer_errors,
    }
}

pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| nodes | pods | phase | requests/s per node, made (mean / max) | served (mean / max) | design (mean / max) | body bytes per request | bytes/s received per node (mean) | bytes/s sent (busiest node) | answers not used |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} | {:.0} | {:.0} | {} |",
            r.nodes,
            r.pods,
            r.phase,
            r.made_per_node_mean,
            r.made_per_node_max,
            r.served_per_node_mean,
            r.served_per_node_max,
            r.design_per_node_mean,
            r.design_per_node_max,
            r.bytes_per_request,
            r.received_bytes_per_node_per_second,
            r.sent_bytes_per_second_max,
            errors_text(&r.peer_errors)
        );
    }
    out
}

/// `0`, or `timeout 3, status 1`.
fn errors_text(errors: &BTreeMap<String, f64>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = errors.iter().map(|(r, n)| format!("{r} {n:.0}")).collect();
    parts.join(", ")
}

#[derive(Serialize)]
struct ReportJson {
    kernel: String,
    seconds_per_phase: u64,
    rows: Vec<Row>,
}

pub fn run(nodes: Vec<usize>, seconds: u64) -> Result<()> {
    if let Some(&n) = nodes.iter().find(|&&n| n < 2) {
        bail!("--nodes {n}: the exchange needs at least 2 nodes");
    }
    let out_dir = simulation::prepare("cargo xtask bench exchange", "bench")?;
    let phase = Duration::from_secs(seconds);
    let mut rows = Vec::new();
    for &n in &nodes {
        let spec = PlacementSpec {
            nodes: n,
            server_nodes: (n / 4).max(1),
            pods_per_server_node: PODS_PER_SERVER_NODE,
            clients_per_node: 1,
            trials: SERVICES,
            agent_args: vec![
                format!("--exchange-interval={INTERVAL_MS}"),
                format!("--exchange-fanout={FANOUT}"),
            ],
        };
        let pods = spec.server_nodes * spec.pods_per_server_node;
        println!(
            "exchange: {n} nodes, {pods} pods on {} of them, {SERVICES} Services",
            spec.server_nodes
        );
        let mut placement = Placement::new("bench-exchange", &spec)?;
        settle(&mut placement, pods * SERVICES)?;

        rows.push(measure(&mut placement, pods, "idle", |_| {
            simulation::sleep(phase)
        })?);
        rows.push(measure(&mut placement, pods, "churn", |placement| {
            let start = Instant::now();
            let mut round = 0;
            while start.elapsed() < phase {
                simulation::check_interrupted()?;
                placement
                    .trial(round % SERVICES, 1, CHURN_SPACING)
                    .with_context(|| placement.cluster.agent_logs())?;
                round += 1;
            }
            Ok(())
        })?);
    }
    let table = render_table(&rows);
    println!("\nLoad exchange cost per node (answer bodies; HTTP headers not counted):\n{table}");
    let json = ReportJson {
        kernel: simulation::kernel_release(),
        seconds_per_phase: seconds,
        rows,
    };
    let md = out_dir.join("exchange.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    let path = out_dir.join("exchange.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written: {}\nwritten: {}", md.display(), path.display());
    Ok(())
}

/// Every agent's counters, node by node.
/// The row of one phase (`work`): every agent's counters before and after
/// it, printed as soon as measured.
fn measure(
    placement: &mut Placement,
    pods: usize,
    phase: &str,
    work: impl FnOnce(&mut Placement) -> Result<()>,
) -> Result<Row> {
    let before = counters(placement)?;
    let start = Instant::now();
    work(placement)?;
    let after = counters(placement)?;
    let nodes = placement.cluster.node_count();
    let row = row(
        nodes,
        pods,
        phase,
        start.elapsed().as_secs_f64(),
        &before,
        &after,
    );
    println!("{}", render_table(std::slice::from_ref(&row)));
    Ok(row)
}

fn counters(placement: &mut Placement) -> Result<Vec<Counters>> {
    (0..placement.cluster.node_count())
        .map(|i| Counters::parse(&placement.cluster.agent_get(i, "/metrics")?))
        .collect()
}

/// Waits until every agent's cluster view holds every pod of every Service:
/// the first (full) answers are in, and what follows is the steady state.
fn settle(placement: &mut Placement, entries: usize) -> Result<()> {
    grpclb_tests::wait_until(
        &format!("every agent's cluster view to hold {entries} pods"),
        SETTLE_TIMEOUT,
        || {
            simulation::check_interrupted()?;
            Ok(counters(placement)?
                .iter()
                .all(|c| c.cluster_entries as usize == entries)
                .then_some(()))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP grpclb_exchange_requests Load exchange requests.
# TYPE grpclb_exchange_requests counter
grpclb_exchange_requests_total{endpoint=\"subtree\"} 30
grpclb_exchange_requests_total{endpoint=\"cluster\"} 10
# TYPE grpclb_exchange_served counter
grpclb_exchange_served_total{endpoint=\"subtree\"} 12
# TYPE grpclb_exchange_bytes counter
grpclb_exchange_bytes_total{direction=\"received\"} 4000
grpclb_exchange_bytes_total{direction=\"sent\"} 1500
# TYPE grpclb_exchange_peer_errors counter
grpclb_exchange_peer_errors_total{peer=\"n3\",reason=\"timeout\"} 2
# TYPE grpclb_exchange_view_entries gauge
grpclb_exchange_view_entries{view=\"subtree\"} 4
grpclb_exchange_view_entries{view=\"cluster\"} 32
# TYPE grpclb_exchange_requests_totally_else gauge
grpclb_exchange_requests_totally_else 99
# EOF
";

    #[test]
    fn counters_add_up_every_series_of_a_metric() {
        let c = Counters::parse(METRICS).unwrap();
        assert_eq!(
            c,
            Counters {
                made: 40.0,
                served: 12.0,
                received_bytes: 4000.0,
                sent_bytes: 1500.0,
                peer_errors: BTreeMap::from([("timeout".to_string(), 2.0)]),
                cluster_entries: 32.0,
            }
        );
        assert_eq!(Counters::parse("").unwrap(), Counters::default());
    }

    fn at(made: f64, served: f64, received: f64, sent: f64) -> Counters {
        Counters {
            made,
            served,
            received_bytes: received,
            sent_bytes: sent,
            ..Counters::default()
        }
    }

    #[test]
    fn a_row_is_per_node_rates_over_the_phase() {
        let before = [at(10.0, 10.0, 100.0, 0.0), at(0.0, 0.0, 0.0, 0.0)];
        let after = [
            at(30.0, 20.0, 2100.0, 500.0),
            at(20.0, 60.0, 1000.0, 3500.0),
        ];
        let mut after = after;
        after[1].peer_errors = BTreeMap::from([("timeout".to_string(), 3.0)]);
        let r = row(2, 4, "churn", 10.0, &before, &after);
        assert_eq!((r.made_per_node_mean, r.made_per_node_max), (2.0, 2.0));
        assert_eq!((r.served_per_node_mean, r.served_per_node_max), (3.5, 6.0));
        // 3000 bytes over 40 requests.
        assert_eq!(r.bytes_per_request, 75.0);
        assert_eq!(r.received_bytes_per_node_per_second, 150.0);
        assert_eq!(r.sent_bytes_per_second_max, 350.0);
        let table = render_table(&[r]);
        assert!(
            table.contains(
                "| 2 | 4 | churn | 2.00 / 2.00 | 3.50 / 6.00 | 4.00 / 4.00 | 75.0 | 150 | 350 | timeout 3 |"
            ),
            "{table}"
        );
    }

    #[test]
    fn the_design_bounds_the_busiest_node_by_the_fanout_and_the_mean_by_two() {
        // The root asks its 7 children; each leaf its parent.
        assert_eq!(tree_requests_per_interval(8, 16), (1.75, 7.0));
        assert_eq!(tree_requests_per_interval(16, 16), (1.875, 15.0));
        // Node 1 gets a child of its own from 18 nodes on.
        assert_eq!(tree_requests_per_interval(18, 16).1, 16.0);
        // From 17 * 16 + 1 nodes on node 1 has 16 children and a parent.
        let (mean, busiest) = tree_requests_per_interval(5_000, 16);
        assert_eq!(busiest, 17.0);
        assert!(mean < 2.0);
        assert_eq!(tree_requests_per_interval(1, 16), (0.0, 0.0));
    }

    #[test]
    fn no_requests_means_no_bytes_per_request() {
        let r = row(
            2,
            4,
            "idle",
            1.0,
            &[at(1.0, 1.0, 0.0, 0.0)],
            &[at(1.0, 1.0, 0.0, 0.0)],
        );
        assert_eq!(r.bytes_per_request, 0.0);
    }
}
