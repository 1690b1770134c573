//! What the connect hook places by: each eligible backend's Service-wide
//! load, in connection units, from the cluster view.

use crate::exchange::model::{ClusterView, PlacementLoads};
use crate::state::model::DesiredState;

/// For every Service the view covers (at least one eligible backend has an
/// entry): each eligible backend's load. Units are connections; a Service
/// that tracks frames and reports calls converts calls/s into connection
/// units, `load_p = max(connections_p, round(calls_p * total_connections /
/// total_calls))`, so the hook compares like with like whatever the
/// Service; never below the pod's connections, because a connection has no
/// rate until its second snapshot: by calls alone, a pod that just took
/// connections in a burst (a scale-up's reconnects) looks idle and takes
/// the next ones too. Eligible
/// backends without an entry (a node whose agent is down or new) get the
/// mean of the known ones: neither flooded as empty nor shunned. Services
/// the view does not cover are left out (the hook uses this node's own
/// counts). A backend of two Services takes the first Service's load.
pub fn placement_loads(view: &ClusterView, desired: &DesiredState) -> PlacementLoads {
    let mut loads = PlacementLoads::new();
    for service in desired.services.values() {
        let eligible = service.eligible();
        let known: Vec<_> = eligible
            .iter()
            .filter_map(|b| view.get(b).map(|l| (*b, *l)))
            .collect();
        if known.is_empty() {
            continue;
        }
        let total_connections: f64 = known.iter().map(|(_, l)| f64::from(l.connections)).sum();
        let total_calls: f64 = known
            .iter()
            .filter_map(|(_, l)| l.calls_per_second)
            .map(f64::from)
            .sum();
        let by_calls = service.track_frames && total_calls > 0.0;
        let measured: Vec<_> = known
            .iter()
            .filter_map(|(backend, load)| {
                let units = if by_calls {
                    // A pod without a rate yet is treated as unknown rather
                    // than mixing units.
                    let by_calls =
                        f64::from(load.calls_per_second?) * total_connections / total_calls;
                    by_calls.max(f64::from(load.connections))
                } else {
                    f64::from(load.connections)
                };
                Some((*backend, units.round().min(f64::from(u32::MAX)) as u32))
            })
            .collect();
        if measured.is_empty() {
            continue;
        }
        let sum: u64 = measured.iter().map(|(_, l)| u64::from(*l)).sum();
        let mean = (sum as f64 / measured.len() as f64).round() as u32;
        for backend in eligible {
            let load = measured
                .iter()
                .find(|(b, _)| *b == backend)
                .map_or(mean, |(_, l)| *l);
            loads.entry(backend).or_insert(load);
        }
    }
    loads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::model::PodLoad;
    use crate::state::model::{DesiredService, Endpoint, EndpointCondition};
    use crate::state::topology::Rule;
    use grpclb_common::{Addr, Backend, ServiceKey};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn pod(i: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 0, 0, i]), 50051)
    }

    fn desired(pods: &[(u8, EndpointCondition)], track_frames: bool) -> DesiredState {
        let service = DesiredService {
            name: "ns/svc:grpc".into(),
            endpoints: pods
                .iter()
                .map(|(i, condition)| Endpoint {
                    backend: pod(*i),
                    node_name: Some("n".into()),
                    condition: *condition,
                })
                .collect(),
            track_frames,
            rule: Rule::Ready,
        };
        DesiredState {
            services: [(
                ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 80),
                Arc::new(service),
            )]
            .into(),
            ..DesiredState::default()
        }
    }

    fn ready(pods: &[u8]) -> Vec<(u8, EndpointCondition)> {
        pods.iter()
            .map(|p| (*p, EndpointCondition::Ready))
            .collect()
    }

    fn conns(c: u32) -> PodLoad {
        PodLoad {
            connections: c,
            calls_per_second: None,
        }
    }

    #[test]
    fn connections_as_reported_and_the_mean_for_unknown_pods() {
        let view = ClusterView::from([(pod(1), conns(4)), (pod(2), conns(1)), (pod(9), conns(50))]);
        let mut pods = ready(&[1, 2, 3]);
        pods.push((4, EndpointCondition::Draining));
        let loads = placement_loads(&view, &desired(&pods, false));
        // 3 gets round(2.5) = 3; draining 4 and unrelated 9 are absent.
        assert_eq!(
            loads,
            PlacementLoads::from([(pod(1), 4), (pod(2), 1), (pod(3), 3)])
        );
    }

    #[test]
    fn an_uncovered_service_is_left_to_the_nodes_own_counts() {
        let view = ClusterView::from([(pod(9), conns(5))]);
        assert!(placement_loads(&view, &desired(&ready(&[1, 2]), false)).is_empty());
    }

    #[test]
    fn tracked_services_convert_calls_to_connection_units() {
        let calls = |c: u32, r: f32| PodLoad {
            connections: c,
            calls_per_second: Some(r),
        };
        // 2 connections, 100 calls/s: pod 1 makes 75 of them.
        let view = ClusterView::from([(pod(1), calls(1, 75.0)), (pod(2), calls(1, 25.0))]);
        let loads = placement_loads(&view, &desired(&ready(&[1, 2]), true));
        assert_eq!(loads, PlacementLoads::from([(pod(1), 2), (pod(2), 1)]));
        // Pod 2's two new connections have no rate yet: it counts them.
        let burst = ClusterView::from([(pod(1), calls(1, 75.0)), (pod(2), calls(3, 25.0))]);
        let loads = placement_loads(&burst, &desired(&ready(&[1, 2]), true));
        assert_eq!(loads, PlacementLoads::from([(pod(1), 3), (pod(2), 3)]));
        // No calls at all: connections.
        let idle = ClusterView::from([(pod(1), calls(1, 0.0)), (pod(2), calls(3, 0.0))]);
        let loads = placement_loads(&idle, &desired(&ready(&[1, 2]), true));
        assert_eq!(loads, PlacementLoads::from([(pod(1), 1), (pod(2), 3)]));
    }

    proptest! {
        #[test]
        fn every_eligible_pod_of_a_covered_service_gets_a_load_within_the_reported_range(
            reported in prop::collection::btree_map(1u8..12, 0u32..1000, 1..8),
            eligible in prop::collection::btree_set(1u8..12, 1..10),
        ) {
            let view: ClusterView = reported.iter().map(|(p, c)| (pod(*p), conns(*c))).collect();
            let pods: Vec<u8> = eligible.iter().copied().collect();
            let loads = placement_loads(&view, &desired(&ready(&pods), false));
            let covered = eligible.iter().any(|p| reported.contains_key(p));
            prop_assert_eq!(loads.len(), if covered { eligible.len() } else { 0 });
            let known: Vec<u32> = eligible.iter().filter_map(|p| reported.get(p).copied()).collect();
            for load in loads.values() {
                prop_assert!(known.iter().min().unwrap() <= load && load <= known.iter().max().unwrap());
            }
        }
    }
}
