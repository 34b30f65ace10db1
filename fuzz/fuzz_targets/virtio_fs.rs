//! The virtio-fs request path (queues, `FsHandler`, fuse-backend-rs's `Server`, `ConfinedFs`,
//! `PassthroughFs`) against arbitrary FUSE requests (opcode, nodeid, fh, names, lengths, body
//! fields) on a small directory tree, checking afterwards that nothing outside the shared
//! directory was created, changed, opened or read. The harness is
//! `devices::virtio::fs::fuzz`, which a seeded unit test also runs on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::fs::fuzz::run(data);
});
