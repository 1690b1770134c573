//! `cargo xtask bench compare`: the same gRPC workloads against every way of
//! reaching the pods that users run today, and grpclb, on throw-away
//! simulated clusters. Writes target/bench/compare.md, compare.json and SVG
//! plots.
//!
//! Every system gets a fresh cluster per workload and topology: one node
//! holding every pod, and K nodes (`--nodes`) with the server pods on some
//! and the clients spread over the others, one grpclb agent per node with
//! the load exchange on. The load clients are one grpc-go program
//! (xtask/peers/grpc-rate-client), so client CPU compares across systems;
//! the servers are the harness's tonic pods.

pub mod peers;
mod report;
mod stats;
mod systems;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use grpclb_tests::ChildGuard;
use serde::Serialize;

use crate::charts::{render_panels_svg, render_svg};
use crate::simulation::{self, wait_for_exit, Topology};
use report::{Report, RollingResult, ScaleUpResult, SteadyResult, SystemResult};
use stats::{ClientReport, Membership, Merged};
use systems::{Cluster, System};

/// Per-pod rates are counted in buckets this wide.
const BUCKET_MS: u64 = 500;
/// "Converged" means max/mean at most this.
const CONVERGED: f64 = 1.2;
/// Per-call deadline of the clients.
const DEADLINE_MS: u64 = 2_000;
/// From the last client started to the first call: time to connect.
const LEAD: Duration = Duration::from_millis(1_500);

/// Steady workload shapes: (client pods, server pods).
const STEADY_SHAPES: [(usize, usize); 2] = [(20, 5), (4, 8)];

/// How long and how hard each workload runs.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Calls per second of all clients together, in every workload.
    pub total_rate: f64,
    pub steady_seconds: f64,
    /// Client pods of the scale-up and rolling workloads.
    pub churn_clients: usize,
    pub scale_up_from: usize,
    pub scale_up_to: usize,
    pub scale_up_seconds: f64,
    pub scale_up_at_seconds: f64,
    pub rolling_servers: usize,
    /// Before the first replacement, and between replacements.
    pub rolling_first_at_seconds: f64,
    pub rolling_step_seconds: f64,
    pub rolling_seconds: f64,
    /// From taking a pod out of service to its SIGTERM (the endpoint
    /// removal reaching the balancers, as a preStop sleep allows).
    pub termination_delay_seconds: f64,
    /// Between client pod starts.
    pub client_stagger_ms: u64,
    /// Topologies of more than one node run only the first steady workload
    /// (the smoke run's time budget).
    pub reduced_multi_node: bool,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            total_rate: 1000.0,
            steady_seconds: 20.0,
            churn_clients: 8,
            scale_up_from: 2,
            scale_up_to: 4,
            scale_up_seconds: 24.0,
            scale_up_at_seconds: 6.0,
            rolling_servers: 4,
            rolling_first_at_seconds: 4.0,
            rolling_step_seconds: 5.0,
            rolling_seconds: 30.0,
            termination_delay_seconds: 1.0,
            client_stagger_ms: 50,
            reduced_multi_node: false,
        }
    }

    /// The CI version: every system and workload on one node, short; on
    /// more nodes only the first steady workload (CI's time budget).
    pub fn smoke() -> Plan {
        Plan {
            steady_seconds: 3.0,
            // Long enough after the scale-up for grpclb's 5 s window to end.
            scale_up_seconds: 10.0,
            scale_up_at_seconds: 2.0,
            rolling_servers: 3,
            rolling_first_at_seconds: 1.5,
            rolling_step_seconds: 2.0,
            rolling_seconds: 9.0,
            client_stagger_ms: 20,
            reduced_multi_node: true,
            ..Plan::full()
        }
    }
}

/// Default node counts of `--nodes`: one node, and a multi-node cluster.
pub const DEFAULT_NODES: [usize; 2] = [1, 8];

pub fn run(smoke: bool, nodes: &[usize]) -> Result<()> {
    let topologies = nodes
        .iter()
        .map(|&n| Topology::with_nodes(n))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let out_dir = simulation::prepare("cargo xtask bench compare", "bench")?;
    println!("compare: installing the peers (grpc-go, dnsmasq, nginx) where missing");
    peers::install()?;
    let client_bin = peers::build_load_client(&out_dir)?;
    let kernel = simulation::kernel_release();
    let plan = if smoke { Plan::smoke() } else { Plan::full() };
    let work_dir = out_dir.join("compare");
    let mut results = Vec::new();
    for &topology in &topologies {
        for system in System::ALL {
            check_time(system, topology, &started)?;
            let result = if system == System::Ipvs {
                let reason = peers::ipvs_status(&kernel);
                println!("\n{}: not measured: {reason}", system.label());
                SystemResult::unavailable(system, topology, reason)
            } else {
                println!(
                    "\n{}, {}: {}",
                    system.label(),
                    topology.describe(),
                    system.how()
                );
                let dir = work_dir.join(format!("{}-{}n", slug(system), topology.nodes));
                measure_system(system, topology, &plan, &client_bin, &dir)?
            };
            results.push(result);
        }
    }
    let report = Report {
        smoke,
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        versions: peers::versions(&client_bin),
        plan,
        topologies,
        systems: results,
    };
    write_outputs(&report, &out_dir)?;
    println!(
        "\ncompare: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn check_time(system: System, topology: Topology, started: &Instant) -> Result<()> {
    simulation::check_interrupted()?;
    println!(
        "compare: {:.0} s in, next {} on {}",
        started.elapsed().as_secs_f64(),
        system.label(),
        topology.describe()
    );
    Ok(())
}

fn slug(system: System) -> String {
    serde_json::to_value(system)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "system".into())
}

