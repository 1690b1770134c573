//! `cargo xtask bench rebalance`: a Service scales from 2 to 4 pods while
//! clients keep calling over long-lived connections; per-pod calls per
//! second every 500 ms, with kube-proxy's iptables rules and with grpclb.
//!
//! kube-proxy balances connections once, at connect, so the new pods get
//! nothing until clients reconnect; grpclb sends GOAWAYs to move some
//! connections of the old pods (a Service annotated
//! `grpclb.io/track-frames: "true"`), which reconnect to the new ones.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::peers::{start_load_until, GrpcClient, LoadShape};
use grpclb_tests::{
    spawn, testpod_bin, Agent, BpffsDir, Fabric, LoadReport, Node, Pod, ServiceDef,
};
use serde::Serialize;

use crate::kube_proxy::{self, ServicePort};
use crate::simulation;

const PODS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 244, 1, 1),
    Ipv4Addr::new(10, 244, 1, 2),
    Ipv4Addr::new(10, 244, 1, 3),
    Ipv4Addr::new(10, 244, 1, 4),
];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 50051;
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const BUCKET_MS: u64 = 500;
/// Calls before the scale-up.
const BEFORE: Duration = Duration::from_secs(4);
/// Balanced enough: max/mean of the per-pod calls per second.
const BALANCED: f64 = 1.2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum System {
    KubeProxy,
    Grpclb,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::KubeProxy => "kube-proxy (iptables)",
            System::Grpclb => "grpclb",
        }
    }
}

#[derive(Debug, Serialize)]
struct Run {
    system: System,
    /// Calls per second per pod, one entry per 500 ms from the scale-up on.
    rps: Vec<BTreeMap<String, f64>>,
    max_over_mean: Vec<f64>,
    /// Seconds from the scale-up until max/mean stays at or under 1.2.
    seconds_to_balanced: Option<f64>,
    failed_calls: u64,
}

#[derive(Serialize)]
struct ReportJson<'a> {
    kernel: String,
    cpus: usize,
    connections: u64,
    bucket_ms: u64,
    runs: &'a [Run],
}

