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

/// The guest kernel and the production initramfs, or an error naming where hull looked.
pub fn guest_files() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dirs = guest_dirs();
    match find_guest_dir(&dirs) {
        Some(dir) => Ok((dir.join("vmlinux"), dir.join("initramfs.cpio"))),
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
        return Ok(PathBuf::from(path));
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
}
