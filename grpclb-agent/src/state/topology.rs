//! Which endpoints of a Service take this node's new connections: the rule
//! kube-proxy applies (`CategorizeEndpoints` in kubernetes/kubernetes
//! `pkg/proxy/topology.go`), restricted to ClusterIP traffic, so that a
//! Service balanced by grpclb reaches the same pods it would under
//! kube-proxy.
//!
//! - `internalTrafficPolicy: Local`: this node's ready endpoints; if none,
//!   this node's serving+terminating ones (KEP-1669); if none, nothing (the
//!   connect is refused, as kube-proxy rejects it).
//! - Otherwise (`Cluster`): the ready endpoints, narrowed by topology hints
//!   when every ready endpoint carries them and some are for this node
//!   (`forNodes`) or else for this node's zone (`forZones`); with no ready
//!   endpoint anywhere, every serving+terminating endpoint, hints ignored.
//!
//! `trafficDistribution` (PreferClose, PreferSameZone, PreferSameNode) is not
//! read here: the EndpointSlice controller turns it into these hints, and
//! kube-proxy, too, acts on the hints alone. Same-node hints are honoured as
//! with kube-proxy's `PreferSameTrafficDistribution` gate on (its default
//! from Kubernetes 1.34).

use std::fmt;

/// The node whose connections are being placed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeTopology {
    pub name: String,
    /// The Node's `topology.kubernetes.io/zone` label (or `--node-zone`).
    pub zone: Option<String>,
}

impl NodeTopology {
    /// `--node-zone` wins over the Node's zone label; an empty zone is none
    /// (kube-proxy ignores zone hints on a node without the label).
    pub fn new(
        name: &str,
        zone_flag: Option<&str>,
        labels: Option<&std::collections::BTreeMap<String, String>>,
    ) -> NodeTopology {
        let label = labels.and_then(|l| l.get(crate::state::translate::ZONE_LABEL));
        let zone = zone_flag
            .or(label.map(String::as_str))
            .filter(|z| !z.is_empty());
        NodeTopology {
            name: name.to_string(),
            zone: zone.map(str::to_string),
        }
    }
}

/// One endpoint as EndpointSlices describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (the slice's `nodeName` is this node's name).
    pub local: bool,
    /// `hints.forZones[].name`
    pub zone_hints: Box<[String]>,
    /// `hints.forNodes[].name`
    pub node_hints: Box<[String]>,
}

impl Candidate {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Which rule chose a frontend's endpoint set; shown by `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// Every ready endpoint (possibly none: connections are refused).
    #[default]
    Ready,
    /// No ready endpoint anywhere: the serving+terminating ones.
    TerminatingFallback,
    /// The ready endpoints hinted for this node.
    NodeHints(String),
    /// The ready endpoints hinted for this node's zone.
    ZoneHints(String),
    /// `internalTrafficPolicy: Local`: this node's ready endpoints (possibly
    /// none: connections are refused).
    LocalOnly,
    /// `internalTrafficPolicy: Local` with no ready endpoint on this node:
    /// this node's serving+terminating ones.
    LocalTerminatingFallback,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Ready => f.write_str("ready"),
            Rule::TerminatingFallback => f.write_str("terminating-fallback"),
            Rule::NodeHints(node) => write!(f, "node hints {node}"),
            Rule::ZoneHints(zone) => write!(f, "zone hints {zone}"),
            Rule::LocalOnly => f.write_str("local-only"),
            Rule::LocalTerminatingFallback => f.write_str("local-only terminating-fallback"),
        }
    }
}

/// The endpoints (by index into `endpoints`) that take this node's new
/// connections, and the rule that chose them.
pub fn select(
    endpoints: &[Candidate],
    local_policy: bool,
    node: &NodeTopology,
) -> (Vec<usize>, Rule) {
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> Vec<usize> {
        (0..endpoints.len())
            .filter(|&i| keep(&endpoints[i]))
            .collect()
    };
    if local_policy {
        let ready = pick(&|e| e.local && e.ready);
        if !ready.is_empty() {
            return (ready, Rule::LocalOnly);
        }
        let terminating = pick(&|e| e.local && e.serving_terminating());
        if !terminating.is_empty() {
            return (terminating, Rule::LocalTerminatingFallback);
        }
        return (Vec::new(), Rule::LocalOnly);
    }
    let rule = hinted_rule(endpoints, node);
    let chosen = pick(&|e| {
        e.ready
            && match &rule {
                Rule::NodeHints(name) => e.node_hints.contains(name),
                Rule::ZoneHints(zone) => e.zone_hints.contains(zone),
                _ => true,
            }
    });
    if !chosen.is_empty() {
        return (chosen, rule);
    }
    // Hints are only followed when some ready endpoint matches them, so an
    // empty set here means no endpoint is ready anywhere.
    let terminating = pick(&|e| e.serving_terminating());
    if terminating.is_empty() {
        (Vec::new(), Rule::Ready)
    } else {
        (terminating, Rule::TerminatingFallback)
    }
}

