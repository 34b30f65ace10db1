//! The container's processes before the start: namespaces, mounts, root, hostname for the init;
//! the init's namespaces and root for an exec'd process.
//!
//! Runs in forked children only (see `mod.rs`), except [`open_init_namespaces`], which the agent
//! calls. Every error names the spec field and value.
//!
//! The root switch: `pivot_root(2)` into the container's root, then the old root (the agent's)
//! is detached, so nothing of the agent is reachable from the container. In the guest this works
//! because the agent left the initramfs for a tmpfs at boot (`switch_root.rs`): `pivot_root`
//! refuses to move the initramfs itself.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use hull_protocol::spec::{
    ContainerSpec, DeviceKind, Mount, NamespaceKind, Personality, Propagation,
};
use hull_protocol::{ErrorKind, ErrorResponse};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::unistd::{
    chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout, fchdir, pivot_root, sethostname, Pid,
};

use super::{Config, RootfsSource};

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::Io, format!("{what}: {e}"))
}

fn invalid(message: String) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::InvalidSpec, message)
}

/// Makes the stream descriptors the process's 0, 1, 2 (dup2 clears close-on-exec on them).
pub fn take_stdio(stdio: &[OwnedFd; 3]) -> Result<(), ErrorResponse> {
    let [stdin, stdout, stderr] = stdio;
    dup2_stdin(stdin).map_err(|e| io("dup2 onto fd 0", e))?;
    dup2_stdout(stdout).map_err(|e| io("dup2 onto fd 1", e))?;
    dup2_stderr(stderr).map_err(|e| io("dup2 onto fd 2", e))
}

/// Unshares the namespaces of `linux.namespaces`, and always a mount namespace: the container's
/// mounts must never reach the agent's. A namespace with a `path` is the host's business
/// (`hull-vmm` joins a network namespace path on the host); in the guest the container shares
/// the agent's namespace of that type.
///
/// With a user namespace, as in runc, it comes first and owns the others, which are made from
/// inside it; the virtio-fs shares are mounted before it (a user namespace cannot mount
/// virtio-fs), in a mount namespace of the guest's own, and reach the container's as locked
/// copies.
pub fn unshare_namespaces(config: &Config) -> Result<(), ErrorResponse> {
    let spec = &config.spec;
    let mut flags = CloneFlags::CLONE_NEWNS;
    let mut pid = false;
    for ns in spec.namespaces.iter().filter(|ns| ns.path.is_none()) {
        match ns.kind {
            NamespaceKind::Uts => flags |= CloneFlags::CLONE_NEWUTS,
            NamespaceKind::Ipc => flags |= CloneFlags::CLONE_NEWIPC,
            NamespaceKind::Network => flags |= CloneFlags::CLONE_NEWNET,
            NamespaceKind::Cgroup => flags |= CloneFlags::CLONE_NEWCGROUP,
            NamespaceKind::Pid => pid = true,
            NamespaceKind::Mount | NamespaceKind::User => {}
        }
    }
    if spec.unshares(NamespaceKind::User) {
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(|e| io("unshare(CLONE_NEWNS) for the virtio-fs shares", e))?;
        set_propagation(Propagation::Private)?;
        mount_shares(config)?;
        enter_user_namespace(spec, &config.agent_root.join("proc"))?;
    }
    unshare(flags).map_err(|e| io(format!("unshare({flags:?}) for linux.namespaces"), e))?;
    if pid {
        // Takes effect for the next child: the container's init.
        unshare(CloneFlags::CLONE_NEWPID)
            .map_err(|e| io("unshare(CLONE_NEWPID) for linux.namespaces \"pid\"", e))?;
    }
    Ok(())
}

