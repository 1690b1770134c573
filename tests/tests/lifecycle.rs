//! Readiness and convergence through the real agent: a connect made the
//! moment the agent says it is ready is balanced, fresh or restarted, and a
//! full map is reported, then converges once room is made. Needs root
//! (cgroup, netns, eBPF).

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use common::*;
use grpclb_tests::peers::{connect, ConnectOptions};
use grpclb_tests::{service_yaml, write_atomically, Agent, ServiceDef};

/// Services with fake endpoints next to the real one, so the first sync
/// takes a while: a readiness signal that came before it would be caught.
const FILLER_SERVICES: u16 = 1000;

fn filler() -> Vec<ServiceDef> {
    (0..FILLER_SERVICES)
        .map(|s| {
            let (hi, lo) = ((s / 200) as u8, (s % 200) as u8);
            ServiceDef::grpc(
                &format!("filler-{s}"),
                Ipv4Addr::new(10, 97, hi, lo + 1),
                80,
                WHOAMI_PORT,
            )
            .backends((1..=10).map(|e| Ipv4Addr::new(10, 200 + hi, lo, e)))
        })
        .collect()
}

/// The pods `count` connects from the client pod reached; any failed
/// connect (e.g. "Network is unreachable": not rewritten) fails the test.
fn reached(cluster: &TestCluster, vip: SocketAddr, count: u64) -> Result<BTreeSet<String>> {
    let report = connect(
        &cluster.client,
        Some(&cluster.node),
        vip,
        count,
        &ConnectOptions::default(),
    )?;
    anyhow::ensure!(
        report.failures().is_empty(),
        "connects to {vip} failed: {:?}\nagent log:\n{}",
        report.failures(),
        cluster.agent_log()
    );
    Ok(report.per_pod().into_keys().collect())
}

