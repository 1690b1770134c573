//! Test "pods": network namespaces joined by veth to a bridge that lives in
//! its own "fabric" namespace. The bridge has no address and no namespace has
//! a route out, so nothing reaches the root namespace and a VIP that is not
//! rewritten goes nowhere (ENETUNREACH).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::{require_root, unique_suffix};

/// A fabric netns with bridge `br0`. Drop deletes every netns it created.
#[derive(Debug)]
pub struct Fabric {
    netns: String,
    /// Pod netns names, in creation order; index = veth number in the fabric.
    pods: Mutex<Vec<String>>,
}

/// A network namespace on a fabric: `eth0` with `ipv4`/16 and `ipv6`/64, `lo`
/// up, no default route. Owned by its [`Fabric`].
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
}

impl Fabric {
    pub fn new(name: &str) -> Result<Fabric> {
        require_root()?;
        let netns = format!("grpclb-test-{name}-{}", unique_suffix());
        add_netns(&netns)?;
        let fabric = Fabric {
            netns,
            pods: Mutex::new(Vec::new()),
        };
        ip(&["-n", &fabric.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &fabric.netns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &fabric.netns, "link", "set", "br0", "up"])?;
        Ok(fabric)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn add_pod(&self, name: &str, ipv4: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> Result<Pod> {
        let netns = format!("{}-{name}", self.netns);
        // The veth's fabric end only needs a name unique inside the fabric
        // netns, which keeps it within the 15-byte interface name limit.
        let fabric_end = {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            add_netns(&netns)?;
            pods.push(netns.clone());
            format!("p{}", pods.len() - 1)
        };
        ip(&[
            "-n",
            &self.netns,
            "link",
            "add",
            &fabric_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &self.netns,
            "link",
            "set",
            &fabric_end,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ipv4}/16"),
            "dev",
            "eth0",
        ])?;
        if let Some(v6) = ipv6 {
            // nodad: usable at once instead of after duplicate detection.
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        Ok(Pod {
            name: name.to_string(),
            netns,
            ipv4,
            ipv6,
        })
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        let pods = std::mem::take(self.pods.get_mut().unwrap_or_else(|e| e.into_inner()));
        for netns in pods.iter().chain(std::iter::once(&self.netns)) {
            if let Err(e) = ip(&["netns", "del", netns]) {
                eprintln!("cleanup of netns {netns}: {e:#}");
            }
        }
    }
}

fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

/// Runs `ip ARGS` (iproute2), failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2 must be installed)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl Pod {
    /// Receive packet steering on `eth0` over every CPU: packets for this
    /// pod are processed on any CPU, in softirq, concurrently with the
    /// threads that own their sockets, as a multi-queue NIC does, instead of
    /// synchronously in the sender's context as veth otherwise does.
    pub fn spread_receive_over_cpus(&self) -> Result<()> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(32));
        let mask = format!("{:x}", (1u64 << cpus) - 1);
        // sysfs shows the netns of the process that mounts it: `ip netns
        // exec` mounts one for the pod.
        let script = format!("echo {mask} > /sys/class/net/eth0/queues/rx-0/rps_cpus");
        ip(&["netns", "exec", &self.netns, "sh", "-c", &script])
            .with_context(|| format!("enabling RPS in pod {}", self.name))
    }
}
