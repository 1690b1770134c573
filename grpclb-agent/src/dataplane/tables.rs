//! The balancer's maps as the sync logic sees them.
//!
//! `sync` is written against [`ServiceTables`] so it can be unit-tested with
//! [`MemoryTables`]; `dataplane` implements it over the pinned eBPF maps.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Result;
use grpclb_common::{
    names, Backend, BackendSlotKey, BackendView, ServiceEntry, ServiceKey, ServiceName,
    TrackedConnection,
};

/// How many entries each map the sync writes can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableCapacities {
    pub frontends: u32,
    pub names: u32,
    pub slots: u32,
    pub loads: u32,
}

impl TableCapacities {
    pub const UNLIMITED: TableCapacities = TableCapacities {
        frontends: u32::MAX,
        names: u32::MAX,
        slots: u32::MAX,
        loads: u32::MAX,
    };
}

/// The `grpclb-agent run` flag that sizes `map` (the pinned map keeps the
/// size it was created with: raising it takes an uninstall).
pub fn capacity_flag(map: &str) -> &'static str {
    match map {
        names::FRONTENDS | names::SERVICE_NAMES => "--max-frontends",
        names::BACKEND_SLOTS => "--max-backend-slots",
        names::BACKEND_LOAD | names::BACKEND_VIEW => "--max-backends",
        names::LOCAL_BACKENDS | names::LOCAL_LOAD => "--max-local-backends",
        names::TRACKED => "--max-tracked-connections",
        _ => "the --max-* flags",
    }
}

/// A write of a new key refused because the map holds all it can.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFull {
    pub map: &'static str,
    pub capacity: u32,
}

impl fmt::Display for MapFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is full ({} entries; raise {})",
            self.map,
            self.capacity,
            capacity_flag(self.map)
        )
    }
}

impl std::error::Error for MapFull {}

pub trait ServiceTables {
    /// What the maps can hold (for a pinned map: the size it was created
    /// with, whatever the flags now say).
    fn capacities(&self) -> TableCapacities;
    /// Entries in `BACKEND_SLOTS` now, both slots of every frontend.
    fn slot_entries(&self) -> Result<usize>;

    fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>>;
    fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>>;
    fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()>;
    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()>;

    fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>>;
    fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()>;
    fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()>;

    /// Live connection counts per backend on this node.
    fn loads(&self) -> Result<Vec<(Backend, u64)>>;
    /// The live connection count of one backend; `None`: no entry.
    fn load(&self, backend: &Backend) -> Result<Option<u64>>;
    /// Creates a zero count for `backend` unless it already has one (the
    /// eBPF side only counts backends that have an entry).
    fn ensure_load(&mut self, backend: &Backend) -> Result<()>;
    fn remove_load(&mut self, backend: &Backend) -> Result<()>;

    fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>>;
    fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()>;
    fn remove_name(&mut self, key: &ServiceKey) -> Result<()>;

    /// `BACKEND_VIEW`: the Service-wide loads the connect hook uses while
    /// they are fresh (the owner writes them; `status` shows them).
    fn views(&self) -> Result<Vec<(Backend, BackendView)>>;
    fn set_view(&mut self, backend: &Backend, view: &BackendView) -> Result<()>;
    fn remove_view(&mut self, backend: &Backend) -> Result<()>;
}

/// The backends that are pods on this node (`LOCAL_BACKENDS`, with a
/// `local_backend` flag each): the kernel counts the connections they
/// accept (`LOCAL_LOAD`) and follows the frames of those flagged.
pub trait LocalBackendTable {
    fn local_backends(&self) -> Result<Vec<(Backend, u32)>>;
    /// Adds `backend` or changes its flag.
    fn set_local_backend(&mut self, backend: &Backend, flags: u32) -> Result<()>;
    fn remove_local_backend(&mut self, backend: &Backend) -> Result<()>;

    /// `LOCAL_LOAD`: accepted connections per local backend.
    fn local_loads(&self) -> Result<Vec<(Backend, u64)>>;
    /// Creates a zero count for `backend` unless it already has one.
    fn ensure_local_load(&mut self, backend: &Backend) -> Result<()>;
    fn remove_local_load(&mut self, backend: &Backend) -> Result<()>;
}

/// `TRACKED`: the connections of local pods whose frames the kernel
/// follows, by socket cookie (the programs write it, the agent reads it).
pub trait TrackedTable {
    fn tracked_connections(&self) -> Result<Vec<(u64, TrackedConnection)>>;
    /// `None` once the connection closed.
    fn tracked_connection(&self, cookie: u64) -> Result<Option<TrackedConnection>>;
}

