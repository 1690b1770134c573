//! Makes the maps hold a [`DesiredState`], replacing each changed backend set
//! atomically (the protocol in `docs/architecture.md`).
//!
//! The first apply reads the maps whole ([`Synced::read`]: it adopts what an
//! earlier agent left, and repairs what a crash left half-done); after that
//! [`Syncer`] keeps what it wrote in memory and applies only the difference
//! between consecutive states: one changed Service costs its own entries,
//! whatever the size of the cluster. A write that fails half-way makes the
//! next apply read the maps whole again.
//!
//! Ordering is chosen so that a crash at any point leaves maps that the next
//! [`apply`] fully repairs:
//! - a service's name is written before its slots and removed after them, so
//!   every key that may own slot entries is found through `SERVICE_NAMES`;
//! - a slot is always a contiguous run of indices `0..m` (written upwards,
//!   truncated from the top down), so probing upwards finds all of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use grpclb_common::{
    local_backend, names, Backend, BackendSlotKey, ServiceEntry, ServiceKey, ServiceName,
};

use crate::dataplane::tables::{
    capacity_flag, LocalBackendTable, MapFull, ServiceTables, TableCapacities,
};
use crate::observe::status::socket_label;
use crate::state::model::{DesiredService, DesiredState};

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
    /// Frontends whose change this apply could not make; each was left as
    /// it was (or, after an error other than a full map, as far as it got).
    pub failed: Vec<ServiceFailure>,
    /// The maps too small for the desired state, by name.
    pub full: BTreeMap<&'static str, FullMap>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFailure {
    pub name: String,
    pub error: String,
}

/// A map that had no room for some frontend's change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullMap {
    pub map: &'static str,
    /// Entries the whole desired state needs at least (for
    /// `BACKEND_SLOTS`: the active sets, without the previous sets each
    /// frontend keeps until its next swap).
    pub needed: u64,
    pub capacity: u32,
    /// The frontends left unchanged for want of room in this map.
    pub services: Vec<String>,
    /// The entries they lacked, together.
    pub short: u64,
}

impl fmt::Display for FullMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let needed = if self.map == names::BACKEND_SLOTS {
            format!(
                "at least {} (up to {} with each frontend's previous set)",
                self.needed,
                2 * self.needed
            )
        } else {
            self.needed.to_string()
        };
        write!(
            f,
            "{} is full ({} entries): {} short for {}; the desired state needs {needed} \
             (raise {}; a pinned map keeps its size until `grpclb-agent uninstall`)",
            self.map,
            self.capacity,
            self.short,
            summarize(&self.services),
            capacity_flag(self.map),
        )
    }
}

impl SyncReport {
    pub fn changed_anything(&self) -> bool {
        !(self.added.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.loads_created == 0
            && self.loads_removed == 0)
    }

