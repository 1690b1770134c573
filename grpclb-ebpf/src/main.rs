//! grpclb kernel programs, attached to one cgroup v2 directory (a node's pods):
//!
//! - `cgroup/connect4`, `cgroup/connect6`: a TCP connect() to a balanced
//!   Service frontend goes to the least-loaded backend instead (by the
//!   Service-wide view of its load where the agent wrote a fresh one).
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: a rewritten socket reports
//!   the frontend it asked for.
//! - `sockops`: uncounts a rewritten connection when it closes or fails;
//!   counts the connections local backends accept (and uncounts them when
//!   they close); starts the frame tracking of those whose Service asks.
//! - `cgroup/sock_release`: uncounts a rewritten or accepted socket the
//!   application closes.
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
mod counting;
mod gate;
mod maps;
mod serving;
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
use counting::Count;

/// sock_addr programs: 1 lets the call proceed; 0 fails it with the errno set
/// by `bpf_set_retval` (EPERM if none).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const IPPROTO_TCP: u32 = 6;

// sock_ops callbacks and TCP states (include/uapi/linux/bpf.h, net/tcp_states.h).
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
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
        Verdict::Rewrite(backend, count) if backend.addr.is_v4() => {
            addr.user_ip4 = backend.addr.v4_raw();
            set_port(addr, backend.port);
            place(&ctx, &service, &backend, count);
            PROCEED
        }
        // A v6 backend cannot take a v4 connect; the agent never pairs them.
        Verdict::Rewrite(_, count) => {
            counting::take_back(count);
            not_placed(&ctx);
            refuse()
        }
        Verdict::Refuse => {
            not_placed(&ctx);
            refuse()
        }
        Verdict::Untouched => {
            not_placed(&ctx);
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
        Verdict::Rewrite(backend, count) => {
            addr.user_ip6 = backend.addr.v6_words();
            set_port(addr, backend.port);
            place(&ctx, &service, &backend, count);
            PROCEED
        }
        Verdict::Refuse => {
            not_placed(&ctx);
            refuse()
        }
        Verdict::Untouched => {
            not_placed(&ctx);
            PROCEED
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn report_frontend4(ctx: SockAddrContext) -> i32 {
    if let Some(service) = counting::frontend_of(&ctx) {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip4 = service.addr.v4_raw();
        set_port(addr, service.port);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn report_frontend6(ctx: SockAddrContext) -> i32 {
    if let Some(service) = counting::frontend_of(&ctx) {
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
            if counting::is_placed(&ctx) {
                // Ask for state callbacks so a failed or reset connection is
                // uncounted when it closes, not when the application closes
                // the socket; failure only leaves that to sock_release.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if let Some(accepted) = serving::accepted(&ctx) {
                if accepted.track_frames {
                    let _ = tracking::start(&ctx, tracking::cookie_of_ops(&ctx), &accepted);
                }
                // The state callback uncounts it (and ends its tracking)
                // when it closes, even if the application never accepted it.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            counting::closed(&ctx);
            serving::closed(&ctx);
            tracking::stop(tracking::cookie_of_ops(&ctx));
        }
        _ => {}
    }
    1
}

#[cgroup_sock(sock_release)]
pub fn forget_released(ctx: SockContext) -> i32 {
    counting::released(&ctx);
    serving::released(&ctx);
    tracking::stop(tracking::cookie_of_sock(&ctx));
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

/// Remembers the placement in the socket's storage; without storage (out of
/// memory) the connection stays balanced but cannot be uncounted, so its
/// count is taken back at once.
#[inline(always)]
fn place(ctx: &SockAddrContext, service: &ServiceKey, backend: &Backend, count: Count) {
    let connections = count.connections;
    match counting::storage_of_addr(ctx, true) {
        Some(placed) => {
            // A socket connecting again: its earlier placement ends first.
            counting::uncount(placed);
            counting::remember(placed, service, backend, count);
        }
        None => counting::take_back(count),
    }
    if maps::debug_log_enabled() {
        info!(
            ctx,
            "connect to port {} rewritten to [{:i}]:{} ({} connections)",
            service.port,
            backend.addr.0,
            backend.port,
            connections
        );
    }
}

/// A connect() that is not rewritten: a placement from an earlier connect()
/// of the same socket ends.
#[inline(always)]
fn not_placed(ctx: &SockAddrContext) {
    if let Some(placed) = counting::storage_of_addr(ctx, false) {
        counting::unplace(placed);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
