//! virtio-fs (device type 26): the container's rootfs, served from a host directory.
//!
//! The guest mounts the bundle's rootfs with `mount -t virtiofs <tag> /mnt`; every FUSE request
//! it sends comes down one of two queues (hiprio for FORGET and INTERRUPT, one request queue)
//! and is answered by an in-process FUSE server: `fuse-backend-rs`'s `PassthroughFs` behind
//! [`confine::ConfinedFs`], which enforces what this module promises below.
//!
//! Threads: [`Fs::activate`] starts one "fs worker" thread per device that waits on the queue
//! notify eventfds (an `event_manager` loop around [`event_handler::FsHandler`]) and runs each
//! request to completion. File system calls can block for as long as the host's storage likes;
//! on the worker they stall only the file system, never the VMM's event loop (the control
//! socket, vsock, signals). The worker starts through the [`crate::ThreadSpawner`] the VMM
//! gives [`Fs::new`], so that a panic outside the server's own guard ends the VM. [`Fs::reset`] and dropping the device stop and join the worker. The
//! VMM registers nothing for this device beyond what every virtio-mmio device needs (the
//! transport's ioeventfds and irqfd).
//!
//! # Threat model
//!
//! The guest is hostile from its first instruction, and every byte of a FUSE request (headers,
//! lengths, names, node ids, handles, flags) is chosen by it. The host directory is the OCI
//! bundle's rootfs, prepared by whoever made the bundle; the guest must not reach anything else
//! on the host, read or write, and must not make the VMM panic or hang its event loop.
//!
//! What keeps the guest inside the shared directory:
//! - **Node ids are capabilities.** Every inode the server knows was reached by `LOOKUP` of one
//!   path component relative to an inode it already knew, starting at the root. A node id the
//!   server never handed out is `EBADF`. Each inode is held as an `O_PATH` file descriptor, so
//!   later requests act on that inode, not on a path that could be swapped underneath (rename
//!   and symlink races between lookup and open do not change what an id refers to).
//! - **One component at a time, no symlinks followed.** Lookups are `openat(dirfd, name,
//!   O_PATH | O_NOFOLLOW)`; names with `/` (which would walk several components, following
//!   symlinks on the way) and empty names are refused, and creating calls refuse `.` and `..`.
//!   A symlink is an inode of its own: `READLINK` returns its text, and the guest resolves it in
//!   the guest's namespace, which is this share. Absolute links (`/etc/hostname`) and relative
//!   ones (`../../..`) therefore never lead the host anywhere.
//! - **`..` stops at the root.** `LOOKUP(root, "..")` is the root again, checked by node id and
//!   again by device and inode number, so a second id for the root directory cannot climb out.
//! - **Opening data goes through `/proc/self/fd/N`** of the `O_PATH` descriptor (the one magic
//!   link we follow on purpose, to our own descriptor), and only for regular files and
//!   directories: device nodes, FIFOs and sockets in the share are never opened on the host.
//!   Creating character or block devices is refused with `EPERM`.
//! - **Hard links** (`LINK`) take an inode the guest already reached, so they can only link
//!   what is inside. (A hard link to an outside file that the bundle already contains is the
//!   bundle's business; the guest can reach that file exactly as the bundle made it.)
//! - **No open-by-handle**: `inode_file_handles` is off, so the server never calls
//!   `open_by_handle_at` (which resolves a handle without any path check), and no FUSE request
//!   carries a host file handle. No DAX window, no ioctls, no extended attributes (so no
//!   `trusted.*` or `security.*` games), no POSIX locks on the host.
//! - **Handles keep their descriptors.** READ and WRITE carry the guest's file flags, which
//!   `PassthroughFs` would `fcntl` onto the host descriptor (closing it when that fails, while
//!   the handle still names the number); `ConfinedFs` passes the handle's own open flags
//!   instead.
//! - **Read-only** (`root.readonly`) is enforced here, not left to the guest's mount flags:
//!   every request that would change the file system (`SETATTR`, `MKNOD`, `MKDIR`, `SYMLINK`,
//!   `LINK`, `UNLINK`, `RMDIR`, `RENAME`, `CREATE`, `WRITE`, `FALLOCATE`, xattr writes, and
//!   `OPEN` for writing or truncating) fails with `EROFS`.
//!
//! What is not covered here, and is covered elsewhere or left open:
//! - Host processes changing the share while the guest uses it (for example moving a directory
//!   the guest holds out of the share): the bundle's owner is trusted.
//! - File ownership: requests run with the guest's uid and gid as the file system ids (as
//!   virtiofsd does), so with a privileged VMM the guest's root owns what it creates.
//! - Defense in depth: the VMM is later jailed (pivot_root into a directory holding only the
//!   rootfs, no capabilities, seccomp), so even a confused lookup has nowhere to go.
//! - Resource use: the guest decides how many inodes and open files the server holds, up to
//!   `confine::MAX_INODES` and `MAX_HANDLES` (within the process's `RLIMIT_NOFILE`); past them
//!   it gets `ENFILE`. Disk space and host inodes are bounded by the host's file system.
//!
//! Guest mistakes (malformed chains, FUSE headers with lying lengths, unknown opcodes) are
//! answered with an error (or a zero-length used buffer when nothing can be parsed) and logged
//! with a rate limit; a queue the device cannot follow any more (a bad available index, a used
//! ring outside memory) or a panic in the server marks the device as needing a reset.

