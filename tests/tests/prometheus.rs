//! A real Prometheus scraping the agents of a simulated cluster (issue 13):
//! `promtool check metrics` accepts every agent's `/metrics`, the queries
//! the docs give (docs/prometheus.md, the same text as the dashboard's
//! panels) return what the test caused, and every panel of the Grafana
//! dashboard returns data.
//!
//! The cluster: pods p0 and p1 on n0, p2 on n1, 6 grpc-go connections
//! calling at a fixed 250 calls/s each from client pods on n1 and n2, to a
//! Service tracking frames. The Service then scales up to p2, so the
//! agent of n0 moves connections there with GOAWAYs of reason scale_up.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grpclb_tests::multinode::connection_moves;
use grpclb_tests::peers::{start_load_until, GrpcClient, LoadRun, LoadShape};
use grpclb_tests::prometheus::{
    check_metrics, exposition_samples, promql_blocks, targets_of, Dashboard, Prometheus, Sample,
    DASHBOARD, SCRAPE_INTERVAL,
};
use grpclb_tests::{require_root, workspace_root, ServiceDef, SimCluster, Spread};

const SERVICE_PORT: u16 = 80;
const GRPC_PORT: u16 = 50051;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// The Service's port as the agents name their frontends.
const FRONTEND: &str = "default/calls:grpc";
/// grpc-go connections, each its own process calling at a fixed rate.
const CONNECTIONS: usize = 6;
/// Calls per second of each grpc-go connection (`peers::GO_CLIENT_RATE`).
const CALLS_PER_CONNECTION: f64 = 250.0;
/// Rates over four scrapes on a loaded 2-core machine: up to 13 % over the
/// clients' rate seen (a client catching up after a stall, a window's
/// extrapolation). A connection on the wrong pod is off by 33 % or more.
const CALLS_TOLERANCE: f64 = 0.25;

/// Grafana's `$__rate_interval` for this scrape interval: four scrapes.
fn rate_interval() -> String {
    format!("{}s", 4 * SCRAPE_INTERVAL.as_secs())
}

/// How long a change in the agents may take to show in a query: a scrape,
/// the rate window, and a loaded 2-core machine.
const SHOWS_WITHIN: Duration = Duration::from_secs(15);

/// How long call rates may take to be those of the connections: a moved
/// grpc-go client catches up on the calls it could not make while it
/// reconnected, and a loaded machine slows some clients for seconds.
const CALLS_SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// How long the agents may take to even out connections after a scale-up
/// (their --scale-up-window is 5 s) and Prometheus to show it.
const SETTLES_WITHIN: Duration = Duration::from_secs(25);

fn dashboard() -> Result<Dashboard> {
    Dashboard::load(&workspace_root().join(DASHBOARD))
}

/// Whitespace is layout: the docs break long queries over lines.
fn squeezed(expr: &str) -> String {
    expr.split_whitespace().collect()
}

/// Every query docs/prometheus.md gives is the query of a dashboard panel,
/// word for word, so the two (and this test, which runs the panels) cannot
/// drift apart.
#[test]
fn the_docs_give_the_dashboard_queries() -> Result<()> {
    let dashboard = dashboard()?;
    let docs = std::fs::read_to_string(workspace_root().join("docs/prometheus.md"))
        .context("reading docs/prometheus.md")?;
    let blocks = promql_blocks(&docs);
    if blocks.len() < 5 {
        bail!(
            "docs/prometheus.md gives {} promql blocks; want the 5 operator queries at least",
            blocks.len()
        );
    }
    for block in blocks {
        if !dashboard
            .queries
            .iter()
            .any(|q| squeezed(&q.expr) == squeezed(&block))
        {
            bail!("docs/prometheus.md gives a query no dashboard panel has:\n{block}\nCopy it from {DASHBOARD} (or add the panel there).");
        }
    }
    Ok(())
}

/// Per pod (backend `ip:port`): the value of each sample, keyed by its
/// `backend` label.
fn per_backend(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|s| (s.label("backend").to_string(), s.value))
        .collect()
}

/// The value of the sample for `frontend`, if any.
fn of_frontend(samples: &[Sample]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.label("frontend") == FRONTEND)
        .map(|s| s.value)
}

