//! The maps shared with the agent. Layouts, names and default sizes come from
//! `grpclb-common`; the agent overrides each size at load time and pins every
//! map by name under `<bpffs>/maps/`.
//!
//! The hash maps are `BPF_F_NO_PREALLOC`: memory follows the number of entries
//! in use instead of the (large) capacity. The kernel may reuse a deleted
//! entry's memory for another key at once, while a program still holds a
//! pointer to it: docs/architecture.md ("Connection counting") says where
//! the counting keeps a pointer and why the agent cannot delete under it.

use aya_ebpf::{
    helpers::generated::bpf_sk_storage_get,
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_PREALLOC},
    macros::{btf_map, map},
    maps::{Array, HashMap, SockHash},
};
use grpclb_common::{
    capacity, AcceptedSocket, Backend, BackendLoad, BackendSlotKey, BackendView, ConnectionKey, DataplaneConfig, Injection,
    MoveWaiting, PlacedSocket, ServiceEntry, ServiceKey, ServiceName, TrackedConnection,
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
/// - key: `Backend`; value: `BackendLoad` (count, epoch of this entry).
/// - writers: agent creates entries (count 0, a fresh epoch) and removes idle ones of backends
///   in no live set; connect hooks add 1 when they place a connection; the close paths
///   subtract 1 from the entry with the epoch the socket was counted in, never below 0.
/// - readers: connect hooks (selection), `grpclb-agent status`, metrics.
/// - capacity: `capacity::BACKEND_LOAD` distinct backends.
#[map]
pub static BACKEND_LOAD: HashMap<Backend, BackendLoad> =
    HashMap::pinned(capacity::BACKEND_LOAD, BPF_F_NO_PREALLOC);

/// Sockets whose connect() was rewritten: socket-local storage, which the
/// kernel frees with the socket, so nothing is left behind whatever order
/// the close paths run in.
/// - key: the socket; value: `PlacedSocket` (service, backend, counted, load epoch).
/// - writers: connect hooks create and fill it; the close paths (sock_ops state -> TCP_CLOSE,
///   cgroup/sock_release) and a new connect() of the same socket swap `counted` to 0.
/// - readers: getpeername hooks, sock_ops, sock_release. The agent never reads it.
/// - capacity: one per socket, no limit of its own.
#[btf_map]
pub static PLACED_SOCKETS: SocketStorage<PlacedSocket> = SocketStorage::new();

/// A `BPF_MAP_TYPE_SK_STORAGE` definition in the BTF `.maps` form (the kernel
/// wants BTF for its key and value), pinned by name like the other maps so a
/// restarted agent's programs find the storage of sockets already open.
/// aya-ebpf's `btf_maps::SkStorage` has no pinning and only takes sock_addr
/// contexts; these programs also need it from sock_ops and cgroup_sock, so
/// [`SocketStorage::get`] calls `bpf_sk_storage_get` itself.
#[repr(C)]
pub struct SocketStorage<V> {
    // Field names and pointer-to-array types are the libbpf convention that
    // aya reads (the array length is the value).
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing
// dereferences them.
unsafe impl<V> Sync for SocketStorage<V> {}

impl<V> SocketStorage<V> {
    pub const fn new() -> Self {
        SocketStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The map argument of the `bpf_sk_storage_*` helpers.
    #[inline(always)]
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// The storage of socket `sk`, created (zeroed) if `flags` says
    /// `BPF_SK_STORAGE_GET_F_CREATE`. `None`: none yet (and not asked to
    /// create), or the kernel is out of memory.
    #[inline(always)]
    pub fn get(&self, sk: *mut core::ffi::c_void, flags: u64) -> Option<*mut V> {
        // SAFETY: `sk` is a socket the verifier accepts for this helper; no
        // initial value is passed, so a created storage starts zeroed.
        let value = unsafe { bpf_sk_storage_get(self.as_ptr(), sk, core::ptr::null_mut(), flags) };
        (!value.is_null()).then_some(value.cast())
    }
}

/// Human-readable frontend names.
/// - key: `ServiceKey`; value: `ServiceName`.
/// - writer: agent. reader: `grpclb-agent status` only (no program reads it; it lives here so
///   that it is created and pinned with the others).
/// - capacity: `capacity::FRONTENDS`.
#[map]
pub static SERVICE_NAMES: HashMap<ServiceKey, ServiceName> =
    HashMap::pinned(capacity::FRONTENDS, BPF_F_NO_PREALLOC);

/// Backends that are pods on this node, on balanced target ports: sock_ops
/// counts the connections they accept (`LOCAL_LOAD`) and, where the value
/// says so, follows their frames (`TRACKED`).
/// - key: `Backend`; value: `u32`, a `local_backend` constant (`COUNT` or `TRACK_FRAMES`).
/// - writer: agent (the endpoints of balanced Services whose nodeName is this node; the
///   value follows the Service's `grpclb.io/track-frames`). reader: sock_ops.
/// - capacity: `capacity::LOCAL_BACKENDS`.
#[map]
pub static LOCAL_BACKENDS: HashMap<Backend, u32> =
    HashMap::pinned(capacity::LOCAL_BACKENDS, BPF_F_NO_PREALLOC);

/// Established connections each local backend accepted, from every node:
/// the pod's load as its node reports it to the other agents.
/// - key: `Backend`; value: `BackendLoad` (count, epoch of this entry).
/// - writers: agent creates entries (count 0, a fresh epoch) before it lists the backend in
///   `LOCAL_BACKENDS`, and removes those that read 0 once the backend is no longer listed;
///   sock_ops adds 1 at PASSIVE_ESTABLISHED for a backend listed in `LOCAL_BACKENDS`; the
///   close paths (sock_ops TCP_CLOSE, cgroup/sock_release) subtract 1 once, from the entry
///   with the epoch the socket was counted in, never below 0.
/// - readers: the agent (every snapshot interval: one walk of this small map).
/// - capacity: `capacity::LOCAL_BACKENDS` (one per local backend, draining ones included).
#[map]
pub static LOCAL_LOAD: HashMap<Backend, BackendLoad> =
    HashMap::pinned(capacity::LOCAL_BACKENDS, BPF_F_NO_PREALLOC);

/// Connections local backends accepted and `LOCAL_LOAD` counts: socket-local
/// storage, freed with the socket, as `PLACED_SOCKETS` is for connects.
/// - key: the accepted socket; value: `AcceptedSocket` (backend, counted, load epoch).
/// - writers: sock_ops creates and fills it at PASSIVE_ESTABLISHED; the close paths swap
///   `counted` to 0.
/// - readers: sock_ops, sock_release. The agent never reads it.
/// - capacity: one per socket, no limit of its own.
#[btf_map]
pub static ACCEPTED_SOCKETS: SocketStorage<AcceptedSocket> = SocketStorage::new();

/// The Service-wide load of backends, learned from the other nodes' agents.
/// - key: `Backend`; value: `BackendView` (load, this node's count when written, expiry).
/// - writer: agent (from the exchange's placement loads, by difference; unchanged entries
///   are refreshed before they expire, removed ones deleted). reader: connect hooks
///   (`grpclb_common::effective_load`), `grpclb-agent status`.
/// - capacity: `capacity::BACKEND_LOAD` (sized by `--max-backends` like `BACKEND_LOAD`).
#[map]
pub static BACKEND_VIEW: HashMap<Backend, BackendView> =
    HashMap::pinned(capacity::BACKEND_LOAD, BPF_F_NO_PREALLOC);

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
