//! The agent binary under test, its bpffs pin directory, and the paths of
//! the binaries the tests run.

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{require_root, wait_until, Node};

/// How long [`Agent::start`] waits for the agent to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `grpclb-agent` next to the running test binary (`target/<profile>/`).
pub fn agent_bin() -> PathBuf {
    sibling_binary("grpclb-agent")
}

/// `testpod` next to the running test binary (`target/<profile>/`).
pub fn testpod_bin() -> PathBuf {
    sibling_binary("testpod")
}

pub(crate) fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    let mut dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    // Test binaries live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Fails with a clear message if `path` (a workspace binary) was not built.
pub fn require_binary(path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let package = if name == "testpod" {
        "grpclb-tests"
    } else {
        "grpclb-agent"
    };
    bail!(
        "{} is missing: run `cargo build -p {package}` first (`cargo xtask test` does)",
        path.display()
    )
}

/// A private bpf filesystem for one test's pins, mounted on a temporary
/// directory (the machine's /sys/fs/bpf may not even be mounted, and is left
/// alone). The agent pins under `<mount>/grpclb`. Drop runs `grpclb-agent
/// uninstall` (detaching the programs), then unmounts, which releases any
/// pin uninstall missed.
#[derive(Debug)]
pub struct BpffsDir {
    mount: tempfile::TempDir,
    path: PathBuf,
}

