//! The pure part of `bench compare`: from what the load clients printed to
//! per-pod rates, spreads, percentiles and convergence times.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What one `grpc-rate-client` printed (see xtask/peers/grpc-rate-client).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ClientReport {
    /// Per bucket (by send time): answered calls per pod.
    pub buckets: Vec<BTreeMap<String, u64>>,
    pub failures_per_bucket: Vec<u64>,
    pub latencies_us: Option<Vec<u32>>,
    pub ok: u64,
    pub failures: u64,
    pub errors: Vec<String>,
    /// Calls not sent because the client started late.
    pub missed: u64,
}

impl ClientReport {
    pub fn parse(line: &str) -> Result<Self> {
        serde_json::from_str(line).with_context(|| {
            let shown: String = line.chars().take(200).collect();
            format!("parsing a grpc-rate-client report {shown:?}")
        })
    }
}

/// The reports of every client of one run, added up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merged {
    pub buckets: Vec<BTreeMap<String, u64>>,
    pub failures_per_bucket: Vec<u64>,
    /// Sorted ascending.
    pub latencies_us: Vec<u32>,
    pub ok: u64,
    pub failures: u64,
    pub missed: u64,
    /// The first few failure messages, each once.
    pub errors: Vec<String>,
}

/// How many distinct failure messages a merged report keeps.
const ERRORS_KEPT: usize = 8;

pub fn merge(reports: &[ClientReport]) -> Merged {
    let buckets = reports.iter().map(|r| r.buckets.len()).max().unwrap_or(0);
    let mut merged = Merged {
        buckets: vec![BTreeMap::new(); buckets],
        failures_per_bucket: vec![0; buckets],
        ..Merged::default()
    };
    for report in reports {
        for (total, counts) in merged.buckets.iter_mut().zip(&report.buckets) {
            for (pod, n) in counts {
                *total.entry(pod.clone()).or_insert(0) += n;
            }
        }
        for (total, n) in merged
            .failures_per_bucket
            .iter_mut()
            .zip(&report.failures_per_bucket)
        {
            *total += n;
        }
        merged
            .latencies_us
            .extend(report.latencies_us.iter().flatten());
        merged.ok += report.ok;
        merged.failures += report.failures;
        merged.missed += report.missed;
        for error in &report.errors {
            if merged.errors.len() < ERRORS_KEPT && !merged.errors.contains(error) {
                merged.errors.push(error.clone());
            }
        }
    }
    merged.latencies_us.sort_unstable();
    merged
}

/// Which pods are in service (receive new work) over a run: each change at
/// its offset in ms from the start of the measurement.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Membership {
    pub changes: Vec<MembershipChange>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MembershipChange {
    pub at_ms: u64,
    pub pods: Vec<String>,
}

impl Membership {
    pub fn starting_with(pods: Vec<String>) -> Membership {
        Membership {
            changes: vec![MembershipChange { at_ms: 0, pods }],
        }
    }

    pub fn change(&mut self, at_ms: u64, pods: Vec<String>) {
        self.changes.push(MembershipChange { at_ms, pods });
    }

    /// The pods in service at `t_ms` (the last change at or before it).
    pub fn at(&self, t_ms: u64) -> &[String] {
        self.changes
            .iter()
            .rev()
            .find(|c| c.at_ms <= t_ms)
            .map_or(&[], |c| c.pods.as_slice())
    }

    /// Every pod that was ever in service, in order of first appearance.
    pub fn all_pods(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut pods = Vec::new();
        for pod in self.changes.iter().flat_map(|c| &c.pods) {
            if seen.insert(pod.clone()) {
                pods.push(pod.clone());
            }
        }
        pods
    }
}

/// The busiest pod against the average: 1.0 is perfectly even. `None` when
/// nothing was counted.
pub fn max_over_mean(counts: &[u64]) -> Option<f64> {
    let max = *counts.iter().max()?;
    let sum: u64 = counts.iter().sum();
    if sum == 0 {
        return None;
    }
    Some(max as f64 * counts.len() as f64 / sum as f64)
}

/// max/mean of each bucket over the pods in service at the bucket's middle
/// (a pod in service that got nothing counts 0: that is the imbalance).
pub fn max_over_mean_per_bucket(
    buckets: &[BTreeMap<String, u64>],
    membership: &Membership,
    bucket_ms: u64,
) -> Vec<Option<f64>> {
    buckets
        .iter()
        .enumerate()
        .map(|(i, counts)| {
            let middle = i as u64 * bucket_ms + bucket_ms / 2;
            let in_service: Vec<u64> = membership
                .at(middle)
                .iter()
                .map(|pod| counts.get(pod).copied().unwrap_or(0))
                .collect();
            max_over_mean(&in_service)
        })
        .collect()
}

