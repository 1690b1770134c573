//! kube-proxy's iptables mode, reproduced: the rules it writes for ClusterIP
//! Services, as `iptables-restore` input, and installing them in a pod netns.
//!
//! The text follows kube-proxy's `pkg/proxy/iptables/proxier.go` (1.28+):
//! `KUBE-SERVICES` holds one rule per Service port, jumping to
//! `KUBE-SVC-<hash>`, which picks an endpoint with a cascade of
//! `-m statistic --mode random --probability 1/(n-i)` rules, each jumping to a
//! `KUBE-SEP-<hash>` chain that DNATs to the pod. A Service port without
//! endpoints gets a REJECT rule in the filter table instead. Chain names are
//! the same hashes kube-proxy computes, so the rules look exactly like a
//! node's `iptables-save`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use grpclb_tests::{run_in, Pod, ServiceDef};

/// One TCP port of a ClusterIP Service and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The Service port's name; empty for an unnamed port.
    pub port_name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
}

impl ServicePort {
    /// `namespace/name:port_name`, kube-proxy's `ServicePortName.String()`.
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

impl From<&ServiceDef> for ServicePort {
    /// The Service port of a harness Service definition, with its ready
    /// endpoints (kube-proxy only routes to those).
    fn from(service: &ServiceDef) -> ServicePort {
        ServicePort {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port_name: service.port_name.clone(),
            cluster_ip: service.cluster_ip,
            port: service.port,
            endpoints: service
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .map(|e| SocketAddr::new(e.addr, service.endpoint_port))
                .collect(),
        }
    }
}

/// The first 16 characters of base32(sha256(`input`)), as kube-proxy's
/// `portProtoHash` names chains.
fn chain_hash(input: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
    let mut encoded = base32(digest.as_ref());
    encoded.truncate(16);
    encoded
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in bytes.chunks(5) {
        let mut block = [0u8; 5];
        block[..chunk.len()].copy_from_slice(chunk);
        let bits = block.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let symbols = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < symbols {
                let index = (bits >> (35 - 5 * i)) & 0x1f;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `KUBE-SVC-…` for a Service port (protocol lowercase, e.g. `tcp`).
pub fn service_chain(port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{port_name}{protocol}")))
}

/// `KUBE-SEP-…` for one endpoint (`ip:port`) of a Service port.
pub fn endpoint_chain(port_name: &str, protocol: &str, endpoint: SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{port_name}{protocol}{endpoint}"))
    )
}

/// kube-proxy's `probability(n)`: `1/n` with ten decimals.
fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

/// The `iptables-restore` input (filter and nat tables) kube-proxy writes for
/// `services` on a node whose pods live in `cluster_cidr`, including the
/// jumps from the built-in OUTPUT chains (kube-proxy adds those with
/// `iptables -I`; here they are part of the restore, which replaces both
/// tables). All addresses must be of one family: for IPv4 feed the result to
/// `iptables-restore`, for IPv6 to `ip6tables-restore`.
pub fn restore_rules(services: &[ServicePort], cluster_cidr: &str) -> Result<String> {
    let family_is_v4 = services.first().is_none_or(|s| s.cluster_ip.is_ipv4());
    for service in services {
        let mixed = service.cluster_ip.is_ipv4() != family_is_v4
            || service
                .endpoints
                .iter()
                .any(|e| e.is_ipv4() != family_is_v4);
        if mixed {
            bail!(
                "{}: iptables and ip6tables are separate; give IPv4 and IPv6 Services separately",
                service.port_name_string()
            );
        }
    }

    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    for service in services {
        let name = service.port_name_string();
        let vip = &service.cluster_ip;
        let port = service.port;
        if service.endpoints.is_empty() {
            let reject_with = if family_is_v4 {
                "icmp-port-unreachable"
            } else {
                "icmp6-port-unreachable"
            };
            writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m tcp -p tcp -d {vip} --dport {port} -j REJECT --reject-with {reject_with}"
            )?;
            continue;
        }
        let svc_chain = service_chain(&name, "tcp");
        writeln!(nat_chains, ":{svc_chain} - [0:0]")?;
        writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport {port} -j {svc_chain}"
        )?;
        writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
        )?;
        let n = service.endpoints.len();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let sep_chain = endpoint_chain(&name, "tcp", *endpoint);
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            writeln!(
                nat_rules,
                "-A {svc_chain} -m comment --comment \"{name} -> {endpoint}\"{statistic} -j {sep_chain}"
            )?;
        }
        for endpoint in &service.endpoints {
            let sep_chain = endpoint_chain(&name, "tcp", *endpoint);
            writeln!(nat_chains, ":{sep_chain} - [0:0]")?;
            writeln!(
                nat_rules,
                "-A {sep_chain} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                endpoint.ip()
            )?;
            writeln!(
                nat_rules,
                "-A {sep_chain} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {endpoint}"
            )?;
        }
    }

    let mut out = String::new();
    out.push_str("*filter\n:KUBE-SERVICES - [0:0]\n");
    out.push_str("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    out.push_str(&nat_chains);
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    out.push_str(&nat_rules);
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str("COMMIT\n");
    Ok(out)
}

/// The Service CIDR of the simulated clusters.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Routes the Service CIDR into the pod's fabric link: kube-proxy's DNAT is
/// reached only if the VIP is routable at all (locally generated packets are
/// routed before nat OUTPUT). A VIP left untranslated ends in the fabric.
pub fn route_service_cidr(pod: &Pod) -> Result<()> {
    grpclb_tests::netns::ip(&[
        "-n",
        &pod.netns,
        "route",
        "add",
        SERVICE_CIDR,
        "dev",
        "eth0",
    ])
}

