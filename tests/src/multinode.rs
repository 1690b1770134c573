//! A simulated cluster of K nodes on one machine (issue 12): each node is its
//! own cgroup with its own bpffs pin dir and its own agent (`--node-name
//! n<i>`, its own metrics address), and has a loopback InternalIP of its own
//! in a `kind: Node` item of the one Service file every agent reads, so
//! agents reach each other on 127.0.0.0/8 exactly as on a node network.
//! Pods sit on one fabric bridge and are placed on nodes: their processes run
//! in their node's cgroup (that node's hooks see their sockets, client and
//! server side) and their EndpointSlice entries name their node.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{list_yaml, ServiceDef};
use crate::peers::{connect_and_hold, start_server_on_node, ConnectOptions};
use crate::{write_atomically, Agent, BpffsDir, ChildGuard, ConnectReport, Fabric, Node, Pod};

/// The port agents serve their loads to peers on when `--exchange-port` is
/// not given (the agent's default; issue 12). Every node has its own
/// InternalIP, so all of a cluster's agents use the same port.
pub const EXCHANGE_PORT: u16 = 9926;

/// Agents [`SimCluster::start_agents`] starts at once. Each loads its eBPF
/// programs, and the kernel's verifier CPU is shared by the agents starting
/// together: 16 at once on a busy 2-core machine did not all get ready
/// within the agent's start timeout; 8 did.
const AGENTS_STARTING_TOGETHER: usize = 8;

/// A pod of the simulated cluster and the node it is placed on.
#[derive(Clone, Debug)]
pub struct SimPod {
    pub pod: Pod,
    /// Index of its node in [`SimCluster`].
    pub node: usize,
}

/// K nodes `n0..n<K-1>`, their pods and agents. Fields drop in declaration
/// order: servers, agents, Service file, fabric (pod netns), pins, cgroups
/// (which kill whatever the test left running in them).
pub struct SimCluster {
    servers: Vec<ChildGuard>,
    /// `None` until started, and after [`SimCluster::kill_agent`].
    agents: Vec<Option<Agent>>,
    file: PathBuf,
    _file_dir: tempfile::TempDir,
    pods: Vec<SimPod>,
    fabric: Fabric,
    bpffs: Vec<BpffsDir>,
    nodes: Vec<Node>,
    internal_ips: Vec<Ipv4Addr>,
    agent_args: Vec<OsString>,
}

impl SimCluster {
    /// `nodes` node cgroups with pin dirs and InternalIPs, an empty fabric,
    /// no agents yet. Every agent will also get `agent_args` (flags of
    /// `grpclb-agent run`, e.g. the exchange's).
    pub fn new(name: &str, nodes: usize, agent_args: &[&str]) -> Result<SimCluster> {
        let internal_ips = internal_ips(nodes)?;
        let node_cgroups = (0..nodes)
            .map(|i| Node::new(&node_name(i)))
            .collect::<Result<Vec<_>>>()?;
        let bpffs = (0..nodes)
            .map(|_| BpffsDir::new())
            .collect::<Result<Vec<_>>>()?;
        let fabric = Fabric::new(name)?;
        let file_dir = tempfile::tempdir().context("creating the Service file dir")?;
        Ok(SimCluster {
            servers: Vec::new(),
            agents: (0..nodes).map(|_| None).collect(),
            file: file_dir.path().join("cluster.yaml"),
            _file_dir: file_dir,
            pods: Vec::new(),
            fabric,
            bpffs,
            nodes: node_cgroups,
            internal_ips,
            agent_args: agent_args.iter().map(OsString::from).collect(),
        })
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, node: usize) -> &Node {
        &self.nodes[node]
    }

    /// `n<node>`: its cgroup's, its agent's `--node-name` and its Node
    /// object's name.
    pub fn node_name(&self, node: usize) -> &str {
        self.nodes[node].name()
    }

    /// The node's InternalIP (a loopback address of its own).
    pub fn internal_ip(&self, node: usize) -> Ipv4Addr {
        self.internal_ips[node]
    }

    pub fn bpffs(&self, node: usize) -> &Path {
        self.bpffs[node].path()
    }

