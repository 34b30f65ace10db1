//! The vsock device against a hostile guest and busy host clients: arbitrary packets (op,
//! type, flags, len, buf_alloc, fwd_cnt, ports, CIDs) over arbitrary descriptor layouts on tx,
//! rx buffers of any size, malformed chains, runaway indices and resets, with real Unix-socket
//! backends in a temporary directory. The harness is `devices::virtio::vsock::fuzz`, which a
//! seeded unit test also runs on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::vsock::fuzz::run(data);
});
