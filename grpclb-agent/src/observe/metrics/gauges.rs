//! What `/metrics` shows of the maps ([`TableGauges`]): built from the data
//! plane owner's full snapshot, by a pure function.

use std::collections::BTreeMap;

use grpclb_common::frame::Phase;
use grpclb_common::Backend;

use crate::dataplane::snapshot::Snapshot;
use crate::observe::status::socket_label;

/// Map sizes the agent was started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacities {
    pub frontends: u32,
    pub backend_slots: u32,
    pub backend_load: u32,
}

/// What the maps held at the snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableGauges {
    /// Every frontend in the maps; a dual-stack Service port has one name
    /// and two addresses, so two entries.
    pub frontends: Vec<FrontendGauges>,
    /// (backend `ip:port`, live connections from this node): every entry
    /// of `BACKEND_LOAD`. Summed for the node's total; one series each only
    /// with `--metrics-detail backend`.
    pub connections: Vec<(String, u64)>,
    /// (backend `ip:port`, Service-wide load): every fresh `BACKEND_VIEW`
    /// entry, the load the connect hook starts from; only with
    /// `--metrics-detail backend`.
    pub views: Vec<(String, u64)>,
    /// (frontend name, frontend `VIP:port`, backend `ip:port`, connections
    /// the pod accepted from every node): each pod on this node
    /// (`LOCAL_LOAD`) under each frontend whose active set on this node
    /// holds it, so that max/mean per Service port and address family
    /// across the cluster is one PromQL expression over every agent's series.
    pub local_connections: Vec<(String, String, String, u64)>,
    /// (map name, entries, capacity)
    pub maps: Vec<(&'static str, u64, u32)>,
    /// Server-side frame tracking of this node's pods, per backend.
    pub local: BTreeMap<String, LocalBackendGauges>,
}

/// One frontend (ClusterIP, port) as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendGauges {
    /// The Service port's `namespace/name:port`, or the address when the
    /// name is missing.
    pub name: String,
    /// `VIP:port`.
    pub address: String,
    /// Eligible backends in its active set.
    pub backends: u64,
    /// Live connections from this node to the backends of its active set
    /// (a backend shared by two frontends counts in both; a draining
    /// backend, in no active set, in none).
    pub connections: u64,
    /// Each backend of its active set with its live connections from this
    /// node (0 without a load entry), so a Service's balance over its pods
    /// can be summed across nodes; one series each only with
    /// `--metrics-detail backend`.
    pub loads: Vec<(Backend, u64)>,
}

/// What the kernel's frame tracking saw for one local backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalBackendGauges {
    /// Open connections it follows.
    pub tracked: u64,
    /// Open connections it gave up on (not HTTP/2 as expected, or unseen bytes).
    pub untracked: u64,
    /// Responses sent since the agent started (END_STREAM: one
    /// per completed gRPC call), over tracked connections.
    pub responses: u64,
}

