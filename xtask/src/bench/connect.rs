//! `cargo xtask bench connect`: what a connect() costs with no Service
//! translation, with grpclb's cgroup hook, and with kube-proxy's iptables
//! rules, as the number of Services grows.
//!
//! One client pod measures many connect()+close in one process (the hidden
//! `bench connect-probe`, this same binary started inside the pod's netns and,
//! for the hook cases, the node's cgroup). The server pod accepts and closes.
//! Only the target Service has a real backend; the other Services point at
//! addresses nobody uses, as unrelated Services on a node do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::netns::ip;
use grpclb_tests::{
    service_yaml, spawn, write_atomically, Agent, BpffsDir, Fabric, Node, Pod, ServiceDef,
};
use nix::sys::socket::{
    connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
};
use serde::{Deserialize, Serialize};

use crate::kube_proxy::{self, ServicePort};
use crate::simulation::{self, wait_for_exit};

pub const DEFAULT_SAMPLES: usize = 20_000;
/// Connects before recording (page faults, neighbour and route caches).
const WARMUP: usize = 2_000;
const SERVICE_COUNTS: [usize; 3] = [1, 1_000, 10_000];
const ENDPOINTS_PER_SERVICE: usize = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 50051;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const SERVICE_CIDR: &str = "10.96.0.0/12";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const PROBE_TIMEOUT: Duration = Duration::from_secs(180);
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Balancer {
    NoHook,
    Grpclb,
    KubeProxyIptables,
}

impl Balancer {
    fn label(self) -> &'static str {
        match self {
            Balancer::NoHook => "no hook",
            Balancer::Grpclb => "grpclb",
            Balancer::KubeProxyIptables => "kube-proxy iptables",
        }
    }
}

/// Where the client connects: the Service VIP, or straight to the pod (the
/// cost every other connection on the node pays).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Destination {
    Service,
    Pod,
}

