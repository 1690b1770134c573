//! Results of `bench compare` as data (compare.json), Markdown tables
//! (compare.md) and charts. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::stats::{self, Membership, Merged};
use super::systems::System;
use super::Plan;
use crate::charts::{BarChart, BarGroup, Line, LinePanels, Panel};
use crate::simulation::Topology;

#[derive(Debug, Serialize)]
pub struct Report {
    pub smoke: bool,
    pub kernel: String,
    pub cpus: usize,
    pub versions: BTreeMap<String, String>,
    pub plan: Plan,
    pub topologies: Vec<Topology>,
    /// One per system and topology.
    pub systems: Vec<SystemResult>,
}

#[derive(Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    pub topology: Topology,
    pub label: String,
    pub how: String,
    /// Why the system was not measured here.
    pub unavailable: Option<String>,
    pub steady: Vec<SteadyResult>,
    pub scale_up: Option<ScaleUpResult>,
    pub rolling: Option<RollingResult>,
}

impl SystemResult {
    pub fn unavailable(system: System, topology: Topology, reason: String) -> SystemResult {
        SystemResult {
            system,
            topology,
            label: system.label().into(),
            how: system.how().into(),
            unavailable: Some(reason),
            steady: Vec::new(),
            scale_up: None,
            rolling: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SteadyResult {
    pub clients: usize,
    pub servers: usize,
    pub rate_per_client: f64,
    pub seconds: f64,
    /// Answered calls per second of each pod over the run.
    pub rps_per_pod: BTreeMap<String, f64>,
    pub max_over_mean: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub ok: u64,
    pub failures: u64,
    pub missed: u64,
    pub errors: Vec<String>,
    /// CPU of all client processes, as % of one core.
    pub client_cpu_percent: f64,
    pub server_cpu_percent: f64,
    /// The balancer's own processes (nginx, dnsmasq, the agent); `None`
    /// for kube-proxy, whose work is done by the kernel on the clients' time.
    pub balancer_cpu_percent: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ScaleUpResult {
    pub bucket_ms: u64,
    /// When the new pods were in service, from the first call.
    pub event_ms: u64,
    pub pods: Vec<String>,
    /// Per pod: answered calls per second in each bucket.
    pub rps: BTreeMap<String, Vec<f64>>,
    pub max_over_mean_per_bucket: Vec<Option<f64>>,
    pub max_over_mean_before: Option<f64>,
    /// From the scale-up until max/mean stayed at or below the threshold.
    pub converged_after_s: Option<f64>,
    pub threshold: f64,
    /// Over the last two seconds.
    pub max_over_mean_at_end: Option<f64>,
    pub failures: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RollingResult {
    pub bucket_ms: u64,
    /// When each replacement took its old pod out of service.
    pub steps_ms: Vec<u64>,
    pub membership: Membership,
    pub failures: u64,
    pub failures_per_bucket: Vec<u64>,
    pub max_over_mean_per_bucket: Vec<Option<f64>>,
    pub worst_max_over_mean: Option<f64>,
    /// Over the last two seconds, against the new pods.
    pub max_over_mean_at_end: Option<f64>,
    pub errors: Vec<String>,
}

/// Buckets in two seconds, the "at the end" window.
fn end_buckets(bucket_ms: u64) -> usize {
    (2000 / bucket_ms).max(1) as usize
}

fn ms(us: Option<u32>) -> Option<f64> {
    us.map(|us| f64::from(us) / 1000.0)
}

#[allow(clippy::too_many_arguments)]
pub fn steady_result(
    clients: usize,
    servers: usize,
    rate_per_client: f64,
    seconds: f64,
    merged: &Merged,
    membership: &Membership,
    [client_cpu_percent, server_cpu_percent]: [f64; 2],
    balancer_cpu_percent: Option<f64>,
) -> SteadyResult {
    let totals = stats::totals(&merged.buckets);
    let pods = membership.at(0);
    let counts: Vec<u64> = pods
        .iter()
        .map(|p| totals.get(p).copied().unwrap_or(0))
        .collect();
    SteadyResult {
        clients,
        servers,
        rate_per_client,
        seconds,
        rps_per_pod: pods
            .iter()
            .zip(&counts)
            .map(|(pod, n)| (pod.clone(), *n as f64 / seconds))
            .collect(),
        max_over_mean: stats::max_over_mean(&counts),
        p50_ms: ms(stats::percentile(&merged.latencies_us, 0.5)),
        p99_ms: ms(stats::percentile(&merged.latencies_us, 0.99)),
        ok: merged.ok,
        failures: merged.failures,
        missed: merged.missed,
        errors: merged.errors.clone(),
        client_cpu_percent,
        server_cpu_percent,
        balancer_cpu_percent,
    }
}

pub fn scale_up_result(
    bucket_ms: u64,
    event_ms: u64,
    threshold: f64,
    merged: &Merged,
    membership: &Membership,
) -> ScaleUpResult {
    let per_bucket = stats::max_over_mean_per_bucket(&merged.buckets, membership, bucket_ms);
    let before_buckets = (event_ms / bucket_ms) as usize;
    let before = stats::max_over_mean_of_last(
        &merged.buckets[..before_buckets.min(merged.buckets.len())],
        membership,
        bucket_ms,
        before_buckets,
    );
    let pods = membership.all_pods();
    ScaleUpResult {
        bucket_ms,
        event_ms,
        rps: stats::rps_series(&merged.buckets, &pods, bucket_ms),
        pods,
        converged_after_s: stats::convergence_ms(&per_bucket, bucket_ms, event_ms, threshold)
            .map(|ms| ms as f64 / 1000.0),
        max_over_mean_per_bucket: per_bucket,
        max_over_mean_before: before,
        threshold,
        max_over_mean_at_end: stats::max_over_mean_of_last(
            &merged.buckets,
            membership,
            bucket_ms,
            end_buckets(bucket_ms),
        ),
        failures: merged.failures,
        errors: merged.errors.clone(),
    }
}

pub fn rolling_result(
    bucket_ms: u64,
    steps_ms: &[u64],
    merged: &Merged,
    membership: &Membership,
) -> RollingResult {
    let per_bucket = stats::max_over_mean_per_bucket(&merged.buckets, membership, bucket_ms);
    RollingResult {
        bucket_ms,
        steps_ms: steps_ms.to_vec(),
        membership: membership.clone(),
        failures: merged.failures,
        failures_per_bucket: merged.failures_per_bucket.clone(),
        worst_max_over_mean: stats::worst(&per_bucket),
        max_over_mean_per_bucket: per_bucket,
        max_over_mean_at_end: stats::max_over_mean_of_last(
            &merged.buckets,
            membership,
            bucket_ms,
            end_buckets(bucket_ms),
        ),
        errors: merged.errors.clone(),
    }
}

/// `1.23`, or `–` when nothing was counted.
pub fn ratio(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("{v:.2}"))
}

pub fn millis(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("{v:.2}"))
}

/// A convergence time: `1.5 s`, or `never` (within the run).
pub fn seconds(value: Option<f64>) -> String {
    value.map_or("never".into(), |v| format!("{v:.1} s"))
}

fn percent(value: Option<f64>) -> String {
    value.map_or("(kernel)".into(), |v| format!("{v:.0}"))
}

/// The measured results, each system's topologies side by side (by node
/// count), systems in [`System::ALL`] order.
fn measured(report: &Report) -> impl Iterator<Item = &SystemResult> {
    let mut measured: Vec<&SystemResult> = report
        .systems
        .iter()
        .filter(|s| s.unavailable.is_none())
        .collect();
    measured.sort_by_key(|s| (system_rank(s.system), s.topology.nodes));
    measured.into_iter()
}

fn system_rank(system: System) -> usize {
    System::ALL
        .iter()
        .position(|&s| s == system)
        .unwrap_or(usize::MAX)
}

/// The systems measured in any topology, in [`System::ALL`] order.
fn measured_systems(report: &Report) -> Vec<System> {
    System::ALL
        .into_iter()
        .filter(|&system| {
            report
                .systems
                .iter()
                .any(|s| s.system == system && s.unavailable.is_none())
        })
        .collect()
}

/// `1 node`, `8 nodes`.
fn nodes_label(nodes: usize) -> String {
    if nodes == 1 {
        "1 node".into()
    } else {
        format!("{nodes} nodes")
    }
}

/// `label` with the node count when the report has several topologies.
fn series_label(report: &Report, s: &SystemResult) -> String {
    if report.topologies.len() > 1 {
        format!("{} ({} n)", s.label, s.topology.nodes)
    } else {
        s.label.clone()
    }
}

/// One figure per workload and topology (rows, each saying its node
/// count) and system (columns): the README's Results table.
pub fn render_summary(report: &Report) -> String {
    let systems = measured_systems(report);
    let find = |system: System, topology: Topology| {
        report
            .systems
            .iter()
            .find(|s| s.system == system && s.topology == topology && s.unavailable.is_none())
    };
    type Cell = Box<dyn Fn(&SystemResult) -> Option<String>>;
    let mut rows: Vec<(String, Cell)> = Vec::new();
    for (clients, servers) in super::STEADY_SHAPES {
        rows.push((
            format!("steady, {clients} clients × {servers} pods: max/mean"),
            Box::new(move |s| {
                s.steady
                    .iter()
                    .find(|r| (r.clients, r.servers) == (clients, servers))
                    .map(|r| ratio(r.max_over_mean))
            }),
        ));
    }
    let (clients, servers) = super::STEADY_SHAPES[0];
    rows.push((
        format!("steady p50 / p99 ms ({clients} × {servers})"),
        Box::new(|s| {
            s.steady
                .first()
                .map(|r| format!("{} / {}", millis(r.p50_ms), millis(r.p99_ms)))
        }),
    ));
    let plan = &report.plan;
    rows.push((
        format!(
            "scale-up {} → {}: time to max/mean ≤ {}",
            plan.scale_up_from,
            plan.scale_up_to,
            super::CONVERGED
        ),
        Box::new(|s| s.scale_up.as_ref().map(|r| seconds(r.converged_after_s))),
    ));
    rows.push((
        format!(
            "rolling update of {} pods: failed calls",
            plan.rolling_servers
        ),
        Box::new(|s| s.rolling.as_ref().map(|r| r.failures.to_string())),
    ));
    let mut out = String::from("| workload | nodes |");
    for system in &systems {
        let _ = write!(out, " {} |", system.label());
    }
    out.push_str("\n|---|---:|");
    out.push_str(&"---|".repeat(systems.len()));
    out.push('\n');
    for (label, cell) in rows {
        for &topology in &report.topologies {
            let _ = write!(out, "| {label} | {} |", topology.nodes);
            for &system in &systems {
                let value = find(system, topology).and_then(&cell);
                let _ = write!(out, " {} |", value.as_deref().unwrap_or("–"));
            }
            out.push('\n');
        }
    }
    out
}

pub fn render_markdown(report: &Report) -> String {
    let plan = &report.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# grpclb compared{}\n",
        if report.smoke { " (smoke run)" } else { "" }
    );
    let topologies: Vec<String> = report.topologies.iter().map(|t| t.describe()).collect();
    let _ = writeln!(
        out,
        "Kernel {}, {} CPUs. Every workload runs on a fresh simulated cluster (netns pods on one bridge, each node a cgroup \
         with its own agent, bpffs and loopback InternalIP for grpclb, the load exchange on) in each topology: {}; \
         clients are grpc-go programs sending unary health checks at a fixed rate ({:.0} calls/s in total), one channel per client pod; \
         servers are tonic pods. Per-pod rates come from the `x-pod` header of each answer.\n",
        report.kernel,
        report.cpus,
        topologies.join("; "),
        plan.total_rate
    );
    if report.smoke && plan.reduced_multi_node {
        let _ = writeln!(
            out,
            "Smoke run: on more than one node only the first steady workload ran (– in the tables).\n"
        );
    }
    let _ = writeln!(out, "## Summary\n\n{}", render_summary(report));
    let _ = writeln!(out, "| peer | version |\n|---|---|");
    for (peer, version) in &report.versions {
        let _ = writeln!(out, "| {peer} | {version} |");
    }
    let _ = writeln!(
        out,
        "\n## Systems\n\n| system | how it balances |\n|---|---|"
    );
    let mut described = Vec::new();
    for system in &report.systems {
        if described.contains(&system.system) {
            continue;
        }
        described.push(system.system);
        let how = match &system.unavailable {
            Some(reason) => format!("**not measured**: {reason}"),
            None => system.how.clone(),
        };
        let _ = writeln!(out, "| {} | {how} |", system.label);
    }

    let _ = writeln!(
        out,
        "\n## Steady load ({:.0} s)\n\n\
         | system | nodes | clients × pods | RPS per pod (min–max) | max/mean | p50 ms | p99 ms | failed | client CPU % | server CPU % | balancer CPU % |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        plan.steady_seconds
    );
    for system in measured(report) {
        for steady in &system.steady {
            let rates: Vec<f64> = steady.rps_per_pod.values().copied().collect();
            let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let high = rates.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "| {} | {} | {} × {} | {:.0}–{:.0} | {} | {} | {} | {} | {:.0} | {:.0} | {} |",
                system.label,
                system.topology.nodes,
                steady.clients,
                steady.servers,
                if rates.is_empty() { 0.0 } else { low },
                high,
                ratio(steady.max_over_mean),
                millis(steady.p50_ms),
                millis(steady.p99_ms),
                steady.failures,
                steady.client_cpu_percent,
                steady.server_cpu_percent,
                percent(steady.balancer_cpu_percent)
            );
        }
    }

    let _ = writeln!(
        out,
        "\n## Scale-up {} → {} pods ({} clients, pods added at {:.0} s of {:.0} s)\n\n\
         | system | nodes | max/mean before | time to max/mean ≤ {} | max/mean, last 2 s | failed |\n\
         |---|---:|---:|---:|---:|---:|",
        plan.scale_up_from,
        plan.scale_up_to,
        plan.churn_clients,
        plan.scale_up_at_seconds,
        plan.scale_up_seconds,
        super::CONVERGED
    );
    for system in measured(report) {
        if let Some(s) = &system.scale_up {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                system.label,
                system.topology.nodes,
                ratio(s.max_over_mean_before),
                seconds(s.converged_after_s),
                ratio(s.max_over_mean_at_end),
                s.failures
            );
        }
    }

