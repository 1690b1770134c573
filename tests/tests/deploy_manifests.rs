//! `deploy/`: every manifest parses into its k8s-openapi type with no field
//! lost (so a misspelled field fails), the kustomization lists them all, the
//! RBAC grants exactly what the agent reads, the DaemonSet's arguments are
//! ones the agent accepts, it runs as a node-critical agent with room for
//! the measured scale, and `deploy/monitoring/`'s PodMonitor scrapes it.
//! (The alert rules: tests/tests/monitoring.rs.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use grpclb_agent::cli::{Cli, Command, SourceSpec};
use grpclb_agent::sources::kube::read_resources;
use grpclb_agent::state::translate::translate;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).with_context(|| format!("parsing YAML in {}", path.display()))
        })
        .filter(|doc| !matches!(doc, Ok(Value::Null)))
        .collect()
}

/// Parses into `T` and back: anything k8s-openapi does not know (a typo, a
/// field at the wrong level) is dropped on the way and shows as a difference.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> Result<T> {
    parse_checked(doc, origin, |round_trip| round_trip == doc)
}

/// A strategic-merge patch: like [`typed`], but the type's required fields
/// may be absent (the round trip fills them with defaults); every field the
/// file has must survive.
fn typed_patch<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> Result<T> {
    parse_checked(doc, origin, |round_trip| contained(doc, round_trip))
}

/// Parses `doc` into `T` and fails unless `kept` approves of the round trip.
fn parse_checked<T: DeserializeOwned + Serialize>(
    doc: &Value,
    origin: &str,
    kept: impl Fn(&Value) -> bool,
) -> Result<T> {
    let object: T = serde_json::from_value(doc.clone())
        .with_context(|| format!("{origin}: not a valid {}", std::any::type_name::<T>()))?;
    let round_trip = serde_json::to_value(&object)?;
    if !kept(&round_trip) {
        bail!(
            "{origin}: fields lost parsing as {} (misspelled or misplaced?)\nfile:   {}\nparsed: {}",
            std::any::type_name::<T>(),
            serde_json::to_string_pretty(doc)?,
            serde_json::to_string_pretty(&round_trip)?
        );
    }
    Ok(object)
}

/// Every field and item of `part` is in `whole`.
fn contained(part: &Value, whole: &Value) -> bool {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => p
            .iter()
            .all(|(k, v)| w.get(k).is_some_and(|wv| contained(v, wv))),
        (Value::Array(p), Value::Array(w)) => {
            p.len() == w.len() && p.iter().zip(w).all(|(a, b)| contained(a, b))
        }
        _ => part == whole,
    }
}

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
}

fn load(paths: &[PathBuf]) -> Result<Manifests> {
    let mut m = Manifests::default();
    for path in paths {
        for (i, doc) in documents(path)?.iter().enumerate() {
            let origin = format!("{} document {}", path.display(), i + 1);
            match doc["kind"].as_str() {
                Some("Namespace") => m.namespaces.push(typed(doc, &origin)?),
                Some("ServiceAccount") => m.service_accounts.push(typed(doc, &origin)?),
                Some("ClusterRole") => m.cluster_roles.push(typed(doc, &origin)?),
                Some("ClusterRoleBinding") => m.bindings.push(typed(doc, &origin)?),
                Some("DaemonSet") => m.daemon_sets.push(typed(doc, &origin)?),
                Some("Service") => m.services.push(typed(doc, &origin)?),
                other => bail!("{origin}: unexpected kind {other:?}"),
            }
        }
    }
    Ok(m)
}

/// The files the base's kustomization lists, after checking they are
/// exactly the manifests in `deploy/base/`.
fn kustomized_files() -> Result<Vec<PathBuf>> {
    let dir = deploy_dir().join("base");
    let kustomization = &documents(&dir.join("kustomization.yaml"))?[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .context("kustomization has no resources")?
        .iter()
        .map(|r| r.as_str().expect("resource is a path").to_string())
        .collect();
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            present.insert(name);
        }
    }
    assert_eq!(
        listed, present,
        "kustomization resources vs manifests in deploy/base/"
    );
    Ok(listed.iter().map(|f| dir.join(f)).collect())
}

fn deployment() -> Manifests {
    load(&kustomized_files().unwrap()).unwrap()
}

/// The kustomizations under `deploy/` and what each lists as resources.
fn kustomizations() -> Result<Vec<(PathBuf, Vec<String>)>> {
    let mut found = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                let resources = documents(&path)?[0]["resources"]
                    .as_array()
                    .with_context(|| format!("{}: no resources", path.display()))?
                    .iter()
                    .map(|r| r.as_str().expect("resource is a path").to_string())
                    .collect();
                found.push((dir.clone(), resources));
            }
        }
    }
    Ok(found)
}

