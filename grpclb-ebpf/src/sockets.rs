//! The life of a rewritten socket in `SOCKETS` and `BACKEND_LOAD`:
//! remembered at connect, counted once established, uncounted and forgotten
//! by whichever close path (sock_ops TCP_CLOSE or sock_release) runs first.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use grpclb_common::{Backend, RewrittenSocket, ServiceKey};

use crate::atomic::{decrement_to_zero, exchange, increment};
use crate::maps::{BACKEND_LOAD, SOCKETS};

#[inline(always)]
pub fn cookie_of_addr(ctx: &SockAddrContext) -> u64 {
    // SAFETY: sock_addr contexts are valid cookie sources.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

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

/// Records where a socket's connect() went. When the map is full the socket
/// stays balanced but is neither counted nor reported by getpeername.
#[inline(always)]
pub fn remember(cookie: u64, service: &ServiceKey, backend: &Backend) {
    let socket = RewrittenSocket {
        service: *service,
        backend: *backend,
        counted: 0,
        _pad: 0,
    };
    let _ = SOCKETS.insert(cookie, socket, 0);
}

#[inline(always)]
pub fn is_rewritten(cookie: u64) -> bool {
    // SAFETY: only presence is checked.
    unsafe { SOCKETS.get(cookie) }.is_some()
}

#[inline(always)]
pub fn frontend_of(cookie: u64) -> Option<ServiceKey> {
    // SAFETY: the value is copied out at once.
    unsafe { SOCKETS.get(cookie) }.map(|socket| socket.service)
}

/// Counts an established connection against its backend, once. Backends the
/// agent has no load entry for (just removed) are not counted.
#[inline(always)]
pub fn count(cookie: u64) {
    let Some(socket) = SOCKETS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: map value pointer checked by the verifier.
    let backend = unsafe { (*socket).backend };
    let Some(load) = BACKEND_LOAD.get_ptr_mut(backend) else {
        return;
    };
    // SAFETY: as above; the exchange makes a second ESTABLISHED callback a no-op.
    if exchange(unsafe { &raw mut (*socket).counted }, 1) == 0 {
        increment(load);
    }
}

/// Uncounts (if counted) and forgets a closing socket. Both close paths call
/// this; the exchange on `counted` lets only one of them decrement.
#[inline(always)]
pub fn forget(cookie: u64) {
    let Some(socket) = SOCKETS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: map value pointer checked by the verifier.
    let was_counted = exchange(unsafe { &raw mut (*socket).counted }, 0) == 1;
    if was_counted {
        // SAFETY: as above.
        let backend = unsafe { (*socket).backend };
        if let Some(load) = BACKEND_LOAD.get_ptr_mut(backend) {
            decrement_to_zero(load);
        }
    }
    let _ = SOCKETS.remove(cookie);
}
