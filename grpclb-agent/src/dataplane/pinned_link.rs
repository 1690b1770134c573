//! The two things aya 0.14 cannot do with a pinned cgroup link: tell which
//! cgroup it is attached to, and swap its program in place. Both are plain
//! bpf(2) commands.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

// include/uapi/linux/bpf.h
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

/// `bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// A link pinned on bpffs, opened.
pub struct PinnedLink {
    fd: OwnedFd,
}

impl PinnedLink {
    pub fn open(path: &Path) -> Result<PinnedLink> {
        let pathname = CString::new(path.as_os_str().as_bytes())
            .with_context(|| format!("{} contains a NUL byte", path.display()))?;
        let mut attr = ObjGet {
            pathname: pathname.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            path_fd: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)
            .with_context(|| format!("opening the pinned link {}", path.display()))?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
        Ok(PinnedLink {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The id of the cgroup the link is attached to (the cgroup directory's
    /// inode number), or an error if it is not a cgroup link.
    pub fn cgroup_id(&self) -> Result<u64> {
        // struct bpf_link_info: type, id, prog_id, then an 8-aligned union
        // whose cgroup member starts with cgroup_id. The kernel fills what
        // it knows and requires the rest to be zero.
        let mut info = [0u8; 64];
        let mut attr = InfoByFd {
            bpf_fd: self.fd.as_raw_fd() as u32,
            info_len: info.len() as u32,
            info: info.as_mut_ptr() as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("reading the link's info")?;
        let link_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
        if link_type != BPF_LINK_TYPE_CGROUP {
            bail!("not a cgroup link (link type {link_type})");
        }
        Ok(u64::from_ne_bytes(
            info[16..24].try_into().expect("8 bytes"),
        ))
    }

    /// Makes the link run `program` instead of its current program, in one
    /// step: no moment with neither or both attached.
    pub fn replace_program(&self, program: BorrowedFd<'_>) -> Result<()> {
        let mut attr = LinkUpdate {
            link_fd: self.fd.as_raw_fd() as u32,
            new_prog_fd: program.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
        };
        bpf(BPF_LINK_UPDATE, &mut attr).context("replacing the link's program")?;
        Ok(())
    }
}

impl AsFd for PinnedLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: `attr` is a live, correctly laid out bpf_attr prefix for
    // `command`, and its size is passed along.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret as i32)
}
