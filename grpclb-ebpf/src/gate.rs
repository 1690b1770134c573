//! The GOAWAY gate: an sk_msg program on `INJECTION_GATE`, the only way a
//! GOAWAY enters a connection. The agent puts a tracked server socket in the
//! map only for the moment it writes the 17 bytes itself, so the application's
//! own sends pay the sk_msg path for microseconds, not for the connection's
//! life (docs/rebalancing.md).
//!
//! The gate runs under the socket lock, like every send and every transmit of
//! the egress tracker, so what it checks cannot change before the bytes are
//! queued: the GOAWAY goes at `write_seq`, which must be a frame boundary the
//! egress tracker can vouch for. It has seen every byte up to `snd_nxt`; so
//! either nothing is unsent (`write_seq == snd_nxt`) and the tracker is at a
//! boundary, or the unsent bytes are exactly the rest of the frame being
//! sent, whose end the tracker knows from its header
//! (`FrameTracker::can_inject_after`).
//!
//! tcp_bpf keeps a verdict for the next message when a send fails (a DROP
//! always, a PASS whose push failed), skipping the program. So the gate never
//! drops: a refused GOAWAY is cut out of its message (`msg_pop_data`), and
//! the application's messages meanwhile are redirected to their own socket,
//! the one path that clears the kept verdict even when the push fails. The
//! injector's message is therefore always judged.

use aya_ebpf::{
    bindings::sk_msg_md,
    helpers::{bpf_get_current_pid_tgid, bpf_msg_pull_data, bpf_skc_to_tcp_sock},
    programs::SkMsgContext,
};
use grpclb_common::{
    frame::GOAWAY, Addr, Backend, ConnectionKey, InjectionOutcome, TrackedConnection,
};

use crate::maps::{INJECTIONS, INJECTION_GATE, TRACKED};
use crate::tracking::{context_addr6, remote_port, AF_INET};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

/// Byte offsets of `write_seq` and `snd_nxt` in `struct tcp_sock`, which
/// differ between kernels. The agent reads them from the kernel's BTF and
/// sets them before loading; `.rodata` is frozen, so the verifier knows them
/// as constants and checks each load as a fixed-offset BTF field access.
#[no_mangle]
static TCP_SOCK_WRITE_SEQ_OFFSET: u32 = 0;
#[no_mangle]
static TCP_SOCK_SND_NXT_OFFSET: u32 = 0;

/// Judges the injector's 17 bytes to a connection it announced in
/// `INJECTIONS` (writing the decision back for the agent) and sends every
/// other message of that connection on unchanged.
#[inline(always)]
pub fn verdict(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the kernel hands sk_msg programs a valid context.
    let md = unsafe { &*ctx.msg };
    let Some(injection) = INJECTIONS.get_ptr_mut(connection_key(md)) else {
        return SK_PASS;
    };
    // SAFETY: helper without preconditions; the map value pointer was checked.
    let (tgid, injector, mut cookie) = unsafe {
        (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            (*injection).injector_tgid,
            (*injection).cookie,
        )
    };
    if tgid != injector || ctx.size() != GOAWAY.len() as u32 {
        // The application's own: redirected to where it was going anyway.
        // If the socket cannot be a redirect target (no longer established)
        // the helper answers "drop"; it passes all the same, the
        // application's data must go.
        let _ = INJECTION_GATE.redirect_msg(ctx, &mut cookie, 0);
        return SK_PASS;
    }
    let outcome = judge(ctx, md, cookie);
    // SAFETY: map value pointer checked above.
    unsafe { (*injection).outcome = outcome as u32 };
    if outcome == InjectionOutcome::Passed {
        return SK_PASS;
    }
    // Nothing of it goes out; the send still "succeeds". Kernels before 6.12
    // cannot pop a whole message: then drop, which may fail one later send
    // of the application but never puts a byte in the wrong place.
    match ctx.pop_data(0, GOAWAY.len() as u32, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

#[inline(always)]
fn judge(ctx: &SkMsgContext, md: &sk_msg_md, cookie: u64) -> InjectionOutcome {
    if !is_goaway(ctx) {
        return InjectionOutcome::NotGoaway;
    }
    let Some((write_seq, snd_nxt)) = send_sequence(md) else {
        return InjectionOutcome::NoTcpState;
    };
    let Some(connection) = TRACKED.get_ptr_mut(cookie) else {
        return InjectionOutcome::NotTracked;
    };
    // SAFETY: map value pointer checked by the verifier; the socket lock
    // keeps the egress tracker off this entry meanwhile.
    let connection: &mut TrackedConnection = unsafe { &mut *connection };
    let (sent, written) = (
        connection.offset_of(snd_nxt),
        connection.offset_of(write_seq),
    );
    if connection.tracker.claim_injection(sent, written) {
        InjectionOutcome::Passed
    } else if written != sent {
        InjectionOutcome::SendQueueBusy
    } else {
        InjectionOutcome::NotAtBoundary
    }
}

/// The message's 17 bytes equal grpclb's GOAWAY frame.
#[inline(always)]
fn is_goaway(ctx: &SkMsgContext) -> bool {
    let len = GOAWAY.len();
    if ctx.data() + len > ctx.data_end() {
        // The bytes may sit in more than one page: make them one run.
        // SAFETY: a helper call on the program's own context.
        if unsafe { bpf_msg_pull_data(ctx.msg, 0, len as u32, 0) } != 0 {
            return false;
        }
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + len > end {
        return false;
    }
    let bytes = data as *const u8;
    let mut i = 0;
    while i < len {
        // SAFETY: within [data, data + len), checked against data_end.
        if unsafe { *bytes.add(i) } != GOAWAY[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `(write_seq, snd_nxt)` of the message's TCP socket.
#[inline(always)]
fn send_sequence(md: &sk_msg_md) -> Option<(u32, u32)> {
    // SAFETY: reads of frozen globals.
    let (write_seq_at, snd_nxt_at) = unsafe {
        (
            core::ptr::read_volatile(&TCP_SOCK_WRITE_SEQ_OFFSET),
            core::ptr::read_volatile(&TCP_SOCK_SND_NXT_OFFSET),
        )
    };
    if write_seq_at == 0 || snd_nxt_at == 0 {
        return None;
    }
    // SAFETY: the context's socket pointer goes to a helper that checks it.
    let tcp = unsafe { bpf_skc_to_tcp_sock(md.__bindgen_anon_3.sk as *mut _) } as *const u8;
    if tcp.is_null() {
        return None;
    }
    // SAFETY: BTF-checked loads of two u32 fields of `struct tcp_sock`.
    unsafe {
        Some((
            core::ptr::read_volatile(tcp.add(write_seq_at as usize) as *const u32),
            core::ptr::read_volatile(tcp.add(snd_nxt_at as usize) as *const u32),
        ))
    }
}

/// The connection as the server sees it, keyed like `TrackedConnection`.
#[inline(always)]
fn connection_key(md: &sk_msg_md) -> ConnectionKey {
    let (local, remote) = if md.family == AF_INET {
        (Addr::from_v4_raw(md.local_ip4), Addr::from_v4_raw(md.remote_ip4))
    } else {
        (context_addr6(&md.local_ip6), context_addr6(&md.remote_ip6))
    };
    ConnectionKey {
        local: Backend::new(local, md.local_port as u16),
        remote: Backend::new(remote, remote_port(md.remote_port)),
    }
}
