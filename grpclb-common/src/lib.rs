//! Types and pure logic shared by the grpclb eBPF programs and the agent.
//!
//! Every map key and value here is `#[repr(C)]` with explicit padding so the
//! kernel and userspace agree on the layout byte for byte. Addresses are always
//! 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one map serves
//! `connect4`, `connect6` and IPv4-mapped `connect6`.
#![no_std]

/// Fails the build unless `$t` is `$size` bytes with alignment `$align`,
/// each listed field sits at its offset, and the fields' sizes add up to
/// `$size`: no implicit padding, whose bytes would be uninitialised (a hash
/// map hashes its key's bytes, so two equal keys could land apart).
macro_rules! layout {
    ($t:ty, size $size:literal, align $align:literal, { $($field:ident: $ft:ty = $offset:literal),+ $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$t>() == $size);
            assert!(core::mem::align_of::<$t>() == $align);
            $(assert!(core::mem::offset_of!($t, $field) == $offset);)+
            assert!(0 $(+ core::mem::size_of::<$ft>())+ == $size);
        };
    };
}

pub mod addr;
pub mod frame;
pub mod maps;
pub mod select;
#[cfg(feature = "sys")]
pub mod sys;

pub use addr::Addr;
pub use maps::*;
pub use select::{effective_load, select_backend, two_choices, LeastLoaded, FULL_SCAN_MAX};
