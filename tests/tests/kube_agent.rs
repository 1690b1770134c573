//! End to end: the real `grpclb-agent run --source kube` against the test API
//! server, balancing connects of a client pod in the node cgroup. Needs root
//! (cgroup, netns, eBPF).

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::apiserver::ApiServer;
use grpclb_tests::peers::{connect, ConnectOptions};
use grpclb_tests::{wait_until, Agent};
use serde_json::{json, Value};

use common::{http_get, TestCluster, WHOAMI_PORT};

/// Watch, debounce and sync, with room for a slow machine.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// `grpclb-agent run --source kube` for one node, on the test API server.
fn start_kube_agent(cluster: &TestCluster, kubeconfig: &Path) -> Result<Agent> {
    let source = [
        OsString::from("--source=kube"),
        OsString::from("--kubeconfig"),
        kubeconfig.into(),
    ];
    Agent::start_with_source(&cluster.node, cluster.bpffs.path(), &source)
}

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "whoami", "namespace": "apps", "uid": "uid-whoami"},
        "spec": {
            "clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50", "fd00:96::50"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "whoami", "port": 80, "protocol": "TCP",
                       "appProtocol": "grpc", "targetPort": "whoami"}],
            "selector": {"app": "whoami"}
        }
    })
}

/// One slice per family; `endpoints` are (backend index, ready, serving, terminating).
fn slices(cluster: &TestCluster, endpoints: &[(usize, bool, bool, bool)]) -> Vec<Value> {
    [("IPv4", "whoami-v4"), ("IPv6", "whoami-v6")]
        .iter()
        .map(|(family, name)| {
            let eps: Vec<Value> = endpoints
                .iter()
                .map(|&(i, ready, serving, terminating)| {
                    let pod = &cluster.backends[i];
                    let ip: IpAddr = if *family == "IPv4" {
                        pod.ipv4.into()
                    } else {
                        pod.ipv6.expect("dual-stack backends").into()
                    };
                    json!({
                        "addresses": [ip.to_string()],
                        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                        "nodeName": "node-a",
                        "targetRef": {"kind": "Pod", "namespace": "apps", "name": pod.name}
                    })
                })
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "apps",
                             "labels": {"kubernetes.io/service-name": "whoami"}},
                "addressType": family,
                "ports": [{"name": "whoami", "port": WHOAMI_PORT, "protocol": "TCP"}],
                "endpoints": eps
            })
        })
        .collect()
}

fn wait_for_backends(
    cluster: &TestCluster,
    agent: &Agent,
    vip: SocketAddr,
    want: &[IpAddr],
) -> Result<()> {
    let want: BTreeSet<SocketAddr> = want
        .iter()
        .map(|ip| SocketAddr::new(*ip, WHOAMI_PORT))
        .collect();
    let mut last = None;
    wait_until(&format!("{vip} → {want:?}"), APPLY_TIMEOUT, || {
        let active = cluster.active_backends(vip)?;
        let done = active.as_ref() == Some(&want);
        last = active;
        Ok(done.then_some(()))
    })
    .with_context(|| format!("maps hold {last:?}; agent log:\n{}", agent.log()))
}

/// Connections per backend pod name from the client pod, in the node cgroup.
fn spread(cluster: &TestCluster, to: SocketAddr, count: u64) -> Result<BTreeMap<String, u64>> {
    let report = connect(
        &cluster.client,
        Some(&cluster.node),
        to,
        count,
        &ConnectOptions::default(),
    )?;
    if !report.failures().is_empty() {
        bail!("connects to {to} failed: {:?}", report.failures());
    }
    Ok(report.per_pod())
}

fn names(cluster: &TestCluster, indices: &[usize]) -> BTreeSet<String> {
    indices
        .iter()
        .map(|&i| cluster.backends[i].name.clone())
        .collect()
}

#[test]
fn the_kube_source_balances_connects_onto_the_ready_endpoints() -> Result<()> {
    let cluster = TestCluster::new("kube", 3)?;
    let server = ApiServer::start_new()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    server.apply(service())?;
    server.apply_all(slices(
        &cluster,
        &[
            (0, true, true, false),
            (1, true, true, false),
            (2, false, false, false),
        ],
    ))?;
    let mut agent = start_kube_agent(&cluster, &kubeconfig)?;
    let metrics = agent.metrics_addr()?;

    // Ready: the initial lists are in the maps.
    let v4: SocketAddr = "10.96.0.50:80".parse()?;
    let v6: SocketAddr = "[fd00:96::50]:80".parse()?;
    for vip in [v4, v6] {
        let per_pod = spread(&cluster, vip, 10)?;
        assert_eq!(
            per_pod.keys().cloned().collect::<BTreeSet<_>>(),
            names(&cluster, &[0, 1]),
            "{vip}: {per_pod:?}"
        );
        assert_eq!(per_pod.values().sum::<u64>(), 10);
    }

    let (code, body) = http_get(metrics, "/readyz")?;
    assert_eq!(code, 200, "readiness after the first sync: {body}");
    let (code, body) = http_get(metrics, "/metrics")?;
    assert_eq!(code, 200);
    for line in [
        "grpclb_frontends 2",
        "grpclb_backends 4",
        "grpclb_kube_lists_total{resource=\"services\"} 1",
        "grpclb_kube_lists_total{resource=\"endpointslices\"} 1",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }

    // b0 is shutting down (still serving its connections), b2 became ready.
    server.apply_all(slices(
        &cluster,
        &[
            (0, false, true, true),
            (1, true, true, false),
            (2, true, true, false),
        ],
    ))?;
    wait_for_backends(&cluster, &agent, v4, &cluster.v4s(&[1, 2]))?;
    wait_for_backends(&cluster, &agent, v6, &cluster.v6s(&[1, 2]))?;
    let per_pod = spread(&cluster, v4, 10)?;
    assert_eq!(
        per_pod.keys().cloned().collect::<BTreeSet<_>>(),
        names(&cluster, &[1, 2]),
        "{per_pod:?}"
    );

    // The API server goes away: the maps keep balancing as they were.
    server.stop();
    std::thread::sleep(Duration::from_secs(1));
    let per_pod = spread(&cluster, v4, 4)?;
    assert_eq!(
        per_pod.keys().cloned().collect::<BTreeSet<_>>(),
        names(&cluster, &[1, 2]),
        "{per_pod:?}"
    );
    assert!(
        agent.log().contains("retrying with backoff"),
        "{}",
        agent.log()
    );
    drop(agent);
    Ok(())
}

