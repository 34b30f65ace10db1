//! The host's seed (`hull_protocol::Seed`, in its hello): fresh entropy credited to the
//! kernel's pool with an immediate reseed of its random-number generator, and the host's wall
//! clock. Applied on every control connection, before any request is read: a VM restored from
//! a snapshot otherwise shares the snapshot's random state and clock with every VM restored
//! from it, and a cold-booted one gains a fully seeded generator at once.

use std::fs::OpenOptions;
use std::os::fd::AsFd;

use hull_protocol::Seed;

use crate::sys;

/// Credits `seed.entropy` to the kernel's pool, reseeds, and sets the wall clock.
pub fn apply(seed: &Seed) -> Result<(), String> {
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    sys::add_entropy(random.as_fd(), &seed.entropy)
        .map_err(|e| format!("adding the host's entropy: {e}"))?;
    sys::set_realtime(seed.realtime_ns).map_err(|e| format!("setting the clock: {e}"))
}