/// kustomize refuses a resource directory that contains the kustomization
/// naming it (`cycle detected`: an overlay inside its base), and any path
/// that does not exist.
#[test]
fn every_kustomization_names_existing_resources_outside_its_ancestors() -> Result<()> {
    let all = kustomizations()?;
    assert_eq!(
        all.len(),
        4,
        "deploy/, base, rebalancing, monitoring: {all:?}"
    );
    for (dir, resources) in all {
        for resource in resources {
            let path = dir.join(&resource).canonicalize().with_context(|| {
                format!("{}: resource {resource} does not exist", dir.display())
            })?;
            assert!(
                !dir.canonicalize()?.starts_with(&path),
                "{}: resource {resource} contains the kustomization itself (kustomize: cycle \
                 detected)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The DaemonSet's pod template spec.
fn agent_pod(m: &Manifests) -> &PodSpec {
    assert_eq!(m.daemon_sets.len(), 1);
    m.daemon_sets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn agent_container(m: &Manifests) -> &Container {
    let pod = agent_pod(m);
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

#[test]
fn every_manifest_and_example_parses_into_its_type_without_losing_fields() -> Result<()> {
    let mut files = kustomized_files()?;
    for entry in std::fs::read_dir(deploy_dir().join("examples"))? {
        files.push(entry?.path());
    }
    let m = load(&files)?;
    assert_eq!(m.namespaces.len(), 1);
    assert_eq!(m.service_accounts.len(), 1);
    assert_eq!(m.cluster_roles.len(), 1);
    assert_eq!(m.bindings.len(), 1);
    assert_eq!(m.daemon_sets.len(), 1);
    assert!(!m.services.is_empty(), "no example Service");
    Ok(())
}

#[test]
fn typos_are_caught() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "a", "namespce": "x"}
    });
    assert!(typed::<ServiceAccount>(&doc, "typo").is_err());
    assert!(typed_patch::<ServiceAccount>(&doc, "typo").is_err());
    let patch = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "spec": {"template": {"spec": {"hostPID": true}}}
    });
    assert!(
        typed::<DaemonSet>(&patch, "patch").is_err(),
        "required fields missing"
    );
    assert!(typed_patch::<DaemonSet>(&patch, "patch").is_ok());
    let typo = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "spec": {"template": {"spec": {"hostPid": true}}}
    });
    assert!(typed_patch::<DaemonSet>(&typo, "typo").is_err());
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_reads() {
    let m = deployment();
    let rules = m.cluster_roles[0].rules.as_ref().expect("rules");
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none());
        let mut verbs: Vec<String> = rule.verbs.clone();
        verbs.sort();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                assert!(
                    granted.insert((group.clone(), resource.clone(), verbs.clone())),
                    "{group}/{resource} granted twice"
                );
            }
        }
    }
    let used: BTreeSet<(String, String, Vec<String>)> = read_resources()
        .iter()
        .map(|(g, r, verbs)| {
            let mut verbs: Vec<String> = verbs.iter().map(|v| v.to_string()).collect();
            verbs.sort();
            (g.to_string(), r.to_string(), verbs)
        })
        .collect();
    assert_eq!(granted, used);
}

#[test]
fn the_binding_gives_the_role_to_the_daemonsets_account() {
    let m = deployment();
    let namespace = m.namespaces[0].metadata.name.clone().unwrap();
    let account = &m.service_accounts[0].metadata;
    assert_eq!(account.namespace.as_ref(), Some(&namespace));
    let binding = &m.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        m.cluster_roles[0].metadata.name.as_ref()
    );
    let subjects = binding.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.name.as_ref());
    assert_eq!(subjects[0].namespace.as_ref(), Some(&namespace));
    let ds = &m.daemon_sets[0];
    assert_eq!(ds.metadata.namespace.as_ref(), Some(&namespace));
    let pod = agent_pod(&m);
    assert_eq!(pod.service_account_name.as_ref(), account.name.as_ref());
}

const BASE_CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "PERFMON"];

/// `deploy/rebalancing/` is the base plus a patch that gives the agent the
/// node's PID namespace and SYS_PTRACE, and nothing else.
#[test]
fn the_rebalancing_overlay_adds_host_pids_and_ptrace_only() -> Result<()> {
    let dir = deploy_dir().join("rebalancing");
    let kustomization = &documents(&dir.join("kustomization.yaml"))?[0];
    assert_eq!(kustomization["resources"], serde_json::json!(["../base"]));
    let patches = kustomization["patches"].as_array().context("no patches")?;
    assert_eq!(patches.len(), 1);
    let path = dir.join(patches[0]["path"].as_str().context("patch path")?);
    let patch: DaemonSet = typed_patch(&documents(&path)?[0], &path.display().to_string())?;
    let base = deployment();
    assert_eq!(patch.metadata.name, base.daemon_sets[0].metadata.name);
    assert_eq!(
        patch.metadata.namespace,
        base.daemon_sets[0].metadata.namespace
    );
    let pod = patch.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.containers.len(), 1);
    assert_eq!(pod.containers[0].name, agent_container(&base).name);
    let caps = pod.containers[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    let mut want: Vec<&str> = BASE_CAPABILITIES.to_vec();
    want.push("SYS_PTRACE");
    assert_eq!(caps, want);
    Ok(())
}