    /// True when the maps hold the whole desired state.
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
    }

    /// Why the maps do not hold the whole desired state: full maps first,
    /// then the other failures.
    pub fn problem(&self) -> Option<String> {
        if self.complete() {
            return None;
        }
        let mut parts: Vec<String> = self.full.values().map(FullMap::to_string).collect();
        let full: BTreeSet<&str> = self
            .full
            .values()
            .flat_map(|f| f.services.iter().map(String::as_str))
            .collect();
        let others: Vec<&ServiceFailure> = self
            .failed
            .iter()
            .filter(|f| !full.contains(f.name.as_str()))
            .collect();
        if let Some(first) = others.first() {
            parts.push(format!(
                "{} frontends not applied, first {}: {}",
                others.len(),
                first.name,
                first.error
            ));
        }
        Some(parts.join("; "))
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
        if !self.failed.is_empty() {
            let names: Vec<String> = self.failed.iter().map(|f| f.name.clone()).collect();
            write!(f, "; not applied: {}", summarize(&names))?;
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

fn backend_label(backend: &Backend) -> String {
    socket_label(&backend.addr, backend.port)
}

/// New entries one frontend's change takes in each map.
#[derive(Default)]
struct Needs {
    frontends: u64,
    names: u64,
    slots: u64,
    loads: u64,
}

/// What the whole desired state takes of `map` at least: the backend slots
/// count only active sets, the load entries only eligible backends (not
/// those kept for their open connections).
fn entries_needed(desired: &DesiredState, map: &str) -> u64 {
    let services = desired.services.len() as u64;
    match map {
        names::FRONTENDS | names::SERVICE_NAMES => services,
        names::BACKEND_SLOTS => desired
            .services
            .values()
            .map(|s| s.eligible().len() as u64)
            .sum(),
        _ => desired
            .services
            .values()
            .flat_map(|s| s.eligible())
            .collect::<BTreeSet<_>>()
            .len() as u64,
    }
}

enum Change {
    Added,
    Updated,
    Unchanged,
}

/// Why a frontend's change was not made.
enum ServiceError {
    /// No room: nothing of it was written.
    Full(Vec<(&'static str, u64)>),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for ServiceError {
    fn from(e: anyhow::Error) -> Self {
        match e.chain().find_map(|c| c.downcast_ref::<MapFull>()) {
            // The kernel refused a new key the count said would fit (another
            // writer, or a count that drifted): still a full map.
            Some(full) => ServiceError::Full(vec![(full.map, 1)]),
            None => ServiceError::Failed(e),
        }
    }
}

/// Makes the maps hold `desired`, reading everything they hold first: a
/// full [`Synced::apply`] (what [`Syncer`] does on its first apply and after
/// a failure). Fails only when the maps cannot be read.
pub fn apply<T: ServiceTables>(tables: &mut T, desired: &DesiredState) -> Result<SyncReport> {
    Synced::read(tables)?.apply(tables, desired)
}

/// Why a backend keeps its `BACKEND_LOAD` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Refs {
    /// Live sets (the slot each frontend entry points at) holding it.
    live: u32,
    /// Frontends of the desired state that want it.
    wanted: u32,
    /// It has an entry in `BACKEND_LOAD`.
    load: bool,
}

/// What the maps hold, as the sync wrote them: enough to apply the next
/// state by its difference from the last one, touching only the entries of
/// the Services that changed, and to check each change against the room
/// left without counting the maps. Kept only while this process is their
/// only writer and every write it made is known to have landed (see
/// [`Synced::dirty`]); otherwise [`Synced::read`] builds it from the maps.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    /// The frontends of the last state applied (shared with it: an
    /// unchanged Service is the same `Arc` in the next state).
    desired: BTreeMap<ServiceKey, Arc<DesiredService>>,
    live: BTreeMap<ServiceKey, ServiceEntry>,
    /// The name each frontend has in `SERVICE_NAMES`, as text: the map's
    /// value is a fixed 128 bytes, six times what a name usually takes.
    names: BTreeMap<ServiceKey, Box<str>>,
    /// Looked up one by one, never walked in order: a hash map takes about
    /// two thirds of what a B-tree filled in key order does (100,000
    /// backends: 4 MB instead of 6).
    backends: HashMap<Backend, Refs>,
    /// Entries in `BACKEND_LOAD`.
    loads: u64,
    /// Backends with a load entry that no live set holds and no frontend
    /// wants: the entry goes once its count reads 0.
    idle: BTreeSet<Backend>,
    /// Frontends whose change did not fit: tried again on the next apply.
    retry: BTreeSet<ServiceKey>,
    /// A write failed half-way: what the maps hold is not known any more.
    dirty: bool,
}

impl Synced {
    /// Reads what the maps hold (every frontend, name, load entry and live
    /// set): the base of a full apply, which looks at every frontend there
    /// and every one desired.
    pub fn read<T: ServiceTables>(tables: &T) -> Result<Synced> {
        let mut synced = Synced {
            live: tables
                .frontends()
                .context("reading FRONTENDS")?
                .into_iter()
                .collect(),
            names: tables
                .names()
                .context("reading SERVICE_NAMES")?
                .into_iter()
                .map(|(key, name)| (key, name.as_str().into()))
                .collect(),
            ..Synced::default()
        };
        for (backend, _) in tables.loads().context("reading BACKEND_LOAD")? {
            synced.backends.entry(backend).or_default().load = true;
            synced.loads += 1;
        }
        for (key, entry) in &synced.live {
            for backend in active_set(tables, key, entry).context("reading BACKEND_SLOTS")? {
                synced.backends.entry(backend).or_default().live += 1;
            }
        }
        synced.idle = synced
            .backends
            .iter()
            .filter(|(_, r)| r.load && r.live == 0)
            .map(|(b, _)| *b)
            .collect();
        synced.retry = synced
            .live
            .keys()
            .chain(synced.names.keys())
            .copied()
            .collect();
        Ok(synced)
    }

    /// Something is left to do even if the desired state stays as it is: a
    /// change that did not fit, or a load entry waiting for its count to
    /// drop to 0.
    pub fn pending(&self) -> bool {
        !self.retry.is_empty() || !self.idle.is_empty()
    }

    /// The maps may hold something other than what this says: the next
    /// apply must read them.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Makes the maps hold `desired`, looking only at the frontends that
    /// changed since the last apply (by `Arc` first, then by value), those
    /// left to retry, and the load entries waiting to go. Stale frontends
    /// go first, so what they free is there for the new ones; each
    /// frontend's change is then made whole or, if a map has no room for
    /// it, not at all, and one frontend's failure does not stop the others
    /// (see [`SyncReport::failed`]). Fails only when the maps cannot be
    /// read; then the maps must be read again ([`Synced::read`]).
    pub fn apply<T: ServiceTables>(
        &mut self,
        tables: &mut T,
        desired: &DesiredState,
    ) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let mut keys = std::mem::take(&mut self.retry);
        let before = std::mem::take(&mut self.desired);
        for (key, old, new) in changes(&before, &desired.services) {
            for backend in old.map(|s| s.eligible()).unwrap_or_default() {
                self.refs(backend, |r| r.wanted -= 1);
            }
            for backend in new.map(|s| s.eligible()).unwrap_or_default() {
                self.refs(backend, |r| r.wanted += 1);
            }
            keys.insert(key);
        }
        self.desired = desired.services.clone();

        let (stale, present): (Vec<ServiceKey>, Vec<ServiceKey>) = keys
            .into_iter()
            .partition(|k| !desired.services.contains_key(k));
        for key in stale {
            let name = self
                .names
                .get(&key)
                .map(|n| n.to_string())
                .unwrap_or_else(|| socket_label(&key.addr, key.port));
            let was_live = self.live.contains_key(&key);
            match self.remove_service(tables, &key) {
                Ok(()) => {
                    if was_live {
                        report.removed.push(name);
                    }
                }
                Err(e) => {
                    self.dirty = true;
                    self.retry.insert(key);
                    report.failed.push(ServiceFailure {
                        name,
                        error: format!("removing it: {e:#}"),
                    });
                }
            }
        }

        let mut looked_at = 0;
        for key in present {
            let service = &desired.services[&key];
            looked_at += 1;
            match self.sync_service(tables, &key, service, &mut report) {
                Ok(Change::Added) => report.added.push(service.name.clone()),
                Ok(Change::Updated) => report.updated.push(service.name.clone()),
                Ok(Change::Unchanged) => report.unchanged += 1,
                Err(ServiceError::Full(shortfalls)) => {
                    self.retry.insert(key);
                    let mut error = Vec::new();
                    for (map, short) in shortfalls {
                        let entries = if short == 1 { "entry" } else { "entries" };
                        error.push(format!("{map} is {short} {entries} short"));
                        let full = report.full.entry(map).or_insert_with(|| FullMap {
                            map,
                            needed: entries_needed(desired, map),
                            capacity: capacity_of(&tables.capacities(), map),
                            services: Vec::new(),
                            short: 0,
                        });
                        full.services.push(service.name.clone());
                        full.short += short;
                    }
                    report.failed.push(ServiceFailure {
                        name: service.name.clone(),
                        error: error.join(", "),
                    });
                }
                Err(ServiceError::Failed(e)) => {
                    self.dirty = true;
                    self.retry.insert(key);
                    report.failed.push(ServiceFailure {
                        name: service.name.clone(),
                        error: format!("{e:#}"),
                    });
                }
            }
        }
        report.unchanged += desired.services.len() - looked_at;
        report.frontends = self.live.len();
        report.eligible_backends = self.live.values().map(|e| e.backend_count as usize).sum();
        report.loads_removed = self.remove_idle_loads(tables)?;
        Ok(report)
    }

    /// Applies `update` to the reasons `backend` keeps its load entry, and
    /// files it as idle (or not) accordingly.
    fn refs(&mut self, backend: Backend, update: impl FnOnce(&mut Refs)) {
        let refs = self.backends.entry(backend).or_default();
        update(refs);
        let refs = *refs;
        let unused = refs.live == 0 && refs.wanted == 0;
        if unused && refs.load {
            self.idle.insert(backend);
        } else {
            self.idle.remove(&backend);
        }
        if unused && !refs.load {
            self.backends.remove(&backend);
        }
    }

    fn has_load(&self, backend: &Backend) -> bool {
        self.backends.get(backend).is_some_and(|r| r.load)
    }

    /// The maps (with how many more entries they would need) that cannot
    /// take `needs`.
    fn shortfalls<T: ServiceTables>(
        &self,
        tables: &T,
        needs: &Needs,
    ) -> Result<Vec<(&'static str, u64)>> {
        let slots = if needs.slots > 0 {
            tables.slot_entries().context("counting BACKEND_SLOTS")? as u64
        } else {
            0
        };
        let caps = tables.capacities();
        let rows = [
            (
                names::FRONTENDS,
                self.live.len() as u64,
                needs.frontends,
                caps.frontends,
            ),
            (
                names::SERVICE_NAMES,
                self.names.len() as u64,
                needs.names,
                caps.names,
            ),
            (names::BACKEND_SLOTS, slots, needs.slots, caps.slots),
            (names::BACKEND_LOAD, self.loads, needs.loads, caps.loads),
        ];
        let mut short: Vec<(&'static str, u64)> = rows
            .into_iter()
            .filter(|(_, used, need, cap)| used + need > u64::from(*cap))
            .map(|(map, used, need, cap)| (map, used + need - u64::from(cap)))
            .collect();
        // Both are sized by --max-frontends: one report says it.
        if short.iter().any(|(map, _)| *map == names::FRONTENDS) {
            short.retain(|(map, _)| *map != names::SERVICE_NAMES);
        }
        Ok(short)
    }

    /// Frontend first (connects stop matching), then both slots, then the
    /// name that marks the key as owning slot entries.
    fn remove_service<T: ServiceTables>(&mut self, tables: &mut T, key: &ServiceKey) -> Result<()> {
        if let Some(entry) = self.live.get(key).copied() {
            let set = active_set(tables, key, &entry)?;
            tables.remove_frontend(key)?;
            self.live.remove(key);
            for backend in set {
                self.refs(backend, |r| r.live -= 1);
            }
        }
        truncate_slot(tables, key, 0, 0)?;
        truncate_slot(tables, key, 1, 0)?;
        tables.remove_name(key)?;
        self.names.remove(key);
        Ok(())
    }

    /// One frontend's change: checks the room it needs, then creates the
    /// load entries of its backends, writes its name and swaps its backend
    /// set.
    fn sync_service<T: ServiceTables>(
        &mut self,
        tables: &mut T,
        key: &ServiceKey,
        service: &DesiredService,
        report: &mut SyncReport,
    ) -> Result<Change, ServiceError> {
        let backends = service.eligible();
        let wanted_name = ServiceName::new(&service.name);
        let live = self.live.get(key).copied();
        let old_set = match &live {
            Some(entry) => active_set(tables, key, entry)?,
            None => Vec::new(),
        };
        let swap = live.is_none() || old_set != backends;
        let new_loads: Vec<Backend> = backends
            .iter()
            .filter(|b| !self.has_load(b))
            .copied()
            .collect();
        let generation = live.map_or(0, |e| e.generation);
        let next = ServiceEntry {
            generation: generation.wrapping_add(1),
            backend_count: backends.len() as u32,
        };
        // Indices the swap overwrites need no new entry.
        let present = if swap {
            slot_len(tables, key, next.slot())?
        } else {
            0
        };
        let name = self.names.get(key);
        let needs = Needs {
            frontends: u64::from(live.is_none()),
            names: u64::from(name.is_none()),
            slots: if swap {
                (backends.len() as u64).saturating_sub(present)
            } else {
                0
            },
            loads: new_loads.len() as u64,
        };
        let shortfalls = self.shortfalls(tables, &needs)?;
        if !shortfalls.is_empty() {
            return Err(ServiceError::Full(shortfalls));
        }

        let rename = name.map(|n| &**n) != Some(wanted_name.as_str());
        for backend in &new_loads {
            tables.ensure_load(backend).with_context(|| {
                format!(
                    "creating the BACKEND_LOAD entry of {}",
                    backend_label(backend)
                )
            })?;
            self.loads += 1;
            self.refs(*backend, |r| r.load = true);
            report.loads_created += 1;
        }
        if rename {
            tables
                .set_name(key, &wanted_name)
                .context("writing its name")?;
            self.names.insert(*key, wanted_name.as_str().into());
        }
        match live {
            Some(entry) if !swap => {
                // Only reads, unless a crash interrupted the last trim.
                truncate_slot(tables, key, entry.slot(), entry.backend_count)
                    .context("trimming its backends")?;
                Ok(Change::Unchanged)
            }
            _ => {
                replace_set(tables, key, next, &backends).context("replacing its backends")?;
                self.live.insert(*key, next);
                for backend in old_set {
                    self.refs(backend, |r| r.live -= 1);
                }
                for backend in backends {
                    self.refs(backend, |r| r.live += 1);
                }
                Ok(if live.is_some() {
                    Change::Updated
                } else {
                    Change::Added
                })
            }
        }
    }

    /// Removes the load entries of idle backends (in no live set, wanted by
    /// no frontend) whose count is 0, and returns how many. Read after the
    /// sets were swapped, in this order: a connect counts before it checks
    /// that the set it chose from is still live (and takes the count back
    /// if not), so once a backend is in no live set, every count that will
    /// stay on it is visible, and a 0 read afterwards is final. A count
    /// above zero belongs to connections still open: the backend stays
    /// idle, looked at again on the next apply, until they have closed.
    /// Only the idle backends are read, never the whole map.
    fn remove_idle_loads<T: ServiceTables>(&mut self, tables: &mut T) -> Result<usize> {
        let mut removed = 0;
        for backend in self.idle.clone() {
            let count = tables.load(&backend).with_context(|| {
                format!(
                    "reading the BACKEND_LOAD entry of {}",
                    backend_label(&backend)
                )
            })?;
            match count {
                Some(0) => {
                    tables.remove_load(&backend).with_context(|| {
                        format!(
                            "removing the BACKEND_LOAD entry of {}",
                            backend_label(&backend)
                        )
                    })?;
                    removed += 1;
                }
                Some(_) => continue,
                // Someone else removed it.
                None => {}
            }
            self.loads -= 1;
            self.refs(backend, |r| r.load = false);
        }
        Ok(removed)
    }
}

/// The frontends that differ between `old` and `new`: (key, old, new), with
/// `None` where one has no such key. An `Arc` shared by both is the same
/// Service without a look inside.
fn changes<'a>(
    old: &'a BTreeMap<ServiceKey, Arc<DesiredService>>,
    new: &'a BTreeMap<ServiceKey, Arc<DesiredService>>,
) -> Vec<(
    ServiceKey,
    Option<&'a DesiredService>,
    Option<&'a DesiredService>,
)> {
    let mut out = Vec::new();
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return out,
            (Some((ko, _)), Some((kn, _))) if ko == kn => {
                let (key, o) = old.next().expect("peeked");
                let (_, n) = new.next().expect("peeked");
                if !Arc::ptr_eq(o, n) && o != n {
                    out.push((*key, Some(&**o), Some(&**n)));
                }
            }
            (Some((ko, _)), Some((kn, _))) if ko > kn => {
                let (key, n) = new.next().expect("peeked");
                out.push((*key, None, Some(&**n)));
            }
            (Some(_), _) => {
                let (key, o) = old.next().expect("peeked");
                out.push((*key, Some(&**o), None));
            }
            (None, Some(_)) => {
                let (key, n) = new.next().expect("peeked");
                out.push((*key, None, Some(&**n)));
            }
        }
    }
}