    /// A pod named `name` on `node`, on the fabric with the next free
    /// address in 10.244.0.0/16; returns its index.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<usize> {
        if node >= self.nodes.len() {
            bail!(
                "pod {name}: node {node} does not exist (the cluster has {} nodes)",
                self.nodes.len()
            );
        }
        let index = self.pods.len();
        let pod = self.fabric.add_pod(name, pod_ip(index)?, None)?;
        self.pods.push(SimPod { pod, node });
        Ok(index)
    }

    pub fn pod(&self, pod: usize) -> &SimPod {
        &self.pods[pod]
    }

    /// The pod's netns and its node's cgroup, as [`crate::spawn`] and the
    /// `peers` clients take them.
    pub fn placement(&self, pod: usize) -> (&Pod, Option<&Node>) {
        let p = &self.pods[pod];
        (&p.pod, Some(&self.nodes[p.node]))
    }

    /// Starts a `testpod` server of `kind` (`whoami`, `grpc-server`) on
    /// `port` in `pod`, in its node's cgroup (so that node's agent counts
    /// the connections it accepts), and waits until it listens.
    pub fn start_server(&mut self, pod: usize, kind: &str, port: u16) -> Result<()> {
        let p = &self.pods[pod];
        let server = start_server_on_node(&p.pod, &self.nodes[p.node], kind, port)?;
        self.servers.push(server);
        Ok(())
    }

    /// `def` with one ready endpoint per pod of `pods`, each naming its
    /// node (EndpointSlice `nodeName`).
    pub fn with_backends(&self, def: ServiceDef, pods: &[usize]) -> ServiceDef {
        pods.iter().fold(def, |def, &i| {
            let p = &self.pods[i];
            def.backend_on(p.pod.ipv4, self.nodes[p.node].name())
        })
    }

    /// Writes the Service file every agent reads: `services`, their slices
    /// and one Node per node with its InternalIP.
    pub fn write_services(&self, services: &[ServiceDef]) -> Result<()> {
        let nodes: Vec<(&str, IpAddr)> = (0..self.nodes.len())
            .map(|i| (self.node_name(i), IpAddr::V4(self.internal_ip(i))))
            .collect();
        write_atomically(&self.file, &cluster_yaml(services, &nodes))
    }

    pub fn services_file(&self) -> &Path {
        &self.file
    }

    /// Starts every node's agent that is not running and waits until all
    /// are ready. They start [`AGENTS_STARTING_TOGETHER`] at a time, so up
    /// to that many nodes take about one agent's start.
    pub fn start_agents(&mut self) -> Result<()> {
        let stopped: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.agents[i].is_none())
            .collect();
        for batch in stopped.chunks(AGENTS_STARTING_TOGETHER) {
            for &i in batch {
                self.agents[i] = Some(Agent::spawn(
                    &self.nodes[i],
                    self.bpffs[i].path(),
                    &self.agent_source_args(),
                )?);
            }
            for &i in batch {
                let name = self.node_name(i).to_string();
                self.agent(i)?
                    .wait_ready()
                    .with_context(|| format!("the agent of node {name}"))?;
            }
        }
        Ok(())
    }

    fn agent_source_args(&self) -> Vec<OsString> {
        let mut args = vec![OsString::from(format!(
            "--source=file:{}",
            self.file.display()
        ))];
        args.extend(self.agent_args.iter().cloned());
        args
    }

    /// The running agent of `node`.
    pub fn agent(&mut self, node: usize) -> Result<&mut Agent> {
        let name = self.nodes[node].name().to_string();
        self.agents[node]
            .as_mut()
            .with_context(|| format!("node {name} has no running agent"))
    }

    /// PIDs of the running agents (for their CPU time).
    pub fn agent_pids(&self) -> Vec<i32> {
        self.agents.iter().flatten().map(Agent::pid).collect()
    }

    /// Kills node `node`'s agent with SIGKILL, as a crash would: its pins
    /// (programs and maps) stay, so its pods keep being reachable and its
    /// clients balanced by the last maps, but it no longer answers peers.
    pub fn kill_agent(&mut self, node: usize) -> Result<()> {
        let agent = self.agents[node]
            .take()
            .with_context(|| format!("node {} has no running agent", node_name(node)))?;
        agent.kill9()
    }

    /// `GET path` on node `node`'s metrics address: the body of a 200.
    pub fn agent_get(&mut self, node: usize, path: &str) -> Result<String> {
        let agent = self.agent(node)?;
        let addr = agent.metrics_addr()?;
        let (code, body) = crate::http_get(addr, path)
            .with_context(|| format!("GET {path} on node {}'s agent at {addr}", node_name(node)))?;
        if code != 200 {
            bail!(
                "GET {path} on node {}'s agent: {code} {body}",
                node_name(node)
            );
        }
        Ok(body)
    }

    /// Every running agent's log, one section per node (for failures).
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| (i, a)))
            .map(|(i, a)| format!("--- agent of node {}:\n{}\n", node_name(i), a.log()))
            .collect()
    }
}

