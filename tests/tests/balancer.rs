//! The connect-time balancer on a real kernel, driven through the agent:
//! issue 2's integration tests 1–8. Each test has its own node cgroup,
//! fabric, pods, pin dir and agent, so they run in parallel.

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_agent::dataplane::sync::apply;
use grpclb_agent::dataplane::tables::ServiceTables;
use grpclb_agent::observe::status::{AgentCondition, Report, ViewLoad, SCHEMA_VERSION};
use grpclb_agent::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
use grpclb_agent::state::topology::Rule;
use grpclb_common::Backend;
use grpclb_tests::peers::{
    connect, connect_and_hold, grpc_load, start_connect_loop, ConnectOptions,
};
use grpclb_tests::{Agent, ConnectReport, ServiceDef};

fn plain() -> ConnectOptions {
    ConnectOptions::default()
}

/// The whoami names the connections reached, in connect order.
fn pods_in_order(report: &ConnectReport) -> Vec<&str> {
    report
        .attempts
        .iter()
        .filter_map(|a| a.pod.as_deref())
        .collect()
}

fn assert_all_connected(report: &ConnectReport) {
    assert!(
        report.failures().is_empty(),
        "failed connects: {:?}",
        report.failures()
    );
}

/// Test 1: least-connections gives exactly 4/4/4 for 12 connections, and
/// unary RPCs through the VIP reach real tonic servers.
#[test]
fn twelve_grpc_channels_split_four_four_four_and_rpcs_succeed() -> Result<()> {
    let mut cluster = TestCluster::new("spread", 3)?;
    let vip = SocketAddr::from((v4_vip(10), 80));
    let service =
        ServiceDef::grpc("echo", vip.ip(), vip.port(), GRPC_PORT).backends(cluster.v4s(&[0, 1, 2]));
    cluster.start_agent(&[service])?;

    let load = grpc_load(&cluster.client, Some(&cluster.node), vip, 12, 5)?;
    assert_eq!(load.failures, 0, "{load:?}");
    assert_eq!(load.ok, 60, "{load:?}");
    assert_eq!(load.mixed_channels, 0, "{load:?}");
    assert_eq!(
        load.channels_per_pod,
        counts(&[("b0", 4), ("b1", 4), ("b2", 4)]),
        "{load:?}"
    );
    assert_eq!(
        load.per_pod,
        counts(&[("b0", 20), ("b1", 20), ("b2", 20)]),
        "{load:?}"
    );
    Ok(())
}

/// Test 2: getpeername on a rewritten socket reports the VIP, not the pod.
#[test]
fn getpeername_reports_the_vip_for_v4_and_v6() -> Result<()> {
    let mut cluster = TestCluster::new("peer", 3)?;
    let vip4 = SocketAddr::from((v4_vip(20), WHOAMI_PORT));
    let vip6 = SocketAddr::from((v6_vip(0x20), WHOAMI_PORT));
    let services = [
        ServiceDef::grpc("peer4", vip4.ip(), vip4.port(), WHOAMI_PORT)
            .backends(cluster.v4s(&[0, 1, 2])),
        ServiceDef::grpc("peer6", vip6.ip(), vip6.port(), WHOAMI_PORT)
            .backends(cluster.v6s(&[0, 1, 2])),
    ];
    cluster.start_agent(&services)?;

    for vip in [vip4, vip6] {
        let report = connect(&cluster.client, Some(&cluster.node), vip, 3, &plain())?;
        assert_all_connected(&report);
        assert_eq!(
            report.per_pod(),
            counts(&[("b0", 1), ("b1", 1), ("b2", 1)]),
            "{vip}: {report:?}"
        );
        for attempt in &report.attempts {
            assert_eq!(attempt.peer, Some(vip), "{vip}: {report:?}");
        }
    }
    Ok(())
}