impl TableGauges {
    /// The gauges of a full snapshot; `None` for one without its tables.
    pub fn of(snapshot: &Snapshot, capacities: MapCapacities) -> Option<Self> {
        let tables = snapshot.tables.as_ref()?;
        let frontends: Vec<FrontendGauges> = tables
            .status
            .frontends
            .iter()
            .map(|f| {
                let address = socket_label(&f.key.addr, f.key.port);
                let name = if f.name.is_empty() {
                    address.clone()
                } else {
                    f.name.clone()
                };
                FrontendGauges {
                    name,
                    address,
                    backends: f.backends.len() as u64,
                    connections: f.backends.iter().filter_map(|(_, load)| *load).sum(),
                    loads: f
                        .backends
                        .iter()
                        .map(|(backend, load)| (*backend, load.unwrap_or(0)))
                        .collect(),
                }
            })
            .collect();
        let accepted: BTreeMap<Backend, u64> = tables.local_loads.iter().copied().collect();
        let local_connections = tables
            .status
            .frontends
            .iter()
            .zip(&frontends)
            .flat_map(|(f, gauges)| {
                f.backends.iter().filter_map(|(backend, _)| {
                    Some((
                        gauges.name.clone(),
                        gauges.address.clone(),
                        socket_label(&backend.addr, backend.port),
                        *accepted.get(backend)?,
                    ))
                })
            })
            .collect();
        let connections = tables
            .loads
            .iter()
            .map(|(b, count)| (socket_label(&b.addr, b.port), *count))
            .collect();
        let views = tables
            .status
            .views
            .iter()
            .filter_map(|(b, load)| Some((socket_label(&b.addr, b.port), u64::from((*load)?))))
            .collect();
        Some(TableGauges {
            local: local_gauges(snapshot),
            frontends,
            connections,
            views,
            local_connections,
            maps: vec![
                (
                    "FRONTENDS",
                    tables.status.frontends.len() as u64,
                    capacities.frontends,
                ),
                (
                    "BACKEND_SLOTS",
                    tables.slot_entries,
                    capacities.backend_slots,
                ),
                (
                    "BACKEND_LOAD",
                    tables.loads.len() as u64,
                    capacities.backend_load,
                ),
            ],
        })
    }
}