/// `unshare(CLONE_NEWUSER)` with the spec's `uidMappings` and `gidMappings`, then root of the
/// new namespace if its 0 is mapped. The maps are written by a helper child left in the guest's
/// user namespace: only a process with `CAP_SETUID` and `CAP_SETGID` there may map more than
/// its own id, and after the unshare this process has its capabilities only in the new one.
fn enter_user_namespace(spec: &ContainerSpec, proc_dir: &Path) -> Result<(), ErrorResponse> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let me = nix::unistd::getpid();
    let (mut ours, mut theirs) =
        UnixStream::pair().map_err(|e| io("socketpair for the id maps", e))?;
    let helper = match crate::sys::fork().map_err(|e| io("fork of the id map writer", e))? {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            let mut go = [0u8; 1];
            if !matches!(theirs.read(&mut go), Ok(1)) {
                crate::sys::exit_now(1);
            }
            let written = write_id_maps(&proc_dir.join(me.to_string()), spec);
            if let Err(message) = &written {
                let _ = theirs.write_all(message.as_bytes());
            }
            crate::sys::exit_now(i32::from(written.is_err()));
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(theirs);
    let unshared = unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| io("unshare(CLONE_NEWUSER) for linux.namespaces \"user\"", e));
    if unshared.is_ok() {
        let _ = ours.write_all(&[1]);
    }
    // Shut our end either way, so that the helper never waits for a byte that will not come.
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let mut message = String::new();
    let _ = ours.read_to_string(&mut message);
    let status = nix::sys::wait::waitpid(helper, None);
    unshared?;
    if !message.is_empty() {
        return Err(io("linux.uidMappings/gidMappings", message));
    }
    match status {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => {}
        other => return Err(io("the id map writer", format!("{other:?}"))),
    }
    let root_uid = hull_protocol::spec::is_mapped(&spec.uid_mappings, 0);
    let root_gid = hull_protocol::spec::is_mapped(&spec.gid_mappings, 0);
    if root_gid {
        let root = nix::unistd::Gid::from_raw(0);
        nix::unistd::setresgid(root, root, root)
            .map_err(|e| io("setresgid(0) in the new user namespace", e))?;
    }
    if root_uid {
        let root = nix::unistd::Uid::from_raw(0);
        nix::unistd::setresuid(root, root, root)
            .map_err(|e| io("setresuid(0) in the new user namespace", e))?;
    }
    Ok(())
}

