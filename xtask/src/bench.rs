//! `cargo xtask bench <what>`: benchmarks on a simulated cluster. They
//! measure and report; they assert nothing about timing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;

pub mod compare;
pub mod connect;
pub mod exchange;
pub mod placement;
pub mod rebalance;
pub mod scale;
pub mod tracker;

#[derive(Subcommand)]
pub enum Bench {
    /// connect()+close latency from a client pod to a server pod: no hook,
    /// grpclb with 1/1k/10k Services, kube-proxy iptables with 1/1k/10k
    /// Services (needs root). Writes target/bench/connect.json.
    Connect {
        /// Measured connects per case.
        #[arg(long, default_value_t = connect::DEFAULT_SAMPLES)]
        samples: usize,
    },
    /// Server throughput with and without grpclb's HTTP/2 frame tracking of
    /// local pods: unary gRPC calls/s and HTTP/2 streaming MB/s (needs root).
    /// Writes target/bench/tracker.json.
    Tracker {
        /// Rounds; each measures every mode once, and the report takes medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Unary calls per connection per round (4 connections).
        #[arg(long, default_value_t = 5_000)]
        rpcs: u64,
    },
    /// A Service scales from 2 to 4 pods while clients keep calling over
    /// long-lived connections: per-pod calls per second every 500 ms with
    /// kube-proxy's iptables rules and with grpclb, and how long until
    /// max/mean <= 1.2 (needs root). Writes target/bench/rebalance.json.
    Rebalance {
        /// How long to keep calling after the scale-up.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// Client connections (tonic channels), all from one client pod.
        #[arg(long, default_value_t = 8)]
        connections: u64,
    },
    /// kube-proxy iptables, IPVS (when the kernel has it), headless-Service
    /// DNS with grpc-go round_robin, nginx grpc_pass and grpclb under the
    /// same gRPC workloads: steady load, scale-up, rolling update (needs
    /// root; installs grpc-go, dnsmasq and nginx from Debian when missing).
    /// Each on one node and on a multi-node cluster (one agent per node,
    /// the load exchange on). Writes target/bench/compare.md, compare.json
    /// and SVG plots.
    Compare {
        /// A short run: every system and workload on one node, the first
        /// steady workload on more nodes (about 3 minutes).
        #[arg(long)]
        smoke: bool,
        /// Topologies, by node count: 1 puts every pod on one node; K > 1
        /// puts the server pods on K/4 nodes and the clients on the rest.
        #[arg(long, value_delimiter = ',', default_values_t = compare::DEFAULT_NODES)]
        nodes: Vec<usize>,
    },
    /// The release agent at cluster scale on 1 simulated node: N Services ×
    /// 10 endpoints from a YAML file and from an in-test API server (real
    /// list/watch): time to ready, peak and steady RSS, idle CPU, one
    /// endpoint change to the pinned maps (time and CPU), /metrics size
    /// (needs root). Writes target/bench/scale.md and scale.json.
    Scale {
        /// Service counts, each with 10 ready endpoints.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000])]
        services: Vec<usize>,
        /// Where the agent reads them from.
        #[arg(long, value_delimiter = ',', default_value = "file,kube")]
        sources: Vec<scale::Source>,
        /// How long to measure the agent's CPU with nothing changing.
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
        /// Endpoint changes to time (one endpoint of a different Service
        /// marked not ready each); the report takes medians.
        #[arg(long, default_value_t = 5)]
        changes: usize,
        /// How long the agent may take to be ready before the case is
        /// reported as not ready.
        #[arg(long, default_value_t = 30)]
        ready_timeout: u64,
        /// Extra `grpclb-agent run` flags, space-separated (e.g.
        /// "--max-backends=131072"); the point is that none are needed.
        #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
        agent_args: Vec<String>,
    },
    /// Where new connections land on 12 simulated nodes, each with its own
    /// agent: 8 client nodes connect one after another, 1.5 s apart, to 8
    /// pods on 4 other nodes (one connection each, then 2 clients per node
    /// with 2 connections each), then all 8 at the same instant;
    /// connections per pod max/mean averaged over the trials (needs root).
    /// Writes target/bench/placement.json.
    Placement {
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Extra `grpclb-agent run` flags, space-separated (e.g.
        /// "--exchange-port=0": each node's own counts only).
        #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
        agent_args: Vec<String>,
    },
    /// What the load exchange costs each node on simulated clusters of N and
    /// 2N nodes (one agent per node): requests per second made and served,
    /// answer bytes per request and per second, with nothing changing
    /// (idle) and with clients connecting and closing (churn), from the
    /// agents' exchange counters (needs root). Writes
    /// target/bench/exchange.md and exchange.json.
    Exchange {
        /// Node counts; each should double the previous one.
        #[arg(long, value_delimiter = ',', default_values_t = [8, 16])]
        nodes: Vec<usize>,
        /// Length of each phase (idle, churn) per node count.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Internal: the measuring client, run inside a client pod.
    #[command(hide = true)]
    ConnectProbe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        samples: usize,
        /// Connects made first and not recorded.
        #[arg(long)]
        warmup: usize,
        /// Where the recorded durations go (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Internal: accepts and closes connections, run inside the server pod.
    #[command(hide = true)]
    AcceptServer {
        #[arg(long)]
        listen: SocketAddr,
    },
}

pub fn bench(what: Bench) -> Result<()> {
    match what {
        Bench::Connect { samples } => connect::run(samples),
        Bench::Compare { smoke, nodes } => compare::run(smoke, &nodes),
        Bench::Tracker { rounds, rpcs } => tracker::run(rounds, rpcs),
        Bench::Rebalance {
            seconds,
            connections,
        } => rebalance::run(seconds, connections),
        Bench::Placement { trials, agent_args } => placement::run(trials, agent_args),
        Bench::Exchange { nodes, seconds } => exchange::run(nodes, seconds),
        Bench::Scale {
            services,
            sources,
            idle_seconds,
            changes,
            ready_timeout,
            agent_args,
        } => scale::run(scale::Options {
            services,
            sources,
            idle_seconds,
            changes,
            ready_timeout: Duration::from_secs(ready_timeout),
            agent_args,
        }),
        Bench::ConnectProbe {
            to,
            samples,
            warmup,
            out,
        } => connect::probe(to, samples, warmup, &out),
        Bench::AcceptServer { listen } => connect::accept_server(listen),
    }
}
