//! The ways of reaching the pods that `bench compare` measures, each set up
//! on a throw-away simulated cluster (harness Node, Fabric, pods), and told
//! when the set of pods in service changes, as its real control plane would.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grpclb_tests::{spawn, testpod_bin, write_atomically, ChildGuard, Pod, ServiceDef, SimCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use super::stats::parse_proc_stat;
use crate::kube_proxy::{self, ServicePort};
use crate::simulation::Topology;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 50051;
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The headless Service's name, as cluster DNS would serve it.
const SERVICE_NAME: &str = "greeter.default.svc.cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    KubeProxyIptables,
    Ipvs,
    HeadlessDns,
    Nginx,
    Grpclb,
}

impl System {
    pub const ALL: [System; 5] = [
        System::KubeProxyIptables,
        System::Ipvs,
        System::HeadlessDns,
        System::Nginx,
        System::Grpclb,
    ];

    pub fn label(self) -> &'static str {
        match self {
            System::KubeProxyIptables => "kube-proxy iptables",
            System::Ipvs => "kube-proxy IPVS (lc)",
            System::HeadlessDns => "headless DNS + round_robin",
            System::Nginx => "nginx grpc_pass",
            System::Grpclb => "grpclb",
        }
    }

    /// What balances, in one phrase, for the report.
    pub fn how(self) -> &'static str {
        match self {
            System::KubeProxyIptables => {
                "KUBE-SVC/KUBE-SEP chains with `-m statistic --mode random` in each client netns; one connection per client, pod chosen at connect"
            }
            System::Ipvs => "IPVS virtual server with the lc scheduler",
            System::HeadlessDns => {
                "dnsmasq with one A record per pod; grpc-go resolves `dns://` and opens a connection to every pod (round_robin per call)"
            }
            System::Nginx => {
                "nginx in its own pod, `grpc_pass` to an upstream of every pod (round robin per call, upstream keepalive)"
            }
            System::Grpclb => {
                "grpclb-agent on every node (file source, Service annotated grpclb.io/track-frames, load exchange on); connect() to the VIP rewritten to the pod with the fewest connections of the Service cluster-wide; existing connections moved with a GOAWAY at a frame boundary on scale-up and drain"
            }
        }
    }
}

/// A gRPC server pod.
struct Server {
    name: String,
    addr: Ipv4Addr,
    /// Its index in the [`SimCluster`].
    pod: usize,
    process: ChildGuard,
}

/// What runs for a system besides the pods. Fields of [`Cluster`] drop in
/// declaration order, so this goes before the pods and the nodes.
enum Frontend {
    KubeProxy {
        rules_file: PathBuf,
    },
    Dns {
        dnsmasq: ChildGuard,
        hosts_file: PathBuf,
        addr: Ipv4Addr,
    },
    Nginx {
        master: ChildGuard,
        dir: PathBuf,
        addr: Ipv4Addr,
    },
    /// One agent per node, held by the [`SimCluster`], which reads the
    /// Service file the cluster writes.
    Grpclb,
}

/// One simulated cluster (harness [`SimCluster`]: node cgroups, pod netns on
/// one fabric, per-node agents) with one way of reaching its server pods.
/// Drop stops everything: clients, frontend, servers, agents, pod netns,
/// node cgroups.
pub struct Cluster {
    system: System,
    topology: Topology,
    clients: Vec<ChildGuard>,
    client_pods: Vec<Pod>,
    frontend: Frontend,
    servers: Vec<Server>,
    /// Servers sent SIGTERM, draining; killed if still there at the end.
    terminating: Vec<Server>,
    next_server: usize,
    sim: SimCluster,
}

