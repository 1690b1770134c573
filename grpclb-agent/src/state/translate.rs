//! Kubernetes objects → [`DesiredState`]: which (ClusterIP, port) frontends
//! are balanced and which pods back them, as seen from one node (the
//! endpoint set of a frontend depends on the node and its zone: see
//! [`crate::state::topology`]).
//!
//! [`Cluster`] holds the objects in their compact forms
//! ([`crate::state::objects`]) grouped by Service, with each Service's
//! translation. A changed object marks its Service dirty; [`Cluster::update`]
//! translates the dirty Services only and replaces their entries in the
//! desired state, so one endpoint change costs one Service's translation
//! whatever the cluster's size. A frontend that is translated to what it was
//! keeps its `Arc`, which tells the sync it is unchanged.
//!
//! Two Services claiming the same (ClusterIP, port) is a problem; the lowest
//! `namespace/name` keeps the frontend whatever the order the objects came
//! in, and the other takes over when it goes. So applying changes one by one
//! gives the same state as translating the final objects at once
//! ([`translate`], which is that: every object applied to an empty
//! cluster).
//!
//! Pure and shared by the file source (which rejects input with any problem)
//! and the kube source (which logs problems and uses the rest).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use litemap::LiteMap;

use grpclb_common::{Addr, Backend, ServiceKey};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
use crate::state::objects::{wire_of, ServiceObject, ServicePort, SliceObject};
pub use crate::state::objects::{
    ENABLED_ANNOTATION, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, TRACK_FRAMES_ANNOTATION,
};
use crate::state::topology::{self, Candidate, NodeTopology};

/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `appProtocol` values that mark a port as gRPC (HTTP/2 over cleartext).
pub const GRPC_APP_PROTOCOLS: [&str; 3] = ["grpc", "h2c", "kubernetes.io/h2c"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    /// Human-readable, each naming the object and what is wrong with it.
    pub problems: Vec<String>,
}

/// Translates complete lists of objects at once: every object applied to an
/// empty [`Cluster`]. A Service listed twice is a problem (the first
/// counts).
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeTopology,
) -> Translation {
    let mut cluster = Cluster::new(node.clone());
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for service in services {
        match ServiceObject::from_wire(wire_of(service)) {
            Ok(s) if !seen.insert(s.id.clone()) => {
                problems.push(format!("Service {} appears more than once", s.id))
            }
            Ok(s) => {
                cluster.apply_service(s);
            }
            Err(problem) => problems.push(problem),
        }
    }
    for slice in slices {
        match SliceObject::from_wire(wire_of(slice)) {
            Ok(s) => {
                cluster.apply_slice(s);
            }
            Err(problem) => problems.push(problem),
        }
    }
    cluster.update();
    problems.extend(cluster.problems());
    Translation {
        state: cluster.state().clone(),
        problems,
    }
}

/// The objects of a cluster by Service, each Service's translation, and the
/// desired state they make.
#[derive(Debug, Default)]
pub struct Cluster {
    node: NodeTopology,
    /// By Service `namespace/name`; an entry lives while its Service or one
    /// of its slices does.
    entries: BTreeMap<String, Entry>,
    /// Slice `namespace/name` → the Service entry holding it.
    slice_owner: HashMap<String, String>,
    /// Services whose objects changed since the last [`Cluster::update`].
    dirty: BTreeSet<String>,
    /// Frontend → every Service translating to it; the first keeps it.
    claims: BTreeMap<ServiceKey, LiteMap<String, ()>>,
    /// Frontends claimed by more than one Service.
    conflicts: BTreeSet<ServiceKey>,
    /// Services whose translation has problems.
    with_problems: BTreeSet<String>,
    /// Every node name seen, once: 100,000 endpoints name a few thousand
    /// nodes, and each endpoint (in its slice and in the desired state)
    /// shares its node's name. Grows with the nodes ever seen, not with
    /// endpoints.
    node_names: HashSet<Arc<str>>,
    /// A Node's address changed since the last [`Cluster::update`].
    nodes_changed: bool,
    state: DesiredState,
}

#[derive(Debug, Default)]
struct Entry {
    /// Boxed: entries sit in a B-tree filled in key order (half its room
    /// spare), where a Service inline would take 128 bytes per slot.
    service: Option<Box<ServiceObject>>,
    slices: LiteMap<String, SliceObject>,
    translated: Translated,
}

/// One Service's share of the desired state.
#[derive(Debug, Default)]
struct Translated {
    frontends: LiteMap<ServiceKey, Frontend>,
    problems: Vec<String>,
    not_balanced: Option<String>,
}

#[derive(Debug)]
struct Frontend {
    /// `vip:port`, for problems.
    label: String,
    desired: Arc<DesiredService>,
}

impl Cluster {
    pub fn new(node: NodeTopology) -> Cluster {
        Cluster {
            node,
            ..Cluster::default()
        }
    }

    /// The desired state as of the last [`Cluster::update`].
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn node(&self) -> &NodeTopology {
        &self.node
    }

    /// A new node topology changes every Service's endpoint selection.
    pub fn set_node(&mut self, node: NodeTopology) {
        if node != self.node {
            self.node = node;
            self.dirty.extend(self.entries.keys().cloned());
        }
    }

