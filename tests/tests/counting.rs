//! Connection counts under churn: tens of thousands of connections opened
//! and closed every way TCP allows while the agent swaps backend sets, then
//! `BACKEND_LOAD` must hold exactly the connections still open, and 0 once
//! they are closed.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::*;
use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_agent::dataplane::tables::ServiceTables;
use grpclb_common::Backend;
use grpclb_tests::peers::{start_churn, ChurnOptions};
use grpclb_tests::ChildGuard;
use grpclb_tests::{ChurnKind, ChurnReport, ServiceDef};

/// Nothing listens there in the backend pods: connects get a RST.
const CLOSED_PORT: u16 = 7999;
const CONNECTIONS: u64 = 100_000;
/// Backend sets the Services cycle through (pod indices): shrinking,
/// growing, disjoint, so load entries are removed and created again.
const SETS: &[&[usize]] = &[
    &[0, 1, 2, 3],
    &[1, 2],
    &[0, 3],
    &[2, 3],
    &[0],
    &[0, 1, 2],
    &[3],
    &[1, 3],
];

/// Every count in `BACKEND_LOAD`, by backend.
fn loads(cluster: &TestCluster) -> Result<BTreeMap<Backend, u64>> {
    let tables = PinnedTables::open(cluster.bpffs.path())?;
    Ok(tables.loads()?.into_iter().collect())
}

/// Counts per whoami name (both families of a pod add up); entries of no
/// pod's whoami port (the refusing port) are kept under their address.
fn per_pod(cluster: &TestCluster, loads: &BTreeMap<Backend, u64>) -> BTreeMap<String, u64> {
    let mut pods = BTreeMap::new();
    for (backend, count) in loads {
        let socket = backend_socket(backend);
        let pod = cluster.backends.iter().find(|p| {
            socket.port() == WHOAMI_PORT
                && (socket.ip() == IpAddr::from(p.ipv4)
                    || Some(socket.ip()) == p.ipv6.map(IpAddr::from))
        });
        let name = pod.map_or_else(|| socket.to_string(), |p| p.name.clone());
        *pods.entry(name).or_default() += count;
    }
    pods.retain(|_, count| *count > 0);
    pods
}

#[test]
fn counts_stay_exact_through_churn_refusals_resets_and_set_swaps() -> Result<()> {
    let mut cluster = TestCluster::new("churn", 4)?;
    let v4 = SocketAddr::from((v4_vip(100), WHOAMI_PORT));
    let v6 = SocketAddr::from((v6_vip(100), WHOAMI_PORT));
    let refusing = SocketAddr::from((v4_vip(101), WHOAMI_PORT));
    let services = |cluster: &TestCluster, set: &[usize]| {
        vec![
            ServiceDef::grpc("open", v4.ip(), v4.port(), WHOAMI_PORT).backends(cluster.v4s(set)),
            ServiceDef::grpc("open6", v6.ip(), v6.port(), WHOAMI_PORT).backends(cluster.v6s(set)),
            ServiceDef::grpc("refusing", refusing.ip(), refusing.port(), CLOSED_PORT)
                .backends(cluster.v4s(set)),
        ]
    };
    for pod in cluster.backends.iter().chain([&cluster.client]) {
        pod.spread_receive_over_cpus()?;
    }
    let first = services(&cluster, SETS[0]);
    cluster.start_agent(&first)?;

    let started = Instant::now();
    let churn = churn(&cluster, [v4, v6], refusing, CONNECTIONS)?;
    // The churn reports when it is done; until then the Services keep
    // changing, each change applied before the next.
    let (report, holder, swaps) = std::thread::scope(|scope| -> Result<_> {
        let reader = scope.spawn(move || {
            let mut churn = churn;
            let line = churn.read_line(Duration::from_secs(120));
            (line, churn)
        });
        let mut swaps = 0;
        while !reader.is_finished() {
            swaps += 1;
            cluster.update(&services(&cluster, SETS[swaps % SETS.len()]))?;
        }
        let (line, holder) = reader.join().expect("reader thread panicked");
        Ok((ChurnReport::parse(&line?)?, holder, swaps))
    })?;
    let churned = started.elapsed();
    eprintln!(
        "{} attempts in {:.1} s ({swaps} backend set swaps): {:?}; held {:?}",
        report.attempts, report.seconds, report.outcomes, report.held
    );
    ensure!(report.attempts == CONNECTIONS, "{report:?}");
    ensure!(swaps >= 10, "only {swaps} swaps during the churn");
    // A reset frees the client's port at once, so now and then a new
    // connection reuses a 4-tuple the server has not let go of yet: a few
    // failed connects are TCP's, not the balancer's.
    let per_kind = CONNECTIONS / ChurnKind::ALL.len() as u64;
    let most = per_kind - per_kind / 1000;
    for (kind, outcomes) in [
        (ChurnKind::Graceful, &["connected"][..]),
        (ChurnKind::Reset, &["connected"]),
        (ChurnKind::Abandoned, &["in-progress", "connected"]),
        (ChurnKind::Refused, &["ECONNREFUSED"]),
    ] {
        let expected: u64 = outcomes.iter().map(|o| report.count(kind, o)).sum();
        ensure!(expected >= most, "{kind:?} attempts: {report:?}");
    }
    ensure!(!report.held.is_empty(), "{report:?}");

    // Open connections are counted exactly, also on backends no set holds
    // any more; everything else is back at 0.
    let mut last = BTreeMap::new();
    let exact = grpclb_tests::wait_until(
        "the counts to equal the held connections",
        Duration::from_secs(10),
        || {
            last = per_pod(&cluster, &loads(&cluster)?);
            Ok((last == report.held).then_some(()))
        },
    );
    exact.with_context(|| format!("held {:?}, counted {last:?}", report.held))?;

    drop(holder);
    let mut last = BTreeMap::new();
    let zero = grpclb_tests::wait_until("every count back at 0", Duration::from_secs(10), || {
        let all = loads(&cluster)?;
        let done = all.values().all(|count| *count == 0);
        last = all;
        Ok(done.then_some(()))
    });
    zero.with_context(|| {
        let left: BTreeMap<_, _> = last.iter().filter(|(_, c)| **c > 0).collect();
        format!("counts left: {left:?}")
    })?;
    eprintln!(
        "{} load entries, all 0, {:.1} s after the churn started",
        last.len(),
        churned.as_secs_f64()
    );
    Ok(())
}

