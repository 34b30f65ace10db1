//! The instructions a PVM host's emulator refuses, executed by a tiny guest in kernel mode:
//! INT3 must reach the guest's own #BP handler and FWAIT must be a no-op. On hardware KVM the
//! CPU does this itself; on PVM hull-vmm's emulation assist must, and says so in its log.

use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{run, workspace_bin, TempDir};
use hull_tests::tiny_guest::{Asm, LOAD_ADDR};
use vmm::KvmKind;

const COM1: u16 = 0x3f8;

#[test]
fn int3_reaches_the_guest_handler_and_fwait_is_skipped() {
    let mut handler = Asm::new();
    handler.out_bytes(COM1, b"breakpoint\n").iretq();
    let mut asm = Asm::new();
    // The handler sits right after the jump at the entry point.
    asm.jmp_over(handler.code().len()).append(&handler);
    asm.install_idt_gate(0x30000, 3, LOAD_ADDR + 2)
        .out_bytes(COM1, b"before\n")
        .int3()
        .out_bytes(COM1, b"after\n")
        .fwait()
        .int3()
        .out_bytes(COM1, b"done\n")
        .i8042_reset();

    let dir = TempDir::new("assist");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(["--mem-size-mib", "64", "--log-level", "info"]);
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(
        out.stdout, "before\nbreakpoint\nafter\nbreakpoint\ndone\n",
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", out.stderr);
    if KvmKind::detect() == KvmKind::Pvm {
        assert!(
            out.stderr.contains("emulation assists: 2 int3, 1 fwait"),
            "the assist did not run: {}",
            out.stderr
        );
    }
}