/// Replaces the filter and nat tables of `pod`'s netns with `rules`
/// (`iptables-restore` input written to `rules_file` first, so it can be
/// looked at afterwards). The rules go away with the netns.
pub fn install(pod: &Pod, rules: &str, rules_file: &Path) -> Result<()> {
    std::fs::write(rules_file, rules)
        .with_context(|| format!("writing {}", rules_file.display()))?;
    let mut restore = Command::new("iptables-restore");
    restore.arg(rules_file);
    let output = run_in(pod, None, restore)
        .with_context(|| format!("running iptables-restore in pod {}", pod.name))?;
    if !output.status.success() {
        bail!(
            "iptables-restore {} in pod {} failed ({}): {}",
            rules_file.display(),
            pod.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn svc1(endpoints: &[&str]) -> ServicePort {
        ServicePort {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            cluster_ip: IpAddr::V4(Ipv4Addr::new(172, 30, 0, 41)),
            port: 80,
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY======");
        assert_eq!(base32(b"fo"), "MZXQ====");
        assert_eq!(base32(b"foo"), "MZXW6===");
        assert_eq!(base32(b"foob"), "MZXW6YQ=");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
    }

    #[test]
    fn chain_names_are_the_ones_kube_proxy_computes() {
        // From kube-proxy's own test data.
        assert_eq!(
            service_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80".parse().unwrap()),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn unnamed_port_has_no_colon() {
        let mut port = svc1(&[]);
        port.port_name.clear();
        assert_eq!(port.port_name_string(), "ns1/svc1");
    }

    #[test]
    fn single_endpoint_service_matches_kube_proxy_output() {
        let rules = restore_rules(&[svc1(&["10.180.0.1:80"])], "10.0.0.0/24").unwrap();
        for line in [
            ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
            ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]",
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/24 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
        ] {
            assert!(
                rules.lines().any(|l| l == line),
                "missing {line}\nin:\n{rules}"
            );
        }
        assert!(!rules.contains("statistic"));
    }

    #[test]
    fn endpoints_are_chosen_by_a_cascade_of_1_over_remaining() {
        let rules = restore_rules(
            &[svc1(&["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"])],
            "10.0.0.0/24",
        )
        .unwrap();
        let jumps: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j KUBE-SEP-"))
            .collect();
        assert_eq!(jumps.len(), 3);
        assert!(jumps[0].contains(
            "-> 10.180.0.1:80\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-"
        ));
        assert!(jumps[1].contains(
            "-> 10.180.0.2:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"
        ));
        assert!(!jumps[2].contains("statistic"));
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 3);
    }

    #[test]
    fn nodeports_rule_comes_last_and_every_table_commits() {
        let rules = restore_rules(&[svc1(&["10.180.0.1:80"])], "10.0.0.0/24").unwrap();
        let nat: Vec<&str> = rules.split("*nat\n").nth(1).unwrap().lines().collect();
        let last_services_rule = nat
            .iter()
            .rev()
            .find(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last_services_rule.ends_with("-j KUBE-NODEPORTS"));
        assert_eq!(rules.matches("COMMIT\n").count(), 2);
        assert!(rules.starts_with("*filter\n"));
    }

    #[test]
    fn every_jump_target_is_a_declared_chain() {
        let rules = restore_rules(
            &[
                svc1(&["10.180.0.1:80", "10.180.0.2:80"]),
                ServicePort {
                    name: "svc2".into(),
                    cluster_ip: IpAddr::V4(Ipv4Addr::new(172, 30, 0, 42)),
                    ..svc1(&["10.180.0.3:8080"])
                },
            ],
            "10.0.0.0/24",
        )
        .unwrap();
        let builtin = [
            "KUBE-SERVICES",
            "MARK",
            "RETURN",
            "MASQUERADE",
            "DNAT",
            "REJECT",
        ];
        for line in rules.lines().filter(|l| l.starts_with("-A ")) {
            let target = line
                .split(" -j ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            let declared = rules.lines().any(|l| l == format!(":{target} - [0:0]"));
            assert!(
                declared || builtin.contains(&target),
                "{line} jumps to undeclared {target}"
            );
        }
    }

    #[test]
    fn service_without_endpoints_is_rejected_in_the_filter_table() {
        let rules = restore_rules(&[svc1(&[])], "10.0.0.0/24").unwrap();
        let filter = rules.split("*nat\n").next().unwrap();
        assert!(filter.contains(
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT --reject-with icmp-port-unreachable"
        ));
        assert!(!rules.contains("KUBE-SVC-"));
    }

    #[test]
    fn ipv6_services_use_ipv6_addresses_and_rejects() {
        let mut port = svc1(&["[fd00::5]:80"]);
        port.cluster_ip = "fd00:96::1".parse().unwrap();
        let rules = restore_rules(&[port.clone()], "fd00::/64").unwrap();
        assert!(rules.contains("-d fd00:96::1 --dport 80"));
        assert!(rules.contains("--to-destination [fd00::5]:80"));
        port.endpoints.clear();
        let rules = restore_rules(&[port], "fd00::/64").unwrap();
        assert!(rules.contains("--reject-with icmp6-port-unreachable"));
    }

    #[test]
    fn mixed_families_are_refused() {
        let mut port = svc1(&["[fd00::5]:80"]);
        port.port = 81;
        let error = restore_rules(&[port], "10.0.0.0/24").unwrap_err();
        assert!(error.to_string().contains("ns1/svc1:p80"));
    }
}
