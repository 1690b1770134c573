//! The raw bpf(2) commands userspace needs beyond what aya 0.14 offers (a
//! pinned link's cgroup and in-place program swap) and what the tests and
//! benches use without aya (a foreign sockmap, polling pinned maps): one
//! place for the attr layouts and the `unsafe` syscall.
//!
//! Every error names the command and the object (a pin path, or what the
//! caller called it), e.g. `bpf(BPF_OBJ_GET) on /sys/fs/bpf/grpclb/maps/FRONTENDS:
//! No such file or directory (os error 2)`.

extern crate std;

use core::fmt;
use core::mem::size_of;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::string::{String, ToString};

// include/uapi/linux/bpf.h: commands.
const BPF_MAP_CREATE: Command = Command(0, "BPF_MAP_CREATE");
const BPF_MAP_LOOKUP_ELEM: Command = Command(1, "BPF_MAP_LOOKUP_ELEM");
const BPF_MAP_UPDATE_ELEM: Command = Command(2, "BPF_MAP_UPDATE_ELEM");
const BPF_PROG_LOAD: Command = Command(5, "BPF_PROG_LOAD");
const BPF_OBJ_GET: Command = Command(7, "BPF_OBJ_GET");
const BPF_PROG_ATTACH: Command = Command(8, "BPF_PROG_ATTACH");
const BPF_OBJ_GET_INFO_BY_FD: Command = Command(15, "BPF_OBJ_GET_INFO_BY_FD");
const BPF_LINK_UPDATE: Command = Command(29, "BPF_LINK_UPDATE");

/// A bpf(2) command number and its name for errors.
#[derive(Clone, Copy)]
struct Command(libc::c_long, &'static str);

/// A failed bpf(2) call: which command, on which object, and the errno.
#[derive(Debug)]
pub struct BpfError {
    command: &'static str,
    object: String,
    source: io::Error,
}

impl BpfError {
    /// The errno the kernel returned (ENOENT for a missing pin, …).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl fmt::Display for BpfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bpf({}) on {}: {}",
            self.command, self.object, self.source
        )
    }
}

impl std::error::Error for BpfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

pub type Result<T> = core::result::Result<T, BpfError>;

/// Types that may be copied to and from the kernel as map keys and values:
/// `#[repr(C)]`, `Copy`, no implicit padding, every bit pattern valid.
///
/// # Safety
/// Implement only for types meeting all of the above.
pub unsafe trait Plain: Copy {}

// SAFETY: an integer has no padding and no invalid values.
unsafe impl Plain for u32 {}
// SAFETY: the map types are #[repr(C)] integers and byte arrays with explicit
// padding fields; `maps.rs` checks at compile time that no padding is implicit.
unsafe impl Plain for crate::ServiceKey {}
unsafe impl Plain for crate::ServiceEntry {}
unsafe impl Plain for crate::BackendSlotKey {}
unsafe impl Plain for crate::Backend {}

/// A bpf object (map, program or link) by file descriptor, with the name
/// errors give it: its pin path, or what its creator called it.
#[derive(Debug)]
pub struct BpfObject {
    fd: OwnedFd,
    name: String,
}

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit so it is zero: the kernel rejects non-zero bytes past the
    /// fields it knows.
    _pad: u32,
}
const _: () = assert!(size_of::<ObjGet>() == 24);

/// `bpf_attr` for BPF_MAP_LOOKUP_ELEM and BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}
const _: () = assert!(size_of::<MapElem>() == 32);

/// `bpf_attr` for BPF_MAP_CREATE (the fields before map_flags).
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}
const _: () = assert!(size_of::<MapCreate>() == 16);

/// `bpf_attr` for BPF_PROG_LOAD (the fields up to the license).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
}
const _: () = assert!(size_of::<ProgLoad>() == 24);

/// `bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}
const _: () = assert!(size_of::<ProgAttach>() == 16);

/// `bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}
const _: () = assert!(size_of::<InfoByFd>() == 16);

/// `bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}
const _: () = assert!(size_of::<LinkUpdate>() == 16);

/// bpf(`command`, `attr`); the non-negative return value.
///
/// # Safety
/// `attr` must be the `bpf_attr` prefix `command` expects, and every pointer
/// in it must be valid for what the kernel does with it during the call.
unsafe fn bpf<T>(command: Command, attr: &mut T, object: &str) -> Result<i32> {
    // SAFETY: the caller's contract; the size passed is attr's own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command.0,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(BpfError {
            command: command.1,
            object: object.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(ret as i32)
}

