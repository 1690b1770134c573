//! Kubernetes objects → [`DesiredState`]: which (ClusterIP, port) frontends
//! are balanced and which pods back them, as seen from one node (the
//! endpoint set of a frontend depends on the node and its zone: see
//! [`crate::state::topology`]).
//!
//! Pure and shared by the file source (which rejects input with any problem)
//! and the kube source (which logs problems and uses the rest).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use grpclb_common::{Addr, Backend, ServiceKey};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
use crate::state::topology::{self, Candidate, NodeTopology};

/// Label by which the EndpointSlice controller ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service to a named service proxy other than the
/// default one; kube-proxy, and so grpclb, leaves it alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation that balances every TCP port of a Service, whatever its
/// `appProtocol`.
pub const ENABLED_ANNOTATION: &str = "grpclb.io/enabled";
/// Annotation that has the kernel follow the HTTP/2 frames of connections
/// the Service's pods accept (per-pod response metrics; the basis of
/// graceful rebalancing). Opt-in: it costs unary-heavy servers several
/// percent of their throughput (`cargo xtask bench tracker`).
pub const TRACK_FRAMES_ANNOTATION: &str = "grpclb.io/track-frames";
/// `appProtocol` values that mark a port as gRPC (HTTP/2 over cleartext).
pub const GRPC_APP_PROTOCOLS: [&str; 3] = ["grpc", "h2c", "kubernetes.io/h2c"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    /// Human-readable, each naming the object and what is wrong with it.
    pub problems: Vec<String>,
}

pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeTopology,
) -> Translation {
    let mut problems = Vec::new();
    let slices = index_slices(slices, &mut problems);
    let mut state = DesiredState::default();
    let mut seen_services = BTreeSet::new();
    for service in services {
        let Some(id) = object_id(&service.metadata, "Service", &mut problems) else {
            continue;
        };
        if !seen_services.insert(id.clone()) {
            problems.push(format!("Service {id} appears more than once"));
            continue;
        }
        let frontends = balanced_frontends(service, &id, &mut problems);
        if frontends.is_empty() {
            continue;
        }
        if let Some(reason) = not_ours(service) {
            state.not_balanced.insert(id, reason);
            continue;
        }
        let local_policy = service
            .spec
            .as_ref()
            .and_then(|s| s.internal_traffic_policy.as_deref())
            == Some("Local");
        let track_frames = annotation_is_true(service, TRACK_FRAMES_ANNOTATION);
        let service_slices = slices.get(&id).map(Vec::as_slice).unwrap_or_default();
        for (vip, port) in frontends {
            let key = ServiceKey::new(addr_of(vip), port.port as u16);
            let candidates = candidates_for(vip, port, service_slices, &node.name);
            let (chosen, rule) = topology::select(
                &candidates
                    .iter()
                    .map(|(_, c)| c.clone())
                    .collect::<Vec<_>>(),
                local_policy,
                node,
            );
            let desired = DesiredService {
                name: format!("{id}:{}", port_label(port)),
                endpoints: classify(candidates, &chosen),
                track_frames,
                rule,
            };
            if let Some(existing) = state.services.get(&key) {
                problems.push(format!(
                    "Service {id}: frontend {} is also claimed by {}; keeping {}",
                    frontend_label(vip, port.port),
                    existing.name,
                    existing.name
                ));
                continue;
            }
            state.services.insert(key, desired.into());
        }
    }
    Translation { state, problems }
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
fn not_ours(service: &Service) -> Option<String> {
    if let Some(proxy) = service
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        return Some(format!(
            "labelled {SERVICE_PROXY_NAME_LABEL}={proxy}: left to that proxy"
        ));
    }
    let affinity = service
        .spec
        .as_ref()
        .and_then(|s| s.session_affinity.as_deref());
    if affinity == Some("ClientIP") {
        return Some("sessionAffinity: ClientIP: left to kube-proxy".to_string());
    }
    None
}

/// `namespace/name`; objects without a namespace are in `default`, as
/// `kubectl apply` would put them.
fn object_id(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Some(format!("{namespace}/{name}")),
        _ => {
            problems.push(format!(
                "{kind} in namespace {namespace} has no metadata.name"
            ));
            None
        }
    }
}

pub(crate) fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr(v6.octets()),
    }
}

fn port_label(port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => port.port.to_string(),
    }
}

