//! Writing a GOAWAY into a server-side connection of a local pod.
//!
//! The agent takes a duplicate of the pod's socket (`pidfd_getfd`, which needs
//! the pod's processes in the agent's PID namespace and CAP_SYS_PTRACE),
//! announces the write in `INJECTIONS`, puts the socket in `INJECTION_GATE`
//! (whose sk_msg program judges the write), sends the 17 bytes without
//! blocking, and takes the socket out again. The gate passes the bytes only at
//! a verified frame boundary; anything else fails the send with EACCES and
//! leaves the stream untouched (docs/rebalancing.md).
//!
//! The injector owns `INJECTIONS` and the `INJECTION_GATE` sockhash: no other
//! part of the agent reads or writes them, and it runs on the rebalancing
//! thread with the mover that calls it, off the async workers.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError, SockHash};
use grpclb_common::{
    frame::GOAWAY, names, Backend, ConnectionKey, Injection, InjectionOutcome, TrackedConnection,
};

use crate::state::translate::addr_of;

/// What became of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The GOAWAY is in the stream.
    Sent,
    /// The gate said no; some reasons pass later (a busy send queue, a
    /// frame in flight), others never will.
    Refused(InjectionOutcome),
    /// The socket's send buffer is full; try again later.
    WouldBlock,
    /// The connection is closing or closed.
    SocketGone,
    /// Another sockmap user owns the socket (EBUSY): never injected.
    Busy,
}

/// Every `cause` of `grpclb_moves_abandoned_total`: the [`Attempt::label`]
/// of each attempt but `Sent`, and the mover's own two (the socket was not
/// found in any process of the cgroup; an error).
pub const ABANDON_CAUSES: [&str; 9] = [
    "send_queue_busy",
    "not_at_boundary",
    "not_tracked",
    "refused",
    "send_buffer_full",
    "socket_gone",
    "sockmap_busy",
    "socket_not_found",
    "error",
];

impl Attempt {
    /// For metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Attempt::Sent => "sent",
            Attempt::Refused(InjectionOutcome::SendQueueBusy) => "send_queue_busy",
            Attempt::Refused(InjectionOutcome::NotAtBoundary) => "not_at_boundary",
            Attempt::Refused(InjectionOutcome::NotTracked) => "not_tracked",
            Attempt::Refused(_) => "refused",
            Attempt::WouldBlock => "send_buffer_full",
            Attempt::SocketGone => "socket_gone",
            Attempt::Busy => "sockmap_busy",
        }
    }

    /// Worth another try a little later.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Attempt::WouldBlock
                | Attempt::Refused(InjectionOutcome::SendQueueBusy)
                | Attempt::Refused(InjectionOutcome::NotAtBoundary)
        )
    }
}

