//! The harness itself, without the agent: pods reach each other only inside
//! their fabric, clients land in the node cgroup, guards clean up.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;

use anyhow::Result;
use grpclb_tests::peers::{connect, grpc_load, start_grpc_server, start_whoami, ConnectOptions};
use grpclb_tests::{spawn, Fabric, Node};

const WHOAMI_PORT: u16 = 7000;
const GRPC_PORT: u16 = 50051;

#[test]
fn pods_reach_each_other_by_pod_ip_and_nothing_else() -> Result<()> {
    let node = Node::new("harness")?;
    let fabric = Fabric::new("harness")?;
    let server_v6: Ipv6Addr = "fd00:244::2".parse()?;
    let server = fabric.add_pod("server", Ipv4Addr::new(10, 244, 0, 2), Some(server_v6))?;
    let client = fabric.add_pod(
        "client",
        Ipv4Addr::new(10, 244, 0, 3),
        Some("fd00:244::3".parse()?),
    )?;
    let _whoami = start_whoami(&server, WHOAMI_PORT)?;
    let _grpc = start_grpc_server(&server, GRPC_PORT)?;

    for to in [
        SocketAddr::from((server.ipv4, WHOAMI_PORT)),
        SocketAddr::from((server_v6, WHOAMI_PORT)),
    ] {
        let report = connect(&client, Some(&node), to, 2, &ConnectOptions::default())?;
        assert!(report.failures().is_empty(), "{report:?}");
        assert_eq!(report.per_pod().get("server"), Some(&2), "{report:?}");
        assert!(
            report.attempts.iter().all(|a| a.peer == Some(to)),
            "{report:?}"
        );
    }

    let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 1), WHOAMI_PORT));
    let report = connect(&client, Some(&node), vip, 1, &ConnectOptions::default())?;
    assert_eq!(
        report.attempts[0].error.as_deref(),
        Some("ENETUNREACH"),
        "{report:?}"
    );

    let load = grpc_load(
        &client,
        Some(&node),
        SocketAddr::from((server.ipv4, GRPC_PORT)),
        2,
        5,
    )?;
    assert_eq!(load.failures, 0, "{load:?}");
    assert_eq!(load.per_pod.get("server"), Some(&10), "{load:?}");
    assert_eq!(load.channels_per_pod.get("server"), Some(&2), "{load:?}");
    Ok(())
}

#[test]
fn spawned_processes_join_the_node_cgroup_and_the_node_goes_away() -> Result<()> {
    let node = Node::new("harness-cg")?;
    let fabric = Fabric::new("harness-cg")?;
    let pod = fabric.add_pod("p", Ipv4Addr::new(10, 244, 0, 2), None)?;
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let mut sleeper = spawn(&pod, Some(&node), sleep)?;
    assert_eq!(node.pids()?, vec![sleeper.pid()]);
    let path = node.path().to_path_buf();
    // The node kills what still runs in it before removing the cgroup; the
    // guard then only reaps.
    drop(node);
    assert!(!path.exists(), "{} still exists", path.display());
    assert!(sleeper.try_wait().is_some(), "the node's process survived");
    Ok(())
}