fn capacity_of(capacities: &TableCapacities, map: &str) -> u32 {
    match map {
        names::FRONTENDS => capacities.frontends,
        names::SERVICE_NAMES => capacities.names,
        names::BACKEND_SLOTS => capacities.slots,
        _ => capacities.loads,
    }
}

/// The backends of balanced Services that are pods on `node` (endpoints
/// ready or draining), each with its `LOCAL_BACKENDS` flag: frames are
/// tracked if any Service it backs tracks them.
pub fn local_backends(desired: &DesiredState, node: &str) -> BTreeMap<Backend, u32> {
    let mut want = BTreeMap::new();
    for service in desired.services.values() {
        let flag = if service.track_frames {
            local_backend::TRACK_FRAMES
        } else {
            local_backend::COUNT
        };
        for e in &service.endpoints {
            if e.node_name.as_deref() == Some(node) {
                *want.entry(e.backend).or_insert(local_backend::COUNT) |= flag;
            }
        }
    }
    want
}

/// What [`apply_local`] changed and left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalReport {
    /// `LOCAL_BACKENDS` entries added, flags changed, removed.
    pub added: usize,
    pub reflagged: usize,
    pub removed: usize,
    /// `LOCAL_LOAD` entries of backends no longer local whose accepted
    /// connections are still open: removed by a later apply once they read 0.
    pub lingering: usize,
}