/// Test 3: an IPv6 VIP is balanced, and an AF_INET6 socket connecting to
/// `::ffff:VIP` (gRPC C-core, Java) reaches the IPv4 backends.
#[test]
fn ipv6_vip_and_ipv4_mapped_connects_are_balanced() -> Result<()> {
    let mut cluster = TestCluster::new("v6", 3)?;
    let vip4 = SocketAddr::from((v4_vip(30), WHOAMI_PORT));
    let vip6 = SocketAddr::from((v6_vip(0x30), WHOAMI_PORT));
    let services = [
        ServiceDef::grpc("mapped", vip4.ip(), vip4.port(), WHOAMI_PORT)
            .backends(cluster.v4s(&[0, 1, 2])),
        ServiceDef::grpc("six", vip6.ip(), vip6.port(), WHOAMI_PORT)
            .backends(cluster.v6s(&[0, 1, 2])),
    ];
    cluster.start_agent(&services)?;

    let report = connect(&cluster.client, Some(&cluster.node), vip6, 6, &plain())?;
    assert_all_connected(&report);
    assert_eq!(
        report.per_pod(),
        counts(&[("b0", 2), ("b1", 2), ("b2", 2)]),
        "{report:?}"
    );

    let mapped = ConnectOptions {
        v6_mapped: true,
        ..plain()
    };
    let report = connect(&cluster.client, Some(&cluster.node), vip4, 6, &mapped)?;
    assert_all_connected(&report);
    assert_eq!(
        report.per_pod(),
        counts(&[("b0", 2), ("b1", 2), ("b2", 2)]),
        "{report:?}"
    );
    let mapped_vip = SocketAddr::new(IpAddr::V6(v4_vip(30).to_ipv6_mapped()), WHOAMI_PORT);
    for attempt in &report.attempts {
        assert_eq!(attempt.peer, Some(mapped_vip), "{report:?}");
    }
    Ok(())
}

/// Test 4: a frontend without eligible backends refuses at once, like
/// kube-proxy's REJECT; everything else is left alone.
#[test]
fn frontend_without_backends_refuses_and_other_destinations_are_untouched() -> Result<()> {
    let mut cluster = TestCluster::new("refuse", 1)?;
    let empty = SocketAddr::from((v4_vip(40), WHOAMI_PORT));
    let not_ready = SocketAddr::from((v6_vip(0x41), WHOAMI_PORT));
    let unbalanced = SocketAddr::from((v4_vip(42), WHOAMI_PORT));
    let b0 = cluster.backends[0].clone();
    let services = [
        ServiceDef::grpc("empty", empty.ip(), empty.port(), WHOAMI_PORT),
        ServiceDef::grpc("not-ready", not_ready.ip(), not_ready.port(), WHOAMI_PORT)
            .not_ready_backend(b0.ipv6.expect("dual-stack")),
        ServiceDef::grpc("plain-tcp", unbalanced.ip(), unbalanced.port(), WHOAMI_PORT)
            .without_app_protocol()
            .backend(b0.ipv4),
    ];
    cluster.start_agent(&services)?;
    assert_eq!(
        cluster.active_backends(unbalanced)?,
        None,
        "a port without appProtocol grpc is not balanced"
    );

    for vip in [empty, not_ready] {
        let report = connect(
            &cluster.client,
            Some(&cluster.node),
            vip,
            20,
            &ConnectOptions {
                close_each: true,
                ..plain()
            },
        )?;
        for attempt in &report.attempts {
            assert_eq!(
                attempt.error.as_deref(),
                Some("ECONNREFUSED"),
                "{vip}: {report:?}"
            );
            assert!(
                attempt.elapsed_us < 10_000,
                "{vip}: refused after {} µs",
                attempt.elapsed_us
            );
        }
    }

    // Not rewritten: no route to the VIP range inside the fabric.
    let other_port = SocketAddr::new(empty.ip(), WHOAMI_PORT + 1);
    for vip in [unbalanced, other_port] {
        let report = connect(&cluster.client, Some(&cluster.node), vip, 1, &plain())?;
        assert_eq!(
            report.attempts[0].error.as_deref(),
            Some("ENETUNREACH"),
            "{vip}: {report:?}"
        );
    }
    let direct = SocketAddr::from((b0.ipv4, WHOAMI_PORT));
    let report = connect(&cluster.client, Some(&cluster.node), direct, 2, &plain())?;
    assert_all_connected(&report);
    assert_eq!(report.per_pod(), counts(&[("b0", 2)]), "{report:?}");
    assert!(
        report.attempts.iter().all(|a| a.peer == Some(direct)),
        "{report:?}"
    );
    Ok(())
}