impl Cluster {
    /// The nodes of `topology`, `servers` server pods in service, and
    /// `system`'s frontend; files go to `dir`.
    pub fn new(system: System, topology: Topology, servers: usize, dir: &Path) -> Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut sim = SimCluster::new("compare", topology.nodes, &[])?;
        let mut started = Vec::new();
        for i in 0..servers {
            started.push(start_server(&mut sim, topology, i)?);
        }
        let frontend = start_frontend(system, &mut sim, &started, dir)?;
        Ok(Cluster {
            system,
            topology,
            clients: Vec::new(),
            client_pods: Vec::new(),
            frontend,
            next_server: servers,
            servers: started,
            terminating: Vec::new(),
            sim,
        })
    }

    /// Names of the server pods now in service.
    pub fn in_service(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.name.clone()).collect()
    }

    /// Starts one more server pod (on the next server node), waits until it
    /// is ready and puts it in service. Returns its name.
    pub fn add_server(&mut self) -> Result<String> {
        let server = start_server(&mut self.sim, self.topology, self.next_server)?;
        self.next_server += 1;
        let name = server.name.clone();
        self.servers.push(server);
        self.publish()?;
        Ok(name)
    }

    /// Takes server `name` out of service (as an endpoint removed from the
    /// EndpointSlice); it keeps running until [`Cluster::terminate`].
    pub fn remove_from_service(&mut self, name: &str) -> Result<()> {
        let index = self
            .servers
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no server {name} in service"))?;
        let server = self.servers.remove(index);
        self.terminating.push(server);
        self.publish()
    }

    /// SIGTERM to a server taken out of service: it drains gracefully
    /// (GOAWAY, in-flight calls finish) and exits.
    pub fn terminate(&mut self, name: &str) -> Result<()> {
        let server = self
            .terminating
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("{name} was not taken out of service"))?;
        kill(Pid::from_raw(server.process.pid()), Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to server {name}"))
    }

    /// Creates `count` client pods spread over the client nodes (with
    /// kube-proxy's rules where that is the system) and starts
    /// `command(target)` in each, in its node's cgroup (where grpclb's
    /// programs are attached), `stagger` apart, as pods of a deployment
    /// come up.
    pub fn start_clients(
        &mut self,
        count: usize,
        stagger: Duration,
        command: impl Fn(&str) -> Command,
    ) -> Result<()> {
        let target = self.target();
        for i in 0..count {
            let index = self
                .sim
                .add_pod(self.topology.client_node(i), &format!("client-{i}"))?;
            let (pod, node) = self.sim.placement(index);
            if let Frontend::KubeProxy { rules_file } = &self.frontend {
                kube_proxy::route_service_cidr(pod)?;
                let rules = kube_proxy_rules(&self.servers)?;
                kube_proxy::install(pod, &rules, rules_file)?;
            }
            self.clients.push(spawn(pod, node, command(&target))?);
            self.client_pods.push(pod.clone());
            crate::simulation::sleep(stagger)?;
        }
        Ok(())
    }

    /// The clients started so far; the caller collects their output.
    pub fn take_clients(&mut self) -> Vec<ChildGuard> {
        std::mem::take(&mut self.clients)
    }

    /// The gRPC target clients dial, in grpc-go syntax.
    fn target(&self) -> String {
        match &self.frontend {
            Frontend::KubeProxy { .. } | Frontend::Grpclb => {
                SocketAddr::from((VIP, SERVICE_PORT)).to_string()
            }
            Frontend::Dns { addr, .. } => format!("dns://{addr}:53/{SERVICE_NAME}:{POD_PORT}"),
            Frontend::Nginx { addr, .. } => SocketAddr::from((*addr, SERVICE_PORT)).to_string(),
        }
    }

    /// Whether clients must balance per call over resolved addresses.
    pub fn clients_round_robin(&self) -> bool {
        self.system == System::HeadlessDns
    }

    /// PIDs of the client processes (they must still run).
    pub fn client_pids(&self) -> Vec<i32> {
        self.clients.iter().map(ChildGuard::pid).collect()
    }

    pub fn server_pids(&self) -> Vec<i32> {
        self.servers.iter().map(|s| s.process.pid()).collect()
    }

    /// The processes of the frontend itself (nginx master and workers,
    /// dnsmasq, every node's agent); none for kube-proxy, whose work is the
    /// kernel's.
    pub fn frontend_pids(&self) -> Vec<i32> {
        match &self.frontend {
            Frontend::KubeProxy { .. } => Vec::new(),
            Frontend::Dns { dnsmasq, .. } => vec![dnsmasq.pid()],
            Frontend::Nginx { master, .. } => {
                let mut pids = vec![master.pid()];
                pids.extend(children_of(master.pid()));
                pids
            }
            Frontend::Grpclb => self.sim.agent_pids(),
        }
    }

    /// Tells the frontend which servers are in service now.
    fn publish(&mut self) -> Result<()> {
        match &mut self.frontend {
            Frontend::KubeProxy { rules_file } => {
                let rules = kube_proxy_rules(&self.servers)?;
                for pod in &self.client_pods {
                    kube_proxy::install(pod, &rules, rules_file)?;
                }
                Ok(())
            }
            Frontend::Dns {
                dnsmasq,
                hosts_file,
                ..
            } => {
                write_atomically(hosts_file, &dns_hosts(&addrs(&self.servers)))?;
                // dnsmasq re-reads --addn-hosts files on SIGHUP.
                kill(Pid::from_raw(dnsmasq.pid()), Signal::SIGHUP).context("reloading dnsmasq")
            }
            Frontend::Nginx { master, dir, addr } => {
                write_atomically(
                    &dir.join("nginx.conf"),
                    &nginx_conf(dir, *addr, &addrs(&self.servers)),
                )?;
                // A graceful reload: new workers with the new upstream, old
                // workers finish their requests.
                kill(Pid::from_raw(master.pid()), Signal::SIGHUP).context("reloading nginx")
            }
            // Every agent re-reads the file source as soon as it changes.
            Frontend::Grpclb => self
                .sim
                .write_services(&[grpclb_service(&self.sim, &self.servers)]),
        }
    }
}

