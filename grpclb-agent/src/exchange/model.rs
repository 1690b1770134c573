//! What the data plane owner, the exchange and the planner pass each other.

use std::collections::BTreeMap;

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