/// `n<index>`.
pub fn node_name(index: usize) -> String {
    format!("n{index}")
}

/// `count` InternalIPs `127.<a>.<b>.<i+1>`: a /24 of 127.0.0.0/8 this
/// process and cluster have to themselves, so clusters of parallel tests (and
/// of a bench running next to them) never share an exchange address:port.
/// Everything in 127.0.0.0/8 is local on `lo`; nothing leaves the machine.
fn internal_ips(count: usize) -> Result<Vec<Ipv4Addr>> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    if count > 254 {
        bail!("a simulated cluster has at most 254 nodes (one /24 of loopback addresses), not {count}");
    }
    // 127.0.x.x is left to whatever else uses loopback addresses.
    let a = 1 + (std::process::id() % 254) as u8;
    let b = (NEXT.fetch_add(1, Ordering::Relaxed) % 256) as u8;
    Ok((0..count)
        .map(|i| Ipv4Addr::new(127, a, b, i as u8 + 1))
        .collect())
}

/// Pod `index`'s address: 10.244.<1 + index / 250>.<2 + index % 250>.
fn pod_ip(index: usize) -> Result<Ipv4Addr> {
    let high = 1 + index / 250;
    if high > 255 {
        bail!("pod {index}: 10.244.0.0/16 has no room for it");
    }
    Ok(Ipv4Addr::new(10, 244, high as u8, 2 + (index % 250) as u8))
}

/// The Services, their slices and `nodes` (name, InternalIP) as v1 Nodes
/// with `status.addresses`, as one kubectl-style `List`.
pub fn cluster_yaml(services: &[ServiceDef], nodes: &[(&str, IpAddr)]) -> String {
    let mut items: Vec<serde_json::Value> = services.iter().flat_map(ServiceDef::objects).collect();
    items.extend(nodes.iter().map(|(name, ip)| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "status": {"addresses": [
                {"type": "InternalIP", "address": ip.to_string()},
                {"type": "Hostname", "address": name},
            ]}
        })
    }));
    list_yaml(items)
}

/// How many times one connection's calls moved to another pod: each pod
/// answering in a bucket other than the one answering before is one move
/// (the bucket of a move holds both).
pub fn connection_moves(timeline: &[BTreeMap<String, u64>]) -> usize {
    let mut current: Option<&String> = None;
    let mut moves = 0;
    for bucket in timeline {
        let others: Vec<&String> = bucket.keys().filter(|p| Some(*p) != current).collect();
        if let Some(&last) = others.last() {
            if current.is_some() {
                moves += others.len();
            }
            current = Some(last);
        }
    }
    moves
}

/// Connections (or calls) per pod: the figure of every balance test.
#[derive(Clone, Debug, PartialEq)]
pub struct Spread {
    /// Every pod of the Service, including those that got nothing.
    pub per_pod: BTreeMap<String, u64>,
}

impl Spread {
    /// `counted` (pod name -> count) over all of `pods`, zeros included.
    pub fn new<'a>(
        pods: impl IntoIterator<Item = &'a str>,
        counted: &BTreeMap<String, u64>,
    ) -> Spread {
        let per_pod = pods
            .into_iter()
            .map(|p| (p.to_string(), counted.get(p).copied().unwrap_or(0)))
            .collect();
        Spread { per_pod }
    }

    pub fn total(&self) -> u64 {
        self.per_pod.values().sum()
    }

    /// Max over mean; 1.0 is perfectly even, 0 when nothing was counted.
    pub fn max_over_mean(&self) -> f64 {
        let total = self.total();
        if total == 0 || self.per_pod.is_empty() {
            return 0.0;
        }
        let max = self.per_pod.values().copied().max().unwrap_or(0);
        max as f64 * self.per_pod.len() as f64 / total as f64
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts: Vec<String> = self.per_pod.values().map(u64::to_string).collect();
        write!(
            f,
            "max/mean {:.2} [{}]",
            self.max_over_mean(),
            counts.join(" ")
        )
    }
}

