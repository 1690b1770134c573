//! The load exchange over real HTTP, in one process: one exchange per
//! simulated node, each on its own loopback address (127.0.X.i, as nodes'
//! InternalIPs), fed a shared desired state and its own local loads. No
//! eBPF, no root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use grpclb_agent::exchange::core::Config;
use grpclb_agent::exchange::model::{ClusterView, LocalLoads, PlacementLoads, PodLoad};
use grpclb_agent::exchange::{channels, run, Outputs, Settings};
use grpclb_agent::observe::metrics::Metrics;
use grpclb_agent::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
use grpclb_agent::state::topology::Rule;
use grpclb_common::{Addr, Backend, ServiceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// Generous bound for conditions that normally hold within a second or
/// two (the machine is shared): a failure, not a measurement.
const PATIENCE: Duration = Duration::from_secs(20);
const INTERVAL: Duration = Duration::from_millis(250);

struct Node {
    name: String,
    ip: IpAddr,
    local: watch::Sender<Arc<LocalLoads>>,
    outputs: Outputs,
    metrics: Arc<Metrics>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

struct Cluster {
    nodes: Vec<Node>,
    port: u16,
    states: watch::Sender<Option<DesiredState>>,
}

fn pod(node: usize, k: u8) -> Backend {
    Backend::new(Addr::from_v4([10, 1, node as u8, k]), 50051)
}

fn conns(c: u32) -> PodLoad {
    PodLoad {
        connections: c,
        calls_per_second: None,
    }
}

/// A port free on every address (the exchange uses one port cluster-wide).
async fn free_port(ips: &[IpAddr]) -> u16 {
    'search: loop {
        let first = TcpListener::bind((ips[0], 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut held = vec![first];
        for ip in &ips[1..] {
            match TcpListener::bind((*ip, port)).await {
                Ok(l) => held.push(l),
                Err(_) => continue 'search,
            }
        }
        return port;
    }
}

impl Cluster {
    /// `n` nodes on 127.0.`net`.1..n, two pods each, one Service.
    async fn start(net: u8, n: usize, ttl: Duration) -> Cluster {
        let ips: Vec<IpAddr> = (0..n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, net, i as u8 + 1)))
            .collect();
        let port = free_port(&ips).await;
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let service = DesiredService {
            name: "apps/echo:grpc".into(),
            endpoints: (0..n)
                .flat_map(|i| {
                    let node: Arc<str> = names[i].as_str().into();
                    (1..=2).map(move |k| Endpoint {
                        backend: pod(i, k),
                        node_name: Some(node.clone()),
                        condition: EndpointCondition::Ready,
                    })
                })
                .collect(),
            track_frames: false,
            rule: Rule::Ready,
        };
        let desired = DesiredState {
            services: [(
                ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 50051),
                Arc::new(service),
            )]
            .into(),
            nodes: Arc::new(
                (0..n)
                    .map(|i| (Arc::from(names[i].as_str()), ips[i]))
                    .collect(),
            ),
            ..DesiredState::default()
        };
        let (states, states_rx) = watch::channel(Some(desired));
        let nodes = (0..n)
            .map(|i| {
                let (local, local_rx) = watch::channel(Arc::new(LocalLoads::from([
                    (pod(i, 1), conns(1)),
                    (pod(i, 2), conns(1)),
                ])));
                let (publishers, outputs) = channels();
                let metrics = Metrics::new();
                let settings = Settings {
                    node_name: names[i].as_str().into(),
                    port,
                    // Learned from the Node map, as in a cluster.
                    listen_ip: None,
                    interval: INTERVAL,
                    timeout: Duration::from_secs(1),
                    config: Config { fanout: 16, ttl },
                };
                let task = tokio::spawn(run(
                    settings,
                    metrics.clone(),
                    states_rx.clone(),
                    local_rx,
                    publishers,
                ));
                Node {
                    name: names[i].clone(),
                    ip: ips[i],
                    local,
                    outputs,
                    metrics,
                    task: Some(task),
                }
            })
            .collect();
        Cluster {
            nodes,
            port,
            states,
        }
    }

    /// Waits until every live node's placement satisfies `check`.
    async fn until_placement(&mut self, check: impl Fn(&PlacementLoads) -> bool + Copy) {
        for node in self.nodes.iter_mut().filter(|n| n.task.is_some()) {
            let waited = timeout(PATIENCE, node.outputs.placement.wait_for(|p| check(p)))
                .await
                .is_ok();
            assert!(
                waited,
                "{}: placement {:?}",
                node.name,
                node.outputs.placement.borrow()
            );
        }
    }

    async fn until_view(&mut self, skip: usize, check: impl Fn(&ClusterView) -> bool + Copy) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if i == skip || node.task.is_none() {
                continue;
            }
            let waited = timeout(PATIENCE, node.outputs.cluster.wait_for(|v| check(v)))
                .await
                .is_ok();
            assert!(
                waited,
                "{}: view {:?}",
                node.name,
                node.outputs.cluster.borrow()
            );
        }
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i].task.take().unwrap().abort();
    }

    fn requests(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.metrics.exchange_requests().0)
            .collect()
    }

    fn errors(&self, peer: usize, reason: &'static str) -> u64 {
        let name = &self.nodes[peer].name;
        self.nodes
            .iter()
            .map(|n| n.metrics.exchange_peer_errors(name, reason))
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(task) = node.task.take() {
                task.abort();
            }
        }
    }
}

