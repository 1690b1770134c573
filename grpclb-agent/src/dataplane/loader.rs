//! Loading, attaching, adopting and removing the kernel programs, and the
//! pinned maps as [`ServiceTables`].
//!
//! Everything lives under the bpffs directory: maps in `maps/<NAME>`, one
//! bpf_link per program in `links/<program>`. Pinned links keep the programs
//! attached while no agent runs. A starting agent always loads its own
//! programs: for a link already pinned it swaps the program inside the link
//! (BPF_LINK_UPDATE, so never two attachments), otherwise it attaches and
//! pins a new link. Maps are reused from their pins, so counts and services
//! survive restarts and upgrades. Attaching (or swapping) comes after the
//! agent's first sync: fresh maps are filled before any program reads them,
//! adopted ones are brought up to date before the new programs run.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, MapData, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{
    CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program, SkMsg, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use grpclb_common::{names, BackendLoad, DataplaneConfig};

use crate::dataplane::btf;
use crate::dataplane::pinned::PinnedTables;
use crate::dataplane::pinned_link::PinnedLink;

/// The object `cargo xtask build-ebpf` built, embedded by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("GRPCLB_EBPF_OBJECT"));

/// Every program in the object, attached to the node cgroup.
const PROGRAMS: [&str; 7] = [
    "balance_connect4",
    "balance_connect6",
    "report_frontend4",
    "report_frontend6",
    "count_connections",
    "forget_released",
    "track_frames",
];

/// The GOAWAY gate, attached to the `INJECTION_GATE` map rather than the cgroup.
const GATE_PROGRAM: &str = "gate_goaway";

pub(crate) const MAPS_DIR: &str = "maps";
const LINKS_DIR: &str = "links";

/// Map sizes, from the `--max-*` flags. They take effect when a map is
/// created; a map adopted from its pin keeps the size it was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub frontends: u32,
    pub backend_slots: u32,
    pub backend_load: u32,
    pub local_backends: u32,
    pub tracked: u32,
}

#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// The cgroup v2 directory whose sockets are balanced.
    pub cgroup: PathBuf,
    /// The pin directory on a bpf filesystem.
    pub bpffs: PathBuf,
    pub capacities: Capacities,
    /// Forward the programs' aya-log debug events to the agent's log.
    pub bpf_log: bool,
}

/// The programs and their maps, as this agent loaded them.
pub struct Dataplane {
    /// Holds the loaded programs (and the log buffer) for the agent's life.
    ebpf: Ebpf,
    tables: PinnedTables,
    cgroup: PathBuf,
    links_dir: PathBuf,
}

/// Where the maps are pinned under the bpffs directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(MAPS_DIR)
}