/// The shape of a placement scenario: who connects from where.
#[derive(Clone, Debug)]
pub struct PlacementSpec {
    pub nodes: usize,
    /// Nodes `n0..` hosting the Service's pods.
    pub server_nodes: usize,
    pub pods_per_server_node: usize,
    /// Client pods on each of the other nodes.
    pub clients_per_node: usize,
    /// One Service per trial.
    pub trials: usize,
    /// Extra `grpclb-agent run` flags for every agent.
    pub agent_args: Vec<String>,
}

/// Trials of connection placement on a [`SimCluster`]: pods `p0..` on the
/// server nodes, client pods `c<node>x<k>` on the other nodes, and one
/// Service per trial (VIP 10.96.0.<10 + t>, pods listening with whoami on
/// port 7100 + t), so one trial's connections and loads never count in
/// the next and one cluster serves every trial.
pub struct Placement {
    pub cluster: SimCluster,
    pods: Vec<usize>,
    /// Client pods, grouped by node, in the order nodes connect.
    clients: Vec<Vec<usize>>,
    trials: usize,
}

/// The port the placement Services listen on.
const PLACEMENT_SERVICE_PORT: u16 = 80;

impl Placement {
    /// Builds the cluster and starts its agents.
    pub fn new(name: &str, spec: &PlacementSpec) -> Result<Placement> {
        if spec.trials > 200 {
            bail!(
                "{} trials: at most 200 (one VIP in 10.96.0.10-209 each)",
                spec.trials
            );
        }
        let agent_args: Vec<&str> = spec.agent_args.iter().map(String::as_str).collect();
        let mut cluster = SimCluster::new(name, spec.nodes, &agent_args)?;
        let mut pods = Vec::new();
        for node in 0..spec.server_nodes {
            for _ in 0..spec.pods_per_server_node {
                let name = format!("p{}", pods.len());
                pods.push(cluster.add_pod(node, &name)?);
            }
        }
        let mut clients = Vec::new();
        for node in spec.server_nodes..spec.nodes {
            let on_node = (0..spec.clients_per_node)
                .map(|k| cluster.add_pod(node, &format!("c{node}x{k}")))
                .collect::<Result<Vec<_>>>()?;
            clients.push(on_node);
        }
        let mut services = Vec::new();
        for t in 0..spec.trials {
            for &pod in &pods {
                cluster.start_server(pod, "whoami", Self::pod_port(t))?;
            }
            let def = ServiceDef::grpc(
                &format!("echo{t}"),
                Self::vip(t),
                PLACEMENT_SERVICE_PORT,
                Self::pod_port(t),
            );
            services.push(cluster.with_backends(def, &pods));
        }
        cluster.write_services(&services)?;
        cluster.start_agents()?;
        Ok(Placement {
            cluster,
            pods,
            clients,
            trials: spec.trials,
        })
    }

