//! Signals `hull` passes on (to its hull-vmm during `create`/`run`, to the guest process during
//! `exec`): the same set hull-vmm forwards, blocked in every thread and taken by one thread with
//! `sigwait`, so nothing runs in a signal handler. Must be set up before any other thread
//! starts, since threads inherit the signal mask. Children get an empty mask (std resets it
//! before exec).

/// Blocks the forwarded signals and calls `deliver` with each one that arrives, from a thread
/// of its own, until `deliver` returns false.
pub fn forward(deliver: impl Fn(i32) -> bool + Send + 'static) -> std::io::Result<()> {
    let set = vmm::container::block_forwarded_signals()?;
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