/// Writes `uid_map` and `gid_map` of `/proc/<pid>` (each in one `write`, as the kernel
/// requires).
fn write_id_maps(proc_pid: &Path, spec: &ContainerSpec) -> Result<(), String> {
    let lines = |list: &[hull_protocol::spec::IdMapping]| {
        list.iter()
            .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
            .collect::<String>()
    };
    for (name, list, field) in [
        ("uid_map", &spec.uid_mappings, "linux.uidMappings"),
        ("gid_map", &spec.gid_mappings, "linux.gidMappings"),
    ] {
        let path = proc_pid.join(name);
        std::fs::write(&path, lines(list))
            .map_err(|e| format!("{field}: writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The namespaces of the init that an exec'd process joins, as `/proc/PID/ns/` names with their
/// `setns` types: those the spec has the container unshare, and always the mount namespace (see
/// [`unshare_namespaces`]). In joining order: the PID namespace, which takes effect for the
/// next child only, before the mount namespace, which is last so that nothing after it is
/// looked up in the container's file system.
pub fn exec_namespaces(spec: &ContainerSpec) -> Vec<(&'static str, CloneFlags)> {
    const ORDER: [(NamespaceKind, &str, CloneFlags); 5] = [
        (NamespaceKind::Ipc, "ipc", CloneFlags::CLONE_NEWIPC),
        (NamespaceKind::Uts, "uts", CloneFlags::CLONE_NEWUTS),
        (NamespaceKind::Network, "net", CloneFlags::CLONE_NEWNET),
        (NamespaceKind::Cgroup, "cgroup", CloneFlags::CLONE_NEWCGROUP),
        (NamespaceKind::Pid, "pid", CloneFlags::CLONE_NEWPID),
    ];
    // The user namespace first: it owns the others, and joining it gives the capabilities
    // that joining them takes.
    let mut join: Vec<_> = spec
        .unshares(NamespaceKind::User)
        .then_some(("user", CloneFlags::CLONE_NEWUSER))
        .into_iter()
        .chain(
            ORDER
                .iter()
                .filter(|(kind, ..)| spec.unshares(*kind))
                .map(|(_, name, flag)| (*name, *flag)),
        )
        .collect();
    join.push(("mnt", CloneFlags::CLONE_NEWNS));
    join
}

/// Opens the init's namespaces (`<proc_dir>/<init>/ns/<name>`) and its root directory
/// (`<proc_dir>/<init>/root`), in the agent, for an exec'd process to join.
pub fn open_init_namespaces(
    proc_dir: &Path,
    init: Pid,
    namespaces: &[(&'static str, CloneFlags)],
) -> Result<(Vec<(CloneFlags, OwnedFd)>, OwnedFd), ErrorResponse> {
    let dir = proc_dir.join(init.to_string());
    let open_at = |path: PathBuf, flags: OFlag| {
        open(&path, flags | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| io(format!("opening {}", path.display()), e))
    };
    let mut fds = Vec::with_capacity(namespaces.len());
    for (name, flag) in namespaces {
        fds.push((*flag, open_at(dir.join("ns").join(name), OFlag::O_RDONLY)?));
    }
    let root = open_at(dir.join("root"), OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    Ok((fds, root))
}

/// Joins the init's namespaces (`setns`), in the intermediate child of an exec.
pub fn join_namespaces(namespaces: &[(CloneFlags, OwnedFd)]) -> Result<(), ErrorResponse> {
    for (flag, fd) in namespaces {
        setns(fd, *flag).map_err(|e| io(format!("joining the init's namespace ({flag:?})"), e))?;
    }
    Ok(())
}

/// Takes the init's root (opened by the agent from `/proc/<init>/root`), in an exec'd process.
/// `setns` into the mount namespace already gives it the top mount on the namespace's `/`,
/// which is the init's root after `pivot_root`; taking the init's own root makes that explicit
/// and holds whatever the init did.
pub fn enter_init_root(root: &OwnedFd) -> Result<(), ErrorResponse> {
    fchdir(root).map_err(|e| io("fchdir to the init's root", e))?;
    chroot(".").map_err(|e| io("chroot into the init's root", e))?;
    chdir("/").map_err(|e| io("chdir /", e))
}

/// Everything from the mount tree to the hostname, in the container's init.
pub fn prepare(config: &Config) -> Result<(), ErrorResponse> {
    set_propagation(Propagation::Private)?;
    mount_and_enter(config)
}

/// Gives every mount of the process's mount namespace the propagation `propagation`
/// (recursively from `/`). First [`Propagation::Private`], in a new mount namespace, so that
/// nothing the container mounts reaches the agent's namespace and `pivot_root` (which refuses
/// shared mounts) works; the spec's `rootfsPropagation` once the root is the container's
/// ([`mount_and_enter`]).
pub fn set_propagation(propagation: Propagation) -> Result<(), ErrorResponse> {
    let flags = match propagation {
        Propagation::Private => MsFlags::MS_PRIVATE,
        Propagation::Slave => MsFlags::MS_SLAVE,
        Propagation::Shared => MsFlags::MS_SHARED,
        Propagation::Unbindable => MsFlags::MS_UNBINDABLE,
    };
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | flags,
        None::<&str>,
    )
    .map_err(|e| {
        io(
            format!(
                "setting the mount tree's propagation to {propagation:?} (linux.rootfsPropagation)"
            ),
            e,
        )
    })
}

/// The loopback interface of a new network namespace, the rootfs, the spec's mounts and
/// devices, the switch of root, sysctls, masked and read-only paths, the hostname, and last the
/// root's propagation: after [`set_propagation`] made the mount tree private.
pub fn mount_and_enter(config: &Config) -> Result<(), ErrorResponse> {
    let spec = &config.spec;
    if spec.unshares(NamespaceKind::Network) {
        crate::sys::loopback_up()
            .map_err(|e| io("bringing lo up in the new network namespace", e))?;
    }
    umask(Mode::empty());
    let root = &config.rootfs_dir;
    let userns = spec.unshares(NamespaceKind::User);
    if userns {
        // Mounted before the user namespace (`unshare_namespaces`), the shares are locked in
        // the container's mount namespace, and `pivot_root` refuses a locked mount: the rootfs
        // bound on itself is a mount of this namespace.
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| io(format!("binding {} on itself", root.display()), e))?;
    } else {
        mount_shares(config)?;
    }
    let mut dev_tmpfs = false;
    for (i, m) in spec.mounts.iter().enumerate() {
        mount_one(config, root, i, m)?;
        dev_tmpfs |= m.destination.trim_end_matches('/') == "/dev" && !m.is_bind();
    }
    if dev_tmpfs {
        default_devices(config, root)?;
    }
    spec_devices(config, root)?;

    enter_root(root)?;

    for (key, value) in &spec.sysctl {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value)
            .map_err(|e| io(format!("linux.sysctl {key:?} = {value:?}"), e))?;
    }
    for (i, path) in spec.masked_paths.iter().enumerate() {
        mask_path(path).map_err(|e| io(format!("linux.maskedPaths[{i}] {path:?}"), e))?;
    }
    for (i, path) in spec.readonly_paths.iter().enumerate() {
        readonly_path(path).map_err(|e| io(format!("linux.readonlyPaths[{i}] {path:?}"), e))?;
    }
    if let Some(hostname) = &spec.hostname {
        sethostname(hostname).map_err(|e| io(format!("hostname {hostname:?}"), e))?;
    }
    if let Some(domainname) = &spec.domainname {
        crate::sys::set_domainname(domainname)
            .map_err(|e| io(format!("domainname {domainname:?}"), e))?;
    }
    if let Some(personality) = spec.personality {
        let persona = match personality {
            Personality::Linux => 0x0000,
            Personality::Linux32 => 0x0008,
        };
        crate::sys::set_personality(persona)
            .map_err(|e| io(format!("linux.personality {personality:?}"), e))?;
    }
    if config.readonly {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| io("remounting the rootfs read-only (root.readonly)", e))?;
    }
    root_propagation(spec)
}

/// `linux.rootfsPropagation`, on the container's root and the mounts below it, once the root
/// is in place (`pivot_root` refuses a shared root, and the propagation of a mount point set
/// before the rootfs is mounted on it would not be the rootfs's). A mount whose own options
/// give a propagation keeps it, as in runc, where the root's is set before the mounts'.
/// `slave` leaves the root private: a slave mount receives from its peer group's other
/// members, and in a VM there is none; nothing of the host's mount tree reaches the guest's.
fn root_propagation(spec: &ContainerSpec) -> Result<(), ErrorResponse> {
    if spec.rootfs_propagation == Propagation::Private {
        return Ok(());
    }
    set_propagation(spec.rootfs_propagation)?;
    for (i, m) in spec.mounts.iter().enumerate() {
        let (_, propagation, _) = parse_options(&m.options);
        if propagation.is_empty() {
            continue;
        }
        let name = format!(
            "mounts[{i}] ({}), again after linux.rootfsPropagation",
            m.destination
        );
        set_mount_propagation(Path::new("/"), &m.destination, propagation, &name)?;
    }
    Ok(())
}

/// The virtio-fs shares: the rootfs on `rootfs_dir`, and the host's bind sources on
/// `agent_root/run/hull/binds` (in a pod VM: the pod's share on `agent_root/run/hull/pod`,
/// whose `<id>/rootfs` is bound as the rootfs and whose `<id>/binds` hold the bind sources).
fn mount_shares(config: &Config) -> Result<(), ErrorResponse> {
    let root = &config.rootfs_dir;
    std::fs::create_dir_all(root).map_err(|e| io(format!("creating {}", root.display()), e))?;
    let bind_root = |dir: &Path| {
        mount(
            Some(dir),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| io(format!("bind-mounting {} as the rootfs", dir.display()), e))
    };
    match &config.rootfs {
        RootfsSource::Virtiofs { tag } => mount_virtiofs(tag, root, MsFlags::empty())?,
        RootfsSource::Bind(dir) => bind_root(dir)?,
        RootfsSource::Share { tag, subdir } => {
            let share = agent_dir(config, hull_protocol::POD_DIR)?;
            mount_virtiofs(tag, &share, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
            bind_root(&share.join(subdir))?;
        }
    }
    if let Some(tag) = &config.binds_tag {
        let dir = agent_dir(config, hull_protocol::BINDS_DIR)?;
        mount_virtiofs(tag, &dir, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    }
    Ok(())
}

/// `path` (absolute in the guest) below the agent's root, made if missing.
fn agent_dir(config: &Config, path: &str) -> Result<std::path::PathBuf, ErrorResponse> {
    let dir = config.agent_root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Mounts the virtio-fs share `tag` on `dir`.
fn mount_virtiofs(tag: &str, dir: &Path, flags: MsFlags) -> Result<(), ErrorResponse> {
    mount(Some(tag), dir, Some("virtiofs"), flags, None::<&str>).map_err(|e| {
        io(
            format!("mounting virtio-fs tag {tag:?} on {}", dir.display()),
            e,
        )
    })
}

/// Mount flags, propagation flags and file system data of a mount's `options`.
pub fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let rec = if option.starts_with('r') {
                    MsFlags::MS_REC
                } else {
                    MsFlags::empty()
                };
                propagation |= rec
                    | match option.trim_start_matches('r') {
                        "private" => MsFlags::MS_PRIVATE,
                        "shared" => MsFlags::MS_SHARED,
                        "slave" => MsFlags::MS_SLAVE,
                        _ => MsFlags::MS_UNBINDABLE,
                    };
                continue;
            }
            other => {
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    (flags, propagation, data.join(","))
}

/// One entry of `mounts`, under the rootfs directory.
fn mount_one(config: &Config, root: &Path, i: usize, m: &Mount) -> Result<(), ErrorResponse> {
    let dest = &m.destination;
    let kind = m.kind.as_deref().unwrap_or("");
    let name = format!("mounts[{i}] ({kind} on {dest})");
    if !dest.starts_with('/') {
        return Err(invalid(format!("{name}: destination is not absolute")));
    }
    let (flags, propagation, data) = parse_options(&m.options);
    if m.is_bind() {
        let Some(source) = m.source.as_deref() else {
            return Err(invalid(format!("{name}: a bind mount needs a source")));
        };
        // The host points its bind sources at the binds share (`BINDS_DIR`); any other source
        // is a path of the guest.
        let source_path = config.agent_root.join(source.trim_start_matches('/'));
        let meta = std::fs::metadata(&source_path).map_err(|_| {
            invalid(format!(
                "{name}: bind source {source:?} does not exist in the guest"
            ))
        })?;
        let point = open_mount_point(root, dest, meta.is_dir()).map_err(|e| io(&name, e))?;
        let target = fd_path(&point);
        let bind = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(
            Some(&source_path),
            &target,
            None::<&str>,
            bind,
            None::<&str>,
        )
        .map_err(|e| io(format!("{name}: bind mount of {source:?}"), e))?;
        let mut rest = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
        if !rest.is_empty() {
            // The descriptor names the directory under the new mount; a remount needs the
            // mount's own root, which a fresh lookup finds.
            let top = open_mount_point(root, dest, meta.is_dir()).map_err(|e| io(&name, e))?;
            if config.spec.unshares(NamespaceKind::User) {
                // A mount the guest's user namespace made is locked in the container's: a
                // remount may not clear its flags, so it keeps them (as runc does).
                rest |= locked_flags(&fd_path(&top)).map_err(|e| io(&name, e))?;
            }
            mount(
                None::<&str>,
                &fd_path(&top),
                None::<&str>,
                rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(|e| io(format!("{name}: remount with {:?}", m.options), e))?;
        }
    } else {
        // The guest has cgroup v2 only.
        let fstype = match kind {
            "cgroup" => "cgroup2",
            "" => return Err(invalid(format!("{name}: no type"))),
            other => other,
        };
        let source = m.source.as_deref().unwrap_or(fstype);
        let point = open_mount_point(root, dest, true).map_err(|e| io(&name, e))?;
        let data = (!data.is_empty()).then_some(data.as_str());
        match mount(Some(source), &fd_path(&point), Some(fstype), flags, data) {
            Err(Errno::EPERM) if config.spec.unshares(NamespaceKind::User) => {
                // A user namespace may mount sysfs only with a network namespace it owns, and
                // cgroup2 only with a cgroup namespace it owns; without them, as runc does,
                // the guest's own is bound (read-only if the options say so).
                let guest = match fstype {
                    "sysfs" => "sys",
                    "cgroup2" => "sys/fs/cgroup",
                    _ => return Err(io(format!("{name}: mount"), Errno::EPERM)),
                };
                let source = config.agent_root.join(guest);
                mount(
                    Some(&source),
                    &fd_path(&point),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| io(format!("{name}: binding {}", source.display()), e))?;
                let top = open_mount_point(root, dest, true).map_err(|e| io(&name, e))?;
                let path = fd_path(&top);
                let kept = locked_flags(&path).map_err(|e| io(&name, e))?;
                mount(
                    None::<&str>,
                    &path,
                    None::<&str>,
                    flags | kept | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .map_err(|e| io(format!("{name}: remount with {:?}", m.options), e))?;
            }
            result => result.map_err(|e| io(format!("{name}: mount"), e))?,
        }
    }
    if !propagation.is_empty() {
        set_mount_propagation(root, dest, propagation, &name)?;
    }
    Ok(())
}

/// Gives the mount on `dest` (below `root`) the propagation flags `propagation`. The mount sits
/// on the mount point: its path is resolved inside the root again (the descriptor must outlive
/// the call: its path is only a name for it).
fn set_mount_propagation(
    root: &Path,
    dest: &str,
    propagation: MsFlags,
    name: &str,
) -> Result<(), ErrorResponse> {
    let top = open_mount_point(root, dest, true).map_err(|e| io(name, e))?;
    mount(
        None::<&str>,
        &fd_path(&top),
        None::<&str>,
        propagation,
        None::<&str>,
    )
    .map_err(|e| io(format!("{name}: propagation"), e))
}

/// Opens (`O_PATH`) the mount point `dest` below `root`, making what is missing (directories,
/// and the last component as a directory or, for `dir` false, an empty file), with every
/// symlink of the image resolved *inside* `root` (`openat2` with `RESOLVE_IN_ROOT`), as if
/// `root` were `/`: a link to `/etc` or to `../../..` never leads out of the rootfs (runc's
/// CVE-2021-30465 class). The mount then goes on `/proc/self/fd/N` of the descriptor.
fn open_mount_point(root: &Path, dest: &str, dir: bool) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{openat2, OpenHow, ResolveFlag};
    use nix::sys::stat::mkdirat;

    let how = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let root_fd = open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let parts: Vec<&str> = dest
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let mut so_far = PathBuf::from("/");
    let mut parent = root_fd.try_clone()?;
    for (i, part) in parts.iter().enumerate() {
        so_far.push(part);
        let last = i + 1 == parts.len();
        match openat2(&root_fd, &so_far, how()) {
            Ok(fd) => parent = fd,
            Err(Errno::ENOENT) if *part != ".." => {
                // `parent` is the real directory the previous components resolved to.
                let made = if last && !dir {
                    nix::fcntl::openat(
                        &parent,
                        *part,
                        OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_WRONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )
                    .map(drop)
                } else {
                    mkdirat(&parent, *part, Mode::from_bits_truncate(0o755))
                };
                match made {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                parent = openat2(&root_fd, &so_far, how())?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(parent)
}

/// The path that names what `fd` is open on, for calls that take paths (`mount`).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The devices every container gets in a tmpfs `/dev`, as runc makes them.
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Makes the devices of a tmpfs `/dev`: nodes, or in a user namespace (where `mknod` of a
/// device is refused) bind mounts of the agent's, as runc binds the host's.
fn default_devices(config: &Config, root: &Path) -> Result<(), ErrorResponse> {
    let dev = root.join("dev");
    let userns = config.spec.unshares(NamespaceKind::User);
    for (name, major, minor) in DEFAULT_DEVICES {
        let path = dev.join(name);
        let _ = std::fs::remove_file(&path);
        if userns {
            let source = config.agent_root.join("dev").join(name);
            let dir = open_mount_point(root, "/dev", true)
                .map_err(|e| io(format!("creating device /dev/{name}"), e))?;
            bind_device(&source, &dir, name)
                .map_err(|e| io(format!("binding {} on /dev/{name}", source.display()), e))?;
            continue;
        }
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(|e| io(format!("creating device /dev/{name}"), e))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, to) in links {
        symlink(to, dev.join(name)).map_err(|e| io(format!("creating link /dev/{name}"), e))?;
    }
    // The devpts instance's own ptmx, if the spec mounts one.
    if dev.join("pts/ptmx").exists() {
        let _ = std::fs::remove_file(dev.join("ptmx"));
        symlink("pts/ptmx", dev.join("ptmx")).map_err(|e| io("creating link /dev/ptmx", e))?;
    }
    Ok(())
}

/// `linux.devices`: extra device nodes.
fn spec_devices(config: &Config, root: &Path) -> Result<(), ErrorResponse> {
    for (i, d) in config.spec.devices.iter().enumerate() {
        let name = format!("linux.devices[{i}] ({})", d.path);
        let kind = match d.kind {
            DeviceKind::Char => SFlag::S_IFCHR,
            DeviceKind::Block => SFlag::S_IFBLK,
            DeviceKind::Fifo => SFlag::S_IFIFO,
        };
        // The parent directory resolved inside the rootfs (see `open_mount_point`); the node
        // made and changed by its name there, never through a link of the image.
        let (parent, file) = match d.path.rsplit_once('/') {
            Some((parent, file)) if !file.is_empty() && file != "." && file != ".." => {
                (parent, file)
            }
            _ => return Err(invalid(format!("{name}: not a file path"))),
        };
        let dir = open_mount_point(root, parent, true).map_err(|e| io(&name, e))?;
        // A file left by the image (or `/dev`'s defaults) goes; a directory stays (and fails).
        let _ = nix::unistd::unlinkat(&dir, file, nix::unistd::UnlinkatFlags::NoRemoveDir);
        if config.spec.unshares(NamespaceKind::User) && d.kind != DeviceKind::Fifo {
            // No `mknod` of a device in a user namespace: the guest's node of that path, bound, with its
            // own owner and mode (changing them would change the guest's).
            let source = config.agent_root.join(d.path.trim_start_matches('/'));
            bind_device(&source, &dir, file)
                .map_err(|e| io(format!("{name}: binding {}", source.display()), e))?;
            continue;
        }
        let mode = Mode::from_bits_truncate(d.file_mode.unwrap_or(0o666));
        nix::sys::stat::mknodat(
            &dir,
            file,
            kind,
            mode,
            makedev(d.major as u64, d.minor as u64),
        )
        .map_err(|e| io(&name, e))?;
        if d.uid.is_some() || d.gid.is_some() {
            nix::unistd::fchownat(
                &dir,
                file,
                d.uid.map(nix::unistd::Uid::from_raw),
                d.gid.map(nix::unistd::Gid::from_raw),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io(&name, e))?;
        }
    }
    Ok(())
}

/// The flags of the mount at `path` that a user namespace cannot clear on a mount it did not
/// make: read-only, `nosuid`, `nodev`, `noexec` and the access-time ones.
fn locked_flags(path: &Path) -> nix::Result<MsFlags> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let current = statvfs(path)?.flags();
    let pairs = [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st, _)| current.contains(*st))
        .fold(MsFlags::empty(), |flags, (_, ms)| flags | *ms))
}

/// Binds the device node `source` on a new empty file `file` of `dir`.
fn bind_device(source: &Path, dir: &OwnedFd, file: &str) -> nix::Result<()> {
    let meta = std::fs::metadata(source)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)))?;
    use std::os::unix::fs::FileTypeExt;
    if !(meta.file_type().is_char_device() || meta.file_type().is_block_device()) {
        return Err(Errno::ENODEV);
    }
    drop(nix::fcntl::openat(
        dir,
        file,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?);
    let target = nix::fcntl::openat(
        dir,
        file,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    mount(
        Some(source),
        &fd_path(&target),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

/// Makes `root` the process's root: `pivot_root`, then the old root (the agent's) detached.
fn enter_root(root: &Path) -> Result<(), ErrorResponse> {
    chdir(root).map_err(|e| io(format!("chdir {}", root.display()), e))?;
    pivot_root(".", ".").map_err(|e| io(format!("pivot_root into {}", root.display()), e))?;
    // The old root is now stacked on "."; detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| io("detaching the old root", e))?;
    chdir("/").map_err(|e| io("chdir /", e))
}

/// `linux.maskedPaths`: a read-only empty tmpfs on a directory, `/dev/null` on anything else.
fn mask_path(path: &str) -> nix::Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) => return Ok(()),
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }
}

/// `linux.readonlyPaths`: a read-only bind mount of the path on itself.
fn readonly_path(path: &str) -> nix::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
}

#[cfg(test)]
mod tests {
    use hull_protocol::spec::Namespace;

    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn exec_joins_the_unshared_namespaces_and_always_the_mount_namespace() {
        let ns = |kind, path: Option<&str>| Namespace {
            kind,
            path: path.map(str::to_owned),
        };
        let spec = ContainerSpec {
            namespaces: vec![
                ns(NamespaceKind::Mount, None),
                ns(NamespaceKind::Pid, None),
                ns(NamespaceKind::Uts, None),
                ns(NamespaceKind::Network, Some("/var/run/netns/host-side")),
                ns(NamespaceKind::Cgroup, None),
            ],
            ..ContainerSpec::default()
        };
        let names: Vec<_> = exec_namespaces(&spec).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["uts", "cgroup", "pid", "mnt"]);
        assert_eq!(
            exec_namespaces(&ContainerSpec::default()),
            [("mnt", CloneFlags::CLONE_NEWNS)]
        );
    }

    #[test]
    fn mount_points_are_made_with_the_image_s_symlinks_resolved_inside_the_rootfs() {
        let base = std::env::temp_dir().join(format!("hull-mount-point-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/", root.join("etc/evil")).unwrap();
        symlink("../../../../..", root.join("up")).unwrap();
        let name = format!("hull-escape-{}", std::process::id());
        let inside = |fd: &OwnedFd| std::fs::read_link(fd_path(fd)).unwrap();

        // /etc/evil is "/": inside the rootfs, not the agent's (or host's) root.
        let dir = open_mount_point(&root, &format!("/etc/evil/{name}/sub"), true).unwrap();
        assert_eq!(inside(&dir), root.join(&name).join("sub"));
        assert!(
            !Path::new("/").join(&name).exists(),
            "made outside the rootfs"
        );
        // `..` past the top stays at the top, as it does at `/`.
        let file = open_mount_point(&root, "/up/../x", false).unwrap();
        assert_eq!(inside(&file), root.join("x"));
        assert!(root.join("x").is_file());
        // What exists is opened, not made again.
        let again = open_mount_point(&root, "/etc", true).unwrap();
        assert_eq!(inside(&again), root.join("etc"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let (flags, prop, data) =
            parse_options(&opts(&["nosuid", "strictatime", "mode=755", "size=65536k"]));
        assert_eq!(flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert!(prop.is_empty());
        assert_eq!(data, "mode=755,size=65536k");
        let (flags, prop, data) = parse_options(&opts(&["rbind", "ro", "rw", "rprivate"]));
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(prop, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(data, "");
        let (_, prop, _) = parse_options(&opts(&["slave"]));
        assert_eq!(prop, MsFlags::MS_SLAVE);
    }
}
