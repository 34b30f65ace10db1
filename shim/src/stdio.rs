//! A task's standard streams: the FIFOs containerd gives (any of them may be empty: none) on one
//! side, the guest process's vsock stream connections on the other, one relay thread per
//! direction. Output relays report their end, so that a task's exit is published only once its
//! output has reached containerd (bounded: descendants may hold it open).

use std::fs::{File, OpenOptions};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::Context;
use hull_protocol::{attach_stream, hybrid, ProcessRef, Stdio, StreamKind, STDIO_PORT};

/// For a stream connection to the guest to be accepted.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// The FIFOs containerd named for a task or exec.
#[derive(Debug, Clone, Default)]
pub struct Fifos {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Fifos {
    /// What the guest is asked for: a terminal, or a pipe for each FIFO given.
    pub fn stdio(&self, rows: u16, cols: u16) -> Stdio {
        if self.terminal {
            Stdio::Terminal { rows, cols }
        } else {
            Stdio::Pipes {
                stdin: !self.stdin.is_empty(),
                stdout: !self.stdout.is_empty(),
                stderr: !self.stderr.is_empty(),
            }
        }
    }
}

/// The stream connections of one process, attached and not yet relayed.
pub struct Attached {
    streams: Vec<(StreamKind, UnixStream)>,
}

/// Opens and attaches the stream connections `stdio` needs for `process`, through the pod's
/// vsock socket `vsock`.
pub fn attach(vsock: &Path, process: &ProcessRef, stdio: &Stdio) -> anyhow::Result<Attached> {
    let mut streams = Vec::new();
    for kind in stdio.streams() {
        let mut conn = hybrid::connect(vsock, STDIO_PORT, Some(CONNECT_DEADLINE))
            .with_context(|| format!("cannot open the {kind} stream of {process}"))?;
        conn.set_read_timeout(Some(CONNECT_DEADLINE))?;
        attach_stream(&mut conn, process, kind)
            .with_context(|| format!("cannot attach the {kind} stream of {process}"))?;
        conn.set_read_timeout(None)?;
        streams.push((kind, conn));
    }
    Ok(Attached { streams })
}

/// A process's running relays.
pub struct Relays {
    /// Told once per output relay that ends.
    done: Receiver<()>,
    outputs: usize,
    /// The connection that carries stdin (or the terminal), for `close_io`.
    input: Option<UnixStream>,
}

impl Relays {
    /// Waits until every output relay has ended, or `grace` has passed.
    pub fn drain(&self, grace: Duration) {
        let end = Instant::now() + grace;
        for _ in 0..self.outputs {
            let left = end.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                log::warn!(
                    "output still open {} s after its process ended",
                    grace.as_secs()
                );
                return;
            }
        }
    }

    /// containerd closed stdin: the guest's stdin stream ends.
    pub fn close_stdin(&mut self) {
        if let Some(input) = self.input.take() {
            let _ = input.shutdown(Shutdown::Write);
        }
    }
}

fn open_fifo(path: &str, what: &str) -> anyhow::Result<File> {
    // Read and write: opening a FIFO so never blocks, whoever has the other end open.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(PathBuf::from(path))
        .with_context(|| format!("cannot open the {what} FIFO {path}"))
}

/// Starts relaying `attached` to and from `fifos`.
pub fn relay(attached: Attached, fifos: &Fifos) -> anyhow::Result<Relays> {
    let (done_tx, done) = channel();
    let mut relays = Relays {
        done,
        outputs: 0,
        input: None,
    };
    let spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name)
            .spawn(body)
            .context("cannot start a relay thread")
    };
    for (kind, stream) in attached.streams {
        let (input, output) = match kind {
            StreamKind::Stdin => (Some(&fifos.stdin), None),
            StreamKind::Stdout => (None, Some(&fifos.stdout)),
            StreamKind::Stderr => (None, Some(&fifos.stderr)),
            StreamKind::Terminal => (
                Some(&fifos.stdin).filter(|p| !p.is_empty()),
                Some(&fifos.stdout),
            ),
        };
        if let Some(path) = input {
            let fifo = open_fifo(path, "stdin")?;
            let to = stream.try_clone()?;
            relays.input = Some(stream.try_clone()?);
            let body = hull_contract::relay::relay_body("stdin", fifo, to, None);
            spawn("stdin".into(), Box::new(body))?;
        }
        if let Some(path) = output {
            let fifo = open_fifo(path, "output")?;
            let body =
                hull_contract::relay::relay_body("output", stream, fifo, Some(done_tx.clone()));
            spawn("output".into(), Box::new(body))?;
            relays.outputs += 1;
        }
    }
    Ok(relays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_a_pipe_for_each_fifo_given_or_a_terminal() {
        let mut fifos = Fifos {
            stdin: String::new(),
            stdout: "/run/out".into(),
            stderr: "/run/err".into(),
            terminal: false,
        };
        assert_eq!(
            fifos.stdio(24, 80),
            Stdio::Pipes {
                stdin: false,
                stdout: true,
                stderr: true
            }
        );
        fifos.terminal = true;
        assert_eq!(
            fifos.stdio(30, 100),
            Stdio::Terminal {
                rows: 30,
                cols: 100
            }
        );
    }
}
