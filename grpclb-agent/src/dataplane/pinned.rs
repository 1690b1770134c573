//! The pinned maps, opened by path, as [`ServiceTables`] and
//! [`LocalBackendTable`]: the sync's target, and what `status`, the metrics
//! and the rebalancer read.

use std::cell::Cell;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError};
use aya::Pod;
use grpclb_common::{
    names, Backend, BackendLoad, BackendSlotKey, BackendView, MoveWaiting, ServiceEntry,
    ServiceKey, ServiceName, TrackedConnection,
};

use super::loader::MAPS_DIR;
use super::tables::{LocalBackendTable, MapFull, ServiceTables, TableCapacities, TrackedTable};

/// The pinned maps, opened by path: the running agent's sync target, and
/// what `status` and the metrics read.
pub struct PinnedTables {
    frontends: HashMap<MapData, ServiceKey, ServiceEntry>,
    slots: HashMap<MapData, BackendSlotKey, Backend>,
    loads: HashMap<MapData, Backend, BackendLoad>,
    names: HashMap<MapData, ServiceKey, ServiceName>,
    local: HashMap<MapData, Backend, u32>,
    /// `LOCAL_LOAD` and `BACKEND_VIEW`, with their capacities; `None` on
    /// maps an older agent created, which `status` may still read (the
    /// agent's own load creates them).
    local_loads: Option<WithCapacity<HashMap<MapData, Backend, BackendLoad>>>,
    views: Option<WithCapacity<HashMap<MapData, Backend, BackendView>>>,
    tracked: HashMap<MapData, u64, TrackedConnection>,
    capacities: TableCapacities,
    local_capacity: u32,
    /// Entries in `BACKEND_SLOTS`, counted once (a walk of the whole map)
    /// and then kept by this handle's writes, the only writer; `None`:
    /// unknown, after an error.
    slot_count: Cell<Option<usize>>,
}

impl PinnedTables {
    /// The connections local pods accepted whose frames the kernel follows,
    /// by socket cookie.
    pub fn tracked_connections(&self) -> Result<Vec<(u64, TrackedConnection)>> {
        entries(&self.tracked, names::TRACKED)
    }

    pub fn open(bpffs: &Path) -> Result<PinnedTables> {
        let maps_dir = bpffs.join(MAPS_DIR);
        let (frontends, frontends_cap) = open_hash(&maps_dir, names::FRONTENDS)?;
        let (slots, slots_cap) = open_hash(&maps_dir, names::BACKEND_SLOTS)?;
        let (loads, loads_cap) = open_hash(&maps_dir, names::BACKEND_LOAD)?;
        let (names, names_cap) = open_hash(&maps_dir, names::SERVICE_NAMES)?;
        let (local, local_capacity) = open_hash(&maps_dir, names::LOCAL_BACKENDS)?;
        let (tracked, _) = open_hash(&maps_dir, names::TRACKED)?;
        let local_loads = open_hash_if_pinned(&maps_dir, names::LOCAL_LOAD)?;
        let views = open_hash_if_pinned(&maps_dir, names::BACKEND_VIEW)?;
        Ok(PinnedTables {
            frontends,
            slots,
            loads,
            names,
            local,
            local_loads,
            views,
            tracked,
            capacities: TableCapacities {
                frontends: frontends_cap,
                names: names_cap,
                slots: slots_cap,
                loads: loads_cap,
            },
            local_capacity,
            slot_count: Cell::new(None),
        })
    }

    /// Another handle on the same maps, for their next only writer: it
    /// keeps this one's count of `BACKEND_SLOTS`, so the first change it
    /// writes does not walk the whole map again (100,000 endpoints: about
    /// 100 ms of bpf calls on the first endpoint change after start).
    pub fn reopen(&self, bpffs: &Path) -> Result<PinnedTables> {
        let tables = PinnedTables::open(bpffs)?;
        tables.slot_count.set(self.slot_count.get());
        Ok(tables)
    }
}

impl TrackedTable for PinnedTables {
    fn tracked_connections(&self) -> Result<Vec<(u64, TrackedConnection)>> {
        PinnedTables::tracked_connections(self)
    }
    fn tracked_connection(&self, cookie: u64) -> Result<Option<TrackedConnection>> {
        lookup(&self.tracked, &cookie, names::TRACKED)
    }
}

/// `MOVES_WAITING`: the moves the running agent reports as waiting, by
/// socket cookie (the agent writes it, `status` reads it).
pub fn open_moves_waiting(bpffs: &Path) -> Result<HashMap<MapData, u64, MoveWaiting>> {
    open_hash(&bpffs.join(MAPS_DIR), names::MOVES_WAITING).map(|(map, _)| map)
}

