//! `cargo xtask demo`: the same gRPC load balanced by kube-proxy-style
//! iptables rules and by grpclb, on a throw-away simulated cluster.
//!
//! gRPC clients keep a few long-lived HTTP/2 connections and send every RPC
//! over them, so whoever picks the pod for each connection decides the spread
//! of all RPCs. kube-proxy picks at random per connection; grpclb picks the
//! pod with the fewest live connections of the whole Service.
//!
//! The cluster has several nodes, as users' clusters do: the server pods on
//! some, one client pod on each of the others, every node with its own
//! agent, so each node's first connections are placed by what the other
//! nodes' agents report.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::peers::grpc_load_and_hold;
use grpclb_tests::prometheus::{
    targets_of, Dashboard, Prometheus, DASHBOARD, PROMETHEUS_BIN, SCRAPE_INTERVAL,
};
use grpclb_tests::{workspace_root, ChildGuard, LoadReport, Node, Pod, ServiceDef, SimCluster};

use crate::charts::{render_svg, BarChart, BarGroup};
use crate::kube_proxy::{self, ServicePort};
use crate::simulation::{self, check_interrupted, Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 50051;
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const SERVERS: usize = 4;
/// Two of them host the server pods; each of the other six one client pod
/// (the bench compare's multi-node topology).
const NODES: usize = 8;
const CONNECTIONS_PER_CLIENT: u64 = 2;
const RPCS_PER_CONNECTION: u64 = 1000;
/// Client nodes start one after another, as pods of a rollout do, far
/// enough apart for the agents to tell each other (within a second).
const CLIENT_START_INTERVAL: Duration = Duration::from_millis(1500);

/// `prometheus`: also run Prometheus against the grpclb agents and print
/// what the dashboard's queries say of the grpclb run.
pub fn demo(prometheus: bool) -> Result<()> {
    let out_dir = simulation::prepare("cargo xtask demo", "demo")?;

    let topology = Topology::with_nodes(NODES)?;
    let results = run_cluster(topology, &out_dir, prometheus)?;
    let servers = server_names();
    println!("\nRPCs per server pod on {NODES} simulated nodes:");
    print!("{}", render_table(&servers, &results));
    let svg_path = out_dir.join("rpcs-per-pod.svg");
    std::fs::write(
        &svg_path,
        render_svg(&chart(&servers, topology.client_nodes(), &results))?,
    )
    .with_context(|| format!("writing {}", svg_path.display()))?;
    println!("\nplot: {}", svg_path.display());
    Ok(())
}

/// The load results of both balancers, in the order kube-proxy, grpclb.
struct Results {
    kube_proxy: LoadReport,
    grpclb: LoadReport,
}

fn server_names() -> Vec<String> {
    (0..SERVERS)
        .map(|i| format!("server-{}", char::from(b'a' + i as u8)))
        .collect()
}

/// Builds the cluster, runs both loads, and tears everything down (the
/// cluster's guards drop clients and servers, agents, pins, netns, cgroups).
/// With `prometheus`, the agents serve every series the dashboard uses
/// (`--metrics-detail backend`) and the Service has its frames tracked, so
/// calls per pod are counted.
fn run_cluster(topology: Topology, out_dir: &Path, prometheus: bool) -> Result<Results> {
    let clients = topology.client_nodes();
    let agent_args: &[&str] = if prometheus {
        &["--metrics-detail=backend"]
    } else {
        &[]
    };
    let mut cluster = SimCluster::new("demo", NODES, agent_args)?;
    let mut endpoints = Vec::new();
    for (i, name) in server_names().iter().enumerate() {
        let pod = cluster.add_pod(topology.server_node(i), name)?;
        cluster.start_server(pod, "grpc-server", POD_PORT)?;
        endpoints.push(pod);
    }
    let mut def = ServiceDef::grpc("greeter", VIP, SERVICE_PORT, POD_PORT);
    if prometheus {
        def = def.tracking_frames();
    }
    let service = cluster.with_backends(def, &endpoints);
    cluster.write_services(std::slice::from_ref(&service))?;
    let copy = out_dir.join("services.yaml");
    std::fs::copy(cluster.services_file(), &copy)
        .with_context(|| format!("copying the Service file to {}", copy.display()))?;
    println!("demo: a simulated cluster of {NODES} nodes (cgroups), one network namespace per pod");
    println!(
        "demo: {SERVERS} gRPC server pods on {} nodes behind Service default/greeter {VIP}:{SERVICE_PORT} ({})",
        topology.server_nodes,
        copy.display()
    );
    println!(
        "demo: {clients} client pods, one on each of the other nodes, each a tonic client holding {CONNECTIONS_PER_CLIENT} HTTP/2 connections, {RPCS_PER_CONNECTION} RPCs per connection, started {CLIENT_START_INTERVAL:?} apart"
    );

    println!(
        "\n(a) kube-proxy: iptables DNAT with -m statistic --mode random in each client netns"
    );
    let rules = kube_proxy::restore_rules(&[ServicePort::from(&service)], CLUSTER_CIDR)?;
    let mut kube_proxy_clients = Vec::new();
    for i in 0..clients {
        let pod = cluster.add_pod(topology.client_node(i), &format!("kp-client-{i}"))?;
        let pod = cluster.pod(pod).pod.clone();
        kube_proxy::route_service_cidr(&pod)?;
        kube_proxy::install(&pod, &rules, &out_dir.join("kube-proxy-rules.txt"))?;
        kube_proxy_clients.push(pod);
    }
    // No agent runs yet: the iptables rules alone pick the pods.
    let (kube_proxy, held) = run_load(kube_proxy_clients.iter().map(|p| (p, None)))?;
    drop(held);
    println!("    {}", channel_summary(&kube_proxy));

    println!(
        "\n(b) grpclb: one agent per node, attached to its cgroup; clients in their node's cgroup, no iptables rules"
    );
    cluster.start_agents()?;
    let watching = if prometheus {
        Some(start_prometheus(&mut cluster)?)
    } else {
        None
    };
    let mut grpclb_clients = Vec::new();
    for i in 0..clients {
        grpclb_clients.push(cluster.add_pod(topology.client_node(i), &format!("lb-client-{i}"))?);
    }
    let started = Instant::now();
    let (grpclb, _held) = run_load(grpclb_clients.iter().map(|&c| cluster.placement(c)))?;
    println!("    {}", channel_summary(&grpclb));
    if let Some(prometheus) = &watching {
        // While the clients still hold their connections.
        let names = endpoints
            .iter()
            .map(|&p| {
                let pod = &cluster.pod(p).pod;
                (format!("{}:{POD_PORT}", pod.ipv4), pod.name.clone())
            })
            .collect();
        print_prometheus_view(prometheus, &grpclb, started.elapsed(), &names)?;
    }
    Ok(Results { kube_proxy, grpclb })
}

/// Runs one `testpod grpc-load` per client pod (in its node's cgroup when
/// given), one after another [`CLIENT_START_INTERVAL`] apart, and adds up
/// their reports; returns the clients too, holding their connections until
/// dropped. Any failed RPC fails the demo: the comparison only means
/// something when every RPC was answered.
fn run_load<'a>(
    clients: impl Iterator<Item = (&'a Pod, Option<&'a Node>)>,
) -> Result<(LoadReport, Vec<ChildGuard>)> {
    let to = SocketAddr::new(IpAddr::V4(VIP), SERVICE_PORT);
    let mut holding: Vec<ChildGuard> = Vec::new();
    let mut reports = Vec::new();
    for (k, (pod, node)) in clients.enumerate() {
        if k > 0 {
            simulation::sleep(CLIENT_START_INTERVAL)?;
        }
        let (report, held) =
            grpc_load_and_hold(pod, node, to, CONNECTIONS_PER_CLIENT, RPCS_PER_CONNECTION)
                .with_context(|| format!("grpc-load in {}", pod.name))?;
        if report.failures > 0 {
            bail!(
                "{} of the RPCs from {} failed: {:?}",
                report.failures,
                pod.name,
                report.errors
            );
        }
        reports.push(report);
        holding.push(held);
    }
    check_interrupted()?;
    Ok((merge(&reports), holding))
}

