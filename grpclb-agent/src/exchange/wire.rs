//! The JSON of `GET /v1/subtree` and `GET /v1/cluster`, and the checks on
//! a peer's answer before anything of it is used.
//!
//! ```json
//! {"v":1733350000000123,"full":false,"n":["node-a"],
//!  "e":[["10.244.1.7:50051",0,12,null],["[fd00::7]:50051",0,3,41.5]],
//!  "r":["10.244.1.9:50051"]}
//! ```
//! `v` the server's version (the next `since`), `full` whether `e` is the
//! whole view, `n` the node names the entries refer to by index, `e`
//! entries `[backend, node index, connections, calls/s or null]`, `r`
//! removed backends. Node names are sent once per answer, not per entry:
//! an entry is ~35 bytes. Unknown fields, wrong types, wrong tuple lengths
//! and trailing data are refused (serde, `deny_unknown_fields`).

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::exchange::model::{backend_addr, backend_of, Entry, PodLoad};
use crate::exchange::tree::Tree;
use crate::exchange::view::Delta;

/// Largest answer body read: a full cluster view of 150,000 pods is about
/// 5 MB.
pub const MAX_BODY: usize = 32 << 20;
/// Most entries plus removals in one answer.
pub const MAX_ENTRIES: usize = 500_000;
/// Most node names in one answer.
pub const MAX_NODES: usize = 100_000;
/// Most connections one pod can report: above any real server.
pub const MAX_CONNECTIONS: u32 = 1_000_000;
/// Most calls per second one pod can report.
pub const MAX_CALLS_PER_SECOND: f64 = 10_000_000.0;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerWire {
    v: u64,
    full: bool,
    n: Vec<String>,
    e: Vec<(String, u32, u32, Option<f64>)>,
    r: Vec<String>,
}

/// Why a peer's answer was not used; the label of
/// `grpclb_exchange_peer_errors_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No connection (refused, unreachable).
    Connect,
    /// No complete answer within the timeout.
    Timeout,
    /// An HTTP status other than 200 or 304.
    Status,
    /// A body above [`MAX_BODY`].
    Oversized,
    /// Not the JSON above.
    Json,
    /// More entries or node names than the caps.
    TooMany,
    /// A number out of range (connections, calls/s), or a node index or
    /// backend that does not parse.
    Absurd,
    /// Entries for pods the peer cannot know first-hand or relay: pods not
    /// hosted (per the EndpointSlices) by the node the entry names, or
    /// named nodes outside the peer's subtree. Those entries are dropped,
    /// the rest of the answer is used.
    Foreign,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Timeout => "timeout",
            Reason::Status => "status",
            Reason::Oversized => "oversized",
            Reason::Json => "json",
            Reason::TooMany => "too_many",
            Reason::Absurd => "absurd",
            Reason::Foreign => "foreign",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Reason::Connect => "cannot connect",
            Reason::Timeout => "did not answer within the timeout",
            Reason::Status => "answered with an unexpected HTTP status",
            Reason::Oversized => "answered a body above the size cap",
            Reason::Json => "answered something other than the exchange's JSON",
            Reason::TooMany => "answered more entries than the cap",
            Reason::Absurd => "answered impossible numbers",
            Reason::Foreign => "reported pods it neither hosts nor relays",
        }
    }
}

/// A delta as JSON.
pub fn encode(delta: &Delta) -> Vec<u8> {
    let mut names: Vec<Arc<str>> = Vec::new();
    let mut index = std::collections::HashMap::<Arc<str>, u32>::new();
    let e = delta
        .changed
        .iter()
        .map(|(backend, entry)| {
            let i = *index.entry(entry.node.clone()).or_insert_with(|| {
                names.push(entry.node.clone());
                (names.len() - 1) as u32
            });
            (
                backend_addr(backend).to_string(),
                i,
                entry.load.connections,
                entry.load.calls_per_second.map(f64::from),
            )
        })
        .collect();
    let wire = AnswerWire {
        v: delta.version,
        full: delta.full,
        n: names.iter().map(|n| n.to_string()).collect(),
        e,
        r: delta
            .removed
            .iter()
            .map(|b| backend_addr(b).to_string())
            .collect(),
    };
    serde_json::to_vec(&wire).expect("an answer serializes")
}

