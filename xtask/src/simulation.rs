//! What the demo and the benchmarks share around a simulated cluster:
//! building the binaries, where results go, and stopping cleanly on Ctrl-C.
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
