//! Connection counting: a connection is counted in `BACKEND_LOAD` when the
//! connect hook places it, and uncounted exactly once, by whichever of its
//! ways out runs first: sock_ops TCP_CLOSE (failed, reset or closed),
//! cgroup/sock_release (the application closed it), or a new connect() of
//! the same socket. What a socket was counted in lives in its socket-local
//! storage (`PLACED_SOCKETS`); the protocol and why it loses no update are in
//! docs/architecture.md, "Connection counting".

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use grpclb_common::{Backend, BackendLoad, PlacedSocket, ServiceKey};

use crate::atomic::{decrement_to_zero, exchange, increment};
use crate::maps::{BACKEND_LOAD, PLACED_SOCKETS};

/// A +1 on one `BACKEND_LOAD` entry, or none (`load` null). Not an
/// `Option`: LLVM leaves the payload of a `None` uninitialized and spills it
/// anyway, which the verifier rejects (`!read_ok`).
#[derive(Clone, Copy)]
pub struct Count {
    /// The entry's value, as the lookup returned it.
    load: *mut BackendLoad,
    pub epoch: u64,
    /// Connections on the backend, this one included.
    pub connections: u64,
}

impl Count {
    pub const NONE: Count = Count {
        load: core::ptr::null_mut(),
        epoch: 0,
        connections: 0,
    };

    #[inline(always)]
    pub fn is_counted(&self) -> bool {
        !self.load.is_null()
    }
}

/// Counts a connection placed on `backend`; [`Count::NONE`] when the
/// backend has no entry (the agent creates one before it makes a backend
/// selectable).
#[inline(always)]
pub fn count(backend: &Backend) -> Count {
    let Some(load) = BACKEND_LOAD.get_ptr_mut(backend) else {
        return Count::NONE;
    };
    // SAFETY: map value pointer checked by the verifier.
    let before = increment(unsafe { &raw mut (*load).connections });
    Count {
        load,
        // SAFETY: as above; written once, when the agent created the entry.
        epoch: unsafe { core::ptr::read_volatile(&raw const (*load).epoch) },
        connections: before + 1,
    }
}

/// Takes back a count within the program run that made it: through the
/// same pointer, so the entry the +1 went to gets the -1.
#[inline(always)]
pub fn take_back(count: Count) {
    if count.is_counted() {
        // SAFETY: the pointer came from a lookup in this program run, which
        // keeps the memory alive (RCU).
        decrement_to_zero(unsafe { &raw mut (*count.load).connections });
    }
}

/// The storage of a socket being connected; created when `create`. `None`:
/// none yet (and not asked to create), or the kernel is out of memory.
#[inline(always)]
pub fn storage_of_addr(ctx: &SockAddrContext, create: bool) -> Option<*mut PlacedSocket> {
    // SAFETY: the kernel hands every sock_addr program a valid context whose
    // `sk` is never null.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    storage(sk.cast(), flags)
}

#[inline(always)]
fn storage_of_ops(ctx: &SockOpsContext) -> Option<*mut PlacedSocket> {
    // SAFETY: the kernel hands sock_ops programs a valid context.
    let sk: *mut bpf_sock = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // The verifier types `sk` as maybe-null: it must see the check.
    if sk.is_null() {
        return None;
    }
    storage(sk.cast(), 0)
}

#[inline(always)]
fn storage_of_sock(ctx: &SockContext) -> Option<*mut PlacedSocket> {
    // cgroup_sock programs pass their context itself as the socket.
    storage(ctx.as_ptr(), 0)
}

#[inline(always)]
fn storage(sk: *mut core::ffi::c_void, flags: u64) -> Option<*mut PlacedSocket> {
    PLACED_SOCKETS.get(sk, flags)
}

/// Remembers where a socket's connect() went and the count that placed it.
#[inline(always)]
pub fn remember(
    placed: *mut PlacedSocket,
    service: &ServiceKey,
    backend: &Backend,
    count: Count,
) {
    // SAFETY: socket storage pointer checked by the verifier. connect() runs
    // under the socket lock on a socket with no connection (TCP_CLOSE), so
    // no close path runs concurrently; the previous placement was uncounted
    // before this one was chosen.
    unsafe {
        (*placed).service = *service;
        (*placed).backend = *backend;
        (*placed).placed = 1;
        (*placed).load_epoch = count.epoch;
        (*placed).counted = u32::from(count.is_counted());
    }
}

/// A connect() that is not rewritten (or refused) on a socket placed before:
/// its earlier placement ends here.
#[inline(always)]
pub fn unplace(placed: *mut PlacedSocket) {
    uncount(placed);
    // SAFETY: socket storage pointer checked by the verifier.
    unsafe { (*placed).placed = 0 };
}

/// Uncounts a socket if it is counted: the swap of `counted` lets exactly one
/// caller through, and only the entry with the epoch it was counted in is
/// decremented (an entry the agent created again since is someone else's).
#[inline(always)]
pub fn uncount(placed: *mut PlacedSocket) {
    // SAFETY: socket storage pointer checked by the verifier; it lives as
    // long as the socket.
    if exchange(unsafe { &raw mut (*placed).counted }, 0) != 1 {
        return;
    }
    // SAFETY: as above; only connect() writes these, before `counted`.
    let (backend, epoch) = unsafe { ((*placed).backend, (*placed).load_epoch) };
    let Some(load) = BACKEND_LOAD.get_ptr_mut(backend) else {
        return;
    };
    // SAFETY: map value pointer checked by the verifier.
    if unsafe { core::ptr::read_volatile(&raw const (*load).epoch) } == epoch {
        // SAFETY: as above.
        decrement_to_zero(unsafe { &raw mut (*load).connections });
    }
}

/// The frontend a rewritten socket asked for.
#[inline(always)]
pub fn frontend_of(ctx: &SockAddrContext) -> Option<ServiceKey> {
    let placed = storage_of_addr(ctx, false)?;
    // SAFETY: socket storage pointer checked by the verifier.
    unsafe { ((*placed).placed == 1).then(|| (*placed).service) }
}

/// True for a socket whose connect() was rewritten.
#[inline(always)]
pub fn is_placed(ctx: &SockOpsContext) -> bool {
    // SAFETY: socket storage pointer checked by the verifier.
    storage_of_ops(ctx).is_some_and(|placed| unsafe { (*placed).placed == 1 })
}

/// sock_ops: the connection reached TCP_CLOSE (refused, reset, closed).
#[inline(always)]
pub fn closed(ctx: &SockOpsContext) {
    if let Some(placed) = storage_of_ops(ctx) {
        uncount(placed);
    }
}

/// cgroup/sock_release: the application closed the socket.
#[inline(always)]
pub fn released(ctx: &SockContext) {
    if let Some(placed) = storage_of_sock(ctx) {
        uncount(placed);
    }
}
