//! The jail hull-vmm puts itself in before it builds the VM (DESIGN.md Security), Firecracker's
//! jailer done by hull-vmm itself:
//!
//! - **Namespaces**: a mount namespace of its own, new IPC and UTS namespaces, and a new
//!   network namespace unless hull-vmm joined the container's (whose interfaces it serves to
//!   the guest through TAPs; otherwise it needs no network: the vsock device is Unix sockets,
//!   and a TAP of `--net` is opened before the jail). No PID namespace: `unshare(CLONE_NEWPID)` only moves children, and a
//!   process whose children live in another PID namespace can start no threads.
//! - **The root**: a small tmpfs, made read-only once filled, holding only what hull-vmm names
//!   ([`Bind`]): its state directory (its sockets, configuration and logs), the guest kernel and
//!   initramfs, the snapshot it restores, the shared directories (the container's rootfs) and
//!   `/dev/kvm`, each bind-mounted at its host path, and a procfs that shows only hull-vmm
//!   itself (`hidepid=ptraceable,subset=pid`). Every bind is `nosuid,noexec`, and `nodev` but
//!   `/dev/kvm`; read-only binds are read-only through every submount. hull-vmm then
//!   `pivot_root`s into it and detaches the host's tree: nothing else of the host's files can
//!   be named any more, even by a confused path lookup.
//! - **Identity**: root with only the capabilities the virtio-fs file server needs
//!   ([`KEPT_CAPABILITIES`]: to act as the guest's users on the guest's files), never
//!   `CAP_MKNOD`, `CAP_FSETID`, `CAP_SETFCAP` or any `CAP_SYS_*`; the bounding set is cut to the
//!   same, and `no_new_privs` is set. Mounts made after the jail need `CAP_SYS_ADMIN`, which is
//!   gone.
//!
//! A container's bind mounts are binds too, of another kind: each source goes onto an entry of
//! a shared directory ([`Bind::onto`]), so that the file server shares exactly what the spec
//! names. Without the jail (`HULL_VMM_JAIL=off`) these are still made, in a mount namespace of
//! hull-vmm's own ([`bind_in_place`]).
//!
//! The mounts exist only in hull-vmm's namespace: they go with it, and nothing is left on the
//! host but the empty directory they were made on.
//!
//! [`enter`] must run while hull-vmm has one thread: `unshare` of a mount namespace affects the
//! calling thread alone.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// The capabilities hull-vmm keeps: the file server acts as the guest's users on the
/// guest's files (owners, modes, every file's permission bits) and switches its credentials to
/// theirs for each request that creates a file.
pub const KEPT_CAPABILITIES: [Capability; 5] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
];

/// The jail's own tmpfs: a few directories and empty files as mount points.
const JAIL_TMPFS: &str = "mode=0755,size=256k,nr_inodes=1024";

/// The jail's procfs: only the processes hull-vmm could trace (itself: its capabilities are
/// fewer than those of the host's root processes, and the other hull-vmms are not dumpable),
/// no `/proc/sys`, `/proc/kcore` and the like. (`invisible` would show everything to root.)
const JAIL_PROC: &str = "hidepid=ptraceable,subset=pid";

/// Linux's `mount_setattr(2)` flags and attributes (not in the libc crate).
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One host path hull-vmm keeps in its jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// An absolute host path: a directory, a file, or a device node.
    pub path: PathBuf,
    /// Whether hull-vmm may change what is there.
    pub writable: bool,
    /// A device node (`/dev/kvm`): the only bind without `nodev`.
    pub device: bool,
    /// With the mounts below it (a shared directory's); otherwise the one mount the path is on
    /// (so a state directory that holds the jail's own mount point does not bring it along).
    pub tree: bool,
    /// Where it goes instead of its own path: an entry of a shared directory (which must
    /// exist, as an empty file or directory like `path`).
    pub at: Option<PathBuf>,
}

