//! Following the HTTP/2 frames local server pods send, from the segments
//! leaving the node (cgroup_skb/egress): every segment carries its TCP
//! sequence number, so the tracker sees the stream at exact offsets,
//! retransmissions included (docs/rebalancing.md).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_socket_cookie, bpf_loop, bpf_skb_load_bytes},
    programs::{SkBuffContext, SockContext, SockOpsContext},
    EbpfContext,
};
use grpclb_common::{frame::FrameTracker, frame::FRAME_HEADER_LEN, Addr, TrackedConnection};

use crate::maps::TRACKED;
use crate::serving::Accepted;

pub const AF_INET: u32 = 2;
const IPPROTO_TCP: u8 = 6;
/// Tracker steps per segment: a 64 KiB GSO segment of small frames needs
/// two per frame. Bytes left unwalked show up as a gap: untracked, never wrong.
const MAX_STEPS_PER_SEGMENT: u32 = 8192;

#[inline(always)]
pub fn cookie_of_ops(ctx: &SockOpsContext) -> u64 {
    // SAFETY: sock_ops contexts are valid cookie sources.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
pub fn cookie_of_sock(ctx: &SockContext) -> u64 {
    // SAFETY: cgroup sock contexts are valid cookie sources.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// sock_ops PASSIVE_ESTABLISHED: starts tracking a connection a local backend
/// of a Service that tracks frames accepted. Returns true when it did.
#[inline(always)]
pub fn start(ctx: &SockOpsContext, cookie: u64, accepted: &Accepted) -> bool {
    // SAFETY: the kernel hands sock_ops programs a valid context.
    let ops = unsafe { &*ctx.ops };
    let connection = TrackedConnection {
        backend: accepted.backend,
        client: accepted.client,
        base_seq: ops.snd_nxt,
        _pad: 0,
        tracker: FrameTracker::new(),
    };
    TRACKED.insert(cookie, connection, 0).is_ok()
}

/// An IPv6 address from a context field, word by word: the verifier only
/// allows context loads at constant offsets from the context pointer itself.
#[inline(always)]
pub fn context_addr6(words: &[u32; 4]) -> Addr {
    // SAFETY: reads of a context field the caller borrowed.
    unsafe {
        Addr::from_v6_words([
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ])
    }
}

/// A context's `remote_port`: the kernel loads the network-order port and
/// shifts it into the high half (sock_ops and sk_msg alike).
#[inline(always)]
pub fn remote_port(raw: u32) -> u16 {
    u32::from_be(raw) as u16
}

#[inline(always)]
pub fn stop(cookie: u64) {
    let _ = TRACKED.remove(cookie);
}

/// A TCP segment's payload: where it starts in the skb, how long, and its
/// sequence number.
struct Segment {
    payload_offset: u32,
    len: u32,
    seq: u32,
}

#[inline(always)]
fn segment(ctx: &SkBuffContext) -> Option<Segment> {
    let first: u8 = ctx.load(0).ok()?;
    let (ip_len, protocol) = match first >> 4 {
        4 => (((first & 0xf) as usize) * 4, ctx.load::<u8>(9).ok()?),
        // IPv6 without extension headers; others stay untracked.
        6 => (40, ctx.load::<u8>(6).ok()?),
        _ => return None,
    };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let seq = u32::from_be(ctx.load::<u32>(ip_len + 4).ok()?);
    let data_offset = ((ctx.load::<u8>(ip_len + 12).ok()? >> 4) as usize) * 4;
    let payload_offset = (ip_len + data_offset) as u32;
    let len = ctx.len().checked_sub(payload_offset)?;
    Some(Segment {
        payload_offset,
        len,
        seq,
    })
}

/// cgroup_skb/egress: feeds a tracked connection's segment to its tracker.
#[inline(always)]
pub fn observe(ctx: &SkBuffContext) {
    // SAFETY: cgroup_skb contexts are valid cookie sources.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(connection) = TRACKED.get_ptr_mut(cookie) else {
        return;
    };
    let Some(segment) = segment(ctx) else { return };
    if segment.len == 0 {
        return;
    }
    // SAFETY: map value pointer checked by the verifier.
    let offset = unsafe { (*connection).offset_of(segment.seq) };
    let mut walk = Walk {
        skb: ctx.skb.skb,
        connection,
        payload_offset: segment.payload_offset,
        len: segment.len,
        done: 0,
        offset,
    };
    // SAFETY: the callback only uses `walk`, alive for the whole loop.
    unsafe {
        bpf_loop(
            MAX_STEPS_PER_SEGMENT,
            walk_step as *mut c_void,
            &raw mut walk as *mut c_void,
            0,
        )
    };
}

/// The loop's state. The context and map value pointers keep their types
/// through the stack, so the callback needs no map lookup of its own.
struct Walk {
    skb: *mut __sk_buff,
    connection: *mut TrackedConnection,
    payload_offset: u32,
    len: u32,
    done: u32,
    offset: u64,
}

/// `bpf_loop` callback: one tracker step over the rest of the segment;
/// 1 stops the loop.
extern "C" fn walk_step(_index: u64, walk: *mut c_void) -> i64 {
    // SAFETY: `walk` is the `Walk` on `observe`'s stack.
    let walk = unsafe { &mut *(walk as *mut Walk) };
    if walk.done >= walk.len {
        return 1;
    }
    let skb = walk.skb;
    let at = walk.payload_offset + walk.done;
    // SAFETY: map value pointer checked by the verifier in `observe`; the
    // entry is freed only after an RCU grace period, so it outlives the loop.
    let tracker = unsafe { &mut (*walk.connection).tracker };
    let used = tracker.step_with(
        walk.offset + u64::from(walk.done),
        (walk.len - walk.done) as usize,
        |buf, count| read(skb, at, buf, count),
    );
    if used == 0 {
        return 1;
    }
    walk.done += used as u32;
    0
}

#[inline(always)]
fn read(skb: *mut __sk_buff, at: u32, buf: &mut [u8; FRAME_HEADER_LEN], count: usize) -> bool {
    // The verifier must see a length in 1..=9 in the very register passed to
    // the helper; the volatile read keeps LLVM from folding `extra + 1` back
    // into `count`, whose lower bound it would not carry over.
    // SAFETY: a read of a local.
    let extra = unsafe { core::ptr::read_volatile(&count.wrapping_sub(1)) };
    if extra >= FRAME_HEADER_LEN {
        return false;
    }
    let len = extra as u32 + 1;
    // SAFETY: `buf` has room for `len` (1..=9) bytes.
    unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            at,
            buf.as_mut_ptr() as *mut c_void,
            len,
        ) == 0
    }
}
