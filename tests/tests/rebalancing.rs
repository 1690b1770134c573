//! Moving existing connections (docs/rebalancing.md): the agent writes a
//! GOAWAY through the kernel gate into connections of this node's pods, the
//! clients finish their calls and reconnect through the connect hook.

#[allow(dead_code)]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use grpclb_agent::dataplane::PinnedTables;
use grpclb_common::{Backend, TrackedConnection};
use grpclb_tests::peers::{start_grpc_load_until, start_server_on_node};
use grpclb_tests::{wait_until, LoadReport, ServiceDef};

/// The servers run inside the node cgroup, as the node's pods do.
const PORT: u16 = 50071;

fn tracked(cluster: &TestCluster) -> Result<Vec<TrackedConnection>> {
    let tables = PinnedTables::open(cluster.bpffs.path()).context("opening the pinned maps")?;
    Ok(tables
        .tracked_connections()?
        .into_iter()
        .map(|(_, c)| c)
        .collect())
}

fn answering_to(cluster: &TestCluster, pod: &Backend) -> Result<usize> {
    Ok(tracked(cluster)?
        .iter()
        .filter(|c| c.backend == *pod && c.tracker.responses() > 0)
        .count())
}

fn metric(cluster: &mut TestCluster, line_prefix: &str) -> Result<u64> {
    let addr = cluster.agent.as_mut().expect("started").metrics_addr()?;
    let (_, body) = http_get(addr, "/metrics")?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or(0))
}

fn assert_no_failures(report: &LoadReport, log: &str) {
    assert_eq!(
        report.failures, 0,
        "failed calls: {:?}\n{report:?}\nagent log:\n{log}",
        report.errors
    );
}

#[test]
fn a_terminating_pod_loses_its_connections_without_a_failed_call() -> Result<()> {
    let mut cluster = TestCluster::new("drain", 2)?;
    let node_name = cluster.node.name().to_string();
    for i in 0..2 {
        let server = start_server_on_node(&cluster.backends[i], &cluster.node, "grpc-server", PORT)?;
        cluster.servers.push(server);
    }
    let ips = cluster.v4s(&[0, 1]);
    let vip = SocketAddr::from((v4_vip(120), 80));
    let service = ServiceDef::grpc("drain", vip.ip(), vip.port(), PORT)
        .backend_on(ips[0], &node_name)
        .backend_on(ips[1], &node_name)
        .tracking_frames();
    cluster.start_agent(std::slice::from_ref(&service))?;
    let leaving = backend(SocketAddr::new(ips[0], PORT));
    let staying = backend(SocketAddr::new(ips[1], PORT));

    let stop = tempfile::tempdir()?;
    let load = start_grpc_load_until(
        &cluster.client,
        Some(&cluster.node),
        vip,
        4,
        &stop.path().join("stop"),
        250,
    )?;
    wait_until("4 connections answering", Duration::from_secs(10), || {
        let (a, b) = (answering_to(&cluster, &leaving)?, answering_to(&cluster, &staying)?);
        Ok((a == 2 && b == 2).then_some(()))
    })?;

    let marked = Instant::now();
    cluster.write(&[service.clone().terminating(ips[0])])?;
    wait_until("the terminating pod out of the backend set", APPLY_TIMEOUT, || {
        let active = cluster.active_backends(vip)?;
        Ok(active
            .is_some_and(|a| a == [backend_socket(&staying)].into())
            .then_some(()))
    })?;
    let applied = marked.elapsed();
    let moved = wait_until("no connection left on the terminating pod", Duration::from_secs(5), || {
        let left = tracked(&cluster)?
            .iter()
            .filter(|c| c.backend == leaving)
            .count();
        Ok((left == 0).then(|| marked.elapsed()))
    })?;
    eprintln!("drain: applied after {applied:?}, connections gone after {moved:?}");
    assert!(
        moved - applied <= Duration::from_secs(2),
        "connections moved {:?} after the agent applied the change\n{}",
        moved - applied,
        cluster.agent_log()
    );
    // The clients keep calling, now on the other pod only.
    wait_until("4 connections on the staying pod", Duration::from_secs(5), || {
        Ok((answering_to(&cluster, &staying)? == 4).then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish()?;
    let log = cluster.agent_log();
    assert_no_failures(&report, &log);
    let last = report.timeline.last().cloned().unwrap_or_default();
    assert_eq!(last.keys().collect::<Vec<_>>(), vec!["b1"], "{report:?}");
    assert_eq!(
        metric(&mut cluster, "grpclb_goaways_total{reason=\"drain\"}")?,
        2,
        "{log}"
    );
    Ok(())
}