/// Prometheus scraping every node's agent.
struct Watching {
    prometheus: Prometheus,
    dashboard: Dashboard,
}

fn start_prometheus(cluster: &mut SimCluster) -> Result<Watching> {
    let dashboard = Dashboard::load(&workspace_root().join(DASHBOARD))?;
    let targets = targets_of(cluster)?;
    let prometheus = Prometheus::start(&targets)?;
    println!(
        "    Prometheus ({PROMETHEUS_BIN}) scrapes the {} agents every {SCRAPE_INTERVAL:?}",
        targets.len()
    );
    Ok(Watching {
        prometheus,
        dashboard,
    })
}

/// What the dashboard's queries (docs/prometheus.md) say of the grpclb
/// run, once Prometheus has scraped every call of `report`; rates are
/// averaged over the run (`elapsed`). `names`: pod
/// names by the `ip:port` the agents label pods with.
fn print_prometheus_view(
    watching: &Watching,
    report: &LoadReport,
    elapsed: Duration,
    names: &BTreeMap<String, String>,
) -> Result<()> {
    let Watching {
        prometheus,
        dashboard,
    } = watching;
    let window = format!("{}s", elapsed.as_secs() + 2 * SCRAPE_INTERVAL.as_secs());
    // Not a dashboard query: it only tells when Prometheus has scraped
    // after the last call.
    prometheus.await_query(
        &format!("Prometheus to see the {} calls", report.ok),
        "sum(grpclb_local_responses_total)",
        Duration::from_secs(15),
        |samples| {
            samples
                .first()
                .filter(|s| s.value >= report.ok as f64)
                .map(|_| ())
        },
    )?;
    // The connections open now: a connection the hotspot policy moved
    // while its client was done calling is closed, not reopened.
    let pods = prometheus.query(&dashboard.query("Connections per pod, all nodes", &window)?)?;
    let name = |backend: &str| names.get(backend).cloned().unwrap_or(backend.to_string());
    // rate() starts from each pod's first scrape: calls answered before
    // it (the first second of a pod's connections) are not in the rates.
    println!("    as Prometheus sees it (the dashboard's queries; rates over the last {window}, from each pod's first scrape):");
    for s in &pods {
        println!(
            "      {:<10} {:>3} connections open  {}",
            name(s.label("backend")),
            s.value,
            s.label("backend")
        );
    }
    let calls = prometheus.query(&dashboard.query("Calls per second per pod", &window)?)?;
    for s in &calls {
        println!(
            "      {:<10} {:>7.1} calls/s over the run",
            name(s.label("backend")),
            s.value
        );
    }
    for (title, what) in [
        ("Connections per pod: max/mean per Service", "connections"),
        ("Calls per pod: max/mean per Service", "calls"),
    ] {
        for s in prometheus.query(&dashboard.query(title, &window)?)? {
            println!(
                "      {}: max/mean of {what} per pod {:.2}",
                s.label("frontend"),
                s.value
            );
        }
    }
    let goaways = prometheus
        .query(&dashboard.query("GOAWAYs since the agents started, by reason", &window)?)?;
    let goaways: Vec<String> = goaways
        .iter()
        .map(|s| format!("{} {}", s.label("reason"), s.value))
        .collect();
    println!("      GOAWAYs by reason: {}", goaways.join(", "));
    Ok(())
}