    /// Trial `t`'s Service VIP.
    pub fn vip(t: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, 0, 10 + t as u8)
    }

    fn pod_port(t: usize) -> u16 {
        7100 + t as u16
    }

    pub fn trials(&self) -> usize {
        self.trials
    }

    fn pod_names(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|&p| self.cluster.pod(p).pod.name.clone())
            .collect()
    }

    /// Trial `t`: client node after client node, `spacing` apart, each of
    /// the node's client pods opens `connections` at once and holds them;
    /// the connections per pod (each counted by the whoami name the pod
    /// answered with) once all are established. A failed connect fails it.
    pub fn trial(&self, t: usize, connections: u64, spacing: Duration) -> Result<Spread> {
        let to = SocketAddr::from((Self::vip(t), PLACEMENT_SERVICE_PORT));
        let start = Instant::now();
        let mut held: Vec<ChildGuard> = Vec::new();
        let mut counted = BTreeMap::new();
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
                for (pod, n) in report.per_pod() {
                    *counted.entry(pod).or_insert(0) += n;
                }
                held.push(guard);
            }
        }
        let names = self.pod_names();
        Ok(Spread::new(names.iter().map(String::as_str), &counted))
    }

    /// Runs every trial, printing each figure with the node count; returns
    /// the figures.
    pub fn run(&self, scenario: &str, connections: u64, spacing: Duration) -> Result<Vec<Spread>> {
        let nodes = self.cluster.node_count();
        let mut spreads = Vec::new();
        for t in 0..self.trials {
            let spread = self
                .trial(t, connections, spacing)
                .with_context(|| self.cluster.agent_logs())?;
            println!("{scenario}, {nodes} nodes, trial {t}: {spread}");
            spreads.push(spread);
        }
        println!(
            "{scenario}, {nodes} nodes: max/mean {:.2} averaged over {} trials",
            mean_max_over_mean(&spreads),
            spreads.len()
        );
        Ok(spreads)
    }
}

/// The mean of the spreads' max/mean (0 for none).
pub fn mean_max_over_mean(spreads: &[Spread]) -> f64 {
    if spreads.is_empty() {
        return 0.0;
    }
    spreads.iter().map(Spread::max_over_mean).sum::<f64>() / spreads.len() as f64
}

/// A peer that answers every HTTP request with the same bytes (nonsense, an
/// oversized body, ...) on an address an agent would serve on: stands in
/// for a broken or lying agent. Drop stops it.
pub struct FakePeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    requests: Arc<AtomicU32>,
}

impl FakePeer {
    pub fn serve(addr: SocketAddr, response: Vec<u8>) -> Result<FakePeer> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding the fake peer on {addr}"))?;
        listener
            .set_nonblocking(true)
            .context("making the fake peer's listener non-blocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU32::new(0));
        let thread = {
            let (stop, requests) = (stop.clone(), requests.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            requests.fetch_add(1, Ordering::Relaxed);
                            answer(stream, &response);
                        }
                        // Polled so Drop can stop it without a connection.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Ok(FakePeer {
            addr,
            stop,
            thread: Some(thread),
            requests,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections it answered so far.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Reads the request head (up to a blank line or 64 KiB), then writes
/// `response` and closes.
fn answer(mut stream: std::net::TcpStream, response: &[u8]) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(response);
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An HTTP/1.1 200 with `body` as JSON.
pub fn http_200_json(body: &[u8]) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_counts_pods_that_got_nothing() {
        let counted = BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 1)]);
        let spread = Spread::new(["a", "b", "c", "d"], &counted);
        assert_eq!(spread.total(), 4);
        assert_eq!(spread.max_over_mean(), 3.0);
        assert_eq!(spread.to_string(), "max/mean 3.00 [3 1 0 0]");
        assert_eq!(Spread::new(["a"], &BTreeMap::new()).max_over_mean(), 0.0);
    }

    #[test]
    fn nodes_carry_their_internal_ip_and_pods_get_distinct_addresses() {
        let def = ServiceDef::grpc("echo", Ipv4Addr::new(10, 96, 0, 1), 80, 7000)
            .backend_on(Ipv4Addr::new(10, 244, 1, 2), "n0");
        let text = cluster_yaml(&[def], &[("n0", Ipv4Addr::new(127, 9, 0, 1).into())]);
        let list: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let items = list["items"].as_array().unwrap();
        assert_eq!(items[1]["endpoints"][0]["nodeName"], "n0");
        assert_eq!(items[2]["kind"], "Node");
        assert_eq!(items[2]["metadata"]["name"], "n0");
        assert_eq!(items[2]["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(items[2]["status"]["addresses"][0]["address"], "127.9.0.1");
        assert_eq!(pod_ip(0).unwrap(), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(pod_ip(250).unwrap(), Ipv4Addr::new(10, 244, 2, 2));
        assert!(pod_ip(255 * 250).is_err());
        let ips = internal_ips(3).unwrap();
        assert_eq!(ips[2].octets()[3], 3);
        assert!(ips.iter().all(|ip| ip.is_loopback() && ip.octets()[1] != 0));
    }
}
