//! The agent's listening sockets: vsock in the guest, Unix sockets in the host tests.
//!
//! Accepted connections are plain `File`s: `read(2)` and `write(2)` work the same on any
//! connected stream socket, and a stdio stream's descriptor is handed to the container's
//! process as its stdin, stdout or stderr unchanged.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// `VMADDR_CID_ANY` from `include/uapi/linux/vm_sockets.h`.
pub const VMADDR_CID_ANY: u32 = u32::MAX;

#[derive(Debug)]
pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    /// Listens on vsock `port` of any local CID (the guest's).
    pub fn vsock(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(16).expect("16 is a valid backlog"))?;
        Ok(Self::Vsock(fd))
    }

    /// Listens on a Unix socket at `path` (a stale socket file there is replaced).
    pub fn unix(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).map(Self::Unix)
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<File> {
        match self {
            Self::Vsock(fd) => loop {
                match accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    Ok(raw) => return Ok(File::from(owned(raw))),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            },
            Self::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                Ok(File::from(OwnedFd::from(stream)))
            }
        }
    }
}

/// Takes ownership of a descriptor `accept4` just returned.
fn owned(raw: std::os::fd::RawFd) -> OwnedFd {
    crate::sys::owned_fd(raw)
}