impl Destination {
    fn label(self) -> &'static str {
        match self {
            Destination::Service => "Service VIP",
            Destination::Pod => "pod IP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
struct Summary {
    samples: usize,
    min_ns: u64,
    median_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    max_ns: u64,
    mean_ns: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Case {
    balancer: Balancer,
    services: usize,
    destination: Destination,
    #[serde(flatten)]
    summary: Summary,
}

/// A case with its ratios to the no-hook baseline, as written to JSON.
#[derive(Debug, Serialize)]
struct CaseReport<'a> {
    #[serde(flatten)]
    case: &'a Case,
    median_vs_no_hook: f64,
    p99_vs_no_hook: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    kernel: String,
    cpus: usize,
    warmup: usize,
    cases: Vec<CaseReport<'a>>,
}

/// What `connect-probe` writes.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeOutput {
    samples_ns: Vec<u64>,
}

/// Nearest-rank percentiles of `samples_ns`; `None` for no samples.
fn summarize(samples_ns: &[u64]) -> Option<Summary> {
    if samples_ns.is_empty() {
        return None;
    }
    let mut sorted = samples_ns.to_vec();
    sorted.sort_unstable();
    let rank = |q: f64| {
        let index = (q * sorted.len() as f64).ceil() as usize;
        sorted[index.clamp(1, sorted.len()) - 1]
    };
    Some(Summary {
        samples: sorted.len(),
        min_ns: sorted[0],
        median_ns: rank(0.5),
        p90_ns: rank(0.9),
        p99_ns: rank(0.99),
        max_ns: sorted[sorted.len() - 1],
        mean_ns: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64,
    })
}

fn ratio(value: u64, baseline: u64) -> f64 {
    if baseline == 0 {
        0.0
    } else {
        value as f64 / baseline as f64
    }
}

/// `count` Services, the target (`default/greeter`, [`VIP`] → [`SERVER`]) in
/// the middle: kube-proxy walks `KUBE-SERVICES` in order and writes Services
/// in no particular order, so the middle is the average position.
fn bench_services(count: usize) -> Vec<ServiceDef> {
    let target_index = count / 2;
    (0..count)
        .map(|i| {
            if i == target_index {
                return ServiceDef::grpc("greeter", VIP, SERVICE_PORT, POD_PORT).backend(SERVER);
            }
            let [_, _, hi, lo] = (i as u32).to_be_bytes();
            let backends = (0..ENDPOINTS_PER_SERVICE).map(|j| {
                let [_, _, hi, lo] = ((i * ENDPOINTS_PER_SERVICE + j) as u32).to_be_bytes();
                Ipv4Addr::new(10, 245, hi, lo)
            });
            ServiceDef::grpc(
                &format!("svc-{i:05}"),
                Ipv4Addr::new(10, 97, hi, lo),
                SERVICE_PORT,
                POD_PORT,
            )
            .backends(backends)
        })
        .collect()
}

/// The number of frontends in `grpclb-agent status --output json`
/// (docs/status.md): each Service lists its own.
fn frontends_in(status: &serde_json::Value) -> Result<usize> {
    let services = status["services"]
        .as_array()
        .context("no services in the status JSON")?;
    services
        .iter()
        .map(|s| {
            s["frontends"]
                .as_array()
                .map(Vec::len)
                .with_context(|| format!("a Service without frontends in the status JSON: {s}"))
        })
        .sum()
}

fn render_table(cases: &[Case]) -> String {
    let baseline = cases
        .iter()
        .find(|c| c.balancer == Balancer::NoHook)
        .map(|c| c.summary);
    let mut out = format!(
        "{:<20} {:>8} {:<12} {:>10} {:>10} {:>10} {:>10}\n",
        "balancer", "services", "destination", "median µs", "p99 µs", "median ×", "p99 ×"
    );
    for case in cases {
        let (median_x, p99_x) = baseline.map_or((0.0, 0.0), |b| {
            (
                ratio(case.summary.median_ns, b.median_ns),
                ratio(case.summary.p99_ns, b.p99_ns),
            )
        });
        out.push_str(&format!(
            "{:<20} {:>8} {:<12} {:>10.1} {:>10.1} {:>10.2} {:>10.2}\n",
            case.balancer.label(),
            case.services,
            case.destination.label(),
            case.summary.median_ns as f64 / 1000.0,
            case.summary.p99_ns as f64 / 1000.0,
            median_x,
            p99_x
        ));
    }
    out.push_str("(× = ratio to the no-hook case)\n");
    out
}

fn report_json(cases: &[Case], kernel: String, cpus: usize) -> Result<String> {
    let baseline = cases
        .iter()
        .find(|c| c.balancer == Balancer::NoHook)
        .map(|c| c.summary)
        .context("no no-hook baseline among the cases")?;
    let report = Report {
        benchmark: "connect()+close latency",
        kernel,
        cpus,
        warmup: WARMUP,
        cases: cases
            .iter()
            .map(|case| CaseReport {
                case,
                median_vs_no_hook: ratio(case.summary.median_ns, baseline.median_ns),
                p99_vs_no_hook: ratio(case.summary.p99_ns, baseline.p99_ns),
            })
            .collect(),
    };
    Ok(serde_json::to_string_pretty(&report)? + "\n")
}

pub fn run(samples: usize) -> Result<()> {
    if samples == 0 {
        bail!("--samples must be at least 1");
    }
    let out_dir = simulation::prepare("cargo xtask bench connect", "bench")?;

    let cases = measure_all(samples, &out_dir)?;
    println!();
    print!("{}", render_table(&cases));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let json_path = out_dir.join("connect.json");
    std::fs::write(
        &json_path,
        report_json(&cases, simulation::kernel_release(), cpus)?,
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    println!("written: {}", json_path.display());
    Ok(())
}

/// One cluster for all cases; the guards tear it down in reverse order.
fn measure_all(samples: usize, out_dir: &Path) -> Result<Vec<Case>> {
    let node = Node::new("bench")?;
    let fabric = Fabric::new("bench")?;
    let server_pod = fabric.add_pod("server", SERVER, None)?;
    let server_addr = SocketAddr::from((SERVER, POD_PORT));
    let vip = SocketAddr::from((VIP, SERVICE_PORT));
    let mut server = spawn(
        &server_pod,
        None,
        self_command(&[
            "bench",
            "accept-server",
            "--listen",
            &server_addr.to_string(),
        ])?,
    )?;
    server.expect_line("ready", Duration::from_secs(10))?;
    let hook_client = fabric.add_pod("hook-client", Ipv4Addr::new(10, 244, 2, 1), None)?;
    let iptables_client = fabric.add_pod("ipt-client", Ipv4Addr::new(10, 244, 2, 2), None)?;
    // Locally generated packets are routed before nat OUTPUT: without a
    // route to the Service CIDR, connect() fails before kube-proxy's DNAT.
    ip(&[
        "-n",
        &iptables_client.netns,
        "route",
        "add",
        SERVICE_CIDR,
        "dev",
        "eth0",
    ])?;

    let probe_file = out_dir.join("probe.json");
    let mut cases = Vec::new();
    let mut measure = |balancer, services, destination, pod: &Pod, node: Option<&Node>| {
        let to = match destination {
            Destination::Service => vip,
            Destination::Pod => server_addr,
        };
        let samples_ns = run_probe(pod, node, to, samples, &probe_file)?;
        let summary = summarize(&samples_ns).context("the probe recorded no samples")?;
        let case = Case {
            balancer,
            services,
            destination,
            summary,
        };
        println!(
            "  {:<20} {:>6} Services, to {:<11}: median {:>7.1} µs, p99 {:>7.1} µs",
            balancer.label(),
            services,
            destination.label(),
            summary.median_ns as f64 / 1000.0,
            summary.p99_ns as f64 / 1000.0
        );
        cases.push(case);
        anyhow::Ok(())
    };

    println!("bench: {samples} connect()+close per case after {WARMUP} warm-up connects");
    measure(
        Balancer::NoHook,
        0,
        Destination::Pod,
        &hook_client,
        Some(&node),
    )?;

    let rules_file = out_dir.join("kube-proxy-rules.txt");
    for count in SERVICE_COUNTS {
        let ports: Vec<ServicePort> = bench_services(count)
            .iter()
            .map(ServicePort::from)
            .collect();
        let started = Instant::now();
        kube_proxy::install(
            &iptables_client,
            &kube_proxy::restore_rules(&ports, CLUSTER_CIDR)?,
            &rules_file,
        )?;
        println!(
            "  (iptables-restore of {count} Services: {:.1} s)",
            started.elapsed().as_secs_f64()
        );
        measure(
            Balancer::KubeProxyIptables,
            count,
            Destination::Service,
            &iptables_client,
            None,
        )?;
    }
    let most = SERVICE_COUNTS[SERVICE_COUNTS.len() - 1];
    measure(
        Balancer::KubeProxyIptables,
        most,
        Destination::Pod,
        &iptables_client,
        None,
    )?;

    let services_yaml = out_dir.join("services.yaml");
    write_atomically(&services_yaml, &service_yaml(&bench_services(1)))?;
    let bpffs = BpffsDir::new()?;
    let agent = Agent::start(&node, bpffs.path(), &services_yaml)?;
    for count in SERVICE_COUNTS {
        let started = Instant::now();
        write_atomically(&services_yaml, &service_yaml(&bench_services(count)))?;
        wait_for_frontends(&agent, count)?;
        println!(
            "  (agent loaded {count} Services in {:.1} s)",
            started.elapsed().as_secs_f64()
        );
        measure(
            Balancer::Grpclb,
            count,
            Destination::Service,
            &hook_client,
            Some(&node),
        )?;
    }
    measure(
        Balancer::Grpclb,
        most,
        Destination::Pod,
        &hook_client,
        Some(&node),
    )?;
    drop(agent);
    Ok(cases)
}

/// This xtask binary with `args`, to run a hidden subcommand inside a pod.
fn self_command(args: &[&str]) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the xtask executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    Ok(cmd)
}

fn run_probe(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    samples: usize,
    out_file: &Path,
) -> Result<Vec<u64>> {
    // What an interrupted earlier run left must not pass for this run's.
    let _ = std::fs::remove_file(out_file);
    let cmd = self_command(&[
        "bench",
        "connect-probe",
        "--to",
        &to.to_string(),
        "--samples",
        &samples.to_string(),
        "--warmup",
        &WARMUP.to_string(),
        "--out",
        &out_file.to_string_lossy(),
    ])?;
    let child = spawn(pod, node, cmd)?;
    let output = wait_for_exit(child, &format!("the probe in {}", pod.name), PROBE_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "the probe in {} failed ({}): {}",
            pod.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(out_file)
        .with_context(|| format!("reading {}", out_file.display()))?;
    let parsed: ProbeOutput =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", out_file.display()))?;
    std::fs::remove_file(out_file).with_context(|| format!("removing {}", out_file.display()))?;
    Ok(parsed.samples_ns)
}

/// Waits until the agent's maps hold `count` frontends.
fn wait_for_frontends(agent: &Agent, count: usize) -> Result<()> {
    let deadline = Instant::now() + AGENT_SYNC_TIMEOUT;
    loop {
        let loaded = frontends_in(&agent.status_json()?)?;
        if loaded == count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent holds {loaded} frontends, not {count}, after {AGENT_SYNC_TIMEOUT:?}; its log:\n{}",
                agent.log()
            );
        }
        simulation::sleep(Duration::from_millis(500))?;
    }
}