/// Connections per pod of the Service summed over every node, read from
/// each agent's own `/metrics`: what Prometheus must add up to.
fn agents_connections(cluster: &mut SimCluster) -> Result<BTreeMap<String, f64>> {
    let mut sum = BTreeMap::new();
    for node in 0..cluster.node_count() {
        let body = cluster.agent_get(node, "/metrics")?;
        for s in exposition_samples(&body, "grpclb_frontend_backend_connections")? {
            if s.label("frontend") == FRONTEND {
                *sum.entry(s.label("backend").to_string()).or_insert(0.0) += s.value;
            }
        }
    }
    Ok(sum)
}

/// GOAWAYs per reason summed over every agent's own `/metrics`.
fn agents_goaways(cluster: &mut SimCluster) -> Result<BTreeMap<String, f64>> {
    let mut sum = BTreeMap::new();
    for node in 0..cluster.node_count() {
        let body = cluster.agent_get(node, "/metrics")?;
        for s in exposition_samples(&body, "grpclb_goaways_total")? {
            *sum.entry(s.label("reason").to_string()).or_insert(0.0) += s.value;
        }
    }
    Ok(sum)
}

/// Max over mean of whole counts per pod.
fn max_over_mean(per_pod: &BTreeMap<String, f64>) -> f64 {
    let counts: BTreeMap<String, u64> = per_pod
        .iter()
        .map(|(pod, n)| (pod.clone(), n.round() as u64))
        .collect();
    Spread::new(counts.keys().map(String::as_str), &counts).max_over_mean()
}

fn close(value: f64, want: f64, tolerance: f64) -> bool {
    (value - want).abs() <= tolerance * want.abs().max(1.0)
}

/// Waits until the docs' "connections per pod across nodes" equals the
/// sum of the agents' own counts, every connection spread evenly over
/// `pods` pods (the agents place and move them so; an even spread also
/// means no move is still to come), and checks the Service's max/mean
/// against the same counts; returns them.
fn connections_agree(
    cluster: &mut SimCluster,
    prometheus: &Prometheus,
    dashboard: &Dashboard,
    pods: usize,
) -> Result<BTreeMap<String, f64>> {
    let per_pod = dashboard.query("Connections per pod, all nodes", &rate_interval())?;
    let balance = dashboard.query(
        "Connections per pod: max/mean per Service",
        &rate_interval(),
    )?;
    let mut last_agents = BTreeMap::new();
    let counts = prometheus
        .await_query(
            &format!("connections per pod to be the agents' {CONNECTIONS}, even over {pods} pods"),
            &per_pod,
            SETTLES_WITHIN,
            |samples| {
                let seen: BTreeMap<String, f64> = per_backend(
                    &samples
                        .iter()
                        .filter(|s| s.label("frontend") == FRONTEND)
                        .cloned()
                        .collect::<Vec<_>>(),
                );
                last_agents = agents_connections(cluster).ok()?;
                let total: f64 = seen.values().sum();
                let (min, max) = seen
                    .values()
                    .fold((f64::MAX, 0.0_f64), |(lo, hi), n| (lo.min(*n), hi.max(*n)));
                (seen == last_agents
                    && seen.len() == pods
                    && total == CONNECTIONS as f64
                    && max - min <= 1.0)
                    .then_some(seen)
            },
        )
        .with_context(|| format!("the agents counted {last_agents:?}"))?;
    let want = max_over_mean(&counts);
    prometheus.await_query(
        &format!("max/mean connections per pod of {FRONTEND} to be {want:.2} ({counts:?})"),
        &balance,
        SHOWS_WITHIN,
        |samples| of_frontend(samples).filter(|v| close(*v, want, 1e-9)),
    )?;
    println!("connections per pod across nodes: {counts:?}, max/mean {want:.2}");
    Ok(counts)
}

