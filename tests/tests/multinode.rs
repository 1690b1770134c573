//! Cluster-wide balance on a simulated multi-node cluster (issue 12): each
//! node its own cgroup and agent, clients and servers on different nodes,
//! the agents learning each other's pods' loads over their InternalIPs. The
//! figures say how many nodes they were measured on.
//!
//! Every trial uses a Service of its own (own VIP, own port on the same
//! pods), so the connections and the loads of one trial never count in
//! the next, and one cluster serves all trials of a test.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grpclb_tests::multinode::{
    connection_moves, http_200_json, mean_max_over_mean, node_name, FakePeer, Placement,
    PlacementSpec, EXCHANGE_PORT,
};
use grpclb_tests::peers::{start_load_until, GrpcClient, LoadRun, LoadShape};
use grpclb_tests::{wait_until, LoadReport, ServiceDef, SimCluster, Spread};

/// The tests measure placement timing on a shared 2-core machine: one
/// cluster at a time.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The port the call-balancing Services listen on.
const SERVICE_PORT: u16 = 80;

/// How far apart client nodes open their connections in the sequential
/// scenarios: the exchange must show every node a new connection within 1 s.
const NODE_SPACING: Duration = Duration::from_millis(1500);

/// How long a peer's failure may take to show in the other agents' metrics:
/// a few exchange intervals plus the 1 s request timeout.
const PEER_ERROR_TIMEOUT: Duration = Duration::from_secs(10);

/// 12 nodes: 8 pods on 4 server nodes (2 each), `clients_per_node` client
/// pods on each of the 8 others, `trials` Services.
fn spec(clients_per_node: usize, trials: usize) -> PlacementSpec {
    PlacementSpec {
        nodes: 12,
        server_nodes: 4,
        pods_per_server_node: 2,
        clients_per_node,
        trials,
        agent_args: Vec::new(),
    }
}

/// The call-balancing Services' VIPs (those of the placement trials).
fn vip(n: usize) -> Ipv4Addr {
    Placement::vip(n)
}

/// 12 nodes: 8 pods on 4 server nodes, 8 client nodes each opening one
/// connection, one node after another 1.5 s apart: with the cluster-wide
/// view each new connection goes to a pod with none yet.
#[test]
fn one_connection_per_node_spreads_over_the_service() -> Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let placement = Placement::new("mn-seq", &spec(1, 4))?;
    let mean = mean_max_over_mean(&placement.run("one connection per node", 1, NODE_SPACING)?);
    assert!(
        mean <= 1.25,
        "connections per pod max/mean {mean:.2} averaged over trials on 12 nodes; want <= 1.25"
    );
    Ok(())
}

/// 12 nodes: 8 pods on 4 server nodes, 16 clients on the 8 other nodes
/// (two per node, starting together), 2 connections each.
#[test]
fn two_clients_per_node_spread_evenly() -> Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let placement = Placement::new("mn-pairs", &spec(2, 3))?;
    let mean = mean_max_over_mean(&placement.run("16 clients x 2 connections", 2, NODE_SPACING)?);
    assert!(
        mean <= 1.15,
        "connections per pod max/mean {mean:.2} averaged over trials on 12 nodes; want <= 1.15"
    );
    Ok(())
}

