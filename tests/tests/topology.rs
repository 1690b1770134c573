//! kube-proxy's Service semantics on simulated nodes: each node is a cgroup
//! with its own agent (own pins, own --node-name, zone from a Node in the
//! Service file or --node-zone) and a client pod; the backends are pods on
//! the fabric whose EndpointSlice entries name their node (and zone). The
//! connects from each node's client show which endpoints that node uses.

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use common::*;
use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_agent::observe::status::collect;
use grpclb_tests::peers::{connect, start_whoami, ConnectOptions};
use grpclb_tests::{
    service_yaml_with_nodes, wait_until, write_atomically, Agent, BpffsDir, ChildGuard,
    ConnectReport, Fabric, Node, Pod, ServiceDef,
};

/// Fields drop in declaration order: servers, agents, file, pods, pins,
/// fabric, cgroups.
struct Nodes {
    _servers: Vec<ChildGuard>,
    agents: Vec<Agent>,
    file: PathBuf,
    _file_dir: tempfile::TempDir,
    /// One client pod per node, run in that node's cgroup.
    clients: Vec<Pod>,
    backends: Vec<Pod>,
    bpffs: Vec<BpffsDir>,
    _fabric: Fabric,
    nodes: Vec<Node>,
}

impl Nodes {
    /// Nodes named `names`, a client pod for each, and `backends` pods
    /// `b0..` running whoami; no agents yet.
    fn new(fabric_name: &str, names: &[&str], backends: u8) -> Result<Nodes> {
        let nodes = names
            .iter()
            .map(|n| Node::new(n))
            .collect::<Result<Vec<_>>>()?;
        let fabric = Fabric::new(fabric_name)?;
        let bpffs = names
            .iter()
            .map(|_| BpffsDir::new())
            .collect::<Result<Vec<_>>>()?;
        let clients = (0..names.len() as u8)
            .map(|i| fabric.add_pod(&format!("c{i}"), Ipv4Addr::new(10, 244, 0, 2 + i), None))
            .collect::<Result<Vec<_>>>()?;
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 0..backends {
            let pod = fabric.add_pod(&format!("b{i}"), Ipv4Addr::new(10, 244, 0, 10 + i), None)?;
            servers.push(start_whoami(&pod, WHOAMI_PORT)?);
            pods.push(pod);
        }
        let file_dir = tempfile::tempdir().context("creating the Service file dir")?;
        Ok(Nodes {
            _servers: servers,
            agents: Vec::new(),
            file: file_dir.path().join("services.yaml"),
            _file_dir: file_dir,
            clients,
            backends: pods,
            bpffs,
            _fabric: fabric,
            nodes,
        })
    }

    fn name(&self, node: usize) -> &str {
        self.nodes[node].name()
    }

    fn pod_ip(&self, backend: usize) -> Ipv4Addr {
        self.backends[backend].ipv4
    }

    /// Writes the Service file with `zones` as Node objects.
    fn write(&self, services: &[ServiceDef], zones: &[(&str, &str)]) -> Result<()> {
        write_atomically(&self.file, &service_yaml_with_nodes(services, zones))
    }

    /// Writes the file and starts one agent per node; `flags[i]` are extra
    /// `run` flags of node i's agent.
    fn start(
        &mut self,
        services: &[ServiceDef],
        zones: &[(&str, &str)],
        flags: &[&[&str]],
    ) -> Result<()> {
        self.write(services, zones)?;
        for (i, node) in self.nodes.iter().enumerate() {
            let mut args = vec![OsString::from(format!(
                "--source=file:{}",
                self.file.display()
            ))];
            args.extend(
                flags
                    .get(i)
                    .into_iter()
                    .flat_map(|f| f.iter().map(OsString::from)),
            );
            self.agents
                .push(Agent::start_with_source(node, self.bpffs[i].path(), &args)?);
        }
        Ok(())
    }