/// The reports of several clients as one.
fn merge(reports: &[LoadReport]) -> LoadReport {
    let mut total = LoadReport::default();
    for report in reports {
        for (pod, n) in &report.per_pod {
            *total.per_pod.entry(pod.clone()).or_insert(0) += n;
        }
        for (pod, n) in &report.channels_per_pod {
            *total.channels_per_pod.entry(pod.clone()).or_insert(0) += n;
        }
        total.mixed_channels += report.mixed_channels;
        total.ok += report.ok;
        total.failures += report.failures;
        total.errors.extend(report.errors.iter().cloned());
    }
    total
}

/// `counts` in the order of `pods`; a pod that got nothing counts 0.
fn counts_for(pods: &[String], counts: &BTreeMap<String, u64>) -> Vec<u64> {
    pods.iter()
        .map(|p| counts.get(p).copied().unwrap_or(0))
        .collect()
}

/// How uneven a spread is: the busiest pod against the average.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    max: u64,
    mean: f64,
}

impl Spread {
    fn of(counts: &[u64]) -> Spread {
        let max = counts.iter().copied().max().unwrap_or(0);
        let mean = if counts.is_empty() {
            0.0
        } else {
            counts.iter().sum::<u64>() as f64 / counts.len() as f64
        };
        Spread { max, mean }
    }

