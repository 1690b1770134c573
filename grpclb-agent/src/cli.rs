//! Command line of `grpclb-agent`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use grpclb_common::capacity;

use crate::observe::metrics::MetricsDetail;
use crate::observe::status::ServiceName;
use crate::rebalance::planner::PlannerConfig;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/grpclb";

#[derive(Debug, Parser)]
#[command(
    name = "grpclb-agent",
    version,
    about = "Connect-time gRPC balancer for Kubernetes nodes",
    long_about = "Connect-time gRPC balancer for Kubernetes nodes.\n\n\
        eBPF programs attached to a cgroup rewrite connect() to a balanced Service \
        ClusterIP:port into the pod with the fewest live connections from this node, \
        so every new gRPC (HTTP/2) connection is balanced, not just the first. \
        The agent keeps the programs' maps in sync with Services and EndpointSlices.\n\n\
        A TCP Service port is balanced when its appProtocol is grpc, h2c or kubernetes.io/h2c, \
        or when the Service has the annotation grpclb.io/enabled: \"true\".\n\n\
        Programs, links and maps are pinned under --bpffs: they keep balancing while the \
        agent is stopped, a restarted agent adopts them, `uninstall` removes them.\n\n\
        Logging: RUST_LOG (default info)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install (or adopt) the balancer and keep its maps in sync with a source
    /// until SIGINT/SIGTERM; the pins stay, so balancing continues after exit.
    Run(Box<RunArgs>),
    /// Print whether the agent is ready and what it balances: a line per
    /// Service, or (--service) one Service's backends; as a table or JSON.
    ///
    /// After the agent's state comes a line per balanced Service: its ports, the rule that chose its endpoints, BACKENDS
    /// (serving endpoints the source lists), READY (those taking this
    /// node's new connections), CONNECTIONS (live, from this node to
    /// them), their MAX and MEAN per ready backend and MAX/MEAN (1.00:
    /// even), and once the load exchange runs the MAX/MEAN of their
    /// Service-wide loads (VIEW); then draining backends, the Services left
    /// to another proxy and the moves waiting.
    ///
    /// The running agent answers (on --metrics-addr); the pinned maps are
    /// read directly only when no agent for them answers, without rules
    /// and endpoint counts.
    ///
    /// Exit status: 0 when the agent is ready; 1 when it is not ready or
    /// not running (the output still shows the maps, and stderr why and
    /// what to do) or the maps cannot be read; 2 for a bad command line or
    /// a --service that names no balanced Service.
    Status(StatusArgs),
    /// Detach the programs and remove every pin under the bpffs directory.
    Uninstall {
        /// Directory holding the pins.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Directory holding the pins.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// The running agent's --metrics-addr.
    #[arg(long, value_name = "ADDR", default_value = crate::observe::metrics::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Show this Service's line and every backend of its frontends, with
    /// its live connections and Service-wide load (VIEW).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub service: Option<ServiceName>,
    /// table for people; json for scripts: one document whose fields
    /// docs/status.md describes (`schema_version` says which version).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Table)]
    pub output: Output,
}

