//! `hull run` in the foreground of a container with `process.terminal`: runc's behaviour
//! without `--console-socket`. hull makes a console socket of its own, takes the pty master
//! hull-vmm sends over it, and relays it to its own standard input and output, with its own
//! terminal (if it has one) in raw mode and its window size passed on.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use hull_contract::console;
use hull_contract::relay::pump;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// The master, once received (for window-size changes from the signal thread).
static MASTER: OnceLock<OwnedFd> = OnceLock::new();

/// The console socket and the relay behind it; restores the terminal on drop.
pub struct Foreground {
    socket: PathBuf,
    output: Option<JoinHandle<()>>,
    saved: Option<Termios>,
}

impl Foreground {
    /// Listens on a fresh socket in a new private directory (mode 0700) under `tmp`, so that
    /// nobody else can connect and hand hull a terminal of theirs, and relays the master that
    /// arrives on it.
    pub fn start(tmp: &Path) -> anyhow::Result<Self> {
        let dir = private_dir(tmp)?;
        let socket = dir.join("console.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
        let stdin = io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok();
        let output = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                let master = match listener.accept().map(|(c, _)| console::receive_fd(&c)) {
                    Ok(Ok(master)) => master,
                    Ok(Err(err)) | Err(err) => {
                        log::warn!("console socket: {err}");
                        return;
                    }
                };
                let _ = MASTER.set(match master.try_clone() {
                    Ok(fd) => fd,
                    Err(_) => return,
                });
                resize();
                let Ok(input) = io::stdin().as_fd().try_clone_to_owned() else {
                    return;
                };
                let Ok(to_master) = master.try_clone() else {
                    return;
                };
                let spawned = std::thread::Builder::new()
                    .name("console-input".into())
                    .spawn(move || {
                        let _ = pump(&mut File::from(input), &mut File::from(to_master));
                    });
                if spawned.is_err() {
                    return;
                }
                let Ok(out) = io::stdout().as_fd().try_clone_to_owned() else {
                    return;
                };
                // Ends with EIO once hull-vmm (the slave's last holder) is gone.
                let _ = pump(&mut File::from(master), &mut File::from(out));
            })?;
        if let Some(attrs) = &saved {
            let mut raw = attrs.clone();
            cfmakeraw(&mut raw);
            let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        }
        Ok(Self {
            socket,
            output: Some(output),
            saved,
        })
    }

    /// The socket to pass as `--console-socket`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits (a little) for the rest of the output after hull-vmm has exited.
    pub fn finish(mut self) {
        if let Some(output) = self.output.take() {
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while !output.is_finished() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(attrs) = &self.saved {
            let _ = tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, attrs);
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A new directory `hull-console-<pid>-<n>` under `tmp`, mode 0700, made by this call (never
/// one that was there: another user could own it, or hold a link in it).
fn private_dir(tmp: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for n in 0..100u32 {
        let dir = tmp.join(format!("hull-console-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => anyhow::bail!("cannot make {}: {e}", dir.display()),
        }
    }
    anyhow::bail!("cannot make a console directory in {}", tmp.display())
}

/// Gives the container's terminal our terminal's window size (at the start, and on
/// `SIGWINCH`); hull-vmm, whose controlling terminal the pty is, passes it into the guest.
pub fn resize() {
    let Some(master) = MASTER.get() else { return };
    if let Ok((rows, cols)) = console::window_size(io::stdin().as_fd()) {
        if rows > 0 && cols > 0 {
            let _ = console::set_window_size(master, rows, cols);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_console_socket_is_in_a_directory_of_its_own() {
        let tmp = crate::testutil::TempDir::new("console");
        // Planted where the socket or its directory could be expected.
        let planted = tmp.join(format!("hull-console-{}-0", std::process::id()));
        std::fs::create_dir(&planted).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
        let foreground = Foreground::start(tmp.path()).unwrap();
        let socket = foreground.socket().to_owned();
        let dir = socket.parent().unwrap().to_owned();
        assert_ne!(dir, planted, "took a directory that was there");
        assert_eq!(dir.parent(), Some(tmp.path()));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(socket.exists());
        drop(foreground);
        assert!(!dir.exists(), "left behind");
        assert!(planted.exists(), "removed what it did not make");
    }
}
