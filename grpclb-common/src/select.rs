//! Backend selection: least effective load.
//!
//! A backend's effective load ([`effective_load`]) is this node's live
//! connections to it, unless the agent wrote a fresh Service-wide view of
//! it (`BACKEND_VIEW`): then the pod's load from every node, plus what this
//! node opened to it since the view was written.
//!
//! The eBPF connect hooks call [`select_backend`]'s pieces and
//! [`effective_load`] directly with closures over their maps, so the policy
//! tested here is the policy that runs.

use crate::BackendView;

/// The load a connect hook compares for one backend: `local` is this
/// node's `BACKEND_LOAD` count, `view` its `BACKEND_VIEW` entry
/// ([`BackendView::ABSENT`] when there is none), `now_ns` the monotonic
/// clock.
///
/// - fresh view: `load + max(0, local - baseline)`: the Service-wide load
///   the agent learned, plus the connections this node placed since, so a
///   burst from one node spreads before the next view arrives instead of
///   piling onto the pod that looked emptiest. Connections this node
///   closed since do not lower it: the next view shows them. Never below
///   `local`: this node's own connections are part of the pod's load, and
///   the load may be older than the baseline (it is a snapshot of what the
///   pod had accepted, taken before the view was written; connections
///   placed in between, or still in their handshake, are in neither).
/// - expired or absent view: `local`, the node's own count alone.
#[inline(always)]
pub fn effective_load(local: u64, view: &BackendView, now_ns: u64) -> u64 {
    if view.is_fresh(now_ns) {
        let since = local.saturating_sub(u64::from(view.baseline));
        u64::from(view.load).saturating_add(since).max(local)
    } else {
        local
    }
}

/// Sets up to this size are scanned in full; larger sets use
/// power-of-two-choices, which keeps the work per `connect()` constant.
pub const FULL_SCAN_MAX: u32 = 16;

/// Picks an index in `0..count`, or `None` when `count` is 0.
///
/// `load(i)` is the effective load of backend `i` (the hooks pass
/// [`effective_load`]); `random()` is a uniform 32-bit random number.
///
/// - `count <= FULL_SCAN_MAX`: the least-loaded backend; among equally loaded
///   ones, each is picked with equal probability (reservoir sampling), so
///   ties do not always favour the first backend.
/// - larger sets: two distinct random backends, the less loaded one wins
///   (ties at random).
///
/// The eBPF hooks run exactly these pieces: [`two_choices`] directly, and
/// the full scan as one [`LeastLoaded::consider`] per `bpf_loop` iteration
/// (an unrolled scan is too many paths for the verifier).
#[inline(always)]
pub fn select_backend<L, R>(count: u32, mut load: L, mut random: R) -> Option<u32>
where
    L: FnMut(u32) -> u64,
    R: FnMut() -> u32,
{
    if count == 0 {
        return None;
    }
    if count > FULL_SCAN_MAX {
        return Some(two_choices(count, &mut load, &mut random));
    }
    let mut scan = LeastLoaded::new();
    let mut i = 0;
    // Loop bound is the constant so the verifier sees a bounded loop.
    while i < FULL_SCAN_MAX && i < count {
        scan.consider(i, load(i), &mut random);
        i += 1;
    }
    scan.chosen()
}

/// A scan for the least-loaded backend, one backend at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeastLoaded {
    best: u32,
    best_load: u64,
    /// Backends seen with `best_load`; 0 before the first.
    ties: u32,
}

impl Default for LeastLoaded {
    fn default() -> Self {
        Self::new()
    }
}

impl LeastLoaded {
    pub const fn new() -> Self {
        LeastLoaded {
            best: 0,
            best_load: u64::MAX,
            ties: 0,
        }
    }

    /// Takes backend `index` with `load` into account: a lower load wins; an
    /// equal load replaces the current pick with probability 1/ties.
    #[inline(always)]
    pub fn consider<R: FnMut() -> u32>(&mut self, index: u32, load: u64, random: &mut R) {
        if self.ties == 0 || load < self.best_load {
            self.best = index;
            self.best_load = load;
            self.ties = 1;
        } else if load == self.best_load {
            self.ties += 1;
            if remainder(random(), self.ties) == 0 {
                self.best = index;
            }
        }
    }