/// `status --output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes are balanced [default: the cgroup v2
    /// root, found in /proc/self/mountinfo].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned programs, links and maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// This node's name, as EndpointSlices' nodeName gives it [default: the
    /// hostname].
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for EndpointSlice zone hints (trafficDistribution
    /// PreferClose/PreferSameZone) [default: the label
    /// topology.kubernetes.io/zone of this node's Node: read from the API
    /// with --source kube, from a v1 Node in the file with --source file].
    #[arg(long, value_name = "ZONE", env = "NODE_ZONE")]
    pub node_zone: Option<String>,
    /// Where Services and EndpointSlices come from. file:PATH reads a YAML file
    /// as `kubectl get svc,endpointslices -A -o yaml` prints it (or
    /// multi-document YAML of those objects; a v1 Node named --node-name
    /// in it gives this node's zone), re-applied as soon as it changes (its
    /// directory is watched); only the YAML documents (`---`) that changed
    /// are parsed again, so keep large files one object per document (a
    /// v1 List is one document, parsed whole on any change); an invalid
    /// file is reported and the last good state stays. kube watches Services and EndpointSlices of all namespaces
    /// through the Kubernetes API (see --kubeconfig) [default: kube inside a
    /// cluster (KUBERNETES_SERVICE_HOST is set), else required].
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<SourceSpec>,
    /// With --source kube: the kubeconfig to use [default: the in-cluster
    /// configuration of the pod's service account].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Address of the Prometheus metrics (/metrics) and of the health
    /// endpoints (/healthz; /readyz: 200 while the programs are attached and
    /// the last sync applied every frontend, else 503 and why).
    #[arg(long, value_name = "ADDR", default_value = crate::observe::metrics::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Series on /metrics: node (this node's totals and its own pods: a
    /// few dozen series at any cluster size), service (also per frontend its
    /// backends, endpoint rule and connections from this node: O(Services)),
    /// backend (also connections per backend and call rate per tracked
    /// connection: O(endpoints), for debugging).
    #[arg(long, value_enum, value_name = "LEVEL", default_value_t = MetricsDetail::Service)]
    pub metrics_detail: MetricsDetail,
    /// Capacity of the frontend map (ClusterIP, port pairs).
    #[arg(long, value_name = "N", default_value_t = capacity::FRONTENDS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_frontends: u32,
    /// Capacity of the backend slot map (two slots per frontend, one entry per
    /// backend in each).
    #[arg(long, value_name = "N", default_value_t = capacity::BACKEND_SLOTS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_backend_slots: u32,
    /// Capacity of the per-backend connection count map (distinct pod, port
    /// pairs), and of the map of their Service-wide loads.
    #[arg(long, value_name = "N", default_value_t = capacity::BACKEND_LOAD, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_backends: u32,
    /// Capacity of the local backend map and its accepted-connection counts
    /// (pods of this node behind balanced ports).
    #[arg(long, value_name = "N", default_value_t = capacity::LOCAL_BACKENDS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_local_backends: u32,
    /// Capacity of the tracked-connection map (connections local pods
    /// accepted, open at once).
    #[arg(long, value_name = "N", default_value_t = capacity::TRACKED, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tracked_connections: u32,
    /// Log every connect the kernel programs rewrite, with the chosen backend
    /// (costs a ring-buffer write per connect; off by default).
    #[arg(long)]
    pub bpf_log: bool,
    #[command(flatten)]
    pub rebalance: RebalanceArgs,
    #[command(flatten)]
    pub exchange: ExchangeArgs,
}

/// The load exchange (docs/exchange.md): agents serve their own pods' loads
/// to each other over HTTP on the node network, in a tree of fan-out F over
/// all Nodes, so placement and rebalancing see each Service's load across
/// the cluster.
#[derive(Debug, Args)]
#[command(next_help_heading = "Load exchange")]
pub struct ExchangeArgs {
    /// Port the agents serve their loads on, on each node's InternalIP
    /// (every agent of a cluster uses the same); 0 turns the exchange off
    /// (placement then uses this node's own counts only).
    #[arg(long, value_name = "PORT", default_value_t = crate::exchange::shell::DEFAULT_PORT)]
    pub exchange_port: u16,
    /// IP to listen on [default: this node's InternalIP, from its Node
    /// object].
    #[arg(long, value_name = "IP")]
    pub exchange_addr: Option<IpAddr>,
    /// How often each agent asks its parent and children, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    pub exchange_interval: u64,
    /// Children per node in the exchange tree: each agent asks at most
    /// F + 1 peers per interval, whatever the cluster's size.
    #[arg(long, value_name = "F", default_value_t = crate::exchange::tree::DEFAULT_FANOUT, value_parser = parse_fanout)]
    pub exchange_fanout: usize,
    /// A peer's loads are forgotten this many seconds after its last
    /// answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub exchange_ttl: u64,
}

fn parse_fanout(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(f) if (2..=256).contains(&f) => Ok(f),
        _ => Err(format!("expected a fan-out from 2 to 256, got {text:?}")),
    }
}

impl ExchangeArgs {
    /// The exchange's settings for node `node_name`; `None` when it is off.
    pub fn settings(&self, node_name: &str) -> Option<crate::exchange::Settings> {
        (self.exchange_port != 0).then(|| crate::exchange::Settings {
            node_name: Arc::from(node_name),
            port: self.exchange_port,
            listen_ip: self.exchange_addr,
            interval: Duration::from_millis(self.exchange_interval),
            timeout: crate::exchange::shell::TIMEOUT,
            config: crate::exchange::core::Config {
                fanout: self.exchange_fanout,
                ttl: Duration::from_secs(self.exchange_ttl),
            },
        })
    }
}

