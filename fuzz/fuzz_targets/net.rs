//! The virtio-net device against a hostile guest: transmit chains of any layout, header and
//! length, receive buffers of any size, frames of any length from the host's side, resets. The
//! harness is `devices::virtio::net::fuzz`, which a seeded unit test also runs on every
//! `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::net::fuzz::run(data);
});
