//! What the maps should hold, independent of where it came from (file or
//! Kubernetes API) and of how the maps store it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use grpclb_common::{Backend, ServiceKey};

use crate::state::topology::Rule;

/// Every balanced frontend with its endpoints.
///
/// Each frontend is shared (`Arc`): a source that changes one Service builds
/// the next state from the last one by replacing that Service's entries
/// only, and the sync tells what changed by pointer before it compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceKey, Arc<DesiredService>>,
    /// Services with balanced ports that grpclb leaves to another proxy
    /// (`namespace/name` → why).
    pub not_balanced: BTreeMap<String, String>,
    /// Every Node with an InternalIP (name → address): the load exchange's
    /// peers and this node's own address. Shared, as a state is cloned at
    /// every publish and the map only changes when Nodes do.
    pub nodes: Arc<BTreeMap<Arc<str>, IpAddr>>,
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
    /// Which rule chose the endpoints in [`EndpointCondition::Ready`].
    pub rule: Rule,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub backend: Backend,
    /// EndpointSlice `nodeName`: tells which backends are pods on this node.
    pub node_name: Option<Arc<str>>,
    pub condition: EndpointCondition,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndpointCondition {
    /// Takes this node's new connections: chosen by the Service's
    /// [`Rule`], which is usually "ready", but may be "serving and
    /// terminating" when nothing is ready (then it must not be drained).
    Ready,
    /// Ready, but the Service's topology (hints, `internalTrafficPolicy:
    /// Local`) sends this node's new connections elsewhere. It serves other
    /// nodes' clients, so its connections are not drained.
    Standby,
    /// Serving and terminating, not chosen: no new connections; existing
    /// ones drain.
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