/// Calls per second of each pod in each bucket.
pub fn rps_series(
    buckets: &[BTreeMap<String, u64>],
    pods: &[String],
    bucket_ms: u64,
) -> BTreeMap<String, Vec<f64>> {
    pods.iter()
        .map(|pod| {
            let series = buckets
                .iter()
                .map(|counts| {
                    counts.get(pod).copied().unwrap_or(0) as f64 * 1000.0 / bucket_ms as f64
                })
                .collect();
            (pod.clone(), series)
        })
        .collect()
}

/// Answered calls per pod over the whole run.
pub fn totals(buckets: &[BTreeMap<String, u64>]) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for counts in buckets {
        for (pod, n) in counts {
            *totals.entry(pod.clone()).or_insert(0) += n;
        }
    }
    totals
}

/// Nearest-rank percentile `q` (0..=1) of ascending `sorted`.
pub fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// How long after `event_ms` the spread got to `threshold` or better and
/// stayed there: the start of the first bucket at or after the event from
/// which every bucket is at most `threshold`, less `event_ms`. `None` if
/// that never happened before the run ended.
pub fn convergence_ms(
    per_bucket: &[Option<f64>],
    bucket_ms: u64,
    event_ms: u64,
    threshold: f64,
) -> Option<u64> {
    let first_after_event = event_ms.div_ceil(bucket_ms) as usize;
    if first_after_event >= per_bucket.len() {
        return None;
    }
    let mut converged_from = None;
    for (i, spread) in per_bucket.iter().enumerate().skip(first_after_event) {
        match spread {
            Some(v) if *v <= threshold => {
                converged_from.get_or_insert(i);
            }
            _ => converged_from = None,
        }
    }
    converged_from.map(|i| i as u64 * bucket_ms - event_ms)
}

/// The largest of the known values.
pub fn worst(values: &[Option<f64>]) -> Option<f64> {
    values.iter().flatten().copied().reduce(f64::max)
}

/// max/mean over the last `count` buckets taken together.
pub fn max_over_mean_of_last(
    buckets: &[BTreeMap<String, u64>],
    membership: &Membership,
    bucket_ms: u64,
    count: usize,
) -> Option<f64> {
    let start = buckets.len().saturating_sub(count);
    let end_ms = buckets.len() as u64 * bucket_ms;
    let pods = membership.at(end_ms.saturating_sub(1));
    let totals = totals(&buckets[start..]);
    let counts: Vec<u64> = pods
        .iter()
        .map(|p| totals.get(p).copied().unwrap_or(0))
        .collect();
    max_over_mean(&counts)
}

/// `utime + stime` (clock ticks) and the parent pid from a
/// `/proc/<pid>/stat` line. The command name may hold spaces and
/// parentheses, so fields are counted after the last `)`.
pub fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        ppid,
        cpu_ticks: utime + stime,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: i32,
    pub cpu_ticks: u64,
}