impl BpffsDir {
    pub fn new() -> Result<BpffsDir> {
        require_root()?;
        let mount = tempfile::Builder::new()
            .prefix("grpclb-test-bpffs-")
            .tempdir()
            .context("creating a mount point for a test bpffs")?;
        nix::mount::mount(
            Some("bpf"),
            mount.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a bpf filesystem on {}", mount.path().display()))?;
        let path = mount.path().join("grpclb");
        Ok(BpffsDir { mount, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if agent_bin().is_file() && self.path.exists() {
            if let Err(e) = uninstall(&self.path) {
                eprintln!("cleanup of {}: {e:#}", self.path.display());
            }
        }
        if let Err(e) = nix::mount::umount2(self.mount.path(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.mount.path().display());
        }
    }
}

/// `grpclb-agent uninstall --bpffs DIR`.
pub fn uninstall(bpffs: &Path) -> Result<()> {
    let output = Command::new(agent_bin())
        .arg("uninstall")
        .arg("--bpffs")
        .arg(bpffs)
        .output()
        .context("running grpclb-agent uninstall")?;
    if !output.status.success() {
        bail!(
            "grpclb-agent uninstall --bpffs {} failed ({}): {}",
            bpffs.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `grpclb-agent status --bpffs DIR`: its stdout, or an error with stderr
/// unless it exits 0 (the agent is ready).
pub fn status(bpffs: &Path) -> Result<String> {
    ready_status(status_run(bpffs, &[])?)
}

/// What one `grpclb-agent status` run printed, and its exit code.
#[derive(Debug)]
pub struct StatusRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// `grpclb-agent status --bpffs DIR ARGS…`, whatever its exit code.
pub fn status_run(bpffs: &Path, args: &[&str]) -> Result<StatusRun> {
    let output = Command::new(agent_bin())
        .arg("status")
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .output()
        .context("running grpclb-agent status")?;
    Ok(StatusRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

fn ready_status(run: StatusRun) -> Result<String> {
    if run.code != Some(0) {
        bail!(
            "grpclb-agent status exited with {:?}: {}\n{}",
            run.code,
            run.stderr.trim(),
            run.stdout
        );
    }
    Ok(run.stdout)
}

/// A minimal HTTP/1.0 GET on the agent's metrics address (loopback of the
/// test's own namespace): status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

/// A running `grpclb-agent run` for one node, reading a Service file. Its
/// stdout and stderr go to a log file ([`Agent::log`]). Drop kills it by PID
/// and uninstalls its pins.
pub struct Agent {
    child: Option<Child>,
    bpffs: PathBuf,
    log: tempfile::NamedTempFile,
    uninstall_on_drop: bool,
}

impl Agent {
    /// Starts the agent on a Service file and waits until it is ready.
    pub fn start(node: &Node, bpffs: &Path, source_yaml: &Path) -> Result<Agent> {
        let source = format!("--source=file:{}", source_yaml.display());
        Self::start_with_source(node, bpffs, &[OsString::from(source)])
    }

    /// Starts the agent with `source_args` (e.g. `--source=kube
    /// --kubeconfig PATH`, or further `run` flags) and waits until it is
    /// ready: its programs are attached and the maps hold the source's whole
    /// first state, so a connect made right after this returns is balanced.
    pub fn start_with_source(node: &Node, bpffs: &Path, source_args: &[OsString]) -> Result<Agent> {
        let mut agent = Self::spawn(node, bpffs, source_args)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn(node: &Node, bpffs: &Path, source_args: &[OsString]) -> Result<Agent> {
        Self::spawn_binary(&agent_bin(), node, bpffs, source_args)
    }

    /// [`Agent::spawn`] with another build of the agent (the benches
    /// measure the release build from a debug xtask).
    pub fn spawn_binary(
        binary: &Path,
        node: &Node,
        bpffs: &Path,
        source_args: &[OsString],
    ) -> Result<Agent> {
        require_binary(binary)?;
        let log = tempfile::NamedTempFile::new().context("creating the agent log file")?;
        let stdout = File::options()
            .append(true)
            .open(log.path())
            .context("opening the agent log")?;
        let stderr = stdout.try_clone().context("cloning the agent log handle")?;
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--cgroup")
            .arg(node.path())
            .arg("--bpffs")
            .arg(bpffs)
            .arg("--node-name")
            .arg(node.name())
            .args(source_args)
            // Agents of parallel tests must not compete for the default port.
            .arg("--metrics-addr=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().context("starting grpclb-agent run")?;
        Ok(Agent {
            child: Some(child),
            bpffs: bpffs.to_path_buf(),
            log,
            uninstall_on_drop: true,
        })
    }

    /// Waits until this agent answers 200 on `/readyz`: its programs are
    /// attached and the maps hold the whole desired state. The one readiness
    /// wait of the tests, the demo and the benches.
    pub fn wait_ready(&mut self) -> Result<()> {
        self.wait_readiness("the agent to be ready", |not_ready| {
            not_ready.is_none().then_some(())
        })
    }

    /// Waits until this agent's `/readyz` says it is not ready for a reason
    /// containing `text`; returns the reason.
    pub fn wait_not_ready(&mut self, text: &str) -> Result<String> {
        self.wait_readiness(&format!("the agent to be not ready: {text}"), |not_ready| {
            not_ready
                .filter(|reason| reason.contains(text))
                .map(str::to_string)
        })
    }

    /// Waits until this agent's readiness (`None`: ready, else why not)
    /// passes `check`; fails early if the agent exits. Asks `/readyz` (no map
    /// reads, so a poll sees a change within milliseconds) on the metrics
    /// address this process logged, so never an earlier agent's answer.
    fn wait_readiness<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(Option<&str>) -> Option<T>,
    ) -> Result<T> {
        let mut last = String::new();
        wait_until(what, START_TIMEOUT, || {
            if let Some(exit) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("grpclb-agent exited ({exit}); its log:\n{}", self.log());
            }
            let Some(addr) = self.logged_metrics_addr() else {
                return Ok(None);
            };
            let Ok((code, body)) = http_get(addr, "/readyz") else {
                return Ok(None);
            };
            let body = body.trim_end();
            last = format!("{code} {body}");
            Ok(match code {
                200 => check(None),
                _ => check(Some(body.strip_prefix("not ready: ").unwrap_or(body))),
            })
        })
        .with_context(|| format!("/readyz answered {last:?}; the agent log:\n{}", self.log()))
    }

    /// The metrics address the agent logged once it bound it.
    pub fn metrics_addr(&mut self) -> Result<SocketAddr> {
        wait_until(
            "the agent to log its metrics address",
            START_TIMEOUT,
            || {
                if let Some(exit) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    bail!("grpclb-agent exited ({exit}); its log:\n{}", self.log());
                }
                Ok(self.logged_metrics_addr())
            },
        )
    }

    /// How the agent exited, if it did.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The metrics address, if the agent has logged it yet.
    pub fn logged_metrics_addr(&self) -> Option<SocketAddr> {
        self.log().lines().find_map(|line| {
            let rest = line.split("metrics on http://").nth(1)?;
            rest.split('/').next()?.parse().ok()
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn status(&self) -> Result<String> {
        status(&self.bpffs)
    }

    /// `status --output json` (docs/status.md), ready or not yet (exit 0
    /// or 1).
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let run = status_run(&self.bpffs, &["--output", "json"])?;
        if !matches!(run.code, Some(0 | 1)) {
            bail!("grpclb-agent status --output json failed: {run:?}");
        }
        serde_json::from_str(&run.stdout)
            .with_context(|| format!("parsing the output of status --output json: {run:?}"))
    }

    /// `status ARGS…` asking this agent (for each frontend's rule and
    /// endpoint count and the Services it leaves alone); its stdout, or an
    /// error unless it exits 0.
    pub fn status_with_rules(&mut self, args: &[&str]) -> Result<String> {
        ready_status(self.status_run(args)?)
    }

    /// `status ARGS…` asking this agent, whatever its exit code.
    pub fn status_run(&mut self, args: &[&str]) -> Result<StatusRun> {
        let addr = format!("--metrics-addr={}", self.metrics_addr()?);
        let mut all = vec![addr.as_str()];
        all.extend_from_slice(args);
        status_run(&self.bpffs, &all)
    }

    /// SIGKILL, as a crash would: the pins (and so the attached programs and
    /// the maps) stay for the next agent to adopt.
    pub fn kill9(mut self) -> Result<()> {
        self.uninstall_on_drop = false;
        let mut child = self.child.take().context("agent already stopped")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).context("killing the agent")?;
        child.wait().context("reaping the agent")?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
        if self.uninstall_on_drop {
            if let Err(e) = uninstall(&self.bpffs) {
                eprintln!("agent cleanup: {e:#}");
            }
        }
    }
}