/// Pins from before the counting protocol hold 8-byte counts that the new
/// programs cannot use (nor uncount): the agent refuses them and says what
/// to do, instead of failing in the verifier.
#[test]
fn pins_of_the_older_load_layout_are_refused_with_a_fix() -> Result<()> {
    let cluster = TestCluster::new("oldpins", 0)?;
    let maps = cluster.bpffs.path().join("maps");
    std::fs::create_dir_all(&maps)?;
    let old = maps.join(grpclb_common::names::BACKEND_LOAD);
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args(["type", "hash", "key", "20", "value", "8", "entries", "16"])
        .args(["name", "BACKEND_LOAD", "flags", "1"])
        .output()
        .context("running bpftool")?;
    ensure!(created.status.success(), "{created:?}");
    cluster.write(&[])?;
    let run = std::process::Command::new(grpclb_tests::agent_bin())
        .arg("run")
        .arg("--cgroup")
        .arg(cluster.node.path())
        .arg("--bpffs")
        .arg(cluster.bpffs.path())
        .arg(format!("--source=file:{}", cluster.file.display()))
        .arg("--metrics-addr=127.0.0.1:0")
        .output()
        .context("running grpclb-agent")?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(!run.status.success(), "started on old pins: {stderr}");
    ensure!(
        stderr.contains("older grpclb") && stderr.contains("grpclb-agent uninstall"),
        "{stderr}"
    );
    Ok(())
}

/// The client pod opening `connections` to `to` (IPv4 and IPv6) on 4
/// threads, holding every 50th open, and connects to `refused` failing.
fn churn(
    cluster: &TestCluster,
    to: [SocketAddr; 2],
    refused: SocketAddr,
    connections: u64,
) -> Result<ChildGuard> {
    start_churn(
        &cluster.client,
        Some(&cluster.node),
        &ChurnOptions {
            to: to.to_vec(),
            refused,
            connections,
            threads: 4,
            hold_every: 50,
        },
    )
}

/// A whoami server in the node cgroup, as a pod of this node is.
const LOCAL_WHOAMI_PORT: u16 = 7063;
const ACCEPTED_CONNECTIONS: u64 = 100_000;