/// Hints count only when every ready endpoint has them (a half-hinted
/// Service is mid-update) and at least one is for this node (or zone), so
/// following them never empties the set.
fn hinted_rule(endpoints: &[Candidate], node: &NodeTopology) -> Rule {
    let ready: Vec<&Candidate> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Rule::Ready;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&node.name))
    {
        return Rule::NodeHints(node.name.clone());
    }
    if let Some(zone) = &node.zone {
        if ready.iter().all(|e| !e.zone_hints.is_empty())
            && ready.iter().any(|e| e.zone_hints.contains(zone))
        {
            return Rule::ZoneHints(zone.clone());
        }
    }
    Rule::Ready
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// An endpoint of a test case: its address and how it looks.
    #[derive(Clone)]
    struct Ep {
        addr: &'static str,
        c: Candidate,
    }

    fn ep(addr: &'static str) -> Ep {
        Ep {
            addr,
            c: Candidate {
                ready: true,
                serving: true,
                ..Candidate::default()
            },
        }
    }

    impl Ep {
        fn zones(mut self, zones: &[&str]) -> Ep {
            self.c.zone_hints = zones.iter().map(|z| z.to_string()).collect();
            self
        }
        fn nodes(mut self, nodes: &[&str]) -> Ep {
            self.c.node_hints = nodes.iter().map(|n| n.to_string()).collect();
            self
        }
        fn local(mut self) -> Ep {
            self.c.local = true;
            self
        }
        /// `ready: false`, `serving` unset in the Go test: not serving.
        fn unready(mut self) -> Ep {
            self.c.ready = false;
            self.c.serving = false;
            self
        }
        fn serving_terminating(mut self) -> Ep {
            self.c.ready = false;
            self.c.serving = true;
            self.c.terminating = true;
            self
        }
    }

    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        local_policy: bool,
        endpoints: Vec<Ep>,
        expected: &'static [&'static str],
        rule: Rule,
    }

    fn zone(z: &str) -> Rule {
        Rule::ZoneHints(z.to_string())
    }

    /// The cases of kube-proxy's `TestCategorizeEndpoints`
    /// (pkg/proxy/topology_test.go) that concern ClusterIP traffic: the
    /// inputs and the `clusterEndpoints` (or, with iTP Local, the
    /// `localEndpoints`) they expect. Cases about the retired
    /// `service.kubernetes.io/topology-mode` annotation values and the
    /// ProxyTerminatingEndpoints gate (always on since 1.28) are left out;
    /// externalTrafficPolicy does not apply to ClusterIP traffic. Cases
    /// marked "(grpclb)" are derived from topology.go where the Go test has
    /// none (node hints, local terminating fallback).
    fn cases() -> Vec<Case> {
        let abca = || {
            vec![
                ep("10.1.2.3:80").zones(&["zone-a"]),
                ep("10.1.2.4:80").zones(&["zone-b"]),
                ep("10.1.2.5:80").zones(&["zone-c"]),
                ep("10.1.2.6:80").zones(&["zone-a"]),
            ]
        };
        vec![
            Case {
                name: "hints enabled, hints annotation == auto",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: abca(),
                expected: &["10.1.2.3:80", "10.1.2.6:80"],
                rule: zone("zone-a"),
            },
            Case {
                name: "internalTrafficPolicy: Local, topology ignored for Local endpoints",
                zone: Some("zone-a"),
                local_policy: true,
                endpoints: vec![
                    ep("10.1.2.3:80").zones(&["zone-a"]).local(),
                    ep("10.1.2.4:80").zones(&["zone-b"]).local(),
                    ep("10.1.2.5:80").zones(&["zone-c"]),
                    ep("10.1.2.6:80").zones(&["zone-a"]),
                ],
                expected: &["10.1.2.3:80", "10.1.2.4:80"],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "empty node labels",
                zone: None,
                local_policy: false,
                endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"])],
                expected: &["10.1.2.3:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "empty zone label",
                zone: Some(""),
                local_policy: false,
                endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"])],
                expected: &["10.1.2.3:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "node in different zone, no endpoint filtering",
                zone: Some("zone-b"),
                local_policy: false,
                endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"])],
                expected: &["10.1.2.3:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "unready endpoint",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: {
                    let mut e = abca();
                    e[3] = e[3].clone().unready();
                    e
                },
                expected: &["10.1.2.3:80"],
                rule: zone("zone-a"),
            },
            Case {
                name: "only unready endpoints in same zone (should not filter)",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: {
                    let mut e = abca();
                    e[0] = e[0].clone().unready();
                    e[3] = e[3].clone().unready();
                    e
                },
                expected: &["10.1.2.4:80", "10.1.2.5:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "missing hints, no filtering applied",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: {
                    let mut e = abca();
                    e[2] = ep("10.1.2.5:80");
                    e
                },
                expected: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "multiple hints per endpoint, filtering includes any endpoint with zone included",
                zone: Some("zone-c"),
                local_policy: false,
                endpoints: vec![
                    ep("10.1.2.3:80").zones(&["zone-a", "zone-b", "zone-c"]),
                    ep("10.1.2.4:80").zones(&["zone-b", "zone-c"]),
                    ep("10.1.2.5:80").zones(&["zone-b", "zone-d"]),
                    ep("10.1.2.6:80").zones(&["zone-c"]),
                ],
                expected: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"],
                rule: zone("zone-c"),
            },
            Case {
                name: "conflicting topology and localness require merging allEndpoints",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.0:80").zones(&["zone-a"]).local(),
                    ep("10.0.0.1:80").zones(&["zone-b"]).local(),
                    ep("10.0.0.2:80").zones(&["zone-a"]),
                    ep("10.0.0.3:80").zones(&["zone-b"]),
                ],
                expected: &["10.0.0.0:80", "10.0.0.2:80"],
                rule: zone("zone-a"),
            },
            Case {
                name: "internalTrafficPolicy: Local, with empty endpoints",
                zone: None,
                local_policy: true,
                endpoints: vec![],
                expected: &[],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "internalTrafficPolicy: Local, but all endpoints are remote",
                zone: None,
                local_policy: true,
                endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80")],
                expected: &[],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "internalTrafficPolicy: Local, all endpoints are local",
                zone: None,
                local_policy: true,
                endpoints: vec![ep("10.0.0.0:80").local(), ep("10.0.0.1:80").local()],
                expected: &["10.0.0.0:80", "10.0.0.1:80"],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "internalTrafficPolicy: Local, some endpoints are local",
                zone: None,
                local_policy: true,
                endpoints: vec![ep("10.0.0.0:80").local(), ep("10.0.0.1:80")],
                expected: &["10.0.0.0:80"],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "Cluster traffic policy, endpoints not Ready",
                zone: None,
                local_policy: false,
                endpoints: vec![ep("10.0.0.0:80").unready(), ep("10.0.0.1:80").unready()],
                expected: &[],
                rule: Rule::Ready,
            },
            Case {
                name: "Cluster traffic policy, some endpoints are Ready",
                zone: None,
                local_policy: false,
                endpoints: vec![ep("10.0.0.0:80").unready(), ep("10.0.0.1:80")],
                expected: &["10.0.0.1:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "Cluster traffic policy, PTE enabled, all endpoints are terminating",
                zone: None,
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.0:80").serving_terminating().local(),
                    ep("10.0.0.1:80").serving_terminating(),
                ],
                expected: &["10.0.0.0:80", "10.0.0.1:80"],
                rule: Rule::TerminatingFallback,
            },
            Case {
                name: "iTP: Local, eTP: Cluster, some endpoints local",
                zone: None,
                local_policy: true,
                endpoints: vec![ep("10.0.0.0:80").local(), ep("10.0.0.1:80")],
                expected: &["10.0.0.0:80"],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "iTP: Local, eTP: Local, PTE enabled, all endpoints remote and terminating",
                zone: None,
                local_policy: true,
                endpoints: vec![
                    ep("10.0.0.0:80").serving_terminating(),
                    ep("10.0.0.1:80").serving_terminating(),
                ],
                expected: &[],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "iTP: Cluster, eTP: Local, PTE enabled, with terminating endpoints",
                zone: None,
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.0:80"),
                    ep("10.0.0.1:80").unready().local(),
                    ep("10.0.0.2:80").serving_terminating().local(),
                    ep("10.0.0.3:80").serving_terminating(),
                ],
                expected: &["10.0.0.0:80"],
                rule: Rule::Ready,
            },
            Case {
                name: "(grpclb) the same endpoints with iTP: Local: this node's terminating one",
                zone: None,
                local_policy: true,
                endpoints: vec![
                    ep("10.0.0.0:80"),
                    ep("10.0.0.1:80").unready().local(),
                    ep("10.0.0.2:80").serving_terminating().local(),
                    ep("10.0.0.3:80").serving_terminating(),
                ],
                expected: &["10.0.0.2:80"],
                rule: Rule::LocalTerminatingFallback,
            },
            Case {
                name: "no cluster endpoints for iTP:Local internal-only service",
                zone: None,
                local_policy: true,
                endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80").local()],
                expected: &["10.0.0.1:80"],
                rule: Rule::LocalOnly,
            },
            Case {
                name: "(grpclb) terminating fallback ignores hints and never takes non-serving",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.0:80").zones(&["zone-b"]).serving_terminating(),
                    ep("10.0.0.1:80").zones(&["zone-a"]).unready(),
                    ep("10.0.0.2:80").zones(&["zone-c"]).serving_terminating(),
                ],
                expected: &["10.0.0.0:80", "10.0.0.2:80"],
                rule: Rule::TerminatingFallback,
            },
            Case {
                name: "(grpclb) node hints for this node win over zone hints",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.0:80").zones(&["zone-a"]).nodes(&["node-1"]),
                    ep("10.0.0.1:80").zones(&["zone-a"]).nodes(&["node-2"]),
                    ep("10.0.0.2:80").zones(&["zone-b"]).nodes(&["node-3"]),
                ],
                expected: &["10.0.0.0:80"],
                rule: Rule::NodeHints("node-1".into()),
            },
            Case {
                name: "(grpclb) no node hint for this node: zone hints",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.1:80").zones(&["zone-a"]).nodes(&["node-2"]),
                    ep("10.0.0.2:80").zones(&["zone-b"]).nodes(&["node-3"]),
                ],
                expected: &["10.0.0.1:80"],
                rule: zone("zone-a"),
            },
            Case {
                name: "(grpclb) a ready endpoint without node hint: zone hints",
                zone: Some("zone-a"),
                local_policy: false,
                endpoints: vec![
                    ep("10.0.0.0:80").zones(&["zone-a"]).nodes(&["node-1"]),
                    ep("10.0.0.1:80").zones(&["zone-a"]),
                    ep("10.0.0.2:80").zones(&["zone-b"]).nodes(&["node-3"]),
                    // Unready endpoints' hints do not count.
                    ep("10.0.0.3:80").unready(),
                ],
                expected: &["10.0.0.0:80", "10.0.0.1:80"],
                rule: zone("zone-a"),
            },
        ]
    }

    #[test]
    fn kube_proxy_topology_cases() {
        for case in cases() {
            let node = NodeTopology {
                name: "node-1".into(),
                zone: case.zone.map(str::to_string),
            };
            let candidates: Vec<Candidate> = case.endpoints.iter().map(|e| e.c.clone()).collect();
            let (chosen, rule) = select(&candidates, case.local_policy, &node);
            let got: BTreeSet<&str> = chosen.iter().map(|&i| case.endpoints[i].addr).collect();
            let expected: BTreeSet<&str> = case.expected.iter().copied().collect();
            assert_eq!(got, expected, "{}", case.name);
            assert_eq!(rule, case.rule, "{}", case.name);
        }
    }

    #[test]
    fn the_zone_flag_wins_over_the_node_label_and_empty_is_none() {
        let labels = std::collections::BTreeMap::from([(
            "topology.kubernetes.io/zone".to_string(),
            "z-label".to_string(),
        )]);
        let zone = |flag, labels| NodeTopology::new("n", flag, labels).zone;
        assert_eq!(zone(Some("z-flag"), Some(&labels)), Some("z-flag".into()));
        assert_eq!(zone(None, Some(&labels)), Some("z-label".into()));
        assert_eq!(zone(None, None), None);
        assert_eq!(zone(Some(""), None), None);
    }

    #[test]
    fn rules_read_as_status_shows_them() {
        let shown: Vec<String> = [
            Rule::Ready,
            Rule::TerminatingFallback,
            Rule::NodeHints("n1".into()),
            Rule::ZoneHints("z1".into()),
            Rule::LocalOnly,
            Rule::LocalTerminatingFallback,
        ]
        .iter()
        .map(Rule::to_string)
        .collect();
        assert_eq!(
            shown,
            [
                "ready",
                "terminating-fallback",
                "node hints n1",
                "zone hints z1",
                "local-only",
                "local-only terminating-fallback"
            ]
        );
    }
}
