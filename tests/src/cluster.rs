//! Builders for the Service file the agent reads: Kubernetes `Service` and
//! `EndpointSlice` objects as `kubectl get svc,endpointslices -A -o yaml`
//! prints them (a `v1/List`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Label by which an EndpointSlice names its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name; the slice carries the resolved number.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointDef {
    pub addr: IpAddr,
    pub ready: bool,
    /// Serving but terminating (graceful shutdown): not ready, still serving.
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `topology.kubernetes.io/zone` of its node.
    pub zone: Option<String>,
}

/// One single-port, single-family ClusterIP Service and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub port_name: String,
    /// `Some("grpc")` makes the port balanced; `None` leaves it to kube-proxy.
    pub app_protocol: Option<String>,
    pub target_port: TargetPort,
    /// The port the pods listen on (the slice port).
    pub endpoint_port: u16,
    pub endpoints: Vec<EndpointDef>,
    pub track_frames: bool,
    /// `spec.internalTrafficPolicy` (`Local`, `Cluster`).
    pub internal_traffic_policy: Option<String>,
    /// `spec.trafficDistribution`; `PreferClose`/`PreferSameZone` also hint
    /// every endpoint with a zone for that zone, as the EndpointSlice
    /// controller does.
    pub traffic_distribution: Option<String>,
}

impl ServiceDef {
    /// A balanced (`appProtocol: grpc`) Service `default/<name>` with a
    /// numeric targetPort and no endpoints yet.
    pub fn grpc(name: &str, cluster_ip: impl Into<IpAddr>, port: u16, endpoint_port: u16) -> Self {
        ServiceDef {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: cluster_ip.into(),
            port,
            port_name: "grpc".into(),
            app_protocol: Some("grpc".into()),
            target_port: TargetPort::Number(endpoint_port),
            endpoint_port,
            endpoints: Vec::new(),
            track_frames: false,
            internal_traffic_policy: None,
            traffic_distribution: None,
        }
    }

    /// A ready endpoint.
    pub fn backend(mut self, addr: impl Into<IpAddr>) -> Self {
        self.endpoints.push(EndpointDef {
            addr: addr.into(),
            ready: true,
            terminating: false,
            node_name: None,
            zone: None,
        });
        self
    }

    /// A ready endpoint that is a pod on node `node_name`.
    pub fn backend_on(mut self, addr: impl Into<IpAddr>, node_name: &str) -> Self {
        self.endpoints.push(EndpointDef {
            addr: addr.into(),
            ready: true,
            terminating: false,
            node_name: Some(node_name.into()),
            zone: None,
        });
        self
    }

    /// A ready endpoint that is a pod on node `node_name` in `zone`.
    pub fn backend_in(mut self, addr: impl Into<IpAddr>, node_name: &str, zone: &str) -> Self {
        self.endpoints.push(EndpointDef {
            addr: addr.into(),
            ready: true,
            terminating: false,
            node_name: Some(node_name.into()),
            zone: Some(zone.into()),
        });
        self
    }

    /// The endpoint at `addr` turns `ready: false` (and not serving).
    pub fn not_ready(mut self, addr: impl Into<IpAddr>) -> Self {
        let addr = addr.into();
        for e in self.endpoints.iter_mut().filter(|e| e.addr == addr) {
            e.ready = false;
            e.terminating = false;
        }
        self
    }

    /// `spec.internalTrafficPolicy: Local`.
    pub fn internal_traffic_local(mut self) -> Self {
        self.internal_traffic_policy = Some("Local".into());
        self
    }

    /// `spec.trafficDistribution: <value>`.
    pub fn traffic_distribution(mut self, value: &str) -> Self {
        self.traffic_distribution = Some(value.into());
        self
    }

    pub fn backends<A: Into<IpAddr>>(self, addrs: impl IntoIterator<Item = A>) -> Self {
        addrs.into_iter().fold(self, Self::backend)
    }

    /// An endpoint with `ready: false` (not eligible for new connections).
    pub fn not_ready_backend(mut self, addr: impl Into<IpAddr>) -> Self {
        self.endpoints.push(EndpointDef {
            addr: addr.into(),
            ready: false,
            terminating: false,
            node_name: None,
            zone: None,
        });
        self
    }

    /// The endpoint at `addr` starts terminating, as its pod does when
    /// deleted: `ready: false, serving: true, terminating: true`.
    pub fn terminating(mut self, addr: impl Into<IpAddr>) -> Self {
        let addr = addr.into();
        for e in self.endpoints.iter_mut().filter(|e| e.addr == addr) {
            e.ready = false;
            e.terminating = true;
        }
        self
    }

    pub fn named_target_port(mut self, name: &str) -> Self {
        self.target_port = TargetPort::Name(name.into());
        self
    }

    /// Annotated `grpclb.io/track-frames: "true"`.
    pub fn tracking_frames(mut self) -> Self {
        self.track_frames = true;
        self
    }

