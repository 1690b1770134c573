//! Makes the maps hold a [`DesiredState`], replacing each changed backend set
//! atomically (the protocol in `docs/architecture.md`).
//!
//! Ordering is chosen so that a crash at any point leaves maps that the next
//! [`apply`] fully repairs:
//! - a service's name is written before its slots and removed after them, so
//!   every key that may own slot entries is found through `SERVICE_NAMES`;
//! - a slot is always a contiguous run of indices `0..m` (written upwards,
//!   truncated from the top down), so probing upwards finds all of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use grpclb_common::{Backend, BackendSlotKey, ServiceEntry, ServiceKey, ServiceName};

use tokio::sync::watch;

use crate::model::DesiredState;
use crate::tables::{LocalBackendTable, ServiceTables};

/// What one [`apply`] changed, for a log line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Names of frontends that were created.
    pub added: Vec<String>,
    /// Names of frontends whose backend set was replaced.
    pub updated: Vec<String>,
    /// Names of frontends that were deleted.
    pub removed: Vec<String>,
    pub unchanged: usize,
    /// Frontends and eligible backend positions now live.
    pub frontends: usize,
    pub eligible_backends: usize,
    pub loads_created: usize,
    pub loads_removed: usize,
}

impl SyncReport {
    pub fn changed_anything(&self) -> bool {
        !(self.added.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.loads_created == 0
            && self.loads_removed == 0)
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} frontends, {} eligible backends: {} added, {} updated, {} removed, {} unchanged; \
             load entries +{} -{}",
            self.frontends,
            self.eligible_backends,
            self.added.len(),
            self.updated.len(),
            self.removed.len(),
            self.unchanged,
            self.loads_created,
            self.loads_removed
        )?;
        for (label, names) in [
            ("added", &self.added),
            ("updated", &self.updated),
            ("removed", &self.removed),
        ] {
            if !names.is_empty() {
                write!(f, "; {label}: {}", summarize(names))?;
            }
        }
        Ok(())
    }
}

/// At most a handful of names, so one sync stays one readable log line.
fn summarize(names: &[String]) -> String {
    const SHOWN: usize = 5;
    // Dual-stack Services have one frontend, and so one entry, per family.
    let mut unique: Vec<&str> = names.iter().map(String::as_str).collect();
    unique.sort_unstable();
    unique.dedup();
    let mut s = unique
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if unique.len() > SHOWN {
        s.push_str(&format!(" and {} more", unique.len() - SHOWN));
    }
    s
}

pub fn apply<T: ServiceTables>(tables: &mut T, desired: &DesiredState) -> Result<SyncReport> {
    let mut report = SyncReport::default();
    let live: BTreeMap<ServiceKey, ServiceEntry> = tables
        .frontends()
        .context("reading FRONTENDS")?
        .into_iter()
        .collect();
    let names: BTreeMap<ServiceKey, ServiceName> = tables
        .names()
        .context("reading SERVICE_NAMES")?
        .into_iter()
        .collect();
    let loads: BTreeMap<Backend, u64> = tables
        .loads()
        .context("reading BACKEND_LOAD")?
        .into_iter()
        .collect();

    // Load entries first: the eBPF side only counts connections to backends
    // that have one, so a backend must have it before it becomes selectable.
    let eligible: BTreeSet<Backend> = desired
        .services
        .values()
        .flat_map(|s| s.eligible())
        .collect();
    for backend in &eligible {
        if !loads.contains_key(backend) {
            tables
                .ensure_load(backend)
                .with_context(|| format!("creating the BACKEND_LOAD entry of {backend:?}"))?;
            report.loads_created += 1;
        }
    }

    for (key, service) in &desired.services {
        let wanted_name = ServiceName::new(&service.name);
        if names.get(key).map(ServiceName::as_str) != Some(wanted_name.as_str()) {
            tables
                .set_name(key, &wanted_name)
                .with_context(|| format!("writing the name of {}", service.name))?;
        }
        let backends = service.eligible();
        report.eligible_backends += backends.len();
        match live.get(key) {
            Some(entry) if active_set(tables, key, entry)? == backends => {
                // Only reads, unless a crash interrupted the last trim.
                truncate_slot(tables, key, entry.slot(), entry.backend_count)
                    .with_context(|| format!("trimming the backends of {}", service.name))?;
                report.unchanged += 1;
            }
            Some(entry) => {
                replace_set(tables, key, entry.generation, &backends)
                    .with_context(|| format!("replacing the backends of {}", service.name))?;
                report.updated.push(service.name.clone());
            }
            None => {
                replace_set(tables, key, 0, &backends)
                    .with_context(|| format!("adding {}", service.name))?;
                report.added.push(service.name.clone());
            }
        }
    }
    report.frontends = desired.services.len();

    let stale: BTreeSet<ServiceKey> = live
        .keys()
        .chain(names.keys())
        .filter(|k| !desired.services.contains_key(k))
        .copied()
        .collect();
    for key in stale {
        let name = names
            .get(&key)
            .map(|n| n.as_str().to_string())
            .unwrap_or_else(|| format!("{key:?}"));
        remove_service(tables, &key, live.contains_key(&key))
            .with_context(|| format!("removing {name}"))?;
        if live.contains_key(&key) {
            report.removed.push(name);
        }
    }

    report.loads_removed = remove_idle_loads(tables, &eligible)?;
    Ok(report)
}