/// Test 5: a removed backend gets no new connections; an added one gets
/// every new connection until the live counts are even.
#[test]
fn removed_backend_gets_nothing_and_added_backend_catches_up() -> Result<()> {
    let mut cluster = TestCluster::new("churn", 4)?;
    let vip = SocketAddr::from((v4_vip(50), WHOAMI_PORT));
    let pod_ips = cluster.v4s(&[0, 1, 2, 3]);
    let def = |backends: &[usize]| {
        ServiceDef::grpc("churn", vip.ip(), vip.port(), WHOAMI_PORT)
            .backends(backends.iter().map(|&i| pod_ips[i]))
    };
    cluster.start_agent(&[def(&[0, 1, 2])])?;
    let node = Some(&cluster.node);

    let (first, _first_held) = connect_and_hold(&cluster.client, node, vip, 6, &plain())?;
    assert_all_connected(&first);
    assert_eq!(
        first.per_pod(),
        counts(&[("b0", 2), ("b1", 2), ("b2", 2)]),
        "{first:?}"
    );

    cluster.update(&[def(&[0, 1])])?;
    let (second, _second_held) = connect_and_hold(&cluster.client, node, vip, 4, &plain())?;
    assert_all_connected(&second);
    assert_eq!(
        second.per_pod(),
        counts(&[("b0", 2), ("b1", 2)]),
        "b2 was removed: {second:?}"
    );

    // b0 and b1 now hold 4 each, the new b3 none.
    cluster.update(&[def(&[0, 1, 3])])?;
    let (third, _third_held) = connect_and_hold(&cluster.client, node, vip, 7, &plain())?;
    assert_all_connected(&third);
    let order = pods_in_order(&third);
    assert_eq!(order[..4], ["b3"; 4], "the new backend first: {third:?}");
    let evened: BTreeSet<&str> = order[4..].iter().copied().collect();
    assert_eq!(
        evened,
        BTreeSet::from(["b0", "b1", "b3"]),
        "then one each: {third:?}"
    );
    Ok(())
}