#[test]
fn the_daemonset_has_only_the_capabilities_and_host_access_it_needs() {
    let m = deployment();
    let pod = agent_pod(&m);
    assert_ne!(
        pod.host_pid,
        Some(true),
        "hostPID (only deploy/rebalancing/ sets it)"
    );
    assert_eq!(
        pod.host_network,
        Some(true),
        "metrics on the node's network"
    );
    let container = agent_container(&m);
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    // The API server rejects allowPrivilegeEscalation: false with SYS_ADMIN.
    assert_ne!(security.allow_privilege_escalation, Some(false));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(BASE_CAPABILITIES));

    let host_paths: BTreeSet<&str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from(["/sys/fs/bpf", "/sys/fs/cgroup"])
    );

    let resources = container.resources.as_ref().unwrap();
    for key in ["cpu", "memory"] {
        assert!(
            resources.requests.as_ref().unwrap().contains_key(key),
            "request {key}"
        );
        assert!(
            resources.limits.as_ref().unwrap().contains_key(key),
            "limit {key}"
        );
    }

    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME env");
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn the_daemonsets_arguments_are_accepted_by_the_agent_and_match_its_mounts() {
    let m = deployment();
    let container = agent_container(&m);
    let args = container.args.clone().unwrap();
    let cli = Cli::try_parse_from(std::iter::once("grpclb-agent".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("the agent rejects the DaemonSet's arguments: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("the DaemonSet does not run `grpclb-agent run`")
    };
    assert_eq!(run.source, Some(SourceSpec::Kube));

    let mounts: Vec<(&str, &str)> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v.mount_path.as_str()))
        .collect();
    let pod = agent_pod(&m);
    let host_path_of = |mount_path: &Path| -> Option<String> {
        mounts.iter().find_map(|(name, path)| {
            let rest = mount_path.strip_prefix(path).ok()?;
            let volume = pod.volumes.iter().flatten().find(|v| v.name == *name)?;
            Some(
                Path::new(&volume.host_path.as_ref()?.path)
                    .join(rest)
                    .components()
                    .collect::<PathBuf>()
                    .display()
                    .to_string(),
            )
        })
    };
    assert_eq!(
        host_path_of(run.cgroup.as_deref().unwrap()).as_deref(),
        Some("/sys/fs/cgroup")
    );
    assert_eq!(
        host_path_of(&run.bpffs).as_deref(),
        Some("/sys/fs/bpf/grpclb")
    );

    let probe = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    // The kubelet probes loopback; the agent listens there on its own
    // address or on every address.
    let host: std::net::IpAddr = probe.host.as_deref().unwrap().parse().unwrap();
    assert!(host.is_loopback(), "probe host {host}");
    assert!(
        run.metrics_addr.ip().is_unspecified() || run.metrics_addr.ip() == host,
        "the probe asks {host}, the agent listens on {}",
        run.metrics_addr
    );
    assert_eq!(
        probe.port,
        IntOrString::Int(i32::from(run.metrics_addr.port()))
    );
}

#[test]
fn the_example_service_is_balanced_once_it_has_a_cluster_ip() -> Result<()> {
    let m = load(&[deploy_dir().join("examples/grpc-service.yaml")])?;
    let mut service = m.services[0].clone();
    service.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.10".into());
    let node = grpclb_agent::state::topology::NodeTopology::default();
    let t = translate(&[service], &[], &node);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let names: Vec<&str> = t.state.services.values().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/echo:grpc"]);
    Ok(())
}

/// A CPU or memory quantity (`100m`, `1`, `128Mi`, `1G`) in millicores or
/// bytes.
fn quantity(q: &str) -> f64 {
    let units: [(&str, f64); 8] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("m", 1e-3),
        ("", 1.0),
    ];
    let (number, factor) = units
        .iter()
        .find_map(|(suffix, factor)| Some((q.strip_suffix(suffix)?, *factor)))
        .unwrap();
    number
        .parse::<f64>()
        .unwrap_or_else(|e| panic!("quantity {q:?}: {e}"))
        * factor
}

#[test]
fn quantities_are_read_with_their_units() {
    assert_eq!(quantity("128Mi"), 128.0 * 1024.0 * 1024.0);
    assert_eq!(quantity("100m"), 0.1);
    assert_eq!(quantity("1"), 1.0);
    assert_eq!(quantity("1G"), 1e9);
}

