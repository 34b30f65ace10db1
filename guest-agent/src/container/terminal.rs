//! A pseudo-terminal for a container process (`stdio: terminal`), made the way runc makes one.
//!
//! The process's last stage opens `/dev/ptmx` once it is in the container's mount namespace and
//! under its root, so with the spec's `devpts` mount (`newinstance`, `/dev/ptmx` a link to
//! `pts/ptmx`) the pty belongs to the container's own devpts and the slave is `/dev/pts/N` in the
//! container. The slave is opened through the master (`TIOCGPTPEER`, no path lookup), becomes
//! the controlling terminal of a new session and fds 0, 1, 2, and is owned by the process's uid
//! (runc's `fixStdioPermissions`). The master goes to the agent over a Unix socket
//! (`SCM_RIGHTS`); the agent relays it to the host (`relay.rs`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use hull_protocol::{ErrorKind, ErrorResponse};
use nix::fcntl::{open, OFlag};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::stat::Mode;
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fchown, setsid, Uid};

use crate::sys;

/// Where the container's pty multiplexer is, inside the container.
const PTMX: &str = "/dev/ptmx";

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::Io, format!("process.terminal: {what}: {e}"))
}

/// Opens a pty of the size given, makes its slave the calling process's controlling terminal
/// and fds 0, 1, 2, and returns the master (close-on-exec).
pub fn take(rows: u16, cols: u16, uid: u32) -> Result<OwnedFd, ErrorResponse> {
    let master = open(
        PTMX,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(format!("opening {PTMX} in the container"), e))?;
    sys::pty_unlock(master.as_fd()).map_err(|e| io("unlocking the pty", e))?;
    let slave = sys::pty_peer(master.as_fd()).map_err(|e| io("opening the pty slave", e))?;
    sys::set_window_size(master.as_fd(), rows, cols)
        .map_err(|e| io(format!("setting the window size {rows}x{cols}"), e))?;
    fchown(&slave, Some(Uid::from_raw(uid)), None)
        .map_err(|e| io(format!("giving the pty slave to uid {uid}"), e))?;
    setsid().map_err(|e| io("setsid", e))?;
    sys::set_controlling_terminal(slave.as_fd())
        .map_err(|e| io("making the pty the controlling terminal", e))?;
    dup2_stdin(&slave).map_err(|e| io("dup2 onto fd 0", e))?;
    dup2_stdout(&slave).map_err(|e| io("dup2 onto fd 1", e))?;
    dup2_stderr(&slave).map_err(|e| io("dup2 onto fd 2", e))?;
    Ok(master)
}

/// Sends `fd` over the Unix socket `channel` (one byte with `SCM_RIGHTS`).
pub fn send_fd(channel: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<(), ErrorResponse> {
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(
        channel.as_raw_fd(),
        &[IoSlice::new(b"m")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| io("passing the pty master to the agent", e))
    .map(drop)
}

/// Receives the descriptor [`send_fd`] sent, close-on-exec (it must not leak into the
/// container's later processes).
pub fn recv_fd(channel: BorrowedFd<'_>) -> Result<OwnedFd, ErrorResponse> {
    let internal = |m: String| ErrorResponse::new(ErrorKind::Internal, m);
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = loop {
        match recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(internal(format!("receiving the pty master: {e}"))),
        }
    };
    let mut received = Vec::new();
    for cmsg in msg
        .cmsgs()
        .map_err(|e| internal(format!("receiving the pty master: {e}")))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            received.extend(fds.into_iter().map(sys::owned_fd));
        }
    }
    let mut received = received.into_iter();
    match (received.next(), received.next()) {
        (Some(fd), None) => Ok(fd),
        (None, _) => Err(internal("the pty master did not arrive".into())),
        (Some(_), Some(_)) => Err(internal("more than one pty master arrived".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn a_descriptor_crosses_a_socket_pair_close_on_exec() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_fd(a.as_fd(), w.as_fd()).unwrap();
        drop(w);
        let got = recv_fd(b.as_fd()).unwrap();
        let flags = nix::fcntl::fcntl(&got, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received descriptor leaks into exec"
        );
        nix::unistd::write(&got, b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut buf).unwrap(), 1);
        assert_eq!(&buf, b"x");
        // Nothing more: the peer closing gives an error, not a descriptor.
        drop(a);
        assert!(recv_fd(b.as_fd()).is_err());
    }

    #[test]
    fn window_size_round_trips_on_a_pty() {
        let Ok(master) = open(
            PTMX,
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            eprintln!("skipping: no {PTMX}");
            return;
        };
        sys::pty_unlock(master.as_fd()).unwrap();
        let slave = sys::pty_peer(master.as_fd()).unwrap();
        sys::set_window_size(master.as_fd(), 33, 101).unwrap();
        assert_eq!(sys::window_size(slave.as_fd()).unwrap(), (33, 101));
    }
}