/// Makes `LOCAL_BACKENDS` hold exactly [`local_backends`] of `node`, and
/// `LOCAL_LOAD` a count for each of them. Order, so that a count is never
/// lost (docs/architecture.md, "Connection counting"): a backend's count is
/// created before it is listed (sock_ops counts only listed backends); a
/// count is removed only after its backend left the list and it reads 0,
/// a 0 that is final since nothing counts on an unlisted backend.
pub fn apply_local<T: LocalBackendTable>(
    tables: &mut T,
    desired: &DesiredState,
    node: &str,
) -> Result<LocalReport> {
    let want = local_backends(desired, node);
    let have: BTreeMap<Backend, u32> = tables
        .local_backends()
        .context("reading LOCAL_BACKENDS")?
        .into_iter()
        .collect();
    let mut report = LocalReport::default();
    // Removals first: they make room for the additions.
    for backend in have.keys().filter(|b| !want.contains_key(b)) {
        tables
            .remove_local_backend(backend)
            .with_context(|| format!("removing {} from LOCAL_BACKENDS", backend_label(backend)))?;
        report.removed += 1;
    }
    let counts: BTreeMap<Backend, u64> = tables
        .local_loads()
        .context("reading LOCAL_LOAD")?
        .into_iter()
        .collect();
    for (backend, count) in &counts {
        if want.contains_key(backend) {
            continue;
        }
        if *count == 0 {
            tables
                .remove_local_load(backend)
                .with_context(|| format!("removing {} from LOCAL_LOAD", backend_label(backend)))?;
        } else {
            report.lingering += 1;
        }
    }
    for (backend, flags) in &want {
        if !counts.contains_key(backend) {
            tables
                .ensure_local_load(backend)
                .with_context(|| format!("adding {} to LOCAL_LOAD", backend_label(backend)))?;
        }
        match have.get(backend) {
            Some(had) if had == flags => continue,
            Some(_) => report.reflagged += 1,
            None => report.added += 1,
        }
        tables
            .set_local_backend(backend, *flags)
            .with_context(|| format!("writing {} to LOCAL_BACKENDS", backend_label(backend)))?;
    }
    Ok(report)
}

