//! Relaying a container process's terminal: the pty master to and from its one `terminal`
//! stream connection, in a thread of its own (docs/protocol.md, "Stdio streams").
//!
//! The thread owns the master; the server keeps a [`Handle`] to resize it and to say that the
//! process has ended. The relay ends, closing the connection and the master, when
//! - every slave descriptor is closed and the output read (the master reads `EIO`), or
//! - the process has ended ([`Handle::process_ended`]) and the output written so far is read
//!   (descendants holding the slave do not keep the stream open), or
//! - the host closed the connection: closing the master hangs the terminal up (`SIGHUP`).
//!
//! The master is non-blocking and input waits in a buffer while the pty cannot take it, so a
//! process that is not reading its input never stops its output from being relayed. Input is
//! read from the host only when that buffer is empty (back-pressure).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};

use hull_protocol::{ErrorKind, ErrorResponse};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::pipe2;

use crate::{console, sys};

const BUFFER_SIZE: usize = 16 << 10;

/// The server's side of a running relay.
#[derive(Debug)]
pub struct Handle {
    /// The master, while the relay holds it.
    master: Weak<OwnedFd>,
    /// Dropped when the process has ended: the relay sees its pipe close.
    ended: Option<OwnedFd>,
}

impl Handle {
    /// `TIOCSWINSZ` on the master.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ErrorResponse> {
        let master = self
            .master
            .upgrade()
            .ok_or_else(|| ErrorResponse::new(ErrorKind::InvalidState, "the terminal is closed"))?;
        sys::set_window_size(master.as_fd(), rows, cols).map_err(|e| {
            ErrorResponse::new(
                ErrorKind::Io,
                format!("setting the window size {rows}x{cols}: {e}"),
            )
        })
    }

    /// Tells the relay that the process has ended: it drains the output and ends.
    pub fn process_ended(&mut self) {
        self.ended = None;
    }
}