/// Rebalancing of existing connections: for Services annotated
/// `grpclb.io/track-frames: "true"`, connections this node's pods accepted get
/// a graceful HTTP/2 GOAWAY at a frame boundary when they should move; the
/// client finishes its calls and reconnects through the connect hook.
#[derive(Debug, Args)]
#[command(next_help_heading = "Rebalancing")]
pub struct RebalanceArgs {
    /// Send no GOAWAY at all (frames are still followed for the metrics).
    #[arg(long)]
    pub no_rebalance: bool,
    /// Do not move the connections of endpoints that turn terminating or not
    /// ready (drain).
    #[arg(long)]
    pub no_drain: bool,
    /// When a Service gains ready endpoints (N to N'), each old local pod sheds
    /// about (N'-N)/N' of its calls per second over this window; "off"
    /// disables.
    #[arg(long, value_name = "SECONDS|off", default_value = "5", value_parser = parse_seconds_or_off)]
    pub scale_up_window: OrOff<Duration>,
    /// A local pod above (1+E) times the mean calls per second of its
    /// Service's pods on every node (and at least --hotspot-min-excess
    /// connections' worth above its lightest pod) sheds the excess, and is hot until under
    /// half of both, once the Service has settled: no scale-up under way,
    /// nothing moved or connected in the last 2 s. Connections younger than
    /// 6 s stay. "off" disables.
    #[arg(long, value_name = "E|off", default_value = "0.25", value_parser = parse_fraction_or_off)]
    pub hotspot_epsilon: OrOff<f64>,
    /// How far above its Service's lightest pod a hotspot is at least, in
    /// connections: the mean calls per second of one connection times N.
    #[arg(long, value_name = "N", default_value_t = 1.5, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub hotspot_min_excess: f64,
    /// Move connections older than this (plus or minus 10 % jitter); "off"
    /// (the default) keeps them.
    #[arg(long, value_name = "SECONDS|off", default_value = "off", value_parser = parse_seconds_or_off)]
    pub max_connection_age: OrOff<Duration>,
    /// At most this many GOAWAYs per pod per second, across all policies.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_goaways_per_pod_per_second: u32,
}

impl RebalanceArgs {
    /// The planner's settings; `None` when rebalancing is off.
    pub fn planner_config(&self) -> Option<PlannerConfig> {
        (!self.no_rebalance).then(|| PlannerConfig {
            drain: !self.no_drain,
            scale_up_window_ms: self.scale_up_window.0.map(|d| d.as_millis() as u64),
            hotspot_epsilon: self.hotspot_epsilon.0,
            hotspot_min_excess: self.hotspot_min_excess,
            max_age_ms: self.max_connection_age.0.map(|d| d.as_millis() as u64),
            max_moves_per_pod_per_second: self.max_goaways_per_pod_per_second,
        })
    }
}

/// A policy setting that can also be "off".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrOff<T>(pub Option<T>);

fn parse_positive_or_off(text: &str, unit: &str) -> Result<Option<f64>, String> {
    if text == "off" {
        return Ok(None);
    }
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Some(v)),
        _ => Err(format!(
            "expected a positive {unit}or \"off\", got {text:?}"
        )),
    }
}

fn parse_seconds_or_off(text: &str) -> Result<OrOff<Duration>, String> {
    Ok(OrOff(
        parse_positive_or_off(text, "number of seconds ")?.map(Duration::from_secs_f64),
    ))
}

fn parse_fraction_or_off(text: &str) -> Result<OrOff<f64>, String> {
    Ok(OrOff(parse_positive_or_off(text, "number ")?))
}

fn parse_non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
        _ => Err(format!("expected a number of 0 or more, got {text:?}")),
    }
}

