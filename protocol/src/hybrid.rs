//! The host's end of hybrid vsock: reaching a guest vsock port through the VMM's Unix socket.
//!
//! `hull-vmm`'s vsock device is backed by Unix sockets (there is no vhost here), the way
//! Firecracker does it. A host-to-guest connection is a connection to the device's socket
//! `<uds>`, a line `CONNECT <port>\n`, and the device's answer `OK <host_port>\n` once the guest
//! accepted; then the Unix stream is the vsock stream. If nothing in the guest listens on the
//! port, the device closes the connection instead. (Guest-to-host connections would land on
//! `<uds>_<port>`; this protocol makes none, see [`crate::stdio`].)

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest answer line accepted, newline included (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY_LINE: usize = 32;

/// Errors connecting to a guest port.
#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error("cannot connect to the vsock socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send CONNECT {port} on the vsock socket {}", path.display())]
    Send {
        path: PathBuf,
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("no answer to CONNECT {port} on the vsock socket {}", path.display())]
    Receive {
        path: PathBuf,
        port: u32,
        #[source]
        source: io::Error,
    },
    /// The VMM closed the connection: nothing listens on the port in the guest (yet).
    #[error("guest refused vsock port {port} (no listener) via {}", path.display())]
    Refused { path: PathBuf, port: u32 },
    #[error("malformed answer {line:?} to CONNECT {port} on the vsock socket {}", path.display())]
    BadReply {
        path: PathBuf,
        port: u32,
        line: String,
    },
}

/// The request line for `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Parses the answer line (with or without its newline): the host-side port number.
pub fn parse_ok_line(line: &str) -> Option<u32> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_prefix("OK ")?.parse().ok()
}

/// Connects to guest vsock `port` through the VMM's hybrid vsock socket `uds`. `timeout`
/// bounds the wait for the answer (the guest has to accept first); `None` waits for ever.
/// The returned stream is blocking, with no timeouts set, and has nothing of the stream
/// consumed: the answer line is read a byte at a time so that no guest bytes after it are.
pub fn connect(
    uds: &Path,
    port: u32,
    timeout: Option<Duration>,
) -> Result<UnixStream, HybridError> {
    let path = uds.to_path_buf();
    let mut stream = crate::unix_path::connect(uds).map_err(|source| HybridError::Connect {
        path: path.clone(),
        source,
    })?;
    let send_err = |source| HybridError::Send {
        path: path.clone(),
        port,
        source,
    };
    stream
        .write_all(connect_line(port).as_bytes())
        .map_err(send_err)?;
    let receive_err = |source| HybridError::Receive {
        path: path.clone(),
        port,
        source,
    };
    stream.set_read_timeout(timeout).map_err(receive_err)?;
    let line = read_line(&mut stream).map_err(receive_err)?;
    stream.set_read_timeout(None).map_err(receive_err)?;
    let Some(line) = line else {
        return Err(HybridError::Refused { path, port });
    };
    match parse_ok_line(&line) {
        Some(_) => Ok(stream),
        None => Err(HybridError::BadReply { path, port, line }),
    }
}

/// Reads one line of at most [`MAX_REPLY_LINE`] bytes, a byte at a time. `None`: the stream
/// ended before any byte.
fn read_line<R: Read>(r: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0; 1];
    while line.len() < MAX_REPLY_LINE {
        match r.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => break,
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hull-protocol-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake VMM vsock socket: reads one CONNECT line, answers with `reply` (or closes), then
    /// sends `then` as if from the guest. Returns the port asked for.
    fn fake_vmm(
        uds: &Path,
        reply: Option<&'static str>,
        then: &'static [u8],
    ) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(uds).unwrap();
        thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut conn = conn;
            if let Some(reply) = reply {
                conn.write_all(reply.as_bytes()).unwrap();
                conn.write_all(then).unwrap();
            }
            line
        })
    }

    #[test]
    fn lines() {
        assert_eq!(connect_line(1024), "CONNECT 1024\n");
        assert_eq!(parse_ok_line("OK 1073741824\n"), Some(1_073_741_824));
        assert_eq!(parse_ok_line("OK 5"), Some(5));
        assert_eq!(parse_ok_line("OK\n"), None);
        assert_eq!(parse_ok_line("ok 5\n"), None);
        assert_eq!(parse_ok_line("OK -5\n"), None);
        assert_eq!(parse_ok_line("OK 99999999999\n"), None);
    }

    #[test]
    fn connect_keeps_the_guest_bytes_after_the_answer() {
        let dir = TempDir::new();
        let uds = dir.0.join("vsock.sock");
        let vmm = fake_vmm(&uds, Some("OK 1073741824\n"), b"first guest bytes");
        let mut stream = connect(&uds, 1024, Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"first guest bytes");
        assert_eq!(vmm.join().unwrap(), "CONNECT 1024\n");
        assert_eq!(stream.read_timeout().unwrap(), None);
    }

    #[test]
    fn connect_refused_and_bad_answers() {
        let dir = TempDir::new();
        let uds = dir.0.join("refused.sock");
        let vmm = fake_vmm(&uds, None, b"");
        let err = connect(&uds, 1025, None).unwrap_err();
        vmm.join().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "guest refused vsock port 1025 (no listener) via {}",
                uds.display()
            )
        );

        let uds = dir.0.join("bad.sock");
        let vmm = fake_vmm(&uds, Some("NO WAY\n"), b"");
        let err = connect(&uds, 1025, None).unwrap_err();
        vmm.join().unwrap();
        assert!(
            matches!(&err, HybridError::BadReply { line, .. } if line == "NO WAY\n"),
            "{err:?}"
        );

        let err = connect(&dir.0.join("missing.sock"), 1024, None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot connect to the vsock socket "),
            "{err}"
        );
    }

    #[test]
    fn connect_times_out_waiting_for_the_answer() {
        let dir = TempDir::new();
        let uds = dir.0.join("slow.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let err = connect(&uds, 1024, Some(Duration::from_millis(50))).unwrap_err();
        assert!(
            matches!(err, HybridError::Receive { port: 1024, .. }),
            "{err:?}"
        );
        drop(listener);
    }
}
