//! grpclb node agent: keeps the connect-time balancer's maps in sync with
//! the Services and EndpointSlices it is fed.
//!
//! The data flows through the folders in order: `sources` → `state` →
//! `dataplane` (maps → kernel); `rebalance` moves connections; `observe`
//! reports on all of it.

pub mod cli;
pub mod dataplane;
pub mod exchange;
pub mod memory;
pub mod observe;
pub mod rebalance;
pub mod sources;
pub mod state;
#[cfg(test)]
mod testing;
