//! The kube source against the test API server, in-process: watcher →
//! reflector stores → translate → `sync::apply` into `MemoryTables`. No
//! kernel needed; the API server is real HTTP on 127.0.0.1.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use grpclb_agent::dataplane::sync::apply;
use grpclb_agent::dataplane::tables::MemoryTables;
use grpclb_agent::observe::metrics::{Metrics, Watched};
use grpclb_agent::observe::status::{collect, socket_label};
use grpclb_agent::sources::kube::{self as kube_source, KubeSource};
use grpclb_agent::state::model::{DesiredState, EndpointCondition};
use grpclb_tests::apiserver::{ApiServer, Kind};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Long enough for a backoff of a few seconds after an outage.
const CONVERGE: Duration = Duration::from_secs(20);

/// A running kube source whose published states are applied to memory
/// tables, and every published state kept for inspection.
struct Feed {
    server: ApiServer,
    tables: Arc<Mutex<MemoryTables>>,
    published: Arc<Mutex<Vec<DesiredState>>>,
    metrics: Arc<Metrics>,
    tasks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Feed {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Frontend `ip:port` → its eligible backends `ip:port`, as the maps hold them.
type MapView = BTreeMap<String, Vec<String>>;

impl Feed {
    async fn start(server: ApiServer) -> Result<Feed> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = server.write_kubeconfig(dir.path())?;
        let client = kube_source::client(Some(&kubeconfig)).await?;
        let metrics = Metrics::new();
        let (states, mut latest) = watch::channel(None);
        let node = grpclb_agent::state::topology::NodeTopology::new("node-a", None, None);
        let source = KubeSource::new(client, metrics.clone(), node);
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = source.watch(states).await {
                panic!("kube source failed: {e:#}");
            }
        })];
        let tables = Arc::new(Mutex::new(MemoryTables::default()));
        let published = Arc::new(Mutex::new(Vec::new()));
        let (t, p) = (tables.clone(), published.clone());
        tasks.push(tokio::spawn(async move {
            while latest.changed().await.is_ok() {
                let Some(state) = latest.borrow_and_update().clone() else {
                    continue;
                };
                apply(&mut *t.lock().unwrap(), &state).expect("apply to memory tables");
                p.lock().unwrap().push(state);
            }
        }));
        Ok(Feed {
            server,
            tables,
            published,
            metrics,
            tasks,
            _dir: dir,
        })
    }

    fn view(&self) -> MapView {
        let status = collect(&*self.tables.lock().unwrap()).unwrap();
        status
            .frontends
            .iter()
            .map(|f| {
                (
                    socket_label(&f.key.addr, f.key.port),
                    f.backends
                        .iter()
                        .map(|(b, _)| socket_label(&b.addr, b.port))
                        .collect(),
                )
            })
            .collect()
    }

    fn published_count(&self) -> usize {
        self.published.lock().unwrap().len()
    }

    fn last_published(&self) -> Option<DesiredState> {
        self.published.lock().unwrap().last().cloned()
    }

    async fn wait_for(&self, what: &str, want: &MapView) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let view = self.view();
            if &view == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > CONVERGE {
                bail!(
                    "{what}: maps did not converge in {CONVERGE:?}\nwant {want:#?}\nhave {view:#?}\nrequests: {:#?}",
                    self.server.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn view(entries: &[(&str, &[&str])]) -> MapView {
    entries
        .iter()
        .map(|(f, bs)| (f.to_string(), bs.iter().map(|b| b.to_string()).collect()))
        .collect()
}

fn grpc_service(name: &str, cluster_ip: &str, port: u16, target_port: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "grpc", "port": port, "protocol": "TCP",
                       "appProtocol": "grpc", "targetPort": target_port}],
            "selector": {"app": name}
        }
    })
}

fn endpoint(ip: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": "apps", "name": format!("pod-{ip}")}
    })
}

fn ready(ip: &str) -> Value {
    endpoint(ip, true, true, false, "node-a")
}

