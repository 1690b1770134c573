//! Types and pure logic shared by the grpclb eBPF programs and the agent.
//!
//! Every map key and value here is `#[repr(C)]` with explicit padding so the
//! kernel and userspace agree on the layout byte for byte. Addresses are always
//! 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one map serves
//! `connect4`, `connect6` and IPv4-mapped `connect6`.
#![no_std]

pub mod addr;
pub mod frame;
pub mod maps;
pub mod select;

pub use addr::Addr;
pub use maps::*;
pub use select::{select_backend, two_choices, LeastLoaded, FULL_SCAN_MAX};