/// Removes the load entries of backends in no live set whose count is 0,
/// and returns how many. Read after the sets were swapped, in this order: a
/// connect counts before it checks that the set it chose from is still live
/// (and takes the count back if not), so once a backend is in no live set,
/// every count that will stay on it is visible, and a 0 read afterwards is
/// final. A count above zero belongs to connections still open: the entry
/// stays, and goes on a later sync once they have closed.
fn remove_idle_loads<T: ServiceTables>(
    tables: &mut T,
    eligible: &BTreeSet<Backend>,
) -> Result<usize> {
    let mut live = eligible.clone();
    for (key, entry) in tables.frontends().context("reading FRONTENDS")? {
        live.extend(active_set(tables, &key, &entry)?);
    }
    let loads = tables.loads().context("reading BACKEND_LOAD")?;
    let mut removed = 0;
    for (backend, count) in loads {
        if count == 0 && !live.contains(&backend) {
            tables
                .remove_load(&backend)
                .with_context(|| format!("removing the BACKEND_LOAD entry of {backend:?}"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// How often the latest state is applied again even when no source changed
/// it: removes load entries whose connections have since closed and repairs
/// maps someone else modified.
/// Makes the local backend table hold exactly the endpoints (ready or
/// draining) of the Services that track frames that are pods on `node`.
/// Returns (added, removed).
pub fn apply_local<T: LocalBackendTable>(
    tables: &mut T,
    desired: &DesiredState,
    node: &str,
) -> Result<(usize, usize)> {
    let want: BTreeSet<Backend> = desired
        .services
        .values()
        .filter(|s| s.track_frames)
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.node_name.as_deref() == Some(node))
        .map(|e| e.backend)
        .collect();
    let have: BTreeSet<Backend> = tables
        .local_backends()
        .context("reading LOCAL_BACKENDS")?
        .into_iter()
        .collect();
    for backend in want.difference(&have) {
        tables.add_local_backend(backend)?;
    }
    for backend in have.difference(&want) {
        tables.remove_local_backend(backend)?;
    }
    Ok((
        want.difference(&have).count(),
        have.difference(&want).count(),
    ))
}

pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);

/// The sync task: applies the latest state a source published (skipping any
/// it superseded), and again every `resync`; also keeps the local backends
/// of `node` in their table. A failed apply is logged and
/// retried on the next change or tick. Returns when the source is gone.
/// `observe` sees every apply's duration and outcome (metrics).
pub async fn follow<T: ServiceTables + LocalBackendTable>(
    tables: &mut T,
    node: &str,
    mut states: watch::Receiver<Option<DesiredState>>,
    resync: Duration,
    mut observe: impl FnMut(Duration, Result<&SyncReport, &anyhow::Error>),
) {
    let mut ticker = tokio::time::interval(resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let latest = states.borrow_and_update().clone();
        if let Some(desired) = latest {
            let started = std::time::Instant::now();
            let outcome = apply(tables, &desired);
            observe(started.elapsed(), outcome.as_ref());
            match outcome {
                Ok(report) if report.changed_anything() => tracing::info!("synced: {report}"),
                Ok(report) => tracing::debug!("in sync: {report}"),
                Err(e) => tracing::error!("sync failed, will retry: {e:#}"),
            }
            match apply_local(tables, &desired, node) {
                Ok((0, 0)) => {}
                Ok((added, removed)) => {
                    tracing::info!(added, removed, "local backends (frame tracking) updated")
                }
                Err(e) => tracing::error!("local backend sync failed, will retry: {e:#}"),
            }
        }
        tokio::select! {
            changed = states.changed() => if changed.is_err() { return },
            _ = ticker.tick() => {}
        }
    }
}

fn slot_key(service: &ServiceKey, slot: u32, index: u32) -> BackendSlotKey {
    BackendSlotKey {
        service: *service,
        slot,
        index,
    }
}

/// The backends connects currently choose from.
fn active_set<T: ServiceTables>(
    tables: &T,
    key: &ServiceKey,
    entry: &ServiceEntry,
) -> Result<Vec<Backend>> {
    let mut set = Vec::with_capacity(entry.backend_count as usize);
    for index in 0..entry.backend_count {
        match tables.slot(&slot_key(key, entry.slot(), index))? {
            Some(backend) => set.push(backend),
            // A hole means the set is damaged; rewriting it repairs it.
            None => break,
        }
    }
    Ok(set)
}

/// Steps 2–4 of the swap: fill the idle slot, flip the frontend entry, trim
/// what an older generation left above the new count.
fn replace_set<T: ServiceTables>(
    tables: &mut T,
    key: &ServiceKey,
    generation: u32,
    backends: &[Backend],
) -> Result<()> {
    let next = ServiceEntry {
        generation: generation.wrapping_add(1),
        backend_count: backends.len() as u32,
    };
    for (index, backend) in backends.iter().enumerate() {
        tables.set_slot(&slot_key(key, next.slot(), index as u32), backend)?;
    }
    tables.set_frontend(key, &next)?;
    truncate_slot(tables, key, next.slot(), next.backend_count)
}

/// Deletes indices `>= keep` of a slot, from the top down so an interrupted
/// truncation still leaves a contiguous run.
fn truncate_slot<T: ServiceTables>(
    tables: &mut T,
    key: &ServiceKey,
    slot: u32,
    keep: u32,
) -> Result<()> {
    let mut end = keep;
    while tables.slot(&slot_key(key, slot, end))?.is_some() {
        end += 1;
    }
    for index in (keep..end).rev() {
        tables.remove_slot(&slot_key(key, slot, index))?;
    }
    Ok(())
}

/// Frontend first (connects stop matching), then both slots, then the name
/// that marks the key as owning slot entries.
fn remove_service<T: ServiceTables>(tables: &mut T, key: &ServiceKey, live: bool) -> Result<()> {
    if live {
        tables.remove_frontend(key)?;
    }
    truncate_slot(tables, key, 0, 0)?;
    truncate_slot(tables, key, 1, 0)?;
    tables.remove_name(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredService, Endpoint, EndpointCondition};
    use crate::tables::MemoryTables;
    use crate::topology::Rule;
    use grpclb_common::Addr;
    use proptest::prelude::*;

    fn svc_key(n: u8) -> ServiceKey {
        ServiceKey::new(Addr::from_v4([10, 96, 0, n]), 50051)
    }
    fn backend(n: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 0, 0, n]), 8080)
    }
    fn endpoint(n: u8, condition: EndpointCondition) -> Endpoint {
        Endpoint {
            backend: backend(n),
            node_name: None,
            condition,
        }
    }
    fn state(services: &[(u8, &[u8], &[u8])]) -> DesiredState {
        let mut s = DesiredState::default();
        for (svc, ready, draining) in services {
            let mut endpoints: Vec<Endpoint> = ready
                .iter()
                .map(|b| endpoint(*b, EndpointCondition::Ready))
                .chain(
                    draining
                        .iter()
                        .map(|b| endpoint(*b, EndpointCondition::Draining)),
                )
                .collect();
            endpoints.sort();
            endpoints.dedup_by_key(|e| e.backend);
            s.services.insert(
                svc_key(*svc),
                DesiredService {
                    name: format!("ns/svc{svc}:grpc"),
                    endpoints,
                    track_frames: false,
                    rule: Rule::Ready,
                },
            );
        }
        s
    }

    fn active(t: &MemoryTables, key: &ServiceKey) -> Vec<Backend> {
        active_set(t, key, &t.frontends[key]).unwrap()
    }

    /// The tables hold exactly `desired`: one frontend per service whose
    /// active slot is its eligible set, names, no slot entry of any other
    /// service, contiguous slots, load entries for every eligible backend and
    /// none idle for anything else.
    fn assert_holds(t: &MemoryTables, desired: &DesiredState) {
        let keys: Vec<ServiceKey> = t.frontends.keys().copied().collect();
        let want: Vec<ServiceKey> = desired.services.keys().copied().collect();
        assert_eq!(keys, want);
        for (key, svc) in &desired.services {
            let entry = t.frontends[key];
            assert_eq!(entry.backend_count as usize, svc.eligible().len());
            assert_eq!(active(t, key), svc.eligible());
            assert_eq!(t.names[key].as_str(), svc.name);
        }
        assert_eq!(t.names.keys().copied().collect::<Vec<_>>(), want);
        let mut per_slot: BTreeMap<(ServiceKey, u32), Vec<u32>> = BTreeMap::new();
        for k in t.slots.keys() {
            assert!(
                desired.services.contains_key(&k.service),
                "orphan slot {k:?}"
            );
            per_slot
                .entry((k.service, k.slot))
                .or_default()
                .push(k.index);
        }
        for ((key, slot), indices) in per_slot {
            let entry = t.frontends[&key];
            let expected: Vec<u32> = (0..indices.len() as u32).collect();
            assert_eq!(
                indices, expected,
                "slot {slot} of {key:?} is not contiguous"
            );
            if slot == entry.slot() {
                assert_eq!(indices.len() as u32, entry.backend_count);
            }
        }
        let eligible: BTreeSet<Backend> = desired
            .services
            .values()
            .flat_map(|s| s.eligible())
            .collect();
        for b in &eligible {
            assert!(t.loads.contains_key(b), "no load entry for {b:?}");
        }
        for (b, count) in &t.loads {
            assert!(
                eligible.contains(b) || *count > 0,
                "idle load entry {b:?} kept"
            );
        }
    }

    #[test]
    fn local_backends_are_the_endpoints_on_this_node() {
        let mut desired = state(&[(1, &[1, 2], &[3]), (2, &[4], &[]), (3, &[5], &[])]);
        for service in desired.services.values_mut() {
            // Service 3 does not track frames: its local pod 5 is left out.
            service.track_frames = service.name != "ns/svc3:grpc";
            for e in &mut service.endpoints {
                let n = e.backend.addr.0[15];
                e.node_name = Some(if n % 2 == 1 { "node-a" } else { "node-b" }.into());
            }
        }
        let mut t = MemoryTables::default();
        t.local.insert(backend(7)); // left over from an older state
        assert_eq!(apply_local(&mut t, &desired, "node-a").unwrap(), (2, 1));
        assert_eq!(
            t.local,
            BTreeSet::from([backend(1), backend(3)]),
            "ready and draining"
        );
        assert_eq!(apply_local(&mut t, &desired, "node-a").unwrap(), (0, 0));
    }

    #[test]
    fn first_apply_writes_slot_one_generation_one() {
        let mut t = MemoryTables::default();
        let d = state(&[(1, &[1, 2], &[3])]);
        let r = apply(&mut t, &d).unwrap();
        assert_eq!(
            t.frontends[&svc_key(1)],
            ServiceEntry {
                generation: 1,
                backend_count: 2
            }
        );
        assert_eq!(t.slots.len(), 2);
        assert!(t.slots.keys().all(|k| k.slot == 1));
        assert_eq!(r.added, vec!["ns/svc1:grpc"]);
        assert_eq!(
            r.loads_created, 2,
            "draining backends get no new load entry"
        );
        assert_eq!(r.eligible_backends, 2);
        assert_holds(&t, &d);
    }

    #[test]
    fn unchanged_state_touches_nothing() {
        let mut t = MemoryTables::default();
        let d = state(&[(1, &[1, 2], &[]), (2, &[], &[])]);
        apply(&mut t, &d).unwrap();
        let before = t.clone();
        let r = apply(&mut t, &d).unwrap();
        assert_eq!(t, before);
        assert_eq!(r.unchanged, 2);
        assert!(!r.changed_anything());
    }

    #[test]
    fn replacement_fills_the_idle_slot_flips_and_trims_it() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2, 3], &[])])).unwrap(); // g1: slot 1 = 1,2,3
        apply(&mut t, &state(&[(1, &[4, 5, 6, 7], &[])])).unwrap(); // g2: slot 0 = 4..7
        let r = apply(&mut t, &state(&[(1, &[8], &[])])).unwrap(); // g3: slot 1 = 8
        assert_eq!(r.updated, vec!["ns/svc1:grpc"]);
        assert_eq!(
            t.frontends[&svc_key(1)],
            ServiceEntry {
                generation: 3,
                backend_count: 1
            }
        );
        let slot1: Vec<_> = t
            .slots
            .iter()
            .filter(|(k, _)| k.slot == 1)
            .map(|(_, b)| *b)
            .collect();
        assert_eq!(
            slot1,
            vec![backend(8)],
            "indices >= n' of the new slot are deleted"
        );
        let slot0: Vec<_> = t
            .slots
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, b)| *b)
            .collect();
        assert_eq!(
            slot0,
            vec![backend(4), backend(5), backend(6), backend(7)],
            "old set kept for readers in flight"
        );
    }

    #[test]
    fn only_ready_membership_changes_cause_a_swap() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1], &[])])).unwrap();
        let r = apply(&mut t, &state(&[(1, &[1], &[2])])).unwrap();
        assert_eq!(r.unchanged, 1);
        assert_eq!(t.frontends[&svc_key(1)].generation, 1);
    }

    #[test]
    fn removal_deletes_frontend_slots_and_name() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2], &[]), (2, &[3], &[])])).unwrap();
        apply(&mut t, &state(&[(1, &[2, 1, 5], &[]), (2, &[3], &[])])).unwrap();
        let d = state(&[(2, &[3], &[])]);
        let r = apply(&mut t, &d).unwrap();
        assert_eq!(r.removed, vec!["ns/svc1:grpc"]);
        assert_eq!(r.loads_removed, 3);
        assert_holds(&t, &d);
    }

    #[test]
    fn busy_load_entries_survive_until_idle() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        *t.loads.get_mut(&backend(2)).unwrap() = 3;
        let d = state(&[(1, &[1], &[])]);
        apply(&mut t, &d).unwrap();
        assert_eq!(t.loads.get(&backend(2)), Some(&3));
        *t.loads.get_mut(&backend(2)).unwrap() = 0;
        let r = apply(&mut t, &d).unwrap();
        assert_eq!(r.loads_removed, 1);
        assert!(!t.loads.contains_key(&backend(2)));
    }

    #[test]
    fn existing_counts_are_not_reset() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1], &[])])).unwrap();
        *t.loads.get_mut(&backend(1)).unwrap() = 7;
        apply(&mut t, &state(&[(1, &[1, 2], &[]), (2, &[1], &[])])).unwrap();
        assert_eq!(t.loads[&backend(1)], 7);
    }

    #[test]
    fn generation_wraps_keeping_slots_alternating() {
        let mut t = MemoryTables::default();
        t.frontends.insert(
            svc_key(1),
            ServiceEntry {
                generation: u32::MAX,
                backend_count: 0,
            },
        );
        t.names.insert(svc_key(1), ServiceName::new("ns/svc1:grpc"));
        let d = state(&[(1, &[1], &[])]);
        apply(&mut t, &d).unwrap();
        assert_eq!(
            t.frontends[&svc_key(1)],
            ServiceEntry {
                generation: 0,
                backend_count: 1
            }
        );
        assert_holds(&t, &d);
    }

    #[test]
    fn report_line_names_changes() {
        let mut t = MemoryTables::default();
        let r = apply(&mut t, &state(&[(1, &[1], &[]), (2, &[], &[])])).unwrap();
        assert_eq!(
            r.to_string(),
            "2 frontends, 1 eligible backends: 2 added, 0 updated, 0 removed, 0 unchanged; \
             load entries +1 -0; added: ns/svc1:grpc, ns/svc2:grpc"
        );
    }

    #[test]
    fn a_trim_interrupted_after_the_flip_is_finished_by_the_next_apply() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2, 3], &[])])).unwrap(); // slot 1 = 1,2,3
        apply(&mut t, &state(&[(1, &[4], &[])])).unwrap(); // slot 0 = 4
        let d = state(&[(1, &[5], &[])]);
        // ensure_load(5), set_slot, set_frontend, remove index 2, then crash.
        let mut crashing = CrashingTables {
            inner: t,
            writes_left: 4,
        };
        assert!(apply(&mut crashing, &d).is_err());
        let mut t = crashing.inner;
        assert!(t.slots.contains_key(&slot_key(&svc_key(1), 1, 1)));
        let r = apply(&mut t, &d).unwrap();
        assert_eq!(r.unchanged, 1);
        assert_holds(&t, &d);
    }

    #[tokio::test]
    async fn follow_applies_the_latest_state_and_stops_with_the_source() {
        let (tx, rx) = watch::channel(None);
        let first = state(&[(1, &[1], &[])]);
        let second = state(&[(2, &[2, 3], &[])]);
        let mut t = MemoryTables::default();
        let publisher = async {
            tx.send(Some(first.clone())).unwrap();
            tokio::task::yield_now().await;
            tx.send(Some(second.clone())).unwrap();
            drop(tx);
        };
        let mut applies = 0;
        tokio::join!(
            follow(
                &mut t,
                "node-a",
                rx,
                Duration::from_secs(3600),
                |_, outcome| {
                    assert!(outcome.is_ok());
                    applies += 1;
                }
            ),
            publisher
        );
        assert!(applies >= 1, "observe saw no apply");
        assert_holds(&t, &second);
    }

    /// A connection the kernel counts on `backend` while the agent swaps
    /// sets: placed on the old set just before each flip of a frontend (it
    /// counted, then saw the generation unchanged, so its count stays).
    struct ConnectingTables {
        inner: MemoryTables,
        backend: Backend,
    }

    impl ServiceTables for ConnectingTables {
        fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
            self.inner.frontends()
        }
        fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
            self.inner.frontend(key)
        }
        fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
            if let Some(count) = self.inner.loads.get_mut(&self.backend) {
                *count += 1;
            }
            self.inner.set_frontend(key, entry)
        }
        fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
            self.inner.remove_frontend(key)
        }
        fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>> {
            self.inner.slot(key)
        }
        fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()> {
            self.inner.set_slot(key, backend)
        }
        fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
            self.inner.remove_slot(key)
        }
        fn loads(&self) -> Result<Vec<(Backend, u64)>> {
            self.inner.loads()
        }
        fn ensure_load(&mut self, backend: &Backend) -> Result<()> {
            self.inner.ensure_load(backend)
        }
        fn remove_load(&mut self, backend: &Backend) -> Result<()> {
            self.inner.remove_load(backend)
        }
        fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>> {
            self.inner.names()
        }
        fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()> {
            self.inner.set_name(key, name)
        }
        fn remove_name(&mut self, key: &ServiceKey) -> Result<()> {
            self.inner.remove_name(key)
        }
    }

    #[test]
    fn a_connection_counted_during_the_apply_keeps_its_load_entry() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        assert_eq!(t.loads[&backend(2)], 0);
        let mut connecting = ConnectingTables {
            inner: t,
            backend: backend(2),
        };
        // Backend 2 leaves the set; it read 0 when the apply started.
        let d = state(&[(1, &[1], &[])]);
        let r = apply(&mut connecting, &d).unwrap();
        assert_eq!(r.loads_removed, 0);
        assert_eq!(
            connecting.inner.loads.get(&backend(2)),
            Some(&1),
            "the count is live"
        );
        // Once that connection has closed, the entry goes.
        *connecting.inner.loads.get_mut(&backend(2)).unwrap() = 0;
        let r = apply(&mut connecting.inner, &d).unwrap();
        assert_eq!(r.loads_removed, 1);
        assert_holds(&connecting.inner, &d);
    }

    #[test]
    fn load_entries_of_a_live_set_stay_even_if_not_desired() {
        // A set the apply could not replace (an error on another Service)
        // is still what connects choose from.
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        let removed = remove_idle_loads(&mut t, &BTreeSet::new()).unwrap();
        assert_eq!(removed, 0);
        assert_eq!(t.loads.len(), 2);
    }

    /// Tables that fail every mutation after a budget runs out: an agent that
    /// dies mid-apply.
    struct CrashingTables {
        inner: MemoryTables,
        writes_left: usize,
    }

    impl CrashingTables {
        fn spend(&mut self) -> Result<()> {
            if self.writes_left == 0 {
                anyhow::bail!("crashed");
            }
            self.writes_left -= 1;
            Ok(())
        }
    }

    impl ServiceTables for CrashingTables {
        fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
            self.inner.frontends()
        }
        fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
            self.inner.frontend(key)
        }
        fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
            self.spend()?;
            self.inner.set_frontend(key, entry)
        }
        fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
            self.spend()?;
            self.inner.remove_frontend(key)
        }
        fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>> {
            self.inner.slot(key)
        }
        fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()> {
            self.spend()?;
            self.inner.set_slot(key, backend)
        }
        fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
            self.spend()?;
            self.inner.remove_slot(key)
        }
        fn loads(&self) -> Result<Vec<(Backend, u64)>> {
            self.inner.loads()
        }
        fn ensure_load(&mut self, backend: &Backend) -> Result<()> {
            self.spend()?;
            self.inner.ensure_load(backend)
        }
        fn remove_load(&mut self, backend: &Backend) -> Result<()> {
            self.spend()?;
            self.inner.remove_load(backend)
        }
        fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>> {
            self.inner.names()
        }
        fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()> {
            self.spend()?;
            self.inner.set_name(key, name)
        }
        fn remove_name(&mut self, key: &ServiceKey) -> Result<()> {
            self.spend()?;
            self.inner.remove_name(key)
        }
    }

    fn arb_state() -> impl Strategy<Value = DesiredState> {
        // Few services and backends so sets overlap, shrink, grow and vanish.
        proptest::collection::btree_map(
            0u8..5,
            (
                proptest::collection::btree_set(0u8..8, 0..6),
                proptest::collection::btree_set(0u8..8, 0..3),
            ),
            0..5,
        )
        .prop_map(|services| {
            let spec: Vec<(u8, Vec<u8>, Vec<u8>)> = services
                .into_iter()
                .map(|(s, (r, d))| (s, r.into_iter().collect(), d.into_iter().collect()))
                .collect();
            let refs: Vec<(u8, &[u8], &[u8])> = spec
                .iter()
                .map(|(s, r, d)| (*s, r.as_slice(), d.as_slice()))
                .collect();
            state(&refs)
        })
    }

    proptest! {
        #[test]
        fn any_sequence_of_applies_converges_exactly(
            states in proptest::collection::vec(arb_state(), 1..8),
            busy in proptest::collection::vec((0u8..8, 0u64..3), 0..6),
        ) {
            let mut t = MemoryTables::default();
            for d in &states {
                // Connections come and go between syncs.
                for (b, count) in &busy {
                    if let Some(c) = t.loads.get_mut(&backend(*b)) {
                        *c = *count;
                    }
                }
                let before: BTreeMap<ServiceKey, ServiceEntry> = t.frontends.clone();
                apply(&mut t, d).unwrap();
                assert_holds(&t, d);
                for (key, entry) in &t.frontends {
                    if let Some(old) = before.get(key) {
                        let same = old.generation == entry.generation;
                        prop_assert!(same || entry.generation == old.generation.wrapping_add(1));
                    }
                }
            }
        }

        #[test]
        fn a_crash_mid_apply_is_repaired_by_the_next_apply(
            history in proptest::collection::vec(arb_state(), 1..5),
            second in arb_state(),
            third in arb_state(),
            budget in 0usize..40,
        ) {
            let mut t = MemoryTables::default();
            for d in &history {
                apply(&mut t, d).unwrap();
            }
            let mut crashing = CrashingTables { inner: t, writes_left: budget };
            let _ = apply(&mut crashing, &second);
            let mut t = crashing.inner;
            let mut retried = t.clone();
            apply(&mut retried, &second).unwrap();
            assert_holds(&retried, &second);
            apply(&mut t, &third).unwrap();
            assert_holds(&t, &third);
        }
    }
}
