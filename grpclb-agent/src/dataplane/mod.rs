//! The kernel side as the agent sees it: loading and pinning the programs
//! (`loader`), the pinned maps (`pinned`, behind the `tables` traits), the
//! sync that makes the maps hold the desired state (`sync`), and the one
//! component that holds the maps while the agent runs (`owner`), serving
//! [`snapshot::Snapshot`]s to the rest.

pub mod btf;
pub mod cgroup;
pub mod loader;
pub mod owner;
pub mod pinned;
pub mod pinned_link;
pub mod snapshot;
pub mod sync;
pub mod tables;
pub mod view;
