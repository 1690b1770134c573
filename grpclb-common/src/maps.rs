//! Keys and values of the eBPF maps, and the maps' names and default sizes.
//!
//! Who writes and who reads each map is documented where the eBPF side
//! defines it (`grpclb-ebpf/src/maps.rs`); the layouts live here so both
//! sides compile against one definition.

use crate::Addr;

/// A balanced Service frontend: a ClusterIP (v4 mapped or v6) and a port.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

impl ServiceKey {
    pub const fn new(addr: Addr, port: u16) -> Self {
        ServiceKey {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

/// The live backend set of a frontend.
///
/// A backend set is replaced atomically: the agent writes the new set into the
/// slot not in use (`generation + 1`), then replaces this entry in one map
/// update. A reader that sees `generation` change while it selects retries, so
/// it never uses a mix of two sets.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ServiceEntry {
    /// Bumped on every replacement; `generation & 1` is the slot in use.
    pub generation: u32,
    /// Number of backends in the slot in use; 0 refuses connections.
    pub backend_count: u32,
}

impl ServiceEntry {
    pub const fn slot(&self) -> u32 {
        self.generation & 1
    }
}

/// Position of one backend in one of a frontend's two slots.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct BackendSlotKey {
    pub service: ServiceKey,
    /// 0 or 1.
    pub slot: u32,
    /// 0..backend_count.
    pub index: u32,
}

/// A pod address and target port. Also the key of the per-backend load map.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Backend {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

impl Backend {
    pub const fn new(addr: Addr, port: u16) -> Self {
        Backend {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

/// A backend's live connections: the value of `BACKEND_LOAD` (client side:
/// connections this node's pods opened to it) and of `LOCAL_LOAD` (server
/// side: connections a local backend accepted, from every node). Both are
/// counted and uncounted by the same protocol.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BackendLoad {
    /// Connections counted on this backend and not closed yet.
    pub connections: u64,
    /// Chosen by the agent when it creates the entry, never changed: a
    /// socket uncounts only the entry it was counted in, never one the agent
    /// removed and created again meanwhile.
    pub epoch: u64,
}

/// What the connect hook remembers about a socket, in its socket-local
/// storage (`PLACED_SOCKETS`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PlacedSocket {
    /// What the application asked for; `getpeername` reports it.
    pub service: ServiceKey,
    /// Where the connection really goes.
    pub backend: Backend,
    /// 1 while the connection is counted in `BACKEND_LOAD[backend]`; every
    /// way out swaps it to 0 and only the one that saw 1 uncounts.
    pub counted: u32,
    /// 1 when the socket's last `connect()` was rewritten.
    pub placed: u32,
    /// The `BackendLoad::epoch` of the entry it is counted in.
    pub load_epoch: u64,
}

/// What `sock_ops` remembers about a connection a local backend accepted,
/// in the accepted socket's storage (`ACCEPTED_SOCKETS`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct AcceptedSocket {
    /// The local pod address and port that accepted it.
    pub backend: Backend,
    /// 1 while the connection is counted in `LOCAL_LOAD[backend]`; every
    /// way out swaps it to 0 and only the one that saw 1 uncounts.
    pub counted: u32,
    /// The `BackendLoad::epoch` of the `LOCAL_LOAD` entry it is counted in.
    pub load_epoch: u64,
}

/// The value of `LOCAL_BACKENDS`: what the kernel does with the connections
/// a local backend accepts. Every local backend of a balanced Service has
/// an entry; its accepted connections are always counted (`LOCAL_LOAD`).
pub mod local_backend {
    /// Only counted.
    pub const COUNT: u32 = 0;
    /// Counted, and their HTTP/2 frames followed (`TRACKED`): the Service
    /// has `grpclb.io/track-frames`. 1, the value older agents wrote for
    /// the tracked backends, the only ones they listed.
    pub const TRACK_FRAMES: u32 = 1;
}

/// The Service-wide load of one backend, as the agent last learned it from
/// its peers: the value of `BACKEND_VIEW`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BackendView {
    /// Established connections (or their call-rate equivalent) the pod
    /// holds from every node.
    pub load: u32,
    /// This node's `BACKEND_LOAD[backend].connections` when the agent wrote
    /// `load`: what this node opened since is the count above it.
    pub baseline: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) after which the view is ignored:
    /// an agent that stops refreshing it stops steering the hook.
    pub expires_ns: u64,
}

