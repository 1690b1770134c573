//! The maps shared with the agent. Layouts, names and default sizes come from
//! `grpclb-common`; the agent overrides each size at load time and pins every
//! map by name under `<bpffs>/maps/`.
//!
//! The hash maps are `BPF_F_NO_PREALLOC`: memory follows the number of entries
//! in use instead of the (large) capacity, and a deleted entry is freed only
//! after an RCU grace period, so a program still holding a pointer to it never
//! sees it reused for another key.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, SockHash},
};
use grpclb_common::{
    capacity, Backend, BackendSlotKey, ConnectionKey, DataplaneConfig, Injection, MoveWaiting,
    RewrittenSocket,
    ServiceEntry, ServiceKey, ServiceName, TrackedConnection,
};

/// Balanced Service frontends.
/// - key: `ServiceKey` (VIP, IPv4-mapped or IPv6, and port); value: `ServiceEntry`
///   (generation, backend count of the live slot).
/// - writer: agent (one update per backend set replacement). reader: connect hooks.
/// - capacity: `capacity::FRONTENDS` Service ports.
#[map]
pub static FRONTENDS: HashMap<ServiceKey, ServiceEntry> =
    HashMap::pinned(capacity::FRONTENDS, BPF_F_NO_PREALLOC);

/// The two backend slots of every frontend.
/// - key: `BackendSlotKey` (frontend, slot 0/1, index); value: `Backend` (pod address, port).
/// - writer: agent. reader: connect hooks.
/// - capacity: `capacity::BACKEND_SLOTS` positions, across both slots of all frontends.
#[map]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, Backend> =
    HashMap::pinned(capacity::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

/// Live balanced connections per backend on this node.
/// - key: `Backend`; value: `u64` count.
/// - writers: agent creates entries at 0 and removes unused ones; sock_ops adds 1 when a
///   rewritten connection is established; the close paths subtract 1, never below 0.
/// - readers: connect hooks (selection), `grpclb-agent status`.
/// - capacity: `capacity::BACKEND_LOAD` distinct backends.
#[map]
pub static BACKEND_LOAD: HashMap<Backend, u64> =
    HashMap::pinned(capacity::BACKEND_LOAD, BPF_F_NO_PREALLOC);

/// Sockets whose connect() was rewritten.
/// - key: socket cookie `u64`; value: `RewrittenSocket` (service, backend, counted).
/// - writers: connect hooks insert; sock_ops marks the entry counted; sock_ops (state →
///   TCP_CLOSE) and cgroup/sock_release delete it.
/// - readers: getpeername hooks, sock_ops, sock_release.
/// - capacity: `capacity::SOCKETS` concurrently open rewritten sockets; when full, a
///   connect is still rewritten but neither counted nor reported by getpeername.
#[map]
pub static SOCKETS: HashMap<u64, RewrittenSocket> =
    HashMap::pinned(capacity::SOCKETS, BPF_F_NO_PREALLOC);

/// Human-readable frontend names.
/// - key: `ServiceKey`; value: `ServiceName`.
/// - writer: agent. reader: `grpclb-agent status` only (no program reads it; it lives here so
///   that it is created and pinned with the others).
/// - capacity: `capacity::FRONTENDS`.
#[map]
pub static SERVICE_NAMES: HashMap<ServiceKey, ServiceName> =
    HashMap::pinned(capacity::FRONTENDS, BPF_F_NO_PREALLOC);

/// Backends that are pods on this node, on balanced target ports: their
/// accepted connections are tracked.
/// - key: `Backend`; value: `u32` (1).
/// - writer: agent (endpoints whose nodeName is this node). reader: sock_ops.
/// - capacity: `capacity::LOCAL_BACKENDS`.
#[map]
pub static LOCAL_BACKENDS: HashMap<Backend, u32> =
    HashMap::pinned(capacity::LOCAL_BACKENDS, BPF_F_NO_PREALLOC);

/// Server-side connections of local backends and their frame trackers.
/// - key: socket cookie `u64`; value: `TrackedConnection`.
/// - writers: sock_ops inserts at PASSIVE_ESTABLISHED and deletes at TCP_CLOSE
///   (sock_release too); cgroup_skb/egress advances the tracker.
/// - readers: cgroup_skb/egress, the agent (metrics).
/// - capacity: `capacity::TRACKED`; when full, a connection is not tracked.
#[map]
pub static TRACKED: HashMap<u64, TrackedConnection> =
    HashMap::pinned(capacity::TRACKED, BPF_F_NO_PREALLOC);

/// GOAWAYs the agent is writing right now.
/// - key: `ConnectionKey` (server address and port, client address and port);
///   value: `Injection` (cookie, writer's tgid, the gate's outcome).
/// - writers: agent (before and after its write); the gate (outcome).
/// - reader: the gate (sk_msg), the agent.
/// - capacity: `capacity::INJECTIONS`.
#[map]
pub static INJECTIONS: HashMap<ConnectionKey, Injection> =
    HashMap::pinned(capacity::INJECTIONS, BPF_F_NO_PREALLOC);

/// Sockets the agent is writing a GOAWAY into; the gate (sk_msg) is attached
/// to this map, so it runs on their sends while they are in it.
/// - key: socket cookie `u64`; value: the socket.
/// - writer: agent (inserts its duplicate of the socket, removes it after the
///   write). reader: the kernel's sockmap code.
/// - capacity: `capacity::INJECTIONS`.
#[map]
pub static INJECTION_GATE: SockHash<u64> = SockHash::pinned(capacity::INJECTIONS, 0);

/// Moves the agent keeps trying because the gate keeps refusing them (a
/// reader slower than its pod, say).
/// - key: socket cookie `u64` (as in `TRACKED`); value: `MoveWaiting` (since, reason,
///   last refusal).
/// - writer: agent (once a move has waited long enough to report, removed when it ends).
/// - reader: `grpclb-agent status` only (no program reads it; it lives here so that it
///   is created and pinned with the others).
/// - capacity: `capacity::MOVES_WAITING`.
#[map]
pub static MOVES_WAITING: HashMap<u64, MoveWaiting> =
    HashMap::pinned(capacity::MOVES_WAITING, BPF_F_NO_PREALLOC);

/// Runtime switches.
/// - key: index 0; value: `DataplaneConfig`.
/// - writer: agent. reader: every program (debug logging).
/// - capacity: 1.
#[map]
pub static CONFIG: Array<DataplaneConfig> = Array::pinned(1, 0);

/// True when the agent asked for aya-log debug events.
#[inline(always)]
pub fn debug_log_enabled() -> bool {
    CONFIG.get(0).is_some_and(|config| config.debug_log != 0)
}
