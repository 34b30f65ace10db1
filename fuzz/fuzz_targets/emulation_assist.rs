//! The PVM emulation assist against arbitrary instruction bytes: `emulation::assist` and
//! `describe`, and for the XSAVE family the operand address from fuzz-chosen registers and
//! `arch::xsave::execute` against guest memory reached through fuzz-built page tables, plus
//! `arch::paging::translate` on its own. The harness is `vmm::emulation_fuzz`, which a seeded
//! unit test also runs on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::emulation_fuzz::run(data);
});