impl BackendView {
    /// No view: expired since boot, so the hook uses this node's count.
    pub const ABSENT: BackendView = BackendView {
        load: 0,
        baseline: 0,
        expires_ns: 0,
    };

    #[inline(always)]
    pub fn is_fresh(&self, now_ns: u64) -> bool {
        now_ns < self.expires_ns
    }
}

/// A server-side connection of a local backend whose HTTP/2 frames are
/// followed, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TrackedConnection {
    /// The local pod address and port that accepted it.
    pub backend: Backend,
    /// The client's address and port: with `backend`, the connection's
    /// 4-tuple, which is how the agent finds the socket and the GOAWAY gate
    /// finds this entry.
    pub client: Backend,
    /// Sequence number of the first byte the server sends (`snd_nxt` when
    /// the connection was established): stream offsets count from it.
    pub base_seq: u32,
    pub _pad: u32,
    pub tracker: crate::frame::FrameTracker,
}

impl TrackedConnection {
    /// The stream offset of the byte with sequence number `seq`. Signed
    /// distance from the next expected byte: sequence numbers wrap at 4 GiB,
    /// stream offsets do not.
    #[inline(always)]
    pub fn offset_of(&self, seq: u32) -> u64 {
        let next = self.tracker.next_offset();
        let delta = seq.wrapping_sub(self.base_seq.wrapping_add(next as u32)) as i32;
        (next as i64 + i64::from(delta)).max(0) as u64
    }
}

/// A server-side connection by its addresses, as seen from the server.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ConnectionKey {
    pub local: Backend,
    pub remote: Backend,
}

/// A GOAWAY the agent is about to write into a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Injection {
    /// The connection's socket cookie (its `TRACKED` key).
    pub cookie: u64,
    /// Thread group id (as the kernel numbers it) of the writer: only its
    /// sends are judged, the application's own pass untouched.
    pub injector_tgid: u32,
    /// An [`InjectionOutcome`] written by the gate.
    pub outcome: u32,
}

/// What the GOAWAY gate decided about the injector's send.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InjectionOutcome {
    /// The gate has not seen the send yet.
    Pending = 0,
    /// Passed at a verified frame boundary.
    Passed = 1,
    /// The 17 bytes were not grpclb's GOAWAY frame.
    NotGoaway = 2,
    /// Bytes queued but not yet sent, beyond the frame being sent: their
    /// frames are not known yet.
    SendQueueBusy = 3,
    /// Not at a frame boundary, inside a header block, before SETTINGS,
    /// after a GOAWAY, or already injected.
    NotAtBoundary = 4,
    /// The connection is not tracked (any more).
    NotTracked = 5,
    /// The kernel gave no TCP socket or no field offsets were configured.
    NoTcpState = 6,
}

impl InjectionOutcome {
    pub fn from_u32(value: u32) -> Self {
        match value {
            1 => Self::Passed,
            2 => Self::NotGoaway,
            3 => Self::SendQueueBusy,
            4 => Self::NotAtBoundary,
            5 => Self::NotTracked,
            6 => Self::NoTcpState,
            _ => Self::Pending,
        }
    }
}

/// A move the agent keeps trying after the gate refused it for a while,
/// written by the agent for `grpclb-agent status`; the eBPF programs never
/// read it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MoveWaiting {
    /// When the agent started trying, Unix time in milliseconds.
    pub since_unix_ms: u64,
    /// Why the connection moves: a [`MoveWaiting::REASONS`] index.
    pub reason: u32,
    /// The last refusal: a [`MoveWaiting::CAUSES`] index.
    pub cause: u32,
}

impl MoveWaiting {
    /// The rebalancing policies, as metrics and logs name them.
    pub const REASONS: [&'static str; 4] = ["drain", "scale_up", "hotspot", "max_age"];
    /// Refusals that can pass later, as metrics and logs name them.
    pub const CAUSES: [&'static str; 3] =
        ["send_queue_busy", "not_at_boundary", "send_buffer_full"];

    pub fn reason_label(&self) -> &'static str {
        Self::REASONS
            .get(self.reason as usize)
            .copied()
            .unwrap_or("unknown")
    }

    pub fn cause_label(&self) -> &'static str {
        Self::CAUSES
            .get(self.cause as usize)
            .copied()
            .unwrap_or("unknown")
    }
}

/// Human-readable name of a frontend (`namespace/name:port-name`), written by
/// the agent for `grpclb-agent status`; the eBPF programs never read it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ServiceName {
    pub len: u32,
    pub bytes: [u8; SERVICE_NAME_MAX],
}