impl Bind {
    /// A directory or file hull-vmm reads.
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
            device: false,
            tree: false,
            at: None,
        }
    }

    /// A container's bind mount: `source` onto `at`, an entry of a shared directory.
    pub fn onto(
        source: impl Into<PathBuf>,
        at: impl Into<PathBuf>,
        writable: bool,
        tree: bool,
    ) -> Self {
        Self {
            writable,
            tree,
            at: Some(at.into()),
            ..Self::read_only(source)
        }
    }

    /// Where it goes: `at`, or its own path.
    pub fn target(&self) -> &Path {
        self.at.as_deref().unwrap_or(&self.path)
    }

    /// A directory or file hull-vmm changes (its state directory).
    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self {
            writable: true,
            ..Self::read_only(path)
        }
    }

    /// A shared directory with everything mounted below it.
    pub fn tree(path: impl Into<PathBuf>, writable: bool) -> Self {
        Self {
            writable,
            tree: true,
            ..Self::read_only(path)
        }
    }

    /// A device node hull-vmm opens for reading and writing.
    pub fn device(path: impl Into<PathBuf>) -> Self {
        Self {
            writable: true,
            device: true,
            ..Self::read_only(path)
        }
    }
}

/// Why hull-vmm could not jail itself.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail path {0}: must be absolute, without `.` or `..`")]
    BadPath(PathBuf),
    #[error("hull-vmm has {0} threads: the jail is entered with one")]
    Threads(usize),
    #[error("cannot make the jail directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make new namespaces (mount, IPC, UTS, network)")]
    Unshare(#[source] io::Error),
    #[error("cannot {what} {path}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the mount point for {path} in the jail")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot pivot_root into the jail {path}")]
    PivotRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot drop capabilities")]
    Capabilities(#[source] caps::errors::CapsError),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot set SECBIT_NO_SETUID_FIXUP")]
    Securebits(#[source] io::Error),
}

/// What a jail holds, checked: absolute paths without `.` or `..`, a path inside another
/// one's bind left out when that bind brings it along, parents before children.
fn plan(binds: &[Bind]) -> Result<Vec<Bind>, JailError> {
    let mut plan: Vec<Bind> = Vec::with_capacity(binds.len());
    for bind in binds {
        for path in [&bind.path, bind.target()] {
            let clean = path.is_absolute()
                && path
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if !clean || path == Path::new("/") {
                return Err(JailError::BadPath(path.to_owned()));
            }
        }
    }
    let mut sorted: Vec<&Bind> = binds.iter().collect();
    sorted.sort_by_key(|b| b.target().components().count());
    for bind in sorted {
        if bind.at.is_some() {
            // A container's bind: always its own mount, on top of what holds its target.
            plan.push(bind.clone());
            continue;
        }
        if let Some(p) = plan
            .iter_mut()
            .find(|p| p.at.is_none() && p.path == bind.path)
        {
            // The same path twice: writable, device and tree win.
            p.writable |= bind.writable;
            p.device |= bind.device;
            p.tree |= bind.tree;
            continue;
        }
        // Inside another bind that brings it along (with its own mounts, if it needs them):
        // there already.
        let covered = plan.iter().any(|p| {
            p.at.is_none()
                && bind.path.starts_with(&p.path)
                && (p.tree || !(bind.tree || bind.device))
        });
        if !covered {
            plan.push(bind.clone());
        }
    }
    Ok(plan)
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("a path from the OS has no NUL byte")
}

/// Sets `set` on the mount at `path` and every mount below it.
fn set_recursive(path: &Path, set: u64) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let c_path = cstring(path);
    // SAFETY: mount_setattr(2) reads a NUL-terminated path and `size_of::<MountAttr>()` bytes
    // of `attr`, both alive for the call; it writes nothing of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // Before Linux 5.12: the top mount only.
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    for (attr, flag) in [
        (MOUNT_ATTR_RDONLY, MsFlags::MS_RDONLY),
        (MOUNT_ATTR_NOSUID, MsFlags::MS_NOSUID),
        (MOUNT_ATTR_NODEV, MsFlags::MS_NODEV),
        (MOUNT_ATTR_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if set & attr != 0 {
            flags |= flag;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
}

/// Makes the mount point for `bind` under `root`: its parents as directories, then itself as a
/// directory or an empty file, like what it covers. Inside an earlier bind it is there already
/// (the same host path).
fn mount_point(root: &Path, bind: &Bind) -> io::Result<PathBuf> {
    let target = root.join(
        bind.target()
            .strip_prefix("/")
            .expect("a planned path is absolute"),
    );
    if std::fs::symlink_metadata(&target).is_ok() {
        return Ok(target);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::metadata(&bind.path)?.is_dir() {
        std::fs::create_dir(&target)?;
    } else {
        std::fs::File::create(&target)?;
    }
    Ok(target)
}

/// The number of threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Jails hull-vmm in `dir` (made if missing, and left empty on the host) with `binds`: see the
/// module's documentation. Call while hull-vmm has one thread, after everything the jail does
/// not hold has been opened.
///
/// `new_netns`: a new, empty network namespace too; without, hull-vmm stays in the one it
/// joined (the container's, where its TAPs are).
pub fn enter(dir: &Path, binds: &[Bind], new_netns: bool) -> Result<(), JailError> {
    let plan = plan(binds)?;
    if !dir.is_absolute() {
        return Err(JailError::BadPath(dir.to_owned()));
    }
    let count = threads();
    if count != 1 {
        return Err(JailError::Threads(count));
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(JailError::Dir {
                path: dir.to_owned(),
                source,
            })
        }
    }
    let mut namespaces =
        CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if new_netns {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    unshare(namespaces).map_err(|e| JailError::Unshare(e.into()))?;
    let mount_err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |e: nix::Error| JailError::Mount {
            what,
            path,
            source: e.into(),
        }
    };
    make_root_slave()?;
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("tmpfs"), dir, Some("tmpfs"), locked, Some(JAIL_TMPFS))
        .map_err(mount_err("mount the jail's tmpfs on", dir))?;
    for bind in &plan {
        let target = mount_point(dir, bind).map_err(|source| JailError::MountPoint {
            path: bind.target().to_owned(),
            source,
        })?;
        mount_bind(bind, &target)?;
    }
    let proc_dir = dir.join("proc");
    std::fs::create_dir(&proc_dir).map_err(|source| JailError::MountPoint {
        path: "/proc".into(),
        source,
    })?;
    let proc_flags = locked;
    if mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        proc_flags,
        Some(JAIL_PROC),
    )
    .is_err()
    {
        // Before Linux 5.8 (no `subset`, no `invisible`): every pid but this process's hidden.
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            proc_flags,
            Some("hidepid=2"),
        )
        .map_err(mount_err("mount the jail's procfs on", &proc_dir))?;
    }
    // The jail's own directories are fixed from here on.
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | locked,
        None::<&str>,
    )
    .map_err(mount_err("make read-only the jail", dir))?;
    pivot(dir)?;
    drop_privileges()
}