pub fn run(seconds_after: u64, connections: u64) -> Result<()> {
    if seconds_after == 0 || connections == 0 {
        bail!("--seconds and --connections must be at least 1");
    }
    let out_dir = simulation::prepare("cargo xtask bench rebalance", "bench")?;
    let after = Duration::from_secs(seconds_after);
    let node = Node::new("rebalance")?;
    let fabric = Fabric::new("rebalance")?;
    let mut servers = Vec::new();
    for (i, ip) in PODS.iter().enumerate() {
        let pod = fabric.add_pod(&format!("p{i}"), *ip, None)?;
        let mut cmd = std::process::Command::new(testpod_bin());
        cmd.args(["grpc-server", "--name", &pod.name])
            .args(["--listen", &SocketAddr::from((*ip, POD_PORT)).to_string()]);
        let mut server = spawn(&pod, Some(&node), cmd)?;
        server.expect_line("ready", Duration::from_secs(10))?;
        servers.push((server, pod));
    }
    let mut runs = Vec::new();
    for system in [System::KubeProxy, System::Grpclb] {
        let client = fabric.add_pod(
            &format!("client-{}", runs.len()),
            Ipv4Addr::new(10, 244, 2, 1 + runs.len() as u8),
            None,
        )?;
        println!(
            "{}: 2 pods, {connections} connections calling; 4 pods after {BEFORE:?}",
            system.label()
        );
        let (report, scaled_bucket) =
            measure(system, &node, &client, &out_dir, connections, after)?;
        runs.push(summarize(system, &report, scaled_bucket));
    }
    drop(servers);
    println!();
    print!("{}", render(&runs));
    let json = ReportJson {
        kernel: simulation::kernel_release(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        connections,
        bucket_ms: BUCKET_MS,
        runs: &runs,
    };
    let path = out_dir.join("rebalance.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written: {}", path.display());
    Ok(())
}

fn service(node: &Node, pods: usize) -> ServiceDef {
    PODS[..pods]
        .iter()
        .fold(
            ServiceDef::grpc("scaling", VIP, SERVICE_PORT, POD_PORT),
            |s, ip| s.backend_on(*ip, node.name()),
        )
        .tracking_frames()
}

/// One scale-up under load; returns the client's report and the timeline
/// bucket in which the scale-up happened.
fn measure(
    system: System,
    node: &Node,
    client: &Pod,
    out_dir: &Path,
    connections: u64,
    after: Duration,
) -> Result<(LoadReport, usize)> {
    let file = out_dir.join("rebalance-services.yaml");
    let rules =
        |pods| kube_proxy::restore_rules(&[ServicePort::from(&service(node, pods))], CLUSTER_CIDR);
    let rules_file = out_dir.join("rebalance-kube-proxy-rules.txt");
    let bpffs = BpffsDir::new()?;
    let _agent = match system {
        System::KubeProxy => {
            kube_proxy::route_service_cidr(client)?;
            kube_proxy::install(client, &rules(2)?, &rules_file)?;
            None
        }
        System::Grpclb => {
            grpclb_tests::write_atomically(
                &file,
                &grpclb_tests::service_yaml(&[service(node, 2)]),
            )?;
            Some(Agent::start(node, bpffs.path(), &file)?)
        }
    };
    let stop = out_dir.join(format!("rebalance-{system:?}.stop"));
    let _ = std::fs::remove_file(&stop);
    let started = Instant::now();
    let load = start_load_until(
        GrpcClient::Tonic,
        client,
        Some(node),
        SocketAddr::from((VIP, SERVICE_PORT)),
        &LoadShape {
            connections,
            timeline_ms: BUCKET_MS,
            streams: None,
        },
        &stop,
    )?;
    simulation::sleep(BEFORE)?;
    let scaled_bucket = (started.elapsed().as_millis() as u64 / BUCKET_MS) as usize;
    match system {
        System::KubeProxy => kube_proxy::install(client, &rules(4)?, &rules_file)?,
        System::Grpclb => {
            grpclb_tests::write_atomically(&file, &grpclb_tests::service_yaml(&[service(node, 4)]))?
        }
    }
    simulation::sleep(after)?;
    let report = load.finish()?;
    if report.ok == 0 {
        bail!("{}: no call succeeded: {:?}", system.label(), report.errors);
    }
    Ok((report, scaled_bucket))
}

fn summarize(system: System, report: &LoadReport, scaled_bucket: usize) -> Run {
    let pods: Vec<String> = (0..PODS.len()).map(|i| format!("p{i}")).collect();
    // The last bucket is cut short by the stop.
    let full = report.timeline.len().saturating_sub(1);
    let per_second = 1000.0 / BUCKET_MS as f64;
    let rps: Vec<BTreeMap<String, f64>> = report.timeline[scaled_bucket.min(full)..full]
        .iter()
        .map(|bucket| {
            pods.iter()
                .map(|p| {
                    (
                        p.clone(),
                        bucket.get(p).copied().unwrap_or(0) as f64 * per_second,
                    )
                })
                .collect()
        })
        .collect();
    let max_over_mean: Vec<f64> = rps
        .iter()
        .map(|step| {
            let values: Vec<f64> = step.values().copied().collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let max = values.iter().copied().fold(0.0, f64::max);
            if mean > 0.0 {
                max / mean
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let seconds_to_balanced = seconds_until_balanced(&max_over_mean);
    Run {
        system,
        rps,
        max_over_mean,
        seconds_to_balanced,
        failed_calls: report.failures,
    }
}

/// Seconds from the first step until max/mean stays at or under
/// [`BALANCED`] to the end.
fn seconds_until_balanced(max_over_mean: &[f64]) -> Option<f64> {
    let last_unbalanced = max_over_mean.iter().rposition(|&r| r > BALANCED);
    let first_of_the_rest = last_unbalanced.map_or(0, |i| i + 1);
    (first_of_the_rest < max_over_mean.len())
        .then(|| first_of_the_rest as f64 * BUCKET_MS as f64 / 1000.0)
}

fn render(runs: &[Run]) -> String {
    let mut out =
        String::from("calls per second per pod after the scale-up (p0, p1 old; p2, p3 new)\n\n");
    out += "|   t (s) |";
    for run in runs {
        out += &format!(" {} p0 / p1 / p2 / p3 | max/mean |", run.system.label());
    }
    out += "\n|---:|";
    for _ in runs {
        out += "---|---:|";
    }
    out += "\n";
    let steps = runs.iter().map(|r| r.rps.len()).min().unwrap_or(0);
    for i in 0..steps {
        out += &format!("| {:>7.1} |", i as f64 * BUCKET_MS as f64 / 1000.0);
        for run in runs {
            let values: Vec<String> = run.rps[i].values().map(|v| format!("{v:.0}")).collect();
            out += &format!(" {} | {:.2} |", values.join(" / "), run.max_over_mean[i]);
        }
        out += "\n";
    }
    out += "\n";
    for run in runs {
        let settled = run
            .seconds_to_balanced
            .map_or("never, in this run".to_string(), |s| format!("{s:.1} s"));
        out += &format!(
            "{}: max/mean <= {BALANCED} from {settled} after the scale-up on; {} failed calls\n",
            run.system.label(),
            run.failed_calls
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_means_from_then_on() {
        assert_eq!(
            seconds_until_balanced(&[2.0, 1.5, 1.1, 1.0, 1.05]),
            Some(1.0)
        );
        assert_eq!(seconds_until_balanced(&[1.1, 1.3, 1.1]), Some(1.0));
        assert_eq!(seconds_until_balanced(&[2.0, 2.0]), None);
        assert_eq!(seconds_until_balanced(&[1.0]), Some(0.0));
        assert_eq!(seconds_until_balanced(&[]), None);
    }
}