pub const SERVICE_NAME_MAX: usize = 124;

impl ServiceName {
    /// Truncates at a char boundary if longer than [`SERVICE_NAME_MAX`].
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(SERVICE_NAME_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; SERVICE_NAME_MAX];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        ServiceName {
            len: end as u32,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(SERVICE_NAME_MAX);
        core::str::from_utf8(&self.bytes[..len]).unwrap_or("<invalid name>")
    }
}

/// Runtime switches for the eBPF programs, in an array map of one entry.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DataplaneConfig {
    /// Non-zero: the programs emit aya-log debug events.
    pub debug_log: u32,
}

/// Map names, shared by the eBPF definitions, the loader and `status`.
pub mod names {
    pub const FRONTENDS: &str = "FRONTENDS";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKEND_LOAD: &str = "BACKEND_LOAD";
    pub const SERVICE_NAMES: &str = "SERVICE_NAMES";
    pub const CONFIG: &str = "CONFIG";
    pub const LOCAL_BACKENDS: &str = "LOCAL_BACKENDS";
    pub const TRACKED: &str = "TRACKED";
    pub const INJECTIONS: &str = "INJECTIONS";
    pub const INJECTION_GATE: &str = "INJECTION_GATE";
    pub const MOVES_WAITING: &str = "MOVES_WAITING";
    pub const LOCAL_LOAD: &str = "LOCAL_LOAD";
    pub const ACCEPTED_SOCKETS: &str = "ACCEPTED_SOCKETS";
    pub const BACKEND_VIEW: &str = "BACKEND_VIEW";
}

/// Default map capacities; the agent overrides them with `--max-*` flags.
/// The hash maps do not preallocate: the kernel pays for the entries in
/// use, not for the capacity, so the defaults hold a cluster of 10,000
/// Services with 100,000 endpoints (several ports each) with room to spare.
pub mod capacity {
    /// Service frontends (VIP, port).
    pub const FRONTENDS: u32 = 65_536;
    /// Backend positions, two slots per frontend (the active set and the
    /// previous one): 100,000 endpoints take up to 200,000.
    pub const BACKEND_SLOTS: u32 = 524_288;
    /// Distinct backends (pod, port), including removed ones whose
    /// connections are still open; also sizes `BACKEND_VIEW`.
    pub const BACKEND_LOAD: u32 = 262_144;
    /// Backends (pod, port) on this node; also sizes `LOCAL_LOAD`.
    pub const LOCAL_BACKENDS: u32 = 16_384;
    /// Concurrently open server-side connections of local backends.
    pub const TRACKED: u32 = 65_536;
    /// GOAWAYs being written at the same time (the agent writes one at a time).
    pub const INJECTIONS: u32 = 64;
    /// Moves shown by `grpclb-agent status` as waiting (more still move).
    pub const MOVES_WAITING: u32 = 65_536;
}

// The kernel knows only sizes (each map's key_size/value_size, fixed when
// the map is created) and the pinned maps outlive an agent: a new agent
// adopts the maps of the last one, so a size or offset that changes breaks
// the adoption. The eBPF side also relies on the alignments noted.