/// Waits until calls per second per pod, and their max/mean per Service,
/// are those of `connections` connections per pod at the clients' fixed
/// rate, within [`CALLS_TOLERANCE`].
fn calls_agree(
    prometheus: &Prometheus,
    dashboard: &Dashboard,
    connections: &BTreeMap<String, f64>,
) -> Result<()> {
    let want: BTreeMap<String, f64> = connections
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(pod, n)| (pod.clone(), n * CALLS_PER_CONNECTION))
        .collect();
    let matches = |seen: &BTreeMap<String, f64>| {
        want.iter().all(|(pod, rate)| {
            seen.get(pod)
                .is_some_and(|v| close(*v, *rate, CALLS_TOLERANCE))
        })
    };
    let per_pod = dashboard.query("Calls per second per pod", &rate_interval())?;
    let seen = prometheus.await_query(
        &format!("calls per second per pod to be {want:?}"),
        &per_pod,
        CALLS_SETTLE_WITHIN,
        |samples| Some(per_backend(samples)).filter(matches),
    )?;
    println!(
        "calls per second per pod: {seen:?} (want {want:?} within {:.0} %)",
        CALLS_TOLERANCE * 100.0
    );
    let per_service = dashboard.query("Calls per second per pod, per Service", &rate_interval())?;
    prometheus.await_query(
        &format!("calls per second per pod of {FRONTEND} to be {want:?}"),
        &per_service,
        CALLS_SETTLE_WITHIN,
        |samples| {
            let mine: Vec<Sample> = samples
                .iter()
                .filter(|s| s.label("frontend") == FRONTEND)
                .cloned()
                .collect();
            Some(per_backend(&mine)).filter(matches)
        },
    )?;
    let want_balance = max_over_mean(connections);
    let balance = dashboard.query("Calls per pod: max/mean per Service", &rate_interval())?;
    let seen = prometheus.await_query(
        &format!("max/mean calls per pod of {FRONTEND} to be about {want_balance:.2}"),
        &balance,
        CALLS_SETTLE_WITHIN,
        |samples| of_frontend(samples).filter(|v| close(*v, want_balance, CALLS_TOLERANCE)),
    )?;
    println!("calls per pod max/mean: {seen:.2} (connections: {want_balance:.2})");
    Ok(())
}

/// `count` grpc-go connections from `client`, one per run (so each report
/// is one connection's), calling until stopped.
fn start_clients(
    cluster: &SimCluster,
    client: usize,
    count: usize,
    stop: &std::path::Path,
) -> Result<Vec<LoadRun>> {
    let shape = LoadShape {
        connections: 1,
        timeline_ms: 500,
        streams: None,
    };
    let to = SocketAddr::from((VIP, SERVICE_PORT));
    let (pod, node) = cluster.placement(client);
    (0..count)
        .map(|k| {
            let stop_file = stop.join(format!("stop-{}-{k}", pod.name));
            start_load_until(GrpcClient::GrpcGo, pod, node, to, &shape, &stop_file)
        })
        .collect()
}

/// Waits until node `node`'s agent has learnt `connections` connections
/// to the Service's pods from the other nodes (its `BACKEND_VIEW`).
fn wait_view(cluster: &mut SimCluster, node: usize, connections: f64) -> Result<()> {
    grpclb_tests::wait_until(
        &format!("node n{node}'s agent to learn of {connections} connections"),
        SHOWS_WITHIN,
        || {
            let body = cluster.agent_get(node, "/metrics")?;
            let view: f64 = exposition_samples(&body, "grpclb_backend_view_load")?
                .iter()
                .map(|s| s.value)
                .sum();
            Ok((view >= connections).then_some(()))
        },
    )
}

/// Every panel of the dashboard: each query is valid and at least one per
/// panel returns data (a cause that never happened has no series).
fn every_panel_returns_data(prometheus: &Prometheus, dashboard: &Dashboard) -> Result<()> {
    let mut panels: BTreeMap<&str, Vec<(String, usize)>> = BTreeMap::new();
    for query in &dashboard.queries {
        let expr = dashboard.substitute(query, &rate_interval())?;
        let samples = prometheus
            .query(&expr)
            .with_context(|| format!("panel {:?} query {}", query.panel, query.ref_id))?;
        panels
            .entry(&query.panel)
            .or_default()
            .push((query.ref_id.clone(), samples.len()));
    }
    for (panel, results) in &panels {
        if results.iter().all(|(_, n)| *n == 0) {
            bail!("dashboard panel {panel:?} returns no data: {results:?}");
        }
    }
    for (variable, metric, label) in &dashboard.label_values {
        let values = prometheus.query(&format!("count by ({label}) ({metric})"))?;
        if !values.iter().any(|s| s.label(label) == FRONTEND) {
            bail!("dashboard variable {variable}: label_values({metric}, {label}) does not offer {FRONTEND}: {values:?}");
        }
    }
    println!(
        "dashboard: {} panels with queries, each returns data",
        panels.len()
    );
    Ok(())
}