impl Dataplane {
    /// Loads the programs (verifier) and creates or adopts the pinned maps,
    /// attaching nothing yet: the caller fills the maps, then [`attach`]es,
    /// so no connect ever meets maps that do not hold a complete state.
    ///
    /// [`attach`]: Dataplane::attach
    pub fn prepare(options: &DataplaneOptions) -> Result<Dataplane> {
        require_filesystem(
            &options.bpffs,
            BPF_FS_MAGIC,
            "a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
        )?;
        require_filesystem(
            &options.cgroup,
            CGROUP2_SUPER_MAGIC,
            "a cgroup v2 directory",
        )?;
        let maps_dir = maps_dir(&options.bpffs);
        let links_dir = options.bpffs.join(LINKS_DIR);
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let caps = options.capacities;
        let btf = std::fs::read(btf::VMLINUX)
            .with_context(|| format!("reading {} (the kernel needs BTF)", btf::VMLINUX))?;
        let tcp_sock = btf::tcp_sock_offsets(&btf).context("reading struct tcp_sock from BTF")?;
        refuse_older_load_layout(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("TCP_SOCK_WRITE_SEQ_OFFSET", &tcp_sock.write_seq, true)
            .override_global("TCP_SOCK_SND_NXT_OFFSET", &tcp_sock.snd_nxt, true)
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::FRONTENDS, caps.frontends)
            .map_max_entries(names::SERVICE_NAMES, caps.frontends)
            .map_max_entries(names::BACKEND_SLOTS, caps.backend_slots)
            .map_max_entries(names::BACKEND_LOAD, caps.backend_load)
            .map_max_entries(names::LOCAL_BACKENDS, caps.local_backends)
            .map_max_entries(names::LOCAL_LOAD, caps.local_backends)
            .map_max_entries(names::BACKEND_VIEW, caps.backend_load)
            .map_max_entries(names::TRACKED, caps.tracked)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object and creating or opening its pinned maps")?;
        warn_about_adopted_sizes(&maps_dir, caps);
        if options.bpf_log {
            forward_bpf_log(&mut ebpf)?;
        }
        set_config(
            &mut ebpf,
            DataplaneConfig {
                debug_log: options.bpf_log as u32,
            },
        )?;

        for name in PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program {name}"))?;
            load(program).with_context(|| format!("loading {name}"))?;
        }
        let tables = PinnedTables::open(&options.bpffs)?;
        Ok(Dataplane {
            ebpf,
            tables,
            cgroup: options.cgroup.clone(),
            links_dir,
        })
    }

    /// Attaches the loaded programs to the cgroup, or swaps them into the
    /// links a previous agent pinned (BPF_LINK_UPDATE, so never two
    /// attachments).
    pub fn attach(&mut self) -> Result<()> {
        let cgroup = File::open(&self.cgroup)
            .with_context(|| format!("opening the cgroup {}", self.cgroup.display()))?;
        let cgroup_id = std::fs::metadata(&self.cgroup)?.ino();
        for name in PROGRAMS {
            let program = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program {name}"))?;
            let link_path = self.links_dir.join(name);
            attach_or_update(program, &cgroup, cgroup_id, &link_path)
                .with_context(|| format!("attaching {name}"))?;
        }
        attach_gate(&mut self.ebpf).context("attaching the GOAWAY gate")
    }

    pub fn tables(&mut self) -> &mut PinnedTables {
        &mut self.tables
    }
}

fn attach_or_update(
    program: &mut Program,
    cgroup: &File,
    cgroup_id: u64,
    link_path: &Path,
) -> Result<()> {
    if link_path.exists() {
        let link = PinnedLink::open(link_path)?;
        let attached_to = link.cgroup_id()?;
        if attached_to != cgroup_id {
            bail!(
                "{} is attached to another cgroup (id {attached_to}); run `grpclb-agent uninstall` \
                 for that installation first",
                link_path.display()
            );
        }
        let fd = program.fd().context("the loaded program has no fd")?;
        link.replace_program(fd.as_fd())?;
        tracing::info!(link = %link_path.display(), "adopted the pinned link with the new program");
        return Ok(());
    }
    let link = attach(program, cgroup)?;
    link.pin(link_path)
        .with_context(|| format!("pinning the link at {}", link_path.display()))?;
    tracing::info!(link = %link_path.display(), "attached and pinned");
    Ok(())
}

/// Attaches the gate to its sockmap. Not a bpf_link: a sockmap keeps its
/// programs for as long as it lives, and attaching again (a restarted agent
/// on the pinned map) replaces the program instead of adding one.
fn attach_gate(ebpf: &mut Ebpf) -> Result<()> {
    let map = ebpf
        .take_map(names::INJECTION_GATE)
        .context("the eBPF object has no INJECTION_GATE map")?;
    let gate: SockHash<MapData, u64> = SockHash::try_from(map)?;
    let program: &mut SkMsg = ebpf
        .program_mut(GATE_PROGRAM)
        .with_context(|| format!("the eBPF object has no program {GATE_PROGRAM}"))?
        .try_into()?;
    program
        .load()
        .context("loading into the kernel (verifier)")?;
    let link = program.attach(gate.fd())?;
    // Dropping the program would detach it; the map's attachment must
    // outlive this agent like the cgroup links do.
    std::mem::forget(program.take_link(link)?);
    Ok(())
}

fn load(program: &mut Program) -> Result<()> {
    let loaded = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        other => bail!("unexpected program type {:?}", other.prog_type()),
    };
    loaded.context("loading into the kernel (verifier)")
}