/// In-memory tables for tests of the sync logic. Like a kernel hash map,
/// each refuses a new key once it holds its capacity; updates of present
/// keys always succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryTables {
    pub frontends: BTreeMap<ServiceKey, ServiceEntry>,
    pub slots: BTreeMap<BackendSlotKey, Backend>,
    pub loads: BTreeMap<Backend, u64>,
    pub names: BTreeMap<ServiceKey, ServiceName>,
    pub local: BTreeMap<Backend, u32>,
    pub local_loads: BTreeMap<Backend, u64>,
    pub views: BTreeMap<Backend, BackendView>,
    pub capacities: TableCapacities,
}

impl Default for MemoryTables {
    fn default() -> Self {
        MemoryTables::with_capacities(TableCapacities::UNLIMITED)
    }
}

impl MemoryTables {
    pub fn with_capacities(capacities: TableCapacities) -> Self {
        MemoryTables {
            frontends: BTreeMap::new(),
            slots: BTreeMap::new(),
            loads: BTreeMap::new(),
            names: BTreeMap::new(),
            local: BTreeMap::new(),
            local_loads: BTreeMap::new(),
            views: BTreeMap::new(),
            capacities,
        }
    }
}

/// Inserts or updates `key` unless that needs an entry `map` has no room for.
fn bounded_insert<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    name: &'static str,
    capacity: u32,
    key: K,
    value: V,
) -> Result<()> {
    if !map.contains_key(&key) && map.len() >= capacity as usize {
        return Err(MapFull {
            map: name,
            capacity,
        }
        .into());
    }
    map.insert(key, value);
    Ok(())
}

/// No program writes these: no connection is ever tracked.
impl TrackedTable for MemoryTables {
    fn tracked_connections(&self) -> Result<Vec<(u64, TrackedConnection)>> {
        Ok(Vec::new())
    }
    fn tracked_connection(&self, _cookie: u64) -> Result<Option<TrackedConnection>> {
        Ok(None)
    }
}

impl LocalBackendTable for MemoryTables {
    fn local_backends(&self) -> Result<Vec<(Backend, u32)>> {
        Ok(self.local.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_local_backend(&mut self, backend: &Backend, flags: u32) -> Result<()> {
        self.local.insert(*backend, flags);
        Ok(())
    }
    fn remove_local_backend(&mut self, backend: &Backend) -> Result<()> {
        self.local.remove(backend);
        Ok(())
    }
    fn local_loads(&self) -> Result<Vec<(Backend, u64)>> {
        Ok(self.local_loads.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn ensure_local_load(&mut self, backend: &Backend) -> Result<()> {
        self.local_loads.entry(*backend).or_insert(0);
        Ok(())
    }
    fn remove_local_load(&mut self, backend: &Backend) -> Result<()> {
        self.local_loads.remove(backend);
        Ok(())
    }
}

impl ServiceTables for MemoryTables {
    fn capacities(&self) -> TableCapacities {
        self.capacities
    }
    fn slot_entries(&self) -> Result<usize> {
        Ok(self.slots.len())
    }
    fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
        Ok(self.frontends.get(key).copied())
    }
    fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
        let capacity = self.capacities.frontends;
        bounded_insert(
            &mut self.frontends,
            names::FRONTENDS,
            capacity,
            *key,
            *entry,
        )
    }
    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
        self.frontends.remove(key);
        Ok(())
    }
    fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>> {
        Ok(self.slots.get(key).copied())
    }
    fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()> {
        let capacity = self.capacities.slots;
        bounded_insert(
            &mut self.slots,
            names::BACKEND_SLOTS,
            capacity,
            *key,
            *backend,
        )
    }
    fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        self.slots.remove(key);
        Ok(())
    }
    fn loads(&self) -> Result<Vec<(Backend, u64)>> {
        Ok(self.loads.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn load(&self, backend: &Backend) -> Result<Option<u64>> {
        Ok(self.loads.get(backend).copied())
    }
    fn ensure_load(&mut self, backend: &Backend) -> Result<()> {
        let count = self.loads.get(backend).copied().unwrap_or(0);
        let capacity = self.capacities.loads;
        bounded_insert(
            &mut self.loads,
            names::BACKEND_LOAD,
            capacity,
            *backend,
            count,
        )
    }
    fn remove_load(&mut self, backend: &Backend) -> Result<()> {
        self.loads.remove(backend);
        Ok(())
    }
    fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>> {
        Ok(self.names.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()> {
        let capacity = self.capacities.names;
        bounded_insert(&mut self.names, names::SERVICE_NAMES, capacity, *key, *name)
    }
    fn remove_name(&mut self, key: &ServiceKey) -> Result<()> {
        self.names.remove(key);
        Ok(())
    }
    fn views(&self) -> Result<Vec<(Backend, BackendView)>> {
        Ok(self.views.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_view(&mut self, backend: &Backend, view: &BackendView) -> Result<()> {
        let capacity = self.capacities.loads;
        bounded_insert(
            &mut self.views,
            names::BACKEND_VIEW,
            capacity,
            *backend,
            *view,
        )
    }
    fn remove_view(&mut self, backend: &Backend) -> Result<()> {
        self.views.remove(backend);
        Ok(())
    }
}