/// CPU time between two samples of the same processes as a percentage of
/// one core over `seconds`. A process missing from either sample (it
/// started or exited in between) is left out.
pub fn cpu_percent(
    before: &BTreeMap<i32, u64>,
    after: &BTreeMap<i32, u64>,
    ticks_per_second: u64,
    seconds: f64,
) -> f64 {
    let ticks: u64 = after
        .iter()
        .filter_map(|(pid, end)| before.get(pid).map(|start| end.saturating_sub(*start)))
        .sum();
    if seconds <= 0.0 || ticks_per_second == 0 {
        return 0.0;
    }
    ticks as f64 / ticks_per_second as f64 / seconds * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bucket(counts: &[(&str, u64)]) -> BTreeMap<String, u64> {
        counts.iter().map(|(p, n)| (p.to_string(), *n)).collect()
    }

    fn pods(names: &[&str]) -> Vec<String> {
        names.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn parses_what_the_go_client_prints() {
        let report = ClientReport::parse(
            r#"{"buckets":[{"s1":3},{"s1":1,"s2":2}],"failures_per_bucket":[0,1],"latencies_us":[900,1100],"ok":6,"failures":1,"errors":["deadline"],"missed":0}"#,
        )
        .unwrap();
        assert_eq!(report.buckets[1]["s2"], 2);
        assert_eq!(report.latencies_us, Some(vec![900, 1100]));
        // Go encodes an empty slice that was never appended to as null.
        let empty = ClientReport::parse(
            r#"{"buckets":[{}],"failures_per_bucket":[0],"latencies_us":null,"ok":0,"failures":0,"errors":[],"missed":0}"#,
        )
        .unwrap();
        assert_eq!(empty.latencies_us, None);
        assert!(ClientReport::parse("not json").is_err());
    }

    #[test]
    fn merge_adds_buckets_failures_and_sorts_latencies() {
        let a = ClientReport {
            buckets: vec![bucket(&[("s1", 2)]), bucket(&[("s2", 1)])],
            failures_per_bucket: vec![0, 1],
            latencies_us: Some(vec![30, 10]),
            ok: 3,
            failures: 1,
            errors: vec!["boom".into()],
            missed: 0,
        };
        let b = ClientReport {
            buckets: vec![bucket(&[("s1", 1), ("s2", 4)])],
            failures_per_bucket: vec![2],
            latencies_us: Some(vec![20]),
            ok: 5,
            failures: 2,
            errors: vec!["boom".into(), "other".into()],
            missed: 1,
        };
        let merged = merge(&[a, b]);
        assert_eq!(merged.buckets[0], bucket(&[("s1", 3), ("s2", 4)]));
        assert_eq!(merged.buckets[1], bucket(&[("s2", 1)]));
        assert_eq!(merged.failures_per_bucket, vec![2, 1]);
        assert_eq!(merged.latencies_us, vec![10, 20, 30]);
        assert_eq!((merged.ok, merged.failures, merged.missed), (8, 3, 1));
        assert_eq!(merged.errors, vec!["boom", "other"]);
    }

    #[test]
    fn max_over_mean_of_even_uneven_and_empty_counts() {
        assert_eq!(max_over_mean(&[5, 5, 5]), Some(1.0));
        assert!((max_over_mean(&[9, 6, 0]).unwrap() - 1.8).abs() < 1e-9);
        assert_eq!(max_over_mean(&[]), None);
        assert_eq!(max_over_mean(&[0, 0]), None);
    }

    #[test]
    fn membership_answers_with_the_last_change() {
        let mut membership = Membership::starting_with(pods(&["a", "b"]));
        membership.change(1000, pods(&["a", "b", "c"]));
        membership.change(2000, pods(&["b", "c"]));
        assert_eq!(membership.at(0), pods(&["a", "b"]));
        assert_eq!(membership.at(999), pods(&["a", "b"]));
        assert_eq!(membership.at(1000), pods(&["a", "b", "c"]));
        assert_eq!(membership.at(5000), pods(&["b", "c"]));
        assert_eq!(membership.all_pods(), pods(&["a", "b", "c"]));
    }

    #[test]
    fn a_new_pod_without_traffic_counts_as_imbalance() {
        let mut membership = Membership::starting_with(pods(&["a", "b"]));
        membership.change(1000, pods(&["a", "b", "c", "d"]));
        let buckets = vec![
            bucket(&[("a", 10), ("b", 10)]),
            bucket(&[("a", 10), ("b", 10)]),
            bucket(&[("a", 10), ("b", 10)]),
            bucket(&[("a", 5), ("b", 5), ("c", 5), ("d", 5)]),
        ];
        let spread = max_over_mean_per_bucket(&buckets, &membership, 500);
        assert_eq!(spread, vec![Some(1.0), Some(1.0), Some(2.0), Some(1.0)]);
    }

    #[test]
    fn convergence_is_measured_from_the_event_and_must_last() {
        let s = |v: f64| Some(v);
        // Event at 1000 ms (bucket 2); converged for good from bucket 5.
        let series = [s(1.0), s(1.0), s(2.0), s(1.1), s(1.5), s(1.2), s(1.0)];
        assert_eq!(convergence_ms(&series, 500, 1000, 1.2), Some(1500));
        // Already even in the first bucket after the event.
        assert_eq!(convergence_ms(&[s(2.0), s(1.0)], 500, 500, 1.2), Some(0));
        // An event inside a bucket counts from the next bucket.
        assert_eq!(convergence_ms(&[s(2.0), s(1.0)], 500, 250, 1.2), Some(250));
        // Never converged, or no data at the end.
        assert_eq!(convergence_ms(&[s(2.0), s(2.0)], 500, 500, 1.2), None);
        assert_eq!(convergence_ms(&[s(1.0), None], 500, 0, 1.2), None);
        assert_eq!(convergence_ms(&[s(1.0)], 500, 500, 1.2), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 0.5), Some(50));
        assert_eq!(percentile(&sorted, 0.99), Some(99));
        assert_eq!(percentile(&sorted, 1.0), Some(100));
        assert_eq!(percentile(&sorted, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn rps_series_and_totals() {
        let buckets = vec![bucket(&[("a", 5)]), bucket(&[("a", 2), ("b", 3)])];
        let series = rps_series(&buckets, &pods(&["a", "b"]), 500);
        assert_eq!(series["a"], vec![10.0, 4.0]);
        assert_eq!(series["b"], vec![0.0, 6.0]);
        assert_eq!(totals(&buckets), bucket(&[("a", 7), ("b", 3)]));
    }

    #[test]
    fn last_buckets_are_judged_against_the_final_membership() {
        let mut membership = Membership::starting_with(pods(&["a", "b"]));
        membership.change(500, pods(&["b", "c"]));
        let buckets = vec![
            bucket(&[("a", 100)]),
            bucket(&[("b", 3), ("c", 1)]),
            bucket(&[("b", 3), ("c", 1)]),
        ];
        assert_eq!(
            max_over_mean_of_last(&buckets, &membership, 500, 2),
            Some(1.5)
        );
        assert_eq!(worst(&[None, Some(1.5), Some(3.0)]), Some(3.0));
        assert_eq!(worst(&[None]), None);
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 35 0 0 20 0 3 0 1000 0 0";
        assert_eq!(
            parse_proc_stat(stat),
            Some(ProcStat {
                ppid: 17,
                cpu_ticks: 285
            })
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn cpu_percent_counts_processes_seen_twice() {
        let before = BTreeMap::from([(1, 100), (2, 50)]);
        let after = BTreeMap::from([(1, 300), (3, 1000)]);
        // pid 1: 200 ticks = 2 s of CPU over 4 s = 50 %.
        assert!((cpu_percent(&before, &after, 100, 4.0) - 50.0).abs() < 1e-9);
        assert_eq!(cpu_percent(&before, &after, 100, 0.0), 0.0);
    }

    proptest! {
        #[test]
        fn max_over_mean_is_at_least_one_and_at_most_the_pod_count(
            counts in proptest::collection::vec(0u64..10_000, 1..20)
        ) {
            if let Some(spread) = max_over_mean(&counts) {
                prop_assert!(spread >= 1.0 - 1e-9);
                prop_assert!(spread <= counts.len() as f64 + 1e-9);
            } else {
                prop_assert!(counts.iter().all(|c| *c == 0));
            }
        }

        #[test]
        fn merging_keeps_every_call(
            reports in proptest::collection::vec(
                proptest::collection::vec((0u64..50, 0u64..5), 0..6), 0..5)
        ) {
            let reports: Vec<ClientReport> = reports
                .iter()
                .map(|buckets| ClientReport {
                    buckets: buckets.iter().map(|(n, _)| bucket(&[("p", *n)])).collect(),
                    failures_per_bucket: buckets.iter().map(|(_, f)| *f).collect(),
                    ..ClientReport::default()
                })
                .collect();
            let merged = merge(&reports);
            let calls: u64 = reports.iter().flat_map(|r| &r.buckets).flat_map(|b| b.values()).sum();
            let failures: u64 = reports.iter().flat_map(|r| &r.failures_per_bucket).sum();
            prop_assert_eq!(totals(&merged.buckets).values().sum::<u64>(), calls);
            prop_assert_eq!(merged.failures_per_bucket.iter().sum::<u64>(), failures);
        }

        #[test]
        fn convergence_when_found_is_a_lasting_state(
            series in proptest::collection::vec(proptest::option::of(1.0f64..3.0), 0..30),
            event_bucket in 0u64..30,
        ) {
            let event_ms = event_bucket * 500;
            if let Some(after) = convergence_ms(&series, 500, event_ms, 1.2) {
                let from = ((event_ms + after) / 500) as usize;
                prop_assert!(series[from..].iter().all(|v| v.is_some_and(|v| v <= 1.2)));
                if from > event_bucket as usize {
                    prop_assert!(!series[from - 1].is_some_and(|v| v <= 1.2));
                }
            }
        }
    }
}