// 16-byte address (v4 mapped) + port + 2 explicit padding bytes.
layout!(ServiceKey, size 20, align 2, { addr: Addr = 0, port: u16 = 16, _pad: [u8; 2] = 18 });
// Two u32s, replaced in one map update so a reader sees both or neither.
layout!(ServiceEntry, size 8, align 4, { generation: u32 = 0, backend_count: u32 = 4 });
// ServiceKey + slot + index; 4-aligned so the u32s follow the 20-byte key unpadded.
layout!(BackendSlotKey, size 28, align 4, { service: ServiceKey = 0, slot: u32 = 20, index: u32 = 24 });
// Same shape as ServiceKey: address, port, 2 explicit padding bytes.
layout!(Backend, size 20, align 2, { addr: Addr = 0, port: u16 = 16, _pad: [u8; 2] = 18 });
// Two u64s; `connections` is changed with atomic adds, which need 8-byte alignment.
layout!(BackendLoad, size 16, align 8, { connections: u64 = 0, epoch: u64 = 8 });
// Socket-local storage value: two 20-byte keys, two u32 flags (`counted` is
// swapped atomically, so 4-aligned), then a u64 at an 8-aligned offset.
layout!(PlacedSocket, size 56, align 8, {
    service: ServiceKey = 0,
    backend: Backend = 20,
    counted: u32 = 40,
    placed: u32 = 44,
    load_epoch: u64 = 48,
});
// Socket-local storage value: a 20-byte key, the u32 flag swapped
// atomically (4-aligned), then a u64 at an 8-aligned offset.
layout!(AcceptedSocket, size 32, align 8, { backend: Backend = 0, counted: u32 = 20, load_epoch: u64 = 24 });
// Two u32s, then the u64 deadline at an 8-aligned offset; the hook copies it
// out whole, the agent replaces it in one map update.
layout!(BackendView, size 16, align 8, { load: u32 = 0, baseline: u32 = 4, expires_ns: u64 = 8 });
// Two 20-byte addresses, base_seq + explicit padding to put the 8-aligned
// 48-byte FrameTracker (checked in frame.rs) at 48.
layout!(TrackedConnection, size 96, align 8, {
    backend: Backend = 0,
    client: Backend = 20,
    base_seq: u32 = 40,
    _pad: u32 = 44,
    tracker: crate::frame::FrameTracker = 48,
});
// The two ends of a connection, the gate's lookup key built from the socket.
layout!(ConnectionKey, size 40, align 2, { local: Backend = 0, remote: Backend = 20 });
// Cookie, the writer's tgid, and the outcome the gate writes back.
layout!(Injection, size 16, align 8, { cookie: u64 = 0, injector_tgid: u32 = 8, outcome: u32 = 12 });
// A u64 timestamp and two u32 indexes.
layout!(MoveWaiting, size 16, align 8, { since_unix_ms: u64 = 0, reason: u32 = 8, cause: u32 = 12 });
// A length and 124 bytes: 128 in all, a round value size.
layout!(ServiceName, size 128, align 4, { len: u32 = 0, bytes: [u8; SERVICE_NAME_MAX] = 4 });
// One u32 switch in a one-entry array.
layout!(DataplaneConfig, size 4, align 4, { debug_log: u32 = 0 });
// The gate stores the outcome as the u32 `Injection::outcome`.
const _: () = assert!(core::mem::size_of::<InjectionOutcome>() == 4);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], Copy, and consist of integers and
    // byte arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendLoad {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for TrackedConnection {}
    unsafe impl aya::Pod for ConnectionKey {}
    unsafe impl aya::Pod for Injection {}
    unsafe impl aya::Pod for MoveWaiting {}
    unsafe impl aya::Pod for BackendView {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_sequence_numbers_across_the_wrap() {
        let mut c = TrackedConnection {
            backend: Backend::default(),
            client: Backend::default(),
            base_seq: u32::MAX - 10,
            _pad: 0,
            tracker: crate::frame::FrameTracker::new(),
        };
        assert_eq!(c.offset_of(u32::MAX - 10), 0);
        assert_eq!(c.offset_of(5), 16);
        // Before the first byte (a SYN-era number) clamps to 0.
        assert_eq!(c.offset_of(u32::MAX - 20), 0);
        c.tracker.observe(0, &[0; 3]);
        assert_eq!(c.offset_of((u32::MAX - 10).wrapping_add(3)), 3);
    }

    #[test]
    fn injection_outcomes_round_trip() {
        for o in [
            InjectionOutcome::Pending,
            InjectionOutcome::Passed,
            InjectionOutcome::NotGoaway,
            InjectionOutcome::SendQueueBusy,
            InjectionOutcome::NotAtBoundary,
            InjectionOutcome::NotTracked,
            InjectionOutcome::NoTcpState,
        ] {
            assert_eq!(InjectionOutcome::from_u32(o as u32), o);
        }
    }

    #[test]
    fn slot_alternates_with_generation() {
        let e = |g| ServiceEntry {
            generation: g,
            backend_count: 1,
        };
        assert_eq!(e(0).slot(), 0);
        assert_eq!(e(1).slot(), 1);
        assert_eq!(e(2).slot(), 0);
        assert_eq!(e(u32::MAX).slot(), 1);
    }

    #[test]
    fn service_name_truncates_on_char_boundary() {
        let long = "é".repeat(100);
        let n = ServiceName::new(&long);
        assert!(n.as_str().len() <= SERVICE_NAME_MAX);
        assert!(n.as_str().chars().all(|c| c == 'é'));
        assert_eq!(ServiceName::new("ns/svc:grpc").as_str(), "ns/svc:grpc");
    }
}