/// Starts relaying `master` to and from `conn`.
pub fn start(name: String, master: OwnedFd, conn: File) -> std::io::Result<Handle> {
    fcntl(&master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let (ended_r, ended_w) = pipe2(OFlag::O_CLOEXEC)?;
    let master = Arc::new(master);
    let handle = Handle {
        master: Arc::downgrade(&master),
        ended: Some(ended_w),
    };
    std::thread::Builder::new()
        .name("terminal".into())
        .spawn(move || relay(&name, &master, &conn, &ended_r))?;
    Ok(handle)
}

/// What one read of the master gave.
enum Output {
    /// Bytes relayed to the host.
    Relayed,
    /// Nothing to read now.
    Empty,
    /// The end: no slave is open any more, or the host is gone.
    End,
}

fn relay(name: &str, master: &OwnedFd, conn: &File, ended: &OwnedFd) {
    let mut buf = vec![0u8; BUFFER_SIZE];
    // From the host, not yet taken by the pty.
    let mut input: Vec<u8> = Vec::new();
    loop {
        let mut master_events = PollFlags::POLLIN;
        if !input.is_empty() {
            master_events |= PollFlags::POLLOUT;
        }
        let conn_events = if input.is_empty() {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        };
        let mut fds = [
            PollFd::new(master.as_fd(), master_events),
            PollFd::new(conn.as_fd(), conn_events),
            PollFd::new(ended.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                console::log(&format!("terminal of {name}: poll: {e}"));
                return;
            }
        }
        let [master_ready, conn_ready, ended_ready] =
            fds.map(|fd| fd.revents().unwrap_or(PollFlags::empty()));
        let readable = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        if master_ready.intersects(readable) {
            if let Output::End = relay_output(name, master, conn, &mut buf) {
                return;
            }
        }
        if master_ready.contains(PollFlags::POLLOUT) && !input.is_empty() {
            match nix::unistd::write(master, &input) {
                Ok(n) => drop(input.drain(..n)),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                // EIO: no slave is open any more; the read side sees the same and ends.
                Err(_) => input.clear(),
            }
        }
        if conn_ready.intersects(readable) {
            match (&mut &*conn).read(&mut buf) {
                Ok(n) if n > 0 => input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The host hung up.
                _ => return,
            }
        }
        if !ended_ready.is_empty() {
            // The process has ended: what it wrote is readable now (a read of an empty pty
            // first flushes the kernel's pending buffer work).
            while let Output::Relayed = relay_output(name, master, conn, &mut buf) {}
            return;
        }
    }
}

/// Reads the master once and relays what it gave to the host.
fn relay_output(name: &str, master: &OwnedFd, conn: &File, buf: &mut [u8]) -> Output {
    match nix::unistd::read(master, buf) {
        Ok(0) | Err(Errno::EIO) => Output::End,
        Ok(n) => match (&mut &*conn).write_all(&buf[..n]) {
            Ok(()) => Output::Relayed,
            Err(_) => Output::End,
        },
        Err(Errno::EAGAIN | Errno::EINTR) => Output::Empty,
        Err(e) => {
            console::log(&format!("terminal of {name}: reading the pty: {e}"));
            Output::End
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use nix::fcntl::open;
    use nix::sys::stat::Mode;

    use super::*;

    /// A pty of this host: (master, slave), or `None` without `/dev/ptmx`.
    fn pty() -> Option<(OwnedFd, OwnedFd)> {
        let master = open(
            "/dev/ptmx",
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        sys::pty_unlock(master.as_fd()).unwrap();
        let slave = sys::pty_peer(master.as_fd()).unwrap();
        // Raw on the slave side: no echo, no newline translation, reads return what came.
        let mut attrs = nix::sys::termios::tcgetattr(&slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut attrs);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &attrs).unwrap();
        Some((master, slave))
    }

    fn host_side() -> (UnixStream, File) {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (host, File::from(OwnedFd::from(agent)))
    }

    #[test]
    fn relays_both_ways_resizes_and_ends_when_the_process_has() {
        let Some((master, slave)) = pty() else {
            eprintln!("skipping: no /dev/ptmx");
            return;
        };
        let (mut host, conn) = host_side();
        let mut handle = start("test".into(), master, conn).unwrap();
        let mut buf = [0u8; 64];

        nix::unistd::write(&slave, b"out").unwrap();
        host.read_exact(&mut buf[..3]).unwrap();
        assert_eq!(&buf[..3], b"out");

        host.write_all(b"in").unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = nix::unistd::read(&slave, &mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"in");

        handle.resize(12, 34).unwrap();
        assert_eq!(sys::window_size(slave.as_fd()).unwrap(), (12, 34));

        // The slave stays open (a descendant), yet the stream ends with the last output.
        nix::unistd::write(&slave, b"last").unwrap();
        handle.process_ended();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last");
        // The relay has let go of the master.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while handle.resize(1, 1).is_ok() {
            assert!(std::time::Instant::now() < deadline, "master still held");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            handle.resize(1, 1).unwrap_err().kind,
            ErrorKind::InvalidState
        );
    }

    #[test]
    fn ends_when_the_slave_is_closed_and_hangs_up_when_the_host_is_gone() {
        let Some((master, slave)) = pty() else {
            eprintln!("skipping: no /dev/ptmx");
            return;
        };
        let (mut host, conn) = host_side();
        let _handle = start("test".into(), master, conn).unwrap();
        nix::unistd::write(&slave, b"bye").unwrap();
        drop(slave);
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"bye");

        let (master, slave) = pty().unwrap();
        let (host, conn) = host_side();
        let _handle = start("test".into(), master, conn).unwrap();
        drop(host);
        // The master closes: a read of the slave sees the hangup (end of file or EIO).
        let mut buf = [0u8; 8];
        match nix::unistd::read(&slave, &mut buf) {
            Ok(0) | Err(Errno::EIO) => {}
            other => panic!("slave read after the host hung up: {other:?}"),
        }
    }
}