/// `LOCAL_LOAD`: the connections each local backend accepted, summed over
/// its addresses (IPv4 and IPv6), by pod name.
fn accepted(cluster: &TestCluster) -> Result<BTreeMap<String, u64>> {
    use grpclb_agent::dataplane::tables::LocalBackendTable;
    let tables = PinnedTables::open(cluster.bpffs.path())?;
    let mut pods = BTreeMap::new();
    for (backend, count) in tables.local_loads()? {
        let socket = backend_socket(&backend);
        let pod = cluster.backends.iter().find(|p| {
            socket.ip() == IpAddr::from(p.ipv4) || Some(socket.ip()) == p.ipv6.map(IpAddr::from)
        });
        let name = pod.map_or_else(|| socket.to_string(), |p| p.name.clone());
        *pods.entry(name).or_default() += count;
    }
    pods.retain(|_, count| *count > 0);
    Ok(pods)
}

/// Server side: the connections a local backend accepted are counted in
/// `LOCAL_LOAD` whether its Service tracks frames or not, exactly: equal to
/// the connections held open after tens of thousands were opened and
/// closed (gracefully, reset, abandoned mid-handshake, refused), and 0
/// once they close.
#[test]
fn accepted_connections_of_local_backends_are_counted_exactly() -> Result<()> {
    let mut cluster = TestCluster::new("accept", 1)?;
    let node_name = cluster.node.name().to_string();
    let b0 = cluster.backends[0].clone();
    let server =
        grpclb_tests::peers::start_server_on_node(&b0, &cluster.node, "whoami", LOCAL_WHOAMI_PORT)?;
    cluster.servers.push(server);
    let v4 = SocketAddr::from((v4_vip(120), LOCAL_WHOAMI_PORT));
    let v6 = SocketAddr::from((v6_vip(120), LOCAL_WHOAMI_PORT));
    let refusing = SocketAddr::from((v4_vip(121), LOCAL_WHOAMI_PORT));
    let b0_v6 = b0.ipv6.expect("dual-stack");
    cluster.start_agent(&[
        // Neither tracks frames: counting is not frame tracking.
        ServiceDef::grpc("local", v4.ip(), v4.port(), LOCAL_WHOAMI_PORT)
            .backend_on(b0.ipv4, &node_name),
        ServiceDef::grpc("local6", v6.ip(), v6.port(), LOCAL_WHOAMI_PORT)
            .backend_on(b0_v6, &node_name),
        ServiceDef::grpc("refusing", refusing.ip(), refusing.port(), CLOSED_PORT)
            .backend_on(b0.ipv4, &node_name),
    ])?;
    ensure!(
        accepted(&cluster)?.is_empty(),
        "counted before any connection"
    );

    let (held, holder) = grpclb_tests::peers::connect_and_hold(
        &cluster.client,
        Some(&cluster.node),
        v4,
        10,
        &grpclb_tests::peers::ConnectOptions::default(),
    )?;
    ensure!(held.failures().is_empty(), "{held:?}");
    let mut last = BTreeMap::new();
    grpclb_tests::wait_until(
        "10 accepted connections counted",
        Duration::from_secs(5),
        || {
            last = accepted(&cluster)?;
            Ok((last == counts(&[("b0", 10)])).then_some(()))
        },
    )
    .with_context(|| format!("counted {last:?}; agent log:\n{}", cluster.agent_log()))?;
    drop(holder);
    grpclb_tests::wait_until("the count back at 0", Duration::from_secs(5), || {
        last = accepted(&cluster)?;
        Ok(last.is_empty().then_some(()))
    })
    .with_context(|| format!("counted {last:?}"))?;

    let mut churn = churn(&cluster, [v4, v6], refusing, ACCEPTED_CONNECTIONS)?;
    let report = ChurnReport::parse(&churn.read_line(Duration::from_secs(120))?)?;
    eprintln!(
        "{} attempts in {:.1} s: {:?}; held {:?}",
        report.attempts, report.seconds, report.outcomes, report.held
    );
    ensure!(report.attempts == ACCEPTED_CONNECTIONS, "{report:?}");
    ensure!(
        report.count(ChurnKind::Refused, "ECONNREFUSED") > 0,
        "no failed connects: {report:?}"
    );
    ensure!(!report.held.is_empty(), "{report:?}");
    grpclb_tests::wait_until(
        "the accepted count to equal the held connections",
        Duration::from_secs(10),
        || {
            last = accepted(&cluster)?;
            Ok((last == report.held).then_some(()))
        },
    )
    .with_context(|| format!("held {:?}, counted {last:?}", report.held))?;
    drop(churn);
    grpclb_tests::wait_until(
        "every accepted count back at 0",
        Duration::from_secs(10),
        || {
            last = accepted(&cluster)?;
            Ok(last.is_empty().then_some(()))
        },
    )
    .with_context(|| format!("counts left: {last:?}"))?;
    Ok(())
}