/// The lines of `metrics` of the exchange's peer error counter that name
/// the peer `node` (by node name or by address).
fn peer_errors(metrics: &str, node: &str, ip: Ipv4Addr) -> u64 {
    let ip = ip.to_string();
    metrics
        .lines()
        .filter(|l| l.starts_with("grpclb_exchange_peer_errors_total{"))
        .filter(|l| l.contains(&format!("\"{node}\"")) || l.contains(&format!("\"{ip}")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// How much every running agent has logged so far, to read only what it
/// logs after a peer breaks (peers that were not up yet at start are an
/// episode of their own).
fn log_marks(cluster: &mut SimCluster) -> Vec<usize> {
    (0..cluster.node_count())
        .map(|n| cluster.agent(n).map_or(0, |a| a.log().len()))
        .collect()
}

/// Waits until some running agent counts errors for peer `broken` and
/// keeps counting them (the failure lasts several exchange intervals);
/// checks every agent logged that peer's failure at most once since `marks`.
fn wait_peer_errors(placement: &mut Placement, broken: usize, marks: &[usize]) -> Result<()> {
    let cluster = &mut placement.cluster;
    let (name, ip) = (node_name(broken), cluster.internal_ip(broken));
    let others: Vec<usize> = (0..cluster.node_count()).filter(|&n| n != broken).collect();
    let total = |cluster: &mut SimCluster| -> Result<u64> {
        let mut sum = 0;
        for &n in &others {
            if let Ok(metrics) = cluster.agent_get(n, "/metrics") {
                sum += peer_errors(&metrics, &name, ip);
            }
        }
        Ok(sum)
    };
    let first = wait_until(
        &format!("an agent to count errors for peer {name} ({ip})"),
        PEER_ERROR_TIMEOUT,
        || Ok(Some(total(cluster)?).filter(|&n| n > 0)),
    )
    .with_context(|| cluster.agent_logs())?;
    wait_until(
        &format!("the errors for peer {name} to keep being counted"),
        PEER_ERROR_TIMEOUT,
        || Ok(Some(total(cluster)?).filter(|&n| n > first)),
    )
    .with_context(|| cluster.agent_logs())?;
    for &n in &others {
        // Agents killed earlier in the test have nothing more to say.
        let Ok(agent) = cluster.agent(n) else {
            continue;
        };
        let log = agent.log();
        let lines = log
            .get(marks[n]..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&ip.to_string()) || l.contains(&format!("peer {name}")))
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count();
        if lines > 1 {
            bail!(
                "node {}'s agent logged peer {name}'s failure {lines} times; want once per episode:\n{log}",
                node_name(n)
            );
        }
    }
    println!(
        "peer {name} ({ip}) failing: counted in grpclb_exchange_peer_errors_total, logged once"
    );
    Ok(())
}

/// Every client node opens 2 more connections to trial `t`'s Service: none
/// may fail.
fn clients_keep_connecting(placement: &Placement, t: usize) -> Result<Spread> {
    placement.trial(t, 2, Duration::ZERO)
}

/// A peer agent killed, then another peer answering nonsense: the other
/// nodes keep placing connections (0 failed connects), count the peer's
/// errors in a metric and log them once.
#[test]
fn broken_peers_are_counted_and_placement_goes_on() -> Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // 8 nodes: 4 pods on n0 and n1, clients on n2..n7; three Services.
    let mut placement = Placement::new(
        "mn-peers",
        &PlacementSpec {
            nodes: 8,
            server_nodes: 2,
            ..spec(1, 3)
        },
    )?;
    let nodes = placement.cluster.node_count();
    let before = clients_keep_connecting(&placement, 0)?;
    println!("{nodes} nodes, all peers up: {before}");

    // A server node's agent dies; its pods keep serving.
    let marks = log_marks(&mut placement.cluster);
    placement.cluster.kill_agent(1)?;
    wait_peer_errors(&mut placement, 1, &marks)?;
    let killed = clients_keep_connecting(&placement, 1)?;
    println!("{nodes} nodes, peer n1 killed: {killed}, 0 failed connects");

    // A client node's agent is replaced by a peer answering bad JSON with
    // absurd numbers, in an oversized body.
    let marks = log_marks(&mut placement.cluster);
    placement.cluster.kill_agent(3)?;
    let mut garbage = b"{\"version\": -1, \"pods\": [{\"connections\": 1e300, ".to_vec();
    garbage.extend(std::iter::repeat_n(b'x', 4 << 20));
    let fake = FakePeer::serve(
        SocketAddr::from((placement.cluster.internal_ip(3), EXCHANGE_PORT)),
        http_200_json(&garbage),
    )?;
    wait_peer_errors(&mut placement, 3, &marks)?;
    let lying = clients_keep_connecting(&placement, 2)?;
    println!(
        "{nodes} nodes, peer n3 answering garbage ({} requests): {lying}, 0 failed connects",
        fake.requests()
    );
    Ok(())
}

/// The pods' gRPC port in the call-balancing scenarios.
const GRPC_PORT: u16 = 50051;

/// Calls per pod are counted in buckets this wide.
const BUCKET_MS: u64 = 500;

/// One client per client node, each holding `connections` connections
/// (one process each, so every report is one connection's when
/// `connections` is 1), calling until stopped.
struct Callers {
    runs: Vec<(GrpcClient, LoadRun)>,
    _stop: tempfile::TempDir,
}

impl Callers {
    /// Starts the clients together, client node `k` using `kinds[k %
    /// kinds.len()]`.
    fn start(
        cluster: &SimCluster,
        clients: &[usize],
        kinds: &[GrpcClient],
        connections: u64,
        to: SocketAddr,
    ) -> Result<Callers> {
        let stop = tempfile::tempdir().context("creating the clients' stop dir")?;
        let shape = LoadShape {
            connections,
            timeline_ms: BUCKET_MS,
            streams: None,
        };
        let mut runs = Vec::new();
        for (k, &client) in clients.iter().enumerate() {
            let kind = kinds[k % kinds.len()];
            let (pod, node) = cluster.placement(client);
            let stop_file = stop.path().join(format!("stop-{k}"));
            runs.push((
                kind,
                start_load_until(kind, pod, node, to, &shape, &stop_file)?,
            ));
        }
        Ok(Callers { runs, _stop: stop })
    }

    /// Stops every client; their reports, in client order.
    fn finish(self) -> Result<Vec<(GrpcClient, LoadReport)>> {
        self.runs
            .into_iter()
            .map(|(kind, run)| Ok((kind, run.finish()?)))
            .collect()
    }
}

/// Calls per pod of all `reports` in consecutive windows of `per_window`
/// buckets, over `pods` (zeros included).
fn call_windows(
    reports: &[(GrpcClient, LoadReport)],
    pods: &[String],
    per_window: usize,
) -> Vec<Spread> {
    // Every client's last bucket is cut short by its stop.
    let buckets = reports
        .iter()
        .map(|(_, r)| r.timeline.len().saturating_sub(1))
        .min()
        .unwrap_or(0);
    (0..buckets / per_window)
        .map(|w| {
            let mut counted = BTreeMap::new();
            for (_, report) in reports {
                for bucket in report.timeline.iter().skip(w * per_window).take(per_window) {
                    for (pod, n) in bucket {
                        *counted.entry(pod.clone()).or_insert(0) += n;
                    }
                }
            }
            Spread::new(pods.iter().map(String::as_str), &counted)
        })
        .collect()
}

/// The calls per pod of `windows` added up.
fn total(pods: &[String], windows: &[Spread]) -> Spread {
    let mut counted = BTreeMap::new();
    for w in windows {
        for (pod, n) in &w.per_pod {
            *counted.entry(pod.clone()).or_insert(0) += n;
        }
    }
    Spread::new(pods.iter().map(String::as_str), &counted)
}

fn assert_no_failed_calls(reports: &[(GrpcClient, LoadReport)], logs: &str) {
    for (kind, report) in reports {
        assert_eq!(
            report.failures, 0,
            "{kind:?} client: failed calls {:?}\n{logs}",
            report.errors
        );
    }
}

/// Prints the windows (one line per 2 s) of a call-balancing scenario.
fn print_windows(scenario: &str, nodes: usize, windows: &[Spread], per_window: usize) {
    for (i, w) in windows.iter().enumerate() {
        let at = i as u64 * per_window as u64 * BUCKET_MS;
        println!(
            "{scenario}, {nodes} nodes, calls at {:>5.1} s: {w}",
            at as f64 / 1000.0
        );
    }
}

/// 12 nodes: 8 pods on 4 server nodes, 8 client nodes (grpc-go and grpcio
/// in turn) each opening one connection at the same instant to a Service
/// tracking frames: placement is no better than its view at that instant,
/// and the hotspot policy, comparing each pod with the Service-wide mean,
/// brings calls per pod to max/mean <= 1.25 within 30 s, with no failed
/// call and no connection moved twice.
#[test]
fn simultaneous_grpc_clients_are_evened_out_by_the_hotspot_policy() -> Result<()> {
    const RUN: Duration = Duration::from_secs(34);
    const PER_WINDOW: usize = 4;
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cluster = SimCluster::new("mn-hot", 12, &[])?;
    let mut pods = Vec::new();
    for i in 0..8 {
        let pod = cluster.add_pod(i / 2, &format!("p{i}"))?;
        cluster.start_server(pod, "grpc-server", GRPC_PORT)?;
        pods.push(pod);
    }
    let clients = (4..12)
        .map(|node| cluster.add_pod(node, &format!("c{node}")))
        .collect::<Result<Vec<_>>>()?;
    let def = ServiceDef::grpc("hot", vip(0), SERVICE_PORT, GRPC_PORT).tracking_frames();
    cluster.write_services(&[cluster.with_backends(def, &pods)])?;
    cluster.start_agents()?;
    let to = SocketAddr::from((vip(0), SERVICE_PORT));
    let callers = Callers::start(
        &cluster,
        &clients,
        &[GrpcClient::GrpcGo, GrpcClient::Grpcio],
        1,
        to,
    )?;
    std::thread::sleep(RUN);
    let reports = callers.finish()?;
    let logs = cluster.agent_logs();
    assert_no_failed_calls(&reports, &logs);
    let names: Vec<String> = pods
        .iter()
        .map(|&p| cluster.pod(p).pod.name.clone())
        .collect();
    let windows = call_windows(&reports, &names, PER_WINDOW);
    print_windows("8 simultaneous clients", 12, &windows, PER_WINDOW);
    let first = windows.first().context("no calls were counted")?;
    println!(
        "8 simultaneous clients, 12 nodes: first 2 s max/mean {:.2} (uniform random: 2.60 on average)",
        first.max_over_mean()
    );
    for (i, (kind, report)) in reports.iter().enumerate() {
        let moved = connection_moves(&report.timeline);
        assert!(
            moved <= 1,
            "client {i} ({kind:?}): its connection moved {moved} times: {:?}\n{logs}",
            report.timeline
        );
    }
    // Calls per pod over the 10 s up to 30 s after the clients started:
    // where the connections are by then, with the noise of 2 s windows
    // (a client starved of CPU for a second) averaged out.
    let settled = (20_000 / (BUCKET_MS * PER_WINDOW as u64)) as usize;
    let tail = total(
        &names,
        windows
            .get(settled..settled + 5)
            .context("the run ended before 30 s")?,
    );
    assert!(
        tail.max_over_mean() <= 1.25,
        "from 20 to 30 s after 8 simultaneous connects on 12 nodes calls per pod are {tail}; want max/mean <= 1.25\n{logs}"
    );
    Ok(())
}

/// 8 nodes: a Service of 2 pods on n0 and n1 scales to 4 pods (n2, n3
/// too) while clients on 4 nodes call over 2 connections each: 10 s after
/// the new pods answer, calls per pod are at max/mean <= 1.2, with no
/// failed call. One run per client kind (grpc-go, grpcio, tonic: their
/// connections call at different rates), each on a Service of its own.
#[test]
fn a_scale_up_across_nodes_evens_out_the_calls() -> Result<()> {
    const KINDS: [GrpcClient; 3] = [GrpcClient::GrpcGo, GrpcClient::Grpcio, GrpcClient::Tonic];
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cluster = SimCluster::new("mn-scale", 8, &[])?;
    let mut pods = Vec::new();
    for i in 0..4 {
        let pod = cluster.add_pod(i, &format!("p{i}"))?;
        for k in 0..KINDS.len() {
            cluster.start_server(pod, "grpc-server", GRPC_PORT + k as u16)?;
        }
        pods.push(pod);
    }
    let clients = (4..8)
        .map(|node| cluster.add_pod(node, &format!("c{node}")))
        .collect::<Result<Vec<_>>>()?;
    let service = |cluster: &SimCluster, k: usize, pods: &[usize]| {
        let def = ServiceDef::grpc(
            &format!("scale{k}"),
            vip(k),
            SERVICE_PORT,
            GRPC_PORT + k as u16,
        )
        .tracking_frames();
        cluster.with_backends(def, pods)
    };
    let mut services: Vec<ServiceDef> = (0..KINDS.len())
        .map(|k| service(&cluster, k, &pods[..2]))
        .collect();
    cluster.write_services(&services)?;
    cluster.start_agents()?;
    let names: Vec<String> = pods
        .iter()
        .map(|&p| cluster.pod(p).pod.name.clone())
        .collect();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let scenario = format!("scale-up 2 -> 4 pods, {kind:?} clients");
        let to = SocketAddr::from((vip(k), SERVICE_PORT));
        let callers = Callers::start(&cluster, &clients, &[kind], 2, to)?;
        std::thread::sleep(Duration::from_secs(3));
        services[k] = service(&cluster, k, &pods);
        cluster.write_services(&services)?;
        std::thread::sleep(Duration::from_secs(16));
        let reports = callers.finish()?;
        let logs = cluster.agent_logs();
        assert_no_failed_calls(&reports, &logs);
        let windows = call_windows(&reports, &names, SCALE_WINDOW);
        print_windows(&scenario, 8, &windows, SCALE_WINDOW);
        let scaled = reports
            .iter()
            .filter_map(|(_, r)| {
                r.timeline
                    .iter()
                    .position(|b| b.contains_key("p2") || b.contains_key("p3"))
            })
            .min()
            .with_context(|| format!("{scenario}: the new pods never answered"))?;
        // From 10 s after the new pods answered to the end of the run
        // (about 4 s), summed: single 2 s windows of one client are noisy
        // by themselves (tonic calls as fast as its share of 2 cores allows).
        let settled = (scaled + (10_000 / BUCKET_MS) as usize).div_ceil(SCALE_WINDOW);
        let after = windows
            .get(settled..)
            .filter(|w| !w.is_empty())
            .with_context(|| format!("{scenario}: the run ended before 10 s after the scale-up"))?;
        let after = total(&names, after);
        assert!(
            after.max_over_mean() <= 1.2,
            "{scenario}: from 10 s after the new pods answered on 8 nodes calls per pod are {after}; want max/mean <= 1.2\n{logs}"
        );
    }
    Ok(())
}

/// Buckets per window of the scale-up's figures (2 s).
const SCALE_WINDOW: usize = 4;

#[test]
fn a_move_is_a_new_pod_answering_once_even_in_the_bucket_both_answer() {
    let bucket = |pods: &[&str]| -> BTreeMap<String, u64> {
        pods.iter().map(|p| (p.to_string(), 1)).collect()
    };
    let timeline = [
        bucket(&["p6"]),
        bucket(&["p3", "p6"]),
        bucket(&["p3"]),
        bucket(&[]),
        bucket(&["p3"]),
        bucket(&["p1", "p3"]),
    ];
    assert_eq!(connection_moves(&timeline), 2);
    assert_eq!(connection_moves(&timeline[..1]), 0);
}