fn write_outputs(report: &Report, out_dir: &Path) -> Result<()> {
    let write = |name: &str, text: String| -> Result<PathBuf> {
        let path = out_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let markdown = report::render_markdown(report);
    println!("\n{markdown}");
    let written = [
        write("compare.md", markdown)?,
        write(
            "compare.json",
            serde_json::to_string_pretty(report).context("encoding compare.json")? + "\n",
        )?,
        write(
            "compare-scale-up.svg",
            render_panels_svg(&report::scale_up_panels(report))?,
        )?,
        write(
            "compare-max-over-mean.svg",
            render_svg(&report::spread_chart(report))?,
        )?,
    ];
    for path in written {
        println!("written: {}", path.display());
    }
    Ok(())
}

fn measure_system(
    system: System,
    topology: Topology,
    plan: &Plan,
    client_bin: &Path,
    dir: &Path,
) -> Result<SystemResult> {
    let reduced = plan.reduced_multi_node && topology.nodes > 1;
    let shapes = if reduced {
        &STEADY_SHAPES[..1]
    } else {
        &STEADY_SHAPES[..]
    };
    let mut steady = Vec::new();
    for &(clients, servers) in shapes {
        let result = run_steady(system, topology, plan, client_bin, clients, servers, dir)
            .with_context(|| format!("{}: steady {clients}×{servers}", system.label()))?;
        println!(
            "  steady {clients} clients × {servers} pods: max/mean {}, p99 {} ms, {} failed",
            report::ratio(result.max_over_mean),
            report::millis(result.p99_ms),
            result.failures
        );
        steady.push(result);
    }
    let mut result = SystemResult {
        system,
        topology,
        label: system.label().into(),
        how: system.how().into(),
        unavailable: None,
        steady,
        scale_up: None,
        rolling: None,
    };
    if reduced {
        return Ok(result);
    }
    let scale_up = run_scale_up(system, topology, plan, client_bin, dir)
        .with_context(|| format!("{}: scale-up", system.label()))?;
    println!(
        "  scale-up {}→{}: converged after {}, {} failed",
        plan.scale_up_from,
        plan.scale_up_to,
        report::seconds(scale_up.converged_after_s),
        scale_up.failures
    );
    let rolling = run_rolling(system, topology, plan, client_bin, dir)
        .with_context(|| format!("{}: rolling update", system.label()))?;
    println!(
        "  rolling update of {} pods: {} failed, worst max/mean {}",
        plan.rolling_servers,
        rolling.failures,
        report::ratio(rolling.worst_max_over_mean)
    );
    result.scale_up = Some(scale_up);
    result.rolling = Some(rolling);
    Ok(result)
}

/// When the first call goes out, shared by every client of a run.
struct Clock {
    start_unix_ms: u64,
}

impl Clock {
    /// Sleeps until `offset` after the start.
    fn sleep_until(&self, offset: Duration) -> Result<()> {
        let due = self.start_unix_ms + offset.as_millis() as u64;
        simulation::sleep(Duration::from_millis(due.saturating_sub(unix_ms()?)))
    }

    /// Milliseconds since the start (0 before it).
    fn now_ms(&self) -> Result<u64> {
        Ok(unix_ms()?.saturating_sub(self.start_unix_ms))
    }
}

fn unix_ms() -> Result<u64> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64)
}

/// Starts `count` load clients sending `total_rate` calls/s between them for
/// `seconds`, and returns the shared clock.
fn start_load(
    cluster: &mut Cluster,
    plan: &Plan,
    client_bin: &Path,
    count: usize,
    seconds: f64,
) -> Result<Clock> {
    let stagger = Duration::from_millis(plan.client_stagger_ms);
    let start_unix_ms = unix_ms()? + (stagger * count as u32 + LEAD).as_millis() as u64;
    let rate = plan.total_rate / count as f64;
    let round_robin = cluster.clients_round_robin();
    cluster.start_clients(count, stagger, |target| {
        let mut cmd = Command::new(client_bin);
        cmd.arg("--target")
            .arg(target)
            .arg(format!("--rate={rate}"))
            .arg(format!("--start-unix-ms={start_unix_ms}"))
            .arg(format!("--duration-ms={}", (seconds * 1000.0) as u64))
            .arg(format!("--bucket-ms={BUCKET_MS}"))
            .arg(format!("--deadline-ms={DEADLINE_MS}"))
            .env("GRPC_GO_LOG_SEVERITY_LEVEL", "error");
        if round_robin {
            cmd.arg("--round-robin");
        }
        cmd
    })?;
    Ok(Clock { start_unix_ms })
}

