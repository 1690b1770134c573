//! The two things aya 0.14 cannot do with a pinned cgroup link: tell which
//! cgroup it is attached to, and swap its program in place. Both are plain
//! bpf(2) commands (`grpclb_common::sys`).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use grpclb_common::sys::BpfObject;

// include/uapi/linux/bpf.h
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// A link pinned on bpffs, opened.
pub struct PinnedLink {
    link: BpfObject,
}

impl PinnedLink {
    pub fn open(path: &Path) -> Result<PinnedLink> {
        let link = BpfObject::open_pinned(path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?;
        Ok(PinnedLink { link })
    }

    /// The id of the cgroup the link is attached to (the cgroup directory's
    /// inode number), or an error if it is not a cgroup link.
    pub fn cgroup_id(&self) -> Result<u64> {
        // struct bpf_link_info: type, id, prog_id, then an 8-aligned union
        // whose cgroup member starts with cgroup_id. The kernel fills what
        // it knows and requires the rest to be zero.
        let mut info = [0u8; 64];
        self.link
            .info(&mut info)
            .context("reading the link's info")?;
        let link_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
        if link_type != BPF_LINK_TYPE_CGROUP {
            bail!(
                "{} is not a cgroup link (link type {link_type})",
                self.link.name()
            );
        }
        Ok(u64::from_ne_bytes(
            info[16..24].try_into().expect("8 bytes"),
        ))
    }

    /// Makes the link run `program` instead of its current program, in one
    /// step: no moment with neither or both attached.
    pub fn replace_program(&self, program: BorrowedFd<'_>) -> Result<()> {
        self.link
            .link_update(program)
            .context("replacing the link's program")
    }
}

impl AsFd for PinnedLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}