    let _ = writeln!(
        out,
        "\n## Rolling update of {} pods ({} clients, one pod replaced every {:.0} s, SIGTERM {:.0} s after leaving the endpoints, graceful drain)\n\n\
         | system | nodes | failed calls | worst max/mean (500 ms) | max/mean, last 2 s |\n\
         |---|---:|---:|---:|---:|",
        plan.rolling_servers,
        plan.churn_clients,
        plan.rolling_step_seconds,
        plan.termination_delay_seconds
    );
    for system in measured(report) {
        if let Some(r) = &system.rolling {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                system.label,
                system.topology.nodes,
                r.failures,
                ratio(r.worst_max_over_mean),
                ratio(r.max_over_mean_at_end)
            );
        }
    }

    let failures: Vec<String> = measured(report)
        .flat_map(|s| {
            let steady = s.steady.iter().map(|r| &r.errors);
            let churn = s
                .scale_up
                .iter()
                .map(|r| &r.errors)
                .chain(s.rolling.iter().map(|r| &r.errors));
            steady.chain(churn).flatten().map(move |e| {
                format!(
                    "- {}, {}: `{}`",
                    s.label,
                    nodes_label(s.topology.nodes),
                    e.replace('`', "'")
                )
            })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(
            out,
            "\n### What failed calls said\n\n{}",
            failures.join("\n")
        );
    }
    let _ = writeln!(
        out,
        "\nmax/mean: calls of the busiest pod in service over the average of the pods in service (1.00 is even; \
         a pod in service that gets nothing counts 0). grpclb balances connections, not calls: a client's \
         calls follow its connection, so with fewer connections than pods some pods get none (an L7 proxy \
         or client-side round_robin balances every call); after a scale-up it moves connections with a \
         GOAWAY, spread over its --scale-up-window (5 s)."
    );
    out
}

