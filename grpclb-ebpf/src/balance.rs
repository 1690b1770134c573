//! Choosing a backend for a frontend, consistently with the agent's
//! two-slot replacement protocol, and counting the connection on it in the
//! same step (docs/architecture.md). Backends compare by effective load:
//! this node's count, or the Service-wide view the agent wrote in
//! `BACKEND_VIEW` while it is fresh (`grpclb_common::effective_load`).

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop};
use grpclb_common::{
    effective_load, two_choices, Backend, BackendSlotKey, BackendView, LeastLoaded, ServiceEntry,
    ServiceKey, FULL_SCAN_MAX,
};

use crate::counting::{self, Count};
use crate::maps::{BACKEND_LOAD, BACKEND_SLOTS, BACKEND_VIEW, FRONTENDS};

/// What to do with a connect() to some destination.
pub enum Verdict {
    /// Not a balanced frontend: leave the connect alone.
    Untouched,
    /// A balanced frontend with no backends: fail with ECONNREFUSED.
    Refuse,
    /// Connect to this backend instead; the connection is counted on it
    /// unless the backend has no load entry.
    Rewrite(Backend, Count),
}

/// Selections restarted because the agent replaced the backend set meanwhile.
/// Each replacement is a user-space map update, so several in a row within one
/// connect() do not happen in practice; the bound only satisfies the verifier.
const MAX_ATTEMPTS: u32 = 4;

#[inline(always)]
pub fn choose(service: &ServiceKey) -> Verdict {
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        let Some(entry) = frontend(service) else {
            return Verdict::Untouched;
        };
        if entry.backend_count == 0 {
            return Verdict::Refuse;
        }
        let slot = entry.slot();
        let chosen = select(service, slot, entry.backend_count)
            .and_then(|index| backend_at(service, slot, index));
        // Counted before the generation is read again: if the set is still
        // the one we selected from, the count happened while the backend
        // was live, so the agent (which removes a load entry only once its
        // backend is in no live set and its count reads 0) sees it. The
        // slot we read from stays untouched until the generation after
        // next, so an unchanged generation also means the backend belongs
        // to the set we selected from.
        let count = chosen.as_ref().map_or(Count::NONE, counting::count);
        let unchanged = frontend(service).is_some_and(|now| now.generation == entry.generation);
        if let (Some(backend), true) = (chosen, unchanged) {
            return Verdict::Rewrite(backend, count);
        }
        counting::take_back(count);
        attempt += 1;
    }
    Verdict::Refuse
}

/// `grpclb_common::select_backend`, with its full scan driven by `bpf_loop`:
/// the verifier checks the loop body once instead of every unrolled path.
#[inline(always)]
fn select(service: &ServiceKey, slot: u32, count: u32) -> Option<u32> {
    // One clock read per connect: every candidate's view is judged at the
    // same instant.
    let now_ns = monotonic_ns();
    if count > FULL_SCAN_MAX {
        let mut load = |index| backend_load(service, slot, index, now_ns);
        return Some(two_choices(count, &mut load, &mut random));
    }
    let mut scan = Scan {
        service: *service,
        slot,
        now_ns,
        least: LeastLoaded::new(),
    };
    // SAFETY: the callback only reads `scan` through the pointer passed along.
    unsafe {
        bpf_loop(
            count,
            consider_backend as *mut c_void,
            &raw mut scan as *mut c_void,
            0,
        )
    };
    scan.least.chosen()
}

/// What one `bpf_loop` iteration of the full scan needs.
struct Scan {
    service: ServiceKey,
    slot: u32,
    now_ns: u64,
    least: LeastLoaded,
}

/// `bpf_loop` callback: considers backend `index`; 0 means "continue".
extern "C" fn consider_backend(index: u64, scan: *mut c_void) -> i64 {
    // SAFETY: `scan` is the `Scan` on `select`'s stack, alive for the loop.
    let scan = unsafe { &mut *(scan as *mut Scan) };
    let index = index as u32;
    let load = backend_load(&scan.service, scan.slot, index, scan.now_ns);
    scan.least.consider(index, load, &mut random);
    0
}

#[inline(always)]
fn frontend(service: &ServiceKey) -> Option<ServiceEntry> {
    // SAFETY: the value is copied out at once.
    unsafe { FRONTENDS.get(service) }.copied()
}

#[inline(always)]
fn backend_at(service: &ServiceKey, slot: u32, index: u32) -> Option<Backend> {
    let key = BackendSlotKey {
        service: *service,
        slot,
        index,
    };
    // SAFETY: the value is copied out at once.
    unsafe { BACKEND_SLOTS.get(key) }.copied()
}

/// The effective load (`grpclb_common::effective_load`) of the backend at
/// `index`: this node's live connections to it, or the Service-wide view
/// plus what this node opened since (never below its own connections). A
/// position not (yet) written counts
/// as fully loaded so it is not chosen over a real backend.
#[inline(always)]
fn backend_load(service: &ServiceKey, slot: u32, index: u32, now_ns: u64) -> u64 {
    let Some(backend) = backend_at(service, slot, index) else {
        return u64::MAX;
    };
    let local = match BACKEND_LOAD.get_ptr(backend) {
        // SAFETY: map value pointer checked by the verifier; other connects
        // and closes update it concurrently, so read it once, as is.
        Some(load) => unsafe { core::ptr::read_volatile(&raw const (*load).connections) },
        None => 0,
    };
    // A missing view is `ABSENT`, not `None`: no Option payload for LLVM
    // to leave uninitialized (see `counting::Count`).
    // SAFETY: the value is copied out at once; the agent replaces it whole.
    let view = unsafe { BACKEND_VIEW.get(backend) }
        .copied()
        .unwrap_or(BackendView::ABSENT);
    effective_load(local, &view, now_ns)
}

#[inline(always)]
fn monotonic_ns() -> u64 {
    // SAFETY: helper without preconditions; the clock the agent sets
    // `BackendView::expires_ns` by (CLOCK_MONOTONIC).
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_prandom_u32() }
}