    /// 1.0 is perfectly even; 0 when nothing was counted.
    fn max_over_mean(&self) -> f64 {
        if self.mean == 0.0 {
            0.0
        } else {
            self.max as f64 / self.mean
        }
    }
}

fn channel_summary(report: &LoadReport) -> String {
    let channels: Vec<String> = report
        .channels_per_pod
        .iter()
        .map(|(pod, n)| format!("{pod}: {n}"))
        .collect();
    format!(
        "{} RPCs ok; connections per pod: {}",
        report.ok,
        channels.join(", ")
    )
}

/// Per-pod connections and RPCs of both balancers side by side, then
/// max/mean of the RPC counts.
fn render_table(pods: &[String], results: &Results) -> String {
    let kp_rpcs = counts_for(pods, &results.kube_proxy.per_pod);
    let lb_rpcs = counts_for(pods, &results.grpclb.per_pod);
    let kp_conns = counts_for(pods, &results.kube_proxy.channels_per_pod);
    let lb_conns = counts_for(pods, &results.grpclb.channels_per_pod);
    let mut out = String::new();
    out.push_str(&format!(
        "{:<10}  {:>22}  {:>22}\n",
        "pod", "kube-proxy (iptables)", "grpclb"
    ));
    out.push_str(&format!(
        "{:<10}  {:>11} {:>10}  {:>11} {:>10}\n",
        "", "connections", "RPCs", "connections", "RPCs"
    ));
    for (i, pod) in pods.iter().enumerate() {
        out.push_str(&format!(
            "{:<10}  {:>11} {:>10}  {:>11} {:>10}\n",
            pod, kp_conns[i], kp_rpcs[i], lb_conns[i], lb_rpcs[i]
        ));
    }
    let kp = Spread::of(&kp_rpcs);
    let lb = Spread::of(&lb_rpcs);
    out.push_str(&format!(
        "{:<10}  {:>22}  {:>22}\n",
        "max RPCs", kp.max, lb.max
    ));
    out.push_str(&format!(
        "{:<10}  {:>22.1}  {:>22.1}\n",
        "mean RPCs", kp.mean, lb.mean
    ));
    out.push_str(&format!(
        "{:<10}  {:>22.2}  {:>22.2}\n",
        "max/mean",
        kp.max_over_mean(),
        lb.max_over_mean()
    ));
    out
}

