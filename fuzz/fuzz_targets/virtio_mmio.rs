//! The virtio-mmio transport against a hostile driver: reads and writes of every width at any
//! offset of the window, the status dance done right and wrong, queues placed anywhere,
//! resets, repeated activation, notifies and interrupt acknowledgements, over a real vsock or
//! virtio-fs device. The harness is `devices::virtio::mmio_fuzz`, which a seeded unit test
//! also runs on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::mmio_fuzz::run(data);
});