fn desired(vip: SocketAddr, backends: &[IpAddr], port: u16) -> DesiredState {
    let endpoints = backends
        .iter()
        .map(|&ip| Endpoint {
            backend: backend(SocketAddr::new(ip, port)),
            node_name: None,
            condition: EndpointCondition::Ready,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let service = DesiredService {
        name: "default/swap:grpc".into(),
        endpoints,
        track_frames: false,
        rule: Rule::Ready,
    };
    DesiredState {
        services: BTreeMap::from([(service_key(vip), service.into())]),
        ..DesiredState::default()
    }
}

/// Test 6: connects racing 1000 replacements of the backend set between two
/// disjoint sets (of different sizes) always find a backend.
#[test]
fn connects_racing_a_thousand_set_swaps_never_fail() -> Result<()> {
    const SWAPS: usize = 1000;
    let mut cluster = TestCluster::new("swap", 4)?;
    let vip = SocketAddr::from((v4_vip(60), WHOAMI_PORT));
    let set_a = cluster.v4s(&[0, 1, 2]);
    let set_b = cluster.v4s(&[3]);
    cluster.start_agent(&[
        ServiceDef::grpc("swap", vip.ip(), vip.port(), WHOAMI_PORT).backends(set_a.clone())
    ])?;
    let states = [
        desired(vip, &set_a, WHOAMI_PORT),
        desired(vip, &set_b, WHOAMI_PORT),
    ];
    // The test is the only writer: the agent would re-apply the file every
    // resync interval, racing the swaps. Its pinned programs stay attached.
    cluster.agent.take().expect("started").kill9()?;
    let mut tables = PinnedTables::open(cluster.bpffs.path()).context("opening the pinned maps")?;

    let stop = cluster.file.with_extension("stop");
    let close_each = ConnectOptions {
        close_each: true,
        ..plain()
    };
    let mut client = start_connect_loop(
        &cluster.client,
        Some(&cluster.node),
        vip,
        &stop,
        &close_each,
    )?;
    // Let the client get going so the swaps overlap its connects.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    for swap in 1..=SWAPS {
        apply(&mut tables, &states[swap % 2]).with_context(|| format!("swap {swap}"))?;
        // Spread the swaps over more connects than a tight loop would.
        std::thread::sleep(Duration::from_micros(300));
    }
    let swapping = started.elapsed();
    std::fs::write(&stop, "")?;
    let report = ConnectReport::parse(&client.read_line(Duration::from_secs(30))?)?;
    eprintln!(
        "{SWAPS} swaps in {swapping:?}; {} connects",
        report.attempts.len()
    );

    assert_all_connected(&report);
    let seen: BTreeSet<String> = report.per_pod().into_keys().collect();
    assert!(
        seen.contains("b3") && seen.len() > 1,
        "connects saw only one set: {:?}",
        report.per_pod()
    );
    assert!(seen
        .iter()
        .all(|p| ["b0", "b1", "b2", "b3"].contains(&p.as_str())));
    // The last swap applied set A: exactly it is active, no stale slot entry.
    let active = cluster.active_backends(vip)?.context("frontend gone")?;
    let want: BTreeSet<SocketAddr> = set_a
        .iter()
        .map(|&ip| SocketAddr::new(ip, WHOAMI_PORT))
        .collect();
    assert_eq!(active, want);
    Ok(())
}

/// A second whoami port, for traffic that must not share load counters.
const BACKGROUND_PORT: u16 = 7001;

fn programs_per_attach_type(cluster: &TestCluster) -> Result<BTreeMap<String, usize>> {
    let mut per_type = BTreeMap::new();
    for (attach_type, _id) in attached_programs(&cluster.node)? {
        *per_type.entry(attach_type).or_insert(0) += 1;
    }
    Ok(per_type)
}

/// Test 7: after `kill -9` the pinned programs keep balancing; a restarted
/// agent adopts the pins instead of attaching a second time.
#[test]
fn agent_kill9_keeps_balancing_and_restart_adopts_the_pins() -> Result<()> {
    let mut cluster = TestCluster::new("restart", 3)?;
    // Background connects go to other backend ports, so their short-lived
    // connections do not disturb the exact counts on `vip`.
    cluster.start_whoami_everywhere(BACKGROUND_PORT)?;
    let vip = SocketAddr::from((v4_vip(70), WHOAMI_PORT));
    let background_vip = SocketAddr::from((v4_vip(71), BACKGROUND_PORT));
    let pod_ips = cluster.v4s(&[0, 1, 2]);
    let services = |backends: &[usize]| {
        [
            ServiceDef::grpc("restart", vip.ip(), vip.port(), WHOAMI_PORT)
                .backends(backends.iter().map(|&i| pod_ips[i])),
            ServiceDef::grpc(
                "background",
                background_vip.ip(),
                BACKGROUND_PORT,
                BACKGROUND_PORT,
            )
            .backends(pod_ips.clone()),
        ]
    };
    cluster.start_agent(&services(&[0, 1, 2]))?;
    let node = Some(&cluster.node);
    let attached = programs_per_attach_type(&cluster)?;
    for hook in ["cgroup_inet4_connect", "cgroup_inet6_connect"] {
        assert!(
            attached.contains_key(hook),
            "{hook} not attached: {attached:?}"
        );
    }
    assert!(attached.values().all(|&n| n == 1), "{attached:?}");

    let stop = cluster.file.with_extension("stop");
    let close_each = ConnectOptions {
        close_each: true,
        interval_ms: 2,
        ..plain()
    };
    let mut background =
        start_connect_loop(&cluster.client, node, background_vip, &stop, &close_each)?;
    let (before, before_held) = connect_and_hold(&cluster.client, node, vip, 3, &plain())?;
    assert_eq!(
        before.per_pod(),
        counts(&[("b0", 1), ("b1", 1), ("b2", 1)]),
        "{before:?}"
    );

    cluster.agent.take().expect("started").kill9()?;
    let (down, down_held) = connect_and_hold(&cluster.client, node, vip, 6, &plain())?;
    assert_all_connected(&down);
    assert_eq!(
        down.per_pod(),
        counts(&[("b0", 2), ("b1", 2), ("b2", 2)]),
        "agent down: {down:?}"
    );
    assert_eq!(programs_per_attach_type(&cluster)?, attached, "agent down");

    cluster.agent = Some(Agent::start(
        &cluster.node,
        cluster.bpffs.path(),
        &cluster.file,
    )?);
    cluster.update(&services(&[0, 1, 2]))?;
    assert_eq!(
        programs_per_attach_type(&cluster)?,
        attached,
        "after restart"
    );
    let (after, after_held) = connect_and_hold(&cluster.client, node, vip, 3, &plain())?;
    assert_eq!(
        after.per_pod(),
        counts(&[("b0", 1), ("b1", 1), ("b2", 1)]),
        "{after:?}"
    );

    // The adopted maps are the restarted agent's to change.
    cluster.update(&services(&[0, 1]))?;
    std::fs::write(&stop, "")?;
    let report = ConnectReport::parse(&background.read_line(Duration::from_secs(30))?)?;
    assert_all_connected(&report);
    eprintln!(
        "{} background connects while the agent was killed and restarted",
        report.attempts.len()
    );

    // Connections the killed agent's programs counted are uncounted by the
    // restarted agent's: the socket storage they were counted in is pinned.
    assert_eq!(
        cluster.load_of(vip, SocketAddr::new(pod_ips[0], WHOAMI_PORT))?,
        Some(4)
    );
    drop((before_held, down_held, after_held));
    let loads = || -> Result<BTreeMap<Backend, u64>> {
        Ok(PinnedTables::open(cluster.bpffs.path())?
            .loads()?
            .into_iter()
            .collect())
    };
    grpclb_tests::wait_until("every count back at 0", Duration::from_secs(5), || {
        Ok(loads()?.values().all(|c| *c == 0).then_some(()))
    })
    .with_context(|| format!("{:?}", loads()))?;
    Ok(())
}

/// Test 8: a bad Service file is reported with enough context to fix it and
/// changes nothing in the maps.
#[test]
fn invalid_service_files_are_reported_and_change_nothing() -> Result<()> {
    let mut cluster = TestCluster::new("invalid", 2)?;
    let vip = SocketAddr::from((v4_vip(80), WHOAMI_PORT));
    let good =
        ServiceDef::grpc("keep", vip.ip(), vip.port(), WHOAMI_PORT).backends(cluster.v4s(&[0, 1]));
    cluster.start_agent(std::slice::from_ref(&good))?;
    let maps_before = cluster.maps()?;
    let status_before = cluster.agent().status()?;
    let path = cluster.file.display().to_string();
    // `path:line:column:` of the unclosed bracket.
    let at_the_bracket = format!("{path}:4:");

    let wrong_family =
        grpclb_tests::service_yaml(&[good.clone().backend("fd00:244::99".parse::<IpAddr>()?)])
            .replace("addressType: IPv6", "addressType: IPv4");
    let mut items: Vec<serde_json::Value> = vec![serde_json::to_value(good.service())?];
    for slice in good.slices() {
        items.push(serde_json::to_value(slice)?);
    }
    items.push(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "stray", "namespace": "default" },
        "data": { "key": "value" },
    }));
    let unknown_kind = grpclb_tests::cluster::list_yaml(items);
    let cases = [
        (
            "invalid YAML",
            "apiVersion: v1\nkind: List\nitems:\n- {kind: Service, apiVersion: v1\n".to_string(),
            vec![at_the_bracket.as_str(), "unclosed"],
        ),
        (
            "unknown kind",
            unknown_kind,
            vec![path.as_str(), "ConfigMap"],
        ),
        (
            "wrong address family",
            wrong_family,
            vec![path.as_str(), "fd00:244::99"],
        ),
    ];
    for (case, yaml, expected_in_log) in cases {
        let logged_before = cluster.agent_log().len();
        grpclb_tests::write_atomically(&cluster.file, &yaml)?;
        let error = grpclb_tests::wait_until(
            &format!("the agent to report the {case}"),
            APPLY_TIMEOUT,
            || {
                let log = cluster.agent_log();
                let new = &log[logged_before.min(log.len())..];
                Ok(expected_in_log
                    .iter()
                    .all(|s| new.contains(s))
                    .then(|| new.to_string()))
            },
        )
        .with_context(|| {
            format!(
                "expected {expected_in_log:?} in the log:\n{}",
                cluster.agent_log()
            )
        })?;
        eprintln!("{case}: the agent logged:\n{error}");
        assert_eq!(cluster.maps()?, maps_before, "{case} changed the maps");
        assert_eq!(
            cluster.agent().status()?,
            status_before,
            "{case} changed status"
        );
    }

    // Still watching: a valid change is applied.
    cluster.update(&[
        ServiceDef::grpc("keep", vip.ip(), vip.port(), WHOAMI_PORT).backends(cluster.v4s(&[1]))
    ])?;
    Ok(())
}