/// Bind-mounts `bind` on `target` and locks it: `nosuid,noexec`, `nodev` but on devices,
/// read-only unless writable, through every submount.
fn mount_bind(bind: &Bind, target: &Path) -> Result<(), JailError> {
    let flags = if bind.tree {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(&bind.path), target, None::<&str>, flags, None::<&str>).map_err(|e| {
        JailError::Mount {
            what: "bind-mount",
            path: bind.path.clone(),
            source: e.into(),
        }
    })?;
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC;
    if !bind.device {
        set |= MOUNT_ATTR_NODEV;
    }
    if !bind.writable {
        set |= MOUNT_ATTR_RDONLY;
    }
    set_recursive(target, set).map_err(|source| JailError::Mount {
        what: "lock the bind of",
        path: bind.path.clone(),
        source,
    })
}

/// In a new mount namespace: nothing mounted here reaches the host; the host's unmounts still
/// reach here.
fn make_root_slave() -> Result<(), JailError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| JailError::Mount {
        what: "make private the mounts of",
        path: "/".into(),
        source: e.into(),
    })
}

/// Without the jail: the container's binds ([`Bind::onto`]) in a mount namespace of hull-vmm's
/// own, each on its entry of the shared directory, so that they go with hull-vmm. Other binds
/// are ignored (their paths are there already). Call while hull-vmm has one thread.
pub fn bind_in_place(binds: &[Bind]) -> Result<(), JailError> {
    let binds: Vec<&Bind> = binds.iter().filter(|b| b.at.is_some()).collect();
    if binds.is_empty() {
        return Ok(());
    }
    plan(&binds.iter().map(|b| (*b).clone()).collect::<Vec<_>>())?;
    let count = threads();
    if count != 1 {
        return Err(JailError::Threads(count));
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| JailError::Unshare(e.into()))?;
    make_root_slave()?;
    for bind in binds {
        mount_bind(bind, bind.target())?;
    }
    Ok(())
}