    /// Waits until node `node`'s maps give `vip` exactly the backends
    /// `want` (indices of `b0..`); an empty `want` means a frontend that
    /// refuses connections.
    fn wait_active(&self, node: usize, vip: SocketAddr, want: &[usize]) -> Result<()> {
        let want: BTreeSet<SocketAddr> = want
            .iter()
            .map(|&b| SocketAddr::from((self.pod_ip(b), WHOAMI_PORT)))
            .collect();
        let key = service_key(vip);
        let mut last = None;
        wait_until(
            &format!("node {} to balance {vip} over {want:?}", self.name(node)),
            APPLY_TIMEOUT,
            || {
                let tables = PinnedTables::open(self.bpffs[node].path())?;
                let active: Option<BTreeSet<SocketAddr>> = collect(&tables)?
                    .frontends
                    .into_iter()
                    .find(|f| f.key == key)
                    .map(|f| f.backends.iter().map(|(b, _)| backend_socket(b)).collect());
                let done = active.as_ref() == Some(&want);
                last = active;
                Ok(done.then_some(()))
            },
        )
        .with_context(|| {
            format!(
                "maps hold {last:?}; agent log:\n{}",
                self.agents[node].log()
            )
        })
    }

    /// Asserts that node `node`'s `status --service` of the Service of
    /// frontend `service` (`NS/NAME:PORT`) has a line for that frontend
    /// with every one of `words`.
    fn assert_status(&mut self, node: usize, service: &str, words: &[&str]) -> Result<()> {
        let (name, _port) = service
            .rsplit_once(':')
            .with_context(|| format!("{service} has no port"))?;
        let status = self.agents[node].status_with_rules(&["--service", name])?;
        assert!(
            status
                .lines()
                .any(|l| l.contains(service) && words.iter().all(|w| l.contains(w))),
            "{status}"
        );
        Ok(())
    }

    /// `count` connections held together from node `node`'s client.
    fn connect_from(&self, node: usize, vip: SocketAddr, count: u64) -> Result<ConnectReport> {
        connect(
            &self.clients[node],
            Some(&self.nodes[node]),
            vip,
            count,
            &ConnectOptions::default(),
        )
    }
}

fn connected(report: &ConnectReport) -> std::collections::BTreeMap<String, u64> {
    assert!(
        report.failures().is_empty(),
        "failed connects: {:?}",
        report.failures()
    );
    report.per_pod()
}

/// `internalTrafficPolicy: Local`: each node's clients reach only that
/// node's pods; a node without one refuses the connect at once, as
/// kube-proxy's reject rule does.
#[test]
fn internal_traffic_policy_local_stays_on_the_node_and_refuses_without_a_local_pod() -> Result<()> {
    let mut cluster = Nodes::new("itp", &["itp-a", "itp-b", "itp-c"], 3)?;
    let vip = SocketAddr::from((v4_vip(110), WHOAMI_PORT));
    let service = ServiceDef::grpc("local", vip.ip(), vip.port(), WHOAMI_PORT)
        .internal_traffic_local()
        .backend_on(cluster.pod_ip(0), "itp-a")
        .backend_on(cluster.pod_ip(1), "itp-a")
        .backend_on(cluster.pod_ip(2), "itp-b");
    cluster.start(&[service], &[], &[])?;
    cluster.wait_active(0, vip, &[0, 1])?;
    cluster.wait_active(1, vip, &[2])?;
    cluster.wait_active(2, vip, &[])?;

    let on_a = cluster.connect_from(0, vip, 4)?;
    assert_eq!(
        connected(&on_a),
        counts(&[("b0", 2), ("b1", 2)]),
        "{on_a:?}"
    );
    let on_b = cluster.connect_from(1, vip, 2)?;
    assert_eq!(connected(&on_b), counts(&[("b2", 2)]), "{on_b:?}");
    let on_c = cluster.connect_from(2, vip, 3)?;
    assert_eq!(on_c.attempts.len(), 3);
    for attempt in &on_c.attempts {
        assert_eq!(attempt.error.as_deref(), Some("ECONNREFUSED"), "{on_c:?}");
    }
    cluster.assert_status(
        2,
        "default/local:grpc",
        &["local-only", "(none: connections refused)"],
    )?;
    Ok(())
}

