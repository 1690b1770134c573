//! The data plane's side of the load exchange (docs/exchange.md), pure:
//! what this node reports about its own pods ([`local_loads`]), and which
//! `BACKEND_VIEW` writes make the connect hook use the Service-wide loads
//! the exchange learned ([`view_changes`]). The [`owner`](super::owner)
//! reads and writes the maps.

use std::collections::BTreeMap;
use std::time::Duration;

use grpclb_common::{local_backend, Backend, BackendView};

use super::snapshot::Snapshot;
use crate::exchange::model::{LocalLoads, PlacementLoads, PodLoad};

/// How long a written view steers the connect hook: an agent that dies
/// (or stops hearing its peers) stops steering within this time, and the
/// hook falls back to this node's own counts.
pub const VIEW_TTL: Duration = Duration::from_secs(60);
/// An unchanged view is written again once it has less than this left,
/// so a live agent's views never expire.
pub const VIEW_REFRESH_BEFORE: Duration = Duration::from_secs(30);

/// The loads of this node's pods: every local backend (with its
/// `LOCAL_BACKENDS` flag in `local`) that has a `LOCAL_LOAD` count in
/// `counts`, with the calls per second of its tracked connections in
/// `snapshot` where its frames are tracked. A backend without a count
/// (`LOCAL_LOAD` full) is left out: unknown, not idle.
pub fn local_loads(
    local: &BTreeMap<Backend, u32>,
    counts: &[(Backend, u64)],
    snapshot: Option<&Snapshot>,
) -> LocalLoads {
    let mut calls: BTreeMap<Backend, f64> = BTreeMap::new();
    if let Some(snapshot) = snapshot {
        for (cookie, connection) in &snapshot.tracked {
            if let Some(rate) = snapshot.rates.get(cookie) {
                *calls.entry(connection.backend).or_insert(0.0) += rate.rps;
            }
        }
    }
    counts
        .iter()
        .filter_map(|(backend, count)| {
            let flags = local.get(backend)?;
            let tracked = flags & local_backend::TRACK_FRAMES != 0;
            Some((
                *backend,
                PodLoad {
                    connections: u32::try_from(*count).unwrap_or(u32::MAX),
                    calls_per_second: tracked
                        .then(|| calls.get(backend).copied().unwrap_or(0.0) as f32),
                },
            ))
        })
        .collect()
}

