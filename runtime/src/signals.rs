//! The signals `hull run` forwards to the container (SIGINT, SIGTERM, SIGHUP): blocked in every
//! thread and taken by one thread with `sigwait`, so nothing runs in a signal handler. Must be
//! set up before any other thread starts, since threads inherit the signal mask. Children get
//! an empty mask (std resets it before exec).

use nix::sys::signal::{SigSet, Signal};

/// The signals forwarded.
pub const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Blocks [`FORWARDED`] and calls `deliver` with each one that arrives, from a thread of its
/// own, until `deliver` returns false.
pub fn forward(deliver: impl Fn(i32) -> bool + Send + 'static) -> std::io::Result<()> {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(signal) => {
                    log::debug!("received {signal}");
                    if !deliver(signal as i32) {
                        break;
                    }
                }
                Err(err) => {
                    log::warn!("sigwait failed: {err}");
                    break;
                }
            }
        })?;
    Ok(())
}