/// How long after an apply that left something to do (a change that did
/// not fit, a load entry whose connections are still open) it is tried
/// again when no new state comes first. Nothing is looked at when nothing
/// is left to do.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// Applies at most this many times in a row while an apply leaves something
/// out but changes something: what it freed (idle load entries go last) may
/// be what the rest needs.
const PASSES: usize = 3;

/// Keeps the maps holding the latest desired state: the first apply (and
/// the first after a failure) reads the maps whole ([`Synced::read`]), the
/// others apply the difference from the state applied before.
#[derive(Debug, Default)]
pub struct Syncer {
    synced: Option<Synced>,
    /// The local backends' last apply failed or left counts of backends no
    /// longer local that were still open.
    local_pending: bool,
}

impl Syncer {
    /// Something is left to do although no new state came (see
    /// [`Synced::pending`], [`LocalReport::lingering`]), or the maps must be
    /// read again.
    pub fn pending(&self) -> bool {
        self.local_pending || self.synced.as_ref().is_none_or(Synced::pending)
    }

    /// One apply of `desired`: by difference when the maps are as the last
    /// apply left them, reading them first otherwise.
    pub fn apply<T: ServiceTables>(
        &mut self,
        tables: &mut T,
        desired: &DesiredState,
    ) -> Result<SyncReport> {
        let mut synced = match self.synced.take() {
            Some(synced) if !synced.dirty() => synced,
            _ => Synced::read(tables)?,
        };
        let report = synced.apply(tables, desired)?;
        self.synced = Some(synced);
        Ok(report)
    }

