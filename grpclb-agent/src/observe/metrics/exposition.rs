//! The Prometheus text exposition (format 0.0.4) of one scrape, through
//! `prometheus-client`: the recorded counters are registered as they are;
//! what is read at scrape time (the maps, the latest selection, rates and
//! waiting moves) is encoded by a collector that owns it, with only the
//! series [`MetricsDetail`] allows.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::observe::status::{socket_label, Selection};

use super::{Latest, LocalBackendGauges, Metrics, MetricsDetail, TableGauges};

/// The exposition of `metrics` and, when the maps could be read, `tables`.
pub fn render(metrics: &Metrics, tables: Option<TableGauges>, detail: MetricsDetail) -> String {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let selection = if detail >= MetricsDetail::Service {
        metrics.selection()
    } else {
        Selection::default()
    };
    registry.register_collector(Box::new(Scrape {
        latest: metrics.lock().clone(),
        selection,
        tables,
        detail,
    }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    out
}

/// What one scrape read, encoded when the registry is.
#[derive(Debug)]
struct Scrape {
    latest: Latest,
    /// Read only when its series are shown.
    selection: Selection,
    tables: Option<TableGauges>,
    detail: MetricsDetail,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut encoder;
        let service = self.detail >= MetricsDetail::Service;
        let backend = self.detail >= MetricsDetail::Backend;
        let latest = &self.latest;
        gauge(
            e,
            "grpclb_moves_waiting",
            "Drains of this node's pods the gate has refused for 5 s and more, still tried, per pod and last refusal (send_queue_busy: a reader slower than the pod, with large HTTP/2 windows).",
            latest
                .moves_waiting
                .iter()
                .map(|((backend, cause), n)| ([("backend", backend.as_str()), ("cause", cause)], *n)),
        )?;
        if backend {
            gauge(
                e,
                "grpclb_local_connection_calls_per_second",
                "Completed calls per second of each tracked connection of this node's pods (the rebalancer's measure, smoothed over about a second).",
                latest.call_rates.iter().map(|((backend, client), rate)| {
                    (
                        [("backend", backend.as_str()), ("client", client.as_str())],
                        *rate,
                    )
                }),
            )?;
        }
        let mut per_pod: BTreeMap<&str, f64> = BTreeMap::new();
        for ((backend, _), rate) in latest.call_rates.iter() {
            *per_pod.entry(backend).or_insert(0.0) += rate;
        }
        gauge(
            e,
            "grpclb_local_calls_per_second",
            "Completed calls per second of each pod of this node over its tracked connections.",
            per_pod
                .into_iter()
                .map(|(backend, rate)| ([("backend", backend)], rate)),
        )?;
        if service {
            gauge(
                e,
                "grpclb_frontend_rule",
                "1 for the rule that chose each frontend's endpoints (ready, terminating-fallback, local-only, zone hints Z, node hints N, ...).",
                self.selection.rules.iter().map(|(address, rule)| {
                    ([("address", address.as_str()), ("rule", rule.as_str())], 1)
                }),
            )?;
            gauge(
                e,
                "grpclb_service_not_balanced",
                "1 for each Service with balanced ports that grpclb leaves to another proxy, and why.",
                self.selection.not_balanced.iter().map(|(service, reason)| {
                    ([("service", service.as_str()), ("reason", reason.as_str())], 1)
                }),
            )?;
        }
        let Some(tables) = &self.tables else {
            return Ok(());
        };
        let frontends = &tables.frontends;
        scalar(
            e,
            "grpclb_frontends",
            "Balanced (ClusterIP, port) frontends in the maps.",
            frontends.len() as u64,
        )?;
        scalar(
            e,
            "grpclb_frontends_without_backends",
            "Frontends with no eligible backend for this node: connects to them are refused.",
            frontends.iter().filter(|f| f.backends == 0).count() as u64,
        )?;
        scalar(
            e,
            "grpclb_backends",
            "Eligible backends summed over all frontends.",
            frontends.iter().map(|f| f.backends).sum::<u64>(),
        )?;
        scalar(
            e,
            "grpclb_connections",
            "Live balanced connections from this node.",
            tables.connections.iter().map(|(_, n)| n).sum::<u64>(),
        )?;
        if service {
            gauge(
                e,
                "grpclb_frontend_backends",
                "Eligible backends of each frontend.",
                frontends.iter().map(|f| {
                    (
                        [
                            ("frontend", f.name.as_str()),
                            ("address", f.address.as_str()),
                        ],
                        f.backends,
                    )
                }),
            )?;
            gauge(
                e,
                "grpclb_frontend_connections",
                "Live balanced connections from this node to the backends of each frontend's active set (frontends without any have no series).",
                frontends.iter().filter(|f| f.connections > 0).map(|f| {
                    (
                        [("frontend", f.name.as_str()), ("address", f.address.as_str())],
                        f.connections,
                    )
                }),
            )?;
        }
        if backend {
            gauge(
                e,
                "grpclb_backend_connections",
                "Live balanced connections from this node to each backend.",
                tables
                    .connections
                    .iter()
                    .map(|(backend, n)| ([("backend", backend.as_str())], *n)),
            )?;
            gauge(
                e,
                "grpclb_frontend_backend_connections",
                "Live balanced connections from this node to each backend of the active set of each frontend it has connections to, 0 included (summed over nodes: a Service's connections per pod).",
                // Only where this node has connections, as for
                // grpclb_frontend_connections: the nodes using a Service
                // give its pods' zeros, the others pay nothing for it.
                frontends.iter().filter(|f| f.connections > 0).flat_map(|f| {
                    f.loads.iter().map(|(b, n)| {
                        (
                            [
                                ("frontend", f.name.clone()),
                                ("backend", socket_label(&b.addr, b.port)),
                            ],
                            *n,
                        )
                    })
                }),
            )?;
            gauge(
                e,
                "grpclb_backend_view_load",
                "Service-wide load of each backend learned from the other nodes (connections, or their call-rate equivalent), while fresh: the connect hook adds what this node opened since.",
                tables
                    .views
                    .iter()
                    .map(|(backend, n)| ([("backend", backend.as_str())], *n)),
            )?;
        }
        gauge(
            e,
            "grpclb_local_connections",
            "Established connections each pod on this node accepted, from every node, per frontend whose active set on this node holds the pod (max/mean by frontend and address over every agent's series: the Service's balance).",
            tables
                .local_connections
                .iter()
                .map(|(frontend, address, backend, n)| {
                    (
                        [
                            ("frontend", frontend.as_str()),
                            ("address", address.as_str()),
                            ("backend", backend.as_str()),
                        ],
                        *n,
                    )
                }),
        )?;
        gauge(
            e,
            "grpclb_map_entries",
            "Entries in each eBPF map.",
            tables.maps.iter().map(|(map, n, _)| ([("map", *map)], *n)),
        )?;
        gauge(
            e,
            "grpclb_map_capacity",
            "Maximum entries of each eBPF map.",
            tables
                .maps
                .iter()
                .map(|(map, _, cap)| ([("map", *map)], *cap)),
        )?;
        let local = |value: fn(&LocalBackendGauges) -> u64| {
            tables
                .local
                .iter()
                .map(move |(backend, g)| ([("backend", backend.as_str())], value(g)))
        };
        counter(
            e,
            "grpclb_local_responses",
            "Responses a pod on this node sent on tracked connections (HTTP/2 frames with END_STREAM: one per completed gRPC call or HTTP/2 response).",
            local(|g| g.responses),
        )?;
        gauge(
            e,
            "grpclb_local_tracked_connections",
            "Open connections of a pod on this node whose HTTP/2 frames the kernel follows.",
            local(|g| g.tracked),
        )?;
        gauge(
            e,
            "grpclb_local_untracked_connections",
            "Open connections of a pod on this node the kernel stopped following (not HTTP/2 as expected, e.g. TLS, or bytes it did not see).",
            local(|g| g.untracked),
        )
    }
}

/// One gauge family with a series per sample.
fn gauge<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One gauge without labels.
fn scalar(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// One counter family (`name` without `_total`, which the encoder adds).
fn counter<L: EncodeLabelSet, V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dataplane::sync::SyncReport;
    use crate::observe::metrics::{FrontendGauges, Watched};
    use crate::observe::readiness::Readiness;
    use crate::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
    use crate::state::topology::Rule;
    use grpclb_common::{Addr, Backend, ServiceKey};

    /// Metrics with every family recorded at least once.
    fn recorded() -> Metrics {
        let metrics = Metrics::default();
        metrics.record_sync(Duration::from_millis(3), Ok(&SyncReport::default()));
        metrics.record_sync(
            Duration::from_millis(700),
            Err(&anyhow::anyhow!("map full")),
        );
        metrics.record_list(Watched::Services, 4);
        metrics.record_list(Watched::Services, 5);
        metrics.record_watch_error(Watched::EndpointSlices);
        metrics.record_objects(Watched::EndpointSlices, 2);
        metrics.record_publish();
        metrics.record_goaway("drain");
        metrics.record_move_abandoned("socket_gone");
        metrics.record_moves_waiting(BTreeMap::from([(
            ("10.244.0.1:8080".to_string(), "send_queue_busy"),
            2,
        )]));
        metrics.record_call_rates(BTreeMap::from([
            (("10.244.0.1:8080".into(), "10.244.1.9:40000".into()), 120.0),
            (("10.244.0.1:8080".into(), "10.244.1.9:40002".into()), 80.25),
        ]));
        metrics.set_readiness(Readiness::ready());
        metrics
    }

    /// A frontend of `backends` backends `10.0.0.N:80`, the first holding
    /// all `connections`.
    fn frontend(name: &str, address: &str, backends: u64, connections: u64) -> FrontendGauges {
        FrontendGauges {
            name: name.into(),
            address: address.into(),
            backends,
            connections,
            loads: (0..backends)
                .map(|i| {
                    let backend = Backend::new(Addr::from_v4([10, 0, 0, i as u8 + 1]), 80);
                    (backend, if i == 0 { connections } else { 0 })
                })
                .collect(),
        }
    }

    fn tables() -> TableGauges {
        TableGauges {
            frontends: vec![
                frontend("a/b:grpc", "10.96.0.1:80", 2, 3),
                frontend("a/b:grpc", "[fd00::1]:80", 2, 0),
                frontend("a/\"q\\\":1", "10.96.0.2:1", 0, 0),
            ],
            connections: vec![("10.0.0.1:80".into(), 3), ("10.0.0.2:80".into(), 4)],
            views: vec![("10.0.0.1:80".into(), 12)],
            local_connections: vec![(
                "a/b:grpc".into(),
                "10.96.0.1:80".into(),
                "10.244.0.1:8080".into(),
                5,
            )],
            maps: vec![("FRONTENDS", 2, 100)],
            local: BTreeMap::from([(
                "10.244.0.1:8080".to_string(),
                LocalBackendGauges {
                    tracked: 2,
                    untracked: 1,
                    responses: 40,
                },
            )]),
        }
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    /// Samples (lines that are not comments).
    fn series(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#')).count()
    }

    #[test]
    fn render_exposes_counters_histogram_and_tables() {
        let text = render(&recorded(), Some(tables()), MetricsDetail::Backend);
        assert_lines(
            &text,
            &[
                "# TYPE grpclb_map_syncs_total counter",
                "grpclb_map_syncs_total 1",
                "grpclb_map_sync_failures_total 1",
                "# TYPE grpclb_map_sync_duration_seconds histogram",
                "grpclb_map_sync_duration_seconds_bucket{le=\"0.001\"} 0",
                "grpclb_map_sync_duration_seconds_bucket{le=\"0.005\"} 1",
                "grpclb_map_sync_duration_seconds_bucket{le=\"0.5\"} 1",
                "grpclb_map_sync_duration_seconds_bucket{le=\"1\"} 2",
                "grpclb_map_sync_duration_seconds_bucket{le=\"+Inf\"} 2",
                "grpclb_map_sync_duration_seconds_count 2",
                "grpclb_ready 1",
                "grpclb_map_full{map=\"BACKEND_SLOTS\"} 0",
                "grpclb_map_sync_frontends_not_applied 0",
                "grpclb_states_published_total 1",
                "grpclb_kube_lists_total{resource=\"services\"} 2",
                "grpclb_kube_lists_total{resource=\"endpointslices\"} 0",
                "grpclb_kube_watch_errors_total{resource=\"endpointslices\"} 1",
                "grpclb_kube_objects{resource=\"services\"} 5",
                "grpclb_kube_objects{resource=\"endpointslices\"} 2",
                "grpclb_frontends 3",
                "grpclb_frontends_without_backends 1",
                "grpclb_backends 4",
                "grpclb_connections 7",
                "grpclb_frontend_backends{frontend=\"a/b:grpc\",address=\"10.96.0.1:80\"} 2",
                "grpclb_frontend_backends{frontend=\"a/b:grpc\",address=\"[fd00::1]:80\"} 2",
                "grpclb_frontend_backends{frontend=\"a/\\\"q\\\\\\\":1\",address=\"10.96.0.2:1\"} 0",
                "grpclb_frontend_connections{frontend=\"a/b:grpc\",address=\"10.96.0.1:80\"} 3",
                "grpclb_backend_connections{backend=\"10.0.0.1:80\"} 3",
                "grpclb_frontend_backend_connections{frontend=\"a/b:grpc\",backend=\"10.0.0.1:80\"} 3",
                "grpclb_frontend_backend_connections{frontend=\"a/b:grpc\",backend=\"10.0.0.2:80\"} 0",
                "grpclb_backend_view_load{backend=\"10.0.0.1:80\"} 12",
                "grpclb_map_entries{map=\"FRONTENDS\"} 2",
                "grpclb_map_capacity{map=\"FRONTENDS\"} 100",
                "# TYPE grpclb_local_responses_total counter",
                "grpclb_local_responses_total{backend=\"10.244.0.1:8080\"} 40",
                "grpclb_local_tracked_connections{backend=\"10.244.0.1:8080\"} 2",
                "grpclb_local_connections{frontend=\"a/b:grpc\",address=\"10.96.0.1:80\",backend=\"10.244.0.1:8080\"} 5",
                "grpclb_local_untracked_connections{backend=\"10.244.0.1:8080\"} 1",
                "grpclb_goaways_total{reason=\"drain\"} 1",
                "grpclb_moves_abandoned_total{cause=\"socket_gone\"} 1",
                "grpclb_moves_waiting{backend=\"10.244.0.1:8080\",cause=\"send_queue_busy\"} 2",
                "grpclb_local_connection_calls_per_second{backend=\"10.244.0.1:8080\",client=\"10.244.1.9:40000\"} 120.0",
                "grpclb_local_connection_calls_per_second{backend=\"10.244.0.1:8080\",client=\"10.244.1.9:40002\"} 80.25",
                "grpclb_local_calls_per_second{backend=\"10.244.0.1:8080\"} 200.25",
            ],
        );
        let counters = recorded().snapshot();
        assert_eq!(
            (
                counters.syncs,
                counters.sync_failures,
                counters.states_published
            ),
            (1, 1, 1)
        );
        assert_eq!(
            counters.watches[&Watched::EndpointSlices],
            crate::observe::metrics::WatchCounters {
                lists: 0,
                errors: 1,
                objects: 2
            }
        );
        let sum_line = text
            .lines()
            .find(|l| l.starts_with("grpclb_map_sync_duration_seconds_sum "))
            .unwrap();
        let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 0.703).abs() < 1e-9, "{sum_line}");
    }

    #[test]
    fn render_without_tables_still_serves_counters() {
        let text = render(&Metrics::default(), None, MetricsDetail::Service);
        assert_lines(
            &text,
            &[
                "grpclb_map_syncs_total 0",
                "grpclb_map_full{map=\"FRONTENDS\"} 0",
                "grpclb_goaways_total{reason=\"scale_up\"} 0",
                "grpclb_goaways_total{reason=\"max_age\"} 0",
                "grpclb_moves_abandoned_total{cause=\"socket_not_found\"} 0",
                "grpclb_moves_abandoned_total{cause=\"sockmap_busy\"} 0",
            ],
        );
        assert!(!text.contains("grpclb_frontends"), "{text}");
    }

    #[test]
    fn each_detail_level_adds_its_series() {
        let metrics = recorded();
        let per_frontend = [
            "grpclb_frontend_backends{",
            "grpclb_frontend_connections{",
            "grpclb_frontend_rule{",
            "grpclb_service_not_balanced",
        ];
        let per_backend = [
            "grpclb_backend_connections{",
            "grpclb_frontend_backend_connections{",
            "grpclb_backend_view_load{",
            "grpclb_local_connection_calls_per_second{",
        ];
        let mut state = DesiredState::default();
        state.services.insert(
            ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 80),
            service("a/b:grpc", 2),
        );
        state.not_balanced.insert("a/c".into(), "why".into());
        metrics.follow_states(tokio::sync::watch::channel(Some(state.clone())).1);
        let has = |text: &str, prefix: &str| text.lines().any(|l| l.starts_with(prefix));
        let node = render(&metrics, Some(tables()), MetricsDetail::Node);
        for prefix in per_frontend.iter().chain(&per_backend) {
            assert!(!has(&node, prefix), "{prefix} at node detail:\n{node}");
        }
        // What every level has: node totals and this node's own pods.
        assert_lines(
            &node,
            &[
                "grpclb_connections 7",
                "grpclb_local_calls_per_second{backend=\"10.244.0.1:8080\"} 200.25",
                "grpclb_local_responses_total{backend=\"10.244.0.1:8080\"} 40",
                "grpclb_local_connections{frontend=\"a/b:grpc\",address=\"10.96.0.1:80\",backend=\"10.244.0.1:8080\"} 5",
            ],
        );
        let service = render(&metrics, Some(tables()), MetricsDetail::default());
        for prefix in per_frontend {
            assert!(has(&service, prefix), "no {prefix} by default:\n{service}");
        }
        for prefix in per_backend {
            assert!(!has(&service, prefix), "{prefix} by default:\n{service}");
        }
        assert_lines(
            &service,
            &[
                "grpclb_frontend_rule{address=\"10.96.0.1:80\",rule=\"ready\"} 1",
                "grpclb_service_not_balanced{service=\"a/c\",reason=\"why\"} 1",
            ],
        );
        let backend = render(&metrics, Some(tables()), MetricsDetail::Backend);
        for prefix in per_frontend.iter().chain(&per_backend) {
            assert!(has(&backend, prefix), "no {prefix} at backend detail");
        }
        // Frontends: backends and rule of each, connections of the one
        // with any (the others have none).
        assert_eq!(series(&service) - series(&node), 3 + 1 + 1 + 1);
        assert!(!service.contains(
            "grpclb_frontend_connections{frontend=\"a/b:grpc\",address=\"[fd00::1]:80\"}"
        ));
        // Backends: connections of 2, of the one frontend with
        // connections 2, the view of 1, call rates of 2.
        assert_eq!(series(&backend) - series(&service), 2 + 2 + 1 + 2);
    }

    /// What a Prometheus parser reads back is what was recorded, line for
    /// line (`promtool check metrics` accepts it too; see docs/dependencies.md).
    #[test]
    fn exposition_round_trips_through_a_parser() {
        let text = render(&recorded(), Some(tables()), MetricsDetail::Backend);
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("grpclb_map_sync_duration_seconds_bucket"))
            .count();
        // The parser folds a histogram's buckets into one sample.
        assert_eq!(scrape.samples.len(), series(&text) - buckets + 1);
        let value = |name: &str, label: &str, value: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get(label) == Some(value))
                .map(|s| s.value.clone())
        };
        assert_eq!(
            value("grpclb_frontend_backends", "frontend", "a/b:grpc"),
            Some(prometheus_parse::Value::Gauge(2.0))
        );
        assert_eq!(
            value("grpclb_local_responses_total", "backend", "10.244.0.1:8080"),
            Some(prometheus_parse::Value::Counter(40.0))
        );
        assert_eq!(
            value("grpclb_kube_lists_total", "resource", "services"),
            Some(prometheus_parse::Value::Counter(2.0))
        );
    }

    fn service(name: &str, endpoints: u32) -> Arc<DesiredService> {
        DesiredService {
            name: name.into(),
            endpoints: (0..endpoints)
                .map(|i| Endpoint {
                    backend: Backend::new(Addr::from_v4(i.to_be_bytes()), 8080),
                    node_name: None,
                    condition: EndpointCondition::Ready,
                })
                .collect(),
            track_frames: false,
            rule: Rule::Ready,
        }
        .into()
    }

    /// Metrics and tables of a cluster of `services` Services of
    /// `endpoints` endpoints each, every backend with a connection.
    fn cluster(services: u32, endpoints: u32) -> (Metrics, TableGauges) {
        let metrics = recorded();
        let mut state = DesiredState::default();
        let mut tables = TableGauges {
            maps: vec![("FRONTENDS", u64::from(services), 16384)],
            ..TableGauges::default()
        };
        for s in 0..services {
            let [_, _, a, b] = s.to_be_bytes();
            let key = ServiceKey::new(Addr::from_v4([10, 96, a, b]), 50051);
            let name = format!("namespace-{s}/service-{s}:grpc");
            state.services.insert(key, service(&name, 0));
            tables.frontends.push(frontend(
                &name,
                &format!("10.96.{a}.{b}:50051"),
                u64::from(endpoints),
                u64::from(endpoints),
            ));
            for e in 0..endpoints {
                let [_, c, d, f] = (s * endpoints + e).to_be_bytes();
                tables.connections.push((format!("10.{c}.{d}.{f}:8080"), 1));
            }
        }
        metrics.follow_states(tokio::sync::watch::channel(Some(state.clone())).1);
        (metrics, tables)
    }

    #[test]
    fn ten_thousand_services_cost_at_most_three_series_each_by_default() {
        let (metrics, tables) = cluster(10_000, 10);
        let node = render(&metrics, Some(tables.clone()), MetricsDetail::Node);
        let service = render(&metrics, Some(tables.clone()), MetricsDetail::Service);
        let backend = render(&metrics, Some(tables), MetricsDetail::Backend);
        assert!(series(&node) < 100, "{node}");
        assert_eq!(series(&service), series(&node) + 3 * 10_000);
        // Connections per backend, and per backend of each frontend.
        assert_eq!(series(&backend), series(&service) + 2 * 10 * 10_000 + 2);
        assert_lines(
            &node,
            &[
                "grpclb_frontends 10000",
                "grpclb_backends 100000",
                "grpclb_connections 100000",
            ],
        );
    }

    /// `/metrics` size and render time at 10,000 Services x 10 endpoints,
    /// every backend with a connection, per detail level; each exposition
    /// is left in the temporary directory for `promtool check metrics`:
    /// `cargo test --release -p grpclb-agent exposition_size_at_scale --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: prints sizes and times"]
    fn exposition_size_at_scale() {
        let (metrics, busy) = cluster(10_000, 10);
        // A node whose clients use none of the Services.
        let mut idle = busy.clone();
        for f in &mut idle.frontends {
            f.connections = 0;
        }
        for (detail, tables) in [
            (MetricsDetail::Node, &busy),
            (MetricsDetail::Service, &idle),
            (MetricsDetail::Service, &busy),
            (MetricsDetail::Backend, &busy),
        ] {
            let connected = tables
                .frontends
                .iter()
                .filter(|f| f.connections > 0)
                .count();
            let runs = 5;
            let copies: Vec<TableGauges> = (0..runs).map(|_| tables.clone()).collect();
            let start = Instant::now();
            let mut text = String::new();
            for copy in copies {
                text = render(&metrics, Some(copy), detail);
            }
            let file = std::env::temp_dir().join(format!("grpclb-metrics-{detail:?}.txt"));
            std::fs::write(&file, &text).unwrap();
            println!(
                "{detail:?}, {connected} frontends with connections: {} series, {} bytes, {:.1} ms per render (incl. dropping the tables); {}",
                series(&text),
                text.len(),
                start.elapsed().as_secs_f64() * 1000.0 / f64::from(runs),
                file.display()
            );
        }
    }
}
