//! `cargo xtask bench tracker`: what following the HTTP/2 frames of a node's
//! pods (cgroup_skb/egress + the frame tracker) costs a server: unary gRPC
//! calls per second and HTTP/2 streaming MB/s, each measured
//! - without grpclb,
//! - with grpclb attached but the server pod not one of its local backends
//!   (every segment still passes the egress hook: one map lookup),
//! - with the server pod a local backend, so its connections are tracked.
//!
//! The server and the client run in the node cgroup, in their own pods; the
//! client talks to the pod IP, so only the tracking differs between modes.
//! Rounds interleave the modes and the report takes medians.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grpclb_tests::{
    service_yaml, spawn, testpod_bin, Agent, BpffsDir, DownloadReport, Fabric, LoadReport, Node,
    Pod, ServiceDef,
};
use serde::Serialize;

use crate::simulation::{self, wait_for_exit};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const GRPC_PORT: u16 = 50051;
const BULK_PORT: u16 = 8081;
const UNARY_CONNECTIONS: u64 = 4;
const STREAM_REQUESTS: u64 = 4;
const BULK_MIB: u64 = 256;
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    NoGrpclb,
    NotTracked,
    Tracked,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::NoGrpclb, Mode::NotTracked, Mode::Tracked];

    fn label(self) -> &'static str {
        match self {
            Mode::NoGrpclb => "no grpclb",
            Mode::NotTracked => "grpclb, pod not tracked",
            Mode::Tracked => "grpclb, pod tracked",
        }
    }
}

#[derive(Debug, Serialize)]
struct Measured {
    mode: Mode,
    unary_rps: Vec<f64>,
    streaming_mb_per_s: Vec<f64>,
}

#[derive(Serialize)]
struct ReportJson<'a> {
    kernel: String,
    cpus: usize,
    unary_rpcs_per_round: u64,
    streaming_mib_per_round: u64,
    modes: &'a [Measured],
}

pub fn run(rounds: usize, rpcs: u64) -> Result<()> {
    if rounds == 0 || rpcs == 0 {
        bail!("--rounds and --rpcs must be at least 1");
    }
    let out_dir = simulation::prepare("cargo xtask bench tracker", "bench")?;
    let measured = measure_all(rounds, rpcs, &out_dir)?;
    println!();
    print!("{}", render_table(&measured));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let json = ReportJson {
        kernel: simulation::kernel_release(),
        cpus,
        unary_rpcs_per_round: rpcs * UNARY_CONNECTIONS,
        streaming_mib_per_round: BULK_MIB * STREAM_REQUESTS,
        modes: &measured,
    };
    let path = out_dir.join("tracker.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written: {}", path.display());
    Ok(())
}

fn measure_all(rounds: usize, rpcs: u64, out_dir: &Path) -> Result<Vec<Measured>> {
    let node = Node::new("tracker")?;
    let fabric = Fabric::new("tracker")?;
    let server_pod = fabric.add_pod("server", SERVER, None)?;
    let client = fabric.add_pod("client", CLIENT, None)?;
    let mut servers = Vec::new();
    for args in [
        vec![
            "grpc-server".to_string(),
            "--name".into(),
            "server".into(),
            "--listen".into(),
            SocketAddr::from((SERVER, GRPC_PORT)).to_string(),
        ],
        vec![
            "h2-bulk-server".into(),
            "--mib".into(),
            BULK_MIB.to_string(),
            "--listen".into(),
            SocketAddr::from((SERVER, BULK_PORT)).to_string(),
        ],
    ] {
        let mut cmd = std::process::Command::new(testpod_bin());
        cmd.args(&args);
        let mut server = spawn(&server_pod, Some(&node), cmd)?;
        server.expect_line("ready", Duration::from_secs(10))?;
        servers.push(server);
    }
    let services = |on_node: &str| {
        [GRPC_PORT, BULK_PORT].map(|port| {
            ServiceDef::grpc(
                &format!("svc-{port}"),
                Ipv4Addr::new(10, 96, 0, 10),
                port,
                port,
            )
            .backend_on(SERVER, on_node)
        })
    };
    let untracked_file = out_dir.join("tracker-untracked.yaml");
    let tracked_file = out_dir.join("tracker-tracked.yaml");
    std::fs::write(&untracked_file, service_yaml(&services("another-node")))?;
    std::fs::write(&tracked_file, service_yaml(&services(node.name())))?;

    let mut measured: Vec<Measured> = Mode::ALL
        .iter()
        .map(|&mode| Measured {
            mode,
            unary_rps: Vec::new(),
            streaming_mb_per_s: Vec::new(),
        })
        .collect();
    for round in 1..=rounds {
        for m in &mut measured {
            let bpffs = BpffsDir::new()?;
            let _agent = match m.mode {
                Mode::NoGrpclb => None,
                Mode::NotTracked => Some(Agent::start(&node, bpffs.path(), &untracked_file)?),
                Mode::Tracked => Some(Agent::start(&node, bpffs.path(), &tracked_file)?),
            };
            let load = unary(&client, &node, rpcs)?;
            let download = streaming(&client, &node)?;
            let rps = load.ok as f64 / load.seconds;
            let mb_per_s = download.bytes as f64 / 1e6 / download.seconds;
            println!(
                "  round {round}: {:<24} {:>9.0} unary RPCs/s {:>9.1} MB/s streaming",
                m.mode.label(),
                rps,
                mb_per_s
            );
            m.unary_rps.push(rps);
            m.streaming_mb_per_s.push(mb_per_s);
        }
    }
    drop(servers);
    Ok(measured)
}

