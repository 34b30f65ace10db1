//! Where hull finds its other pieces: the guest kernel and initramfs, and `hull-vmm`.

use std::path::{Path, PathBuf};

/// Where hull looks for its guest kernel and initramfs: `$HULL_GUEST_DIR`, an installed
/// `../share/hull/guest` next to the binary, or the workspace's `build/guest`.
pub fn guest_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("HULL_GUEST_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(bin_dir) = bin_dir() {
        dirs.push(bin_dir.join("../share/hull/guest"));
        // target/<profile>/hull in a checkout.
        dirs.push(bin_dir.join("../../build/guest"));
    }
    dirs
}

/// The first of `dirs` that holds both `vmlinux` and `initramfs.cpio`.
pub fn find_guest_dir(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .find(|d| d.join("vmlinux").is_file() && d.join("initramfs.cpio").is_file())
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
}

/// Checks that nobody but root and this user can have changed `path`: the file and each
/// directory above it are owned by root or by the effective user, and writable by nobody else
/// (a directory others may write to is allowed only with the sticky bit, like `/tmp`, where
/// they cannot replace what is not theirs). hull runs what it finds there as root, so an
/// environment variable or a checkout must not be a way to hand it another program or kernel.
pub fn check_trusted(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let own = nix::unistd::geteuid().as_raw();
    let canonical = path
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut at = Some(canonical.as_path());
    while let Some(p) = at {
        let meta = std::fs::metadata(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let mode = meta.mode() & 0o7777;
        let whose = meta.uid();
        if whose != 0 && whose != own {
            anyhow::bail!(
                "{} is not trusted: {} belongs to uid {whose}, not root or uid {own}",
                path.display(),
                p.display()
            );
        }
        let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_dir {
            anyhow::bail!(
                "{} is not trusted: {} is writable by others (mode {mode:04o})",
                path.display(),
                p.display()
            );
        }
        at = p.parent();
    }
    Ok(())
}

/// The guest kernel and the production initramfs, or an error naming where hull looked.
pub fn guest_files() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dirs = guest_dirs();
    match find_guest_dir(&dirs) {
        Some(dir) => {
            let files = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
            check_trusted(&files.0)?;
            check_trusted(&files.1)?;
            Ok(files)
        }
        None => {
            let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            anyhow::bail!(
                "no guest kernel: none of [{}] holds vmlinux and initramfs.cpio \
                 (run `make kernel agent`, or set HULL_GUEST_DIR)",
                list.join(", ")
            )
        }
    }
}

/// `hull-vmm`: `$HULL_VMM`, else next to the running `hull`.
pub fn vmm_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HULL_VMM") {
        let path = PathBuf::from(path);
        check_trusted(&path).map_err(|e| anyhow::anyhow!("HULL_VMM: {e:#}"))?;
        return Ok(path);
    }
    let dir =
        bin_dir().ok_or_else(|| anyhow::anyhow!("cannot find the hull binary's directory"))?;
    let vmm = dir.join("hull-vmm");
    if !vmm.is_file() {
        anyhow::bail!(
            "hull-vmm not found at {} (build it, or set HULL_VMM)",
            vmm.display()
        );
    }
    check_trusted(&vmm)?;
    Ok(vmm)
}

fn bin_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_dir_needs_both_files() {
        let dir = std::env::temp_dir().join(format!("hull-guestdir-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), "").unwrap();
        let dirs = vec!["/no/such/dir".into(), dir.clone()];
        assert_eq!(find_guest_dir(&dirs), None);
        std::fs::write(dir.join("initramfs.cpio"), "").unwrap();
        assert_eq!(find_guest_dir(&dirs), Some(dir.canonicalize().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_files_nobody_else_can_change_are_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let top = crate::testutil::TempDir::new("trusted");
        set(top.path(), 0o755);
        let dir = top.join("bin");
        std::fs::create_dir(&dir).unwrap();
        set(&dir, 0o755);
        let file = dir.join("hull-vmm");
        std::fs::write(&file, "").unwrap();
        set(&file, 0o755);
        check_trusted(&file).unwrap();

        set(&file, 0o757);
        let err = check_trusted(&file).unwrap_err().to_string();
        assert!(err.contains("writable by others (mode 0757)"), "{err}");
        set(&file, 0o775);
        assert!(check_trusted(&file).is_err(), "group-writable");
        set(&file, 0o755);

        set(&dir, 0o777);
        let err = check_trusted(&file).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{} is writable", dir.display())),
            "{err}"
        );
        // Sticky, like /tmp: others cannot replace what is not theirs.
        set(&dir, 0o1777);
        check_trusted(&file).unwrap();
        set(&dir, 0o755);

        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let err = check_trusted(&file).unwrap_err().to_string();
            assert!(err.contains("belongs to uid 65534"), "{err}");
        }
    }
}