impl BpfObject {
    /// BPF_OBJ_GET: opens the map, program or link pinned at `path`.
    pub fn open_pinned(path: &Path) -> Result<BpfObject> {
        let name = path.display().to_string();
        let pathname = CString::new(path.as_os_str().as_bytes()).map_err(|_| BpfError {
            command: BPF_OBJ_GET.1,
            object: name.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path has a NUL byte"),
        })?;
        let mut attr = ObjGet {
            pathname: pathname.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        };
        // SAFETY: `pathname` outlives the call.
        let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr, &name)? };
        Ok(BpfObject::owning(fd, name))
    }

    /// BPF_MAP_CREATE: a new map, called `name` in errors.
    pub fn create_map(
        name: &str,
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Result<BpfObject> {
        let mut attr = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries,
        };
        // SAFETY: no pointers.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr, name)? };
        Ok(BpfObject::owning(fd, name.to_string()))
    }

    /// BPF_PROG_LOAD: a program of `prog_type` from raw instructions, no
    /// verifier log.
    pub fn load_program(
        name: &str,
        prog_type: u32,
        instructions: &[u64],
        license: &CStr,
    ) -> Result<BpfObject> {
        let mut attr = ProgLoad {
            prog_type,
            insn_cnt: instructions.len() as u32,
            insns: instructions.as_ptr() as u64,
            license: license.as_ptr() as u64,
        };
        // SAFETY: the instructions and the license outlive the call.
        let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr, name)? };
        Ok(BpfObject::owning(fd, name.to_string()))
    }

    fn owning(fd: i32, name: String) -> BpfObject {
        // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        BpfObject { fd, name }
    }

    /// The pin path or name errors give this object.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// BPF_MAP_LOOKUP_ELEM: the value at `key`, `None` if there is none.
    /// `K` and `V` must be the map's key and value types.
    pub fn lookup<K: Plain, V: Plain>(&self, key: &K) -> Result<Option<V>> {
        let mut value = core::mem::MaybeUninit::<V>::zeroed();
        let mut attr = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: key and value are live and of the map's sizes (the
        // caller's types); the kernel writes at most size_of::<V>() bytes.
        match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr, &self.name) } {
            // SAFETY: V is Plain: any bytes the kernel wrote are a valid V.
            Ok(_) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// BPF_MAP_UPDATE_ELEM with `flags` (0: BPF_ANY).
    pub fn update<K: Plain, V: Plain>(&self, key: &K, value: &V, flags: u64) -> Result<()> {
        let mut attr = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags,
        };
        // SAFETY: key and value are live for the call.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr, &self.name)? };
        Ok(())
    }

    /// BPF_PROG_ATTACH: attaches `program` to this object (a map, for
    /// sk_msg and sk_skb programs) as `attach_type`.
    pub fn attach_program(&self, program: &BpfObject, attach_type: u32) -> Result<()> {
        let mut attr = ProgAttach {
            target_fd: self.fd.as_raw_fd() as u32,
            attach_bpf_fd: program.fd.as_raw_fd() as u32,
            attach_type,
            attach_flags: 0,
        };
        // SAFETY: no pointers.
        unsafe { bpf(BPF_PROG_ATTACH, &mut attr, &self.name)? };
        Ok(())
    }

    /// BPF_OBJ_GET_INFO_BY_FD: fills `info` (a `struct bpf_*_info`, zeroed:
    /// the kernel requires the fields it does not know to be zero).
    pub fn info(&self, info: &mut [u8]) -> Result<()> {
        let mut attr = InfoByFd {
            bpf_fd: self.fd.as_raw_fd() as u32,
            info_len: info.len() as u32,
            info: info.as_mut_ptr() as u64,
        };
        // SAFETY: the kernel writes at most info_len bytes into `info`.
        unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, &self.name)? };
        Ok(())
    }

    /// BPF_LINK_UPDATE: this link runs `program` instead of its current
    /// one, in one step.
    pub fn link_update(&self, program: BorrowedFd<'_>) -> Result<()> {
        let mut attr = LinkUpdate {
            link_fd: self.fd.as_raw_fd() as u32,
            new_prog_fd: program.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
        };
        // SAFETY: no pointers.
        unsafe { bpf(BPF_LINK_UPDATE, &mut attr, &self.name)? };
        Ok(())
    }
}

impl AsFd for BpfObject {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pin_names_the_command_and_the_path() {
        let e =
            BpfObject::open_pinned(Path::new("/nonexistent/grpclb/maps/FRONTENDS")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("bpf(BPF_OBJ_GET) on /nonexistent/grpclb/maps/FRONTENDS: "),
            "{text}"
        );
    }

    #[test]
    fn a_path_with_a_nul_byte_is_refused_before_the_call() {
        let e = BpfObject::open_pinned(Path::new("/sys/fs/bpf/a\0b")).unwrap_err();
        assert_eq!(e.raw_os_error(), None);
        assert!(e.to_string().contains("NUL byte"), "{e}");
    }
}