fn pods(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// 20 agent starts, alternately on fresh pins and (after a SIGKILL, with the
/// Service moved to the other pod meanwhile) on adopted ones; each is
/// followed at once by connects, which all reach the pod the file names.
#[test]
fn connects_made_as_the_agent_turns_ready_are_balanced_by_the_new_state() -> Result<()> {
    const STARTS: usize = 20;
    let mut cluster = TestCluster::new("ready", 2)?;
    let vip = SocketAddr::from((v4_vip(40), 80));
    // Written once: a large file takes a while to render.
    let files: Vec<String> = cluster
        .v4s(&[0, 1])
        .into_iter()
        .map(|addr| {
            let mut all = filler();
            all.push(ServiceDef::grpc("whoami", vip.ip(), vip.port(), WHOAMI_PORT).backend(addr));
            service_yaml(&all)
        })
        .collect();
    for start in 0..STARTS {
        let backend = start % 2;
        if start % 4 < 2 {
            // Fresh: the previous agent is killed and its pins removed.
            cluster.agent = None;
        } else if let Some(agent) = cluster.agent.take() {
            // Adopt: the links and maps stay; they still name the old pod.
            agent.kill9()?;
        }
        write_atomically(&cluster.file, &files[backend])?;
        cluster.agent = Some(Agent::start(
            &cluster.node,
            cluster.bpffs.path(),
            &cluster.file,
        )?);
        assert_eq!(
            reached(&cluster, vip, 4)?,
            pods(&[&format!("b{backend}")]),
            "start {start}"
        );
    }
    let agent = cluster.agent();
    let status = agent.status()?;
    assert_eq!(
        status.lines().next(),
        Some(format!("agent: ready (pid {})", agent.pid()).as_str()),
        "{status}"
    );
    Ok(())
}

/// With room for two frontends, adding a third is refused whole and
/// reported (status, /readyz, the metric, the log) while the two keep
/// balancing; deleting one and adding the third in the same change
/// converges.
#[test]
fn with_a_full_frontend_map_delete_a_add_b_converges() -> Result<()> {
    let mut cluster = TestCluster::new("full", 2)?;
    let service = |name: &str, last: u8, backend: usize| {
        let vip = SocketAddr::from((v4_vip(last), 80));
        let def = ServiceDef::grpc(name, vip.ip(), vip.port(), WHOAMI_PORT)
            .backends(cluster.v4s(&[backend]));
        (vip, def)
    };
    let (vip_a, a) = service("a", 51, 0);
    let (vip_b, b) = service("b", 52, 1);
    let (vip_c, c) = service("c", 53, 1);
    cluster.start_agent_with(&[a.clone(), c.clone()], &["--max-frontends=2"])?;
    let metrics = cluster.agent.as_mut().expect("started").metrics_addr()?;

    cluster.write(&[a.clone(), b.clone(), c.clone()])?;
    let agent = cluster.agent.as_mut().expect("started");
    let reason = agent.wait_not_ready("FRONTENDS is full")?;
    assert!(
        reason.starts_with("FRONTENDS is full (2 entries): 1 short for default/b:")
            && reason.contains("the desired state needs 3 (raise --max-frontends")
            && !reason.contains("SERVICE_NAMES"),
        "{reason}"
    );
    let (code, body) = http_get(metrics, "/readyz")?;
    assert_eq!((code, body), (503, format!("not ready: {reason}\n")));
    let pid = cluster.agent().pid();
    // Not ready: `status` still shows the maps, says why on stderr and
    // exits 1, from the agent's answer as from the maps alone.
    let asked = cluster.agent.as_mut().expect("started").status_run(&[])?;
    let read = grpclb_tests::status_run(cluster.bpffs.path(), &["--metrics-addr=127.0.0.1:1"])?;
    for run in [&asked, &read] {
        assert_eq!(run.code, Some(1), "{run:?}");
        assert_eq!(
            run.stdout.lines().next(),
            Some(format!("agent: not ready (pid {pid}): {reason}").as_str()),
            "{run:?}"
        );
        assert!(
            run.stderr
                .contains(&format!("the agent (pid {pid}) is not ready: {reason}")),
            "{run:?}"
        );
    }
    let (_, body) = http_get(metrics, "/metrics")?;
    assert!(
        body.lines()
            .any(|l| l == "grpclb_map_full{map=\"FRONTENDS\"} 1"),
        "{body}"
    );
    assert!(cluster.agent_log().contains("FRONTENDS is full"));
    assert_eq!(reached(&cluster, vip_a, 2)?, pods(&["b0"]));
    assert_eq!(reached(&cluster, vip_c, 2)?, pods(&["b1"]));
    assert_eq!(cluster.active_backends(vip_b)?, None, "b half-applied");

    cluster.write(&[b.clone(), c.clone()])?;
    cluster.agent.as_mut().expect("started").wait_ready()?;
    assert_eq!(reached(&cluster, vip_b, 2)?, pods(&["b1"]));
    assert_eq!(cluster.active_backends(vip_a)?, None);
    let (_, body) = http_get(metrics, "/metrics")?;
    assert!(
        body.lines()
            .any(|l| l == "grpclb_map_full{map=\"FRONTENDS\"} 0"),
        "{body}"
    );
    Ok(())
}

/// With room for four backend slot entries, the count the agent keeps of
/// them follows every swap, trim and addition: a frontend that would need a
/// fifth is refused, and fits once an update of another frees an entry.
#[test]
fn backend_slot_room_is_counted_across_swaps() -> Result<()> {
    let mut cluster = TestCluster::new("slots", 2)?;
    let [b0, b1] = [0, 1].map(|i| cluster.v4s(&[i])[0]);
    let service = |name: &str, last: u8, backends: &[std::net::IpAddr]| {
        let vip = SocketAddr::from((v4_vip(last), 80));
        let def = ServiceDef::grpc(name, vip.ip(), vip.port(), WHOAMI_PORT)
            .backends(backends.iter().copied());
        (vip, def)
    };
    // A's first set takes slot 1 (2 entries), its second slot 0 (1), B 1.
    cluster.start_agent_with(&[service("a", 61, &[b0, b1]).1], &["--max-backend-slots=4"])?;
    cluster.update(&[service("a", 61, &[b1]).1])?;
    let (vip_b, b) = service("b", 62, &[b0]);
    cluster.update(&[service("a", 61, &[b1]).1, b.clone()])?;
    cluster.agent.as_mut().expect("started").wait_ready()?;

    let (vip_c, c) = service("c", 63, &[b1]);
    cluster.write(&[service("a", 61, &[b1]).1, b.clone(), c.clone()])?;
    let reason = cluster
        .agent
        .as_mut()
        .expect("started")
        .wait_not_ready("BACKEND_SLOTS is full")?;
    assert!(
        reason.starts_with("BACKEND_SLOTS is full (4 entries): 1 short for default/c:")
            && reason.contains("needs at least 3 (up to 6 with each frontend's previous set)"),
        "{reason}"
    );
    assert_eq!(cluster.active_backends(vip_c)?, None, "c half-applied");
    assert_eq!(reached(&cluster, vip_b, 2)?, pods(&["b0"]));

    // A's third set overwrites slot 1 and trims it to one entry: room for C.
    cluster.write(&[service("a", 61, &[b0]).1, b, c])?;
    cluster.agent.as_mut().expect("started").wait_ready()?;
    assert_eq!(reached(&cluster, vip_c, 2)?, pods(&["b1"]));
    Ok(())
}