fn frontend_label(vip: IpAddr, port: i32) -> String {
    match vip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn annotation_is_true(service: &Service, name: &str) -> bool {
    service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .is_some_and(|v| v == "true")
}

/// Every (ClusterIP, balanced port) of the Service. Headless and
/// ExternalName Services have no ClusterIP and so no frontend.
fn balanced_frontends<'a>(
    service: &'a Service,
    id: &str,
    problems: &mut Vec<String>,
) -> Vec<(IpAddr, &'a ServicePort)> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let enabled = annotation_is_true(service, ENABLED_ANNOTATION);
    let ports: Vec<&ServicePort> = spec
        .ports
        .iter()
        .flatten()
        // The connect hooks balance TCP only.
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter(|p| {
            enabled
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
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.iter().map(String::as_str).collect(),
    };
    let mut frontends = Vec::new();
    for ip in cluster_ips {
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

/// One endpoint address of a slice, its conditions and hints.
struct SliceEndpoint {
    ip: IpAddr,
    node_name: Option<String>,
    candidate: Candidate,
}

/// A slice reduced to what the translation needs, its addresses checked.
struct CheckedSlice {
    is_v4: bool,
    /// (port name, resolved target port)
    ports: Vec<(Option<String>, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

/// Slices grouped by the `namespace/name` of the Service they belong to.
/// Slices without the service-name label are not managed by the
/// EndpointSlice controller for a Service and are ignored, as are FQDN
/// slices.
fn index_slices(
    slices: &[EndpointSlice],
    problems: &mut Vec<String>,
) -> BTreeMap<String, Vec<CheckedSlice>> {
    let mut index: BTreeMap<String, Vec<CheckedSlice>> = BTreeMap::new();
    for slice in slices {
        let Some(id) = object_id(&slice.metadata, "EndpointSlice", problems) else {
            continue;
        };
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let is_v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            "FQDN" => continue,
            other => {
                problems.push(format!(
                    "EndpointSlice {id}: addressType {other:?} is not IPv4, IPv6 or FQDN"
                ));
                continue;
            }
        };
        let checked = check_slice(slice, &id, is_v4, problems);
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        index
            .entry(format!("{namespace}/{service}"))
            .or_default()
            .push(checked);
    }
    index
}

fn check_slice(
    slice: &EndpointSlice,
    id: &str,
    is_v4: bool,
    problems: &mut Vec<String>,
) -> CheckedSlice {
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        let name = port.name.clone().filter(|n| !n.is_empty());
        match port.port {
            Some(number) if (1..=65535).contains(&number) => ports.push((name, number as u16)),
            Some(number) => problems.push(format!(
                "EndpointSlice {id}: port {} number {number} is out of range",
                name.as_deref().unwrap_or("(unnamed)")
            )),
            None => problems.push(format!(
                "EndpointSlice {id}: port {} has no number",
                name.as_deref().unwrap_or("(unnamed)")
            )),
        }
    }
    let mut endpoints = Vec::new();
    for endpoint in &slice.endpoints {
        let candidate = candidate_of(endpoint);
        for address in &endpoint.addresses {
            let ip = match address.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => {
                    problems.push(format!(
                        "EndpointSlice {id}: address {address:?} is not an IP address"
                    ));
                    continue;
                }
            };
            if ip.is_ipv4() != is_v4 {
                problems.push(format!(
                    "EndpointSlice {id}: address {address} does not match addressType {}",
                    slice.address_type
                ));
                continue;
            }
            if candidate.ready || candidate.serving {
                endpoints.push(SliceEndpoint {
                    ip,
                    node_name: endpoint.node_name.clone(),
                    candidate: candidate.clone(),
                });
            }
        }
    }
    CheckedSlice {
        is_v4,
        ports,
        endpoints,
    }
}

/// Missing `ready`/`serving` mean true, missing `terminating` false (the
/// API's defaults). `local` is filled in per node later.
fn candidate_of(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> Candidate {
    let conditions = endpoint.conditions.as_ref();
    let hints = endpoint.hints.as_ref();
    Candidate {
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        local: false,
        zone_hints: hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.clone())
            .collect(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| n.name.clone())
            .collect(),
    }
}

/// Endpoints of one frontend from the slices of the VIP's family, with
/// their node names. Slice ports match Service ports by name, and carry the
/// resolved target port.
fn candidates_for(
    vip: IpAddr,
    port: &ServicePort,
    slices: &[CheckedSlice],
    node: &str,
) -> Vec<(Endpoint, Candidate)> {
    let wanted_name = port.name.as_deref().filter(|n| !n.is_empty());
    let mut by_backend: BTreeMap<Backend, (Endpoint, Candidate)> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.is_v4 == vip.is_ipv4()) {
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
            let candidate = Candidate {
                local: e.node_name.as_deref() == Some(node),
                ..e.candidate.clone()
            };
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
    candidates
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
        .collect()
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
            node_name: node.map(str::to_string),
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
                "EndpointSlice ns/s-1: addressType \"IPX\" is not IPv4, IPv6 or FQDN",
                "Service ns/s: clusterIP \"10.96.0.999\" is not an IP address",
                "Service in namespace ns has no metadata.name",
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
}