/// Attaches as a bpf_link. The kernel always adds cgroup links in
/// multi-attach mode, next to any other BPF user of the cgroup, and rejects
/// link_create with BPF_F_ALLOW_MULTI, so the mode asks for no flags.
fn attach(program: &mut Program, cgroup: &File) -> Result<FdLink> {
    const MODE: CgroupAttachMode = CgroupAttachMode::Single;
    Ok(match program {
        Program::CgroupSockAddr(p) => {
            let p: &mut CgroupSockAddr = p;
            let id = p.attach(cgroup, MODE)?;
            p.take_link(id)?.try_into()?
        }
        Program::SockOps(p) => {
            let p: &mut SockOps = p;
            let id = p.attach(cgroup, MODE)?;
            p.take_link(id)?.try_into()?
        }
        Program::CgroupSock(p) => {
            let p: &mut CgroupSock = p;
            let id = p.attach(cgroup, MODE)?;
            p.take_link(id)?.try_into()?
        }
        // The only cgroup_skb program watches egress.
        Program::CgroupSkb(p) => {
            let p: &mut CgroupSkb = p;
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, MODE)?;
            p.take_link(id)?.try_into()?
        }
        other => bail!("unexpected program type {:?}", other.prog_type()),
    })
}

fn set_config(ebpf: &mut Ebpf, config: DataplaneConfig) -> Result<()> {
    let map = ebpf
        .map_mut(names::CONFIG)
        .context("the eBPF object has no CONFIG map")?;
    let mut array: Array<&mut MapData, DataplaneConfig> = Array::try_from(map)?;
    array.set(0, config, 0).context("writing CONFIG")?;
    Ok(())
}

/// aya-log events go to the `log` crate, which tracing-subscriber forwards.
fn forward_bpf_log(ebpf: &mut Ebpf) -> Result<()> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("starting the eBPF log reader")?;
    // SAFETY: the logger owns its ring buffer fd and keeps it open and
    // unchanged until it is dropped, which only the AsyncFd can do.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("polling the eBPF log")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// `BACKEND_LOAD` values were a bare count before the counting protocol
/// moved to socket storage and epochs; programs of this agent on such a map
/// would fail the verifier with a message that says nothing of the cause,
/// and the connections the older programs counted could not be uncounted.
fn refuse_older_load_layout(maps_dir: &Path) -> Result<()> {
    let path = maps_dir.join(names::BACKEND_LOAD);
    if !path.exists() {
        return Ok(());
    }
    let info = MapData::from_pin(&path)
        .and_then(|m| m.info())
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let want = std::mem::size_of::<BackendLoad>() as u32;
    if info.value_size() != want {
        bail!(
            "{} was created by an older grpclb ({}-byte values, this agent needs {want}); \
             run `grpclb-agent uninstall` first, then start this agent",
            path.display(),
            info.value_size()
        );
    }
    Ok(())
}

fn warn_about_adopted_sizes(maps_dir: &Path, caps: Capacities) {
    let wanted = [
        (names::FRONTENDS, caps.frontends),
        (names::SERVICE_NAMES, caps.frontends),
        (names::BACKEND_SLOTS, caps.backend_slots),
        (names::BACKEND_LOAD, caps.backend_load),
        (names::LOCAL_BACKENDS, caps.local_backends),
        (names::LOCAL_LOAD, caps.local_backends),
        (names::BACKEND_VIEW, caps.backend_load),
        (names::TRACKED, caps.tracked),
    ];
    for (name, want) in wanted {
        let size = MapData::from_pin(maps_dir.join(name))
            .and_then(|m| m.info())
            .map(|i| i.max_entries());
        if let Ok(size) = size {
            if size != want {
                tracing::warn!(
                    map = name,
                    size,
                    requested = want,
                    "the pinned map keeps its size; run `grpclb-agent uninstall` to recreate it"
                );
            }
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

fn require_filesystem(path: &Path, magic: i64, what: &str) -> Result<()> {
    // The pin directory may not exist yet: check the closest existing parent.
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let stat = nix::sys::statfs::statfs(existing)
        .with_context(|| format!("statfs {}", existing.display()))?;
    if stat.filesystem_type().0 as i64 != magic {
        bail!("{} is not on {what}", path.display());
    }
    Ok(())
}

/// Detaches everything (by removing the link pins) and removes the maps.
/// Returns the paths removed; nothing installed is not an error.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [LINKS_DIR, MAPS_DIR] {
        let dir = bpffs.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
        std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if bpffs.exists() {
        std::fs::remove_dir(bpffs)
            .with_context(|| format!("removing {} (does it hold other pins?)", bpffs.display()))?;
    }
    Ok(removed)
}
