//! grpclb node agent: keeps the connect-time balancer's maps in sync with
//! the Services and EndpointSlices it is fed.

pub mod model;
pub mod tables;