/// Waits for every client and adds up their reports.
fn collect(clients: Vec<ChildGuard>, seconds: f64) -> Result<Merged> {
    let timeout = Duration::from_secs_f64(seconds) + LEAD + Duration::from_secs(30);
    let mut reports = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let output = wait_for_exit(client, &format!("load client {i}"), timeout)?;
        if !output.status.success() {
            bail!(
                "load client {i} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        reports.push(ClientReport::parse(stdout.trim())?);
    }
    Ok(stats::merge(&reports))
}

fn run_steady(
    system: System,
    topology: Topology,
    plan: &Plan,
    client_bin: &Path,
    clients: usize,
    servers: usize,
    dir: &Path,
) -> Result<SteadyResult> {
    let mut cluster = Cluster::new(
        system,
        topology,
        servers,
        &dir.join(format!("steady-{clients}x{servers}")),
    )?;
    let clock = start_load(&mut cluster, plan, client_bin, clients, plan.steady_seconds)?;
    let pids = |c: &Cluster| [c.client_pids(), c.server_pids(), c.frontend_pids()];
    clock.sleep_until(Duration::ZERO)?;
    let before = pids(&cluster).map(|p| systems::cpu_ticks(&p));
    clock.sleep_until(Duration::from_secs_f64(plan.steady_seconds))?;
    let after = pids(&cluster).map(|p| systems::cpu_ticks(&p));
    let merged = collect(cluster.take_clients(), plan.steady_seconds)?;
    let membership = Membership::starting_with(cluster.in_service());
    let ticks = ticks_per_second();
    let cpu = |i: usize| stats::cpu_percent(&before[i], &after[i], ticks, plan.steady_seconds);
    let frontend_cpu = (!cluster.frontend_pids().is_empty()).then(|| cpu(2));
    Ok(report::steady_result(
        clients,
        servers,
        plan.total_rate / clients as f64,
        plan.steady_seconds,
        &merged,
        &membership,
        [cpu(0), cpu(1)],
        frontend_cpu,
    ))
}

fn run_scale_up(
    system: System,
    topology: Topology,
    plan: &Plan,
    client_bin: &Path,
    dir: &Path,
) -> Result<ScaleUpResult> {
    let mut cluster = Cluster::new(system, topology, plan.scale_up_from, &dir.join("scale-up"))?;
    let clock = start_load(
        &mut cluster,
        plan,
        client_bin,
        plan.churn_clients,
        plan.scale_up_seconds,
    )?;
    let mut membership = Membership::starting_with(cluster.in_service());
    clock.sleep_until(Duration::from_secs_f64(plan.scale_up_at_seconds))?;
    let event_ms = clock.now_ms()?;
    for _ in plan.scale_up_from..plan.scale_up_to {
        cluster.add_server()?;
    }
    membership.change(event_ms, cluster.in_service());
    let merged = collect(cluster.take_clients(), plan.scale_up_seconds)?;
    Ok(report::scale_up_result(
        BUCKET_MS,
        event_ms,
        CONVERGED,
        &merged,
        &membership,
    ))
}

fn run_rolling(
    system: System,
    topology: Topology,
    plan: &Plan,
    client_bin: &Path,
    dir: &Path,
) -> Result<RollingResult> {
    let mut cluster = Cluster::new(system, topology, plan.rolling_servers, &dir.join("rolling"))?;
    let clock = start_load(
        &mut cluster,
        plan,
        client_bin,
        plan.churn_clients,
        plan.rolling_seconds,
    )?;
    let mut membership = Membership::starting_with(cluster.in_service());
    let mut steps_ms = Vec::new();
    for (step, old) in cluster.in_service().into_iter().enumerate() {
        let at = plan.rolling_first_at_seconds + step as f64 * plan.rolling_step_seconds;
        clock.sleep_until(Duration::from_secs_f64(at))?;
        // As a Deployment's rollout: the new pod is ready, then the old
        // one leaves the endpoints and is terminated.
        cluster.add_server()?;
        cluster.remove_from_service(&old)?;
        let changed_ms = clock.now_ms()?;
        steps_ms.push(changed_ms);
        membership.change(changed_ms, cluster.in_service());
        simulation::sleep(Duration::from_secs_f64(plan.termination_delay_seconds))?;
        cluster.terminate(&old)?;
    }
    let merged = collect(cluster.take_clients(), plan.rolling_seconds)?;
    Ok(report::rolling_result(
        BUCKET_MS,
        &steps_ms,
        &merged,
        &membership,
    ))
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100)
}