    /// Changes not yet translated.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.nodes_changed
    }

    /// Sets (or, with `None`, removes) a Node's InternalIP in the state's
    /// `nodes`; false when it is unchanged.
    pub fn set_node_address(&mut self, name: &str, ip: Option<IpAddr>) -> bool {
        if self.state.nodes.get(name).copied() == ip {
            return false;
        }
        let nodes = Arc::make_mut(&mut self.state.nodes);
        match ip {
            Some(ip) => {
                let name = match self.node_names.get(name) {
                    Some(interned) => interned.clone(),
                    None => {
                        let name: Arc<str> = name.into();
                        self.node_names.insert(name.clone());
                        name
                    }
                };
                nodes.insert(name, ip);
            }
            None => drop(nodes.remove(name)),
        }
        self.nodes_changed = true;
        true
    }

    /// Names of the Nodes with an address.
    pub fn node_ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.state.nodes.keys()
    }

    /// Adds or replaces a Service; false when it is unchanged.
    pub fn apply_service(&mut self, service: ServiceObject) -> bool {
        let entry = self.entries.entry(service.id.clone()).or_default();
        if entry.service.as_deref() == Some(&service) {
            return false;
        }
        self.dirty.insert(service.id.clone());
        entry.service = Some(Box::new(service));
        true
    }

    pub fn delete_service(&mut self, id: &str) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) if entry.service.is_some() => {
                entry.service = None;
                self.dirty.insert(id.to_string());
                true
            }
            _ => false,
        }
    }

    /// Adds or replaces a slice (possibly moving it to another Service);
    /// false when nothing changed.
    pub fn apply_slice(&mut self, mut slice: SliceObject) -> bool {
        for endpoint in &mut slice.endpoints {
            if let Some(name) = &mut endpoint.node_name {
                match self.node_names.get(name) {
                    Some(shared) => *name = shared.clone(),
                    None => drop(self.node_names.insert(name.clone())),
                }
            }
        }
        let owner = slice.service.clone();
        if let Some(old) = self.slice_owner.get(&slice.id) {
            if Some(old) == owner.as_ref()
                && self.entries[old].slices.get(&slice.id) == Some(&slice)
            {
                return false;
            }
        }
        let moved = self.delete_slice(&slice.id);
        let Some(owner) = owner else {
            return moved;
        };
        self.dirty.insert(owner.clone());
        self.slice_owner.insert(slice.id.clone(), owner.clone());
        let slices = &mut self.entries.entry(owner).or_default().slices;
        if slices.is_empty() {
            // Most Services have one slice; a first insert would make room
            // for four (at 10,000 Services, 4.5 MB spare).
            *slices = LiteMap::with_capacity(1);
        }
        slices.insert(slice.id.clone(), slice);
        true
    }

    pub fn delete_slice(&mut self, id: &str) -> bool {
        let Some(owner) = self.slice_owner.remove(id) else {
            return false;
        };
        if let Some(entry) = self.entries.get_mut(&owner) {
            entry.slices.remove(id);
        }
        self.dirty.insert(owner);
        true
    }

    pub fn service(&self, id: &str) -> Option<&ServiceObject> {
        self.entries.get(id)?.service.as_deref()
    }

    pub fn slice(&self, id: &str) -> Option<&SliceObject> {
        self.entries.get(self.slice_owner.get(id)?)?.slices.get(id)
    }

    /// `namespace/name` of every Service held.
    pub fn service_ids(&self) -> impl Iterator<Item = &String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.service.is_some())
            .map(|(id, _)| id)
    }

    /// `namespace/name` of every slice held (slices of no Service are not).
    pub fn slice_ids(&self) -> impl Iterator<Item = &String> {
        self.slice_owner.keys()
    }

    /// Translates the dirty Services and replaces their frontends in the
    /// state; true when the state changed.
    pub fn update(&mut self) -> bool {
        let mut touched = BTreeSet::new();
        let mut changed = std::mem::take(&mut self.nodes_changed);
        for id in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            let new = translate_service(
                entry.service.as_deref(),
                entry.slices.values(),
                &self.node,
                &entry.translated,
            );
            let old = std::mem::replace(&mut entry.translated, new);
            let new = &entry.translated;
            for (key, frontend) in &old.frontends {
                match new.frontends.get(key) {
                    Some(now) if Arc::ptr_eq(&now.desired, &frontend.desired) => {}
                    Some(_) => {
                        touched.insert(*key);
                    }
                    None => {
                        touched.insert(*key);
                        if let Some(claimers) = self.claims.get_mut(key) {
                            claimers.remove(&id);
                            if claimers.is_empty() {
                                self.claims.remove(key);
                            }
                        }
                    }
                }
            }
            for key in new.frontends.keys() {
                if !old.frontends.contains_key(key) {
                    touched.insert(*key);
                    self.claims.entry(*key).or_default().insert(id.clone(), ());
                }
            }
            if old.not_balanced != new.not_balanced {
                changed = true;
                match &new.not_balanced {
                    Some(reason) => self.state.not_balanced.insert(id.clone(), reason.clone()),
                    None => self.state.not_balanced.remove(&id),
                };
            }
            if new.problems.is_empty() {
                self.with_problems.remove(&id);
            } else {
                self.with_problems.insert(id.clone());
            }
            if entry.service.is_none() && entry.slices.is_empty() {
                self.entries.remove(&id);
            }
        }
        for key in touched {
            let claimers = self.claims.get(&key);
            if claimers.is_some_and(|c| c.len() > 1) {
                self.conflicts.insert(key);
            } else {
                self.conflicts.remove(&key);
            }
            let winner = claimers
                .and_then(|c| c.first())
                .and_then(|(id, ())| self.entries.get(id))
                .and_then(|e| e.translated.frontends.get(&key));
            match winner {
                Some(frontend) => {
                    let current = self.state.services.get(&key);
                    if !current.is_some_and(|c| Arc::ptr_eq(c, &frontend.desired)) {
                        self.state.services.insert(key, frontend.desired.clone());
                        changed = true;
                    }
                }
                None => changed |= self.state.services.remove(&key).is_some(),
            }
        }
        changed
    }

    /// What is wrong with the objects as of the last [`Cluster::update`],
    /// ordered by Service.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<(&str, String)> = Vec::new();
        for id in &self.with_problems {
            let entry = &self.entries[id];
            problems.extend(
                entry
                    .translated
                    .problems
                    .iter()
                    .map(|p| (id.as_str(), p.clone())),
            );
        }
        for key in &self.conflicts {
            let mut claimers = self.claims[key].keys();
            let Some(winner) = claimers.next() else {
                continue;
            };
            let kept = &self.entries[winner].translated.frontends[key].desired.name;
            for loser in claimers {
                let label = &self.entries[loser].translated.frontends[key].label;
                problems.push((
                    loser,
                    format!("Service {loser}: frontend {label} is also claimed by {kept}; keeping {kept}"),
                ));
            }
        }
        problems.sort_by(|a, b| a.0.cmp(b.0));
        problems.into_iter().map(|(_, p)| p).collect()
    }
}