/// The pinned hash map `name` and its capacity (max_entries).
fn open_hash<K: Pod, V: Pod>(maps_dir: &Path, name: &str) -> Result<(HashMap<MapData, K, V>, u32)> {
    let path = maps_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let capacity = data
        .info()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .max_entries();
    let map = HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("{} is not the expected hash map", path.display()))?;
    Ok((map, capacity))
}

/// A map and its capacity.
type WithCapacity<M> = (M, u32);

/// [`open_hash`], `None` when nothing is pinned under `name`.
fn open_hash_if_pinned<K: Pod, V: Pod>(
    maps_dir: &Path,
    name: &str,
) -> Result<Option<WithCapacity<HashMap<MapData, K, V>>>> {
    if !maps_dir.join(name).exists() {
        return Ok(None);
    }
    open_hash(maps_dir, name).map(Some)
}

/// A map [`open_hash_if_pinned`] found missing, for a write.
fn not_pinned(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{name} is not pinned: the maps were created by an older grpclb; restart the agent, \
         whose load creates it"
    )
}

fn entries<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, name: &str) -> Result<Vec<(K, V)>> {
    map.iter()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {name}"))
}

fn lookup<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, key: &K, name: &str) -> Result<Option<V>> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {name}")),
    }
}

fn insert<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    value: &V,
    name: &'static str,
    capacity: u32,
) -> Result<()> {
    written(map.insert(key, value, 0), name, capacity)
}

/// A write's outcome: a hash map without preallocation refuses a new key
/// with E2BIG when full, which is [`MapFull`].
fn written(
    result: std::result::Result<(), MapError>,
    name: &'static str,
    capacity: u32,
) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            Err(MapFull {
                map: name,
                capacity,
            }
            .into())
        }
        Err(e) => Err(e).with_context(|| format!("writing {name}")),
    }
}

/// Removing what is already gone is fine.
fn remove<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, key: &K, name: &str) -> Result<()> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting from {name}")),
    }
}

impl ServiceTables for PinnedTables {
    fn capacities(&self) -> TableCapacities {
        self.capacities
    }
    fn slot_entries(&self) -> Result<usize> {
        if let Some(count) = self.slot_count.get() {
            return Ok(count);
        }
        let mut count = 0;
        for key in self.slots.keys() {
            key.context("reading BACKEND_SLOTS")?;
            count += 1;
        }
        self.slot_count.set(Some(count));
        Ok(count)
    }
    fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        entries(&self.frontends, names::FRONTENDS)
    }
    fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
        lookup(&self.frontends, key, names::FRONTENDS)
    }
    fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
        let capacity = self.capacities.frontends;
        insert(&mut self.frontends, key, entry, names::FRONTENDS, capacity)
    }
    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
        remove(&mut self.frontends, key, names::FRONTENDS)
    }
    fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>> {
        lookup(&self.slots, key, names::BACKEND_SLOTS)
    }
    fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()> {
        let capacity = self.capacities.slots;
        let Some(count) = self.slot_count.take() else {
            return insert(
                &mut self.slots,
                key,
                backend,
                names::BACKEND_SLOTS,
                capacity,
            );
        };
        // Only a new key changes the count: try that first.
        const BPF_NOEXIST: u64 = 1;
        match self.slots.insert(key, backend, BPF_NOEXIST) {
            Ok(()) => self.slot_count.set(Some(count + 1)),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                insert(
                    &mut self.slots,
                    key,
                    backend,
                    names::BACKEND_SLOTS,
                    capacity,
                )?;
                self.slot_count.set(Some(count));
            }
            Err(_) => insert(
                &mut self.slots,
                key,
                backend,
                names::BACKEND_SLOTS,
                capacity,
            )?,
        }
        Ok(())
    }
    fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        let Some(count) = self.slot_count.take() else {
            return remove(&mut self.slots, key, names::BACKEND_SLOTS);
        };
        match self.slots.remove(key) {
            Ok(()) => self.slot_count.set(Some(count - 1)),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                self.slot_count.set(Some(count))
            }
            Err(e) => return Err(e).context("deleting from BACKEND_SLOTS"),
        }
        Ok(())
    }
    fn loads(&self) -> Result<Vec<(Backend, u64)>> {
        Ok(entries(&self.loads, names::BACKEND_LOAD)?
            .into_iter()
            .map(|(backend, load)| (backend, load.connections))
            .collect())
    }
    fn load(&self, backend: &Backend) -> Result<Option<u64>> {
        Ok(lookup(&self.loads, backend, names::BACKEND_LOAD)?.map(|load| load.connections))
    }
    fn ensure_load(&mut self, backend: &Backend) -> Result<()> {
        let capacity = self.capacities.loads;
        ensure_count(&mut self.loads, backend, names::BACKEND_LOAD, capacity)
    }
    fn remove_load(&mut self, backend: &Backend) -> Result<()> {
        remove(&mut self.loads, backend, names::BACKEND_LOAD)
    }
    fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>> {
        entries(&self.names, names::SERVICE_NAMES)
    }
    fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()> {
        let capacity = self.capacities.names;
        insert(&mut self.names, key, name, names::SERVICE_NAMES, capacity)
    }
    fn remove_name(&mut self, key: &ServiceKey) -> Result<()> {
        remove(&mut self.names, key, names::SERVICE_NAMES)
    }
    fn views(&self) -> Result<Vec<(Backend, BackendView)>> {
        match &self.views {
            Some((map, _)) => entries(map, names::BACKEND_VIEW),
            None => Ok(Vec::new()),
        }
    }
    fn set_view(&mut self, backend: &Backend, view: &BackendView) -> Result<()> {
        let (map, capacity) = self
            .views
            .as_mut()
            .ok_or_else(|| not_pinned(names::BACKEND_VIEW))?;
        insert(map, backend, view, names::BACKEND_VIEW, *capacity)
    }
    fn remove_view(&mut self, backend: &Backend) -> Result<()> {
        let (map, _) = self
            .views
            .as_mut()
            .ok_or_else(|| not_pinned(names::BACKEND_VIEW))?;
        remove(map, backend, names::BACKEND_VIEW)
    }
}

