//! A pod's container on the host side: its rootfs and bind mounts put where the pod VM's share
//! (`<hull root>/<sandbox>/pod`, a shared mount that hull-vmm's jail receives) carries them
//! into the guest, and its spec turned into the agent's `create_container` request.
//!
//! Under the share, each container has `<id>/rootfs` (a bind of the bundle's rootfs, which the
//! shim mounted from containerd's snapshot) and `<id>/binds/<n>` (each bind mount's host
//! source). Everything is undone in reverse by [`Prepared::release`], and by
//! [`release_leftovers`] after a shim that died.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use containerd_shim::protos::types::mount::Mount;
use hull_protocol::spec::NamespaceKind;
use hull_protocol::{CreateContainer, Rootfs, Stdio, BINDS_DIR, POD_DIR, POD_FS_TAG};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// The rootfs and binds of one container, mounted on the host.
#[derive(Debug)]
pub struct Prepared {
    /// `<bundle>/rootfs`, if the shim mounted the snapshot there.
    pub bundle_rootfs: Option<PathBuf>,
    /// `<share>/<id>`.
    pub dir: PathBuf,
}

impl Prepared {
    /// Unmounts what [`prepare`] mounted and removes the container's directory of the share.
    pub fn release(&self) {
        release_dir(&self.dir);
        if let Some(rootfs) = &self.bundle_rootfs {
            detach(rootfs);
        }
    }
}

/// Detaches everything mounted on `path` (stacked mounts too).
fn detach(path: &Path) {
    while umount2(path, MntFlags::MNT_DETACH).is_ok() {}
}

/// Unmounts a container's directory of the share and removes it. Each entry is a mount point
/// (or was never mounted); nothing below them is removed but the empty points themselves.
fn release_dir(dir: &Path) {
    let binds = dir.join("binds");
    if let Ok(entries) = fs::read_dir(&binds) {
        for entry in entries.flatten() {
            let point = entry.path();
            detach(&point);
            let _ = fs::remove_file(&point).or_else(|_| fs::remove_dir(&point));
        }
    }
    let _ = fs::remove_dir(&binds);
    let rootfs = dir.join("rootfs");
    detach(&rootfs);
    let _ = fs::remove_dir(&rootfs);
    if let Err(err) = fs::remove_dir(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {err}", dir.display());
        }
    }
}

/// After a shim that died: the container `id`'s mounts, if its pod's share is still there.
pub fn release_leftovers(share: &Path, id: &str, bundle: &Path) {
    if share.join(id).exists() {
        release_dir(&share.join(id));
    }
    detach(&bundle.join("rootfs"));
}

/// Mounts containerd's `rootfs` mounts on `<bundle>/rootfs` (none: the bundle's rootfs is
/// already there), binds it and the spec's bind sources under `<share>/<id>`, and returns the
/// request that creates the container in the pod VM.
pub fn prepare(
    share: &Path,
    id: &str,
    bundle: &Path,
    rootfs_mounts: &[Mount],
    stdio: Stdio,
) -> anyhow::Result<(Prepared, CreateContainer)> {
    let mut prepared = Prepared {
        bundle_rootfs: None,
        dir: share.join(id),
    };
    let result = prepare_into(&mut prepared, id, bundle, rootfs_mounts, stdio);
    if result.is_err() {
        prepared.release();
    }
    result.map(|create| (prepared, create))
}

fn prepare_into(
    prepared: &mut Prepared,
    id: &str,
    bundle: &Path,
    rootfs_mounts: &[Mount],
    stdio: Stdio,
) -> anyhow::Result<CreateContainer> {
    let bundle_rootfs = bundle.join("rootfs");
    for m in rootfs_mounts {
        let fs_type = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        mount_snapshot(fs_type, source, &m.options, &bundle_rootfs).with_context(|| {
            format!(
                "cannot mount the rootfs ({} {}) on {}",
                m.type_,
                m.source,
                bundle_rootfs.display()
            )
        })?;
        prepared.bundle_rootfs = Some(bundle_rootfs.clone());
    }
    let spec = hull::spec::BundleSpec::load(bundle)?;
    let mut container = spec.container.clone();
    // The pod's network, IPC and UTS namespaces are the guest's own: a container joins them by
    // making none. The entries CRI gives name the sandbox's (on the host, hull-vmm's); the
    // network entry's path was taken out already (`BundleSpec::netns`).
    container.namespaces.retain(|ns| {
        ns.path.is_none()
            && !matches!(
                ns.kind,
                NamespaceKind::Network | NamespaceKind::Ipc | NamespaceKind::Uts
            )
    });
    // The pod's host name is the VM's (set when the sandbox was made).
    container.hostname = None;

    let dir = &prepared.dir;
    fs::DirBuilder::new()
        .mode(0o711)
        .create(dir)
        .with_context(|| format!("cannot make {}", dir.display()))?;
    let rootfs_point = dir.join("rootfs");
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&rootfs_point)
        .with_context(|| format!("cannot make {}", rootfs_point.display()))?;
    bind(&spec.rootfs, &rootfs_point, true, false)?;

    let binds_dir = dir.join("binds");
    fs::DirBuilder::new()
        .mode(0o711)
        .create(&binds_dir)
        .with_context(|| format!("cannot make {}", binds_dir.display()))?;
    for b in &spec.binds {
        let point = binds_dir.join(&b.name);
        if b.source.is_dir() {
            fs::DirBuilder::new().mode(0o700).create(&point)
        } else {
            fs::File::create(&point).map(drop)
        }
        .with_context(|| format!("cannot make the mount point {}", point.display()))?;
        bind(&b.source, &point, b.recursive, b.read_only)?;
    }
    // The agent finds the binds under the share, where the pod's one virtio-fs share is mounted.
    let from = format!("{BINDS_DIR}/");
    let to = format!("{POD_DIR}/{id}/binds/");
    for m in &mut container.mounts {
        if let Some(source) = m.source.as_mut() {
            if let Some(name) = source.strip_prefix(&from) {
                *source = format!("{to}{name}");
            }
        }
    }
    Ok(CreateContainer {
        container_id: id.to_owned(),
        spec: container,
        rootfs: Rootfs {
            fs_tag: POD_FS_TAG.to_owned(),
            readonly: spec.readonly,
            subdir: Some(format!("{id}/rootfs")),
        },
        stdio,
        binds_fs_tag: None,
        pod: true,
    })
}

/// Mounts one of containerd's rootfs mounts (an overlay, or a bind of a snapshot directory):
/// the options that are mount flags become flags, the others the file system's data. Done
/// here, in the shim's own thread: containerd-shim's helper forks and waits through a reaper
/// that this shim does not run.
fn mount_snapshot(
    fs_type: Option<&str>,
    source: Option<&str>,
    options: &[String],
    target: &Path,
) -> anyhow::Result<()> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags.remove(MsFlags::MS_RDONLY),
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    let fs_type = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        fs_type
    };
    mount(
        source,
        target,
        fs_type,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )?;
    if flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY) {
        // A bind is made read-only by a remount.
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, remount, None::<&str>)?;
    }
    Ok(())
}

/// Binds `source` on `target` (with its submounts if `recursive`), read-only if asked.
fn bind(source: &Path, target: &Path, recursive: bool, read_only: bool) -> anyhow::Result<()> {
    let none = None::<&str>;
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, none, flags, none)
        .with_context(|| format!("cannot bind {} on {}", source.display(), target.display()))?;
    if read_only {
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(err) = mount(none, target, none, remount, none) {
            detach(target);
            bail!("cannot make {} read-only: {err}", target.display());
        }
    }
    Ok(())
}