/// One Service's frontends, problems and not-balanced reason; frontends
/// equal to the `previous` translation's keep their `Arc`.
fn translate_service<'a>(
    service: Option<&ServiceObject>,
    slices: impl Iterator<Item = &'a SliceObject>,
    node: &NodeTopology,
    previous: &Translated,
) -> Translated {
    let slices: Vec<&SliceObject> = slices.collect();
    let mut t = Translated::default();
    for slice in &slices {
        t.problems.extend(slice.problems.iter().cloned());
    }
    let Some(service) = service else {
        return t;
    };
    let frontends = balanced_frontends(service, &mut t.problems);
    if frontends.is_empty() {
        return t;
    }
    if let Some(reason) = not_ours(service) {
        t.not_balanced = Some(reason);
        return t;
    }
    // Exactly as many as there may be: a map grown by inserts holds room
    // for four, and translations are kept.
    t.frontends = LiteMap::with_capacity(frontends.len());
    for (vip, port) in frontends {
        let key = ServiceKey::new(addr_of(vip), port.port as u16);
        let candidates = candidates_for(vip, port, &slices, &node.name);
        let (chosen, rule) = topology::select(
            &candidates
                .iter()
                .map(|(_, c)| c.clone())
                .collect::<Vec<_>>(),
            service.local_policy,
            node,
        );
        let desired = DesiredService {
            name: format!("{}:{}", service.id, port_label(port)),
            endpoints: classify(candidates, &chosen),
            track_frames: service.track_frames,
            rule,
        };
        let label = frontend_label(vip, port.port);
        if let Some(existing) = t.frontends.get(&key) {
            let kept = &existing.desired.name;
            t.problems.push(format!(
                "Service {}: frontend {label} is also claimed by {kept}; keeping {kept}",
                service.id
            ));
            continue;
        }
        let desired = match previous.frontends.get(&key) {
            Some(p) if *p.desired == desired => p.desired.clone(),
            _ => Arc::new(desired),
        };
        t.frontends.insert(key, Frontend { label, desired });
    }
    t
}

/// Logs each Service newly left to another proxy (or left for a new
/// reason) once, not on every translation; `reported` is what was logged.
pub fn report_not_balanced(reported: &mut BTreeMap<String, String>, state: &DesiredState) {
    for (service, reason) in newly_not_balanced(reported, state) {
        tracing::info!(%service, "not balanced: {reason}");
    }
    reported.clone_from(&state.not_balanced);
}

fn newly_not_balanced<'a>(
    reported: &BTreeMap<String, String>,
    state: &'a DesiredState,
) -> Vec<(&'a String, &'a String)> {
    state
        .not_balanced
        .iter()
        .filter(|(service, reason)| reported.get(*service) != Some(*reason))
        .collect()
}

/// Why a Service with balanced ports is still left to another proxy.
/// `sessionAffinity: ClientIP` needs per-client state the connect hook does
/// not keep, so kube-proxy (which honours it) keeps the Service.
fn not_ours(service: &ServiceObject) -> Option<String> {
    if let Some(proxy) = &service.proxy_name {
        return Some(format!(
            "labelled {SERVICE_PROXY_NAME_LABEL}={proxy}: left to that proxy"
        ));
    }
    if service.session_affinity.as_deref() == Some("ClientIP") {
        return Some("sessionAffinity: ClientIP: left to kube-proxy".to_string());
    }
    None
}

pub(crate) fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr(v6.octets()),
    }
}

fn port_label(port: &ServicePort) -> String {
    match &port.name {
        Some(name) => name.clone(),
        None => port.port.to_string(),
    }
}

fn frontend_label(vip: IpAddr, port: i32) -> String {
    match vip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Every (ClusterIP, balanced port) of the Service. Headless and
/// ExternalName Services have no ClusterIP and so no frontend.
fn balanced_frontends<'a>(
    service: &'a ServiceObject,
    problems: &mut Vec<String>,
) -> Vec<(IpAddr, &'a ServicePort)> {
    let id = &service.id;
    let ports: Vec<&ServicePort> = service
        .ports
        .iter()
        // The connect hooks balance TCP only.
        .filter(|p| p.tcp)
        .filter(|p| {
            service.enabled
                || p.app_protocol
                    .as_deref()
                    .is_some_and(|a| GRPC_APP_PROTOCOLS.contains(&a))
        })
        .collect();
    if ports.is_empty() {
        return Vec::new();
    }
    let mut valid_ports = Vec::new();
    for port in ports {
        if (1..=65535).contains(&port.port) {
            valid_ports.push(port);
        } else {
            problems.push(format!("Service {id}: port {} is out of range", port.port));
        }
    }
    let mut frontends = Vec::new();
    for ip in &service.cluster_ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(vip) => frontends.extend(valid_ports.iter().map(|p| (vip, *p))),
            Err(_) => problems.push(format!(
                "Service {id}: clusterIP {ip:?} is not an IP address"
            )),
        }
    }
    frontends
}

