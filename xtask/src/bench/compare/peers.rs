//! The real peers `bench compare` runs against: installed from Debian when
//! missing, the Go load client built from xtask/peers/, versions recorded,
//! and whether IPVS exists on this kernel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// grpc-go 1.33 and Go 1.19 build the load client offline (GOPATH mode);
/// dnsmasq is the headless Service's DNS server; nginx the L7 proxy.
const PACKAGES: &[&str] = &[
    "golang-go",
    "golang-google-grpc-dev",
    "dnsmasq-base",
    "nginx-light",
];
/// Where Debian's Go packages keep their sources.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

pub fn install() -> Result<()> {
    crate::setup::ensure_apt_packages(PACKAGES)
}

/// Builds xtask/peers/grpc-rate-client into `out_dir` (Go caches the
/// build, so a second run takes a second) and returns the binary.
pub fn build_load_client(out_dir: &Path) -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/grpc-rate-client");
    let binary = out_dir.join("grpc-rate-client");
    let go = out_dir.join("go");
    let output = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(".")
        .current_dir(&source)
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:{DEBIAN_GOPATH}", go.join("path").display()),
        )
        .env("GOCACHE", go.join("cache"))
        .output()
        .context("running go build (package golang-go)")?;
    if !output.status.success() {
        bail!(
            "go build of {} failed ({}): {}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(binary)
}

/// Versions of everything the comparison ran, for the record.
pub fn versions(load_client: &Path) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    let mut record = |name: &str, version: Option<String>| {
        versions.insert(
            name.to_string(),
            version.unwrap_or_else(|| "unknown".into()),
        );
    };
    record(
        "grpc-go (load client)",
        first_line(Command::new(load_client).arg("--version")),
    );
    record("go", first_line(Command::new("go").arg("version")));
    record(
        "dnsmasq",
        first_line(Command::new("dnsmasq").arg("--version")),
    );
    record("nginx", first_line(Command::new("nginx").arg("-v")));
    record(
        "iptables",
        first_line(Command::new("iptables").arg("--version")),
    );
    record("tonic (server pods)", locked_version("tonic"));
    record(
        "grpclb",
        Some(format!(
            "{} ({})",
            env!("CARGO_PKG_VERSION"),
            first_line(
                Command::new("git")
                    .args(["describe", "--always", "--dirty"])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
            )
            .unwrap_or_else(|| "no git".into())
        )),
    );
    versions
}

/// The first non-empty line a command prints (stdout, else stderr: nginx
/// prints its version there).
fn first_line(cmd: &mut Command) -> Option<String> {
    let output = cmd.output().ok()?;
    if !output.status.success() {
        return None;
    }
    [output.stdout, output.stderr]
        .iter()
        .flat_map(|bytes| {
            String::from_utf8_lossy(bytes)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// The version of `package` in the workspace's Cargo.lock.
fn locked_version(package: &str) -> Option<String> {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let text = std::fs::read_to_string(lock).ok()?;
    version_in_lock(&text, package)
}

fn version_in_lock(lock: &str, package: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{package}\"") {
            let version = lines.next()?.strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_string());
        }
    }
    None
}

/// Why IPVS cannot be measured here, or `None` when the kernel has it.
/// `proc_net_ip_vs`: whether /proc/net/ip_vs exists (the loaded module
/// creates it); `kernel_config`: /proc/config.gz unpacked, when readable.
pub fn ipvs_unavailable_reason(
    proc_net_ip_vs: bool,
    kernel_config: Option<&str>,
    kernel: &str,
) -> Option<String> {
    if proc_net_ip_vs {
        return None;
    }
    let setting = kernel_config.and_then(|config| {
        config.lines().find_map(|l| {
            if l == "# CONFIG_IP_VS is not set" {
                Some("not set")
            } else {
                l.strip_prefix("CONFIG_IP_VS=")
            }
        })
    });
    Some(match setting {
        Some("not set") => format!(
            "kernel {kernel} is built without IPVS (CONFIG_IP_VS is not set in /proc/config.gz), so kube-proxy's IPVS mode cannot run here"
        ),
        Some("m") => format!(
            "IPVS is a module in kernel {kernel} but is not loaded (/proc/net/ip_vs is missing); load it with `modprobe ip_vs` and install ipvsadm"
        ),
        _ => format!(
            "/proc/net/ip_vs is missing: kernel {kernel} has no IPVS loaded"
        ),
    })
}

/// [`ipvs_unavailable_reason`] for this machine. IPVS that is present is
/// still reported as not measured: this comparison does not drive ipvsadm.
pub fn ipvs_status(kernel: &str) -> String {
    let config = Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    ipvs_unavailable_reason(
        Path::new("/proc/net/ip_vs").exists(),
        config.as_deref(),
        kernel,
    )
    .unwrap_or_else(|| {
        "IPVS is available in this kernel, but `bench compare` does not drive ipvsadm".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipvs_reason_names_the_kernel_setting() {
        let unset = ipvs_unavailable_reason(false, Some("A=y\n# CONFIG_IP_VS is not set\n"), "6.1");
        assert!(unset.unwrap().contains("CONFIG_IP_VS is not set"));
        let module = ipvs_unavailable_reason(false, Some("CONFIG_IP_VS=m\n"), "6.1");
        assert!(module.unwrap().contains("modprobe ip_vs"));
        let unknown = ipvs_unavailable_reason(false, None, "6.1");
        assert!(unknown.unwrap().contains("/proc/net/ip_vs is missing"));
        assert_eq!(ipvs_unavailable_reason(true, None, "6.1"), None);
    }

    #[test]
    fn finds_a_package_version_in_a_lock_file() {
        let lock = "[[package]]\nname = \"tokio\"\nversion = \"1.48.0\"\n\n[[package]]\nname = \"tonic\"\nversion = \"0.14.2\"\n";
        assert_eq!(version_in_lock(lock, "tonic"), Some("0.14.2".into()));
        assert_eq!(version_in_lock(lock, "ton"), None);
    }
}