/// Closes every descriptor above 2 but those in `keep` (hull-vmm's `--sync-fd` and
/// `--standby`): whatever its parent left open (`close_range(2)`).
pub fn close_inherited(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first: libc::c_uint = 3;
    let ranges = keep
        .iter()
        .map(|&fd| fd as libc::c_uint)
        .chain(std::iter::once(libc::c_uint::MAX));
    for next in ranges {
        if next > first {
            let last = if next == libc::c_uint::MAX {
                next
            } else {
                next - 1
            };
            // SAFETY: close_range(2) only closes descriptors of this process; the ones closed
            // here are not owned by anything in it (it runs first in `main`).
            let ret =
                unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        first = next.saturating_add(1);
    }
    Ok(())
}

/// `pivot_root` into `dir` with the old root stacked beneath it, then detaches the old root.
fn pivot(dir: &Path) -> Result<(), JailError> {
    let fail = |source: io::Error| JailError::PivotRoot {
        path: dir.to_owned(),
        source,
    };
    nix::unistd::chdir(dir).map_err(|e| fail(e.into()))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| fail(e.into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail(e.into()))?;
    nix::unistd::chdir("/").map_err(|e| fail(e.into()))?;
    Ok(())
}

/// Makes hull-vmm keep its capabilities while a file server thread acts as one of the guest's
/// users (`SECBIT_NO_SETUID_FIXUP`, locked). The file server makes files with the guest's
/// uid as its effective uid, and the kernel would otherwise clear the effective capabilities
/// on that change: a guest process with the capabilities to create in a directory (the root of
/// a user namespace, uid 100000 outside, in its own 0555 root directory) would get `EACCES`
/// from the host after the guest kernel allowed it. The guest kernel checks permissions
/// (virtio-fs is mounted with `default_permissions`), and a guest can claim uid 0 in any
/// request anyway, so the host's repeat of the check protected nothing. What confines the file
/// server is the share and the jail.
pub fn keep_capabilities_across_id_changes() -> Result<(), JailError> {
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    // SAFETY: takes values, touches no memory of ours.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(JailError::Securebits(io::Error::last_os_error()));
    }
    Ok(())
}

