//! Cluster-wide balance on a simulated multi-node cluster (issue 12): each
//! node its own cgroup and agent, clients and servers on different nodes,
//! the agents learning each other's pods' loads over their InternalIPs. The
//! figures say how many nodes they were measured on.
//!
//! Every trial uses a Service of its own (own VIP, own port on the same
//! pods), so the connections and the loads of one trial never count in
//! the next, and one cluster serves all trials of a test.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::multinode::{http_200_json, node_name, FakePeer, EXCHANGE_PORT};
use grpclb_tests::peers::{connect_and_hold, ConnectOptions};
use grpclb_tests::{wait_until, ChildGuard, ConnectReport, ServiceDef, SimCluster, Spread};

/// The tests measure placement timing on a shared 2-core machine: one
/// cluster at a time.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The port Services listen on; trial `t`'s pods listen on `BASE_PORT + t`.
const SERVICE_PORT: u16 = 80;
const BASE_PORT: u16 = 7100;

/// How far apart client nodes open their connections in the sequential
/// scenarios: the exchange must show every node a new connection within 1 s.
const NODE_SPACING: Duration = Duration::from_millis(1500);

/// How long a peer's failure may take to show in the other agents' metrics:
/// a few exchange intervals plus the 1 s request timeout.
const PEER_ERROR_TIMEOUT: Duration = Duration::from_secs(10);

/// `servers` server nodes with `pods_per_server_node` pods each (p0..),
/// `clients_per_node` client pods on each of the other nodes, and one
/// Service per trial (VIP 10.96.0.<10 + t>) over all pods, each pod running
/// whoami on the trial's port; agents started and ready.
struct Placement {
    cluster: SimCluster,
    pods: Vec<usize>,
    /// Client pods, grouped by node, in the order nodes connect.
    clients: Vec<Vec<usize>>,
    trials: usize,
}

impl Placement {
    fn new(
        name: &str,
        nodes: usize,
        servers: usize,
        pods_per_server_node: usize,
        clients_per_node: usize,
        trials: usize,
    ) -> Result<Placement> {
        let mut cluster = SimCluster::new(name, nodes, &[])?;
        let mut pods = Vec::new();
        for node in 0..servers {
            for _ in 0..pods_per_server_node {
                let name = format!("p{}", pods.len());
                pods.push(cluster.add_pod(node, &name)?);
            }
        }
        let mut clients = Vec::new();
        for node in servers..nodes {
            let mut on_node = Vec::new();
            for k in 0..clients_per_node {
                on_node.push(cluster.add_pod(node, &format!("c{node}x{k}"))?);
            }
            clients.push(on_node);
        }
        let mut services = Vec::new();
        for t in 0..trials {
            for &pod in &pods {
                cluster.start_server(pod, "whoami", port(t))?;
            }
            let def = ServiceDef::grpc(&format!("echo{t}"), vip(t), SERVICE_PORT, port(t));
            services.push(cluster.with_backends(def, &pods));
        }
        cluster.write_services(&services)?;
        cluster.start_agents()?;
        Ok(Placement {
            cluster,
            pods,
            clients,
            trials,
        })
    }

