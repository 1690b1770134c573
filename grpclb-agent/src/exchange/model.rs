//! What the data plane owner, the exchange and the planner pass each other.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use grpclb_common::Backend;

/// One pod's load, as the node that hosts it measures it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodLoad {
    /// Established connections the pod accepted, from every node, tracked
    /// or not (counted by `sock_ops` on the pod's own node).
    pub connections: u32,
    /// Completed calls per second, where the Service tracks frames.
    pub calls_per_second: Option<f32>,
}

/// The loads of this node's own pods (backends of balanced Services whose
/// EndpointSlice `nodeName` is this node): measured by the data plane
/// owner every snapshot interval, served to peers by the exchange.
pub type LocalLoads = BTreeMap<Backend, PodLoad>;

/// Every pod whose load this node knows, its own and its peers' (fresh
/// ones only: a peer's pods expire when it stops answering).
pub type ClusterView = BTreeMap<Backend, PodLoad>;

/// What the connect hook is to use per backend: the Service-wide load in
/// connection units (calls per second turned into connections where the
/// Service tracks frames), for every eligible backend of a Service the
/// view covers. A backend missing here is placed by this node's own
/// counts.
pub type PlacementLoads = BTreeMap<Backend, u32>;

/// One pod's load in a view: the load and the node that measured it (the
/// node hosting the pod, per its EndpointSlice `nodeName`), so a relayed
/// entry can be checked against the node it claims to come from.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub node: Arc<str>,
    pub load: PodLoad,
}

/// A view as the exchange holds, serves and relays it.
pub type Entries = BTreeMap<Backend, Entry>;

/// A backend's IP address, as peers name it on the wire.
pub fn backend_addr(backend: &Backend) -> SocketAddr {
    let bytes = backend.addr.0;
    let ip = if backend.addr.is_v4() {
        IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    SocketAddr::new(ip, backend.port)
}

pub fn backend_of(addr: SocketAddr) -> Backend {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => grpclb_common::Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => grpclb_common::Addr(v6.octets()),
    };
    Backend::new(ip, addr.port())
}
