//! Host-side terminals: the pty pair whose master goes to the caller over `--console-socket`
//! (as runc sends it), and whose slave `hull-vmm` relays to the guest's pty.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::pty::{openpty, Winsize};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

/// A pty pair made on the host.
pub struct HostPty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl HostPty {
    /// A new pair with the slave in raw mode (the guest's pty does the line discipline) and
    /// the window size `rows` x `cols`.
    pub fn open(rows: u16, cols: u16) -> io::Result<Self> {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None)?;
        let mut attrs = tcgetattr(&pty.slave)?;
        cfmakeraw(&mut attrs);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs)?;
        Ok(Self {
            master: pty.master,
            slave: pty.slave,
        })
    }
}

/// Sends `master` over the Unix socket at `path`, with the pty's name as the message, the way
/// runc does for `--console-socket`.
pub fn send_master(path: &Path, master: BorrowedFd<'_>) -> io::Result<()> {
    let socket = hull_protocol::unix_path::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to console socket {}: {e}", path.display()),
        )
    })?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    let iov = [io::IoSlice::new(name)];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot send the terminal over {}: {e}", path.display()),
        )
    })?;
    Ok(())
}

/// Makes `tty` the calling process's controlling terminal (it must lead a session with none),
/// so that a window-size change on the master sends it `SIGWINCH`, and a hang-up `SIGHUP`.
pub fn make_controlling(tty: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal) and no pointer; `tty` is an
    // open descriptor for the duration of the call.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of a terminal: (rows, cols).
pub fn window_size(tty: impl AsFd) -> io::Result<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which points to a live,
    // properly aligned `libc::winsize`; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(tty.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((size.ws_row, size.ws_col))
}

/// Sets the window size of a terminal.
pub fn set_window_size(tty: impl AsFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points to a live
    // `libc::winsize`; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(tty.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives a file descriptor sent with [`send_master`] (for tests and for `hull run -t`).
pub fn receive_fd(socket: &UnixStream) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed `fd` in this process for us (SCM_RIGHTS);
                // nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no file descriptor in the console socket message",
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn pty_pair_is_raw_and_sized_and_its_master_travels() {
        let pty = HostPty::open(24, 80).unwrap();
        assert_eq!(window_size(&pty.slave).unwrap(), (24, 80));
        set_window_size(&pty.master, 50, 132).unwrap();
        assert_eq!(window_size(&pty.slave).unwrap(), (50, 132));

        let dir = std::env::temp_dir().join(format!("hull-console-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        send_master(&path, pty.master.as_fd()).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let master = std::fs::File::from(receive_fd(&conn).unwrap());

        // Raw mode: bytes pass unchanged, no echo, no CR added.
        let mut slave = std::fs::File::from(pty.slave);
        (&master).write_all(b"a\nb").unwrap();
        let mut buf = [0u8; 3];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a\nb");
        slave.write_all(b"x\n").unwrap();
        let mut out = [0u8; 2];
        (&master).read_exact(&mut out).unwrap();
        assert_eq!(&out, b"x\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_console_socket_is_named() {
        let pty = HostPty::open(24, 80).unwrap();
        let err =
            send_master(Path::new("/nonexistent/console.sock"), pty.master.as_fd()).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/console.sock"),
            "{err}"
        );
    }
}
