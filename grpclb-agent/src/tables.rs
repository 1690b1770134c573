//! The balancer's maps as the sync logic sees them.
//!
//! `sync` is written against [`ServiceTables`] so it can be unit-tested with
//! [`MemoryTables`]; `dataplane` implements it over the pinned eBPF maps.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use grpclb_common::{Backend, BackendSlotKey, ServiceEntry, ServiceKey, ServiceName};

pub trait ServiceTables {
    fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>>;
    fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>>;
    fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()>;
    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()>;

    fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>>;
    fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()>;
    fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()>;

    /// Live connection counts per backend on this node.
    fn loads(&self) -> Result<Vec<(Backend, u64)>>;
    /// Creates a zero count for `backend` unless it already has one (the
    /// eBPF side only counts backends that have an entry).
    fn ensure_load(&mut self, backend: &Backend) -> Result<()>;
    fn remove_load(&mut self, backend: &Backend) -> Result<()>;

    fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>>;
    fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()>;
    fn remove_name(&mut self, key: &ServiceKey) -> Result<()>;
}

/// The backends that are pods on this node: the kernel follows the frames
/// of the connections they accept.
pub trait LocalBackendTable {
    fn local_backends(&self) -> Result<Vec<Backend>>;
    fn add_local_backend(&mut self, backend: &Backend) -> Result<()>;
    fn remove_local_backend(&mut self, backend: &Backend) -> Result<()>;
}

/// In-memory tables for tests of the sync logic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryTables {
    pub frontends: BTreeMap<ServiceKey, ServiceEntry>,
    pub slots: BTreeMap<BackendSlotKey, Backend>,
    pub loads: BTreeMap<Backend, u64>,
    pub names: BTreeMap<ServiceKey, ServiceName>,
    pub local: BTreeSet<Backend>,
}

impl LocalBackendTable for MemoryTables {
    fn local_backends(&self) -> Result<Vec<Backend>> {
        Ok(self.local.iter().copied().collect())
    }
    fn add_local_backend(&mut self, backend: &Backend) -> Result<()> {
        self.local.insert(*backend);
        Ok(())
    }
    fn remove_local_backend(&mut self, backend: &Backend) -> Result<()> {
        self.local.remove(backend);
        Ok(())
    }
}

impl ServiceTables for MemoryTables {
    fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn frontend(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
        Ok(self.frontends.get(key).copied())
    }
    fn set_frontend(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
        self.frontends.insert(*key, *entry);
        Ok(())
    }
    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
        self.frontends.remove(key);
        Ok(())
    }
    fn slot(&self, key: &BackendSlotKey) -> Result<Option<Backend>> {
        Ok(self.slots.get(key).copied())
    }
    fn set_slot(&mut self, key: &BackendSlotKey, backend: &Backend) -> Result<()> {
        self.slots.insert(*key, *backend);
        Ok(())
    }
    fn remove_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        self.slots.remove(key);
        Ok(())
    }
    fn loads(&self) -> Result<Vec<(Backend, u64)>> {
        Ok(self.loads.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn ensure_load(&mut self, backend: &Backend) -> Result<()> {
        self.loads.entry(*backend).or_insert(0);
        Ok(())
    }
    fn remove_load(&mut self, backend: &Backend) -> Result<()> {
        self.loads.remove(backend);
        Ok(())
    }
    fn names(&self) -> Result<Vec<(ServiceKey, ServiceName)>> {
        Ok(self.names.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_name(&mut self, key: &ServiceKey, name: &ServiceName) -> Result<()> {
        self.names.insert(*key, *name);
        Ok(())
    }
    fn remove_name(&mut self, key: &ServiceKey) -> Result<()> {
        self.names.remove(key);
        Ok(())
    }
}