/// Server pod `index` (named `pod-<index + 1>`) on its server node, in that
/// node's cgroup, so the node's agent counts and tracks its connections.
fn start_server(sim: &mut SimCluster, topology: Topology, index: usize) -> Result<Server> {
    let name = format!("pod-{}", index + 1);
    let pod = sim.add_pod(topology.server_node(index), &name)?;
    let (p, node) = sim.placement(pod);
    let addr = p.ipv4;
    let mut cmd = Command::new(testpod_bin());
    cmd.args(["grpc-server", "--name", &name, "--listen"])
        .arg(SocketAddr::from((addr, POD_PORT)).to_string());
    let mut process = spawn(p, node, cmd)?;
    process
        .expect_line("ready", READY_TIMEOUT)
        .with_context(|| format!("server {name}"))?;
    Ok(Server {
        name,
        addr,
        pod,
        process,
    })
}

fn start_frontend(
    system: System,
    sim: &mut SimCluster,
    servers: &[Server],
    dir: &Path,
) -> Result<Frontend> {
    match system {
        System::KubeProxyIptables => Ok(Frontend::KubeProxy {
            rules_file: dir.join("kube-proxy-rules.txt"),
        }),
        System::Ipvs => bail!("IPVS is not driven by bench compare"),
        // The DNS server and the proxy are pods of the first node; they run
        // in no node's cgroup, as no agent is attached for these systems.
        System::HeadlessDns => {
            let index = sim.add_pod(0, "dns")?;
            let pod = sim.pod(index).pod.clone();
            let hosts_file = dir.join("dns-hosts");
            write_atomically(&hosts_file, &dns_hosts(&addrs(servers)))?;
            let mut cmd = Command::new("dnsmasq");
            cmd.args(dnsmasq_args(&hosts_file, pod.ipv4));
            let mut dnsmasq = spawn(&pod, None, cmd)?;
            wait_for_port(&mut dnsmasq, &pod, 53, "udp")?;
            Ok(Frontend::Dns {
                dnsmasq,
                hosts_file,
                addr: pod.ipv4,
            })
        }
        System::Nginx => {
            let index = sim.add_pod(0, "nginx")?;
            let pod = sim.pod(index).pod.clone();
            let conf = dir.join("nginx.conf");
            std::fs::create_dir_all(dir.join("nginx-temp"))
                .with_context(|| format!("creating {}", dir.join("nginx-temp").display()))?;
            write_atomically(&conf, &nginx_conf(dir, pod.ipv4, &addrs(servers)))?;
            let mut cmd = Command::new("nginx");
            cmd.arg("-e")
                .arg(dir.join("nginx-error.log"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf);
            let mut master = spawn(&pod, None, cmd)?;
            wait_for_port(&mut master, &pod, SERVICE_PORT, "tcp")?;
            Ok(Frontend::Nginx {
                master,
                dir: dir.to_path_buf(),
                addr: pod.ipv4,
            })
        }
        System::Grpclb => {
            sim.write_services(&[grpclb_service(sim, servers)])?;
            std::fs::copy(sim.services_file(), dir.join("services.yaml"))
                .with_context(|| format!("copying the Service file to {}", dir.display()))?;
            sim.start_agents()?;
            Ok(Frontend::Grpclb)
        }
    }
}

/// Waits until something listens on `port` in `pod` (`ss` from iproute2),
/// failing early if `process` exits.
fn wait_for_port(process: &mut ChildGuard, pod: &Pod, port: u16, protocol: &str) -> Result<()> {
    let flag = if protocol == "udp" { "-uln" } else { "-tln" };
    grpclb_tests::wait_until(
        &format!("{protocol} port {port} to listen in pod {}", pod.name),
        READY_TIMEOUT,
        || {
            if let Some(exit) = process.try_wait() {
                bail!("the process exited ({exit})");
            }
            let output = Command::new("ip")
                .args(["netns", "exec", &pod.netns, "ss", "-H", flag])
                .arg(format!("sport = :{port}"))
                .output()
                .context("running ss")?;
            Ok((!String::from_utf8_lossy(&output.stdout).trim().is_empty()).then_some(()))
        },
    )
}

fn addrs(servers: &[Server]) -> Vec<Ipv4Addr> {
    servers.iter().map(|s| s.addr).collect()
}

fn service(servers: &[Server]) -> ServiceDef {
    ServiceDef::grpc("greeter", VIP, SERVICE_PORT, POD_PORT).backends(addrs(servers))
}

fn kube_proxy_rules(servers: &[Server]) -> Result<String> {
    kube_proxy::restore_rules(&[ServicePort::from(&service(servers))], CLUSTER_CIDR)
}

/// Each endpoint names the node of its pod (EndpointSlice `nodeName`), and
/// the Service opts in to frame tracking, so its connections can be moved.
fn grpclb_service(sim: &SimCluster, servers: &[Server]) -> ServiceDef {
    let pods: Vec<usize> = servers.iter().map(|s| s.pod).collect();
    sim.with_backends(
        ServiceDef::grpc("greeter", VIP, SERVICE_PORT, POD_PORT),
        &pods,
    )
    .tracking_frames()
}

/// PIDs whose parent is `parent` (from /proc/<pid>/stat).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_proc_stat(&s))
                .is_some_and(|s| s.ppid == parent)
        })
        .collect()
}

