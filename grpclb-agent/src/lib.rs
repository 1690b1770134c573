//! grpclb node agent: keeps the connect-time balancer's maps in sync with
//! the Services and EndpointSlices it is fed.

pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod dataplane;
pub mod file_source;
pub mod inject;
pub mod kube_source;
pub mod metrics;
pub mod model;
pub mod mover;
pub mod pinned_link;
pub mod readiness;
pub mod rebalance;
pub mod status;
pub mod sync;
pub mod tables;
#[cfg(test)]
mod testing;
pub mod topology;
pub mod translate;
