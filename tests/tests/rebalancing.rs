//! Moving existing connections (docs/rebalancing.md): the agent writes a
//! GOAWAY through the kernel gate into connections of this node's pods, the
//! clients finish their calls and reconnect through the connect hook.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;

use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_agent::rebalance::inject::Injector;
use grpclb_common::{Backend, TrackedConnection};
use grpclb_tests::foreign_sockmap::ForeignSockmap;
use grpclb_tests::grpc_stream::StreamRequest;
use grpclb_tests::peers::{
    start_load_until, start_server_on_node, start_slow_stream_readers, GrpcClient, LoadRun,
    LoadShape, ReaderPace,
};
use grpclb_tests::{wait_until, LoadReport, ServiceDef};

/// The servers run inside the node cgroup, as the node's pods do.
const PORT: u16 = 50071;

/// The pods' second gRPC server, for the 1 MiB streams of a Service of
/// their own (so they do not count in the first Service's balance).
const BULK_PORT: u16 = 50072;

/// The agent's count of GOAWAYs sent to move connections off terminating pods.
const DRAIN_GOAWAYS: &str = "grpclb_goaways_total{reason=\"drain\"}";

/// Server-streaming calls alongside the unary ones: 0.5 s each.
const ALONGSIDE: StreamRequest = StreamRequest {
    messages: 20,
    message_bytes: 1024,
    interval_ms: 25,
};

/// 4 connections making server-streaming calls of 1 MiB messages (each
/// crosses the wire as many DATA frames) one after another to `vip`,
/// reading slowly (20 ms per message) with HTTP/2 windows of
/// `window_bytes` (`None`: RFC 9113's 64 KiB), until `stop` exists; every
/// message must arrive whole.
fn start_slow_1_mib_readers(
    cluster: &TestCluster,
    vip: SocketAddr,
    window_bytes: Option<u32>,
    stop: &Path,
) -> Result<LoadRun> {
    let asked = StreamRequest {
        messages: 4,
        message_bytes: 1 << 20,
        interval_ms: 0,
    };
    start_slow_stream_readers(
        &cluster.client,
        Some(&cluster.node),
        vip,
        4,
        asked,
        ReaderPace {
            read_delay: Duration::from_millis(20),
            window_bytes,
            ..ReaderPace::default()
        },
        stop,
    )
}

/// `testpod grpc-server` on `port` in the first `pods` backends, in the node's
/// cgroup as the node's pods are.
fn start_grpc_servers(cluster: &mut TestCluster, pods: usize, port: u16) -> Result<()> {
    for i in 0..pods {
        let server =
            start_server_on_node(&cluster.backends[i], &cluster.node, "grpc-server", port)?;
        cluster.servers.push(server);
    }
    Ok(())
}

/// Two pods of the node serving gRPC on `port` behind a Service with frame
/// tracking at `vip`, and the agent running.
struct TwoPods {
    cluster: TestCluster,
    service: ServiceDef,
    vip: SocketAddr,
    ips: Vec<IpAddr>,
}

impl TwoPods {
    fn start(name: &str, vip: SocketAddr, port: u16) -> Result<TwoPods> {
        let mut cluster = TestCluster::new(name, 2)?;
        let node_name = cluster.node.name().to_string();
        start_grpc_servers(&mut cluster, 2, port)?;
        let ips = cluster.v4s(&[0, 1]);
        let service = ServiceDef::grpc(name, vip.ip(), vip.port(), port)
            .backend_on(ips[0], &node_name)
            .backend_on(ips[1], &node_name)
            .tracking_frames();
        cluster.start_agent(std::slice::from_ref(&service))?;
        Ok(TwoPods {
            cluster,
            service,
            vip,
            ips,
        })
    }
}

/// One load scenario at a time: on a 2-core machine two would share the
/// cores unevenly and blur each other's per-pod rates.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn tracked(cluster: &TestCluster) -> Result<Vec<TrackedConnection>> {
    let tables = PinnedTables::open(cluster.bpffs.path()).context("opening the pinned maps")?;
    Ok(tables
        .tracked_connections()?
        .into_iter()
        .map(|(_, c)| c)
        .collect())
}

