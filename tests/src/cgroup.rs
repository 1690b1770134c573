//! Test "nodes": one fresh cgroup v2 directory each, where the agent attaches
//! its programs and where client processes run. Never the root cgroup.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{require_root, unique_suffix, wait_until};

/// A cgroup v2 directory `grpclb-test-<name>-<pid>-<n>` under the cgroup2
/// root. Drop kills what still runs in it (only processes the test started
/// there) and removes it.
#[derive(Debug)]
pub struct Node {
    name: String,
    path: PathBuf,
}

impl Node {
    pub fn new(name: &str) -> Result<Node> {
        require_root()?;
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        let root = cgroup2_mount(&mountinfo).context("no cgroup2 mount in /proc/self/mountinfo")?;
        let path = root.join(format!("grpclb-test-{name}-{}", unique_suffix()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Node {
            name: name.to_string(),
            path,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// PIDs currently in this cgroup.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let procs = fs::read_to_string(self.procs_file())
            .with_context(|| format!("reading {}", self.procs_file().display()))?;
        procs
            .lines()
            .map(|l| {
                l.trim()
                    .parse::<i32>()
                    .with_context(|| format!("bad pid {l:?}"))
            })
            .collect()
    }

    fn remove(&self) -> Result<()> {
        for pid in self.pids()? {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        wait_until(
            "the node cgroup to empty and go away",
            Duration::from_secs(5),
            || match fs::remove_dir(&self.path) {
                Ok(()) => Ok(Some(())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(())),
                Err(e) => bail!("removing {}: {e}", self.path.display()),
            },
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("cleanup of node cgroup {}: {e:#}", self.path.display());
        }
    }
}

/// The mount point of the cgroup2 filesystem in a `/proc/self/mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Fields: id parent major:minor root mount-point ...
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_others() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        let mountinfo = "42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(mountinfo), None);
    }
}
