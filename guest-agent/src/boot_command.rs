//! The diagnostic boot command: `hull.exec=<command>` on the kernel command line.
//!
//! Not `hull exec` (a process added to a running container, `server/` and `container/`): a
//! command for tests and diagnostics that the host fixes at boot; its end powers the VM off.
//!
//! This predates the host protocol over vsock. The host puts a shell command on the kernel
//! command line; after the readiness line the agent runs it as `/bin/sh -c <command>` (stdin
//! `/dev/null`, stdout and stderr the console), keeps reaping, and when the command's shell ends
//! prints exactly one line and powers the VM off:
//!
//! ```text
//! HULL_AGENT_EXEC_EXIT {"code":0}
//! HULL_AGENT_EXEC_EXIT {"signal":11}
//! ```
//!
//! The end-to-end tests use it to run programs in a guest (for example the extended-state stress
//! test in `tests/guest/`). Only whoever writes the kernel command line can use it, that is the
//! host: nothing the guest does can reach it.
//!
//! The command's own ending is read with `waitpid` on its pid (std's `Child::try_wait`) before
//! the general reaper runs, so its raw status is kept even for signals nix has no name for
//! (real-time signals), and it cannot be lost among the orphans the reaper collects.

use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cmdline::BOOT_COMMAND_PARAM;
use crate::reaper::{Ending, Reaped};

/// What the exit line starts with, including the single space before the JSON.
pub const EXEC_EXIT_PREFIX: &str = "HULL_AGENT_EXEC_EXIT ";
/// The shell that runs the command.
pub const SHELL: &str = "/bin/sh";
/// `PATH` for the command if the agent has none: the kernel starts init with only `HOME` and
/// `TERM` in its environment.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors starting the command.
#[derive(Debug, thiserror::Error)]
pub enum BootCommandError {
    #[error("{BOOT_COMMAND_PARAM}: shell {path} not found")]
    ShellMissing {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{BOOT_COMMAND_PARAM}: cannot start {path}")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// How the command ended: the record after [`EXEC_EXIT_PREFIX`], `{"code":N}` or
/// `{"signal":N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootCommandExit {
    /// The shell exited with this status.
    Code(i32),
    /// This signal killed the shell.
    Signal(i32),
}

impl BootCommandExit {
    /// From a wait status; `None` for a stopped or continued process (not an ending).
    pub fn from_status(status: ExitStatus) -> Option<Self> {
        status
            .code()
            .map(Self::Code)
            .or_else(|| status.signal().map(Self::Signal))
    }

    /// From what the general reaper collected.
    pub fn from_ending(ending: Ending) -> Self {
        match ending {
            Ending::Exited(code) => Self::Code(code),
            Ending::Signaled(signal) => Self::Signal(signal as i32),
        }
    }

    /// The whole line, without a newline.
    pub fn line(&self) -> String {
        let json = serde_json::to_string(self)
            .expect("a one-field enum of integers always encodes as JSON");
        format!("{EXEC_EXIT_PREFIX}{json}")
    }
}

/// As the test mode logs reaped children: `exit=N` or `signal=N`.
impl fmt::Display for BootCommandExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit={code}"),
            Self::Signal(signal) => write!(f, "signal={signal}"),
        }
    }
}

/// Where the command stands after a `SIGCHLD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootCommandState {
    Running,
    Ended(BootCommandExit),
    /// Reaped without a status the agent could read (by `waitpid(-1)` for a signal nix cannot
    /// name). Should not happen; the agent treats it as fatal rather than hang.
    Lost,
}

/// The running command.
#[derive(Debug)]
pub struct BootCommand {
    child: Child,
}

