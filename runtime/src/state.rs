//! A container's state directory, `<root>/<id>/`: created exclusively (the container id is
//! taken while it exists) and removed on every failure path of the command that made it;
//! `delete` removes it after a successful `create`.
//!
//! It holds `state.json` (`container.rs`), `vm.json` (the VM's configuration),
//! `container.json` (what hull-vmm creates in the guest), `vsock.sock` (the VMM's hybrid vsock
//! socket), `control.sock` (hull-vmm's control socket), `console.log` (the guest's serial
//! console), `vmm.log` (hull-vmm's own messages) and `jail/` (empty: hull-vmm's jail is
//! mounted there in its own mount namespace).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Errors making a state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("container {id} already exists ({})", path.display())]
    Exists { id: String, path: PathBuf },
    #[error("cannot create state directory {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks a container id the way runc does: letters, digits, `_`, `+`, `-`, `.`; not `.` or
/// `..`, so that it is one path component.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let invalid = |reason| StateError::InvalidId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > 1024 {
        return Err(invalid("it is longer than 1024 bytes"));
    }
    if id == "." || id == ".." {
        return Err(invalid("it is not a name"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'))
    {
        return Err(invalid(
            "only letters, digits, '_', '+', '-' and '.' are allowed",
        ));
    }
    Ok(())
}

/// The VM's configuration in a state directory (hull-vmm's `--config`).
pub const VM_CONFIG: &str = "vm.json";
/// The container's configuration in a state directory (hull-vmm's `--container`).
pub const CONTAINER_CONFIG: &str = "container.json";
/// hull-vmm's log in a state directory.
pub const VMM_LOG: &str = "vmm.log";
/// Where hull-vmm jails itself (`--jail`): empty on the host, its jail in its own mount
/// namespace.
pub const JAIL: &str = "jail";
/// hull-vmm's hybrid vsock socket: streams to the guest's processes are opened here.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// A pod VM's one share (`hull_protocol::POD_FS_TAG`): a shared mount of its own, so that the
/// containers' rootfs and bind mounts that the shim mounts under it later reach hull-vmm's
/// jail (a slave of it) and through it the guest.
pub const POD_SHARE: &str = "pod";

/// Makes `<dir>/pod` and makes it a shared mount of its own (a bind on itself, private, then
/// shared: a peer group of its own, whatever `/` is).
pub fn share_pod(dir: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use nix::mount::{mount, MsFlags};
    let share = dir.join(POD_SHARE);
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&share)
        .with_context(|| format!("cannot make {}", share.display()))?;
    let none = None::<&str>;
    mount(Some(&share), &share, none, MsFlags::MS_BIND, none)
        .with_context(|| format!("cannot bind {} on itself", share.display()))?;
    for (flag, what) in [
        (MsFlags::MS_PRIVATE, "private"),
        (MsFlags::MS_SHARED, "shared"),
    ] {
        if let Err(err) = mount(none, &share, none, flag, none) {
            let _ = release_pod_share(dir);
            return Err(err).with_context(|| format!("cannot make {} {what}", share.display()));
        }
    }
    Ok(share)
}

/// Detaches `<dir>/pod` and everything mounted under it, if it is there: before anything
/// removes the state directory, which must never reach into a container's rootfs. False if
/// a mount may still be there: the directory must then be left as it is.
pub fn release_pod_share(dir: &Path) -> bool {
    let share = dir.join(POD_SHARE);
    loop {
        match nix::mount::umount2(&share, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            // Not (or no longer) a mount point, or not there at all.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return true,
            Err(err) => {
                log::warn!("cannot unmount {}: {err}", share.display());
                return false;
            }
        }
    }
}

/// `<root>/<id>/`, removed with everything in it on drop unless kept.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    keep: bool,
}

impl StateDir {
    /// Creates `<root>` if needed (mode 0700) and `<root>/<id>` exclusively.
    pub fn create(root: &Path, id: &str) -> Result<Self, StateError> {
        validate_id(id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|source| StateError::Create {
                path: root.to_owned(),
                source,
            })?;
        let path = root.join(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(Self { path, keep: false }),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists {
                    id: id.to_owned(),
                    path,
                })
            }
            Err(source) => Err(StateError::Create { path, source }),
        }
    }

    /// Leaves the directory in place: the container lives on after this command.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `vm.json`.
    pub fn vm_config(&self) -> PathBuf {
        self.path.join(VM_CONFIG)
    }

    /// `vsock.sock`.
    pub fn vsock(&self) -> PathBuf {
        self.path.join(VSOCK_SOCKET)
    }

    /// `binds/`: the share of the container's bind mounts, an entry each.
    pub fn binds(&self) -> PathBuf {
        self.path.join("binds")
    }

    /// `console.log`.
    pub fn console(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// `vmm.log`: hull-vmm's standard error.
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join(VMM_LOG)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if !release_pod_share(&self.path) {
            log::warn!(
                "{} left in place: its pod share is still mounted",
                self.path.display()
            );
            return;
        }
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {err}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "hull-state-test-{}-{}/root",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn mounted(path: &Path) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(path))
    }

    #[test]
    fn a_pod_share_is_mounted_shared_and_released_before_its_directory_goes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let root = temp_root();
        let state = StateDir::create(&root, "pod1").unwrap();
        // Nothing there yet: nothing to release.
        assert!(release_pod_share(state.path()));
        let share = share_pod(state.path()).unwrap();
        assert!(mounted(&share));
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == share.to_str())
            .unwrap();
        assert!(line.contains(" shared:"), "{line}");
        // A container's rootfs bound below it survives the state directory's removal.
        let rootfs = root.parent().unwrap().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("keep"), "x").unwrap();
        std::fs::create_dir(share.join("c1")).unwrap();
        let none = None::<&str>;
        nix::mount::mount(
            Some(&rootfs),
            &share.join("c1"),
            none,
            nix::mount::MsFlags::MS_BIND,
            none,
        )
        .unwrap();
        let dir = state.path().to_owned();
        drop(state);
        assert!(!dir.exists());
        assert!(!mounted(&share));
        assert_eq!(std::fs::read_to_string(rootfs.join("keep")).unwrap(), "x");
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }

    #[test]
    fn ids_are_single_path_components() {
        for ok in ["t1", "a.b-c_d+e", "0123456789abcdef"] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate_id("a/b").unwrap_err().to_string(),
            "invalid container id \"a/b\": only letters, digits, '_', '+', '-' and '.' are allowed"
        );
    }

    #[test]
    fn state_dir_is_exclusive_and_removed_on_drop() {
        let root = temp_root();
        let state = StateDir::create(&root, "c1").unwrap();
        assert!(state.path().is_dir());
        assert_eq!(state.vsock(), root.join("c1/vsock.sock"));
        std::fs::write(state.console(), "log").unwrap();

        let err = StateDir::create(&root, "c1").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "container c1 already exists ({})",
                root.join("c1").display()
            )
        );
        // The failed attempt removed nothing.
        assert!(state.console().is_file());

        let other = StateDir::create(&root, "c2").unwrap();
        drop(state);
        assert!(!root.join("c1").exists());
        assert!(other.path().is_dir());
        drop(other);
        assert!(!root.join("c2").exists());
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_uncreatable_root_is_named() {
        let err = StateDir::create(Path::new("/proc/hull-no-such-root"), "c").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot create state directory /proc/hull-no-such-root"),
            "{err}"
        );
    }
}
