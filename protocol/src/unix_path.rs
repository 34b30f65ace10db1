//! Unix sockets at paths of any length.
//!
//! A socket address holds at most 107 bytes of path (`sun_path` is 108 with its NUL). hull's
//! sockets live in the container's state directory, which is whatever `--root` and the
//! container id make it: Docker's is `<exec-root>/runtime-<name>/moby/<64-hex id>`, and the
//! vsock device's `<uds>_<port>` sockets are longer still. A path that does not fit is reached
//! through its directory instead: the directory is opened and the socket named as
//! `/proc/self/fd/<fd>/<name>`, which the kernel resolves like any path. Only the file name
//! must then fit, and file names are hull's own.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The longest path a socket address holds.
pub const SUN_PATH_MAX: usize = 107;

/// A path for `bind(2)` or `connect(2)` that fits a socket address, with what keeps it valid.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    /// The directory the path goes through, open while the path is used.
    _dir: Option<File>,
}

impl SocketPath {
    /// `path` itself when it fits, else `/proc/self/fd/<fd>/<name>` through its directory.
    /// Fails (`InvalidInput`, naming the path) when even that does not fit, or when the path
    /// has no file name; and with the error of opening the directory when that fails.
    pub fn new(path: &Path) -> io::Result<Self> {
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(Self {
                path: path.to_path_buf(),
                _dir: None,
            });
        }
        let too_long = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "socket path {} ({} bytes): {why}",
                    path.display(),
                    path.as_os_str().len()
                ),
            )
        };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(too_long("no file name to reach it by"));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = File::open(parent).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open {}, the directory of socket {}: {e}",
                    parent.display(),
                    path.display()
                ),
            )
        })?;
        let short = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        if short.as_os_str().len() > SUN_PATH_MAX {
            return Err(too_long(
                "its file name alone is too long for a socket address",
            ));
        }
        Ok(Self {
            path: short,
            _dir: Some(dir),
        })
    }

    /// The path to pass to `bind(2)` or `connect(2)`.
    pub fn as_path(&self) -> &Path {
        &self.path
    }
}

/// `UnixListener::bind` for a path of any length.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    UnixListener::bind(SocketPath::new(path)?.as_path())
}

/// `UnixStream::connect` for a path of any length.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(SocketPath::new(path)?.as_path())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A directory whose path is `len` bytes or more long, under the system's temporary one.
    fn deep_dir(tag: &str, len: usize) -> PathBuf {
        let mut dir = std::env::temp_dir().join(format!("hull-{tag}-{}", std::process::id()));
        while dir.as_os_str().len() < len {
            dir.push("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn remove(dir: &Path, tag: &str) {
        let top = std::env::temp_dir().join(format!("hull-{tag}-{}", std::process::id()));
        assert!(dir.starts_with(&top));
        std::fs::remove_dir_all(top).unwrap();
    }

    #[test]
    fn a_short_path_is_used_as_it_is() {
        let path = Path::new("/run/hull/x/vsock.sock");
        assert_eq!(SocketPath::new(path).unwrap().as_path(), path);
    }

    #[test]
    fn sockets_far_past_sun_len_are_bound_and_reached() {
        // Docker's shape: an exec root, the runtime's name, the namespace, a 64-hex id.
        let dir = deep_dir("unix-path", 200);
        let socket = dir.join("vsock.sock_1024");
        assert!(socket.as_os_str().len() > SUN_PATH_MAX);
        let listener = bind(&socket).unwrap();
        // The socket is where its long path says, for anyone.
        assert!(std::fs::symlink_metadata(&socket).is_ok());
        let mut client = connect(&socket).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        remove(&dir, "unix-path");
    }

    #[test]
    fn what_cannot_be_made_to_fit_is_an_error_naming_the_path() {
        let long_name = "n".repeat(120);
        let path = std::env::temp_dir().join(&long_name);
        let err = SocketPath::new(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains(&long_name), "{err}");
        let missing = PathBuf::from(format!(
            "/nonexistent-hull/{}/control.sock",
            "d".repeat(120)
        ));
        let err = SocketPath::new(&missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("control.sock"), "{err}");
    }
}