    /// The pick so far; `None` before any backend was considered.
    #[inline(always)]
    pub fn chosen(&self) -> Option<u32> {
        if self.ties == 0 {
            None
        } else {
            Some(self.best)
        }
    }
}

/// Power-of-two-choices over `0..count`, for `count >= 2`.
#[inline(always)]
pub fn two_choices<L, R>(count: u32, load: &mut L, random: &mut R) -> u32
where
    L: FnMut(u32) -> u64,
    R: FnMut() -> u32,
{
    let a = remainder(random(), count);
    let mut b = remainder(random(), count - 1);
    if b >= a {
        b += 1;
    }
    let (la, lb) = (load(a), load(b));
    if la < lb || (la == lb && random() & 1 == 0) {
        a
    } else {
        b
    }
}

/// `value % divisor` for a divisor the callers keep non-zero, without the
/// division-by-zero panic path, which the eBPF verifier rejects (a panic
/// compiles to a call that never returns).
#[inline(always)]
fn remainder(value: u32, divisor: u32) -> u32 {
    value.checked_rem(divisor).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// xorshift32: deterministic "random" numbers for tests.
    fn rng(seed: u32) -> impl FnMut() -> u32 {
        let mut s = seed.max(1);
        move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        }
    }

    #[test]
    fn empty_set_selects_nothing() {
        assert_eq!(select_backend(0, |_| 0, rng(1)), None);
    }

    #[test]
    fn picks_the_least_loaded() {
        let loads = [5u64, 3, 9, 1, 4];
        assert_eq!(select_backend(5, |i| loads[i as usize], rng(7)), Some(3));
    }

    #[test]
    fn twelve_connects_over_three_backends_spread_four_each() {
        let mut loads = vec![0u64; 3];
        let mut r = rng(42);
        for _ in 0..12 {
            let i = select_backend(3, |i| loads[i as usize], &mut r).unwrap();
            loads[i as usize] += 1;
        }
        assert_eq!(loads, vec![4, 4, 4]);
    }

    #[test]
    fn ties_are_broken_evenly() {
        let mut hits = [0u32; 4];
        let mut r = rng(3);
        for _ in 0..40_000 {
            hits[select_backend(4, |_| 0, &mut r).unwrap() as usize] += 1;
        }
        for h in hits {
            assert!((9_000..11_000).contains(&h), "uneven tie-break: {hits:?}");
        }
    }

    #[test]
    fn a_new_backend_is_preferred_until_counts_even_out() {
        let mut loads = [4u64, 4, 4, 0];
        let mut r = rng(9);
        for _ in 0..4 {
            let i = select_backend(4, |i| loads[i as usize], &mut r).unwrap();
            assert_eq!(i, 3);
            loads[i as usize] += 1;
        }
    }

    #[test]
    fn a_scan_that_considered_nothing_chooses_nothing() {
        let scan = LeastLoaded::new();
        assert_eq!(scan.chosen(), None);
        let mut scan = LeastLoaded::new();
        scan.consider(0, u64::MAX, &mut rng(1));
        assert_eq!(
            scan.chosen(),
            Some(0),
            "even a fully loaded backend beats none"
        );
    }

    #[test]
    fn large_sets_do_bounded_work() {
        let mut lookups = 0;
        let i = select_backend(
            10_000,
            |_| {
                lookups += 1;
                0
            },
            rng(5),
        );
        assert!(i.unwrap() < 10_000);
        assert_eq!(lookups, 2);
    }

    fn view(load: u32, baseline: u32, expires_ns: u64) -> BackendView {
        BackendView {
            load,
            baseline,
            expires_ns,
        }
    }

    #[test]
    fn a_fresh_view_adds_what_this_node_opened_since() {
        let v = view(10, 3, 1_000);
        assert_eq!(effective_load(3, &v, 999), 10, "nothing opened since");
        assert_eq!(effective_load(5, &v, 999), 12);
        assert_eq!(
            effective_load(1, &v, 999),
            10,
            "closed since: not below the view"
        );
    }

    #[test]
    fn a_view_older_than_this_nodes_connections_never_counts_below_them() {
        // Measured when the pod had accepted 2 connections, written when
        // this node had placed 4 (2 of them still in their handshake, or
        // placed between the snapshot and the write).
        let v = view(2, 4, 1_000);
        assert_eq!(effective_load(4, &v, 999), 4);
        assert_eq!(effective_load(5, &v, 999), 5);
    }

    #[test]
    fn an_expired_or_absent_view_leaves_the_local_count() {
        let v = view(10, 3, 1_000);
        assert_eq!(effective_load(5, &v, 1_000), 5, "expired at its deadline");
        assert_eq!(effective_load(5, &BackendView::ABSENT, 0), 5);
        assert_eq!(
            effective_load(u64::MAX, &BackendView::ABSENT, 7),
            u64::MAX,
            "an unwritten position stays last"
        );
    }

    #[test]
    fn a_loaded_pod_in_the_view_loses_to_an_idle_one() {
        // Pod 0 holds 30 connections from other nodes, pod 1 none; this
        // node has opened none to either: the hook picks pod 1 until this
        // node's own connections make up the difference.
        let views = [view(30, 0, 100), view(0, 0, 100)];
        let mut local = [0u64; 2];
        let mut r = rng(11);
        for _ in 0..30 {
            let i = select_backend(
                2,
                |i| effective_load(local[i as usize], &views[i as usize], 50),
                &mut r,
            )
            .unwrap();
            assert_eq!(i, 1);
            local[i as usize] += 1;
        }
        assert_eq!(local, [0, 30]);
    }

    proptest! {
        #[test]
        fn effective_load_is_the_local_count_or_at_least_the_view_plus_the_rise(
            local: u64, load: u32, baseline: u32, expires_ns: u64, now_ns: u64
        ) {
            let v = view(load, baseline, expires_ns);
            let got = effective_load(local, &v, now_ns);
            if now_ns >= expires_ns {
                prop_assert_eq!(got, local);
            } else {
                let rise = (i128::from(local) - i128::from(baseline)).max(0);
                let want = (i128::from(load) + rise)
                    .min(i128::from(u64::MAX))
                    .max(i128::from(local));
                prop_assert_eq!(i128::from(got), want);
            }
        }

        #[test]
        fn effective_load_never_falls_as_this_node_opens_more(
            local in 0u64..1_000_000, more in 0u64..1_000, load: u32, baseline in 0u32..1_000_000,
            expires_ns: u64, now_ns: u64
        ) {
            let v = view(load, baseline, expires_ns);
            prop_assert!(effective_load(local + more, &v, now_ns) >= effective_load(local, &v, now_ns));
        }

        #[test]
        fn full_scan_returns_a_minimum(loads in proptest::collection::vec(0u64..8, 1..=16), seed: u32) {
            let i = select_backend(loads.len() as u32, |i| loads[i as usize], rng(seed)).unwrap();
            prop_assert_eq!(loads[i as usize], *loads.iter().min().unwrap());
        }

        #[test]
        fn two_choices_beats_or_ties_one_of_two_distinct_samples(
            loads in proptest::collection::vec(0u64..100, 17..200), seed: u32
        ) {
            let mut sampled = Vec::new();
            let i = select_backend(loads.len() as u32, |i| { sampled.push(i); loads[i as usize] }, rng(seed)).unwrap();
            prop_assert_eq!(sampled.len(), 2);
            prop_assert_ne!(sampled[0], sampled[1]);
            prop_assert!(sampled.contains(&i));
            prop_assert_eq!(loads[i as usize], loads[sampled[0] as usize].min(loads[sampled[1] as usize]));
        }

        #[test]
        fn spreads_evenly_from_empty(count in 1u32..=16, rounds in 1u32..6, seed: u32) {
            let mut loads = vec![0u64; count as usize];
            let mut r = rng(seed);
            for _ in 0..count * rounds {
                let i = select_backend(count, |i| loads[i as usize], &mut r).unwrap();
                loads[i as usize] += 1;
            }
            prop_assert!(loads.iter().all(|&l| l == rounds as u64));
        }
    }
}