/// Peak RSS of the agent at 10,000 Services / 100,000 endpoints (`cargo
/// xtask bench scale`, README "The agent at scale": 95 MB, file source),
/// plus the load exchange's views of 100,000 pods (docs/exchange.md: about
/// 36 MB).
const PEAK_BYTES_AT_SCALE: f64 = (95.0 + 36.0) * 1e6;
/// Steady RSS at that scale (55 MB, file source) plus the views.
const STEADY_BYTES_AT_SCALE: f64 = (55.0 + 36.0) * 1e6;

#[test]
fn the_daemonset_runs_as_a_node_critical_agent_with_room_for_the_measured_scale() {
    let m = deployment();
    let pod = agent_pod(&m);
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let resources = agent_container(&m).resources.as_ref().unwrap();
    let get = |set: &Option<BTreeMap<String, Quantity>>, key: &str| {
        quantity(&set.as_ref().unwrap()[key].0)
    };
    for key in ["cpu", "memory"] {
        assert!(
            get(&resources.limits, key) >= get(&resources.requests, key),
            "{key}: limit below request"
        );
    }
    let limit = get(&resources.limits, "memory");
    assert!(
        limit >= 2.0 * PEAK_BYTES_AT_SCALE,
        "memory limit {limit} bytes: less than twice the peak at 10,000 Services"
    );
    let request = get(&resources.requests, "memory");
    assert!(
        request >= STEADY_BYTES_AT_SCALE,
        "memory request {request} bytes: below the steady use at 10,000 Services"
    );
    // Starting at that scale takes about a core for under 3 s: a limit
    // below one core would stretch it.
    assert!(get(&resources.limits, "cpu") >= 1.0);
}

/// A PodMonitor (monitoring.coreos.com/v1), as far as deploy/monitoring
/// uses it; an unknown field (a typo) fails to parse.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: LabelSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(default)]
    relabelings: Vec<Relabeling>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

#[test]
fn the_monitoring_overlay_scrapes_the_agents_metrics_port() -> Result<()> {
    let dir = deploy_dir().join("monitoring");
    let kustomization = &documents(&dir.join("kustomization.yaml"))?[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    // On its own: applied next to deploy/ or deploy/rebalancing/, it must
    // not bring (and so reset) the DaemonSet.
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .context("no resources")?
        .iter()
        .map(|r| r.as_str().expect("resource is a path"))
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from(["podmonitor.yaml", "prometheusrule.yaml"])
    );

    let path = dir.join("podmonitor.yaml");
    let docs = documents(&path)?;
    assert_eq!(docs.len(), 1);
    let monitor: PodMonitor = serde_json::from_value(docs[0].clone())
        .with_context(|| format!("{}: not a PodMonitor", path.display()))?;
    assert_eq!(
        (monitor.api_version.as_str(), monitor.kind.as_str()),
        ("monitoring.coreos.com/v1", "PodMonitor")
    );
    let m = deployment();
    let ds = &m.daemon_sets[0];
    assert_eq!(monitor.metadata.namespace, ds.metadata.namespace);

    // It selects the agent's pods.
    let template_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let wanted = monitor
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    assert!(!wanted.is_empty() && monitor.spec.selector.match_expressions.is_none());
    for (key, value) in &wanted {
        assert_eq!(template_labels.get(key), Some(value), "selector {key}");
    }

    // Its port is the container's metrics port, where the agent listens on
    // an address other pods reach.
    let container = agent_container(&m);
    let run = match Cli::try_parse_from(
        std::iter::once("grpclb-agent".to_string()).chain(container.args.clone().unwrap()),
    )?
    .command
    {
        Command::Run(run) => run,
        _ => bail!("the DaemonSet does not run `grpclb-agent run`"),
    };
    assert!(
        !run.metrics_addr.ip().is_loopback(),
        "--metrics-addr {}: Prometheus cannot reach loopback",
        run.metrics_addr
    );
    assert_eq!(monitor.spec.pod_metrics_endpoints.len(), 1);
    let endpoint = &monitor.spec.pod_metrics_endpoints[0];
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(endpoint.port.as_str()))
        .with_context(|| format!("the agent container has no port named {}", endpoint.port))?;
    assert_eq!(port.container_port, i32::from(run.metrics_addr.port()));
    assert_eq!(endpoint.path, "/metrics");
    assert!(
        endpoint.interval.ends_with('s'),
        "interval {}",
        endpoint.interval
    );
    // The alerts name the node.
    assert!(endpoint.relabelings.iter().any(|r| r.source_labels
        == ["__meta_kubernetes_pod_node_name"]
        && r.target_label == "node"));
    Ok(())
}