/// Per local backend: the connections the kernel follows or gave up on,
/// and the responses since the agent started (the snapshot's totals).
fn local_gauges(snapshot: &Snapshot) -> BTreeMap<String, LocalBackendGauges> {
    let mut gauges: BTreeMap<Backend, LocalBackendGauges> = BTreeMap::new();
    for (_, connection) in &snapshot.tracked {
        let gauge = gauges.entry(connection.backend).or_default();
        if connection.tracker.phase() == Phase::Untracked {
            gauge.untracked += 1;
        } else {
            gauge.tracked += 1;
        }
    }
    for (backend, total) in &snapshot.responses {
        gauges.entry(*backend).or_default().responses = *total;
    }
    gauges
        .into_iter()
        .map(|(backend, gauge)| (socket_label(&backend.addr, backend.port), gauge))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::snapshot::Tables;
    use crate::dataplane::sync::apply;
    use crate::dataplane::tables::MemoryTables;
    use crate::state::model::{DesiredService, DesiredState};
    use grpclb_common::{Addr, ServiceKey, TrackedConnection};

    pub(crate) const CAPACITIES: MapCapacities = MapCapacities {
        frontends: 100,
        backend_slots: 1000,
        backend_load: 500,
    };

    /// Tables after applying, in turn, one Service with each set of
    /// backends `10.0.0.N:8080`.
    /// The gauges of a full snapshot of `tables`.
    pub(crate) fn gauges_of(tables: &MemoryTables) -> TableGauges {
        let tables = Tables::read(tables, Vec::new()).unwrap();
        let snapshot = Snapshot::next(None, 0, Vec::new(), Some(tables));
        TableGauges::of(&snapshot, CAPACITIES).unwrap()
    }

    /// A Service port of ready pods `10.0.0.N:8080`.
    fn service(name: &str, pods: &[u8]) -> std::sync::Arc<DesiredService> {
        let backends = pods
            .iter()
            .map(|n| Backend::new(Addr::from_v4([10, 0, 0, *n]), 8080));
        crate::testing::ready_service(name, backends, None, false).into()
    }

    pub(crate) fn tables_with(sets: &[&[u8]]) -> MemoryTables {
        let mut t = MemoryTables::default();
        for sets in sets {
            let mut state = DesiredState::default();
            state.services.insert(
                ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 50051),
                service("apps/echo:grpc", sets),
            );
            apply(&mut t, &state).unwrap();
        }
        t
    }

    #[test]
    fn gauges_count_both_slots_and_report_loads() {
        // Second apply fills slot 0 with two backends; slot 1 keeps three.
        let mut t = tables_with(&[&[1, 2, 3], &[1, 2]]);
        *t.loads
            .get_mut(&Backend::new(Addr::from_v4([10, 0, 0, 1]), 8080))
            .unwrap() = 7;
        // A connection to a backend that left every set keeps its count.
        t.loads
            .insert(Backend::new(Addr::from_v4([10, 0, 0, 3]), 8080), 4);
        let g = gauges_of(&t);
        // 10.0.0.3 (draining) is in no active set: not the frontend's.
        assert_eq!(
            g.frontends,
            vec![FrontendGauges {
                name: "apps/echo:grpc".into(),
                address: "10.96.0.1:50051".into(),
                backends: 2,
                connections: 7,
                loads: vec![
                    (Backend::new(Addr::from_v4([10, 0, 0, 1]), 8080), 7),
                    (Backend::new(Addr::from_v4([10, 0, 0, 2]), 8080), 0),
                ],
            }]
        );
        assert_eq!(
            g.connections,
            vec![
                ("10.0.0.1:8080".to_string(), 7),
                ("10.0.0.2:8080".to_string(), 0),
                ("10.0.0.3:8080".to_string(), 4)
            ]
        );
        assert!(g.local_connections.is_empty(), "no pod on this node");
        assert_eq!(
            g.maps,
            vec![
                ("FRONTENDS", 1, 100),
                ("BACKEND_SLOTS", 5, 1000),
                ("BACKEND_LOAD", 3, 500)
            ]
        );
    }

    #[test]
    fn local_connections_are_each_local_pod_under_each_frontend_whose_set_holds_it() {
        let mut t = tables_with(&[&[1, 2, 3]]);
        let mut state = DesiredState::default();
        for (vip, name, pods) in [
            (1, "apps/echo:grpc", &[1, 2][..]),
            (2, "apps/other:grpc", &[1]),
        ] {
            state.services.insert(
                ServiceKey::new(Addr::from_v4([10, 96, 0, vip]), 50051),
                service(name, pods),
            );
        }
        apply(&mut t, &state).unwrap();
        // Pods 1 and 3 are on this node; 3 left every set (draining), 2 is
        // another node's.
        for (n, count) in [(1, 9), (3, 2)] {
            t.local_loads
                .insert(Backend::new(Addr::from_v4([10, 0, 0, n]), 8080), count);
        }
        assert_eq!(
            gauges_of(&t).local_connections,
            vec![
                (
                    "apps/echo:grpc".to_string(),
                    "10.96.0.1:50051".to_string(),
                    "10.0.0.1:8080".to_string(),
                    9
                ),
                (
                    "apps/other:grpc".to_string(),
                    "10.96.0.2:50051".to_string(),
                    "10.0.0.1:8080".to_string(),
                    9
                ),
            ]
        );
    }

    fn tracked(backend: u8, responses: usize, untracked: bool) -> TrackedConnection {
        let backend = Backend::new(Addr::from_v4([10, 244, 0, backend]), 8080);
        let mut connection = crate::testing::answered(backend, responses);
        if untracked {
            connection.tracker = grpclb_common::frame::FrameTracker::new();
            connection.tracker.observe(0, b"HTTP/1.1 200 OK\r\n");
        }
        connection
    }

    #[test]
    fn local_gauges_count_connections_and_carry_the_response_totals() {
        let first = Snapshot::next(
            None,
            0,
            vec![
                (1, tracked(1, 3, false)),
                (2, tracked(1, 2, false)),
                (3, tracked(2, 0, true)),
            ],
            None,
        );
        let g = local_gauges(&first);
        assert_eq!(
            g["10.244.0.1:8080"],
            LocalBackendGauges {
                tracked: 2,
                untracked: 0,
                responses: 5
            }
        );
        assert_eq!(
            g["10.244.0.2:8080"],
            LocalBackendGauges {
                tracked: 0,
                untracked: 1,
                responses: 0
            }
        );
        // Every connection closed: the total stays.
        let g = local_gauges(&Snapshot::next(Some(&first), 500, Vec::new(), None));
        assert_eq!(g["10.244.0.1:8080"].responses, 5);
        assert_eq!(g["10.244.0.1:8080"].tracked, 0);
        assert!(TableGauges::of(&first, CAPACITIES).is_none(), "no tables");
    }
}
