//! A pseudo-terminal for a container process (`stdio: terminal`), made the way runc makes one.
//!
//! The process's last stage opens `/dev/ptmx` once it is in the container's mount namespace and
//! under its root, so with the spec's `devpts` mount (`newinstance`, `/dev/ptmx` a link to
//! `pts/ptmx`) the pty belongs to the container's own devpts and the slave is `/dev/pts/N` in the
//! container. The slave is opened through the master (`TIOCGPTPEER`, no path lookup), becomes
//! the controlling terminal of a new session and fds 0, 1, 2, and is owned by the process's uid
//! (runc's `fixStdioPermissions`). The master goes to the agent over a Unix socket
//! (`SCM_RIGHTS`); the agent relays it to the host (`relay.rs`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use hull_protocol::{ErrorKind, ErrorResponse};
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fchown, setsid, Uid};

use super::fdpass;
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

/// Sends `fd`, the pty master, to the agent over the Unix socket `channel`.
pub fn send_fd(channel: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<(), ErrorResponse> {
    fdpass::send(channel, &[fd]).map_err(|e| io("passing the pty master to the agent", e))
}

/// Receives the pty master [`send_fd`] sent, close-on-exec.
pub fn recv_fd(channel: BorrowedFd<'_>) -> Result<OwnedFd, ErrorResponse> {
    let internal = |m: &str| ErrorResponse::new(ErrorKind::Internal, m.to_owned());
    let fds = fdpass::recv(channel)
        .map_err(|e| internal(&format!("receiving the pty master: {e}")))?
        .unwrap_or_default();
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(fd),
        (None, _) => Err(internal("the pty master did not arrive")),
        (Some(_), Some(_)) => Err(internal("more than one pty master arrived")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