/// The `echo` Service (10.96.0.10:50051 → 8080) and its slice `echo-a`.
fn apply_echo(server: &ApiServer, endpoints: Vec<Value>) -> Result<()> {
    server.apply(grpc_service("echo", "10.96.0.10", 50051, json!(8080)))?;
    server.apply(slice("echo-a", "echo", "IPv4", 8080, endpoints))?;
    Ok(())
}

fn slice(name: &str, service: &str, family: &str, port: u16, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "apps",
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": format!("uid-{service}"), "controller": true}]
        },
        "addressType": family,
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP", "appProtocol": "grpc"}],
        "endpoints": endpoints
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_slices_are_added_updated_and_deleted() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.10"), ready("10.244.0.11")])?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "initial list",
        &view(&[(
            "10.96.0.10:50051",
            &["10.244.0.10:8080", "10.244.0.11:8080"],
        )]),
    )
    .await?;

    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![
            ready("10.244.0.10"),
            ready("10.244.0.11"),
            ready("10.244.0.12"),
        ],
    ))?;
    feed.wait_for(
        "slice update",
        &view(&[(
            "10.96.0.10:50051",
            &["10.244.0.10:8080", "10.244.0.11:8080", "10.244.0.12:8080"],
        )]),
    )
    .await?;

    feed.server.apply(slice(
        "echo-b",
        "echo",
        "IPv4",
        8080,
        vec![ready("10.244.0.20")],
    ))?;
    feed.wait_for(
        "second slice merged",
        &view(&[(
            "10.96.0.10:50051",
            &[
                "10.244.0.10:8080",
                "10.244.0.11:8080",
                "10.244.0.12:8080",
                "10.244.0.20:8080",
            ],
        )]),
    )
    .await?;

    feed.server.delete(Kind::EndpointSlice, "apps", "echo-a")?;
    feed.wait_for(
        "slice delete",
        &view(&[("10.96.0.10:50051", &["10.244.0.20:8080"])]),
    )
    .await?;

    feed.server
        .apply(grpc_service("echo", "10.96.0.10", 50052, json!(8080)))?;
    feed.wait_for(
        "service port change",
        &view(&[("10.96.0.10:50052", &["10.244.0.20:8080"])]),
    )
    .await?;

    feed.server
        .apply(grpc_service("other", "10.96.0.11", 50051, json!(8080)))?;
    feed.wait_for(
        "service add (no slices yet)",
        &view(&[
            ("10.96.0.10:50052", &["10.244.0.20:8080"]),
            ("10.96.0.11:50051", &[]),
        ]),
    )
    .await?;

    feed.server.delete(Kind::Service, "apps", "echo")?;
    feed.wait_for("service delete", &view(&[("10.96.0.11:50051", &[])]))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_and_terminating_endpoints() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(
        &server,
        vec![
            ready("10.244.0.10"),
            endpoint("10.244.0.11", false, false, false, "node-b"),
        ],
    )?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "a ready, b starting",
        &view(&[("10.96.0.10:50051", &["10.244.0.10:8080"])]),
    )
    .await?;

    // b becomes ready, a is being deleted but still serves its connections.
    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![
            endpoint("10.244.0.10", false, true, true, "node-a"),
            endpoint("10.244.0.11", true, true, false, "node-b"),
        ],
    ))?;
    feed.wait_for(
        "flip",
        &view(&[("10.96.0.10:50051", &["10.244.0.11:8080"])]),
    )
    .await?;
    let state = feed.last_published().unwrap();
    let service = state.services.values().next().unwrap();
    let conditions: Vec<(String, EndpointCondition, Option<String>)> = service
        .endpoints
        .iter()
        .map(|e| {
            (
                socket_label(&e.backend.addr, e.backend.port),
                e.condition,
                e.node_name.as_deref().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        conditions,
        vec![
            (
                "10.244.0.10:8080".into(),
                EndpointCondition::Draining,
                Some("node-a".into())
            ),
            (
                "10.244.0.11:8080".into(),
                EndpointCondition::Ready,
                Some("node-b".into())
            ),
        ]
    );

    // a stops serving: it is gone from the desired state altogether.
    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![
            endpoint("10.244.0.10", false, false, true, "node-a"),
            endpoint("10.244.0.11", true, true, false, "node-b"),
        ],
    ))?;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let state = feed.last_published().unwrap();
        let endpoints = &state.services.values().next().unwrap().endpoints;
        if endpoints.len() == 1 {
            assert_eq!(endpoints[0].condition, EndpointCondition::Ready);
            break;
        }
        assert!(Instant::now() < deadline, "terminated endpoint not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_target_ports_and_dual_stack() -> Result<()> {
    let server = ApiServer::start_new()?;
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "apps"},
        "spec": {
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP",
                       "appProtocol": "grpc", "targetPort": "grpc-port"}]
        }
    }))?;
    server.apply_all([
        slice("echo-v4", "echo", "IPv4", 9443, vec![ready("10.244.0.10")]),
        slice("echo-v6", "echo", "IPv6", 9443, vec![ready("fd00:244::10")]),
    ])?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "both families, named port resolved by the slices",
        &view(&[
            ("10.96.0.10:50051", &["10.244.0.10:9443"]),
            ("[fd00:96::10]:50051", &["[fd00:244::10]:9443"]),
        ]),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_down_at_start_publishes_nothing_then_converges() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.10")])?;
    server.stop();
    let feed = Feed::start(server).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(feed.published_count(), 0, "published without a list");
    let errors = feed.metrics.snapshot().watches[&Watched::Services].errors;
    assert!(errors >= 1, "no watch error recorded");
    feed.server.start()?;
    feed.wait_for(
        "after the API server came up",
        &view(&[("10.96.0.10:50051", &["10.244.0.10:8080"])]),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_until_endpointslices_are_listed_too() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.10")])?;
    // As with RBAC that forgot EndpointSlices.
    server.fail_requests_for(Kind::EndpointSlice, Some(403));
    let feed = Feed::start(server).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counters = feed.metrics.snapshot();
    assert_eq!(counters.watches[&Watched::Services].lists, 1);
    assert!(counters.watches[&Watched::EndpointSlices].errors >= 1);
    assert_eq!(feed.published_count(), 0, "published from Services alone");
    feed.server.fail_requests_for(Kind::EndpointSlice, None);
    feed.wait_for(
        "after EndpointSlices became readable",
        &view(&[("10.96.0.10:50051", &["10.244.0.10:8080"])]),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_down_mid_run_keeps_the_maps_then_converges() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.10"), ready("10.244.0.11")])?;
    let feed = Feed::start(server).await?;
    let before = view(&[(
        "10.96.0.10:50051",
        &["10.244.0.10:8080", "10.244.0.11:8080"],
    )]);
    feed.wait_for("initial", &before).await?;

    // Connection refused: the watches break and every retry fails.
    feed.server.stop();
    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![ready("10.244.0.12")],
    ))?;
    let published = feed.published_count();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(feed.view(), before, "maps changed during the outage");
    assert_eq!(feed.published_count(), published);
    let after_outage = view(&[("10.96.0.10:50051", &["10.244.0.12:8080"])]);
    feed.server.start()?;
    feed.wait_for("after the outage", &after_outage).await?;

    // HTTP errors rather than a closed port (500: kube's client retries 503
    // itself before the watcher sees an error).
    let errors_before = feed.metrics.snapshot().watches[&Watched::Services].errors;
    feed.server.fail_requests(Some(500));
    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![ready("10.244.0.13")],
    ))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        feed.view(),
        after_outage,
        "maps changed while the API failed"
    );
    assert!(
        feed.metrics.snapshot().watches[&Watched::Services].errors > errors_before,
        "{:#?}\n{:#?}",
        feed.metrics.snapshot(),
        feed.server.requests()
    );
    feed.server.fail_requests(None);
    feed.wait_for(
        "after the errors stopped",
        &view(&[("10.96.0.10:50051", &["10.244.0.13:8080"])]),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_outage_the_watches_are_back_within_seconds() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.10")])?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "initial",
        &view(&[("10.96.0.10:50051", &["10.244.0.10:8080"])]),
    )
    .await?;
    // Long enough for the retry delays to reach their cap.
    feed.server.stop();
    tokio::time::sleep(Duration::from_secs(8)).await;
    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![ready("10.244.0.12")],
    ))?;
    feed.server.start()?;
    let back = feed
        .wait_for(
            "after the outage",
            &view(&[("10.96.0.10:50051", &["10.244.0.12:8080"])]),
        )
        .await?;
    // The cap is 1.5 s plus as much jitter; kube's default backoff took
    // up to 30 s here.
    assert!(back < Duration::from_secs(5), "back after {back:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_with_a_wrong_field_does_not_stop_the_watch() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.10")])?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "initial",
        &view(&[("10.96.0.10:50051", &["10.244.0.10:8080"])]),
    )
    .await?;
    let mut bad = grpc_service("bad", "10.96.0.11", 50051, json!(8080));
    bad["spec"]["ports"][0]["port"] = json!("fifty");
    feed.server.apply(bad)?;
    feed.server.apply(slice(
        "echo-a",
        "echo",
        "IPv4",
        8080,
        vec![ready("10.244.0.12")],
    ))?;
    feed.wait_for(
        "the change after the bad object",
        &view(&[("10.96.0.10:50051", &["10.244.0.12:8080"])]),
    )
    .await?;
    assert_eq!(
        feed.metrics.snapshot().watches[&Watched::Services].errors,
        0,
        "the bad Service broke the watch: {:#?}",
        feed.server.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watch_relists_without_dropping_live_services() -> Result<()> {
    let server = ApiServer::start_new()?;
    server.apply_all([
        grpc_service("stays", "10.96.0.10", 50051, json!(8080)),
        grpc_service("goes", "10.96.0.11", 50051, json!(8080)),
        slice("stays-a", "stays", "IPv4", 8080, vec![ready("10.244.0.10")]),
        slice("goes-a", "goes", "IPv4", 8080, vec![ready("10.244.0.11")]),
    ])?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "initial",
        &view(&[
            ("10.96.0.10:50051", &["10.244.0.10:8080"]),
            ("10.96.0.11:50051", &["10.244.0.11:8080"]),
        ]),
    )
    .await?;
    let lists_before = feed.metrics.snapshot().watches[&Watched::Services].lists;
    let published_before = feed.published_count();

    feed.server.expire_watches();
    feed.server.delete(Kind::Service, "apps", "goes")?;
    feed.server.delete(Kind::EndpointSlice, "apps", "goes-a")?;
    feed.server.apply_all([
        grpc_service("new", "10.96.0.12", 50051, json!(8080)),
        slice("new-a", "new", "IPv4", 8080, vec![ready("10.244.0.12")]),
    ])?;
    feed.wait_for(
        "after the relist",
        &view(&[
            ("10.96.0.10:50051", &["10.244.0.10:8080"]),
            ("10.96.0.12:50051", &["10.244.0.12:8080"]),
        ]),
    )
    .await?;
    assert!(
        feed.metrics.snapshot().watches[&Watched::Services].lists > lists_before,
        "no relist after 410"
    );
    let stays =
        grpclb_common::ServiceKey::new(grpclb_common::Addr::from_v4([10, 96, 0, 10]), 50051);
    for state in &feed.published.lock().unwrap()[published_before..] {
        let service = state
            .services
            .get(&stays)
            .expect("live service dropped during relist");
        assert_eq!(
            service.eligible().len(),
            1,
            "live backend dropped during relist"
        );
    }
    let relists = feed
        .server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert!(relists >= 2, "the services were not listed again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_events_is_coalesced() -> Result<()> {
    let server = ApiServer::start_new()?;
    apply_echo(&server, vec![ready("10.244.0.1")])?;
    let feed = Feed::start(server).await?;
    feed.wait_for(
        "initial",
        &view(&[("10.96.0.10:50051", &["10.244.0.1:8080"])]),
    )
    .await?;
    let before = feed.published_count();
    const UPDATES: u8 = 200;
    for i in 1..=UPDATES {
        feed.server.apply(slice(
            "echo-a",
            "echo",
            "IPv4",
            8080,
            vec![ready(&format!("10.244.1.{i}"))],
        ))?;
    }
    let last = format!("10.244.1.{UPDATES}:8080");
    feed.wait_for(
        "after the burst",
        &view(&[("10.96.0.10:50051", &[last.as_str()])]),
    )
    .await?;
    let publishes = feed.published_count() - before;
    println!("{UPDATES} slice updates produced {publishes} published states");
    assert!(
        publishes < 10,
        "{UPDATES} events were not coalesced: {publishes} publishes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_with_ten_endpoints_each_are_synced() -> Result<()> {
    const SERVICES: u32 = 1000;
    const ENDPOINTS: u32 = 10;
    let server = ApiServer::start_new()?;
    let mut objects = Vec::new();
    let mut want = MapView::new();
    for s in 0..SERVICES {
        let name = format!("svc-{s}");
        let vip = format!("10.96.{}.{}", s / 250, s % 250 + 1);
        objects.push(grpc_service(&name, &vip, 50051, json!(8080)));
        let ips: Vec<String> = (0..ENDPOINTS)
            .map(|e| format!("10.{}.{}.{}", 100 + s / 250, s % 250, e + 1))
            .collect();
        objects.push(slice(
            &format!("{name}-a"),
            &name,
            "IPv4",
            8080,
            ips.iter().map(|ip| ready(ip)).collect(),
        ));
        let mut backends: Vec<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
        backends.sort();
        want.insert(format!("{vip}:50051"), backends);
    }
    server.apply_all(objects)?;
    let start = Instant::now();
    let feed = Feed::start(server).await?;
    // Compare sorted backends: the view lists them in map order.
    let deadline = start + Duration::from_secs(60);
    loop {
        let mut view = feed.view();
        for backends in view.values_mut() {
            backends.sort();
        }
        if view == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {SERVICES} frontends synced",
            view.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let paged = feed
        .server
        .requests()
        .iter()
        .any(|r| r.contains("continue="));
    assert!(paged, "the list of {SERVICES} objects was not paged");
    println!(
        "{SERVICES} services x {ENDPOINTS} endpoints: listed, translated and synced in {elapsed:?} \
         ({} published states)",
        feed.published_count()
    );
    Ok(())
}

/// The agent's zone: its Node's `topology.kubernetes.io/zone` label, unless
/// --node-zone gives one; a Node it cannot read (missing, or no RBAC get on
/// nodes) leaves the zone unknown, so zone hints are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zone_comes_from_this_nodes_node_object_unless_the_flag_gives_it() -> Result<()> {
    let server = ApiServer::start_new()?;
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}}
    }))?;
    let dir = tempfile::tempdir()?;
    let client = kube_source::client(Some(&server.write_kubeconfig(dir.path())?)).await?;
    let zone = |name: &'static str, flag: Option<&'static str>| {
        let client = client.clone();
        async move { kube_source::node_topology(&client, name, flag).await.zone }
    };
    assert_eq!(zone("node-a", None).await.as_deref(), Some("z1"));
    assert_eq!(zone("node-a", Some("z2")).await.as_deref(), Some("z2"));
    assert_eq!(zone("node-x", None).await, None);
    server.fail_requests_for(Kind::Node, Some(403));
    assert_eq!(zone("node-a", None).await, None);
    Ok(())
}