/// CPU ticks used so far by each of `pids` that still exists.
pub fn cpu_ticks(pids: &[i32]) -> BTreeMap<i32, u64> {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((*pid, parse_proc_stat(&stat)?.cpu_ticks))
        })
        .collect()
}

/// One A record per pod for the headless Service (a hosts file).
pub fn dns_hosts(pods: &[Ipv4Addr]) -> String {
    pods.iter()
        .map(|addr| format!("{addr} {SERVICE_NAME}\n"))
        .collect()
}

/// dnsmasq as an authoritative-only server for `hosts_file`: no upstream,
/// no /etc/hosts, 1 s TTL (Kubernetes DNS answers headless names with
/// short TTLs too), in the foreground, logging to stderr.
pub fn dnsmasq_args(hosts_file: &Path, listen: Ipv4Addr) -> Vec<String> {
    vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--addn-hosts={}", hosts_file.display()),
        format!("--listen-address={listen}"),
        "--bind-interfaces".into(),
        "--port=53".into(),
        "--local-ttl=1".into(),
        "--user=root".into(),
        "--pid-file".into(),
        "--log-facility=-".into(),
    ]
}

/// nginx in the foreground proxying gRPC (h2c) on the proxy pod's port 80
/// (`listen`) to `pods`, round robin per call, with keepalive connections upstream
/// (without them every call would be a new TCP connection to a pod).
pub fn nginx_conf(dir: &Path, listen: Ipv4Addr, pods: &[Ipv4Addr]) -> String {
    let temp = dir.join("nginx-temp");
    let temp = temp.display();
    let mut upstream = String::new();
    for pod in pods {
        let _ = writeln!(upstream, "        server {pod}:{POD_PORT};");
    }
    format!(
        "daemon off;
master_process on;
worker_processes 2;
pid {dir}/nginx.pid;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    upstream pods {{
{upstream}        keepalive 64;
    }}
    server {{
        listen {listen}:{SERVICE_PORT} http2;
        location / {{
            grpc_pass grpc://pods;
        }}
    }}
}}
",
        dir = dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_has_one_a_record_per_pod() {
        let hosts = dns_hosts(&[Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 2)]);
        assert_eq!(
            hosts,
            "10.244.1.1 greeter.default.svc.cluster.local\n10.244.1.2 greeter.default.svc.cluster.local\n"
        );
    }

    #[test]
    fn dnsmasq_serves_only_the_hosts_file_on_the_dns_pod() {
        let args = dnsmasq_args(Path::new("/tmp/x/hosts"), Ipv4Addr::new(10, 244, 0, 53));
        for arg in [
            "--no-resolv",
            "--addn-hosts=/tmp/x/hosts",
            "--listen-address=10.244.0.53",
            "--keep-in-foreground",
        ] {
            assert!(args.iter().any(|a| a == arg), "{arg} missing in {args:?}");
        }
    }

    #[test]
    fn nginx_proxies_grpc_to_every_pod_with_keepalive() {
        let conf = nginx_conf(
            Path::new("/tmp/n"),
            Ipv4Addr::new(10, 244, 0, 80),
            &[Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 7)],
        );
        assert!(conf.contains("        server 10.244.1.1:50051;\n        server 10.244.1.7:50051;\n        keepalive 64;"));
        assert!(conf.contains("listen 10.244.0.80:80 http2;"));
        assert!(conf.contains("grpc_pass grpc://pods;"));
        assert!(conf.contains("pid /tmp/n/nginx.pid;"));
        assert!(conf.starts_with("daemon off;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn every_system_has_a_label_and_a_description() {
        for system in System::ALL {
            assert!(!system.label().is_empty());
            assert!(!system.how().is_empty());
        }
    }
}
