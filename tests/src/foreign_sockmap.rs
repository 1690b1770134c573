//! Another program's sockmap, as a service mesh or a socket-acceleration
//! agent keeps one: a SOCKHASH with a pass-everything `sk_msg` program,
//! made with raw bpf(2) calls so that none of it is grpclb's code. A socket
//! put in it has its `sk_msg` slot taken, and the kernel refuses (EBUSY) to
//! link it into a second map with an `sk_msg` program, such as grpclb's gate.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

// From include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_MSG: u32 = 16;
const BPF_SK_MSG_VERDICT: u32 = 7;

/// `union bpf_attr`, as 32-bit words: each command fills the few it uses.
#[repr(C, align(8))]
#[derive(Default)]
struct Attr([u32; 32]);

impl Attr {
    fn set_u64(&mut self, word: usize, value: u64) {
        self.0[word] = value as u32;
        self.0[word + 1] = (value >> 32) as u32;
    }
}

fn bpf(command: libc::c_long, attr: &Attr, what: &str) -> Result<RawFd> {
    // SAFETY: `attr` is a zero-filled `union bpf_attr` of the size passed,
    // and every pointer in it refers to memory that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(ret as RawFd)
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub struct ForeignSockmap {
    map: OwnedFd,
    _verdict: OwnedFd,
}

impl ForeignSockmap {
    pub fn new() -> Result<ForeignSockmap> {
        let mut create = Attr::default();
        create.0[..4].copy_from_slice(&[BPF_MAP_TYPE_SOCKHASH, 4, 4, 16]);
        let map = owned(bpf(BPF_MAP_CREATE, &create, "creating a SOCKHASH")?);

        // r0 = SK_PASS; exit.
        let program: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut load = Attr::default();
        load.0[0] = BPF_PROG_TYPE_SK_MSG;
        load.0[1] = program.len() as u32;
        load.set_u64(2, program.as_ptr() as u64);
        load.set_u64(4, license.as_ptr() as u64);
        let verdict = owned(bpf(BPF_PROG_LOAD, &load, "loading an sk_msg program")?);

        let mut attach = Attr::default();
        attach.0[..3].copy_from_slice(&[
            map.as_raw_fd() as u32,
            verdict.as_raw_fd() as u32,
            BPF_SK_MSG_VERDICT,
        ]);
        bpf(
            BPF_PROG_ATTACH,
            &attach,
            "attaching the sk_msg program to the SOCKHASH",
        )?;
        Ok(ForeignSockmap {
            map,
            _verdict: verdict,
        })
    }

    /// Puts an established TCP socket in the map under `key`.
    pub fn insert(&self, key: u32, socket: BorrowedFd<'_>) -> Result<()> {
        let value = socket.as_raw_fd() as u32;
        let mut update = Attr::default();
        update.0[0] = self.map.as_raw_fd() as u32;
        update.set_u64(2, &key as *const u32 as u64);
        update.set_u64(4, &value as *const u32 as u64);
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &update,
            "putting the socket in the SOCKHASH",
        )?;
        Ok(())
    }
}