/// A peer's answer, checked: strict JSON, caps, numbers. Node names are
/// interned through `tree` (entries naming a node outside it are
/// foreign and dropped, as are those `accept` refuses); the count of
/// dropped entries comes back with the delta.
pub fn decode(
    body: &[u8],
    tree: &Tree,
    accept: impl Fn(&grpclb_common::Backend, &Arc<str>) -> bool,
) -> Result<(Delta, usize), Reason> {
    if body.len() > MAX_BODY {
        return Err(Reason::Oversized);
    }
    let wire: AnswerWire = serde_json::from_slice(body).map_err(|_| Reason::Json)?;
    if wire.e.len() + wire.r.len() > MAX_ENTRIES {
        return Err(Reason::TooMany);
    }
    if wire.n.len() > MAX_NODES {
        return Err(Reason::TooMany);
    }
    let nodes: Vec<Option<Arc<str>>> = wire
        .n
        .iter()
        .map(|name| tree.peer(name).map(|p| p.name.clone()))
        .collect();
    let parse = |text: &str| text.parse::<SocketAddr>().map(backend_of);
    let mut foreign = 0;
    let mut changed = Vec::with_capacity(wire.e.len());
    for (backend, node, connections, calls) in wire.e {
        let backend = parse(&backend).map_err(|_| Reason::Absurd)?;
        let node = nodes.get(node as usize).ok_or(Reason::Absurd)?;
        if connections > MAX_CONNECTIONS {
            return Err(Reason::Absurd);
        }
        let calls_per_second = match calls {
            Some(c) if c.is_finite() && (0.0..=MAX_CALLS_PER_SECOND).contains(&c) => Some(c as f32),
            Some(_) => return Err(Reason::Absurd),
            None => None,
        };
        match node {
            Some(node) if accept(&backend, node) => changed.push((
                backend,
                Entry {
                    node: node.clone(),
                    load: PodLoad {
                        connections,
                        calls_per_second,
                    },
                },
            )),
            _ => foreign += 1,
        }
    }
    let removed = wire
        .r
        .iter()
        .map(|b| parse(b))
        .collect::<Result<_, _>>()
        .map_err(|_| Reason::Absurd)?;
    Ok((
        Delta {
            version: wire.v,
            full: wire.full,
            changed,
            removed,
        },
        foreign,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpclb_common::{Addr, Backend};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    fn tree() -> Tree {
        let nodes: BTreeMap<Arc<str>, IpAddr> = [
            (Arc::from("node-a"), "127.0.1.1".parse().unwrap()),
            (Arc::from("node-b"), "127.0.1.2".parse().unwrap()),
        ]
        .into();
        Tree::new(&nodes, 16)
    }

    fn all(_: &Backend, _: &Arc<str>) -> bool {
        true
    }

    fn delta() -> Delta {
        Delta {
            version: 42,
            full: false,
            changed: vec![
                (
                    Backend::new(Addr::from_v4([10, 0, 0, 1]), 50051),
                    Entry {
                        node: "node-a".into(),
                        load: PodLoad {
                            connections: 3,
                            calls_per_second: Some(41.5),
                        },
                    },
                ),
                (
                    Backend::new(
                        Addr("fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets()),
                        80,
                    ),
                    Entry {
                        node: "node-b".into(),
                        load: PodLoad {
                            connections: 0,
                            calls_per_second: None,
                        },
                    },
                ),
            ],
            removed: vec![Backend::new(Addr::from_v4([10, 0, 0, 9]), 50051)],
        }
    }

    #[test]
    fn an_answer_round_trips_compactly() {
        let body = encode(&delta());
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"v":42,"full":false,"n":["node-a","node-b"],"e":[["10.0.0.1:50051",0,3,41.5],["[fd00::7]:80",1,0,null]],"r":["10.0.0.9:50051"]}"#
        );
        assert_eq!(decode(&body, &tree(), all), Ok((delta(), 0)));
    }

    #[test]
    fn nonsense_is_refused_with_its_reason() {
        let t = tree();
        let cases: [(&str, Reason); 9] = [
            ("not json", Reason::Json),
            (
                r#"{"v":1,"full":true,"n":[],"e":[],"r":[],"extra":1}"#,
                Reason::Json,
            ),
            (
                r#"{"v":1,"full":true,"n":[],"e":[["10.0.0.1:1",0,1,null,5]],"r":[]}"#,
                Reason::Json,
            ),
            (r#"{"v":-1,"full":true,"n":[],"e":[],"r":[]}"#, Reason::Json),
            (
                r#"{"v":1,"full":true,"n":["node-a"],"e":[["10.0.0.1:1",0,1000001,null]],"r":[]}"#,
                Reason::Absurd,
            ),
            (
                r#"{"v":1,"full":true,"n":["node-a"],"e":[["10.0.0.1:1",0,1,-1.0]],"r":[]}"#,
                Reason::Absurd,
            ),
            (
                r#"{"v":1,"full":true,"n":["node-a"],"e":[["10.0.0.1:1",0,1,1e300]],"r":[]}"#,
                Reason::Absurd,
            ),
            (
                r#"{"v":1,"full":true,"n":["node-a"],"e":[["10.0.0.1:1",3,1,null]],"r":[]}"#,
                Reason::Absurd,
            ),
            (
                r#"{"v":1,"full":true,"n":[],"e":[],"r":["pod-a"]}"#,
                Reason::Absurd,
            ),
        ];
        for (body, reason) in cases {
            assert_eq!(
                decode(body.as_bytes(), &t, all).map(|_| ()),
                Err(reason),
                "{body}"
            );
        }
        let huge = vec![b' '; MAX_BODY + 1];
        assert_eq!(decode(&huge, &t, all).map(|_| ()), Err(Reason::Oversized));
    }

    #[test]
    fn entries_of_unknown_or_refused_nodes_are_dropped_and_counted() {
        let body = r#"{"v":1,"full":true,"n":["node-a","node-z"],"e":[["10.0.0.1:1",0,1,null],["10.0.0.2:1",1,1,null],["10.0.0.3:1",0,1,null]],"r":[]}"#;
        let only_first = |b: &Backend, _: &Arc<str>| b.addr == Addr::from_v4([10, 0, 0, 1]);
        let (delta, foreign) = decode(body.as_bytes(), &tree(), only_first).unwrap();
        assert_eq!(delta.changed.len(), 1);
        assert_eq!(foreign, 2);
    }

    proptest! {
        #[test]
        fn any_bytes_are_refused_or_decoded_never_a_panic(body in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&body, &tree(), all);
        }
    }
}
