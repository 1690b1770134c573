//! A one-node test cluster shared by the agent tests: a node cgroup, a fabric
//! with one client pod and N backend pods (each running `testpod whoami` and
//! `testpod grpc-server`), a bpffs pin dir, the Service file and the agent.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_agent::observe::status::{collect, FrontendStatus, Status};
use grpclb_common::{Addr, Backend, ServiceKey};
use grpclb_tests::peers::{start_grpc_server, start_whoami};
use grpclb_tests::{
    service_yaml, wait_until, write_atomically, Agent, BpffsDir, ChildGuard, Fabric, Node, Pod,
    ServiceDef,
};

pub const WHOAMI_PORT: u16 = 7000;
pub const GRPC_PORT: u16 = 50051;
/// The agent polls its file every 200 ms; applying takes a little more.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Fields drop in declaration order: servers, agent, file, pins, netns, cgroup.
pub struct TestCluster {
    pub servers: Vec<ChildGuard>,
    pub agent: Option<Agent>,
    pub file: PathBuf,
    _file_dir: tempfile::TempDir,
    pub client: Pod,
    pub backends: Vec<Pod>,
    pub bpffs: BpffsDir,
    /// Held for its Drop: the bridge netns goes after the pods.
    _fabric: Fabric,
    pub node: Node,
}

pub fn v4_vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

pub fn v6_vip(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last)
}

impl TestCluster {
    /// `backends` pods `b0..`, dual-stack, with both servers running; no
    /// agent yet.
    pub fn new(name: &str, backends: u8) -> Result<TestCluster> {
        let node = Node::new(name)?;
        let fabric = Fabric::new(name)?;
        let bpffs = BpffsDir::new()?;
        let client = fabric.add_pod(
            "client",
            Ipv4Addr::new(10, 244, 0, 2),
            Some(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 2)),
        )?;
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 0..backends {
            let pod = fabric.add_pod(
                &format!("b{i}"),
                Ipv4Addr::new(10, 244, 0, 10 + i),
                Some(Ipv6Addr::new(
                    0xfd00,
                    0x244,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0x10 + u16::from(i),
                )),
            )?;
            servers.push(start_whoami(&pod, WHOAMI_PORT)?);
            servers.push(start_grpc_server(&pod, GRPC_PORT)?);
            pods.push(pod);
        }
        let file_dir = tempfile::tempdir().context("creating the Service file dir")?;
        Ok(TestCluster {
            servers,
            agent: None,
            file: file_dir.path().join("services.yaml"),
            _file_dir: file_dir,
            client,
            backends: pods,
            bpffs,
            _fabric: fabric,
            node,
        })
    }

    /// Another `testpod whoami` on `port` in every backend pod.
    pub fn start_whoami_everywhere(&mut self, port: u16) -> Result<()> {
        for pod in &self.backends {
            self.servers.push(start_whoami(pod, port)?);
        }
        Ok(())
    }

    pub fn v4s(&self, indices: &[usize]) -> Vec<IpAddr> {
        indices
            .iter()
            .map(|&i| self.backends[i].ipv4.into())
            .collect()
    }

    pub fn v6s(&self, indices: &[usize]) -> Vec<IpAddr> {
        indices
            .iter()
            .map(|&i| {
                self.backends[i]
                    .ipv6
                    .expect("backends are dual-stack")
                    .into()
            })
            .collect()
    }

    /// Writes the Service file.
    pub fn write(&self, services: &[ServiceDef]) -> Result<()> {
        write_atomically(&self.file, &service_yaml(services))
    }

    /// Writes the Service file, starts the agent and waits until it is
    /// ready: the maps hold every balanced frontend of the file.
    pub fn start_agent(&mut self, services: &[ServiceDef]) -> Result<()> {
        self.start_agent_with(services, &[])
    }

    /// [`TestCluster::start_agent`] with more `grpclb-agent run` flags.
    pub fn start_agent_with(&mut self, services: &[ServiceDef], flags: &[&str]) -> Result<()> {
        self.write(services)?;
        let mut args = vec![std::ffi::OsString::from(format!(
            "--source=file:{}",
            self.file.display()
        ))];
        args.extend(flags.iter().map(std::ffi::OsString::from));
        self.agent = Some(Agent::start_with_source(
            &self.node,
            self.bpffs.path(),
            &args,
        )?);
        Ok(())
    }

    /// Rewrites the Service file and waits until the agent applied it.
    pub fn update(&self, services: &[ServiceDef]) -> Result<()> {
        self.write(services)?;
        for service in services.iter().filter(|s| s.app_protocol.is_some()) {
            self.wait_for_backends(service)?;
        }
        Ok(())
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// What the pinned maps hold, read in-process.
    pub fn maps(&self) -> Result<Status> {
        let tables = PinnedTables::open(self.bpffs.path()).with_context(|| {
            format!("opening the pinned maps in {}", self.bpffs.path().display())
        })?;
        collect(&tables)
    }

    /// Live connection count of the backend `to` in the active set of `vip`.
    pub fn load_of(&self, vip: SocketAddr, to: SocketAddr) -> Result<Option<u64>> {
        let key = service_key(vip);
        let backend = backend(to);
        Ok(self
            .maps()?
            .frontends
            .into_iter()
            .filter(|f| f.key == key)
            .flat_map(|f| f.backends)
            .find(|(b, _)| *b == backend)
            .and_then(|(_, load)| load))
    }

    /// The active backends of the frontend `vip`, if it exists.
    pub fn active_backends(&self, vip: SocketAddr) -> Result<Option<BTreeSet<SocketAddr>>> {
        let key = service_key(vip);
        Ok(self
            .maps()?
            .frontends
            .into_iter()
            .find(|f: &FrontendStatus| f.key == key)
            .map(|f| f.backends.iter().map(|(b, _)| backend_socket(b)).collect()))
    }

    /// Waits until the maps hold exactly the ready endpoints of `service`.
    pub fn wait_for_backends(&self, service: &ServiceDef) -> Result<()> {
        let vip = SocketAddr::new(service.cluster_ip, service.port);
        let want: BTreeSet<SocketAddr> = service
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| SocketAddr::new(e.addr, service.endpoint_port))
            .collect();
        let mut last = None;
        wait_until(
            &format!("the agent to apply {vip} → {want:?}"),
            APPLY_TIMEOUT,
            || {
                let active = self.active_backends(vip)?;
                let done = active.as_ref() == Some(&want);
                last = active;
                Ok(done.then_some(()))
            },
        )
        .with_context(|| format!("maps hold {last:?}; agent log:\n{}", self.agent_log()))
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr(v6.octets()),
    }
}