/// Until exactly `n` connections to `pod` are open.
fn wait_for_connections(
    cluster: &TestCluster,
    pod: &Backend,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    let what = format!("{n} connections to {}", backend_socket(pod));
    wait_until(&what, timeout, || {
        let open = tracked(cluster)?
            .iter()
            .filter(|c| c.backend == *pod)
            .count();
        Ok((open == n).then_some(()))
    })
}

fn answering_to(cluster: &TestCluster, pod: &Backend) -> Result<usize> {
    Ok(tracked(cluster)?
        .iter()
        .filter(|c| c.backend == *pod && c.tracker.responses() > 0)
        .count())
}

/// The value of the sample `name_and_labels`, 0 when there is none.
fn metric(cluster: &mut TestCluster, name_and_labels: &str) -> Result<f64> {
    let addr = cluster.agent.as_mut().expect("started").metrics_addr()?;
    let (_, body) = http_get(addr, "/metrics")?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0))
}

fn assert_no_failures(report: &LoadReport, log: &str) {
    assert_eq!(
        report.failures, 0,
        "failed calls: {:?}\n{report:?}\nagent log:\n{log}",
        report.errors
    );
}

/// The lines of the agent's log that tell its moves and GOAWAYs.
fn agent_moves(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("GOAWAY sent") || l.contains("move "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// After a drain of pod b0 with b1 staying: every stream whole, some from
/// each pod, and `drain_goaways` drain GOAWAYs sent.
fn assert_whole_streams_from_both_pods(
    cluster: &mut TestCluster,
    report: &LoadReport,
    log: &str,
    drain_goaways: f64,
) -> Result<()> {
    assert_no_failures(report, log);
    for pod in ["b0", "b1"] {
        assert!(
            report.streams_per_pod.get(pod).is_some_and(|&n| n > 0),
            "no whole stream from {pod}: {report:?}"
        );
    }
    assert_eq!(metric(cluster, DRAIN_GOAWAYS)?, drain_goaways, "{log}");
    Ok(())
}

/// Unary calls on every connection, and streams alongside.
fn unary_and_streaming(connections: u64, timeline_ms: u64) -> LoadShape {
    LoadShape {
        connections,
        timeline_ms,
        streams: Some(ALONGSIDE),
    }
}

#[test]
fn drain_with_tonic_clients() -> Result<()> {
    a_terminating_pod_loses_its_connections_without_a_failed_call("draintonic", GrpcClient::Tonic)
}

/// grpc-go's dynamic windows (BDP estimation, up to 16 MiB) grow under
/// streams of 1 MiB messages read as fast as they come.
#[test]
fn drain_with_grpc_go_clients_streaming_1_mib_messages() -> Result<()> {
    drain_under(
        "draingo1mib",
        GrpcClient::GrpcGo,
        StreamRequest {
            messages: 8,
            message_bytes: 1 << 20,
            interval_ms: 0,
        },
    )
}

#[test]
fn drain_with_grpc_go_clients() -> Result<()> {
    a_terminating_pod_loses_its_connections_without_a_failed_call("draingrpcgo", GrpcClient::GrpcGo)
}

#[test]
fn drain_with_grpc_js_clients() -> Result<()> {
    a_terminating_pod_loses_its_connections_without_a_failed_call("draingrpcjs", GrpcClient::GrpcJs)
}

#[test]
fn drain_with_grpcio_clients() -> Result<()> {
    a_terminating_pod_loses_its_connections_without_a_failed_call("draingrpcio", GrpcClient::Grpcio)
}

fn a_terminating_pod_loses_its_connections_without_a_failed_call(
    name: &str,
    client: GrpcClient,
) -> Result<()> {
    drain_under(name, client, ALONGSIDE)
}

/// Unary calls and `streams` on 4 connections; one of 2 pods terminates.
fn drain_under(name: &str, client: GrpcClient, streams: StreamRequest) -> Result<()> {
    let _exclusive = exclusive();
    let TwoPods {
        mut cluster,
        service,
        vip,
        ips,
    } = TwoPods::start(name, SocketAddr::from((v4_vip(120), 80)), PORT)?;
    let leaving = backend(SocketAddr::new(ips[0], PORT));
    let staying = backend(SocketAddr::new(ips[1], PORT));

    let stop = tempfile::tempdir()?;
    let load = start_load_until(
        client,
        &cluster.client,
        Some(&cluster.node),
        vip,
        &LoadShape {
            connections: 4,
            timeline_ms: 250,
            streams: Some(streams),
        },
        &stop.path().join("stop"),
    )?;
    wait_until("4 connections answering", Duration::from_secs(10), || {
        let (a, b) = (
            answering_to(&cluster, &leaving)?,
            answering_to(&cluster, &staying)?,
        );
        Ok((a == 2 && b == 2).then_some(()))
    })?;

    let marked = Instant::now();
    cluster.write(&[service.clone().terminating(ips[0])])?;
    wait_until(
        "the terminating pod out of the backend set",
        APPLY_TIMEOUT,
        || {
            let active = cluster.active_backends(vip)?;
            Ok(active
                .is_some_and(|a| a == [backend_socket(&staying)].into())
                .then_some(()))
        },
    )?;
    let applied = marked.elapsed();
    wait_for_connections(&cluster, &leaving, 0, Duration::from_secs(5))?;
    let moved = marked.elapsed();
    eprintln!("{name}: applied after {applied:?}, connections gone after {moved:?}");
    assert!(
        moved - applied <= Duration::from_secs(2),
        "connections moved {:?} after the agent applied the change\n{}",
        moved - applied,
        cluster.agent_log()
    );
    // The clients keep calling, now on the other pod only.
    wait_until(
        "4 connections on the staying pod",
        Duration::from_secs(5),
        || Ok((answering_to(&cluster, &staying)? == 4).then_some(())),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish()?;
    let log = cluster.agent_log();
    assert_no_failures(&report, &log);
    assert!(report.streams_ok() > 0, "no whole stream: {report:?}");
    let last = report.timeline.last().cloned().unwrap_or_default();
    assert_eq!(last.keys().collect::<Vec<_>>(), vec!["b1"], "{report:?}");
    assert_eq!(metric(&mut cluster, DRAIN_GOAWAYS)?, 2.0, "{log}");
    Ok(())
}

/// Per-pod answers in consecutive windows of `per_window` timeline buckets.
fn windows(report: &LoadReport, from: usize, per_window: usize) -> Vec<Vec<u64>> {
    let pods: Vec<&String> = report.per_pod.keys().collect();
    report.timeline[from..]
        .chunks(per_window)
        .filter(|w| w.len() == per_window)
        .map(|w| {
            pods.iter()
                .map(|pod| w.iter().map(|b| b.get(*pod).copied().unwrap_or(0)).sum())
                .collect()
        })
        .collect()
}

#[test]
fn scale_up_with_tonic_clients_and_slow_1_mib_streams_alongside() -> Result<()> {
    a_scale_up_from_2_to_4_pods_evens_out_the_calls_without_a_failed_call(
        "scaletonic",
        GrpcClient::Tonic,
        true,
    )
}

#[test]
fn scale_up_with_grpc_go_clients() -> Result<()> {
    a_scale_up_from_2_to_4_pods_evens_out_the_calls_without_a_failed_call(
        "scalegrpcgo",
        GrpcClient::GrpcGo,
        false,
    )
}

#[test]
fn scale_up_with_grpc_js_clients() -> Result<()> {
    a_scale_up_from_2_to_4_pods_evens_out_the_calls_without_a_failed_call(
        "scalegrpcjs",
        GrpcClient::GrpcJs,
        false,
    )
}

#[test]
fn scale_up_with_grpcio_clients() -> Result<()> {
    a_scale_up_from_2_to_4_pods_evens_out_the_calls_without_a_failed_call(
        "scalegrpcio",
        GrpcClient::Grpcio,
        false,
    )
}

/// With `slow_1_mib_readers`, a second Service of the same pods streams
/// 1 MiB messages to slow readers all along, and scales with the first.
fn a_scale_up_from_2_to_4_pods_evens_out_the_calls_without_a_failed_call(
    name: &str,
    client: GrpcClient,
    slow_1_mib_readers: bool,
) -> Result<()> {
    const BUCKET_MS: u64 = 500;
    let _exclusive = exclusive();
    let mut cluster = TestCluster::new(name, 4)?;
    let node_name = cluster.node.name().to_string();
    start_grpc_servers(&mut cluster, 4, PORT)?;
    if slow_1_mib_readers {
        start_grpc_servers(&mut cluster, 4, BULK_PORT)?;
    }
    let ips = cluster.v4s(&[0, 1, 2, 3]);
    let vip = SocketAddr::from((v4_vip(121), 80));
    let bulk_vip = SocketAddr::from((v4_vip(123), 80));
    let services = |pods: &[usize]| {
        let mut services = vec![(name.to_string(), vip, PORT)];
        if slow_1_mib_readers {
            services.push((format!("{name}-bulk"), bulk_vip, BULK_PORT));
        }
        services
            .into_iter()
            .map(|(service_name, vip, port)| {
                pods.iter()
                    .fold(
                        ServiceDef::grpc(&service_name, vip.ip(), vip.port(), port),
                        |s, &i| s.backend_on(ips[i], &node_name),
                    )
                    .tracking_frames()
            })
            .collect::<Vec<_>>()
    };
    cluster.start_agent(&services(&[0, 1]))?;
    let stop = tempfile::tempdir()?;
    let bulk = slow_1_mib_readers
        .then(|| start_slow_1_mib_readers(&cluster, bulk_vip, None, &stop.path().join("bulk-stop")))
        .transpose()?;
    let load = start_load_until(
        client,
        &cluster.client,
        Some(&cluster.node),
        vip,
        &unary_and_streaming(8, BUCKET_MS),
        &stop.path().join("stop"),
    )?;
    wait_until("8 connections answering", Duration::from_secs(10), || {
        let answering: usize = tracked(&cluster)?
            .iter()
            .filter(|c| c.backend.port == PORT && c.tracker.responses() > 0)
            .count();
        Ok((answering == 8).then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    cluster.update(&services(&[0, 1, 2, 3]))?;
    std::thread::sleep(Duration::from_secs(18));
    // The rebalancer's measure of each pod, as the metrics show it.
    for ip in &ips {
        let pod = SocketAddr::new(*ip, PORT);
        let rate = metric(
            &mut cluster,
            &format!("grpclb_local_calls_per_second{{backend=\"{pod}\"}}"),
        )?;
        assert!(rate > 0.0, "no calls per second measured for {pod}");
    }
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for c in tracked(&cluster)?.iter().filter(|c| c.backend.port == PORT) {
        *open
            .entry(backend_socket(&c.backend).to_string())
            .or_default() += 1;
    }
    let report = load.finish()?;
    let log = cluster.agent_log();
    assert_no_failures(&report, &log);
    assert!(report.streams_ok() > 0, "no whole stream: {report:?}");
    if let Some(bulk) = bulk {
        let bulk = bulk.finish()?;
        eprintln!(
            "{name}: streams of 1 MiB messages {:?}",
            bulk.streams_per_pod
        );
        assert_no_failures(&bulk, &log);
        assert_eq!(bulk.streams_per_pod.len(), 4, "{bulk:?}");
    }
    assert_eq!(report.per_pod.len(), 4, "{report:?}");
    // The scale-up shows where the new pods first answer.
    let scaled = report
        .timeline
        .iter()
        .position(|b| b.contains_key("b2") || b.contains_key("b3"))
        .context("the new pods never answered")?;
    let settled = scaled + (10_000 / BUCKET_MS) as usize;
    // Per-pod rates from 10 s after the scale-up to the end of the run
    // (about 5 s): single 2 s windows of one client are noisy by themselves
    // (±10 % and more with the interpreted clients).
    let full_buckets = report.timeline.len().saturating_sub(1 + settled);
    assert!(full_buckets >= 4, "the run ended too early: {report:?}");
    let after = windows(&report, settled, full_buckets);
    let mut table = String::new();
    for (i, w) in windows(&report, scaled.saturating_sub(4), 4)
        .iter()
        .enumerate()
    {
        table += &format!("{:>5} ms {w:?}\n", i as u64 * 4 * BUCKET_MS);
    }
    eprintln!(
        "{name}: calls per pod per 2 s from 2 s before the new pods answered \
         ({} calls retried unsent; open connections at the end {open:?}):\n{table}\
         the agent's moves:\n{}",
        report.retried_unsent,
        agent_moves(&log)
    );
    if client == GrpcClient::Tonic {
        // tonic calls as fast as its share of the 2 cores allows (the other
        // clients call at fixed rates), beside 1 MiB streams on the same
        // pods: its calls per pod measure CPU scheduling (17-18 % apart with
        // 2 connections on every pod), so where its connections are is what
        // shows the scale-up. 8 connections on 4 pods: 2 each.
        let (fewest, most) = (open.values().min(), open.values().max());
        assert!(
            open.len() == 4 && most.zip(fewest).is_some_and(|(m, f)| m - f <= 1),
            "open connections per pod at the end {open:?}; want them even\n{table}\n{log}"
        );
        for w in &after {
            assert!(
                w.iter().all(|&n| n > 0),
                "a pod got no call: {w:?}\n{table}\n{log}"
            );
        }
    } else {
        for w in &after {
            let mean = w.iter().sum::<u64>() as f64 / w.len() as f64;
            for &n in w {
                let off = (n as f64 - mean).abs() / mean;
                assert!(
                    off <= 0.15,
                    "from 10 s after the scale-up on, a pod is {:.0} % off the mean: {w:?}\n{table}\n{log}",
                    off * 100.0
                );
            }
        }
    }
    let moved = metric(&mut cluster, "grpclb_goaways_total{reason=\"scale_up\"}")?;
    assert!(moved >= 2.0, "{moved} scale-up GOAWAYs\n{log}");
    Ok(())
}

#[test]
fn a_drain_during_1_mib_messages_to_slow_readers_breaks_no_stream() -> Result<()> {
    drain_during_1_mib_messages_to_slow_readers("drainbulk", 122, None)
}

/// The reader is slow but its client buffers up to 16 MiB, so the pod sends
/// in bursts as fast as the socket takes them and waits for window updates
/// in between: its send queue empties between bursts.
#[test]
fn a_drain_during_1_mib_messages_to_slow_readers_with_16_mib_windows_breaks_no_stream() -> Result<()>
{
    drain_during_1_mib_messages_to_slow_readers("drainbulk16", 126, Some(16 << 20))
}

fn drain_during_1_mib_messages_to_slow_readers(
    name: &str,
    vip: u8,
    window_bytes: Option<u32>,
) -> Result<()> {
    let _exclusive = exclusive();
    let TwoPods {
        mut cluster,
        service,
        vip,
        ips,
    } = TwoPods::start(name, SocketAddr::from((v4_vip(vip), 80)), BULK_PORT)?;
    let leaving = backend(SocketAddr::new(ips[0], BULK_PORT));

    let stop = tempfile::tempdir()?;
    let readers = start_slow_1_mib_readers(&cluster, vip, window_bytes, &stop.path().join("stop"))?;
    wait_for_connections(&cluster, &leaving, 2, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let marked = Instant::now();
    cluster.write(&[service.clone().terminating(ips[0])])?;
    wait_for_connections(&cluster, &leaving, 0, Duration::from_secs(10))?;
    let moved = marked.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let report = readers.finish()?;
    let log = cluster.agent_log();
    eprintln!(
        "{name}: connections gone {moved:?} after the pod was marked terminating; {report:?}"
    );
    assert_whole_streams_from_both_pods(&mut cluster, &report, &log, 2.0)
}

/// 48 MiB streams (48 messages of 1 MiB), one after another on each of 2
/// connections, read at 4 MiB/s (a slow network or client: 12 s a stream).
const LONG_STREAM: StreamRequest = StreamRequest {
    messages: 48,
    message_bytes: 1 << 20,
    interval_ms: 0,
};
const SLOW_READ: u64 = 4 << 20;

/// Two pods, one connection each reading `asked` streams at [`SLOW_READ`]
/// with HTTP/2 windows of `window_bytes`; the first pod is marked
/// terminating once its connection has sent 8 MiB.
struct SlowReaderDrain {
    cluster: TestCluster,
    readers: LoadRun,
    leaving: Backend,
    marked: Instant,
    _stop: tempfile::TempDir,
}

impl SlowReaderDrain {
    fn start(name: &str, vip: u8, window_bytes: u32, asked: StreamRequest) -> Result<Self> {
        let TwoPods {
            cluster,
            service,
            vip,
            ips,
        } = TwoPods::start(name, SocketAddr::from((v4_vip(vip), 80)), BULK_PORT)?;
        let leaving = backend(SocketAddr::new(ips[0], BULK_PORT));
        let stop = tempfile::tempdir()?;
        let pace = ReaderPace {
            window_bytes: Some(window_bytes),
            read_bytes_per_second: Some(SLOW_READ),
            ..ReaderPace::default()
        };
        let readers = start_slow_stream_readers(
            &cluster.client,
            Some(&cluster.node),
            vip,
            2,
            asked,
            pace,
            &stop.path().join("stop"),
        )?;
        wait_until(
            "8 MiB sent to the leaving pod's reader",
            Duration::from_secs(10),
            || {
                let sent = tracked(&cluster)?
                    .iter()
                    .any(|c| c.backend == leaving && c.tracker.next_offset() > 8 << 20);
                Ok(sent.then_some(()))
            },
        )?;
        let marked = Instant::now();
        cluster.write(&[service.clone().terminating(ips[0])])?;
        Ok(SlowReaderDrain {
            cluster,
            readers,
            leaving,
            marked,
            _stop: stop,
        })
    }

    fn waiting_metric(&self) -> String {
        format!(
            "grpclb_moves_waiting{{backend=\"{}\",cause=\"send_queue_busy\"}}",
            backend_socket(&self.leaving)
        )
    }

    /// Waits until the leaving pod's waiting-move metric reads `want`.
    fn wait_for_waiting(&mut self, what: &str, want: f64, timeout: Duration) -> Result<()> {
        let waiting = self.waiting_metric();
        wait_until(what, timeout, || {
            let n = metric(&mut self.cluster, &waiting)?;
            Ok((n == want).then_some(()))
        })
    }

    /// How long after the marking the drain's GOAWAY went.
    fn wait_for_the_goaway(&mut self, timeout: Duration) -> Result<Duration> {
        wait_until("the drain's GOAWAY", timeout, || {
            Ok((metric(&mut self.cluster, DRAIN_GOAWAYS)? == 1.0).then_some(()))
        })
        .with_context(|| self.cluster.agent_log())?;
        Ok(self.marked.elapsed())
    }

    /// Every stream whole, some from each pod, one drain GOAWAY.
    fn finish(mut self) -> Result<()> {
        let report = self.readers.finish()?;
        let log = self.cluster.agent_log();
        eprintln!("{report:?}\nthe agent's moves:\n{}", agent_moves(&log));
        assert_whole_streams_from_both_pods(&mut self.cluster, &report, &log, 1.0)
    }
}

/// A reader slower than its pod with 16 MiB windows: flow control never
/// holds the pod back, so its send queue stays full for the whole stream
/// and the gate cannot place a GOAWAY. The agent says so (log, metric,
/// status) and moves the connection once the stream's last bytes have left
/// the queue.
#[test]
fn a_drain_waits_for_a_reader_slower_than_its_pod_with_16_mib_windows_and_says_so() -> Result<()> {
    let _exclusive = exclusive();
    let mut drain = SlowReaderDrain::start("drainstuck", 127, 16 << 20, LONG_STREAM)?;
    drain.wait_for_waiting("the drain reported waiting", 1.0, Duration::from_secs(20))?;
    let reported = drain.marked.elapsed();
    let status = drain.cluster.agent.as_ref().expect("started").status()?;
    let leaving = backend_socket(&drain.leaving).to_string();
    assert!(
        status.lines().any(|l| l.starts_with(&leaving)
            && l.contains("drain")
            && l.contains("send_queue_busy")),
        "no waiting move in the status:\n{status}"
    );
    let log = drain.cluster.agent_log();
    assert_eq!(
        log.matches("move waiting: the pod's send queue was never empty")
            .count(),
        1,
        "one warning for the connection:\n{log}"
    );
    let sent = drain.wait_for_the_goaway(Duration::from_secs(30))?;
    // The stream under way finishes on the leaving pod; then the client
    // opens a new connection.
    wait_for_connections(&drain.cluster, &drain.leaving, 0, Duration::from_secs(20))?;
    let gone = drain.marked.elapsed();
    eprintln!(
        "drainstuck: after the pod was marked terminating, reported waiting at {reported:?}, \
         GOAWAY at {sent:?}, connection gone at {gone:?}"
    );
    drain.wait_for_waiting(
        "the waiting move gone from the metric",
        0.0,
        Duration::from_secs(2),
    )?;
    let status = drain.cluster.agent.as_ref().expect("started").status()?;
    assert!(!status.contains("WAITING MOVE"), "{status}");
    drain.finish()
}

/// The same reader with RFC 9113's 64 KiB windows: flow control holds the
/// pod back after every 64 KiB, its send queue empties, and the GOAWAY goes
/// at once.
#[test]
fn a_drain_of_a_reader_slower_than_its_pod_with_default_windows_moves_at_once() -> Result<()> {
    let _exclusive = exclusive();
    let asked = StreamRequest {
        messages: 16,
        ..LONG_STREAM
    };
    let mut drain = SlowReaderDrain::start("drainslow64k", 128, 65_535, asked)?;
    let sent = drain.wait_for_the_goaway(Duration::from_secs(2))?;
    wait_for_connections(&drain.cluster, &drain.leaving, 0, Duration::from_secs(20))?;
    eprintln!(
        "drainslow64k: after the pod was marked terminating, GOAWAY at {sent:?}, connection \
         gone at {:?}",
        drain.marked.elapsed()
    );
    let waiting = drain.waiting_metric();
    assert_eq!(metric(&mut drain.cluster, &waiting)?, 0.0);
    drain.finish()
}

/// A socket whose `sk_msg` slot another program's sockmap holds cannot go
/// into the gate (EBUSY): the agent leaves that connection where it is and
/// counts it, and still moves the others.
#[test]
fn a_connection_another_sockmap_owns_is_left_alone_and_counted() -> Result<()> {
    let _exclusive = exclusive();
    let TwoPods {
        mut cluster,
        service,
        vip,
        ips,
    } = TwoPods::start("foreignmap", SocketAddr::from((v4_vip(124), 80)), PORT)?;
    let leaving = backend(SocketAddr::new(ips[0], PORT));

    let stop = tempfile::tempdir()?;
    let load = start_load_until(
        GrpcClient::Tonic,
        &cluster.client,
        Some(&cluster.node),
        vip,
        &unary_and_streaming(4, 250),
        &stop.path().join("stop"),
    )?;
    wait_until(
        "2 connections answering on the leaving pod",
        Duration::from_secs(10),
        || Ok((answering_to(&cluster, &leaving)? == 2).then_some(())),
    )?;
    // One of its server sockets goes into "another program's" sockmap.
    let tables = PinnedTables::open(cluster.bpffs.path())?;
    let (cookie, owned) = tables
        .tracked_connections()?
        .into_iter()
        .find(|(_, c)| c.backend == leaving)
        .context("a tracked connection to the leaving pod")?;
    let injector = Injector::open(cluster.bpffs.path(), cluster.node.path())?;
    let handle = injector
        .locate(cookie, &owned)?
        .context("the server socket in the pod's process")?;
    let foreign = ForeignSockmap::new()?;
    foreign.insert(
        0,
        grpclb_agent::rebalance::inject::duplicate(handle.pid, handle.fd)?.as_fd(),
    )?;

    cluster.write(&[service.clone().terminating(ips[0])])?;
    wait_until("the busy move counted", Duration::from_secs(5), || {
        let busy = metric(
            &mut cluster,
            "grpclb_moves_abandoned_total{cause=\"sockmap_busy\"}",
        )?;
        Ok((busy == 1.0).then_some(()))
    })?;
    // The other connection moves; the foreign-owned one stays and serves.
    wait_for_connections(&cluster, &leaving, 1, Duration::from_secs(5))?;
    let responses_of_the_one_left = || -> Result<u64> {
        let left = tracked(&cluster)?;
        let mut left = left.iter().filter(|c| c.backend == leaving);
        let one = left.next().context("no connection left on the pod")?;
        anyhow::ensure!(left.next().is_none(), "more than one connection left");
        Ok(one.tracker.responses())
    };
    let before = responses_of_the_one_left()?;
    std::thread::sleep(Duration::from_secs(1));
    let after = responses_of_the_one_left()?;
    let report = load.finish()?;
    let log = cluster.agent_log();
    assert_no_failures(&report, &log);
    assert!(
        after > before,
        "the connection left stopped answering\n{log}"
    );
    assert!(
        log.contains("another program's sockmap holds this socket"),
        "no word of it in the log:\n{log}"
    );
    assert_eq!(metric(&mut cluster, DRAIN_GOAWAYS)?, 1.0, "{log}");
    Ok(())
}
