//! Descriptors across a Unix socket pair (`SCM_RIGHTS`), between the agent and the container's
//! processes: a pty master on its way to the agent, the stdio descriptors on their way to a
//! pre-made init (`zygote.rs`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::sys;

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 3;

/// Sends one byte carrying `fds` (none is allowed: the byte alone is a message). A peer that is
/// gone is an error (`EPIPE`), never a `SIGPIPE`.
pub fn send(channel: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> nix::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(Errno::EINVAL);
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        channel.as_raw_fd(),
        &[IoSlice::new(b"m")],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(drop)
}

/// Receives what [`send`] sent, the descriptors close-on-exec (they must not leak into the
/// container's later processes); `None` when the peer closed its end without sending.
pub fn recv(channel: BorrowedFd<'_>) -> nix::Result<Option<Vec<OwnedFd>>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = loop {
        match recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    };
    let mut received = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            received.extend(fds.into_iter().map(sys::owned_fd));
        }
    }
    if msg.bytes == 0 && received.is_empty() {
        return Ok(None);
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        // More than MAX_FDS were sent: those that arrived are closed with `received`.
        return Err(Errno::EMSGSIZE);
    }
    Ok(Some(received))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn descriptors_cross_a_socket_pair_close_on_exec() {
        let (a, b) = pair();
        let pipes: Vec<_> = (0..MAX_FDS).map(|_| nix::unistd::pipe().unwrap()).collect();
        let ends: Vec<_> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send(a.as_fd(), &ends).unwrap();
        drop(ends);
        let got = recv(b.as_fd()).unwrap().expect("a message");
        assert_eq!(got.len(), MAX_FDS);
        for ((r, _), fd) in pipes.iter().zip(&got) {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "received descriptor leaks");
            nix::unistd::write(fd, b"x").unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(nix::unistd::read(r, &mut buf).unwrap(), 1);
        }
    }

    #[test]
    fn a_message_without_descriptors_and_the_end() {
        let (a, b) = pair();
        send(a.as_fd(), &[]).unwrap();
        assert_eq!(recv(b.as_fd()).unwrap().map(|fds| fds.len()), Some(0));
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn a_gone_peer_is_an_error_not_a_signal() {
        let (a, b) = pair();
        drop(b);
        assert_eq!(send(a.as_fd(), &[]), Err(Errno::EPIPE));
        let too_many: Vec<_> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert_eq!(send(a.as_fd(), &too_many), Err(Errno::EINVAL));
    }
}
