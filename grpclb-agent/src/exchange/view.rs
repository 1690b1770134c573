//! Versioned views: what a node serves (its subtree and its cluster view)
//! with the changes since any recent version, and what it learned from
//! each peer.
//!
//! Every answer carries the server's version; the next request sends it
//! back (`?since=`) and gets only the entries changed or removed after it,
//! so a quiet cluster costs a few bytes per request whatever its size.

use std::collections::BTreeMap;

use grpclb_common::Backend;

use crate::exchange::model::{Entries, Entry};

/// Removals remembered for deltas, at least: older `since`s get a full
/// answer (as do unknown ones).
const MIN_TOMBSTONES: usize = 4096;

/// A view served with deltas.
#[derive(Clone, Debug)]
pub struct Versioned {
    version: u64,
    /// Each entry with the version that last changed it.
    entries: BTreeMap<Backend, (Entry, u64)>,
    /// Removed backends with the version that removed them.
    removed: BTreeMap<Backend, u64>,
    /// A delta since a version below this would miss forgotten removals.
    floor: u64,
}

/// What changed since the version a peer has, or everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub version: u64,
    /// The peer is to drop what it had from this server first.
    pub full: bool,
    pub changed: Vec<(Backend, Entry)>,
    pub removed: Vec<Backend>,
}

