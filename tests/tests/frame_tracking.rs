//! The kernel follows the HTTP/2 frames that pods of the node send on the
//! connections they accept (the frame tracker of docs/rebalancing.md, run by
//! cgroup_skb/egress on real traffic): exact response counts per backend,
//! and anything that is not HTTP/2 is left untracked.

#[allow(dead_code)]
mod common;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use common::*;
use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_common::frame::Phase;
use grpclb_common::TrackedConnection;
use grpclb_tests::peers::{
    connect_and_hold, grpc_load_and_hold, start_server_on_node, ConnectOptions,
};
use grpclb_tests::ServiceDef;

/// Ports of servers that run inside the node cgroup, as the node's pods do.
const LOCAL_GRPC_PORT: u16 = 50061;
const LOCAL_WHOAMI_PORT: u16 = 7061;
/// Also in the node cgroup, behind a Service without the annotation.
const OPTED_OUT_GRPC_PORT: u16 = 50062;

fn tracked_to(cluster: &TestCluster, backend: SocketAddr) -> Result<Vec<TrackedConnection>> {
    let tables = PinnedTables::open(cluster.bpffs.path()).context("opening the pinned maps")?;
    let want = common::backend(backend);
    Ok(tables
        .tracked_connections()?
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.backend == want)
        .collect())
}

#[test]
fn responses_of_local_pods_are_counted_exactly_and_other_protocols_are_untracked() -> Result<()> {
    let mut cluster = TestCluster::new("track", 2)?;
    let node_name = cluster.node.name().to_string();
    let b0 = cluster.backends[0].clone();
    for (kind, port) in [
        ("grpc-server", LOCAL_GRPC_PORT),
        ("whoami", LOCAL_WHOAMI_PORT),
        ("grpc-server", OPTED_OUT_GRPC_PORT),
    ] {
        let server = start_server_on_node(&b0, &cluster.node, kind, port)?;
        cluster.servers.push(server);
    }
    let grpc_vip = SocketAddr::from((v4_vip(110), 80));
    let whoami_vip = SocketAddr::from((v4_vip(111), LOCAL_WHOAMI_PORT));
    let b1_ip = cluster.v4s(&[1])[0];
    cluster.start_agent(&[
        ServiceDef::grpc("local", grpc_vip.ip(), grpc_vip.port(), LOCAL_GRPC_PORT)
            .backend_on(b0.ipv4, &node_name)
            .tracking_frames(),
        ServiceDef::grpc(
            "plain",
            whoami_vip.ip(),
            whoami_vip.port(),
            LOCAL_WHOAMI_PORT,
        )
        .backend_on(b0.ipv4, &node_name)
        .tracking_frames(),
        // A pod of another node: its connections are that node's to follow.
        ServiceDef::grpc("remote", v4_vip(112), 80, GRPC_PORT)
            .backend_on(b1_ip, "another-node")
            .tracking_frames(),
        // A local pod of a Service that did not opt in.
        ServiceDef::grpc("opted-out", v4_vip(113), 80, OPTED_OUT_GRPC_PORT)
            .backend_on(b0.ipv4, &node_name),
    ])?;

    let (load, _held) = grpc_load_and_hold(&cluster.client, Some(&cluster.node), grpc_vip, 3, 40)?;
    assert_eq!((load.ok, load.failures), (120, 0), "{load:?}");
    let grpc_backend = SocketAddr::new(b0.ipv4.into(), LOCAL_GRPC_PORT);
    let connections = tracked_to(&cluster, grpc_backend)?;
    assert_eq!(
        connections.len(),
        3,
        "{connections:?}\n{}",
        cluster.agent_log()
    );
    assert!(
        connections
            .iter()
            .all(|c| c.tracker.phase() == Phase::Frames),
        "{connections:?}"
    );
    // Every unary response ends with trailers: HEADERS with END_STREAM.
    let responses: u64 = connections.iter().map(|c| c.tracker.responses()).sum();
    assert_eq!(responses, 120);

    let (plain, _plain_held) = connect_and_hold(
        &cluster.client,
        Some(&cluster.node),
        whoami_vip,
        2,
        &ConnectOptions::default(),
    )?;
    assert!(plain.failures().is_empty(), "{plain:?}");
    let whoami_backend = SocketAddr::new(b0.ipv4.into(), LOCAL_WHOAMI_PORT);
    let connections = tracked_to(&cluster, whoami_backend)?;
    assert_eq!(connections.len(), 2, "{connections:?}");
    assert!(
        connections
            .iter()
            .all(|c| c.tracker.phase() == Phase::Untracked),
        "a whoami line is not HTTP/2: {connections:?}"
    );

    // The agent turns the kernel's counts into metrics.
    let metrics = cluster.agent.as_mut().expect("started").metrics_addr()?;
    let (code, body) = http_get(metrics, "/metrics")?;
    assert_eq!(code, 200);
    for line in [
        format!("grpclb_local_responses_total{{backend=\"{grpc_backend}\"}} 120"),
        format!("grpclb_local_tracked_connections{{backend=\"{grpc_backend}\"}} 3"),
        format!("grpclb_local_untracked_connections{{backend=\"{whoami_backend}\"}} 2"),
        // What each pod accepted, per Service port: the imbalance alert's measure.
        format!("grpclb_local_connections{{frontend=\"default/local:grpc\",address=\"{grpc_vip}\",backend=\"{grpc_backend}\"}} 3"),
        format!("grpclb_local_connections{{frontend=\"default/plain:grpc\",address=\"{whoami_vip}\",backend=\"{whoami_backend}\"}} 2"),
        format!("grpclb_local_connections{{frontend=\"default/opted-out:grpc\",address=\"{}\",backend=\"{}\"}} 0", SocketAddr::from((v4_vip(113), 80)), SocketAddr::new(b0.ipv4.into(), OPTED_OUT_GRPC_PORT)),
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }

    let remote = SocketAddr::new(b1_ip, GRPC_PORT);
    assert!(
        tracked_to(&cluster, remote)?.is_empty(),
        "not a pod of this node"
    );
    let opted_out_vip = SocketAddr::from((v4_vip(113), 80));
    let (opted_out, _opted_out_held) =
        grpc_load_and_hold(&cluster.client, Some(&cluster.node), opted_out_vip, 1, 5)?;
    assert_eq!(opted_out.ok, 5, "{opted_out:?}");
    let not_opted_in = SocketAddr::new(b0.ipv4.into(), OPTED_OUT_GRPC_PORT);
    assert!(
        tracked_to(&cluster, not_opted_in)?.is_empty(),
        "no track-frames annotation"
    );
    Ok(())
}