pub fn service_key(vip: SocketAddr) -> ServiceKey {
    ServiceKey::new(addr_of(vip.ip()), vip.port())
}

pub fn backend(addr: SocketAddr) -> Backend {
    Backend::new(addr_of(addr.ip()), addr.port())
}

/// IPv4-mapped backends as plain IPv4 socket addresses.
pub fn backend_socket(backend: &Backend) -> SocketAddr {
    let ip = Ipv6Addr::from(backend.addr.0);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, backend.port)
}

/// Connection counts per pod name, for exact comparisons.
pub fn counts(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|(p, n)| (p.to_string(), *n)).collect()
}

/// `bpftool -j cgroup show PATH`: attach type of every program attached to
/// the cgroup (directly, not inherited), with its program id.
pub fn attached_programs(node: &Node) -> Result<Vec<(String, u64)>> {
    let output = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(node.path())
        .output()
        .context("running bpftool (install the bpftool package)")?;
    if !output.status.success() {
        bail!(
            "bpftool cgroup show {} failed: {}",
            node.path().display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    // bpftool prints nothing at all, not `[]`, for a cgroup without programs.
    if stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    let programs: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).context("parsing bpftool JSON")?;
    programs
        .iter()
        .map(|p| {
            let attach_type = p["attach_type"].as_str().context("attach_type")?;
            let id = p["id"].as_u64().context("id")?;
            Ok((attach_type.to_string(), id))
        })
        .collect()
}

#[allow(unused_imports)]
pub use grpclb_tests::http_get;
