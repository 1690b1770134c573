//! Server-side counting: the established connections each local backend
//! accepted (`LOCAL_LOAD`), from whichever node they came, which is the
//! pod's load as this node reports it to the other agents. The protocol is
//! connect-side counting's (`counting`), from the other end: +1 at sock_ops
//! PASSIVE_ESTABLISHED, -1 exactly once by whichever way out runs first
//! (sock_ops state -> TCP_CLOSE, cgroup/sock_release), through the swap of
//! `counted` in the accepted socket's storage (`ACCEPTED_SOCKETS`), only on
//! the entry with the epoch it was counted in, never below 0.
//!
//! Every local backend of a balanced Service is counted; frame tracking
//! stays opt-in per Service (`local_backend::TRACK_FRAMES`).

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    programs::{SockContext, SockOpsContext},
    EbpfContext,
};
use grpclb_common::{local_backend, AcceptedSocket, Addr, Backend};

use crate::atomic::{decrement_to_zero, exchange, increment};
use crate::maps::{ACCEPTED_SOCKETS, LOCAL_BACKENDS, LOCAL_LOAD};
use crate::tracking::{context_addr6, remote_port, AF_INET};

/// A connection a local backend accepted.
pub struct Accepted {
    /// The local pod address and port that accepted it.
    pub backend: Backend,
    pub client: Backend,
    /// Its frames are to be followed.
    pub track_frames: bool,
}

/// sock_ops PASSIVE_ESTABLISHED: counts the connection if a local backend
/// of a balanced Service accepted it. `None`: not one of ours.
#[inline(always)]
pub fn accepted(ctx: &SockOpsContext) -> Option<Accepted> {
    // SAFETY: the kernel hands sock_ops programs a valid context.
    let ops = unsafe { &*ctx.ops };
    let (local, remote) = if ops.family == AF_INET {
        (Addr::from_v4_raw(ops.local_ip4), Addr::from_v4_raw(ops.remote_ip4))
    } else {
        (context_addr6(&ops.local_ip6), context_addr6(&ops.remote_ip6))
    };
    // local_port is in host byte order (unlike remote_port).
    let backend = Backend::new(local, ops.local_port as u16);
    // SAFETY: the value is copied out at once.
    let flags = unsafe { LOCAL_BACKENDS.get(backend) }.copied()?;
    count(ctx, &backend);
    Some(Accepted {
        backend,
        client: Backend::new(remote, remote_port(ops.remote_port)),
        track_frames: flags & local_backend::TRACK_FRAMES != 0,
    })
}

/// +1 on `LOCAL_LOAD[backend]`, remembered in the socket's storage; without
/// an entry (the agent creates it first) nothing is counted, without
/// storage (out of memory) the count is taken back at once, as it could
/// never be uncounted.
#[inline(always)]
fn count(ctx: &SockOpsContext, backend: &Backend) {
    let Some(load) = LOCAL_LOAD.get_ptr_mut(backend) else {
        return;
    };
    // SAFETY: map value pointer checked by the verifier; the epoch is
    // written once, when the agent created the entry.
    let epoch = unsafe { core::ptr::read_volatile(&raw const (*load).epoch) };
    // SAFETY: as above.
    increment(unsafe { &raw mut (*load).connections });
    let Some(accepted) = storage_of_ops(ctx, u64::from(BPF_SK_STORAGE_GET_F_CREATE)) else {
        // SAFETY: as above: the pointer is from this program run (RCU).
        decrement_to_zero(unsafe { &raw mut (*load).connections });
        return;
    };
    // SAFETY: socket storage pointer checked by the verifier. A new socket's
    // storage: no close path has run on it yet (sock_ops callbacks of one
    // socket run under its lock, and it has no file to release yet).
    unsafe {
        (*accepted).backend = *backend;
        (*accepted).load_epoch = epoch;
        (*accepted).counted = 1;
    }
}

/// Uncounts an accepted socket if it is counted: the swap of `counted` lets
/// exactly one way out through.
#[inline(always)]
fn uncount(accepted: *mut AcceptedSocket) {
    // SAFETY: socket storage pointer checked by the verifier; it lives as
    // long as the socket.
    if exchange(unsafe { &raw mut (*accepted).counted }, 0) != 1 {
        return;
    }
    // SAFETY: as above; written once, at PASSIVE_ESTABLISHED, before `counted`.
    let (backend, epoch) = unsafe { ((*accepted).backend, (*accepted).load_epoch) };
    let Some(load) = LOCAL_LOAD.get_ptr_mut(backend) else {
        return;
    };
    // SAFETY: map value pointer checked by the verifier.
    if unsafe { core::ptr::read_volatile(&raw const (*load).epoch) } == epoch {
        // SAFETY: as above.
        decrement_to_zero(unsafe { &raw mut (*load).connections });
    }
}

#[inline(always)]
fn storage_of_ops(ctx: &SockOpsContext, flags: u64) -> Option<*mut AcceptedSocket> {
    // SAFETY: the kernel hands sock_ops programs a valid context.
    let sk: *mut bpf_sock = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // The verifier types `sk` as maybe-null: it must see the check.
    if sk.is_null() {
        return None;
    }
    ACCEPTED_SOCKETS.get(sk.cast(), flags)
}

/// sock_ops: the connection reached TCP_CLOSE (reset, closed, or never
/// accepted by an application whose listener closed).
#[inline(always)]
pub fn closed(ctx: &SockOpsContext) {
    if let Some(accepted) = storage_of_ops(ctx, 0) {
        uncount(accepted);
    }
}

/// cgroup/sock_release: the server application closed the socket.
#[inline(always)]
pub fn released(ctx: &SockContext) {
    // cgroup_sock programs pass their context itself as the socket.
    if let Some(accepted) = ACCEPTED_SOCKETS.get(ctx.as_ptr(), 0) {
        uncount(accepted);
    }
}