/// Per-pod RPS over time in the scale-up, one panel per measured system.
pub fn scale_up_panels(report: &Report) -> LinePanels {
    let panels = measured(report)
        .filter_map(|system| {
            let s = system.scale_up.as_ref()?;
            let step = s.bucket_ms as f64 / 1000.0;
            Some(Panel {
                title: format!(
                    "{} (converged: {})",
                    series_label(report, system),
                    seconds(s.converged_after_s)
                ),
                lines: s
                    .pods
                    .iter()
                    .map(|pod| Line {
                        label: pod.clone(),
                        points: s.rps[pod]
                            .iter()
                            .enumerate()
                            .map(|(i, rps)| ((i as f64 + 0.5) * step, *rps))
                            .collect(),
                    })
                    .collect(),
                marker: Some(("pods added".into(), s.event_ms as f64 / 1000.0)),
            })
        })
        .collect();
    LinePanels {
        title: format!(
            "Scale-up {} → {} pods: calls/s per pod ({} ms buckets)",
            report.plan.scale_up_from,
            report.plan.scale_up_to,
            super::BUCKET_MS
        ),
        x_label: "seconds".into(),
        y_label: "calls/s".into(),
        panels,
    }
}

/// max/mean per workload (groups) and system (bars).
pub fn spread_chart(report: &Report) -> BarChart {
    let systems: Vec<&SystemResult> = measured(report).collect();
    let mut groups: Vec<BarGroup> = Vec::new();
    if let Some(first) = systems.first() {
        for (i, steady) in first.steady.iter().enumerate() {
            groups.push(BarGroup {
                label: format!("steady {}×{}", steady.clients, steady.servers),
                values: systems
                    .iter()
                    .map(|s| s.steady.get(i).and_then(|r| r.max_over_mean).unwrap_or(0.0))
                    .collect(),
            });
        }
    }
    groups.push(BarGroup {
        label: "scale-up, end".into(),
        values: systems
            .iter()
            .map(|s| {
                s.scale_up
                    .as_ref()
                    .and_then(|r| r.max_over_mean_at_end)
                    .unwrap_or(0.0)
            })
            .collect(),
    });
    groups.push(BarGroup {
        label: "rolling, worst".into(),
        values: systems
            .iter()
            .map(|s| {
                s.rolling
                    .as_ref()
                    .and_then(|r| r.worst_max_over_mean)
                    .unwrap_or(0.0)
            })
            .collect(),
    });
    BarChart {
        title: "max/mean of calls per pod (1.00 = even)".into(),
        y_label: "max/mean".into(),
        series: systems.iter().map(|s| series_label(report, s)).collect(),
        groups,
        reference: Some(("even".into(), 1.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(buckets: &[&[(&str, u64)]], latencies_us: Vec<u32>, failures: u64) -> Merged {
        Merged {
            buckets: buckets
                .iter()
                .map(|b| b.iter().map(|(p, n)| (p.to_string(), *n)).collect())
                .collect(),
            failures_per_bucket: vec![0; buckets.len()],
            latencies_us,
            ok: 0,
            failures,
            missed: 0,
            errors: if failures > 0 {
                vec!["unavailable".into()]
            } else {
                vec![]
            },
        }
    }

    fn pods(names: &[&str]) -> Vec<String> {
        names.iter().map(|p| p.to_string()).collect()
    }

    fn steady_of(buckets: &[&[(&str, u64)]]) -> SteadyResult {
        steady_result(
            2,
            2,
            10.0,
            1.0,
            &merged(buckets, (1..=100).map(|i| i * 100).collect(), 0),
            &Membership::starting_with(pods(&["a", "b"])),
            [12.0, 30.0],
            None,
        )
    }

    fn one_node() -> Topology {
        Topology::with_nodes(1).unwrap()
    }

    fn eight_nodes() -> Topology {
        Topology::with_nodes(8).unwrap()
    }

    fn report() -> Report {
        let mut scale_membership = Membership::starting_with(pods(&["a", "b"]));
        scale_membership.change(1000, pods(&["a", "b", "c", "d"]));
        let scale = merged(
            &[
                &[("a", 10), ("b", 10)],
                &[("a", 10), ("b", 10)],
                &[("a", 10), ("b", 10)],
                &[("a", 5), ("b", 5), ("c", 5), ("d", 5)],
                &[("a", 5), ("b", 5), ("c", 5), ("d", 5)],
            ],
            vec![],
            0,
        );
        let mut rolling_membership = Membership::starting_with(pods(&["a", "b"]));
        rolling_membership.change(500, pods(&["b", "c"]));
        let rolling = merged(
            &[&[("a", 10), ("b", 10)], &[("b", 15), ("c", 5)]],
            vec![],
            3,
        );
        Report {
            smoke: true,
            kernel: "6.18".into(),
            cpus: 2,
            versions: BTreeMap::from([("nginx".into(), "nginx/1.22.1".into())]),
            plan: Plan::smoke(),
            topologies: vec![one_node()],
            systems: vec![
                SystemResult {
                    system: System::Nginx,
                    topology: one_node(),
                    label: "nginx grpc_pass".into(),
                    how: "per call".into(),
                    unavailable: None,
                    steady: vec![steady_of(&[&[("a", 6), ("b", 4)]])],
                    scale_up: Some(scale_up_result(500, 1000, 1.2, &scale, &scale_membership)),
                    rolling: Some(rolling_result(500, &[500], &rolling, &rolling_membership)),
                },
                SystemResult::unavailable(
                    System::Ipvs,
                    one_node(),
                    "CONFIG_IP_VS is not set".into(),
                ),
            ],
        }
    }

    #[test]
    fn steady_result_has_rates_spread_and_percentiles() {
        let steady = steady_of(&[&[("a", 6), ("b", 2)], &[("a", 0), ("b", 0)]]);
        assert_eq!(steady.rps_per_pod["a"], 6.0);
        assert_eq!(steady.rps_per_pod["b"], 2.0);
        assert_eq!(steady.max_over_mean, Some(1.5));
        assert_eq!(steady.p50_ms, Some(5.0));
        assert_eq!(steady.p99_ms, Some(9.9));
    }

    #[test]
    fn scale_up_result_finds_the_spread_before_and_the_convergence() {
        let report = report();
        let s = report.systems[0].scale_up.as_ref().unwrap();
        assert_eq!(s.max_over_mean_before, Some(1.0));
        assert_eq!(s.max_over_mean_per_bucket[2], Some(2.0));
        assert_eq!(s.converged_after_s, Some(0.5));
        // The last 2 s reach back before the scale-up: 30, 30, 10, 10.
        assert_eq!(s.max_over_mean_at_end, Some(1.5));
        assert_eq!(s.pods, pods(&["a", "b", "c", "d"]));
        assert_eq!(s.rps["c"], vec![0.0, 0.0, 0.0, 10.0, 10.0]);
    }

    #[test]
    fn rolling_result_judges_each_bucket_by_who_was_in_service() {
        let report = report();
        let r = report.systems[0].rolling.as_ref().unwrap();
        assert_eq!(r.max_over_mean_per_bucket, vec![Some(1.0), Some(1.5)]);
        assert_eq!(r.worst_max_over_mean, Some(1.5));
        assert_eq!(r.failures, 3);
    }

    #[test]
    fn markdown_has_a_row_per_measured_system_and_the_ipvs_reason() {
        let markdown = render_markdown(&report());
        assert!(markdown.contains(
            "| nginx grpc_pass | 1 | 2 × 2 | 4–6 | 1.20 | 5.00 | 9.90 | 0 | 12 | 30 | (kernel) |"
        ));
        assert!(markdown.contains("| nginx grpc_pass | 1 | 1.00 | 0.5 s | 1.50 | 0 |"));
        assert!(
            markdown.contains("| nginx grpc_pass | 1 | 3 | 1.50 | 1.67 |"),
            "{markdown}"
        );
        assert!(markdown
            .contains("| kube-proxy IPVS (lc) | **not measured**: CONFIG_IP_VS is not set |"));
        assert!(markdown.contains("| nginx | nginx/1.22.1 |"));
        assert!(markdown.contains("- nginx grpc_pass, 1 node: `unavailable`"));
        assert!(!markdown.contains("| kube-proxy IPVS (lc) | 2 ×"));
    }

    #[test]
    fn the_json_report_names_systems_in_kebab_case() {
        let json = serde_json::to_value(report()).unwrap();
        assert_eq!(json["systems"][0]["system"], "nginx");
        assert_eq!(json["systems"][1]["system"], "ipvs");
        assert_eq!(json["systems"][1]["unavailable"], "CONFIG_IP_VS is not set");
        assert_eq!(json["systems"][0]["steady"][0]["max_over_mean"], 1.2);
    }

    #[test]
    fn charts_leave_out_unmeasured_systems() {
        let report = report();
        let panels = scale_up_panels(&report);
        assert_eq!(panels.panels.len(), 1);
        assert_eq!(panels.panels[0].lines.len(), 4);
        assert_eq!(panels.panels[0].lines[0].points[0], (0.25, 20.0));
        assert_eq!(panels.panels[0].marker, Some(("pods added".into(), 1.0)));
        let bars = spread_chart(&report);
        assert_eq!(bars.series, vec!["nginx grpc_pass"]);
        let labels: Vec<&str> = bars.groups.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(labels, ["steady 2×2", "scale-up, end", "rolling, worst"]);
        assert_eq!(bars.groups[0].values, vec![1.2]);
    }

    /// [`report`] plus an 8-node topology where nginx ran only the 2 × 2
    /// steady workload (a reduced smoke run) and grpclb ran it too.
    fn two_topologies() -> Report {
        let mut report = report();
        report.topologies.push(eight_nodes());
        let steady = |a: u64, b: u64| steady_of(&[&[("a", a), ("b", b)]]);
        report.systems.push(SystemResult {
            system: System::Grpclb,
            topology: eight_nodes(),
            label: "grpclb".into(),
            how: "connections".into(),
            unavailable: None,
            steady: vec![steady(5, 5)],
            scale_up: None,
            rolling: None,
        });
        report.systems.push(SystemResult {
            system: System::Nginx,
            topology: eight_nodes(),
            label: "nginx grpc_pass".into(),
            how: "per call".into(),
            unavailable: None,
            steady: vec![steady(8, 2)],
            scale_up: None,
            rolling: None,
        });
        report
    }

    #[test]
    fn summary_has_a_row_per_workload_and_node_count_and_a_column_per_system() {
        let mut report = two_topologies();
        // The fixture's steady shape stands for the first of the bench's.
        let (clients, servers) = super::super::STEADY_SHAPES[0];
        for s in &mut report.systems {
            for r in &mut s.steady {
                (r.clients, r.servers) = (clients, servers);
            }
        }
        let summary = render_summary(&report);
        let lines: Vec<&str> = summary.lines().collect();
        assert_eq!(lines[0], "| workload | nodes | nginx grpc_pass | grpclb |");
        assert_eq!(lines[1], "|---|---:|---|---|");
        let steady = format!("| steady, {clients} clients × {servers} pods: max/mean");
        assert_eq!(lines[2], format!("{steady} | 1 | 1.20 | – |"));
        assert_eq!(lines[3], format!("{steady} | 8 | 1.60 | 1.00 |"));
        let scale_up: Vec<&&str> = lines.iter().filter(|l| l.contains("scale-up")).collect();
        assert_eq!(scale_up.len(), 2);
        assert!(scale_up[0].ends_with("| 1 | 0.5 s | – |"), "{summary}");
        assert!(scale_up[1].ends_with("| 8 | – | – |"), "{summary}");
        assert!(summary.contains("rolling update of 3 pods: failed calls | 1 | 3 | – |"));
    }

    #[test]
    fn each_system_shows_its_topologies_side_by_side() {
        let report = two_topologies();
        let markdown = render_markdown(&report);
        let nginx_one = markdown.find("| nginx grpc_pass | 1 | 2 × 2 |").unwrap();
        let nginx_eight = markdown.find("| nginx grpc_pass | 8 | 2 × 2 |").unwrap();
        let grpclb = markdown.find("| grpclb | 8 | 2 × 2 |").unwrap();
        assert!(
            nginx_one < nginx_eight && nginx_eight < grpclb,
            "{markdown}"
        );
        assert_eq!(
            markdown.matches("| nginx grpc_pass | per call |").count(),
            1
        );
        assert!(markdown.contains("8 nodes (pods on 2, clients on 6)"));
        assert!(markdown.contains("only the first steady workload ran"));
        let bars = spread_chart(&report);
        assert_eq!(
            bars.series,
            [
                "nginx grpc_pass (1 n)",
                "nginx grpc_pass (8 n)",
                "grpclb (8 n)"
            ]
        );
    }

    #[test]
    fn missing_values_are_shown_as_such() {
        assert_eq!(ratio(None), "–");
        assert_eq!(seconds(None), "never");
        assert_eq!(seconds(Some(1.25)), "1.2 s");
        assert_eq!(percent(None), "(kernel)");
    }
}