    /// A plain TCP Service port that grpclb must leave alone.
    pub fn without_app_protocol(mut self) -> Self {
        self.app_protocol = None;
        self
    }

    pub fn service(&self) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                annotations: self.track_frames.then(|| {
                    BTreeMap::from([("grpclb.io/track-frames".to_string(), "true".to_string())])
                }),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(self.cluster_ip.to_string()),
                cluster_ips: Some(vec![self.cluster_ip.to_string()]),
                ip_families: Some(vec![family(self.cluster_ip).into()]),
                internal_traffic_policy: self.internal_traffic_policy.clone(),
                traffic_distribution: self.traffic_distribution.clone(),
                ports: Some(vec![ServicePort {
                    name: Some(self.port_name.clone()),
                    port: i32::from(self.port),
                    protocol: Some("TCP".into()),
                    app_protocol: self.app_protocol.clone(),
                    target_port: Some(match &self.target_port {
                        TargetPort::Number(n) => IntOrString::Int(i32::from(*n)),
                        TargetPort::Name(name) => IntOrString::String(name.clone()),
                    }),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// One slice per address family among the endpoints; with no endpoints,
    /// one empty slice of the ClusterIP's family (as the controller writes).
    pub fn slices(&self) -> Vec<EndpointSlice> {
        let mut by_family: BTreeMap<&str, Vec<&EndpointDef>> = BTreeMap::new();
        for endpoint in &self.endpoints {
            by_family
                .entry(family(endpoint.addr))
                .or_default()
                .push(endpoint);
        }
        if by_family.is_empty() {
            by_family.insert(family(self.cluster_ip), Vec::new());
        }
        by_family
            .into_iter()
            .map(|(family, endpoints)| self.slice(family, &endpoints))
            .collect()
    }

    /// The hint the EndpointSlice controller writes for `trafficDistribution:
    /// PreferClose` (or `PreferSameZone`): the endpoint's own zone.
    fn zone_hint(&self, endpoint: &EndpointDef) -> Option<EndpointHints> {
        let prefers_zone = matches!(
            self.traffic_distribution.as_deref(),
            Some("PreferClose" | "PreferSameZone")
        );
        let zone = endpoint.zone.as_ref().filter(|_| prefers_zone)?;
        Some(EndpointHints {
            for_zones: Some(vec![ForZone { name: zone.clone() }]),
            for_nodes: None,
        })
    }

    fn slice(&self, address_type: &str, endpoints: &[&EndpointDef]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{}-{}", self.name, address_type.to_lowercase())),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_string(),
                    self.name.clone(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: address_type.into(),
            endpoints: endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: vec![e.addr.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(e.ready),
                        serving: Some(e.ready || e.terminating),
                        terminating: Some(e.terminating),
                    }),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                    hints: self.zone_hint(e),
                    ..Endpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some(self.port_name.clone()),
                port: Some(i32::from(self.endpoint_port)),
                protocol: Some("TCP".into()),
                app_protocol: self.app_protocol.clone(),
            }]),
        }
    }
}

fn family(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// The Services and their slices as one kubectl-style `List`.
pub fn service_yaml(services: &[ServiceDef]) -> String {
    list_yaml(services.iter().flat_map(ServiceDef::objects).collect())
}

/// The Services and their slices as a multi-document file: one object per
/// `---` document.
pub fn service_documents_yaml(services: &[ServiceDef]) -> String {
    services.iter().map(ServiceDef::documents_yaml).collect()
}

impl ServiceDef {
    /// The Service and its slices as API objects (carrying `apiVersion` and
    /// `kind`), as the test API server and a `List` take them.
    pub fn objects(&self) -> Vec<serde_json::Value> {
        let mut objects = vec![serde_json::to_value(self.service()).expect("Service serializes")];
        objects.extend(
            self.slices()
                .into_iter()
                .map(|slice| serde_json::to_value(slice).expect("EndpointSlice serializes")),
        );
        objects
    }

    /// The Service and its slices, each a YAML document after a `---` line.
    pub fn documents_yaml(&self) -> String {
        self.objects()
            .iter()
            .map(|object| {
                format!(
                    "---\n{}",
                    serde_yaml::to_string(object).expect("JSON values serialize as YAML")
                )
            })
            .collect()
    }
}

/// The Services, their slices and `nodes` (name, zone) as v1 Nodes labelled
/// `topology.kubernetes.io/zone`, as one kubectl-style `List`.
pub fn service_yaml_with_nodes(services: &[ServiceDef], nodes: &[(&str, &str)]) -> String {
    let mut list: serde_json::Value =
        serde_yaml::from_str(&service_yaml(services)).expect("service_yaml is a List");
    let items = list["items"].as_array_mut().expect("a List has items");
    for (name, zone) in nodes {
        items.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}
        }));
    }
    serde_yaml::to_string(&list).expect("JSON values serialize as YAML")
}

