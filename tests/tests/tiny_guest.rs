//! hull-vmm with tiny hand-made guests: the boot path, port I/O, MMIO, reset and fatal exits,
//! in milliseconds each.

use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{cpu_vendor, run, workspace_bin, Finished, TempDir};
use hull_tests::tiny_guest::Asm;
use vmm::KvmKind;

const DEADLINE: Duration = Duration::from_secs(60);
const COM1: u16 = 0x3f8;

fn boot(asm: &Asm, extra_args: &[&str]) -> Finished {
    let dir = TempDir::new("tiny");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(["--mem-size-mib", "64"])
        .args(extra_args);
    run(cmd, DEADLINE)
}

#[test]
fn serial_output_then_reset_exits_zero() {
    let mut asm = Asm::new();
    asm.out_bytes(COM1, b"hello from the guest\n")
        .i8042_reset()
        .halt_forever();
    let out = boot(&asm, &[]);
    assert_eq!(
        out.stdout, "hello from the guest\n",
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", out.stderr);
}

#[test]
fn string_output_reaches_the_serial_port_byte_by_byte() {
    // `rep outsb`: hardware KVM exits once with all 16 bytes, a 1-byte port's accesses.
    let text = *b"rep outsb works\n";
    let data = 0x30_0000;
    let mut asm = Asm::new();
    for (i, word) in text.chunks(8).enumerate() {
        asm.mov_rdi(data + 8 * i as u64)
            .mov_rax(u64::from_le_bytes(word.try_into().unwrap()))
            .store_rax_at_rdi();
    }
    asm.raw(&[0x48, 0xbe]) // mov rsi, imm64
        .raw(&data.to_le_bytes())
        .mov_rcx(text.len() as u64)
        .raw(&[0x66, 0xba])
        .raw(&COM1.to_le_bytes()) // mov dx, COM1
        .raw(&[0xfc, 0xf3, 0x6e]) // cld; rep outsb
        .i8042_reset();
    let out = boot(&asm, &[]);
    assert_eq!(out.stdout, "rep outsb works\n", "stderr: {}", out.stderr);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn unclaimed_mmio_reads_as_ones() {
    // The MMIO gap is outside the boot identity map: the guest maps it itself.
    let mut asm = Asm::new();
    asm.identity_map_gib_of(0xd000_0000, 0x20_0000)
        .mov_rbx(0xd000_0000 + 0x8000)
        .load_eax_from_rbx()
        .report_eax_equals(0xffff_ffff, COM1, b"ones\n", b"other\n")
        .i8042_reset();
    let out = boot(&asm, &[]);
    assert_eq!(out.stdout, "ones\n", "stderr: {}", out.stderr);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn triple_fault_is_diagnosed() {
    let mut asm = Asm::new();
    asm.out_bytes(COM1, b"x").ud2();
    let out = boot(&asm, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("triple-faulted"), "{}", out.stderr);
    if KvmKind::detect() == KvmKind::Hardware && cpu_vendor() == "AuthenticAMD" {
        // AMD's SVM path resets the vCPU before KVM reports the shutdown: the report must
        // say the state is gone, not pass the reset vector off as the fault.
        assert!(
            out.stderr.contains("state at the fault is not available"),
            "{}",
            out.stderr
        );
        assert!(!out.stderr.contains("RIP 0xfff0"), "{}", out.stderr);
        return;
    }
    // The diagnosis names the faulting RIP and the instruction bytes there.
    // "x" is `mov dx, port` (4 bytes) and `mov al, imm; out dx, al` (3 bytes).
    assert!(out.stderr.contains("RIP 0x1000007"), "{}", out.stderr);
    assert!(
        out.stderr.contains("instruction ud2 (bytes 0f 0b)"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_kernel_is_a_clear_error() {
    let dir = TempDir::new("badkernel");
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel").arg(&kernel);
    let out = run(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains(&kernel.display().to_string()),
        "{}",
        out.stderr
    );

    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.args(["--kernel", "/nonexistent/vmlinux"]);
    let out = run(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("field `kernel` = /nonexistent/vmlinux"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_config_file_names_file_and_field() {
    let dir = TempDir::new("badconfig");
    let config = dir.path().join("vm.json");
    std::fs::write(&config, r#"{"kernel": "/bin/true", "vcpus": 0}"#).unwrap();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--config").arg(&config);
    let out = run(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains(&config.display().to_string()),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("field `vcpus` = 0"), "{}", out.stderr);

    std::fs::write(&config, r#"{"kernel": "/bin/true", "memory": 64}"#).unwrap();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--config").arg(&config);
    let out = run(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("unknown field `memory`"),
        "{}",
        out.stderr
    );
}
