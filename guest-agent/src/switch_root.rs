//! Leaving the initramfs for a root that is a real mount, first thing at boot.
//!
//! The kernel unpacks the initramfs into `rootfs`, the one mount with no parent. `pivot_root(2)`
//! refuses to move it, so a container's init could only be moved over it and `chroot`ed, leaving
//! the initramfs (and the agent's own mounts) beneath the container's root, one `chroot` escape
//! away. So the agent does what `switch_root(8)` does before anything else: it copies the
//! initramfs into a tmpfs, deletes the originals (freeing their memory), moves the tmpfs onto
//! `/`, `chroot`s into it and executes itself again there, marked with [`SWITCHED_ARG`]. From
//! then on the agent's root is a mount like any other: a container's init can `pivot_root` into
//! its own root and detach the agent's, so nothing of the agent stays reachable from it.
//!
//! Only in the guest (`Mode::Guest`); the host tests run the agent in a mount namespace whose root
//! is already a real mount.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chdir, chroot, execv};

/// The argument the agent passes to itself once it runs from the new root.
pub const SWITCHED_ARG: &str = "--hull-switched-root";

/// Where the new root is built, in the initramfs (a name no archive entry has).
const NEW_ROOT: &str = "/.hull-root";

/// Why the switch failed: what the agent was doing, with which path.
#[derive(Debug, thiserror::Error)]
#[error("leaving the initramfs: {what} {}", path.display())]
pub struct SwitchError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn fail<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SwitchError + 'a {
    move |source| SwitchError {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether this process already runs from the switched root: it was given [`SWITCHED_ARG`].
pub fn switched<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> bool {
    args.into_iter()
        .any(|a| a.as_ref() == OsStr::new(SWITCHED_ARG))
}

/// Copies the initramfs into a tmpfs, makes that the root and executes `program` (the path the
/// kernel started the agent by, `/init`) from it. Returns only on failure.
pub fn leave_initramfs(program: &CStr) -> SwitchError {
    match switch(Path::new("/"), Path::new(NEW_ROOT)) {
        Ok(()) => {}
        Err(e) => return e,
    }
    let args = [
        program.to_owned(),
        CString::new(SWITCHED_ARG).expect("no NUL in the marker"),
    ];
    let e = execv(program, &args).unwrap_err();
    SwitchError {
        what: "executing the agent again from the new root:",
        path: PathBuf::from(OsStr::from_bytes(program.to_bytes())),
        source: errno(e),
    }
}

/// Moves the tree under `old` (the initramfs) into a tmpfs mounted at `new` (inside it), then
/// makes that tmpfs the root of this process.
fn switch(old: &Path, new: &Path) -> Result<(), SwitchError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(new)
        .map_err(fail("creating", new))?;
    mount(
        Some("hull-root"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| fail("mounting a tmpfs on", new)(errno(e)))?;
    let skip = new.file_name().map(OsStr::to_os_string);
    for entry in fs::read_dir(old).map_err(fail("listing", old))? {
        let entry = entry.map_err(fail("listing", old))?;
        if Some(entry.file_name()) == skip {
            continue;
        }
        let from = entry.path();
        copy_tree(&from, &new.join(entry.file_name()))?;
        remove_tree(&from)?;
    }
    chdir(new).map_err(|e| fail("entering", new)(errno(e)))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail("moving onto / the tmpfs", new)(errno(e)))?;
    chroot(".").map_err(|e| fail("chroot into", new)(errno(e)))?;
    chdir("/").map_err(|e| fail("entering", Path::new("/"))(errno(e)))
}

/// Copies `from` to `to`: directories with their contents, files, symbolic links, device nodes
/// and FIFOs, with their permission bits. An initramfs holds nothing else.
fn copy_tree(from: &Path, to: &Path) -> Result<(), SwitchError> {
    let meta = fs::symlink_metadata(from).map_err(fail("reading", from))?;
    let kind = meta.file_type();
    let mode = meta.permissions().mode() & 0o7777;
    if kind.is_dir() {
        fs::DirBuilder::new()
            .mode(mode)
            .create(to)
            .map_err(fail("creating", to))?;
        for entry in fs::read_dir(from).map_err(fail("listing", from))? {
            let entry = entry.map_err(fail("listing", from))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if kind.is_file() {
        fs::copy(from, to).map_err(fail("copying", from))?;
    } else if kind.is_symlink() {
        let target = fs::read_link(from).map_err(fail("reading the link", from))?;
        symlink(&target, to).map_err(fail("creating the link", to))?;
    } else {
        let sflag = if kind.is_char_device() {
            SFlag::S_IFCHR
        } else if kind.is_block_device() {
            SFlag::S_IFBLK
        } else if kind.is_fifo() {
            SFlag::S_IFIFO
        } else {
            // A socket: nothing listens on it any more.
            return Ok(());
        };
        mknod(to, sflag, Mode::from_bits_truncate(mode), meta.rdev())
            .map_err(|e| fail("creating the node", to)(errno(e)))?;
    }
    // The umask took bits from directories and nodes.
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .or_else(|e| if kind.is_symlink() { Ok(()) } else { Err(e) })
        .map_err(fail("setting the mode of", to))
}

fn remove_tree(path: &Path) -> Result<(), SwitchError> {
    let is_dir = fs::symlink_metadata(path)
        .map_err(fail("reading", path))?
        .is_dir();
    if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(fail("removing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_found_among_the_arguments() {
        assert!(switched(["/init", SWITCHED_ARG]));
        assert!(!switched(["/init", "quiet"]));
        assert!(!switched(Vec::<String>::new()));
    }

    #[test]
    fn a_tree_is_copied_with_its_kinds_and_modes() {
        let dir = std::env::temp_dir().join(format!("hull-switch-root-{}", std::process::id()));
        let from = dir.join("from");
        let to = dir.join("to");
        fs::create_dir_all(from.join("bin")).unwrap();
        fs::write(from.join("init"), b"agent").unwrap();
        fs::set_permissions(from.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(from.join("bin/busybox"), b"box").unwrap();
        symlink("busybox", from.join("bin/sh")).unwrap();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(from.join("root"))
            .unwrap();
        fs::set_permissions(from.join("root"), fs::Permissions::from_mode(0o1777)).unwrap();
        nix::unistd::mkfifo(&from.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();

        copy_tree(&from, &to).unwrap();
        remove_tree(&from).unwrap();

        assert!(!from.exists());
        assert_eq!(fs::read(to.join("init")).unwrap(), b"agent");
        let mode = |p: &str| {
            fs::symlink_metadata(to.join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(mode("init") & 0o7777, 0o755);
        assert_eq!(mode("root") & 0o7777, 0o1777);
        assert_eq!(fs::read(to.join("bin/busybox")).unwrap(), b"box");
        assert_eq!(
            fs::read_link(to.join("bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
        assert!(fs::symlink_metadata(to.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_error_names_what_and_where() {
        let missing = Path::new("/nonexistent/hull-switch-root");
        let err = copy_tree(missing, Path::new("/tmp/unused")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("reading"), "{text}");
        assert!(text.contains("/nonexistent/hull-switch-root"), "{text}");
    }
}