/// KEP-1669: while every pod is terminating and none is ready yet (a
/// rollout), the serving terminating pods take new connections on every
/// node; once a pod is ready, only it does.
#[test]
fn terminating_pods_take_connections_until_one_is_ready() -> Result<()> {
    let mut cluster = Nodes::new("term", &["term-a", "term-b"], 3)?;
    let vip = SocketAddr::from((v4_vip(111), WHOAMI_PORT));
    let old = ServiceDef::grpc("roll", vip.ip(), vip.port(), WHOAMI_PORT)
        .backend_on(cluster.pod_ip(0), "term-a")
        .backend_on(cluster.pod_ip(1), "term-b")
        .terminating(cluster.pod_ip(0))
        .terminating(cluster.pod_ip(1));
    cluster.start(std::slice::from_ref(&old), &[], &[])?;
    for node in 0..2 {
        cluster.wait_active(node, vip, &[0, 1])?;
    }
    for node in 0..2 {
        let report = cluster.connect_from(node, vip, 4)?;
        assert_eq!(
            connected(&report),
            counts(&[("b0", 2), ("b1", 2)]),
            "node {node}: {report:?}"
        );
    }
    cluster.assert_status(0, "default/roll:grpc", &["terminating-fallback"])?;

    let rolled = old.backend_on(cluster.pod_ip(2), "term-b");
    cluster.write(&[rolled], &[])?;
    for node in 0..2 {
        cluster.wait_active(node, vip, &[2])?;
        let report = cluster.connect_from(node, vip, 2)?;
        assert_eq!(
            connected(&report),
            counts(&[("b2", 2)]),
            "node {node}: {report:?}"
        );
    }
    Ok(())
}

/// `trafficDistribution: PreferSameZone`, hinted as the EndpointSlice
/// controller does: a node's clients stay in its zone while the zone has a
/// ready pod, also on a node without one; when the zone has none, every
/// ready pod serves. Zones come from the file's Node objects, or from
/// --node-zone, which wins over them.
#[test]
fn prefer_same_zone_keeps_connections_in_the_zone_and_falls_back_when_it_has_no_pod() -> Result<()>
{
    let mut cluster = Nodes::new("zone", &["zone-a", "zone-b", "zone-c"], 3)?;
    let vip = SocketAddr::from((v4_vip(112), WHOAMI_PORT));
    let zones = [("zone-a", "z1"), ("zone-b", "z1"), ("zone-c", "z9")];
    let service = ServiceDef::grpc("near", vip.ip(), vip.port(), WHOAMI_PORT)
        .traffic_distribution("PreferSameZone")
        .backend_in(cluster.pod_ip(0), "zone-a", "z1")
        .backend_in(cluster.pod_ip(1), "zone-c", "z2")
        .backend_in(cluster.pod_ip(2), "zone-c", "z2");
    cluster.start(
        std::slice::from_ref(&service),
        &zones,
        &[&[], &[], &["--node-zone=z2"]],
    )?;
    cluster.wait_active(0, vip, &[0])?;
    cluster.wait_active(1, vip, &[0])?;
    cluster.wait_active(2, vip, &[1, 2])?;

    let on_b = cluster.connect_from(1, vip, 3)?;
    assert_eq!(connected(&on_b), counts(&[("b0", 3)]), "{on_b:?}");
    let on_c = cluster.connect_from(2, vip, 4)?;
    assert_eq!(
        connected(&on_c),
        counts(&[("b1", 2), ("b2", 2)]),
        "{on_c:?}"
    );
    cluster.assert_status(1, "default/near:grpc", &["zone hints z1"])?;

    cluster.write(&[service.not_ready(cluster.pod_ip(0))], &zones)?;
    for node in 0..3 {
        cluster.wait_active(node, vip, &[1, 2])?;
    }
    let on_b = cluster.connect_from(1, vip, 2)?;
    assert_eq!(
        connected(&on_b),
        counts(&[("b1", 1), ("b2", 1)]),
        "{on_b:?}"
    );
    cluster.assert_status(1, "default/near:grpc", &["ready"])?;
    Ok(())
}