/// Creates a zero count with a fresh epoch for `backend` in a
/// `BackendLoad` map unless it has one: `BPF_NOEXIST`, as an entry the
/// programs are counting in stays as it is (an update would replace it,
/// losing concurrent counts).
fn ensure_count(
    map: &mut HashMap<MapData, Backend, BackendLoad>,
    backend: &Backend,
    name: &'static str,
    capacity: u32,
) -> Result<()> {
    const BPF_NOEXIST: u64 = 1;
    let load = BackendLoad {
        connections: 0,
        epoch: new_epoch()?,
    };
    match map.insert(backend, load, BPF_NOEXIST) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        result => written(result, name, capacity),
    }
}

/// A random epoch for a new `BACKEND_LOAD` or `LOCAL_LOAD` entry: it only has to differ from
/// the epoch of any earlier entry of the same backend, across agent restarts
/// too.
fn new_epoch() -> Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(std::io::Error::last_os_error()).context("getrandom for a BACKEND_LOAD epoch");
    }
    Ok(u64::from_ne_bytes(bytes))
}

impl LocalBackendTable for PinnedTables {
    fn local_backends(&self) -> Result<Vec<(Backend, u32)>> {
        entries(&self.local, names::LOCAL_BACKENDS)
    }
    fn set_local_backend(&mut self, backend: &Backend, flags: u32) -> Result<()> {
        insert(
            &mut self.local,
            backend,
            &flags,
            names::LOCAL_BACKENDS,
            self.local_capacity,
        )
    }
    fn remove_local_backend(&mut self, backend: &Backend) -> Result<()> {
        remove(&mut self.local, backend, names::LOCAL_BACKENDS)
    }
    fn local_loads(&self) -> Result<Vec<(Backend, u64)>> {
        // Maps an older agent created have none to report (as `views`).
        let Some((map, _)) = &self.local_loads else {
            return Ok(Vec::new());
        };
        Ok(entries(map, names::LOCAL_LOAD)?
            .into_iter()
            .map(|(backend, load)| (backend, load.connections))
            .collect())
    }
    fn ensure_local_load(&mut self, backend: &Backend) -> Result<()> {
        let (map, capacity) = self
            .local_loads
            .as_mut()
            .ok_or_else(|| not_pinned(names::LOCAL_LOAD))?;
        ensure_count(map, backend, names::LOCAL_LOAD, *capacity)
    }
    fn remove_local_load(&mut self, backend: &Backend) -> Result<()> {
        let (map, _) = self
            .local_loads
            .as_mut()
            .ok_or_else(|| not_pinned(names::LOCAL_LOAD))?;
        remove(map, backend, names::LOCAL_LOAD)
    }
}