/// Endpoints of one frontend from the slices of the VIP's family, with
/// their node names. Slice ports match Service ports by name, and carry the
/// resolved target port.
fn candidates_for(
    vip: IpAddr,
    port: &ServicePort,
    slices: &[&SliceObject],
    node: &str,
) -> Vec<(Endpoint, Candidate)> {
    let wanted_name = port.name.as_deref();
    let mut by_backend: BTreeMap<Backend, (Endpoint, Candidate)> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.is_v4 == Some(vip.is_ipv4())) {
        let Some(&(_, target_port)) = slice
            .ports
            .iter()
            .find(|(name, _)| name.as_deref() == wanted_name)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let backend = Backend::new(addr_of(e.ip), target_port);
            let endpoint = Endpoint {
                backend,
                node_name: e.node_name.clone(),
                condition: EndpointCondition::Draining,
            };
            let candidate = e.candidate(node);
            by_backend
                .entry(backend)
                .and_modify(|existing| merge_duplicate(existing, &endpoint, &candidate))
                .or_insert((endpoint, candidate));
        }
    }
    by_backend.into_values().collect()
}

/// The same pod can appear in two slices while the controller moves it; the
/// more available entry wins (ready over serving), and a known node name is
/// kept.
fn merge_duplicate(
    existing: &mut (Endpoint, Candidate),
    endpoint: &Endpoint,
    candidate: &Candidate,
) {
    let rank = |c: &Candidate| (c.ready, c.serving);
    if rank(candidate) > rank(&existing.1) {
        existing.1 = candidate.clone();
    }
    if existing.0.node_name.is_none() {
        existing.0.node_name.clone_from(&endpoint.node_name);
    }
}