impl RunArgs {
    /// `--source`, or kube when running inside a cluster.
    pub fn source_or_default(&self, in_cluster: bool) -> Result<SourceSpec, String> {
        match (&self.source, in_cluster) {
            (Some(source), _) => Ok(source.clone()),
            (None, true) => Ok(SourceSpec::Kube),
            (None, false) => Err(
                "not running in a cluster (KUBERNETES_SERVICE_HOST is unset): pass --source file:PATH, \
                 or --source kube with --kubeconfig"
                    .into(),
            ),
        }
    }
}

/// `--source` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    File(PathBuf),
    Kube,
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", "")) => {
                Err("file: needs a path, as in file:/etc/grpclb/services.yaml".into())
            }
            Some(("file", path)) => Ok(SourceSpec::File(PathBuf::from(path))),
            _ if s == "kube" => Ok(SourceSpec::Kube),
            _ => Err(format!("unknown source {s:?}; expected file:PATH or kube")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("grpclb-agent").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_defaults() {
        let cli = parse(&["run", "--source", "file:/tmp/s.yaml"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.source, Some(SourceSpec::File("/tmp/s.yaml".into())));
        assert_eq!(run.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(run.cgroup, None);
        assert_eq!(run.max_frontends, capacity::FRONTENDS);
        assert_eq!(run.max_backend_slots, capacity::BACKEND_SLOTS);
        assert_eq!(run.max_backends, capacity::BACKEND_LOAD);
        assert!(!run.bpf_log);
        assert_eq!(run.metrics_detail, MetricsDetail::Service);
        let exchange = run.exchange.settings("n1").expect("on by default");
        assert_eq!(exchange.port, 9926);
        assert_eq!(exchange.listen_ip, None);
        assert_eq!(exchange.interval, Duration::from_millis(250));
        assert_eq!(exchange.config.fanout, 16);
        assert_eq!(exchange.config.ttl, Duration::from_secs(60));
        assert_eq!(
            run.rebalance.planner_config(),
            Some(PlannerConfig::default()),
            "the flags' defaults are the planner's"
        );
    }

    #[test]
    fn rebalancing_policies_switch_off_one_by_one() {
        let cli = parse(&[
            "run",
            "--no-drain",
            "--scale-up-window",
            "off",
            "--hotspot-epsilon",
            "0.5",
            "--hotspot-min-excess",
            "1",
            "--max-connection-age",
            "300",
            "--max-goaways-per-pod-per-second",
            "3",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            run.rebalance.planner_config(),
            Some(PlannerConfig {
                drain: false,
                scale_up_window_ms: None,
                hotspot_epsilon: Some(0.5),
                hotspot_min_excess: 1.0,
                max_age_ms: Some(300_000),
                max_moves_per_pod_per_second: 3,
            })
        );
        let cli = parse(&["run", "--no-rebalance"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.rebalance.planner_config(), None);
        for (bad, expected) in [
            (
                &["run", "--scale-up-window", "0"][..],
                "expected a positive",
            ),
            (&["run", "--hotspot-epsilon", "zero"], "expected a positive"),
            (
                &["run", "--hotspot-min-excess", "-1"],
                "expected a number of 0 or more",
            ),
            (
                &["run", "--max-connection-age", "forever"],
                "expected a positive",
            ),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn run_takes_every_flag() {
        let cli = parse(&[
            "run",
            "--cgroup",
            "/sys/fs/cgroup/node",
            "--bpffs",
            "/sys/fs/bpf/x",
            "--node-name",
            "n1",
            "--source",
            "file:s.yaml",
            "--max-frontends",
            "10",
            "--max-backend-slots",
            "20",
            "--max-backends",
            "30",
            "--bpf-log",
            "--metrics-detail",
            "backend",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.cgroup, Some("/sys/fs/cgroup/node".into()));
        assert_eq!(run.bpffs, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(run.node_name.as_deref(), Some("n1"));
        assert_eq!(
            (run.max_frontends, run.max_backend_slots, run.max_backends),
            (10, 20, 30)
        );
        assert!(run.bpf_log);
        assert_eq!(run.metrics_detail, MetricsDetail::Backend);
    }

    #[test]
    fn bad_sources_and_zero_capacities_are_refused_with_a_reason() {
        let e = parse(&["run", "--source", "/tmp/s.yaml"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected file:PATH or kube"), "{e}");
        let e = parse(&["run", "--source", "file:"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a path"), "{e}");
        assert!(parse(&["run", "--source", "file:a", "--max-sockets", "0"]).is_err());
        let Command::Run(run) = parse(&["run"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(
            run.source_or_default(true),
            Ok(SourceSpec::Kube),
            "kube in a cluster"
        );
        let outside = run.source_or_default(false).unwrap_err();
        assert!(outside.contains("--source file:PATH"), "{outside}");
    }

    #[test]
    fn kube_source_takes_a_kubeconfig_and_a_metrics_address() {
        let cli = parse(&["run", "--source", "kube"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.source, Some(SourceSpec::Kube));
        assert_eq!(run.source_or_default(false), Ok(SourceSpec::Kube));
        assert_eq!(run.kubeconfig, None);
        assert_eq!(run.metrics_addr.to_string(), "127.0.0.1:9925");
        let cli = parse(&[
            "run",
            "--source=kube",
            "--kubeconfig=/etc/k.yaml",
            "--metrics-addr=0.0.0.0:9000",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.kubeconfig, Some(PathBuf::from("/etc/k.yaml")));
        assert_eq!(run.metrics_addr.to_string(), "0.0.0.0:9000");
        assert!(parse(&["run", "--source=kube", "--metrics-addr=nope"]).is_err());
    }

    #[test]
    fn status_and_uninstall_default_to_the_standard_pin_dir() {
        for sub in ["status", "uninstall"] {
            match parse(&[sub]).unwrap().command {
                Command::Status(StatusArgs { bpffs, .. }) | Command::Uninstall { bpffs } => {
                    assert_eq!(bpffs, PathBuf::from(DEFAULT_BPFFS))
                }
                Command::Run(_) => panic!("parsed as run"),
            }
        }
    }

    #[test]
    fn status_shows_every_service_as_a_table_unless_asked_otherwise() {
        let status = |args: &[&str]| {
            let mut all = vec!["status"];
            all.extend_from_slice(args);
            match parse(&all).map(|c| c.command) {
                Ok(Command::Status(args)) => Ok(args),
                Ok(_) => panic!("not status"),
                Err(e) => Err(e),
            }
        };
        let default = status(&[]).unwrap();
        assert_eq!((default.service, default.output), (None, Output::Table));
        let one = status(&["--service", "apps/echo", "--output", "json"]).unwrap();
        assert_eq!(one.service, Some("apps/echo".parse().unwrap()));
        assert_eq!(one.output, Output::Json);
        for (bad, expected) in [
            (
                "echo",
                "expected a Service as NAMESPACE/NAME, such as default/echo",
            ),
            (
                "apps/echo:grpc",
                "without the port: apps/echo, not apps/echo:grpc",
            ),
        ] {
            let e = status(&["--service", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "usage");
            assert!(e.to_string().contains(expected), "{e}");
        }
        let e = status(&["--output", "yaml"]).unwrap_err().to_string();
        assert!(e.contains("[possible values: table, json]"), "{e}");
    }

    #[test]
    fn the_exchange_takes_its_flags_and_port_zero_turns_it_off() {
        let run = |args: &[&str]| {
            let mut all = vec!["run"];
            all.extend_from_slice(args);
            match parse(&all).map(|c| c.command) {
                Ok(Command::Run(run)) => Ok(run.exchange),
                Ok(_) => panic!("not run"),
                Err(e) => Err(e.to_string()),
            }
        };
        let x = run(&[
            "--exchange-port",
            "7000",
            "--exchange-addr",
            "127.0.1.3",
            "--exchange-interval",
            "100",
            "--exchange-fanout",
            "4",
            "--exchange-ttl",
            "5",
        ])
        .unwrap()
        .settings("n3")
        .unwrap();
        assert_eq!(x.port, 7000);
        assert_eq!(x.listen_ip, Some("127.0.1.3".parse().unwrap()));
        assert_eq!(x.interval, Duration::from_millis(100));
        assert_eq!(x.config.fanout, 4);
        assert_eq!(x.config.ttl, Duration::from_secs(5));
        assert!(run(&["--exchange-port", "0"])
            .unwrap()
            .settings("n")
            .is_none());
        let e = run(&["--exchange-fanout", "1"]).unwrap_err();
        assert!(e.contains("expected a fan-out from 2 to 256"), "{e}");
    }
}
