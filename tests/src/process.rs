//! Processes inside a pod's netns and, optionally, a node's cgroup.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Node, Pod};

/// How long [`run_in`] lets a command run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `cmd` inside `pod`'s netns and, with `node`, inside its cgroup, so
/// the sockets it creates go through the node's hooks. Stdout and stderr are
/// piped.
pub fn spawn(pod: &Pod, node: Option<&Node>, mut cmd: Command) -> Result<ChildGuard> {
    let netns_path = format!("/run/netns/{}", pod.netns);
    // Opened before fork: only async-signal-safe calls may run in pre_exec.
    let netns = File::open(&netns_path).with_context(|| format!("opening {netns_path}"))?;
    let cgroup_procs = node
        .map(|n| {
            OpenOptions::new()
                .write(true)
                .open(n.procs_file())
                .with_context(|| format!("opening {}", n.procs_file().display()))
        })
        .transpose()?;
    let netns_fd = netns.as_raw_fd();
    let cgroup_fd = cgroup_procs.as_ref().map(|f| f.as_raw_fd());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure only makes raw syscalls on fds that stay open until
    // spawn returns (both are O_CLOEXEC, so the program does not inherit them).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_fd {
                // "0" moves the writing process, i.e. this child.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {cmd:?} in pod {}", pod.name))?;
    Ok(ChildGuard {
        description: format!("{:?} in pod {}", cmd.get_program(), pod.name),
        child: Some(child),
        stdout_lines: None,
    })
}

/// Runs `cmd` like [`spawn`] and waits for it (at most [`RUN_TIMEOUT`]).
pub fn run_in(pod: &Pod, node: Option<&Node>, cmd: Command) -> Result<Output> {
    spawn(pod, node, cmd)?.output(RUN_TIMEOUT)
}

/// A child process; Drop kills it by PID (SIGKILL) and reaps it.
pub struct ChildGuard {
    description: String,
    child: Option<Child>,
    stdout_lines: Option<Receiver<String>>,
}

impl ChildGuard {
    /// Starts `cmd` as it is (the test's own netns and cgroup, stdio as
    /// `cmd` sets it): a process of the test machine, such as Prometheus.
    pub fn start_here(cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(ChildGuard {
            description: format!("{:?}", cmd.get_program()),
            child: Some(child),
            stdout_lines: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The next line on stdout (without the newline).
    pub fn read_line(&mut self, timeout: Duration) -> Result<String> {
        if self.stdout_lines.is_none() {
            let stdout = self
                .child
                .as_mut()
                .and_then(|c| c.stdout.take())
                .context("stdout is not piped")?;
            let (send, receive) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
            self.stdout_lines = Some(receive);
        }
        let received = self
            .stdout_lines
            .as_ref()
            .expect("set above")
            .recv_timeout(timeout);
        match received {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                bail!("{}: no line on stdout within {timeout:?}", self.description)
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Stdout closes just before the exit becomes visible.
                std::thread::sleep(Duration::from_millis(100));
                let exit = self.try_wait();
                let stderr = self.stderr_so_far();
                bail!(
                    "{}: stdout closed (exit: {exit:?}); stderr: {stderr}",
                    self.description
                )
            }
        }
    }

    /// Waits for a stdout line equal to `want`, failing on other lines.
    pub fn expect_line(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let line = self.read_line(timeout)?;
        if line != want {
            bail!(
                "{}: expected {want:?} on stdout, got {line:?}",
                self.description
            );
        }
        Ok(())
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits at most `timeout` for exit and collects the remaining output;
    /// kills the child and fails on timeout.
    pub fn output(mut self, timeout: Duration) -> Result<Output> {
        let mut child = self.child.take().context("child already reaped")?;
        let stdout = child.stdout.take().map(read_all_in_thread);
        let stderr = child.stderr.take().map(read_all_in_thread);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for child")? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = stderr.map(join_bytes).unwrap_or_default();
                bail!(
                    "{} did not finish within {timeout:?}; stderr: {}",
                    self.description,
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Output {
            status,
            stdout: stdout.map(join_bytes).unwrap_or_default(),
            stderr: stderr.map(join_bytes).unwrap_or_default(),
        })
    }

    /// What an exited child wrote to stderr (for diagnostics).
    pub fn stderr_so_far(&mut self) -> String {
        let Some(child) = self.child.as_mut() else {
            return String::new();
        };
        if child.try_wait().ok().flatten().is_none() {
            return "(still running)".into();
        }
        let mut text = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

fn read_all_in_thread(mut source: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = source.read_to_end(&mut bytes);
        bytes
    })
}

fn join_bytes(reader: JoinHandle<Vec<u8>>) -> Vec<u8> {
    reader.join().unwrap_or_default()
}
