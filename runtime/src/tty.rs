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
    /// Listens on a fresh socket in `dir` and relays the master that arrives on it.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let socket = dir.join(format!("hull-console-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
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
    }
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
