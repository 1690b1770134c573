//! Another program's sockmap, as a service mesh or a socket-acceleration
//! agent keeps one: a SOCKHASH with a pass-everything `sk_msg` program,
//! made with raw bpf(2) calls (`grpclb_common::sys`) so that none of it is
//! grpclb's loader. A socket put in it has its `sk_msg` slot taken, and the
//! kernel refuses (EBUSY) to link it into a second map with an `sk_msg`
//! program, such as grpclb's gate.

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{Context, Result};
use grpclb_common::sys::BpfObject;

// From include/uapi/linux/bpf.h.
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_MSG: u32 = 16;
const BPF_SK_MSG_VERDICT: u32 = 7;

pub struct ForeignSockmap {
    map: BpfObject,
    _verdict: BpfObject,
}

impl ForeignSockmap {
    pub fn new() -> Result<ForeignSockmap> {
        // u32 keys, u32 values (socket fds), 16 entries.
        let map = BpfObject::create_map("a foreign SOCKHASH", BPF_MAP_TYPE_SOCKHASH, 4, 4, 16)
            .context("creating a SOCKHASH")?;
        // r0 = SK_PASS; exit.
        let program: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let verdict = BpfObject::load_program(
            "a pass-everything sk_msg program",
            BPF_PROG_TYPE_SK_MSG,
            &program,
            c"GPL",
        )
        .context("loading an sk_msg program")?;
        map.attach_program(&verdict, BPF_SK_MSG_VERDICT)
            .context("attaching the sk_msg program to the SOCKHASH")?;
        Ok(ForeignSockmap {
            map,
            _verdict: verdict,
        })
    }

    /// Puts an established TCP socket in the map under `key`.
    pub fn insert(&self, key: u32, socket: BorrowedFd<'_>) -> Result<()> {
        let fd = socket.as_raw_fd() as u32;
        self.map
            .update(&key, &fd, 0)
            .context("putting the socket in the SOCKHASH")
    }
}