fn unary(client: &Pod, node: &Node, rpcs: u64) -> Result<LoadReport> {
    let mut cmd = std::process::Command::new(testpod_bin());
    cmd.args([
        "grpc-load",
        "--to",
        &format!("http://{}", SocketAddr::from((SERVER, GRPC_PORT))),
    ])
    .args([
        "--connections",
        &UNARY_CONNECTIONS.to_string(),
        "--rpcs",
        &rpcs.to_string(),
    ]);
    let output = wait_for_exit(spawn(client, Some(node), cmd)?, "grpc-load", RUN_TIMEOUT)?;
    let report = LoadReport::parse(String::from_utf8_lossy(&output.stdout).trim())?;
    if report.failures > 0 || report.ok == 0 {
        bail!("unary load failed: {:?}", report.errors);
    }
    Ok(report)
}

fn streaming(client: &Pod, node: &Node) -> Result<DownloadReport> {
    let mut cmd = std::process::Command::new(testpod_bin());
    cmd.args([
        "h2-download",
        "--to",
        &SocketAddr::from((SERVER, BULK_PORT)).to_string(),
    ])
    .args(["--requests", &STREAM_REQUESTS.to_string()]);
    let output = wait_for_exit(spawn(client, Some(node), cmd)?, "h2-download", RUN_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "h2-download failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    DownloadReport::parse(String::from_utf8_lossy(&output.stdout).trim())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Medians per mode and their ratio to the first mode (no grpclb).
fn render_table(measured: &[Measured]) -> String {
    let mut out = format!(
        "{:<24} {:>14} {:>8} {:>16} {:>8}\n",
        "server", "unary RPCs/s", "ratio", "streaming MB/s", "ratio"
    );
    let base = measured.first();
    let base_rps = base.map_or(f64::NAN, |m| median(&m.unary_rps));
    let base_mbs = base.map_or(f64::NAN, |m| median(&m.streaming_mb_per_s));
    for m in measured {
        let (rps, mbs) = (median(&m.unary_rps), median(&m.streaming_mb_per_s));
        out += &format!(
            "{:<24} {:>14.0} {:>8.3} {:>16.1} {:>8.3}\n",
            m.mode.label(),
            rps,
            rps / base_rps,
            mbs,
            mbs / base_mbs
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_no_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn table_gives_ratios_to_the_run_without_grpclb() {
        let m = |mode, rps: f64, mbs: f64| Measured {
            mode,
            unary_rps: vec![rps],
            streaming_mb_per_s: vec![mbs],
        };
        let table = render_table(&[
            m(Mode::NoGrpclb, 1000.0, 200.0),
            m(Mode::Tracked, 950.0, 180.0),
        ]);
        let tracked = table
            .lines()
            .find(|l| l.starts_with("grpclb, pod tracked"))
            .unwrap();
        assert!(
            tracked.contains("0.950") && tracked.contains("0.900"),
            "{table}"
        );
    }
}
