//! Host-side Unix socket plumbing: the listening socket, the `CONNECT <port>\n` line a host
//! client sends first, and non-blocking connects to `<uds_path>_<port>`.
//!
//! Host clients are local and trusted more than the guest, but the event loop must not block
//! on them either: every socket here is non-blocking, and a client's request line is bounded.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

/// The longest request line a host client may send (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_REQUEST_LINE: usize = 32;

/// Errors of a host client's request line.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed before finishing its line.
    #[error("host client closed before sending CONNECT")]
    Closed,
    /// The line is not `CONNECT <port>`.
    #[error("host client sent an invalid request line {0:?}")]
    BadLine(String),
    /// The client sent no newline within `MAX_REQUEST_LINE` bytes.
    #[error("host client request line is longer than {MAX_REQUEST_LINE} bytes")]
    TooLong,
    /// Reading the socket failed.
    #[error("cannot read the host client's request line")]
    Io(#[source] io::Error),
}

/// Binds the non-blocking listening socket for host-initiated connections.
pub fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    let listener = hull_protocol::unix_path::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// `<uds_path>_<port>`: where a host service for guest connections to `port` listens.
pub fn port_socket_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut name = OsString::from(uds_path.as_os_str());
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Connects to a Unix socket without blocking. A Unix stream connect completes at once or
/// fails (a full backlog gives `EAGAIN`, which we treat as a refusal).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let path = hull_protocol::unix_path::SocketPath::new(path)?;
    let addr = UnixAddr::new(path.as_path()).map_err(io::Error::from)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    Ok(UnixStream::from(fd))
}

/// A host client that connected to the listening socket and has not finished its request.
#[derive(Debug)]
pub struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A complete request: the guest port, and whatever the client sent after the line.
#[derive(Debug, PartialEq, Eq)]
pub struct HostRequest {
    pub port: u32,
    pub early_data: Vec<u8>,
}

impl PendingHost {
    /// Takes a freshly accepted client.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            line: Vec::with_capacity(MAX_REQUEST_LINE),
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Reads what the client sent; `Ok(None)` until its line is complete.
    pub fn read_request(&mut self) -> Result<Option<HostRequest>, HandshakeError> {
        let mut buf = [0u8; MAX_REQUEST_LINE];
        loop {
            let room = MAX_REQUEST_LINE - self.line.len();
            if room == 0 {
                return Err(HandshakeError::TooLong);
            }
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(n) => self.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(HandshakeError::Io(e)),
            }
            if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                let port = parse_connect(&self.line[..end]).ok_or_else(|| {
                    HandshakeError::BadLine(String::from_utf8_lossy(&self.line[..end]).into())
                })?;
                return Ok(Some(HostRequest {
                    port,
                    early_data: self.line[end + 1..].to_vec(),
                }));
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline; a trailing `\r` is tolerated).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::virtio::vsock::test_utils::TempDir;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 4294967296",
            b"connect 52",
            b"CONNECT 52 53",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn request_line_arrives_in_pieces_and_keeps_early_data() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let mut pending = PendingHost::new(ours).unwrap();
        assert!(pending.read_request().unwrap().is_none());
        client.write_all(b"CONN").unwrap();
        assert!(pending.read_request().unwrap().is_none());
        client.write_all(b"ECT 52\nhello").unwrap();
        assert_eq!(
            pending.read_request().unwrap(),
            Some(HostRequest {
                port: 52,
                early_data: b"hello".to_vec()
            })
        );
    }

    #[test]
    fn bad_or_endless_lines_are_refused() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let mut pending = PendingHost::new(ours).unwrap();
        client.write_all(&[b'A'; 100]).unwrap();
        assert!(matches!(
            pending.read_request(),
            Err(HandshakeError::TooLong)
        ));

        let (ours, mut client) = UnixStream::pair().unwrap();
        let mut pending = PendingHost::new(ours).unwrap();
        client.write_all(b"LISTEN 5\n").unwrap();
        assert!(matches!(
            pending.read_request(),
            Err(HandshakeError::BadLine(_))
        ));

        let (ours, client) = UnixStream::pair().unwrap();
        let mut pending = PendingHost::new(ours).unwrap();
        drop(client);
        assert!(matches!(
            pending.read_request(),
            Err(HandshakeError::Closed)
        ));
    }

    #[test]
    fn connects_to_port_sockets_without_blocking() {
        let dir = TempDir::new("hull-devices-test");
        let uds = dir.path().join("v.sock");
        let path = port_socket_path(&uds, 52);
        assert_eq!(path, dir.path().join("v.sock_52"));
        assert!(connect_nonblocking(&path).is_err());
        let listener = bind_listener(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        (&stream).write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
    }
}
