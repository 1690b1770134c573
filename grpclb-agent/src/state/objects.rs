//! Services and EndpointSlices reduced, as they arrive, to what the
//! translation reads (compact forms); the full objects are never kept.
//!
//! Both sources deserialize an object into [`ObjectWire`], which has only
//! the fields grpclb reads (serde skips the rest without building them), and
//! turn it into a [`ServiceObject`] or a [`SliceObject`]. A slice's
//! addresses are checked here, once per slice change, so translating a
//! Service reads parsed addresses only.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;

use crate::state::topology::Candidate;

/// Label by which the EndpointSlice controller ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service to a named service proxy other than the
/// default one; kube-proxy, and so grpclb, leaves it alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Annotation that balances every TCP port of a Service, whatever its
/// `appProtocol`.
pub const ENABLED_ANNOTATION: &str = "grpclb.io/enabled";
/// Annotation that has the kernel follow the HTTP/2 frames of connections
/// the Service's pods accept (per-pod response metrics; the basis of
/// graceful rebalancing). Opt-in: it costs unary-heavy servers several
/// percent of their throughput (`cargo xtask bench tracker`).
pub const TRACK_FRAMES_ANNOTATION: &str = "grpclb.io/track-frames";

/// The fields of a Service, an EndpointSlice or a Node that grpclb reads, in
/// one struct: a file's document is deserialized once, whatever its kind,
/// and errors point at the field as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectWire {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub metadata: Option<MetaWire>,
    /// Service
    pub spec: Option<ServiceSpecWire>,
    /// EndpointSlice
    pub address_type: Option<String>,
    pub endpoints: Option<Vec<EndpointWire>>,
    pub ports: Option<Vec<SlicePortWire>>,
    /// Node (a Service's status has no field grpclb reads; serde skips it)
    pub status: Option<NodeStatusWire>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeStatusWire {
    pub addresses: Option<Vec<NodeAddressWire>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddressWire {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub address: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaWire {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub resource_version: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpecWire {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePortWire>>,
    pub session_affinity: Option<String>,
    pub internal_traffic_policy: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortWire {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePortWire {
    pub name: Option<String>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointWire {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<ConditionsWire>,
    pub node_name: Option<String>,
    pub hints: Option<HintsWire>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConditionsWire {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HintsWire {
    pub for_zones: Option<Vec<NameWire>>,
    pub for_nodes: Option<Vec<NameWire>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NameWire {
    pub name: String,
}

impl ObjectWire {
    /// `namespace/name`; objects without a namespace are in `default`, as
    /// `kubectl apply` would put them. The error names the kind.
    pub fn id(&self, kind: &str) -> Result<String, String> {
        let meta = self.metadata.as_ref();
        let namespace = meta
            .and_then(|m| m.namespace.as_deref())
            .unwrap_or("default");
        match meta.and_then(|m| m.name.as_deref()) {
            Some(name) if !name.is_empty() => Ok(format!("{namespace}/{name}")),
            _ => Err(format!(
                "{kind} in namespace {namespace} has no metadata.name"
            )),
        }
    }

    fn label(&self, name: &str) -> Option<&String> {
        self.metadata.as_ref()?.labels.as_ref()?.get(name)
    }

    fn annotation_is_true(&self, name: &str) -> bool {
        self.metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(name))
            .is_some_and(|v| v == "true")
    }
}

/// What the translation reads of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceObject {
    /// `namespace/name`
    pub id: String,
    /// `grpclb.io/enabled: "true"`
    pub enabled: bool,
    /// `grpclb.io/track-frames: "true"`
    pub track_frames: bool,
    /// The `service.kubernetes.io/service-proxy-name` label.
    pub proxy_name: Option<String>,
    pub session_affinity: Option<String>,
    /// `internalTrafficPolicy: Local`
    pub local_policy: bool,
    /// `clusterIPs`, else `clusterIP`, unparsed (the translation names bad
    /// ones).
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty names are none.
    pub name: Option<String>,
    pub port: i32,
    /// `protocol`, defaulting to TCP.
    pub tcp: bool,
    pub app_protocol: Option<String>,
}

impl ServiceObject {
    pub fn from_wire(wire: ObjectWire) -> Result<ServiceObject, String> {
        let id = wire.id("Service")?;
        let enabled = wire.annotation_is_true(ENABLED_ANNOTATION);
        let track_frames = wire.annotation_is_true(TRACK_FRAMES_ANNOTATION);
        let proxy_name = wire.label(SERVICE_PROXY_NAME_LABEL).cloned();
        let spec = wire.spec.unwrap_or_default();
        let mut cluster_ips = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips,
            _ => spec.cluster_ip.into_iter().collect(),
        };
        let mut ports: Vec<ServicePort> = spec
            .ports
            .into_iter()
            .flatten()
            .map(|p| ServicePort {
                name: p.name.filter(|n| !n.is_empty()),
                port: p.port,
                tcp: p.protocol.as_deref().unwrap_or("TCP") == "TCP",
                app_protocol: p.app_protocol,
            })
            .collect();
        // Kept until the Service changes: vectors grown one element at a
        // time hold room for four (at 10,000 Services, 2.4 MB spare).
        cluster_ips.shrink_to_fit();
        ports.shrink_to_fit();
        Ok(ServiceObject {
            id,
            enabled,
            track_frames,
            proxy_name,
            session_affinity: spec.session_affinity,
            local_policy: spec.internal_traffic_policy.as_deref() == Some("Local"),
            cluster_ips,
            ports,
        })
    }
}

/// What the translation reads of an EndpointSlice, addresses checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceObject {
    /// `namespace/name` of the slice.
    pub id: String,
    /// `namespace/name` of its Service (label `kubernetes.io/service-name`);
    /// slices without it are not managed for a Service and are ignored.
    pub service: Option<String>,
    /// IPv4 (true) or IPv6 (false); FQDN and unknown address types have
    /// none and so no endpoints.
    pub is_v4: Option<bool>,
    /// (port name, resolved target port)
    pub ports: Vec<(Option<String>, u16)>,
    /// Ready or serving endpoints; the others never take connections.
    pub endpoints: Vec<SliceEndpoint>,
    /// What is wrong with the slice, each naming it.
    pub problems: Vec<String>,
}

/// One endpoint address of a slice, its conditions and hints, in 48 bytes
/// (a [`Candidate`] with its node name takes 72; 100,000 endpoints are
/// held): topology hints, which few endpoints carry, are boxed and absent
/// when there are none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub hints: Option<Box<Hints>>,
}

// 100,000 endpoints at 10,000 Services: every byte here is 100 KB held.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<SliceEndpoint>() == 48);

/// `hints.forZones[].name` and `hints.forNodes[].name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Box<[String]>,
    pub nodes: Box<[String]>,
}

impl SliceEndpoint {
    /// The endpoint as the topology rule reads it, seen from `node`.
    pub fn candidate(&self, node: &str) -> Candidate {
        let hints = self.hints.as_deref();
        Candidate {
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            local: self.node_name.as_deref() == Some(node),
            zone_hints: hints.map(|h| h.zones.clone()).unwrap_or_default(),
            node_hints: hints.map(|h| h.nodes.clone()).unwrap_or_default(),
        }
    }
}

impl SliceObject {
    pub fn from_wire(wire: ObjectWire) -> Result<SliceObject, String> {
        let id = wire.id("EndpointSlice")?;
        let namespace = id.split_once('/').map_or("default", |(ns, _)| ns);
        let mut slice = SliceObject {
            service: wire
                .label(crate::state::objects::SERVICE_NAME_LABEL)
                .map(|s| format!("{namespace}/{s}")),
            id,
            ..SliceObject::default()
        };
        if slice.service.is_none() {
            return Ok(slice);
        }
        let address_type = wire.address_type.unwrap_or_default();
        slice.is_v4 = match address_type.as_str() {
            "IPv4" => Some(true),
            "IPv6" => Some(false),
            "FQDN" => return Ok(slice),
            other => {
                slice.problems.push(format!(
                    "EndpointSlice {}: addressType {other:?} is not IPv4, IPv6 or FQDN",
                    slice.id
                ));
                return Ok(slice);
            }
        };
        slice.check(
            wire.ports.unwrap_or_default(),
            wire.endpoints.unwrap_or_default(),
            &address_type,
        );
        // Kept until the slice changes: no spare capacity.
        slice.endpoints.shrink_to_fit();
        slice.ports.shrink_to_fit();
        Ok(slice)
    }

    fn check(&mut self, ports: Vec<SlicePortWire>, endpoints: Vec<EndpointWire>, family: &str) {
        let id = &self.id;
        let is_v4 = self.is_v4 == Some(true);
        for port in ports {
            let name = port.name.filter(|n| !n.is_empty());
            match port.port {
                Some(number) if (1..=65535).contains(&number) => {
                    self.ports.push((name, number as u16))
                }
                Some(number) => self.problems.push(format!(
                    "EndpointSlice {id}: port {} number {number} is out of range",
                    name.as_deref().unwrap_or("(unnamed)")
                )),
                None => self.problems.push(format!(
                    "EndpointSlice {id}: port {} has no number",
                    name.as_deref().unwrap_or("(unnamed)")
                )),
            }
        }
        for endpoint in endpoints {
            let conditions = endpoint.conditions.as_ref();
            // Missing `ready`/`serving` mean true, missing `terminating`
            // false (the API's defaults).
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let hints = hints_of(&endpoint);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    self.problems.push(format!(
                        "EndpointSlice {id}: address {address:?} is not an IP address"
                    ));
                    continue;
                };
                if ip.is_ipv4() != is_v4 {
                    self.problems.push(format!(
                        "EndpointSlice {id}: address {address} does not match addressType {family}"
                    ));
                    continue;
                }
                if ready || serving {
                    self.endpoints.push(SliceEndpoint {
                        ip,
                        ready,
                        serving,
                        terminating,
                        node_name: endpoint.node_name.as_deref().map(Arc::from),
                        hints: hints.clone(),
                    });
                }
            }
        }
    }
}

/// The endpoint's topology hints, if it has any.
fn hints_of(endpoint: &EndpointWire) -> Option<Box<Hints>> {
    let hints = endpoint.hints.as_ref()?;
    // Boxed slices: no room kept for more, nothing allocated when empty.
    let names = |list: Option<&Vec<NameWire>>| -> Box<[String]> {
        list.into_iter().flatten().map(|n| n.name.clone()).collect()
    };
    let hints = Hints {
        zones: names(hints.for_zones.as_ref()),
        nodes: names(hints.for_nodes.as_ref()),
    };
    (hints != Hints::default()).then(|| Box::new(hints))
}

/// What the sources read of a Node: its zone label (topology hints, for
/// this node's own Node) and its InternalIP (the load exchange's address
/// of its agent). Nothing else of it is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeObject {
    pub name: String,
    pub zone: Option<String>,
    /// The first `status.addresses` entry of type InternalIP (IPv4 or
    /// IPv6); none when it has none (the Node is then left out of the
    /// exchange).
    pub internal_ip: Option<IpAddr>,
}