/// The hidden `connect-probe`: `warmup + samples` connect()+close to `to`,
/// one after another; the durations of the last `samples` go to `out` as
/// JSON. Any failed connect fails the run.
pub fn probe(to: SocketAddr, samples: usize, warmup: usize, out: &Path) -> Result<()> {
    let mut samples_ns = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let started = Instant::now();
        connect_and_close(to).with_context(|| format!("connect #{i} to {to}"))?;
        let elapsed = started.elapsed().as_nanos() as u64;
        if i >= warmup {
            samples_ns.push(elapsed);
        }
    }
    let json = serde_json::to_string(&ProbeOutput { samples_ns })?;
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))
}

/// socket(), connect(), close(): what a client pays per new connection.
fn connect_and_close(to: SocketAddr) -> Result<()> {
    let family = match to.ip() {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let socket =
        socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket()")?;
    // Close with RST instead of FIN: no TIME_WAIT, so tens of thousands of
    // connects in a row do not run out of ephemeral ports.
    setsockopt(
        &socket,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .context("setsockopt(SO_LINGER)")?;
    connect(socket.as_raw_fd(), &SockaddrStorage::from(to)).context("connect()")?;
    drop(socket);
    Ok(())
}

/// The hidden `accept-server`: accepts connections and closes them at once.
pub fn accept_server(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    println!("ready");
    for stream in listener.incoming() {
        drop(stream);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(balancer: Balancer, services: usize, median_ns: u64, p99_ns: u64) -> Case {
        Case {
            balancer,
            services,
            destination: Destination::Service,
            summary: Summary {
                samples: 100,
                min_ns: 1,
                median_ns,
                p90_ns: median_ns,
                p99_ns,
                max_ns: p99_ns,
                mean_ns: median_ns as f64,
            },
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=100).rev().collect();
        let s = summarize(&samples).unwrap();
        assert_eq!(s.samples, 100);
        assert_eq!(s.min_ns, 1);
        assert_eq!(s.median_ns, 50);
        assert_eq!(s.p90_ns, 90);
        assert_eq!(s.p99_ns, 99);
        assert_eq!(s.max_ns, 100);
        assert_eq!(s.mean_ns, 50.5);
        let one = summarize(&[7]).unwrap();
        assert_eq!((one.median_ns, one.p99_ns), (7, 7));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn bench_services_are_distinct_with_one_target_in_the_middle() {
        let services = bench_services(1_000);
        assert_eq!(services.len(), 1_000);
        let targets: Vec<usize> = services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.cluster_ip == IpAddr::V4(VIP))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(targets, vec![500]);
        assert_eq!(services[500].endpoints.len(), 1);
        assert_eq!(services[500].endpoints[0].addr, IpAddr::V4(SERVER));
        let mut vips: Vec<IpAddr> = services.iter().map(|s| s.cluster_ip).collect();
        vips.sort();
        vips.dedup();
        assert_eq!(vips.len(), 1_000);
        let mut backends: Vec<IpAddr> = services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| e.addr))
            .collect();
        backends.sort();
        backends.dedup();
        assert_eq!(backends.len(), 999 * ENDPOINTS_PER_SERVICE + 1);
        assert_eq!(bench_services(1)[0].name, "greeter");
    }

    #[test]
    fn the_largest_bench_fits_the_address_plan() {
        let services = bench_services(10_000);
        let last = services.last().unwrap();
        assert_eq!(last.cluster_ip, IpAddr::V4(Ipv4Addr::new(10, 97, 39, 15)));
        assert!(services
            .iter()
            .all(|s| s.cluster_ip != IpAddr::V4(VIP) || s.name == "greeter"));
    }

    #[test]
    fn frontends_are_counted_over_services() {
        let status = serde_json::json!({
            "schema_version": 1,
            "services": [
                {"service": "default/greeter", "frontends": ["10.96.0.10:80", "[fd00::10]:80"]},
                {"service": "default/svc-00000", "frontends": ["10.97.0.0:80"]},
            ],
        });
        assert_eq!(frontends_in(&status).unwrap(), 3);
        assert_eq!(
            frontends_in(&serde_json::json!({"services": []})).unwrap(),
            0
        );
        assert!(frontends_in(&serde_json::json!({"services": [{}]})).is_err());
    }

    #[test]
    fn table_shows_ratios_to_the_no_hook_case() {
        let cases = vec![
            case(Balancer::NoHook, 0, 20_000, 40_000),
            case(Balancer::KubeProxyIptables, 10_000, 60_000, 120_000),
            case(Balancer::Grpclb, 10_000, 21_000, 42_000),
        ];
        let table = render_table(&cases);
        let row = |prefix: &str| -> Vec<String> {
            table
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            row("kube-proxy"),
            [
                "kube-proxy",
                "iptables",
                "10000",
                "Service",
                "VIP",
                "60.0",
                "120.0",
                "3.00",
                "3.00"
            ]
        );
        assert_eq!(
            row("grpclb"),
            ["grpclb", "10000", "Service", "VIP", "21.0", "42.0", "1.05", "1.05"]
        );
    }

    #[test]
    fn json_report_carries_every_case_and_its_ratios() {
        let cases = vec![
            case(Balancer::NoHook, 0, 20_000, 40_000),
            case(Balancer::Grpclb, 1_000, 30_000, 80_000),
        ];
        let json: serde_json::Value =
            serde_json::from_str(&report_json(&cases, "6.18".into(), 2).unwrap()).unwrap();
        assert_eq!(json["kernel"], "6.18");
        let reported = json["cases"].as_array().unwrap();
        assert_eq!(reported.len(), 2);
        assert_eq!(reported[1]["balancer"], "grpclb");
        assert_eq!(reported[1]["destination"], "service");
        assert_eq!(reported[1]["services"], 1000);
        assert_eq!(reported[1]["median_ns"], 30_000);
        assert_eq!(reported[1]["median_vs_no_hook"], 1.5);
        assert_eq!(reported[1]["p99_vs_no_hook"], 2.0);
        assert_eq!(reported[0]["balancer"], "no-hook");
    }

    #[test]
    fn json_report_needs_a_baseline() {
        let cases = vec![case(Balancer::Grpclb, 1, 1, 1)];
        assert!(report_json(&cases, "6.18".into(), 2).is_err());
    }
}
