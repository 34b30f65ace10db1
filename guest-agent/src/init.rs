//! The file systems PID 1 mounts before anything else runs.
//!
//! Each mount point is created if it is missing, and a mount that is already there (a mount
//! point holding the expected file system type) is left alone, so the agent can be restarted
//! and can run where someone mounted things before it. `/proc`, `/sys` and `/dev` are required:
//! without them nothing else works, and their failure is fatal. The others are best effort: the
//! agent logs the failure and goes on.
//!
//! All paths are relative to a root directory: `/` in the guest, a temporary directory in the
//! host tests (see `mode.rs`).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::stat;
use nix::sys::statfs::{
    statfs, FsType, CGROUP2_SUPER_MAGIC, DEVPTS_SUPER_MAGIC, PROC_SUPER_MAGIC, SYSFS_MAGIC,
    TMPFS_MAGIC,
};

use crate::console;

/// `RAMFS_MAGIC` from `include/uapi/linux/magic.h`; nix has no constant for it. devtmpfs is a
/// ramfs when the kernel has no tmpfs, and so is an initramfs.
pub const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// Errors mounting the early file systems.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} on {path}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// One early mount.
#[derive(Debug)]
pub struct MountSpec {
    /// Where, relative to the root directory.
    pub target: &'static str,
    /// File system type, also used as the source name.
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
    /// `statfs` types that mean "already mounted" on a mount point.
    pub magics: &'static [FsType],
    /// Whether failing to mount it is fatal.
    pub required: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The early mounts, in order: each parent before its children.
pub const EARLY_MOUNTS: &[MountSpec] = &[
    MountSpec {
        target: "proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        magics: &[PROC_SUPER_MAGIC],
        required: true,
    },
    MountSpec {
        target: "sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        magics: &[SYSFS_MAGIC],
        required: true,
    },
    MountSpec {
        target: "dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        magics: &[TMPFS_MAGIC, RAMFS_MAGIC],
        required: true,
    },
    MountSpec {
        target: "dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        // gid 5 is "tty" by convention; the number is used, there is no /etc/group here.
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
        magics: &[DEVPTS_SUPER_MAGIC],
        required: false,
    },
    MountSpec {
        target: "sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        magics: &[CGROUP2_SUPER_MAGIC],
        required: false,
    },
    MountSpec {
        target: "run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        magics: &[TMPFS_MAGIC],
        required: false,
    },
];

/// What [`mount_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    AlreadyMounted,
}

/// Mounts [`EARLY_MOUNTS`] under `root`. Fails on the first required mount that fails; logs the
/// others.
pub fn mount_early(root: &Path) -> Result<(), MountError> {
    for spec in EARLY_MOUNTS {
        match mount_one(root, spec) {
            Ok(MountOutcome::Mounted) => {}
            Ok(MountOutcome::AlreadyMounted) => {
                console::log(&format!(
                    "{} already mounted on /{}",
                    spec.fstype, spec.target
                ));
            }
            Err(err) if spec.required => return Err(err),
            Err(err) => console::log(&format!("warning: {}", crate::error_chain(&err))),
        }
    }
    Ok(())
}

/// Mounts one file system under `root`, creating its mount point if needed.
pub fn mount_one(root: &Path, spec: &MountSpec) -> Result<MountOutcome, MountError> {
    let path = root.join(spec.target);
    if is_mounted(&path, spec.magics) {
        return Ok(MountOutcome::AlreadyMounted);
    }
    std::fs::create_dir_all(&path).map_err(|source| MountError::CreateDir {
        path: path.clone(),
        source,
    })?;
    mount(
        Some(spec.fstype),
        &path,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    )
    .map_err(|source| MountError::Mount {
        fstype: spec.fstype,
        path,
        source,
    })?;
    Ok(MountOutcome::Mounted)
}

/// Whether `path` is a mount point (another device than its parent) of one of `magics`.
pub fn is_mounted(path: &Path, magics: &[FsType]) -> bool {
    let parent = path.join("..");
    let (Ok(here), Ok(up), Ok(fs)) = (stat(path), stat(&parent), statfs(path)) else {
        return false;
    };
    here.st_dev != up.st_dev && magics.contains(&fs.filesystem_type())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_before_children() {
        for (i, spec) in EARLY_MOUNTS.iter().enumerate() {
            for later in &EARLY_MOUNTS[i + 1..] {
                assert!(
                    !spec.target.starts_with(&format!("{}/", later.target)),
                    "{} is mounted before its parent {}",
                    spec.target,
                    later.target
                );
            }
        }
    }

    #[test]
    fn only_proc_sys_dev_are_required() {
        let required: Vec<_> = EARLY_MOUNTS
            .iter()
            .filter(|s| s.required)
            .map(|s| s.target)
            .collect();
        assert_eq!(required, ["proc", "sys", "dev"]);
    }

    #[test]
    fn recognises_mounts_of_this_host() {
        // The test host has procfs on /proc and sysfs on /sys, but / is not a proc mount point
        // and /proc/self is not a mount point at all.
        assert!(is_mounted(Path::new("/proc"), &[PROC_SUPER_MAGIC]));
        assert!(is_mounted(Path::new("/sys"), &[SYSFS_MAGIC]));
        assert!(!is_mounted(Path::new("/proc"), &[SYSFS_MAGIC]));
        assert!(!is_mounted(Path::new("/proc/self"), &[PROC_SUPER_MAGIC]));
        assert!(!is_mounted(
            Path::new("/nonexistent-hull"),
            &[PROC_SUPER_MAGIC]
        ));
    }
}