/// Converges, changes one node's load, and returns how long until every
/// node's placement showed it; checks requests per node per interval.
async fn spread(net: u8, n: usize) -> (Duration, f64, u64) {
    let mut cluster = Cluster::start(net, n, Duration::from_secs(60)).await;
    cluster
        .until_placement(|p| p.len() == 2 * n && p.values().all(|l| *l == 1))
        .await;
    let changed = n - 1;
    let start = Instant::now();
    cluster.nodes[changed].local.send_replace(Arc::new(
        [(pod(changed, 1), conns(7)), (pod(changed, 2), conns(1))].into(),
    ));
    cluster
        .until_placement(|p| p.get(&pod(changed, 1)) == Some(&7))
        .await;
    let elapsed = start.elapsed();
    // Requests over a quiet window of 12 intervals.
    let before = cluster.requests();
    let window = Instant::now();
    tokio::time::sleep(INTERVAL * 12).await;
    let intervals = window.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    let made: Vec<u64> = cluster
        .requests()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let mean = made.iter().sum::<u64>() as f64 / n as f64 / intervals;
    let busiest = *made.iter().max().unwrap();
    (elapsed, mean, busiest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_change_reaches_every_node_and_requests_per_node_stay_flat_at_12_and_24_nodes() {
    let (t12, mean12, busiest12) = spread(12, 12).await;
    let (t24, mean24, busiest24) = spread(24, 24).await;
    println!(
        "12 nodes: change everywhere in {t12:?}, {mean12:.2} requests per node per interval \
         (busiest {busiest12} in 12 intervals); 24 nodes: {t24:?}, {mean24:.2} (busiest {busiest24})"
    );
    // Each tree edge is asked both ways once per interval: 2 (n - 1) / n
    // requests per node, below 2 whatever n; the busiest asks at most
    // F + 1 = 17 per interval.
    for mean in [mean12, mean24] {
        assert!(mean < 2.2, "{mean}");
    }
    for busiest in [busiest12, busiest24] {
        assert!(busiest <= 17 * 13, "{busiest}");
    }
}

/// A peer that answers every request with `response` (raw HTTP).
async fn impostor(ip: IpAddr, port: u16, response: &'static [u8]) -> JoinHandle<()> {
    let listener = TcpListener::bind(SocketAddr::new(ip, port)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 || stream.write_all(response).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_lying_peer_is_counted_and_its_pods_expire() {
    let n = 12;
    let ttl = Duration::from_secs(2);
    let mut cluster = Cluster::start(40, n, ttl).await;
    cluster.until_placement(|p| p.len() == 2 * n).await;
    let ok = |body: &str| -> &'static [u8] {
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        Box::leak(response.into_bytes().into_boxed_slice())
    };
    let cases: [(usize, &'static [u8], &'static str); 4] = [
        (3, b"", "connect"),
        (4, ok("{\"v\": 1,"), "json"),
        (
            5,
            b"HTTP/1.1 200 OK\r\ncontent-length: 40000000\r\n\r\n{",
            "oversized",
        ),
        (
            6,
            ok(
                r#"{"v":1,"full":true,"n":["node-6"],"e":[["10.1.6.1:50051",0,9999999,null]],"r":[]}"#,
            ),
            "absurd",
        ),
    ];
    let mut impostors = Vec::new();
    for (i, response, _) in cases {
        cluster.kill(i);
        if !response.is_empty() {
            // Give the killed server's port back before taking it.
            let (ip, port) = (cluster.nodes[i].ip, cluster.port);
            let bound = timeout(PATIENCE, async {
                loop {
                    if let Ok(l) = TcpListener::bind((ip, port)).await {
                        drop(l);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            assert!(bound.is_ok());
            impostors.push(impostor(ip, port, response).await);
        }
    }
    // Their pods leave every other node's view after the TTL ...
    let gone = |v: &ClusterView| {
        cases
            .iter()
            .all(|(i, _, _)| !v.contains_key(&pod(*i, 1)) && !v.contains_key(&pod(*i, 2)))
    };
    cluster.until_view(usize::MAX, gone).await;
    // ... while the placement keeps every pod, the missing ones at the mean.
    cluster
        .until_placement(|p| p.len() == 2 * n && p.values().all(|l| *l == 1))
        .await;
    for (i, _, reason) in cases {
        assert!(
            cluster.errors(i, reason) > 0,
            "node-{i}: no {reason} error counted"
        );
    }
    for impostor in impostors {
        impostor.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_deltas_and_refuses_bad_queries() {
    let mut cluster = Cluster::start(60, 2, Duration::from_secs(60)).await;
    cluster.until_view(usize::MAX, |v| v.len() == 4).await;
    let addr = SocketAddr::new(cluster.nodes[0].ip, cluster.port);
    let get = |path: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code: u16 = response[9..12].parse().unwrap();
        (code, response.split_once("\r\n\r\n").unwrap().1.to_string())
    };
    let (code, body) = get("/v1/cluster".into()).await;
    assert_eq!(code, 200);
    let full: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(full["full"], true);
    assert_eq!(full["e"].as_array().unwrap().len(), 4);
    let version = full["v"].as_u64().unwrap();
    assert_eq!(get(format!("/v1/cluster?since={version}")).await.0, 304);
    assert_eq!(get("/v1/cluster?since=x".into()).await.0, 400);
    assert_eq!(get("/v1/other".into()).await.0, 404);
    // A pod leaving its Service's EndpointSlice leaves the placement.
    cluster.states.send_modify(|state| {
        let state = state.as_mut().unwrap();
        for service in state.services.values_mut() {
            Arc::make_mut(service)
                .endpoints
                .retain(|e| e.backend != pod(1, 2));
        }
    });
    cluster
        .until_placement(|p| p.len() == 3 && !p.contains_key(&pod(1, 2)))
        .await;
}
