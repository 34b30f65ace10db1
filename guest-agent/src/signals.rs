//! Signals PID 1 acts on, read from a `signalfd`.
//!
//! The signals are blocked in the (single) agent thread before anything else happens, and read
//! synchronously from a `signalfd`, so no work happens in a signal handler. A blocked signal is
//! also never "ignored" by the kernel's PID 1 protection: it stays pending until read. Children
//! started with `std::process::Command` get an empty signal mask again, and the `signalfd` is
//! close-on-exec.
//!
//! - `SIGCHLD`: reap (see `reaper.rs`).
//! - `SIGTERM`, `SIGINT` (ctrl-alt-del once the kernel is told to send it), `SIGUSR2`: power off.

use nix::errno::Errno;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Errors setting up or reading the signal file descriptor.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error("cannot block the handled signals")]
    Block(#[source] Errno),
    #[error("cannot create signalfd")]
    Create(#[source] Errno),
    #[error("cannot read signalfd")]
    Read(#[source] Errno),
}

/// What the agent does on a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reap,
    PowerOff,
}

/// The signals the agent handles and what it does on each.
pub const HANDLED: &[(Signal, Action)] = &[
    (Signal::SIGCHLD, Action::Reap),
    (Signal::SIGTERM, Action::PowerOff),
    (Signal::SIGINT, Action::PowerOff),
    (Signal::SIGUSR2, Action::PowerOff),
];

/// The action for `signal`, if the agent handles it.
pub fn action(signal: Signal) -> Option<Action> {
    HANDLED
        .iter()
        .find(|(s, _)| *s == signal)
        .map(|(_, action)| *action)
}

/// The blocked signals and the `signalfd` that reads them.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks [`HANDLED`] in the calling thread and opens a `signalfd` for them. Must run before
    /// any other thread starts, so no thread has them unblocked.
    pub fn block() -> Result<Self, SignalsError> {
        let mut set = SigSet::empty();
        for (signal, _) in HANDLED {
            set.add(*signal);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(SignalsError::Block)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).map_err(SignalsError::Create)?;
        Ok(Self { fd })
    }

    /// Waits for the next handled signal.
    pub fn wait(&mut self) -> Result<(Signal, Action), SignalsError> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => {
                    let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                        continue;
                    };
                    if let Some(action) = action(signal) {
                        return Ok((signal, action));
                    }
                }
                // Only for a non-blocking descriptor; this one blocks.
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(SignalsError::Read(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions() {
        assert_eq!(action(Signal::SIGCHLD), Some(Action::Reap));
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR2] {
            assert_eq!(action(s), Some(Action::PowerOff));
        }
        assert_eq!(action(Signal::SIGHUP), None);
        assert_eq!(action(Signal::SIGUSR1), None);
    }
}