/// Where a written view's baseline comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// This node's `BACKEND_LOAD` count now: a new load, measured after
    /// (or while) this node's earlier connections were counted in it.
    Now,
    /// The one written with the same load before (a refresh): the
    /// connections this node opened since still count on top of it.
    Keep(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewChange {
    Write {
        backend: Backend,
        load: u32,
        baseline: Baseline,
    },
    Remove(Backend),
}

/// The `BACKEND_VIEW` writes that make `written` (what the map holds)
/// follow `placement` at `now_ns`: a new or changed load is written with
/// a new baseline, an unchanged one only when it expires within
/// [`VIEW_REFRESH_BEFORE`], and a backend no longer placed is removed.
pub fn view_changes(
    written: &BTreeMap<Backend, BackendView>,
    placement: &PlacementLoads,
    now_ns: u64,
) -> Vec<ViewChange> {
    let refresh_by = now_ns.saturating_add(VIEW_REFRESH_BEFORE.as_nanos() as u64);
    let mut changes: Vec<ViewChange> = written
        .keys()
        .filter(|b| !placement.contains_key(b))
        .map(|b| ViewChange::Remove(*b))
        .collect();
    for (backend, load) in placement {
        let baseline = match written.get(backend) {
            Some(view) if view.load == *load && view.expires_ns > refresh_by => continue,
            Some(view) if view.load == *load => Baseline::Keep(view.baseline),
            _ => Baseline::Now,
        };
        changes.push(ViewChange::Write {
            backend: *backend,
            load: *load,
            baseline,
        });
    }
    changes
}

/// When [`view_changes`] next has a refresh to make for `written` (`None`:
/// nothing written).
pub fn next_refresh_ns(written: &BTreeMap<Backend, BackendView>) -> Option<u64> {
    written
        .values()
        .map(|v| {
            v.expires_ns
                .saturating_sub(VIEW_REFRESH_BEFORE.as_nanos() as u64)
        })
        .min()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which
/// the connect hook compares `BackendView::expires_ns` with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `ts`; CLOCK_MONOTONIC is always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpclb_common::Addr;
    use proptest::prelude::*;

    fn pod(n: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 244, 0, n]), 8080)
    }

    const S: u64 = 1_000_000_000;

    fn view(load: u32, baseline: u32, expires_ns: u64) -> BackendView {
        BackendView {
            load,
            baseline,
            expires_ns,
        }
    }

    #[test]
    fn new_and_changed_loads_get_a_new_baseline_removed_ones_go() {
        let written = BTreeMap::from([
            (pod(1), view(5, 2, 100 * S)),
            (pod(2), view(7, 3, 100 * S)),
            (pod(3), view(1, 0, 100 * S)),
        ]);
        let placement = PlacementLoads::from([(pod(1), 5), (pod(2), 8), (pod(4), 0)]);
        let changes = view_changes(&written, &placement, 10 * S);
        assert_eq!(
            changes,
            vec![
                ViewChange::Remove(pod(3)),
                ViewChange::Write {
                    backend: pod(2),
                    load: 8,
                    baseline: Baseline::Now
                },
                ViewChange::Write {
                    backend: pod(4),
                    load: 0,
                    baseline: Baseline::Now
                },
            ],
            "pod 1 unchanged and far from expiry: untouched"
        );
    }

    #[test]
    fn an_unchanged_load_is_refreshed_before_it_expires_keeping_its_baseline() {
        let written = BTreeMap::from([(pod(1), view(5, 2, 60 * S))]);
        let placement = PlacementLoads::from([(pod(1), 5)]);
        assert!(view_changes(&written, &placement, 29 * S).is_empty());
        assert_eq!(next_refresh_ns(&written), Some(30 * S));
        assert_eq!(
            view_changes(&written, &placement, 30 * S),
            vec![ViewChange::Write {
                backend: pod(1),
                load: 5,
                baseline: Baseline::Keep(2)
            }]
        );
        assert_eq!(next_refresh_ns(&BTreeMap::new()), None);
    }

    #[test]
    fn local_loads_count_every_local_backend_and_calls_where_tracked() {
        let local = BTreeMap::from([
            (pod(1), local_backend::TRACK_FRAMES),
            (pod(2), local_backend::COUNT),
            (pod(3), local_backend::COUNT),
        ]);
        let counts = [(pod(1), 2), (pod(2), 4), (pod(9), 1)];
        let mut snapshot = Snapshot::default();
        for (cookie, rps) in [(10u64, 3.0), (11, 4.5)] {
            snapshot
                .tracked
                .push((cookie, crate::testing::answered(pod(1), 0)));
            snapshot.rates.insert(
                cookie,
                crate::dataplane::snapshot::Rate {
                    responses: 0,
                    rps,
                    first_seen_ms: 0,
                },
            );
        }
        let loads = local_loads(&local, &counts, Some(&snapshot));
        assert_eq!(
            loads,
            LocalLoads::from([
                (
                    pod(1),
                    PodLoad {
                        connections: 2,
                        calls_per_second: Some(7.5)
                    }
                ),
                (
                    pod(2),
                    PodLoad {
                        connections: 4,
                        calls_per_second: None
                    }
                ),
            ]),
            "pod 3 has no count (unknown), pod 9 is not local any more"
        );
        let no_snapshot = local_loads(&local, &counts, None);
        assert_eq!(no_snapshot[&pod(1)].calls_per_second, Some(0.0));
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        assert!(monotonic_ns() >= a);
        assert!(a > 0);
    }

    proptest! {
        /// Applying the changes (as the owner does) leaves the map holding
        /// exactly the placement, each view fresh for at least the refresh
        /// margin, with the baseline of an unchanged load kept.
        #[test]
        fn applied_changes_make_the_map_follow_the_placement(
            written in proptest::collection::btree_map(0u8..16, (0u32..5, 0u32..5, 0u64..200), 0..16),
            placement in proptest::collection::btree_map(0u8..16, 0u32..5, 0..16),
            now_s in 0u64..100,
            count_now in 0u32..10,
        ) {
            let now = now_s * S;
            let mut map: BTreeMap<Backend, BackendView> = written
                .iter()
                .map(|(n, (l, b, e))| (pod(*n), view(*l, *b, e * S)))
                .collect();
            let before = map.clone();
            let placement: PlacementLoads = placement.iter().map(|(n, l)| (pod(*n), *l)).collect();
            for change in view_changes(&map, &placement, now) {
                match change {
                    ViewChange::Remove(b) => { map.remove(&b); }
                    ViewChange::Write { backend, load, baseline } => {
                        let baseline = match baseline { Baseline::Now => count_now, Baseline::Keep(b) => b };
                        map.insert(backend, view(load, baseline, now + VIEW_TTL.as_nanos() as u64));
                    }
                }
            }
            prop_assert_eq!(map.len(), placement.len());
            for (backend, load) in &placement {
                let v = map[backend];
                prop_assert_eq!(v.load, *load);
                prop_assert!(v.expires_ns > now + VIEW_REFRESH_BEFORE.as_nanos() as u64 - 1);
                if let Some(old) = before.get(backend).filter(|o| o.load == *load) {
                    prop_assert_eq!(v.baseline, old.baseline);
                }
            }
        }
    }
}