/// `--bpf-log` forwards the programs' events: each rewrite is logged with
/// the backend it chose.
#[test]
fn bpf_log_reports_each_rewrite() -> Result<()> {
    let mut cluster = TestCluster::new("bpflog", 1)?;
    let vip = SocketAddr::from((v4_vip(80), WHOAMI_PORT));
    let b0 = cluster.v4s(&[0])[0];
    let service = ServiceDef::grpc("logged", vip.ip(), vip.port(), WHOAMI_PORT).backend(b0);
    cluster.start_agent_with(&[service], &["--bpf-log"])?;
    let report = connect(&cluster.client, Some(&cluster.node), vip, 1, &plain())?;
    assert_all_connected(&report);
    let want = format!("rewritten to [::ffff:{b0}]:{WHOAMI_PORT}");
    grpclb_tests::wait_until(
        "the rewrite in the agent log",
        Duration::from_secs(5),
        || Ok(cluster.agent().log().contains(&want).then_some(())),
    )
    .with_context(|| cluster.agent().log())?;
    Ok(())
}

/// Live counts follow the connections: +1 each when placed, back to 0 when
/// they close; connects the backend refuses leave no count behind.
#[test]
fn counts_follow_connections_and_refused_connects_leave_nothing() -> Result<()> {
    /// Nothing listens there: the backend answers with a RST.
    const CLOSED_PORT: u16 = 7999;
    let mut cluster = TestCluster::new("counts", 1)?;
    let vip = SocketAddr::from((v4_vip(90), WHOAMI_PORT));
    let refusing_vip = SocketAddr::from((v4_vip(91), WHOAMI_PORT));
    let b0 = cluster.v4s(&[0])[0];
    let (open, closed) = (
        SocketAddr::new(b0, WHOAMI_PORT),
        SocketAddr::new(b0, CLOSED_PORT),
    );
    cluster.start_agent(&[
        ServiceDef::grpc("open", vip.ip(), vip.port(), WHOAMI_PORT).backend(b0),
        ServiceDef::grpc(
            "closed",
            refusing_vip.ip(),
            refusing_vip.port(),
            CLOSED_PORT,
        )
        .backend(b0),
    ])?;
    let node = Some(&cluster.node);
    let settled = |what: &str, want: u64, to: SocketAddr, from: SocketAddr| {
        grpclb_tests::wait_until(what, Duration::from_secs(5), || {
            Ok((cluster.load_of(from, to)? == Some(want)).then_some(()))
        })
    };

    let (held, holder) = connect_and_hold(&cluster.client, node, vip, 4, &plain())?;
    assert_all_connected(&held);
    settled("4 live connections", 4, open, vip)?;
    drop(holder);
    settled("the count back at 0", 0, open, vip)?;

    let refused = connect(
        &cluster.client,
        node,
        refusing_vip,
        10,
        &ConnectOptions {
            close_each: true,
            ..plain()
        },
    )?;
    assert!(
        refused
            .attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("ECONNREFUSED")),
        "{refused:?}"
    );
    assert_eq!(cluster.load_of(refusing_vip, closed)?, Some(0));
    Ok(())
}