#[test]
fn a_thousand_services_reach_the_kernel_maps() -> Result<()> {
    const SERVICES: u32 = 1000;
    const ENDPOINTS: u32 = 10;
    let cluster = TestCluster::new("kube1k", 0)?;
    let server = ApiServer::start_new()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    let mut agent = start_kube_agent(&cluster, &kubeconfig)?;
    let metrics = agent.metrics_addr()?;

    let mut objects = Vec::new();
    for s in 0..SERVICES {
        let name = format!("svc-{s}");
        objects.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "load"},
            "spec": {"clusterIP": format!("10.97.{}.{}", s / 250, s % 250 + 1),
                     "ports": [{"name": "grpc", "port": 50051, "appProtocol": "grpc", "targetPort": 8080}]}
        }));
        let endpoints: Vec<Value> = (0..ENDPOINTS)
            .map(|e| {
                json!({"addresses": [format!("10.{}.{}.{}", 100 + s / 250, s % 250, e + 1)],
                            "conditions": {"ready": true}})
            })
            .collect();
        objects.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-a"), "namespace": "load",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8080}],
            "endpoints": endpoints
        }));
    }
    let start = Instant::now();
    server.apply_all(objects)?;
    wait_until(
        "1,000 services in the maps",
        Duration::from_secs(60),
        || {
            let status = cluster.maps()?;
            let complete = status.frontends.len() == SERVICES as usize
                && status
                    .frontends
                    .iter()
                    .all(|f| f.backends.len() == ENDPOINTS as usize);
            Ok(complete.then_some(()))
        },
    )
    .with_context(|| agent.log())?;
    println!(
        "{SERVICES} services x {ENDPOINTS} endpoints: from the API server to the kernel maps in {:?}",
        start.elapsed()
    );
    let (_, body) = http_get(metrics, "/metrics")?;
    assert!(body.lines().any(|l| l == "grpclb_backends 10000"), "{body}");
    drop(agent);
    Ok(())
}

/// With the kube source the agent reads its own Node for its zone and
/// follows the zone hints (PreferSameZone), and a ClientIP-affinity Service
/// is left to kube-proxy; `status` shows both.
#[test]
fn the_kube_source_reads_the_nodes_zone_and_leaves_client_ip_affinity_alone() -> Result<()> {
    let cluster = TestCluster::new("kzone", 2)?;
    let server = ApiServer::start_new()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": cluster.node.name(), "labels": {"topology.kubernetes.io/zone": "z1"}}
    }))?;
    let mut zoned = service();
    zoned["spec"]["trafficDistribution"] = json!("PreferSameZone");
    server.apply(zoned)?;
    let mut hinted = slices(&cluster, &[(0, true, true, false), (1, true, true, false)]);
    for slice in &mut hinted {
        for (endpoint, zone) in slice["endpoints"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(["z1", "z2"])
        {
            endpoint["zone"] = json!(zone);
            endpoint["hints"] = json!({"forZones": [{"name": zone}]});
        }
    }
    server.apply_all(hinted)?;
    let mut sticky = service();
    sticky["metadata"]["name"] = json!("sticky");
    sticky["spec"]["clusterIP"] = json!("10.96.0.51");
    sticky["spec"]["clusterIPs"] = json!(["10.96.0.51"]);
    sticky["spec"]["ipFamilies"] = json!(["IPv4"]);
    sticky["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    server.apply(sticky)?;
    let mut agent = start_kube_agent(&cluster, &kubeconfig)?;

    let v4: SocketAddr = "10.96.0.50:80".parse()?;
    wait_for_backends(&cluster, &agent, v4, &cluster.v4s(&[0]))?;
    let detail = agent.status_with_rules(&["--service", "apps/whoami"])?;
    assert!(
        detail
            .lines()
            .any(|l| l.contains("10.96.0.50:80") && l.contains("zone hints z1")),
        "{detail}"
    );
    let status = agent.status_with_rules(&[])?;
    assert!(
        status.contains("apps/sticky: sessionAffinity: ClientIP: left to kube-proxy"),
        "{status}"
    );
    assert!(!status.contains("10.96.0.51"), "{status}");
    Ok(())
}