pub struct Injector {
    /// The processes of this cgroup (and below) are searched for sockets.
    cgroup: PathBuf,
    injections: HashMap<MapData, ConnectionKey, Injection>,
    gate: SockHash<MapData, u64>,
}

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`), fixed in
/// every Linux kernel.
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

impl Injector {
    /// Fails unless the agent sees the node's processes as the kernel numbers
    /// them: the gate recognises the injector by its kernel thread group id,
    /// and pods' sockets are found through /proc (hostPID in a DaemonSet).
    pub fn open(bpffs: &Path, cgroup: &Path) -> Result<Injector> {
        use std::os::unix::fs::MetadataExt;
        let pid_namespace = fs::metadata("/proc/self/ns/pid")
            .context("reading /proc/self/ns/pid")?
            .ino();
        anyhow::ensure!(
            pid_namespace == INITIAL_PID_NAMESPACE,
            "it needs the node's PID namespace (hostPID: true, and CAP_SYS_PTRACE: see \
             deploy/rebalancing/) to find pods' sockets and be recognised by the GOAWAY gate"
        );
        let maps = bpffs.join("maps");
        let open = |name: &str| {
            let path = maps.join(name);
            MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))
        };
        Ok(Injector {
            cgroup: cgroup.to_path_buf(),
            injections: HashMap::try_from(Map::HashMap(open(names::INJECTIONS)?))
                .context("INJECTIONS is not the expected hash map")?,
            gate: SockHash::try_from(Map::SockHash(open(names::INJECTION_GATE)?))
                .context("INJECTION_GATE is not the expected sockhash")?,
        })
    }

    /// Which process of the cgroup holds the connection's socket, and as
    /// which fd; `None` when none does (it closed).
    pub fn locate(
        &self,
        cookie: u64,
        connection: &TrackedConnection,
    ) -> Result<Option<SocketHandle>> {
        find_socket(
            &self.cgroup,
            cookie,
            &connection.backend,
            &connection.client,
        )
    }

    /// One attempt at writing the GOAWAY into the connection `cookie`, whose
    /// socket is at `handle` (from [`Injector::locate`]). The agent holds the
    /// socket only during the attempt: a duplicate kept longer would delay
    /// the connection's close when the application closes it.
    pub fn write(
        &mut self,
        cookie: u64,
        connection: &TrackedConnection,
        handle: &SocketHandle,
    ) -> Result<Attempt> {
        let Some(socket) = handle.duplicate(cookie) else {
            return Ok(Attempt::SocketGone);
        };
        let key = ConnectionKey {
            local: connection.backend,
            remote: connection.client,
        };
        let announced = Injection {
            cookie,
            injector_tgid: std::process::id(),
            outcome: InjectionOutcome::Pending as u32,
        };
        self.injections
            .insert(key, announced, 0)
            .context("writing INJECTIONS")?;
        let attempt = self.write_through_gate(cookie, &key, &socket);
        let _ = self.injections.remove(&key);
        attempt
    }

    fn write_through_gate(
        &mut self,
        cookie: u64,
        key: &ConnectionKey,
        socket: &OwnedFd,
    ) -> Result<Attempt> {
        match self.gate.insert(cookie, socket.as_raw_fd(), 0) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EBUSY) => {
                return Ok(Attempt::Busy)
            }
            // Sockmaps take only established TCP sockets: this one is closing.
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                return Ok(Attempt::SocketGone)
            }
            Err(e) => return Err(e).context("putting the socket in INJECTION_GATE"),
        }
        // SAFETY: a send of a static buffer on an fd this function borrows.
        let sent = unsafe {
            libc::send(
                socket.as_raw_fd(),
                GOAWAY.as_ptr().cast(),
                GOAWAY.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        let errno = std::io::Error::last_os_error();
        let removed = self.gate.remove(&cookie);
        let outcome = self
            .injections
            .get(key, 0)
            .map(|i| InjectionOutcome::from_u32(i.outcome))
            .unwrap_or(InjectionOutcome::Pending);
        removed.context("taking the socket out of INJECTION_GATE")?;
        if sent == GOAWAY.len() as isize {
            // A refused GOAWAY is cut out by the gate, so the send succeeds
            // either way: the gate's answer tells.
            return match outcome {
                InjectionOutcome::Passed => Ok(Attempt::Sent),
                InjectionOutcome::Pending => anyhow::bail!(
                    "the GOAWAY was sent but the gate did not judge it; is the gate program \
                     attached to INJECTION_GATE?"
                ),
                refused => Ok(Attempt::Refused(refused)),
            };
        }
        match errno.raw_os_error() {
            // Kernels that cannot cut a whole message out drop it instead.
            Some(libc::EACCES) => Ok(Attempt::Refused(outcome)),
            Some(libc::EAGAIN) => Ok(Attempt::WouldBlock),
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => Ok(Attempt::SocketGone),
            _ if sent >= 0 => anyhow::bail!("a partial GOAWAY write ({sent} of 17 bytes)"),
            _ => Err(errno).context("sending the GOAWAY"),
        }
    }
}

/// Where a process of the node keeps a connection's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketHandle {
    pub pid: i32,
    pub fd: i32,
}

impl SocketHandle {
    /// The socket, as an fd of this process, if the process still holds
    /// the connection `cookie` at that fd (fd numbers are reused).
    fn duplicate(&self, cookie: u64) -> Option<OwnedFd> {
        let socket = duplicate(self.pid, self.fd).ok()?;
        (socket_cookie(&socket) == Some(cookie)).then_some(socket)
    }
}

/// The socket with these addresses and cookie, in whichever process of the
/// cgroup holds it.
fn find_socket(
    cgroup: &Path,
    cookie: u64,
    local: &Backend,
    remote: &Backend,
) -> Result<Option<SocketHandle>> {
    let mut by_netns: BTreeMap<u64, Vec<i32>> = BTreeMap::new();
    for pid in cgroup_pids(cgroup)? {
        // A process that exited meanwhile is simply skipped.
        if let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            use std::os::unix::fs::MetadataExt;
            by_netns.entry(meta.ino()).or_default().push(pid);
        }
    }
    for pids in by_netns.values() {
        let Some(inode) = pids
            .iter()
            .find_map(|pid| socket_inode(*pid, local, remote))
        else {
            continue;
        };
        for &pid in pids {
            if let Some(fd) = fd_of_inode(pid, inode) {
                let handle = SocketHandle { pid, fd };
                if handle.duplicate(cookie).is_some() {
                    return Ok(Some(handle));
                }
            }
        }
    }
    Ok(None)
}

fn socket_cookie(socket: &OwnedFd) -> Option<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// Every process in the cgroup and its descendants.
fn cgroup_pids(cgroup: &Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = dir.join("cgroup.procs");
        if let Ok(text) = fs::read_to_string(&procs) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    anyhow::ensure!(
        !pids.is_empty() || cgroup.exists(),
        "the cgroup {} is gone",
        cgroup.display()
    );
    Ok(pids)
}

/// The inode of the socket with these addresses in the process's netns.
fn socket_inode(pid: i32, local: &Backend, remote: &Backend) -> Option<u64> {
    ["tcp", "tcp6"].iter().find_map(|table| {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok()?;
        text.lines()
            .skip(1)
            .filter_map(parse_proc_net_tcp_line)
            .find(|entry| entry.local == *local && entry.remote == *remote)
            .map(|entry| entry.inode)
    })
}

fn fd_of_inode(pid: i32, inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|entry| {
            fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        })
        .and_then(|entry| entry.file_name().to_str()?.parse().ok())
}

/// `pidfd_getfd`: the same open file (here, a pod's socket), as an fd of
/// this process.
pub fn duplicate(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; each fd returned is checked and owned once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error()).context("pidfd_open");
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let socket = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if socket < 0 {
            return Err(std::io::Error::last_os_error())
                .context("pidfd_getfd (the agent needs CAP_SYS_PTRACE)");
        }
        Ok(OwnedFd::from_raw_fd(socket as i32))
    }
}

#[derive(Debug, PartialEq, Eq)]
struct ProcNetTcpEntry {
    local: Backend,
    remote: Backend,
    inode: u64,
}

/// One line of `/proc/net/tcp` or `/proc/net/tcp6`: addresses are the raw
/// 32-bit words as the kernel holds them, printed in hex in host byte order.
fn parse_proc_net_tcp_line(line: &str) -> Option<ProcNetTcpEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(ProcNetTcpEntry {
        local: parse_endpoint(fields.get(1)?)?,
        remote: parse_endpoint(fields.get(2)?)?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

fn parse_endpoint(text: &str) -> Option<Backend> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(Backend::new(addr_of(ip), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(s: &str) -> Backend {
        let a: std::net::SocketAddr = s.parse().unwrap();
        Backend::new(addr_of(a.ip()), a.port())
    }

    #[test]
    fn parses_ipv4_lines() {
        let line = "   3: 0200000A:1F90 0100000A:D2F4 01 00000000:00000000 00:00000000 \
                    00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            parse_proc_net_tcp_line(line).unwrap(),
            ProcNetTcpEntry {
                local: backend("10.0.0.2:8080"),
                remote: backend("10.0.0.1:54004"),
                inode: 123456,
            }
        );
    }

    #[test]
    fn parses_ipv6_lines_and_mapped_addresses_match_ipv4() {
        let line = "   0: 0000000000000000FFFF00000200000A:1F90 \
                    0000000000000000FFFF00000100000A:D2F4 01 00000000:00000000 \
                    00:00000000 00000000     0        0 99 1 0000000000000000 20 4 30 10 -1";
        let entry = parse_proc_net_tcp_line(line).unwrap();
        assert_eq!(entry.local, backend("10.0.0.2:8080"));
        assert_eq!(entry.remote, backend("10.0.0.1:54004"));
        let line6 = "   1: 00000000000000000000000001000000:1F90 \
                     00000000000000000000000002000000:0050 01 00000000:00000000 \
                     00:00000000 00000000     0        0 7 1";
        let entry = parse_proc_net_tcp_line(line6).unwrap();
        assert_eq!(entry.local, backend("[::1]:8080"));
        assert_eq!(entry.remote, backend("[::2]:80"));
    }

    #[test]
    fn the_header_and_garbage_are_skipped() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when \
                      retrnsmt   uid  timeout inode";
        assert_eq!(parse_proc_net_tcp_line(header), None);
        assert_eq!(parse_proc_net_tcp_line(""), None);
        assert_eq!(parse_proc_net_tcp_line("0: 12:34 56"), None);
    }

    #[test]
    fn only_a_busy_queue_or_a_frame_in_flight_is_worth_retrying() {
        assert!(Attempt::WouldBlock.is_transient());
        assert!(Attempt::Refused(InjectionOutcome::SendQueueBusy).is_transient());
        assert!(Attempt::Refused(InjectionOutcome::NotAtBoundary).is_transient());
        assert!(!Attempt::Refused(InjectionOutcome::NotTracked).is_transient());
        assert!(!Attempt::Busy.is_transient());
        assert!(!Attempt::Sent.is_transient());
    }

    #[test]
    fn every_attempt_but_sent_is_a_listed_cause() {
        let outcomes = (0..=6).map(InjectionOutcome::from_u32);
        let attempts = outcomes.map(Attempt::Refused).chain([
            Attempt::WouldBlock,
            Attempt::SocketGone,
            Attempt::Busy,
        ]);
        for attempt in attempts {
            assert!(ABANDON_CAUSES.contains(&attempt.label()), "{attempt:?}");
        }
    }
}