/// Objects (already carrying `apiVersion` and `kind`) as a kubectl `List`.
pub fn list_yaml(items: Vec<serde_json::Value>) -> String {
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": { "resourceVersion": "" },
    });
    serde_yaml::to_string(&list).expect("JSON values serialize as YAML")
}

/// Replaces `path` by renaming a complete temporary file over it, so a
/// watcher never reads a half-written file (as Kubernetes updates mounted
/// ConfigMaps).
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", crate::unique_suffix()));
    std::fs::write(&temporary, contents)
        .with_context(|| format!("writing {}", Path::new(&temporary).display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn list_holds_service_then_one_slice_per_family() {
        let def = ServiceDef::grpc("echo", Ipv4Addr::new(10, 96, 0, 1), 80, 50051)
            .backend(Ipv4Addr::new(10, 244, 0, 2))
            .not_ready_backend(Ipv4Addr::new(10, 244, 0, 3))
            .backend("fd00:244::2".parse::<Ipv6Addr>().unwrap());
        let list: serde_json::Value = serde_yaml::from_str(&service_yaml(&[def])).unwrap();
        let items = list["items"].as_array().unwrap();
        assert_eq!(list["kind"], "List");
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["kind"], "Service");
        assert_eq!(items[0]["spec"]["ports"][0]["appProtocol"], "grpc");
        assert_eq!(items[0]["spec"]["ports"][0]["targetPort"], 50051);
        assert_eq!(items[1]["kind"], "EndpointSlice");
        assert_eq!(items[1]["addressType"], "IPv4");
        assert_eq!(items[1]["metadata"]["labels"][SERVICE_NAME_LABEL], "echo");
        assert_eq!(items[1]["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(items[1]["ports"][0]["port"], 50051);
        assert_eq!(items[2]["addressType"], "IPv6");
        assert_eq!(items[2]["endpoints"][0]["addresses"][0], "fd00:244::2");
    }

    #[test]
    fn documents_hold_one_object_each_in_list_order() {
        let defs = [
            ServiceDef::grpc("a", Ipv4Addr::new(10, 96, 0, 1), 80, 50051)
                .backend_on(Ipv4Addr::new(10, 244, 0, 2), "n1"),
            ServiceDef::grpc("b", Ipv4Addr::new(10, 96, 0, 2), 80, 50051),
        ];
        let text = service_documents_yaml(&defs);
        let documents: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::Value::deserialize(d).unwrap())
            .collect();
        let list: serde_json::Value = serde_yaml::from_str(&service_yaml(&defs)).unwrap();
        assert_eq!(&documents, list["items"].as_array().unwrap());
        assert_eq!(documents.len(), 4);
        assert_eq!(documents[1]["endpoints"][0]["nodeName"], "n1");
    }

    #[test]
    fn service_without_endpoints_has_an_empty_slice_and_named_port_is_a_string() {
        let def = ServiceDef::grpc(
            "empty",
            "fd00:96::1".parse::<Ipv6Addr>().unwrap(),
            80,
            50051,
        )
        .named_target_port("grpc-port")
        .without_app_protocol();
        let service = def.service();
        let port = &service.spec.unwrap().ports.unwrap()[0];
        assert_eq!(
            port.target_port,
            Some(IntOrString::String("grpc-port".into()))
        );
        assert_eq!(port.app_protocol, None);
        let slices = def.slices();
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].address_type, "IPv6");
        assert!(slices[0].endpoints.is_empty());
    }

    #[test]
    fn zone_preferring_services_hint_each_endpoint_for_its_zone_and_nodes_join_the_list() {
        let def = ServiceDef::grpc("near", Ipv4Addr::new(10, 96, 0, 1), 80, 7000)
            .traffic_distribution("PreferSameZone")
            .internal_traffic_local()
            .backend_in(Ipv4Addr::new(10, 244, 0, 2), "n1", "z1")
            .backend_on(Ipv4Addr::new(10, 244, 0, 3), "n2");
        let list: serde_json::Value =
            serde_yaml::from_str(&service_yaml_with_nodes(&[def], &[("n1", "z1")])).unwrap();
        let items = list["items"].as_array().unwrap();
        assert_eq!(items[0]["spec"]["trafficDistribution"], "PreferSameZone");
        assert_eq!(items[0]["spec"]["internalTrafficPolicy"], "Local");
        let endpoints = &items[1]["endpoints"];
        assert_eq!(endpoints[0]["zone"], "z1");
        assert_eq!(endpoints[0]["hints"]["forZones"][0]["name"], "z1");
        assert!(endpoints[1].get("hints").is_none());
        assert_eq!(items[2]["kind"], "Node");
        assert_eq!(
            items[2]["metadata"]["labels"]["topology.kubernetes.io/zone"],
            "z1"
        );
    }
}