/// Issue 12: a fresh `BACKEND_VIEW` entry (the Service-wide load the
/// exchange learned, written here directly) steers new connections: the
/// hook compares `load + what this node opened since`, so a pod loaded from
/// other nodes gets nothing until the others catch up; an expired view is
/// ignored and the node's own counts decide again.
#[test]
fn a_fresh_backend_view_steers_connects_and_an_expired_one_is_ignored() -> Result<()> {
    use grpclb_agent::dataplane::view::monotonic_ns;
    use grpclb_common::BackendView;
    let mut cluster = TestCluster::new("view", 2)?;
    let vip = SocketAddr::from((v4_vip(95), WHOAMI_PORT));
    cluster.start_agent(&[
        ServiceDef::grpc("viewed", vip.ip(), vip.port(), WHOAMI_PORT)
            .backends(cluster.v4s(&[0, 1])),
    ])?;
    // The owner answers /status only once it runs, after it made
    // BACKEND_VIEW follow the (empty) placement: our entries stay.
    let metrics = cluster.agent.as_mut().expect("started").metrics_addr()?;
    // It starts just after the agent turns ready: wait for it.
    grpclb_tests::wait_until("the agent to answer /status", APPLY_TIMEOUT, || {
        Ok((http_get(metrics, "/status")?.0 == 200).then_some(()))
    })?;
    let pods: Vec<Backend> = cluster
        .v4s(&[0, 1])
        .into_iter()
        .map(|ip| backend(SocketAddr::new(ip, WHOAMI_PORT)))
        .collect();
    let write_views = |views: [Option<BackendView>; 2]| -> Result<()> {
        let mut tables = PinnedTables::open(cluster.bpffs.path())?;
        for (pod, view) in pods.iter().zip(views) {
            match view {
                Some(view) => tables.set_view(pod, &view)?,
                None => tables.remove_view(pod)?,
            }
        }
        Ok(())
    };
    let fresh = |load| {
        Some(BackendView {
            load,
            baseline: 0,
            expires_ns: monotonic_ns() + 60_000_000_000,
        })
    };
    let node = Some(&cluster.node);

    // b0 holds 100 connections from other nodes, b1 none: all 10 go to b1.
    write_views([fresh(100), fresh(0)])?;
    // As a script reads it: the agent's JSON, in the schema's structs.
    let addr = format!("--metrics-addr={metrics}");
    let run = grpclb_tests::status_run(
        cluster.bpffs.path(),
        &[&addr, "--service", "default/viewed", "--output", "json"],
    )?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let report: Report = serde_json::from_str(&run.stdout)
        .with_context(|| format!("status --output json printed:\n{}", run.stdout))?;
    assert_eq!(report.schema_version, SCHEMA_VERSION);
    assert_eq!(report.agent.state, AgentCondition::Ready);
    let summary = &report.services[..];
    assert_eq!(summary.len(), 1, "{report:?}");
    assert_eq!(
        (summary[0].service.as_str(), summary[0].ready),
        ("default/viewed", 2)
    );
    assert_eq!(summary[0].backends, Some(2), "{report:?}");
    assert_eq!(
        summary[0].view_load.as_ref().map(|v| (v.max, v.mean)),
        Some((100, 50.0)),
        "{report:?}"
    );
    let b0 = SocketAddr::new(cluster.v4s(&[0])[0], WHOAMI_PORT).to_string();
    let frontends = report.frontends.as_deref().unwrap_or_default();
    let b0_view = frontends
        .iter()
        .flat_map(|f| &f.backends)
        .find(|b| b.backend == b0)
        .map(|b| b.view);
    assert_eq!(b0_view, Some(ViewLoad::Fresh { load: 100 }), "{report:?}");
    let (held, holder) = connect_and_hold(&cluster.client, node, vip, 10, &plain())?;
    assert_all_connected(&held);
    assert_eq!(held.per_pod(), counts(&[("b1", 10)]), "{held:?}");
    drop(holder);
    let settled = |to: usize| {
        grpclb_tests::wait_until("the counts back at 0", Duration::from_secs(5), || {
            let load = cluster.load_of(vip, SocketAddr::new(cluster.v4s(&[to])[0], WHOAMI_PORT))?;
            Ok((load == Some(0)).then_some(()))
        })
    };
    settled(0)?;
    settled(1)?;

    // b0 at 3: b1 gets the first 3, then they alternate, what this node
    // opens adding to each pod's view: 10 end up 3 + 3 or 4 against 6 or 7.
    write_views([fresh(3), fresh(0)])?;
    let (held, holder) = connect_and_hold(&cluster.client, node, vip, 10, &plain())?;
    assert_all_connected(&held);
    let per_pod = held.per_pod();
    assert!(
        [
            counts(&[("b0", 3), ("b1", 7)]),
            counts(&[("b0", 4), ("b1", 6)])
        ]
        .contains(&per_pod),
        "{per_pod:?}"
    );
    assert_eq!(&pods_in_order(&held)[..3], ["b1", "b1", "b1"], "{held:?}");
    drop(holder);
    settled(0)?;
    settled(1)?;

    // b0's view expired: ignored, the node's own counts (0 and 0) split 5/5.
    write_views([
        Some(BackendView {
            load: 100,
            baseline: 0,
            expires_ns: monotonic_ns(),
        }),
        None,
    ])?;
    let (held, _holder) = connect_and_hold(&cluster.client, node, vip, 10, &plain())?;
    assert_all_connected(&held);
    assert_eq!(held.per_pod(), counts(&[("b0", 5), ("b1", 5)]), "{held:?}");
    Ok(())
}
