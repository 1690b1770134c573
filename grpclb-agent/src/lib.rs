//! grpclb node agent: keeps the connect-time balancer's maps in sync with
//! the Services and EndpointSlices it is fed.

pub mod cgroup;
pub mod cli;
pub mod dataplane;
pub mod file_source;
pub mod kube_source;
pub mod metrics;
pub mod model;
pub mod pinned_link;
pub mod rebalance;
pub mod status;
pub mod sync;
pub mod tables;
pub mod translate;
