//! The `hull-vmm` child of a `hull run`: started on the state directory's `vm.json`, watched
//! until the agent is ready, killed (and reaped) on drop so that no failure path leaves a VM.
//!
//! The VMM runs in its own process group, so a terminal's ctrl-C reaches `hull` alone, which
//! forwards it to the container; and it gets `SIGKILL` if `hull` itself dies.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The line the agent prints once its ports are open (docs/agent.md).
const READY_PREFIX: &str = "HULL_AGENT_READY ";
/// The line the agent prints before it powers off on a fatal error.
const FATAL_PREFIX: &str = "HULL_AGENT_FATAL ";
/// How often the console and the VMM are looked at while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Bytes of console and VMM log quoted in an error.
const TAIL_BYTES: u64 = 2048;

/// When the stages of a boot were reached.
#[derive(Debug, Clone, Copy)]
pub struct BootTimes {
    /// `hull-vmm` was started.
    pub spawned: Instant,
    /// The vsock socket appeared: the VMM has built the VM.
    pub vmm_ready: Option<Instant>,
    /// The agent's readiness line appeared on the console.
    pub agent_ready: Instant,
    /// The guest's uptime when the agent was ready (from its readiness line).
    pub guest_uptime_ms: Option<u64>,
}

/// What interrupts a wait: a signal `hull` received.
pub trait Interrupt {
    /// A signal number, if one arrived.
    fn pending_signal(&self) -> Option<i32>;
}

/// A running `hull-vmm`.
pub struct VmmProcess {
    child: Child,
    spawned: Instant,
    console: PathBuf,
    log: PathBuf,
    vsock: PathBuf,
    exit: Option<ExitStatus>,
}

impl VmmProcess {
    /// Starts `vmm_bin --config <config>`; its standard error goes to `log`.
    pub fn spawn(
        vmm_bin: &Path,
        config: &Path,
        console: PathBuf,
        vsock: PathBuf,
        log: PathBuf,
        debug: bool,
    ) -> anyhow::Result<Self> {
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(vmm_bin);
        cmd.arg("--config").arg(config);
        if debug {
            cmd.args(["--log-level", "info"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe functions may be called; it makes one prctl system call and
        // touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", vmm_bin.display()))?;
        log::debug!("started {} (pid {})", vmm_bin.display(), child.id());
        Ok(Self {
            child,
            spawned,
            console,
            log,
            vsock,
            exit: None,
        })
    }

    /// The VMM's exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits until the agent's readiness line is on the console. Fails early if the VMM
    /// exits, the agent reports a fatal error, or `interrupt` has a signal.
    pub fn wait_ready(
        &mut self,
        deadline: Duration,
        interrupt: &dyn Interrupt,
    ) -> anyhow::Result<BootTimes> {
        let end = self.spawned + deadline;
        let mut watcher = LineWatcher::default();
        let mut vmm_ready = None;
        loop {
            if vmm_ready.is_none() && self.vsock.exists() {
                vmm_ready = Some(Instant::now());
            }
            for line in watcher.poll(&self.console) {
                if let Some(json) = line.strip_prefix(READY_PREFIX) {
                    let uptime = serde_json::from_str::<serde_json::Value>(json)
                        .ok()
                        .and_then(|v| v.get("uptime_ms").and_then(serde_json::Value::as_u64));
                    log::debug!("agent ready: {json}");
                    return Ok(BootTimes {
                        spawned: self.spawned,
                        vmm_ready,
                        agent_ready: Instant::now(),
                        guest_uptime_ms: uptime,
                    });
                }
                if let Some(msg) = line.strip_prefix(FATAL_PREFIX) {
                    bail!("the guest agent failed: {msg}{}", self.describe());
                }
            }
            if let Some(status) = self.try_exit() {
                bail!(
                    "hull-vmm exited ({status}) before the guest agent was ready{}",
                    self.describe()
                );
            }
            if let Some(signal) = interrupt.pending_signal() {
                return Err(anyhow!(crate::run::Interrupted(signal)))
                    .context("while waiting for the guest agent");
            }
            if Instant::now() >= end {
                bail!(
                    "the guest agent was not ready within {} s{}",
                    deadline.as_secs(),
                    self.describe()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for the VMM to exit, up to `deadline`; kills it after that.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() >= end {
                log::warn!(
                    "hull-vmm did not exit within {} s after shutdown; killing it",
                    deadline.as_secs()
                );
                return self.kill();
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills the VMM (if it still runs) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .expect("waiting for our own child cannot fail");
        self.exit = Some(status);
        status
    }

    /// The VMM's exit status (if any) and the tails of the console and of its log, for errors.
    pub fn describe(&mut self) -> String {
        let mut text = String::new();
        if let Some(status) = self.try_exit() {
            text.push_str(&format!("\nhull-vmm: {status}"));
        }
        for (name, path) in [("console", &self.console), ("hull-vmm log", &self.log)] {
            let tail = tail(path, TAIL_BYTES);
            if !tail.trim().is_empty() {
                text.push_str(&format!(
                    "\n--- {name} ({}) ---\n{}",
                    path.display(),
                    tail.trim_end()
                ));
            }
        }
        text
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max` bytes of a file, as text.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads the lines a growing file gains, a poll at a time.
#[derive(Default)]
struct LineWatcher {
    offset: u64,
    partial: Vec<u8>,
}

impl LineWatcher {
    /// The complete lines added since the last poll.
    fn poll(&mut self, path: &Path) -> Vec<String> {
        let Ok(mut file) = File::open(path) else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut fresh = Vec::new();
        let Ok(n) = file.read_to_end(&mut fresh) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            lines.push(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_watcher_returns_whole_lines_as_they_grow() {
        let path = std::env::temp_dir().join(format!("hull-linewatch-{}", std::process::id()));
        std::fs::write(&path, "boot\r\nHULL_AGENT_RE").unwrap();
        let mut w = LineWatcher::default();
        assert_eq!(w.poll(&path), vec!["boot".to_owned()]);
        assert!(w.poll(&path).is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"ADY {\"uptime_ms\":5}\nrest").unwrap();
        assert_eq!(
            w.poll(&path),
            vec!["HULL_AGENT_READY {\"uptime_ms\":5}".to_owned()]
        );
        assert_eq!(tail(&path, 4), "rest");
        std::fs::remove_file(&path).unwrap();
        assert!(w.poll(&path).is_empty());
    }
}