    /// Applies `desired` (see [`PASSES`]) and the local backends of `node`,
    /// logging the outcome; `observe` sees each apply.
    pub fn once<T: ServiceTables + LocalBackendTable>(
        &mut self,
        tables: &mut T,
        desired: &DesiredState,
        node: &str,
        observe: &mut impl FnMut(Duration, Result<&SyncReport, &anyhow::Error>),
    ) {
        for _ in 0..PASSES {
            let started = std::time::Instant::now();
            let outcome = self.apply(tables, desired);
            observe(started.elapsed(), outcome.as_ref());
            let again = match &outcome {
                Ok(report) => {
                    if let Some(problem) = report.problem() {
                        tracing::error!("synced in part, will retry: {report}: {problem}");
                    } else if report.changed_anything() {
                        tracing::info!("synced: {report}");
                    } else {
                        tracing::debug!("in sync: {report}");
                    }
                    !report.complete() && report.changed_anything()
                }
                Err(e) => {
                    tracing::error!("sync failed, will retry: {e:#}");
                    false
                }
            };
            if !again {
                break;
            }
        }
        self.local_pending = match apply_local(tables, desired, node) {
            Ok(report) => {
                let LocalReport {
                    added,
                    reflagged,
                    removed,
                    lingering,
                } = report;
                if added + reflagged + removed > 0 {
                    tracing::info!(
                        added,
                        reflagged,
                        removed,
                        lingering,
                        "local backends updated"
                    );
                }
                lingering > 0
            }
            Err(e) => {
                tracing::error!("local backend sync failed, will retry: {e:#}");
                true
            }
        };
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

/// Steps 2–4 of the swap: fill the idle slot, flip the frontend entry to
/// `next`, trim what an older generation left above the new count.
fn replace_set<T: ServiceTables>(
    tables: &mut T,
    key: &ServiceKey,
    next: ServiceEntry,
    backends: &[Backend],
) -> Result<()> {
    for (index, backend) in backends.iter().enumerate() {
        tables.set_slot(&slot_key(key, next.slot(), index as u32), backend)?;
    }
    tables.set_frontend(key, &next)?;
    truncate_slot(tables, key, next.slot(), next.backend_count)?;
    Ok(())
}

/// The length of the contiguous run of entries in `slot`.
fn slot_len<T: ServiceTables>(tables: &T, key: &ServiceKey, slot: u32) -> Result<u64> {
    let mut len = 0;
    while tables.slot(&slot_key(key, slot, len))?.is_some() {
        len += 1;
    }
    Ok(u64::from(len))
}

/// Deletes indices `>= keep` of a slot, from the top down so an interrupted
/// truncation still leaves a contiguous run. Returns how many it deleted.
fn truncate_slot<T: ServiceTables>(
    tables: &mut T,
    key: &ServiceKey,
    slot: u32,
    keep: u32,
) -> Result<u64> {
    let mut end = keep;
    while tables.slot(&slot_key(key, slot, end))?.is_some() {
        end += 1;
    }
    for index in (keep..end).rev() {
        tables.remove_slot(&slot_key(key, slot, index))?;
    }
    Ok(u64::from(end - keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tables::MemoryTables;
    use crate::state::model::{DesiredService, Endpoint, EndpointCondition};
    use crate::state::topology::Rule;
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
                }
                .into(),
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
            let service = std::sync::Arc::make_mut(service);
            // Service 3 does not track frames: its local pod 5 is counted only.
            service.track_frames = service.name != "ns/svc3:grpc";
            for e in &mut service.endpoints {
                let n = e.backend.addr.0[15];
                e.node_name = Some(if n % 2 == 1 { "node-a" } else { "node-b" }.into());
            }
        }
        let mut t = MemoryTables::default();
        t.local.insert(backend(7), local_backend::TRACK_FRAMES); // left over from an older state
        t.local_loads.insert(backend(7), 0);
        t.local.insert(backend(5), local_backend::TRACK_FRAMES); // its Service stopped tracking
        let report = apply_local(&mut t, &desired, "node-a").unwrap();
        assert_eq!(
            report,
            LocalReport {
                added: 2,
                reflagged: 1,
                removed: 1,
                lingering: 0
            }
        );
        assert_eq!(
            t.local,
            BTreeMap::from([
                (backend(1), local_backend::TRACK_FRAMES),
                (backend(3), local_backend::TRACK_FRAMES),
                (backend(5), local_backend::COUNT),
            ]),
            "ready and draining, tracked or not"
        );
        assert_eq!(
            t.local_loads.keys().copied().collect::<Vec<_>>(),
            vec![backend(1), backend(3), backend(5)],
            "a count for every local backend, none for the one gone"
        );
        assert_eq!(
            apply_local(&mut t, &desired, "node-a").unwrap(),
            LocalReport::default()
        );
    }

    #[test]
    fn a_backend_in_two_services_is_tracked_if_either_tracks() {
        let mut desired = state(&[(1, &[1], &[]), (2, &[1], &[])]);
        for service in desired.services.values_mut() {
            let service = std::sync::Arc::make_mut(service);
            service.track_frames = service.name == "ns/svc2:grpc";
            for e in &mut service.endpoints {
                e.node_name = Some("node-a".into());
            }
        }
        assert_eq!(
            local_backends(&desired, "node-a"),
            BTreeMap::from([(backend(1), local_backend::TRACK_FRAMES)])
        );
    }

    #[test]
    fn a_count_of_a_backend_gone_stays_until_its_connections_closed() {
        let mut t = MemoryTables::default();
        t.local.insert(backend(7), local_backend::COUNT);
        t.local_loads.insert(backend(7), 2);
        let desired = state(&[(1, &[1], &[])]);
        let mut syncer = Syncer::default();
        syncer.once(&mut t, &desired, "node-a", &mut |_, _| {});
        assert!(t.local.is_empty(), "no longer counted");
        assert_eq!(t.local_loads[&backend(7)], 2, "open connections keep it");
        assert!(syncer.pending(), "looked at again");
        t.local_loads.insert(backend(7), 0);
        syncer.once(&mut t, &desired, "node-a", &mut |_, _| {});
        assert!(t.local_loads.is_empty());
        assert!(!syncer.pending());
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

    fn capacities(frontends: u32, slots: u32, loads: u32) -> TableCapacities {
        TableCapacities {
            frontends,
            names: frontends,
            slots,
            loads,
        }
    }

    /// Everything `key` owns in the frontend, name and slot maps.
    fn owned(t: &MemoryTables, key: &ServiceKey) -> String {
        let slots: Vec<_> = t.slots.iter().filter(|(k, _)| k.service == *key).collect();
        format!(
            "{:?} {:?} {slots:?}",
            t.frontends.get(key),
            t.names.get(key)
        )
    }

    #[test]
    fn with_full_maps_delete_a_add_b_converges_in_one_apply() {
        // Full FRONTENDS/SERVICE_NAMES, full BACKEND_SLOTS (two sets of two
        // per frontend after an update).
        let mut t = MemoryTables::with_capacities(capacities(2, 8, 8));
        apply(&mut t, &state(&[(1, &[1, 2], &[]), (2, &[3, 4], &[])])).unwrap();
        apply(&mut t, &state(&[(1, &[5, 6], &[]), (2, &[7, 8], &[])])).unwrap();
        assert_eq!((t.frontends.len(), t.slots.len()), (2, 8));
        let d = state(&[(2, &[7, 8], &[]), (3, &[1, 2], &[])]);
        let r = apply(&mut t, &d).unwrap();
        assert!(r.complete(), "{r}: {:?}", r.problem());
        assert_eq!(r.removed, vec!["ns/svc1:grpc"]);
        assert_eq!(r.added, vec!["ns/svc3:grpc"]);
        assert_holds(&t, &d);
    }

    #[test]
    fn a_change_that_does_not_fit_is_left_out_whole_and_the_others_applied() {
        let mut t = MemoryTables::with_capacities(capacities(8, 5, 8));
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        let before = t.clone();
        // svc2 needs 4 slot entries, 3 are free; svc3 (applied after it)
        // needs 1.
        let d = state(&[(1, &[1, 2], &[]), (2, &[3, 4, 5, 6], &[]), (3, &[7], &[])]);
        let r = apply(&mut t, &d).unwrap();
        assert!(!r.complete());
        assert_eq!(r.added, vec!["ns/svc3:grpc"]);
        assert_eq!(r.frontends, 2);
        assert_eq!(
            r.failed,
            vec![ServiceFailure {
                name: "ns/svc2:grpc".into(),
                error: "BACKEND_SLOTS is 1 entry short".into(),
            }]
        );
        assert_eq!(owned(&t, &svc_key(2)), owned(&before, &svc_key(2)));
        for b in [3, 4, 5, 6] {
            assert!(!t.loads.contains_key(&backend(b)), "load entry of {b}");
        }
        assert_eq!(
            r.problem().unwrap(),
            "BACKEND_SLOTS is full (5 entries): 1 short for ns/svc2:grpc; the desired state \
             needs at least 7 (up to 14 with each frontend's previous set) (raise \
             --max-backend-slots; a pinned map keeps its size until `grpclb-agent uninstall`)"
        );
        assert!(
            r.to_string().ends_with("; not applied: ns/svc2:grpc"),
            "{r}"
        );

        // Once svc1 goes, svc2 fits.
        let d = state(&[(2, &[3, 4, 5, 6], &[]), (3, &[7], &[])]);
        let r = apply(&mut t, &d).unwrap();
        assert!(r.complete(), "{:?}", r.problem());
        assert_holds(&t, &d);
    }

    #[test]
    fn an_update_overwriting_the_old_set_needs_no_room() {
        // Full slots: each update writes over the set before the last.
        let mut t = MemoryTables::with_capacities(capacities(1, 4, 8));
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        apply(&mut t, &state(&[(1, &[3, 4], &[])])).unwrap();
        for set in [[5, 6], [7, 8], [1, 3]] {
            let d = state(&[(1, &set, &[])]);
            let r = apply(&mut t, &d).unwrap();
            assert!(r.complete(), "{:?}", r.problem());
            assert_holds(&t, &d);
        }
    }

    #[test]
    fn a_full_load_map_converges_within_one_sync() {
        // svc1's idle load entries are deleted at the end of the apply that
        // removes it; the next pass of the same sync adds svc2.
        let mut t = MemoryTables::with_capacities(capacities(4, 16, 2));
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        let d = state(&[(2, &[3, 4], &[])]);
        let mut outcomes = Vec::new();
        Syncer::default().once(&mut t, &d, "node-a", &mut |_, outcome| {
            outcomes.push(outcome.map(SyncReport::complete).unwrap())
        });
        assert_eq!(outcomes, vec![false, true]);
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
        let mut crashing = crashing(t, 4);
        // The frontend's failure is reported, and the syncer no longer
        // trusts what it knows of the maps.
        let mut syncer = Syncer::default();
        let r = syncer.apply(&mut crashing, &d).unwrap();
        assert_eq!(r.failed.len(), 1, "{r}");
        assert!(syncer.synced.as_ref().is_some_and(Synced::dirty));
        let mut t = crashing.inner;
        assert!(t.slots.contains_key(&slot_key(&svc_key(1), 1, 1)));
        // The next apply reads the maps whole, and finishes the trim.
        let r = syncer.apply(&mut t, &d).unwrap();
        assert_eq!(r.unchanged, 1);
        assert_holds(&t, &d);
    }

    /// A mutation of the tables, named for the hook of `HookedTables`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mutation {
        SetFrontend,
        RemoveFrontend,
        SetSlot,
        RemoveSlot,
        EnsureLoad,
        RemoveLoad,
        SetName,
        RemoveName,
    }

    /// `MemoryTables` with a hook run before each mutation: what the kernel
    /// or a crash does to the tables in the middle of an apply. A hook error
    /// fails that mutation, which is then not made.
    struct HookedTables<H: FnMut(Mutation, &mut MemoryTables) -> Result<()>> {
        inner: MemoryTables,
        hook: H,
    }

    impl<H: FnMut(Mutation, &mut MemoryTables) -> Result<()>> HookedTables<H> {
        fn before(&mut self, mutation: Mutation) -> Result<()> {
            (self.hook)(mutation, &mut self.inner)
        }
    }

    impl<H: FnMut(Mutation, &mut MemoryTables) -> Result<()>> ServiceTables for HookedTables<H> {
        fn capacities(&self) -> TableCapacities {
            self.inner.capacities()
        }
        fn slot_entries(&self) -> Result<usize> {
            self.inner.slot_entries()
        }
        fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
            self.inner.frontends()
        }
        fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
            self.inner.frontend(key)
        }
        fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
            self.before(Mutation::SetFrontend)?;
            self.inner.set_frontend(key, entry)
        }
        fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
            self.before(Mutation::RemoveFrontend)?;
            self.inner.remove_frontend(key)
        }
        fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>> {
            self.inner.slot(key)
        }
        fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()> {
            self.before(Mutation::SetSlot)?;
            self.inner.set_slot(key, backend)
        }
        fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
            self.before(Mutation::RemoveSlot)?;
            self.inner.remove_slot(key)
        }
        fn loads(&self) -> Result<Vec<(Backend, u64)>> {
            self.inner.loads()
        }
        fn load(&self, backend: &Backend) -> Result<Option<u64>> {
            self.inner.load(backend)
        }
        fn ensure_load(&mut self, backend: &Backend) -> Result<()> {
            self.before(Mutation::EnsureLoad)?;
            self.inner.ensure_load(backend)
        }
        fn remove_load(&mut self, backend: &Backend) -> Result<()> {
            self.before(Mutation::RemoveLoad)?;
            self.inner.remove_load(backend)
        }
        fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>> {
            self.inner.names()
        }
        fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()> {
            self.before(Mutation::SetName)?;
            self.inner.set_name(key, name)
        }
        fn remove_name(&mut self, key: &ServiceKey) -> Result<()> {
            self.before(Mutation::RemoveName)?;
            self.inner.remove_name(key)
        }
        // The sync never writes views (the owner does): no hook.
        fn views(&self) -> Result<Vec<(Backend, grpclb_common::BackendView)>> {
            self.inner.views()
        }
        fn set_view(&mut self, backend: &Backend, view: &grpclb_common::BackendView) -> Result<()> {
            self.inner.set_view(backend, view)
        }
        fn remove_view(&mut self, backend: &Backend) -> Result<()> {
            self.inner.remove_view(backend)
        }
    }

    /// A connection the kernel counts on `backend` while the agent swaps
    /// sets: placed on the old set just before each flip of a frontend (it
    /// counted, then saw the generation unchanged, so its count stays).
    fn connecting(
        inner: MemoryTables,
        backend: Backend,
    ) -> HookedTables<impl FnMut(Mutation, &mut MemoryTables) -> Result<()>> {
        let hook = move |mutation, tables: &mut MemoryTables| {
            if mutation == Mutation::SetFrontend {
                if let Some(count) = tables.loads.get_mut(&backend) {
                    *count += 1;
                }
            }
            Ok(())
        };
        HookedTables { inner, hook }
    }

    #[test]
    fn a_connection_counted_during_the_apply_keeps_its_load_entry() {
        let mut t = MemoryTables::default();
        apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        assert_eq!(t.loads[&backend(2)], 0);
        let mut connecting = connecting(t, backend(2));
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
        let removed = Synced::read(&t).unwrap().remove_idle_loads(&mut t).unwrap();
        assert_eq!(removed, 0);
        assert_eq!(t.loads.len(), 2);
    }

    /// Tables that fail every mutation after a budget runs out: an agent that
    /// dies mid-apply.
    fn crashing(
        inner: MemoryTables,
        mut writes_left: usize,
    ) -> HookedTables<impl FnMut(Mutation, &mut MemoryTables) -> Result<()>> {
        let hook = move |_, _: &mut MemoryTables| {
            if writes_left == 0 {
                anyhow::bail!("crashed");
            }
            writes_left -= 1;
            Ok(())
        };
        HookedTables { inner, hook }
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

    /// `next` with every Service equal to one of `previous` replaced by
    /// that one's `Arc`, as a source publishes it.
    fn sharing(previous: &DesiredState, mut next: DesiredState) -> DesiredState {
        for (key, service) in &mut next.services {
            if let Some(old) = previous.services.get(key).filter(|old| *old == service) {
                *service = old.clone();
            }
        }
        next
    }

    #[test]
    fn an_unchanged_state_touches_nothing_and_a_change_only_its_service() {
        let mut t = MemoryTables::default();
        let mut syncer = Syncer::default();
        let first = state(&[(1, &[1, 2], &[]), (2, &[3], &[]), (3, &[4], &[])]);
        syncer.apply(&mut t, &first).unwrap();
        assert!(!syncer.pending());
        // Every write fails: the same state again writes nothing.
        let mut untouchable = crashing(t.clone(), 0);
        let r = syncer.apply(&mut untouchable, &first).unwrap();
        assert!(!r.changed_anything(), "{r}");
        assert_eq!(r.unchanged, 3);
        let second = sharing(
            &first,
            state(&[(1, &[1, 2], &[]), (2, &[5], &[]), (3, &[4], &[])]),
        );
        let r = syncer.apply(&mut t, &second).unwrap();
        assert_eq!(
            (r.updated.clone(), r.unchanged),
            (vec!["ns/svc2:grpc".into()], 2)
        );
        assert_eq!(r.loads_removed, 1, "backend 3 left the only set it was in");
        assert_holds(&t, &second);
        assert!(!syncer.pending());
    }

    #[test]
    fn a_busy_load_entry_is_retried_until_its_connections_close() {
        let mut t = MemoryTables::default();
        let mut syncer = Syncer::default();
        syncer.apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        *t.loads.get_mut(&backend(2)).unwrap() = 1;
        let d = state(&[(1, &[1], &[])]);
        syncer.apply(&mut t, &d).unwrap();
        assert!(syncer.pending(), "backend 2 waits for its connection");
        *t.loads.get_mut(&backend(2)).unwrap() = 0;
        let r = syncer.apply(&mut t, &d).unwrap();
        assert_eq!(r.loads_removed, 1);
        assert!(!syncer.pending());
        assert_holds(&t, &d);
    }

    #[test]
    fn a_map_too_small_is_named_with_its_needs_capacity_and_flag() {
        let mut t = MemoryTables::with_capacities(capacities(8, 64, 3));
        let mut syncer = Syncer::default();
        syncer.apply(&mut t, &state(&[(1, &[1, 2], &[])])).unwrap();
        let d = state(&[(1, &[1, 2], &[]), (2, &[3, 4], &[])]);
        let r = syncer.apply(&mut t, &d).unwrap();
        let problem = r.problem().unwrap();
        assert_eq!(
            problem,
            "BACKEND_LOAD is full (3 entries): 1 short for ns/svc2:grpc; the desired state \
             needs 4 (raise --max-backends; a pinned map keeps its size until \
             `grpclb-agent uninstall`)"
        );
        let readiness = crate::observe::readiness::Readiness::after_sync(Ok(&r));
        assert_eq!(readiness.reason, problem);
        assert!(syncer.pending(), "retried");
    }

    proptest! {
        #[test]
        fn incremental_applies_leave_the_maps_exactly_as_full_applies_do(
            states in proptest::collection::vec(arb_state(), 1..10),
            busy in proptest::collection::vec((0u8..8, 0u64..3), 0..6),
            (frontends, slots, loads) in (1u32..6, 1u32..24, 1u32..10),
            limited in any::<bool>(),
        ) {
            let caps = if limited {
                capacities(frontends, slots, loads)
            } else {
                TableCapacities::UNLIMITED
            };
            let mut full = MemoryTables::with_capacities(caps);
            let mut incremental = full.clone();
            let mut syncer = Syncer::default();
            let mut previous = DesiredState::default();
            for d in states {
                let d = sharing(&previous, d);
                for (b, count) in &busy {
                    for t in [&mut full, &mut incremental] {
                        if let Some(c) = t.loads.get_mut(&backend(*b)) {
                            *c = *count;
                        }
                    }
                }
                let by_full = apply(&mut full, &d).unwrap();
                let by_difference = syncer.apply(&mut incremental, &d).unwrap();
                prop_assert_eq!(&incremental, &full);
                prop_assert_eq!(by_difference.problem(), by_full.problem());
                prop_assert_eq!(by_difference.frontends, by_full.frontends);
                prop_assert_eq!(by_difference.loads_removed, by_full.loads_removed);
                previous = d;
            }
        }

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
        fn with_any_capacities_each_frontend_is_applied_whole_or_left_as_it_was(
            states in proptest::collection::vec(arb_state(), 1..8),
            (frontends, slots, loads) in (1u32..6, 1u32..24, 1u32..10),
        ) {
            let mut t = MemoryTables::with_capacities(capacities(frontends, slots, loads));
            for d in &states {
                let before = t.clone();
                let r = apply(&mut t, d).unwrap();
                let failed: BTreeSet<&str> = r.failed.iter().map(|f| f.name.as_str()).collect();
                for (key, svc) in &d.services {
                    if failed.contains(svc.name.as_str()) {
                        prop_assert_eq!(owned(&t, key), owned(&before, key));
                    } else {
                        prop_assert_eq!(active(&t, key), svc.eligible());
                    }
                }
                prop_assert!(t.frontends.keys().all(|k| d.services.contains_key(k)));
                prop_assert_eq!(r.frontends, t.frontends.len());
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
            let mut crashing = crashing(t, budget);
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
