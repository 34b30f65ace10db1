//! The signals hull-vmm forwards to the container's init, and `hull` to hull-vmm: every
//! catchable one but those a process of hull's needs itself (`SIGCHLD`, `SIGPIPE`, the
//! synchronous fault signals, the vCPU kick). Both block the set in every thread and take the
//! signals with `sigwait`, so nothing runs in a signal handler.

use std::io;

use nix::sys::signal::{SigSet, Signal};

/// The forwarded signals.
pub const FORWARDED: [Signal; 21] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGABRT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGTERM,
    Signal::SIGSTKFLT,
    Signal::SIGCONT,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGURG,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGWINCH,
    Signal::SIGIO,
    Signal::SIGPWR,
];

/// Blocks [`FORWARDED`] in the calling thread; call before any other thread starts, so that
/// every thread inherits the mask and one `sigwait` takes them all. Children get an empty
/// mask (std resets it before exec).
pub fn block_forwarded_signals() -> io::Result<SigSet> {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set.thread_block()?;
    Ok(set)
}

/// Whether a signal's default action ends the process.
pub fn terminates(signal: Signal) -> bool {
    !matches!(
        signal,
        Signal::SIGCONT
            | Signal::SIGTSTP
            | Signal::SIGTTIN
            | Signal::SIGTTOU
            | Signal::SIGURG
            | Signal::SIGWINCH
            | Signal::SIGCHLD
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_leaves_out_what_hull_needs() {
        assert!(terminates(Signal::SIGTERM));
        assert!(!terminates(Signal::SIGWINCH));
        assert!(!FORWARDED.contains(&Signal::SIGCHLD));
        assert!(!FORWARDED.contains(&Signal::SIGPIPE));
    }
}
