//! What the maps should hold, independent of where it came from (file or
//! Kubernetes API) and of how the maps store it.

use std::collections::BTreeMap;

use grpclb_common::{Backend, ServiceKey};

/// Every balanced frontend with its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceKey, DesiredService>,
}

/// One balanced (ClusterIP, port) of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name` (or `:port-number` for unnamed ports).
    pub name: String,
    /// Sorted by backend, no duplicates.
    pub endpoints: Vec<Endpoint>,
    /// Follow the HTTP/2 frames of connections this node's pods accept
    /// (annotation `grpclb.io/track-frames: "true"`).
    pub track_frames: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub backend: Backend,
    /// EndpointSlice `nodeName`: tells which backends are pods on this node.
    pub node_name: Option<String>,
    pub condition: EndpointCondition,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndpointCondition {
    /// Eligible for new connections.
    Ready,
    /// Serving and terminating: no new connections; existing ones drain.
    Draining,
}

impl DesiredService {
    /// Backends that take new connections, in a stable order.
    pub fn eligible(&self) -> Vec<Backend> {
        self.endpoints
            .iter()
            .filter(|e| e.condition == EndpointCondition::Ready)
            .map(|e| e.backend)
            .collect()
    }
}
