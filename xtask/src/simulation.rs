//! What the demo and the benchmarks share around a simulated cluster:
//! building the binaries, where results go, where pods sit on the nodes,
//! and stopping cleanly on Ctrl-C.
//!
//! Cleanup lives in the harness guards' Drop (cgroup, netns, pins, child
//! processes). A signal would kill this process without running them, so
//! SIGINT/SIGTERM only set a flag: every wait checks it and fails with
//! "interrupted", and the guards run while the error unwinds.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use grpclb_tests::ChildGuard;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde::Serialize;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM make [`check_interrupted`] fail instead of
/// killing the process. Children keep the default action (exec resets it).
fn stop_cleanly_on_signals() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(note_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("installing a {signal} handler"))?;
    }
    Ok(())
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Sleeps `duration` in short steps, failing early when interrupted.
pub fn sleep(duration: Duration) -> Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Waits for `child` to exit (failing after `timeout` or when interrupted,
/// which kills it) and returns its output.
pub fn wait_for_exit(mut child: ChildGuard, what: &str, timeout: Duration) -> Result<Output> {
    let deadline = Instant::now() + timeout;
    while child.try_wait().is_none() {
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.output(Duration::from_secs(5))
}

/// `cargo xtask` runs target/<profile>/xtask; the harness finds the agent
/// and testpod next to it, so they are built into the same directory.
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the xtask executable")?;
    exe.parent()
        .and_then(|profile_dir| profile_dir.parent())
        .map(PathBuf::from)
        .context("xtask is not inside a cargo target directory")
}

/// What every simulated-cluster command does first: checks for root,
/// installs what is missing, arranges a clean stop on Ctrl-C, builds the
/// binaries, and creates `target/<out>/`, which it returns.
pub fn prepare(command: &str, out: &str) -> Result<PathBuf> {
    crate::setup::require_root(command)?;
    crate::setup::ensure_prerequisites()?;
    stop_cleanly_on_signals()?;
    println!("{command}: building the eBPF object, the agent and the test peers");
    build_binaries()?;
    let out_dir = target_dir()?.join(out);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(out_dir)
}

/// The eBPF object, then the agent and the test peer binaries.
fn build_binaries() -> Result<()> {
    crate::build_ebpf::build_ebpf()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec![
        "build",
        "--package",
        "grpclb-agent",
        "--package",
        "grpclb-tests",
        "--bins",
    ];
    // The harness runs the binaries next to this one: a release xtask
    // (`cargo run --release -p xtask -- bench ...`) measures release peers.
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    let status = Command::new(&cargo)
        .args(&args)
        .status()
        .with_context(|| format!("starting {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    check_interrupted()
}

/// The running kernel's release, for the record.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Where the pods of a run sit. One node holds every pod; on more nodes a
/// quarter of them (at least one) host the server pods and the others the
/// clients, one agent per node for grpclb, as in users' clusters where a
/// Service's clients sit on many nodes with one or two connections each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Topology {
    pub nodes: usize,
    pub server_nodes: usize,
}

impl Topology {
    pub fn with_nodes(nodes: usize) -> Result<Topology> {
        match nodes {
            0 => bail!("--nodes: a topology needs at least 1 node, not 0"),
            // One /24 of loopback InternalIPs per simulated cluster.
            n if n > 254 => bail!("--nodes: at most 254 simulated nodes, not {n}"),
            1 => Ok(Topology {
                nodes: 1,
                server_nodes: 1,
            }),
            n => Ok(Topology {
                nodes: n,
                server_nodes: (n / 4).max(1),
            }),
        }
    }

    pub fn client_nodes(self) -> usize {
        if self.nodes == 1 {
            1
        } else {
            self.nodes - self.server_nodes
        }
    }

    /// The node of the `i`-th server pod: round robin over the server nodes.
    pub fn server_node(self, i: usize) -> usize {
        i % self.server_nodes
    }

    /// The node of the `i`-th client pod: round robin over the client nodes.
    pub fn client_node(self, i: usize) -> usize {
        if self.nodes == 1 {
            0
        } else {
            self.server_nodes + i % self.client_nodes()
        }
    }

    /// `1 node`, or `8 nodes (pods on 2, clients on 6)`.
    pub fn describe(self) -> String {
        if self.nodes == 1 {
            "1 node".into()
        } else {
            format!(
                "{} nodes (pods on {}, clients on {})",
                self.nodes,
                self.server_nodes,
                self.client_nodes()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_holds_every_pod() {
        let t = Topology::with_nodes(1).unwrap();
        assert_eq!((t.server_node(3), t.client_node(7)), (0, 0));
        assert_eq!(t.client_nodes(), 1);
        assert_eq!(t.describe(), "1 node");
    }

    #[test]
    fn many_nodes_keep_servers_and_clients_apart_and_spread_both() {
        let t = Topology::with_nodes(8).unwrap();
        assert_eq!((t.server_nodes, t.client_nodes()), (2, 6));
        let servers: Vec<usize> = (0..5).map(|i| t.server_node(i)).collect();
        assert_eq!(servers, [0, 1, 0, 1, 0]);
        let clients: Vec<usize> = (0..8).map(|i| t.client_node(i)).collect();
        assert_eq!(clients, [2, 3, 4, 5, 6, 7, 2, 3]);
        assert_eq!(t.describe(), "8 nodes (pods on 2, clients on 6)");
        let t = Topology::with_nodes(2).unwrap();
        assert_eq!((t.server_node(1), t.client_node(1)), (0, 1));
        assert_eq!(Topology::with_nodes(16).unwrap().server_nodes, 4);
    }

    #[test]
    fn node_counts_outside_what_a_simulated_cluster_holds_are_refused() {
        let zero = Topology::with_nodes(0).unwrap_err().to_string();
        assert!(
            zero.contains("--nodes") && zero.contains("at least 1"),
            "{zero}"
        );
        assert!(Topology::with_nodes(255).is_err());
        assert!(Topology::with_nodes(254).is_ok());
    }
}