fn chart(pods: &[String], clients: usize, results: &Results) -> BarChart {
    let kp_rpcs = counts_for(pods, &results.kube_proxy.per_pod);
    let lb_rpcs = counts_for(pods, &results.grpclb.per_pod);
    let kp = Spread::of(&kp_rpcs);
    let lb = Spread::of(&lb_rpcs);
    BarChart {
        title: format!(
            "gRPC RPCs per server pod: {clients} clients × {CONNECTIONS_PER_CLIENT} connections on {NODES} nodes"
        ),
        y_label: "RPCs answered".into(),
        series: vec![
            format!("kube-proxy iptables (max/mean {:.2})", kp.max_over_mean()),
            format!("grpclb (max/mean {:.2})", lb.max_over_mean()),
        ],
        groups: pods
            .iter()
            .enumerate()
            .map(|(i, pod)| BarGroup {
                label: pod.clone(),
                values: vec![kp_rpcs[i] as f64, lb_rpcs[i] as f64],
            })
            .collect(),
        reference: Some(("even share".into(), kp.mean.max(lb.mean))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(per_pod: &[(&str, u64)], channels: &[(&str, u64)]) -> LoadReport {
        LoadReport {
            per_pod: per_pod.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            channels_per_pod: channels.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            ok: per_pod.iter().map(|(_, n)| n).sum(),
            ..LoadReport::default()
        }
    }

    /// Three pods, whatever the demo's own count.
    fn pods() -> Vec<String> {
        ["server-a", "server-b", "server-c"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn spread_of_even_and_uneven_counts() {
        let even = Spread::of(&[5, 5, 5]);
        assert_eq!(even.max, 5);
        assert_eq!(even.max_over_mean(), 1.0);
        let uneven = Spread::of(&[9, 6, 0]);
        assert_eq!(uneven.mean, 5.0);
        assert!((uneven.max_over_mean() - 1.8).abs() < 1e-9);
        assert_eq!(Spread::of(&[]).max_over_mean(), 0.0);
        assert_eq!(Spread::of(&[0, 0]).max_over_mean(), 0.0);
    }

    #[test]
    fn merged_reports_add_up_per_pod() {
        let merged = merge(&[
            report(
                &[("server-a", 10), ("server-b", 5)],
                &[("server-a", 2), ("server-b", 1)],
            ),
            report(&[("server-a", 5)], &[("server-a", 1)]),
        ]);
        assert_eq!(merged.per_pod["server-a"], 15);
        assert_eq!(merged.per_pod["server-b"], 5);
        assert_eq!(merged.channels_per_pod["server-a"], 3);
        assert_eq!(merged.ok, 20);
    }

    #[test]
    fn a_pod_that_got_nothing_counts_zero() {
        let counts = BTreeMap::from([("server-b".to_string(), 7)]);
        assert_eq!(counts_for(&pods(), &counts), vec![0, 7, 0]);
    }

    #[test]
    fn table_shows_both_balancers_and_their_max_over_mean() {
        let results = Results {
            kube_proxy: report(
                &[("server-a", 9000), ("server-b", 6000)],
                &[("server-a", 9), ("server-b", 6)],
            ),
            grpclb: report(
                &[("server-a", 5000), ("server-b", 5000), ("server-c", 5000)],
                &[("server-a", 5), ("server-b", 5), ("server-c", 5)],
            ),
        };
        let table = render_table(&pods(), &results);
        let line = |prefix: &str| {
            let row = table.lines().find(|l| l.starts_with(prefix)).unwrap();
            row[prefix.len()..].split_whitespace().collect::<Vec<_>>()
        };
        assert_eq!(line("server-a"), ["9", "9000", "5", "5000"]);
        assert_eq!(line("server-c"), ["0", "0", "5", "5000"]);
        assert_eq!(line("max/mean"), ["1.80", "1.00"]);
        assert_eq!(line("max RPCs"), ["9000", "5000"]);
    }

    #[test]
    fn chart_has_one_group_per_pod_and_names_the_spread() {
        let results = Results {
            kube_proxy: report(&[("server-a", 30)], &[("server-a", 3)]),
            grpclb: report(&[("server-a", 10), ("server-b", 10), ("server-c", 10)], &[]),
        };
        let chart = chart(&pods(), 6, &results);
        assert_eq!(chart.groups.len(), 3);
        assert!(chart.title.contains("6 clients"), "{}", chart.title);
        assert_eq!(chart.groups[0].values, vec![30.0, 10.0]);
        assert_eq!(chart.groups[2].values, vec![0.0, 10.0]);
        assert!(chart.series[0].contains("max/mean 3.00"));
        assert!(chart.series[1].contains("max/mean 1.00"));
        assert_eq!(chart.reference, Some(("even share".into(), 10.0)));
    }

    #[test]
    fn kube_proxy_rules_for_the_demo_service_dnat_to_every_server() {
        let service = ServiceDef::grpc("greeter", VIP, SERVICE_PORT, POD_PORT).backends([
            Ipv4Addr::new(10, 244, 1, 1),
            Ipv4Addr::new(10, 244, 1, 2),
            Ipv4Addr::new(10, 244, 1, 3),
        ]);
        let port = ServicePort::from(&service);
        assert_eq!(port.port_name_string(), "default/greeter:grpc");
        let rules = kube_proxy::restore_rules(&[port], CLUSTER_CIDR).unwrap();
        for i in 1..=3 {
            assert!(rules.contains(&format!("--to-destination 10.244.1.{i}:{POD_PORT}")));
        }
        assert!(rules.contains(&format!("-d {VIP} --dport {SERVICE_PORT}")));
    }
}