impl Versioned {
    /// Starts at `start`: the shell passes the wall clock in microseconds,
    /// so a restarted server's versions are above any it served before and
    /// a peer's `since` from the previous run gets a full answer.
    pub fn new(start: u64) -> Versioned {
        Versioned {
            version: start,
            entries: BTreeMap::new(),
            removed: BTreeMap::new(),
            floor: start,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&Backend, &Entry)> {
        self.entries.iter().map(|(b, (e, _))| (b, e))
    }

    /// Makes the view `next`; one new version when anything changed.
    pub fn replace(&mut self, next: &Entries) -> bool {
        let version = self.version + 1;
        let mut changed = false;
        let gone: Vec<Backend> = self
            .entries
            .keys()
            .filter(|b| !next.contains_key(b))
            .copied()
            .collect();
        for backend in gone {
            self.entries.remove(&backend);
            self.removed.insert(backend, version);
            changed = true;
        }
        for (backend, entry) in next {
            match self.entries.get_mut(backend) {
                Some((current, _)) if current == entry => {}
                Some(slot) => {
                    *slot = (entry.clone(), version);
                    changed = true;
                }
                None => {
                    self.entries.insert(*backend, (entry.clone(), version));
                    self.removed.remove(backend);
                    changed = true;
                }
            }
        }
        if changed {
            self.version = version;
            self.forget_old_removals();
        }
        changed
    }

    /// Sets (`Some`) or removes (`None`) the given backends; one new
    /// version when anything changed.
    pub fn update(&mut self, changes: Vec<(Backend, Option<Entry>)>) -> bool {
        let version = self.version + 1;
        let mut changed = false;
        for (backend, entry) in changes {
            match entry {
                Some(entry) => match self.entries.get_mut(&backend) {
                    Some((current, _)) if *current == entry => {}
                    Some(slot) => {
                        *slot = (entry, version);
                        changed = true;
                    }
                    None => {
                        self.entries.insert(backend, (entry, version));
                        self.removed.remove(&backend);
                        changed = true;
                    }
                },
                None => {
                    if self.entries.remove(&backend).is_some() {
                        self.removed.insert(backend, version);
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.version = version;
            self.forget_old_removals();
        }
        changed
    }

    /// Keeps at most as many removals as entries (or [`MIN_TOMBSTONES`]),
    /// the newest; the floor rises past the ones forgotten.
    fn forget_old_removals(&mut self) {
        let keep = self.entries.len().max(MIN_TOMBSTONES);
        if self.removed.len() <= keep {
            return;
        }
        let mut stamps: Vec<u64> = self.removed.values().copied().collect();
        stamps.sort_unstable();
        let cut = stamps[self.removed.len() - keep - 1];
        self.removed.retain(|_, stamp| *stamp > cut);
        self.floor = self.floor.max(cut);
    }

    /// The answer to `?since=`: `None` when the peer is up to date, the
    /// changes when `since` is one of this run's recent versions, else
    /// everything.
    pub fn delta(&self, since: Option<u64>) -> Option<Delta> {
        match since {
            Some(since) if since == self.version => None,
            Some(since) if since >= self.floor && since < self.version => Some(Delta {
                version: self.version,
                full: false,
                changed: self
                    .entries
                    .iter()
                    .filter(|(_, (_, stamp))| *stamp > since)
                    .map(|(b, (e, _))| (*b, e.clone()))
                    .collect(),
                removed: self
                    .removed
                    .iter()
                    .filter(|(_, stamp)| **stamp > since)
                    .map(|(b, _)| *b)
                    .collect(),
            }),
            _ => Some(Delta {
                version: self.version,
                full: true,
                changed: self.entries().map(|(b, e)| (*b, e.clone())).collect(),
                removed: Vec::new(),
            }),
        }
    }
}

/// What one peer served, as far as this node followed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerView {
    /// The peer's version these entries are at (sent as `since`).
    pub version: u64,
    pub entries: Entries,
}

impl PeerView {
    pub fn apply(&mut self, delta: Delta) {
        if delta.full {
            self.entries.clear();
        }
        for backend in delta.removed {
            self.entries.remove(&backend);
        }
        self.entries.extend(delta.changed);
        self.version = delta.version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::model::PodLoad;
    use grpclb_common::Addr;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn backend(i: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 0, 0, i]), 8080)
    }

    fn entry(connections: u32) -> Entry {
        Entry {
            node: Arc::from("n"),
            load: PodLoad {
                connections,
                calls_per_second: None,
            },
        }
    }

    fn view(pairs: &[(u8, u32)]) -> Entries {
        pairs
            .iter()
            .map(|(b, c)| (backend(*b), entry(*c)))
            .collect()
    }

    #[test]
    fn an_unchanged_view_answers_nothing_and_a_change_only_itself() {
        let mut served = Versioned::new(100);
        assert!(served.replace(&view(&[(1, 1), (2, 2)])));
        assert_eq!(served.version(), 101);
        assert!(!served.replace(&view(&[(1, 1), (2, 2)])));
        assert_eq!(served.delta(Some(101)), None);
        served.replace(&view(&[(1, 5), (3, 3)]));
        let delta = served.delta(Some(101)).unwrap();
        assert!(!delta.full);
        assert_eq!(
            delta.changed,
            vec![(backend(1), entry(5)), (backend(3), entry(3))]
        );
        assert_eq!(delta.removed, vec![backend(2)]);
    }

    #[test]
    fn unknown_and_too_old_versions_get_everything() {
        let mut served = Versioned::new(1000);
        served.replace(&view(&[(1, 1)]));
        for since in [None, Some(5), Some(999_999)] {
            let delta = served.delta(since).unwrap();
            assert!(delta.full, "{since:?}");
            assert_eq!(delta.changed.len(), 1);
        }
        // Forgetting removals beyond the cap raises the floor.
        let first = served.version();
        for i in 0..(MIN_TOMBSTONES + 10) {
            let i = i as u32;
            let next: Entries =
                [(Backend::new(Addr::from_v4(i.to_be_bytes()), 1), entry(1))].into();
            served.replace(&next);
        }
        assert!(served.delta(Some(first)).unwrap().full);
    }

    proptest! {
        /// Following a server by deltas from any version it answered gives
        /// exactly its view.
        #[test]
        fn deltas_replay_to_the_servers_view(
            steps in prop::collection::vec(prop::collection::btree_map(0u8..20, 0u32..4, 0..12), 1..20),
            follow_from in 0usize..20,
        ) {
            let mut served = Versioned::new(7);
            let mut follower = PeerView::default();
            let mut first = true;
            for (i, step) in steps.iter().enumerate() {
                served.replace(&step.iter().map(|(b, c)| (backend(*b), entry(*c))).collect());
                if i >= follow_from % steps.len() {
                    let since = (!first).then_some(follower.version);
                    if let Some(delta) = served.delta(since) {
                        follower.apply(delta);
                    }
                    first = false;
                    let expected: Entries = served.entries().map(|(b, e)| (*b, e.clone())).collect();
                    prop_assert_eq!(&follower.entries, &expected);
                }
            }
        }
    }
}