    fn pod_names(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|&p| self.cluster.pod(p).pod.name.clone())
            .collect()
    }

    /// Trial `t`: client node after client node, `spacing` apart, each of
    /// the node's client pods opens `connections` at once and holds them;
    /// returns the connections per pod once all are established.
    fn trial(&self, t: usize, connections: u64, spacing: Duration) -> Result<Spread> {
        let to = SocketAddr::from((vip(t), SERVICE_PORT));
        let start = Instant::now();
        let mut held: Vec<ChildGuard> = Vec::new();
        let mut reports: Vec<ConnectReport> = Vec::new();
        for (k, node_clients) in self.clients.iter().enumerate() {
            let due = start + spacing * k as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let results: Vec<Result<(ConnectReport, ChildGuard)>> = std::thread::scope(|s| {
                let running: Vec<_> = node_clients
                    .iter()
                    .map(|&c| {
                        let (pod, node) = self.cluster.placement(c);
                        s.spawn(move || {
                            connect_and_hold(pod, node, to, connections, &ConnectOptions::default())
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|r| r.join().expect("connect thread panicked"))
                    .collect()
            });
            for result in results {
                let (report, guard) = result?;
                if !report.failures().is_empty() {
                    bail!(
                        "trial {t}: connects to {to} failed: {:?}",
                        report.failures()
                    );
                }
                reports.push(report);
                held.push(guard);
            }
        }
        let mut counted = std::collections::BTreeMap::new();
        for report in &reports {
            for (pod, n) in report.per_pod() {
                *counted.entry(pod).or_insert(0) += n;
            }
        }
        let names = self.pod_names();
        Ok(Spread::new(names.iter().map(String::as_str), &counted))
    }

    /// Runs every trial and prints each figure; returns the mean max/mean.
    fn run(&self, scenario: &str, connections: u64, spacing: Duration) -> Result<f64> {
        let mut sum = 0.0;
        for t in 0..self.trials {
            let spread = self
                .trial(t, connections, spacing)
                .with_context(|| self.cluster.agent_logs())?;
            println!(
                "{scenario}, {} nodes, trial {t}: {spread}",
                self.cluster.node_count()
            );
            sum += spread.max_over_mean();
        }
        let mean = sum / self.trials as f64;
        println!(
            "{scenario}, {} nodes: max/mean {mean:.2} averaged over {} trials",
            self.cluster.node_count(),
            self.trials
        );
        Ok(mean)
    }
}

fn vip(trial: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 10 + trial as u8)
}

fn port(trial: usize) -> u16 {
    BASE_PORT + trial as u16
}

/// 12 nodes: 8 pods on 4 server nodes, 8 client nodes each opening one
/// connection, one node after another 1.5 s apart: with the cluster-wide
/// view each new connection goes to a pod with none yet.
#[test]
fn one_connection_per_node_spreads_over_the_service() -> Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let placement = Placement::new("mn-seq", 12, 4, 2, 1, 4)?;
    let mean = placement.run("one connection per node", 1, NODE_SPACING)?;
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
    let placement = Placement::new("mn-pairs", 12, 4, 2, 2, 3)?;
    let mean = placement.run("16 clients x 2 connections", 2, NODE_SPACING)?;
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

/// Waits until some running agent counts errors for peer `broken` and
/// keeps counting them (the failure lasts several exchange intervals);
/// checks every agent logged that peer's failure at most once.
fn wait_peer_errors(placement: &mut Placement, broken: usize) -> Result<()> {
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
        let log = cluster.agent(n)?.log();
        let lines = log
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
    let mut placement = Placement::new("mn-peers", 8, 2, 2, 1, 3)?;
    let nodes = placement.cluster.node_count();
    let before = clients_keep_connecting(&placement, 0)?;
    println!("{nodes} nodes, all peers up: {before}");

    // A server node's agent dies; its pods keep serving.
    placement.cluster.kill_agent(1)?;
    wait_peer_errors(&mut placement, 1)?;
    let killed = clients_keep_connecting(&placement, 1)?;
    println!("{nodes} nodes, peer n1 killed: {killed}, 0 failed connects");

    // A client node's agent is replaced by a peer answering bad JSON with
    // absurd numbers, in an oversized body.
    placement.cluster.kill_agent(3)?;
    let mut garbage = b"{\"version\": -1, \"pods\": [{\"connections\": 1e300, ".to_vec();
    garbage.extend(std::iter::repeat_n(b'x', 4 << 20));
    let fake = FakePeer::serve(
        SocketAddr::from((placement.cluster.internal_ip(3), EXCHANGE_PORT)),
        http_200_json(&garbage),
    )?;
    wait_peer_errors(&mut placement, 3)?;
    let lying = clients_keep_connecting(&placement, 2)?;
    println!(
        "{nodes} nodes, peer n3 answering garbage ({} requests): {lying}, 0 failed connects",
        fake.requests()
    );
    Ok(())
}