impl NodeObject {
    pub fn from_wire(wire: &ObjectWire) -> Result<NodeObject, String> {
        let name = wire
            .metadata
            .as_ref()
            .and_then(|m| m.name.clone())
            .filter(|n| !n.is_empty())
            .ok_or("Node has no metadata.name")?;
        let addresses = wire.status.as_ref().and_then(|s| s.addresses.as_ref());
        let internal = addresses
            .into_iter()
            .flatten()
            .enumerate()
            .find(|(_, a)| a.kind.as_deref() == Some("InternalIP"));
        let internal_ip = match internal {
            None => None,
            Some((i, address)) => {
                let text = address.address.as_deref().unwrap_or_default();
                Some(text.parse::<IpAddr>().map_err(|_| {
                    format!(
                        "Node {name}: status.addresses[{i}].address {text:?} (type InternalIP) \
                         is not an IPv4 or IPv6 address; the load exchange reaches this node's \
                         agent there: set the node's InternalIP (kubelet --node-ip)"
                    )
                })?)
            }
        };
        Ok(NodeObject {
            zone: wire.label(crate::state::translate::ZONE_LABEL).cloned(),
            name,
            internal_ip,
        })
    }
}

/// A JSON value (a k8s-openapi object, say) as the wire form.
pub fn wire_of<T: serde::Serialize>(object: &T) -> ObjectWire {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .expect("a Kubernetes object serializes to its wire form")
}

/// Decodes one object's JSON, naming the field that is wrong:
/// `spec.ports[0].port: invalid type: string "x", expected i32`.
pub fn decode_json(value: serde_json::Value) -> Result<ObjectWire, String> {
    serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}
