//! grpclb kernel programs, attached to one cgroup v2 directory (a node's pods):
//!
//! - `cgroup/connect4`, `cgroup/connect6`: a TCP connect() to a balanced
//!   Service frontend goes to the least-loaded backend instead.
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: a rewritten socket reports
//!   the frontend it asked for.
//! - `sockops`: counts established rewritten connections per backend.
//! - `cgroup/sock_release`: the last chance to uncount a closing socket.
//! - `cgroup_skb/egress`: follows the HTTP/2 frames local server pods send.
//! - `sk_msg` on `INJECTION_GATE`: lets the agent's GOAWAY into a connection
//!   only at a verified frame boundary.
//!
//! The maps and the protocol between these programs and the agent are in
//! `maps.rs` and docs/architecture.md.

#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod balance;
mod gate;
mod maps;
mod sockets;
mod tracking;

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::bpf_set_retval,
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::info;
use grpclb_common::{Addr, Backend, ServiceKey};

use balance::{choose, Verdict};

/// sock_addr programs: 1 lets the call proceed; 0 fails it with the errno set
/// by `bpf_set_retval` (EPERM if none).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const IPPROTO_TCP: u32 = 6;

// sock_ops callbacks and TCP states (include/uapi/linux/bpf.h, net/tcp_states.h).
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const TCP_CLOSE: u32 = 7;

#[cgroup_sock_addr(connect4)]
pub fn balance_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP {
        return PROCEED;
    }
    let service = ServiceKey::new(Addr::from_v4_raw(addr.user_ip4), port_of(addr));
    match choose(&service) {
        Verdict::Untouched => PROCEED,
        Verdict::Refuse => refuse(),
        // A v6 backend cannot take a v4 connect; the agent never pairs them.
        Verdict::Rewrite(backend) if !backend.addr.is_v4() => refuse(),
        Verdict::Rewrite(backend) => {
            addr.user_ip4 = backend.addr.v4_raw();
            set_port(addr, backend.port);
            remember(&ctx, &service, &backend);
            PROCEED
        }
    }
}

/// Also sees IPv4 targets connected through AF_INET6 sockets as
/// `::ffff:a.b.c.d`, which is how frontends and backends are keyed anyway.
#[cgroup_sock_addr(connect6)]
pub fn balance_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP {
        return PROCEED;
    }
    let requested = Addr::from_v6_words(addr.user_ip6);
    let service = ServiceKey::new(requested, port_of(addr));
    match choose(&service) {
        Verdict::Untouched => PROCEED,
        Verdict::Refuse => refuse(),
        Verdict::Rewrite(backend) => {
            addr.user_ip6 = backend.addr.v6_words();
            set_port(addr, backend.port);
            remember(&ctx, &service, &backend);
            PROCEED
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn report_frontend4(ctx: SockAddrContext) -> i32 {
    if let Some(service) = sockets::frontend_of(sockets::cookie_of_addr(&ctx)) {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip4 = service.addr.v4_raw();
        set_port(addr, service.port);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn report_frontend6(ctx: SockAddrContext) -> i32 {
    if let Some(service) = sockets::frontend_of(sockets::cookie_of_addr(&ctx)) {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip6 = service.addr.v6_words();
        set_port(addr, service.port);
    }
    PROCEED
}

/// Named `count_connections`, not `sockops`: a program must not share its
/// name with its ELF section.
#[sock_ops]
pub fn count_connections(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if sockets::is_rewritten(sockets::cookie_of_ops(&ctx)) {
                // Ask for state callbacks so the close is seen; failure only
                // leaves the uncounting to sock_release.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => sockets::count(sockets::cookie_of_ops(&ctx)),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if tracking::start(&ctx, sockets::cookie_of_ops(&ctx)) {
                // The state callback ends the tracking at close.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let cookie = sockets::cookie_of_ops(&ctx);
            sockets::forget(cookie);
            tracking::stop(cookie);
        }
        _ => {}
    }
    1
}

#[cgroup_sock(sock_release)]
pub fn forget_released(ctx: SockContext) -> i32 {
    let cookie = sockets::cookie_of_sock(&ctx);
    sockets::forget(cookie);
    tracking::stop(cookie);
    PROCEED
}

/// Never drops anything: it only watches.
#[cgroup_skb(egress)]
pub fn track_frames(ctx: SkBuffContext) -> i32 {
    tracking::observe(&ctx);
    PROCEED
}

/// Attached to `INJECTION_GATE`, not to the cgroup.
#[sk_msg]
pub fn gate_goaway(ctx: SkMsgContext) -> u32 {
    gate::verdict(&ctx)
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper without preconditions; allowed in cgroup programs.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_of(addr: &bpf_sock_addr) -> u16 {
    u16::from_be(addr.user_port as u16)
}

#[inline(always)]
fn set_port(addr: &mut bpf_sock_addr, port: u16) {
    addr.user_port = port.to_be() as u32;
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, service: &ServiceKey, backend: &Backend) {
    sockets::remember(sockets::cookie_of_addr(ctx), service, backend);
    if maps::debug_log_enabled() {
        info!(
            ctx,
            "connect to port {} rewritten to [{:i}]:{}", service.port, backend.addr.0, backend.port
        );
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