/// Chosen endpoints take new connections; of the others, ready ones stand
/// by (they serve other nodes) and terminating ones drain. Endpoints that
/// are neither ready nor serving were dropped with their slice.
fn classify(candidates: Vec<(Endpoint, Candidate)>, chosen: &[usize]) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = candidates
        .into_iter()
        .enumerate()
        .filter_map(|(i, (mut endpoint, candidate))| {
            endpoint.condition = if chosen.contains(&i) {
                EndpointCondition::Ready
            } else if candidate.ready {
                EndpointCondition::Standby
            } else if candidate.serving && candidate.terminating {
                EndpointCondition::Draining
            } else {
                return None;
            };
            Some(endpoint)
        })
        .collect();
    // Collected in place, into the larger candidates' buffer: kept for as
    // long as the Service is unchanged, so it is cut to size.
    endpoints.shrink_to_fit();
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::topology::Rule;
    use serde_json::json;

    fn tr(services: &[Service], slices: &[EndpointSlice]) -> Translation {
        let node = NodeTopology {
            name: "n1".into(),
            zone: None,
        };
        translate(services, slices, &node)
    }

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn grpc_service() -> Service {
        service(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "apps"},
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [
                    {"name": "grpc", "port": 50051, "protocol": "TCP", "appProtocol": "grpc", "targetPort": "grpc-port"},
                    {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9090}
                ]
            }
        }))
    }

    fn echo_slice(name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        slice(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "apps",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8443, "protocol": "TCP"},
                      {"name": "metrics", "port": 9090, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
    }

    fn v4(a: [u8; 4], port: u16) -> Backend {
        Backend::new(Addr::from_v4(a), port)
    }

    fn key4(a: [u8; 4], port: u16) -> ServiceKey {
        ServiceKey::new(Addr::from_v4(a), port)
    }

    fn ready(backend: Backend, node: Option<&str>) -> Endpoint {
        Endpoint {
            backend,
            node_name: node.map(Arc::from),
            condition: EndpointCondition::Ready,
        }
    }

    #[test]
    fn grpc_port_is_balanced_with_named_target_port_resolved_through_slice() {
        let slices = [echo_slice(
            "echo-abc",
            json!([
                {"addresses": ["10.0.0.6"], "conditions": {"ready": true}, "nodeName": "n2"},
                {"addresses": ["10.0.0.5"], "nodeName": "n1"}
            ]),
        )];
        let t = tr(&[grpc_service()], &slices);
        assert_eq!(t.problems, Vec::<String>::new());
        assert_eq!(t.state.services.len(), 1, "metrics port is not balanced");
        let svc = &t.state.services[&key4([10, 96, 0, 10], 50051)];
        assert_eq!(svc.name, "apps/echo:grpc");
        assert_eq!(
            svc.endpoints,
            vec![
                ready(v4([10, 0, 0, 5], 8443), Some("n1")),
                ready(v4([10, 0, 0, 6], 8443), Some("n2")),
            ]
        );
    }

    #[test]
    fn every_grpc_app_protocol_is_balanced_and_others_are_not() {
        let ports: Vec<_> = [
            "grpc",
            "h2c",
            "kubernetes.io/h2c",
            "http",
            "kubernetes.io/ws",
        ]
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"name": format!("p{i}"), "port": 1000 + i, "appProtocol": p}))
        .collect();
        let svc = service(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": ports}
        }));
        let t = tr(&[svc], &[]);
        let balanced: Vec<u16> = t.state.services.keys().map(|k| k.port).collect();
        assert_eq!(balanced, vec![1000, 1001, 1002]);
    }

    #[test]
    fn annotation_balances_every_tcp_port_but_not_udp() {
        let svc = service(json!({
            "metadata": {"name": "s", "namespace": "ns", "annotations": {"grpclb.io/enabled": "true"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [
                {"name": "a", "port": 80},
                {"name": "b", "port": 81, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]}
        }));
        let t = tr(&[svc], &[]);
        let balanced: Vec<u16> = t.state.services.keys().map(|k| k.port).collect();
        assert_eq!(balanced, vec![80, 81]);
        assert!(t.problems.is_empty());
    }

    #[test]
    fn frame_tracking_is_opt_in_per_service() {
        let svc = |annotations| {
            service(json!({
                "metadata": {"name": "s", "namespace": "ns", "annotations": annotations},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80, "appProtocol": "grpc"}]}
            }))
        };
        let tracks = |annotations| {
            let t = tr(&[svc(annotations)], &[]);
            t.state
                .services
                .values()
                .next()
                .expect("balanced")
                .track_frames
        };
        assert!(tracks(json!({"grpclb.io/track-frames": "true"})));
        assert!(!tracks(json!({})));
        assert!(!tracks(json!({"grpclb.io/track-frames": "yes"})));
    }

    #[test]
    fn annotation_other_than_true_does_not_enable() {
        let svc = service(json!({
            "metadata": {"name": "s", "namespace": "ns", "annotations": {"grpclb.io/enabled": "yes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}
        }));
        assert!(tr(&[svc], &[]).state.services.is_empty());
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontend() {
        let headless = service(json!({
            "metadata": {"name": "h", "namespace": "ns"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80, "appProtocol": "grpc"}]}
        }));
        let external = service(json!({
            "metadata": {"name": "e", "namespace": "ns"},
            "spec": {"type": "ExternalName", "externalName": "x.example", "ports": [{"port": 80, "appProtocol": "grpc"}]}
        }));
        let t = tr(&[headless, external], &[]);
        assert!(t.state.services.is_empty());
        assert!(t.problems.is_empty());
    }

    #[test]
    fn dual_stack_service_gets_a_frontend_per_family_fed_by_that_familys_slices() {
        let svc = service(json!({
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7", "fd00::7"],
                     "ports": [{"port": 50051, "appProtocol": "grpc"}]}
        }));
        let s4 = slice(json!({
            "metadata": {"name": "d-4", "namespace": "ns", "labels": {"kubernetes.io/service-name": "d"}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}]
        }));
        let s6 = slice(json!({
            "metadata": {"name": "d-6", "namespace": "ns", "labels": {"kubernetes.io/service-name": "d"}},
            "addressType": "IPv6", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["fd01::1"]}]
        }));
        let fqdn = slice(json!({
            "metadata": {"name": "d-f", "namespace": "ns", "labels": {"kubernetes.io/service-name": "d"}},
            "addressType": "FQDN", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["pod.example"]}]
        }));
        let t = tr(&[svc], &[s4, s6, fqdn]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let v6_vip: IpAddr = "fd00::7".parse().unwrap();
        let v6_pod: IpAddr = "fd01::1".parse().unwrap();
        let s = &t.state.services;
        assert_eq!(s.len(), 2);
        assert_eq!(s[&key4([10, 96, 0, 7], 50051)].name, "ns/d:50051");
        assert_eq!(
            s[&key4([10, 96, 0, 7], 50051)].endpoints,
            vec![ready(v4([10, 0, 0, 1], 8080), None)]
        );
        let v6 = &s[&ServiceKey::new(addr_of(v6_vip), 50051)];
        assert_eq!(v6.name, "ns/d:50051");
        assert_eq!(
            v6.endpoints,
            vec![ready(Backend::new(addr_of(v6_pod), 8080), None)]
        );
    }

    #[test]
    fn cluster_ip_is_used_when_cluster_ips_is_absent() {
        let svc = service(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 80, "appProtocol": "h2c"}]}
        }));
        let t = tr(&[svc], &[]);
        assert!(t.state.services.contains_key(&key4([10, 96, 0, 3], 80)));
    }

    #[test]
    fn conditions_map_to_ready_draining_or_dropped() {
        let slices = [echo_slice(
            "echo-abc",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": true}},
                {"addresses": ["10.0.0.6"], "conditions": {"ready": false}}
            ]),
        )];
        let t = tr(&[grpc_service()], &slices);
        let svc = &t.state.services[&key4([10, 96, 0, 10], 50051)];
        let got: Vec<(Backend, EndpointCondition)> = svc
            .endpoints
            .iter()
            .map(|e| (e.backend, e.condition))
            .collect();
        assert_eq!(
            got,
            vec![
                (v4([10, 0, 0, 1], 8443), EndpointCondition::Ready),
                (v4([10, 0, 0, 2], 8443), EndpointCondition::Draining),
                (v4([10, 0, 0, 3], 8443), EndpointCondition::Draining),
            ]
        );
        assert_eq!(svc.eligible(), vec![v4([10, 0, 0, 1], 8443)]);
    }

    #[test]
    fn slices_merge_and_duplicates_collapse_preferring_ready() {
        let a = echo_slice(
            "echo-a",
            json!([
                {"addresses": ["10.0.0.9"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.2"]}
            ]),
        );
        let b = echo_slice(
            "echo-b",
            json!([
                {"addresses": ["10.0.0.9"], "nodeName": "n9"},
                {"addresses": ["10.0.0.1", "10.0.0.2"]}
            ]),
        );
        let t = tr(&[grpc_service()], &[a, b]);
        let svc = &t.state.services[&key4([10, 96, 0, 10], 50051)];
        assert_eq!(
            svc.endpoints,
            vec![
                ready(v4([10, 0, 0, 1], 8443), None),
                ready(v4([10, 0, 0, 2], 8443), None),
                ready(v4([10, 0, 0, 9], 8443), Some("n9")),
            ]
        );
    }

    #[test]
    fn slices_of_other_services_or_namespaces_do_not_join() {
        let other_ns = slice(json!({
            "metadata": {"name": "echo-x", "namespace": "elsewhere",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": 1}],
            "endpoints": [{"addresses": ["10.0.1.1"]}]
        }));
        let other_svc = slice(json!({
            "metadata": {"name": "web-x", "namespace": "apps",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": 1}],
            "endpoints": [{"addresses": ["10.0.1.2"]}]
        }));
        let unlabelled = slice(json!({
            "metadata": {"name": "echo-y", "namespace": "apps"},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": 1}],
            "endpoints": [{"addresses": ["10.0.1.3"]}]
        }));
        let t = tr(&[grpc_service()], &[other_ns, other_svc, unlabelled]);
        let svc = &t.state.services[&key4([10, 96, 0, 10], 50051)];
        assert!(svc.endpoints.is_empty());
        assert!(t.problems.is_empty());
    }

    #[test]
    fn ports_match_by_name_and_unnamed_matches_unnamed() {
        let svc = service(json!({
            "metadata": {"name": "u", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80, "appProtocol": "grpc", "targetPort": 8080}]}
        }));
        let named = slice(json!({
            "metadata": {"name": "u-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "u"}},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": 9999}],
            "endpoints": [{"addresses": ["10.0.0.1"]}]
        }));
        let unnamed = slice(json!({
            "metadata": {"name": "u-2", "namespace": "ns", "labels": {"kubernetes.io/service-name": "u"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.2"]}]
        }));
        let t = tr(&[svc], &[named, unnamed]);
        assert_eq!(
            t.state.services[&key4([10, 96, 0, 2], 80)].endpoints,
            vec![ready(v4([10, 0, 0, 2], 8080), None)]
        );
    }

    #[test]
    fn slice_without_endpoints_gives_a_frontend_with_no_backends() {
        let empty = slice(json!({
            "metadata": {"name": "echo-e", "namespace": "apps", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4", "ports": null, "endpoints": null
        }));
        let t = tr(&[grpc_service()], &[empty]);
        assert!(t.state.services[&key4([10, 96, 0, 10], 50051)]
            .endpoints
            .is_empty());
        assert!(t.problems.is_empty());
    }

    #[test]
    fn wrong_family_and_garbage_addresses_are_problems_and_are_skipped() {
        let bad = echo_slice(
            "echo-bad",
            json!([
                {"addresses": ["fd00::1"]},
                {"addresses": ["10.0.0.300"]},
                {"addresses": ["10.0.0.1"]}
            ]),
        );
        let t = tr(&[grpc_service()], &[bad]);
        assert_eq!(
            t.problems,
            vec![
                "EndpointSlice apps/echo-bad: address fd00::1 does not match addressType IPv4",
                "EndpointSlice apps/echo-bad: address \"10.0.0.300\" is not an IP address",
            ]
        );
        assert_eq!(
            t.state.services[&key4([10, 96, 0, 10], 50051)].eligible(),
            vec![v4([10, 0, 0, 1], 8443)]
        );
    }

    #[test]
    fn not_ready_endpoints_are_still_validated() {
        let bad = echo_slice(
            "echo-bad",
            json!([{"addresses": ["nonsense"], "conditions": {"ready": false, "serving": false}}]),
        );
        assert_eq!(tr(&[grpc_service()], &[bad]).problems.len(), 1);
    }

    #[test]
    fn bad_cluster_ip_unknown_address_type_and_missing_names_are_problems() {
        let svc = service(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.999", "ports": [{"port": 80, "appProtocol": "grpc"}]}
        }));
        let nameless = service(json!({"metadata": {"namespace": "ns"}}));
        let odd = slice(json!({
            "metadata": {"name": "s-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPX", "endpoints": []
        }));
        let t = tr(&[svc, nameless], &[odd]);
        assert_eq!(
            t.problems,
            vec![
                "Service in namespace ns has no metadata.name",
                "EndpointSlice ns/s-1: addressType \"IPX\" is not IPv4, IPv6 or FQDN",
                "Service ns/s: clusterIP \"10.96.0.999\" is not an IP address",
            ]
        );
        assert!(t.state.services.is_empty());
    }

    #[test]
    fn duplicate_services_and_conflicting_frontends_are_problems() {
        let mut twin = grpc_service();
        twin.metadata.name = Some("echo2".into());
        let t = tr(&[grpc_service(), grpc_service(), twin], &[]);
        assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
        assert!(t.problems[0].contains("apps/echo appears more than once"));
        assert!(t.problems[1].contains("10.96.0.10:50051 is also claimed by apps/echo:grpc"));
        assert_eq!(t.state.services.len(), 1);
    }

    #[test]
    fn missing_namespace_means_default() {
        let svc = service(json!({
            "metadata": {"name": "s"},
            "spec": {"clusterIP": "10.96.0.4", "ports": [{"name": "g", "port": 80, "appProtocol": "grpc"}]}
        }));
        let sl = slice(json!({
            "metadata": {"name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "ports": [{"name": "g", "port": 81}],
            "endpoints": [{"addresses": ["10.0.0.1"]}]
        }));
        let t = tr(&[svc], &[sl]);
        let s = &t.state.services[&key4([10, 96, 0, 4], 80)];
        assert_eq!(s.name, "default/s:g");
        assert_eq!(s.eligible(), vec![v4([10, 0, 0, 1], 81)]);
    }

    /// `echo` with a spec field set, and one slice of (address, node,
    /// conditions, hints) endpoints.
    fn echo_with(
        spec: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> (Service, EndpointSlice) {
        let mut svc = serde_json::to_value(grpc_service()).unwrap();
        for (k, v) in spec.as_object().unwrap() {
            svc["spec"][k] = v.clone();
        }
        (service(svc), echo_slice("echo-1", endpoints))
    }

    fn conditions_of(svc: &DesiredService) -> Vec<(u8, EndpointCondition)> {
        svc.endpoints
            .iter()
            .map(|e| (e.backend.addr.0[15], e.condition))
            .collect()
    }

    fn translate_on(
        node: &str,
        zone: Option<&str>,
        svc: Service,
        slice: EndpointSlice,
    ) -> DesiredService {
        let node = NodeTopology {
            name: node.into(),
            zone: zone.map(str::to_string),
        };
        let t = translate(&[svc], &[slice], &node);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        (*t.state.services[&key4([10, 96, 0, 10], 50051)]).clone()
    }

    #[test]
    fn internal_traffic_policy_local_uses_this_nodes_endpoints_or_none() {
        let (svc, slice) = echo_with(
            json!({"internalTrafficPolicy": "Local"}),
            json!([
                {"addresses": ["10.0.0.1"], "nodeName": "n1"},
                {"addresses": ["10.0.0.2"], "nodeName": "n2"},
                {"addresses": ["10.0.0.3"], "nodeName": "n1",
                 "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]),
        );
        let on_n1 = translate_on("n1", None, svc.clone(), slice.clone());
        assert_eq!(on_n1.rule, Rule::LocalOnly);
        assert_eq!(
            conditions_of(&on_n1),
            vec![
                (1, EndpointCondition::Ready),
                (2, EndpointCondition::Standby),
                (3, EndpointCondition::Draining)
            ]
        );
        // No endpoint on n3: the frontend stays, with no backend, so the
        // connect is refused at once instead of going to kube-proxy's VIP.
        let on_n3 = translate_on("n3", None, svc, slice);
        assert_eq!(on_n3.rule, Rule::LocalOnly);
        assert_eq!(on_n3.eligible(), vec![]);
    }

    #[test]
    fn with_nothing_ready_the_serving_terminating_endpoints_take_connections() {
        let (svc, slice) = echo_with(
            json!({}),
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "terminating": true}}
            ]),
        );
        let svc = translate_on("n1", None, svc, slice);
        assert_eq!(svc.rule, Rule::TerminatingFallback);
        assert_eq!(
            conditions_of(&svc),
            vec![(1, EndpointCondition::Ready), (3, EndpointCondition::Ready)]
        );
    }

    #[test]
    fn zone_and_node_hints_narrow_the_set_as_kube_proxy_does() {
        let hinted = |zone: &str, node: &str| json!({"forZones": [{"name": zone}], "forNodes": [{"name": node}]});
        let (svc, slice) = echo_with(
            json!({"trafficDistribution": "PreferSameZone"}),
            json!([
                {"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z1", "hints": hinted("z1", "n1")},
                {"addresses": ["10.0.0.2"], "nodeName": "n2", "zone": "z1", "hints": hinted("z1", "n2")},
                {"addresses": ["10.0.0.3"], "nodeName": "n3", "zone": "z2", "hints": hinted("z2", "n3")}
            ]),
        );
        let on_n1 = translate_on("n1", Some("z1"), svc.clone(), slice.clone());
        assert_eq!(on_n1.rule, Rule::NodeHints("n1".into()));
        assert_eq!(on_n1.eligible(), vec![v4([10, 0, 0, 1], 8443)]);
        // n4 in z1 has no endpoint hinted for it: the zone's.
        let on_n4 = translate_on("n4", Some("z1"), svc.clone(), slice.clone());
        assert_eq!(on_n4.rule, Rule::ZoneHints("z1".into()));
        assert_eq!(
            conditions_of(&on_n4),
            vec![
                (1, EndpointCondition::Ready),
                (2, EndpointCondition::Ready),
                (3, EndpointCondition::Standby)
            ]
        );
        // A zone no endpoint is hinted for, or no zone: every ready endpoint.
        for zone in [Some("z9"), None] {
            let elsewhere = translate_on("n9", zone, svc.clone(), slice.clone());
            assert_eq!(elsewhere.rule, Rule::Ready);
            assert_eq!(elsewhere.eligible().len(), 3);
        }
    }

    #[test]
    fn client_ip_affinity_and_other_proxies_services_are_left_alone() {
        let mut affinity = grpc_service();
        affinity.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let mut other_proxy = grpc_service();
        other_proxy.metadata.name = Some("other".into());
        other_proxy.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.11".into());
        other_proxy.spec.as_mut().unwrap().cluster_ips = None;
        other_proxy.metadata.labels = Some(BTreeMap::from([(
            SERVICE_PROXY_NAME_LABEL.to_string(),
            "cilium".to_string(),
        )]));
        // Not balanced anyway: not listed.
        let plain = service(json!({
            "metadata": {"name": "plain", "namespace": "apps"},
            "spec": {"clusterIP": "10.96.0.12", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}
        }));
        let t = tr(&[affinity, other_proxy, plain], &[]);
        assert!(t.state.services.is_empty());
        assert_eq!(
            t.state.not_balanced,
            BTreeMap::from([
                (
                    "apps/echo".to_string(),
                    "sessionAffinity: ClientIP: left to kube-proxy".to_string()
                ),
                (
                    "apps/other".to_string(),
                    "labelled service.kubernetes.io/service-proxy-name=cilium: left to that proxy"
                        .to_string()
                ),
            ])
        );
        assert!(t.problems.is_empty());
    }

    #[test]
    fn each_family_chooses_its_endpoints_on_its_own() {
        let svc = service(json!({
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7", "fd00::7"],
                     "ports": [{"port": 50051, "appProtocol": "grpc"}]}
        }));
        let terminating4 = slice(json!({
            "metadata": {"name": "d-4", "namespace": "ns", "labels": {"kubernetes.io/service-name": "d"}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}}]
        }));
        let ready6 = slice(json!({
            "metadata": {"name": "d-6", "namespace": "ns", "labels": {"kubernetes.io/service-name": "d"}},
            "addressType": "IPv6", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["fd01::1"]}]
        }));
        let t = tr(&[svc], &[terminating4, ready6]);
        let v6_vip: IpAddr = "fd00::7".parse().unwrap();
        let s = &t.state.services;
        assert_eq!(
            s[&key4([10, 96, 0, 7], 50051)].rule,
            Rule::TerminatingFallback
        );
        assert_eq!(
            s[&ServiceKey::new(addr_of(v6_vip), 50051)].rule,
            Rule::Ready
        );
    }

    #[test]
    fn services_left_alone_are_reported_once_and_again_when_the_reason_changes() {
        let mut reported = BTreeMap::new();
        let mut state = DesiredState::default();
        state.not_balanced.insert("a/x".into(), "one".into());
        let new = |reported: &BTreeMap<String, String>, state: &DesiredState| -> Vec<String> {
            newly_not_balanced(reported, state)
                .into_iter()
                .map(|(s, r)| format!("{s}: {r}"))
                .collect()
        };
        assert_eq!(new(&reported, &state), ["a/x: one"]);
        report_not_balanced(&mut reported, &state);
        assert!(new(&reported, &state).is_empty());
        state.not_balanced.insert("a/x".into(), "two".into());
        assert_eq!(new(&reported, &state), ["a/x: two"]);
    }

    mod incremental {
        use super::*;
        use crate::state::objects::SliceEndpoint;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Service(ServiceObject),
            DeleteService(String),
            Slice(SliceObject),
            DeleteSlice(String),
            /// Translate and publish what changed so far.
            Update,
        }

        const SERVICES: [&str; 3] = ["x/a", "x/b", "y/a"];
        const SLICES: [&str; 4] = ["x/s1", "x/s2", "y/s3", "x/s4"];

        fn service() -> impl Strategy<Value = ServiceObject> {
            (
                0..SERVICES.len(),
                // Few VIPs and ports, so Services often claim the same frontend.
                prop::collection::vec(
                    prop::sample::select(vec!["10.96.0.1", "10.96.0.2", "fd00::1", "bad"]),
                    0..3,
                ),
                prop::collection::vec(
                    (
                        prop::option::of(prop::sample::select(vec!["g", "h"])),
                        prop::sample::select(vec![80, 81, 0]),
                    ),
                    0..3,
                ),
                any::<bool>(),
                prop::option::of(Just("ClientIP".to_string())),
            )
                .prop_map(|(i, ips, ports, local, affinity)| ServiceObject {
                    id: SERVICES[i].to_string(),
                    enabled: true,
                    track_frames: local,
                    proxy_name: None,
                    session_affinity: affinity,
                    local_policy: local,
                    cluster_ips: ips.into_iter().map(str::to_string).collect(),
                    ports: ports
                        .into_iter()
                        .map(|(name, port)| ServicePort {
                            name: name.map(str::to_string),
                            port,
                            tcp: true,
                            app_protocol: None,
                        })
                        .collect(),
                })
        }

        fn slice() -> impl Strategy<Value = SliceObject> {
            (
                0..SLICES.len(),
                prop::option::of(prop::sample::select(vec!["a", "b"])),
                any::<bool>(),
                prop::collection::vec(
                    (
                        1u8..5,
                        any::<bool>(),
                        any::<bool>(),
                        prop::option::of(prop::sample::select(vec!["n1", "n2"])),
                    ),
                    0..4,
                ),
            )
                .prop_map(|(i, service, v4, endpoints)| {
                    let id = SLICES[i].to_string();
                    let namespace = id.split_once('/').unwrap().0.to_string();
                    SliceObject {
                        service: service.map(|s| format!("{namespace}/{s}")),
                        is_v4: Some(v4),
                        ports: vec![(Some("g".into()), 8080), (None, 9090)],
                        endpoints: endpoints
                            .into_iter()
                            .map(|(n, ready, terminating, node)| SliceEndpoint {
                                ip: if v4 {
                                    IpAddr::from([10, 0, 0, n])
                                } else {
                                    IpAddr::from([0xfd01, 0, 0, 0, 0, 0, 0, u16::from(n)])
                                },
                                ready,
                                serving: ready || terminating,
                                terminating,
                                node_name: node.map(Arc::from),
                                hints: None,
                            })
                            .collect(),
                        problems: if i == 3 {
                            vec![format!("EndpointSlice {id}: odd")]
                        } else {
                            Vec::new()
                        },
                        id,
                    }
                })
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => service().prop_map(Op::Service),
                1 => prop::sample::select(SERVICES.to_vec()).prop_map(|s| Op::DeleteService(s.to_string())),
                3 => slice().prop_map(Op::Slice),
                1 => prop::sample::select(SLICES.to_vec()).prop_map(|s| Op::DeleteSlice(s.to_string())),
                2 => Just(Op::Update),
            ]
        }

        fn node() -> NodeTopology {
            NodeTopology::new("n1", None, None)
        }

        proptest! {
            /// Changes applied one by one, translated at random points,
            /// give the state and problems of translating the final objects
            /// at once; an unchanged frontend keeps its `Arc`.
            #[test]
            fn incremental_equals_from_scratch(ops in prop::collection::vec(op(), 1..40)) {
                let mut cluster = Cluster::new(node());
                let mut services: BTreeMap<String, ServiceObject> = BTreeMap::new();
                let mut slices: BTreeMap<String, SliceObject> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Service(s) => {
                            services.insert(s.id.clone(), s.clone());
                            cluster.apply_service(s);
                        }
                        Op::DeleteService(id) => {
                            services.remove(&id);
                            cluster.delete_service(&id);
                        }
                        Op::Slice(s) => {
                            slices.insert(s.id.clone(), s.clone());
                            cluster.apply_slice(s);
                        }
                        Op::DeleteSlice(id) => {
                            slices.remove(&id);
                            cluster.delete_slice(&id);
                        }
                        Op::Update => {
                            let before = cluster.state().clone();
                            cluster.update();
                            for (key, now) in &cluster.state().services {
                                if let Some(was) = before.services.get(key) {
                                    prop_assert!(**was != **now || Arc::ptr_eq(was, now), "equal frontend got a new Arc");
                                }
                            }
                        }
                    }
                }
                cluster.update();
                let mut scratch = Cluster::new(node());
                // Reverse order: the outcome must not depend on it.
                for s in services.into_values().rev() {
                    scratch.apply_service(s);
                }
                for s in slices.into_values().rev() {
                    scratch.apply_slice(s);
                }
                scratch.update();
                prop_assert_eq!(cluster.state(), scratch.state());
                prop_assert_eq!(cluster.problems(), scratch.problems());
            }
        }
    }
}