impl BootCommand {
    /// Starts `shell -c command` with stdin `/dev/null` and the agent's stdout and stderr.
    pub fn start(shell: &Path, command: &str) -> Result<Self, BootCommandError> {
        let path = shell.display().to_string();
        // A clear message for the common mistake: an initramfs without a shell (or with a
        // dangling /bin/sh link).
        if let Err(source) = std::fs::metadata(shell) {
            return Err(BootCommandError::ShellMissing { path, source });
        }
        let mut cmd = Command::new(shell);
        cmd.args(["-c", command]).stdin(Stdio::null());
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", DEFAULT_PATH);
        }
        let child = cmd
            .spawn()
            .map_err(|source| BootCommandError::Spawn { path, source })?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Reaps after a `SIGCHLD`: the command by its pid first, then everything else with `reap`
    /// (normally `reaper::reap_all`). Returns what `reap` collected and the command's state.
    pub fn reap_with(
        &mut self,
        reap: impl FnOnce() -> Vec<Reaped>,
    ) -> (Vec<Reaped>, BootCommandState) {
        let mut state = self.poll();
        let reaped = reap();
        if state == BootCommandState::Running {
            // It may have ended between the two waits and been collected by `reap`; if not,
            // ask again, which also tells whether `reap` took it without a readable status.
            state = match reaped.iter().find(|r| r.pid == self.pid()) {
                Some(r) => BootCommandState::Ended(BootCommandExit::from_ending(r.ending)),
                None => self.poll(),
            };
        }
        (reaped, state)
    }

    /// `waitpid(pid, WNOHANG)` on the command.
    fn poll(&mut self) -> BootCommandState {
        match self.child.try_wait() {
            Ok(Some(status)) => BootCommandExit::from_status(status)
                .map_or(BootCommandState::Lost, BootCommandState::Ended),
            Ok(None) => BootCommandState::Running,
            // ECHILD: someone else reaped it.
            Err(_) => BootCommandState::Lost,
        }
    }
}

#[cfg(test)]
mod tests {
    // No test here starts a process: `reaper`'s test reaps any child of the test binary.
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_lines() {
        assert_eq!(
            BootCommandExit::Code(0).line(),
            r#"HULL_AGENT_EXEC_EXIT {"code":0}"#
        );
        assert_eq!(
            BootCommandExit::Code(3).line(),
            r#"HULL_AGENT_EXEC_EXIT {"code":3}"#
        );
        assert_eq!(
            BootCommandExit::Signal(9).line(),
            r#"HULL_AGENT_EXEC_EXIT {"signal":9}"#
        );
        let json = BootCommandExit::Signal(34).line()[EXEC_EXIT_PREFIX.len()..].to_owned();
        assert_eq!(
            serde_json::from_str::<BootCommandExit>(&json).unwrap(),
            BootCommandExit::Signal(34)
        );
    }

    #[test]
    fn exits_from_wait_statuses() {
        // Raw wait statuses: exit code in bits 8..16, terminating signal in bits 0..7.
        assert_eq!(
            BootCommandExit::from_status(ExitStatus::from_raw(3 << 8)),
            Some(BootCommandExit::Code(3))
        );
        assert_eq!(
            BootCommandExit::from_status(ExitStatus::from_raw(15)),
            Some(BootCommandExit::Signal(15))
        );
        // A real-time signal nix has no name for keeps its number.
        assert_eq!(
            BootCommandExit::from_status(ExitStatus::from_raw(35 | 0x80)),
            Some(BootCommandExit::Signal(35))
        );
        assert_eq!(
            BootCommandExit::from_ending(Ending::Signaled(Signal::SIGSEGV)),
            BootCommandExit::Signal(11)
        );
        assert_eq!(
            BootCommandExit::from_ending(Ending::Exited(255)),
            BootCommandExit::Code(255)
        );
        assert_eq!(BootCommandExit::Code(3).to_string(), "exit=3");
        assert_eq!(BootCommandExit::Signal(15).to_string(), "signal=15");
    }

    #[test]
    fn a_missing_shell_is_named() {
        let err = BootCommand::start(Path::new("/nonexistent-hull/bin/sh"), "true").unwrap_err();
        assert!(
            matches!(err, BootCommandError::ShellMissing { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "hull.exec: shell /nonexistent-hull/bin/sh not found"
        );
    }
}
