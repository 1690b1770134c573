//! Atomic operations on map values.
//!
//! `core::sync::atomic` offers no read-modify-write operations on
//! bpfel-unknown-none (the target declares no compare-and-swap), so these use
//! the intrinsics directly; with `target-cpu=v3` LLVM lowers them to the BPF
//! atomic instructions.

use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xchg, AtomicOrdering};

/// Adds 1 and returns the value before. The fetching form is a full
/// barrier on every architecture (BPF's atomics without fetch are not): the
/// counting protocol reads the frontend's generation after it.
#[inline(always)]
pub fn increment(value: *mut u64) -> u64 {
    // SAFETY: `value` points into a map value the verifier has checked.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(value, 1) }
}

/// Most compare-and-swap attempts for one decrement; another CPU would have to
/// change the count between our read and our swap this many times in a row.
const DECREMENT_ATTEMPTS: u32 = 8;

/// Subtracts 1 unless the value is 0: a count must never wrap around, even
/// if something outside the protocol (`bpftool map update`) reset it.
#[inline(always)]
pub fn decrement_to_zero(value: *mut u64) {
    // SAFETY: `value` points into a map value the verifier has checked.
    let mut current = unsafe { core::ptr::read_volatile(value) };
    let mut attempt = 0;
    while attempt < DECREMENT_ATTEMPTS && current != 0 {
        // SAFETY: as above.
        let (seen, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                value,
                current,
                current - 1,
            )
        };
        if swapped {
            return;
        }
        current = seen;
        attempt += 1;
    }
}

/// Stores `new` and returns what was there.
#[inline(always)]
pub fn exchange(value: *mut u32, new: u32) -> u32 {
    // SAFETY: `value` points into a map value the verifier has checked.
    unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(value, new) }
}