/// Keeps [`KEPT_CAPABILITIES`] (bounding, permitted, effective; no inheritable or ambient
/// ones) and sets `no_new_privs`.
fn drop_privileges() -> Result<(), JailError> {
    // Needs `CAP_SETPCAP`, which goes below.
    keep_capabilities_across_id_changes()?;
    let kept: CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    for cap in caps::all() {
        if !kept.contains(&cap) {
            match caps::drop(None, CapSet::Bounding, cap) {
                Ok(()) => {}
                // A capability this kernel does not know.
                Err(_) if !caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) => {}
                Err(e) => return Err(JailError::Capabilities(e)),
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(JailError::Capabilities)?;
    caps::clear(None, CapSet::Inheritable).map_err(JailError::Capabilities)?;
    let permitted: CapsHashSet = caps::read(None, CapSet::Permitted)
        .map_err(JailError::Capabilities)?
        .intersection(&kept)
        .copied()
        .collect();
    caps::set(None, CapSet::Effective, &permitted).map_err(JailError::Capabilities)?;
    caps::set(None, CapSet::Permitted, &permitted).map_err(JailError::Capabilities)?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| JailError::NoNewPrivs(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_keeps_parents_first_and_drops_what_they_hold() {
        let planned = plan(&[
            Bind::read_only("/var/lib/hull/k/vmlinux"),
            Bind::writable("/run/hull/c1"),
            Bind::read_only("/run/hull/c1/config.json"),
            Bind::read_only("/var/lib/hull/k"),
            Bind::device("/dev/kvm"),
            Bind::read_only("/dev/kvm"),
        ])
        .unwrap();
        let paths: Vec<_> = planned.iter().map(|b| b.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["/dev/kvm", "/run/hull/c1", "/var/lib/hull/k"]);
        assert!(planned[0].device && planned[0].writable);
        assert!(planned[1].writable && !planned[2].writable);
    }

    #[test]
    fn a_container_s_binds_go_on_top_of_what_holds_their_entries() {
        let planned = plan(&[
            Bind::onto("/srv/vol", "/run/hull/c1/binds/3", true, true),
            Bind::writable("/run/hull/c1"),
            Bind::tree("/run/hull/c1/binds", true),
            Bind::onto("/srv/vol", "/run/hull/c1/binds/4", false, false),
        ])
        .unwrap();
        let targets: Vec<_> = planned
            .iter()
            .map(|b| b.target().to_str().unwrap())
            .collect();
        assert_eq!(
            targets,
            [
                "/run/hull/c1",
                "/run/hull/c1/binds",
                "/run/hull/c1/binds/3",
                "/run/hull/c1/binds/4"
            ]
        );
        assert!(planned[2].writable && planned[2].tree && !planned[3].writable);
        assert!(matches!(
            plan(&[Bind::onto("/srv/vol", "relative", true, true)]),
            Err(JailError::BadPath(_))
        ));
    }

    #[test]
    fn a_plan_refuses_relative_and_dotted_paths_and_the_root() {
        for bad in ["run/hull", "/run/../etc", "/"] {
            assert!(
                matches!(plan(&[Bind::read_only(bad)]), Err(JailError::BadPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_the_kept_descriptors_survive() {
        // SAFETY: the child makes only system calls and ends with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: eventfd(2) makes a new descriptor; nothing else is touched.
            let fds: Vec<RawFd> = (0..6).map(|_| unsafe { libc::eventfd(0, 0) }).collect();
            let open = |fd: RawFd| {
                // SAFETY: F_GETFD only reads the descriptor's flags.
                unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
            };
            let code = match close_inherited(&[fds[1], fds[4], 1]) {
                Err(_) => 1,
                Ok(()) if fds.iter().all(|&fd| fd > 2) => {
                    let survivors: Vec<bool> = fds.iter().map(|&fd| open(fd)).collect();
                    let std_open = (0..3).all(open);
                    if survivors == [false, true, false, false, true, false] && std_open {
                        0
                    } else {
                        3
                    }
                }
                Ok(()) => 2,
            };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` lives for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
    }

    /// In a child: the jail is the whole world from then on.
    #[test]
    fn a_jailed_process_sees_only_its_binds_and_keeps_only_the_file_servers_capabilities() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let base = std::env::temp_dir().join(format!("hull-jail-test-{}", std::process::id()));
        let shared = base.join("shared");
        let hidden = base.join("hidden");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(&hidden).unwrap();
        std::fs::write(shared.join("f"), b"in").unwrap();
        // A container's volume and bound file, with their mount points in the share.
        let volume = base.join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(volume.join("v"), b"volume").unwrap();
        let host_file = base.join("hosts");
        std::fs::write(&host_file, b"hosts").unwrap();
        std::fs::create_dir_all(shared.join("vol")).unwrap();
        std::fs::write(shared.join("file"), b"").unwrap();
        let kernel = base.join("vmlinux");
        std::fs::write(&kernel, b"elf").unwrap();
        let state = base.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let jail = state.join("jail");
        // SAFETY: the test binary may run tests on other threads, so the child makes only
        // system calls and allocations from here on and ends with `_exit`; no lock it could
        // need is held across fork by this test.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let verdict = (|| -> Result<(), String> {
                enter(
                    &jail,
                    &[
                        Bind::onto(&volume, shared.join("vol"), false, true),
                        Bind::onto(&host_file, shared.join("file"), true, false),
                        Bind::tree(&shared, true),
                        Bind::read_only(&kernel),
                        Bind::writable(&state),
                    ],
                    true,
                )
                .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
                let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_owned()) };
                let holds = |path: &Path, content: &[u8]| {
                    std::fs::read(path).ok().as_deref() == Some(content)
                };
                let writable = |path: &Path| std::fs::write(path, b"w").is_ok();
                check(holds(&shared.join("f"), b"in"), "bind")?;
                check(writable(&shared.join("g")), "writable bind")?;
                check(!writable(&kernel), "read-only bind")?;
                check(
                    holds(&shared.join("vol/v"), b"volume"),
                    "a volume in the share",
                )?;
                check(!writable(&shared.join("vol/w")), "a read-only volume")?;
                check(
                    holds(&shared.join("file"), b"hosts"),
                    "a bound file in the share",
                )?;
                check(writable(&shared.join("file")), "a writable bound file")?;
                check(!volume.exists(), "the volume's own path is not in the jail")?;
                check(!hidden.exists(), "a path not bound is gone")?;
                check(
                    std::fs::read_dir(&jail).map(|d| d.count()).ok() == Some(0),
                    "a bind holds only its own mount (not the jail's, made below it)",
                )?;
                check(
                    !Path::new("/etc/passwd").exists(),
                    "the host's files are gone",
                )?;
                check(
                    std::fs::write("/new", b"x").is_err(),
                    "the jail's root is read-only",
                )?;
                let pids = std::fs::read_dir("/proc")
                    .map_err(|e| e.to_string())?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                    .count();
                check(
                    pids == 1,
                    &format!("procfs shows hull-vmm alone, not {pids}"),
                )?;
                check(
                    !Path::new("/proc/sys").exists() && Path::new("/proc/self/fd").exists(),
                    "procfs has no /proc/sys but has /proc/self",
                )?;
                let eff = caps::read(None, CapSet::Effective).map_err(|e| e.to_string())?;
                let kept: CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
                check(eff == kept, "only the kept capabilities")?;
                check(
                    !caps::has_cap(None, CapSet::Bounding, Capability::CAP_SYS_ADMIN)
                        .unwrap_or(true),
                    "CAP_SYS_ADMIN gone from the bounding set",
                )?;
                check(
                    nix::sys::prctl::get_no_new_privs() == Ok(true),
                    "no_new_privs",
                )?;
                // SAFETY: takes no pointer.
                let securebits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
                check(securebits == 0b1100, "SECBIT_NO_SETUID_FIXUP, locked")?;
                // Acting as another user keeps the capabilities, as the file server does.
                // SAFETY: a system call on this thread's credentials, no pointers.
                let acted = unsafe { libc::syscall(libc::SYS_setresuid, -1, 100_000, -1) };
                check(
                    acted == 0
                        && caps::has_cap(None, CapSet::Effective, Capability::CAP_DAC_OVERRIDE)
                            .unwrap_or(false),
                    "CAP_DAC_OVERRIDE kept as uid 100000",
                )?;
                // SAFETY: as above.
                let back = unsafe { libc::syscall(libc::SYS_setresuid, -1, 0, -1) };
                check(back == 0, "back to uid 0")?;
                check(
                    mount(
                        Some("tmpfs"),
                        "/proc",
                        Some("tmpfs"),
                        MsFlags::empty(),
                        None::<&str>,
                    )
                    .is_err(),
                    "no mounts in the jail",
                )?;
                Ok(())
            })();
            let code = match verdict {
                Ok(()) => 0,
                Err(what) => {
                    eprintln!("jail: {what}");
                    1
                }
            };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` lives for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let jail_left_empty = std::fs::read_dir(&jail).map(|d| d.count()).ok();
        let wrote = std::fs::read(shared.join("g")).ok();
        let bound_file = std::fs::read(&host_file).ok();
        let mount_points = (
            std::fs::read_dir(shared.join("vol"))
                .map(|d| d.count())
                .ok(),
            std::fs::read(shared.join("file")).ok(),
        );
        std::fs::remove_dir_all(&base).unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
        assert_eq!(
            wrote.as_deref(),
            Some(&b"w"[..]),
            "the write reached the host"
        );
        assert_eq!(
            jail_left_empty,
            Some(0),
            "nothing of the jail is left on the host"
        );
        assert_eq!(
            bound_file.as_deref(),
            Some(&b"w"[..]),
            "the bound file was written"
        );
        assert_eq!(
            mount_points,
            (Some(0), Some(Vec::new())),
            "the share's mount points stay empty on the host"
        );
    }
}