pub mod confine;
pub mod device;
#[cfg(test)]
mod escape_tests;
pub mod event_handler;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
#[cfg(test)]
pub mod test_utils;

use std::io;
use std::path::PathBuf;

pub use device::Fs;

/// Queue index of the high-priority queue (FORGET, INTERRUPT).
pub const HIPRIO_QUEUE: usize = 0;
/// Queue index of the one request queue.
pub const REQUEST_QUEUE: usize = 1;
/// Number of request queues the device offers (`num_request_queues`).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 1024;
/// Length of the tag field in the configuration space (`struct virtio_fs_config`).
pub const TAG_LEN: usize = 36;
/// Size of the configuration space: the tag and `num_request_queues` (no notification queue).
pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;

/// How the VMM wants a directory shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The host directory the guest sees as the root of the file system (the bundle rootfs).
    pub shared_dir: PathBuf,
    /// The mount tag the guest names in `mount -t virtiofs TAG`; 1 to 36 bytes, no NUL.
    pub tag: String,
    /// Refuse every change with `EROFS` (the OCI spec's `root.readonly`).
    pub read_only: bool,
}

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag does not fit the configuration space or is empty.
    #[error("invalid virtio-fs tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: &'static str },
    /// The shared directory cannot be resolved or is not a directory.
    #[error("cannot share {}: not an accessible directory", path.display())]
    SharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The passthrough file system could not be set up (it needs `/proc/self/fd`).
    #[error("cannot set up the passthrough file system for {}", path.display())]
    Passthrough {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks a mount tag and lays it out as the configuration space's NUL-padded field.
pub fn encode_tag(tag: &str) -> Result<[u8; TAG_LEN], FsError> {
    let invalid = |reason| FsError::InvalidTag {
        tag: tag.to_string(),
        reason,
    };
    if tag.is_empty() {
        return Err(invalid("empty"));
    }
    if tag.len() > TAG_LEN {
        return Err(invalid("longer than 36 bytes"));
    }
    if tag.as_bytes().contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    let mut field = [0u8; TAG_LEN];
    field[..tag.len()].copy_from_slice(tag.as_bytes());
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked_and_padded() {
        let field = encode_tag("rootfs").unwrap();
        assert_eq!(&field[..6], b"rootfs");
        assert!(field[6..].iter().all(|&b| b == 0));
        assert!(encode_tag(&"x".repeat(36)).is_ok());
        for bad in ["", "a\0b", &"x".repeat(37)] {
            assert!(matches!(encode_tag(bad), Err(FsError::InvalidTag { .. })));
        }
    }
}
