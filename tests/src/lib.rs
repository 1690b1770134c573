//! Real-kernel test harness: cgroup "nodes", netns "pods" on a bridge in a
//! fabric netns, and guards that clean up on failure too.
//!
//! Every name this harness creates (cgroup, netns, bpffs dir) carries the pid
//! and a per-process counter, so tests can run in parallel threads and
//! processes without sharing anything.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod foreign_sockmap;
pub mod grpc_stream;
pub mod h2script;
pub mod multinode;
pub mod netns;
pub mod peers;
pub mod process;
pub mod prometheus;
pub mod report;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// The workspace root (the tests crate's parent), for the tests and xtask.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

pub use agent::{agent_bin, http_get, status_run, testpod_bin, Agent, BpffsDir, StatusRun};
pub use cgroup::Node;
pub use cluster::{
    service_documents_yaml, service_yaml, service_yaml_with_nodes, write_atomically, EndpointDef,
    ServiceDef, TargetPort,
};
pub use multinode::{SimCluster, SimPod, Spread};
pub use netns::{Fabric, Pod};
pub use process::{run_in, spawn, ChildGuard};
pub use report::{
    ChurnKind, ChurnReport, ConnectAttempt, ConnectReport, DownloadReport, LoadReport,
    ScriptReadReport, ScriptWriteReport,
};

/// Fails with a clear message unless running as root: these tests create
/// cgroups, network namespaces and eBPF programs.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        bail!(
            "the grpclb real-kernel tests need root (cgroups, netns, eBPF); \
             run them as root, e.g. `sudo -E cargo xtask test`"
        )
    }
}

/// `<pid>-<n>`, unique within this machine while this process lives.
pub(crate) fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout`
/// with `what` and the last error `check` returned.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