#[test]
fn prometheus_sees_what_the_test_caused() -> Result<()> {
    require_root()?;
    let dashboard = dashboard()?;
    let mut cluster = SimCluster::new("prom", 3, &["--metrics-detail=backend"])?;
    let mut pods = Vec::new();
    for (node, name) in [(0, "p0"), (0, "p1"), (1, "p2")] {
        let pod = cluster.add_pod(node, name)?;
        cluster.start_server(pod, "grpc-server", GRPC_PORT)?;
        pods.push(pod);
    }
    let clients = [cluster.add_pod(1, "c1")?, cluster.add_pod(2, "c2")?];
    let service = |cluster: &SimCluster, pods: &[usize]| {
        let def = ServiceDef::grpc("calls", VIP, SERVICE_PORT, GRPC_PORT).tracking_frames();
        cluster.with_backends(def, pods)
    };
    cluster.write_services(&[service(&cluster, &pods[..2])])?;
    cluster.start_agents()?;
    let targets = targets_of(&mut cluster)?;
    let prometheus = Prometheus::start(&targets)?;
    let stop = tempfile::tempdir().context("creating the clients' stop dir")?;
    // One client node after the other, so the second places its
    // connections knowing the first's: 3 and 3.
    let half = CONNECTIONS / 2;
    let mut runs = start_clients(&cluster, clients[0], half, stop.path())?;
    let result = (|| -> Result<()> {
        wait_view(&mut cluster, 2, half as f64)?;
        runs.extend(start_clients(&cluster, clients[1], half, stop.path())?);
        // Two pods: every connection on p0 or p1.
        let before = connections_agree(&mut cluster, &prometheus, &dashboard, 2)?;
        calls_agree(&prometheus, &dashboard, &before)?;
        for node in 0..cluster.node_count() {
            let body = cluster.agent_get(node, "/metrics")?;
            check_metrics(&body).with_context(|| format!("/metrics of node n{node}"))?;
        }
        println!("promtool check metrics: every agent's /metrics passes");

        // Scale-up to p2: n0's agent moves connections with GOAWAYs.
        cluster.write_services(&[service(&cluster, &pods)])?;
        let rate =
            dashboard.query_ref("Moves per second and their causes", "A", &rate_interval())?;
        prometheus.await_query(
            "a rate of scale_up GOAWAYs",
            &rate,
            SHOWS_WITHIN,
            |samples| {
                samples
                    .iter()
                    .find(|s| s.label("reason") == "scale_up" && s.value > 0.0)
                    .map(|_| ())
            },
        )?;
        let after = connections_agree(&mut cluster, &prometheus, &dashboard, 3)?;
        calls_agree(&prometheus, &dashboard, &after)?;
        let totals = dashboard.query(
            "GOAWAYs since the agents started, by reason",
            &rate_interval(),
        )?;
        let mut agents = BTreeMap::new();
        let seen = prometheus
            .await_query(
                "GOAWAYs by reason to be the agents' own counts",
                &totals,
                SHOWS_WITHIN,
                |samples| {
                    agents = agents_goaways(&mut cluster).ok()?;
                    let seen: BTreeMap<String, f64> = samples
                        .iter()
                        .map(|s| (s.label("reason").to_string(), s.value))
                        .collect();
                    (seen == agents && seen.get("scale_up").is_some_and(|n| *n >= 1.0))
                        .then_some(seen)
                },
            )
            .with_context(|| format!("the agents counted {agents:?}"))?;
        println!("GOAWAYs by reason: {seen:?}");
        every_panel_returns_data(&prometheus, &dashboard)?;
        Ok(())
    })();
    let logs = format!(
        "{}\n--- prometheus:\n{}",
        cluster.agent_logs(),
        prometheus.log()
    );
    result.with_context(|| logs.clone())?;

    // What the clients saw: every call answered, and at least one
    // connection moved to p2 by a GOAWAY the agents counted.
    let mut moves = 0;
    let mut answered_by_p2 = 0;
    for run in runs {
        let report = run.finish()?;
        if report.failures > 0 {
            bail!("failed calls: {:?}\n{logs}", report.errors);
        }
        moves += connection_moves(&report.timeline);
        answered_by_p2 += usize::from(report.per_pod.contains_key("p2"));
    }
    let goaways = agents_goaways(&mut cluster)?.values().sum::<f64>() as usize;
    if answered_by_p2 == 0 || moves == 0 || moves > goaways {
        bail!("the clients saw {moves} moves ({answered_by_p2} connections answered by p2); the agents counted {goaways} GOAWAYs\n{logs}");
    }
    println!("clients: {moves} connection moves, {answered_by_p2} connections reached p2, {goaways} GOAWAYs");
    Ok(())
}
