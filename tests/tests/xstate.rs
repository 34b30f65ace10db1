//! End to end: guest processes keep their own AVX register state across context switches.
//!
//! On a PVM host the guest kernel can only save YMM/ZMM state if hull-vmm executes the XSAVE
//! family for it; with FXSAVE alone the upper halves leak between processes and glibc
//! pipelines crash. `ymm-stress` (tests/guest/) fills every vector register per process,
//! yields thousands of times and counts registers that changed or hold another process's
//! pattern. Runs on hardware KVM unchanged.

use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{cpu_has_flag, guest_artifacts, workspace_bin, Running};

const DEADLINE: Duration = Duration::from_secs(480);

/// The value after `key=` on the line that has it.
fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"))
        .trim()
}

#[test]
fn vector_registers_survive_context_switches_and_pipelines_work() {
    // Without XSAVE and AVX in the CPU this test would pass without proving anything: the
    // guest would have no YMM state to lose. `make test` reports it as skipped in such a lane
    // (the nested AMD lane: QEMU's SVM emulation cannot give its guests XSAVE).
    assert!(
        cpu_has_flag("xsave") && cpu_has_flag("avx"),
        "this test needs a CPU with XSAVE and AVX; this one has xsave: {}, avx: {}",
        cpu_has_flag("xsave"),
        cpu_has_flag("avx")
    );
    let (kernel, _) = guest_artifacts();
    let initramfs = kernel.with_file_name("test-initramfs.cpio");
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest artifacts missing ({} and {}): run `make kernel agent` first",
        kernel.display(),
        initramfs.display()
    );
    // No GLIBC_TUNABLES or other crutches: the shell, ls, cat and wc use AVX as they like.
    let script = "set -e -o pipefail; \
        ymm-stress 4 2000; \
        echo proc_entries=$(ls /proc | wc -l); \
        echo cpuinfo_lines=$(cat /proc/cpuinfo | wc -l)/$(wc -l < /proc/cpuinfo)";
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--mem-size-mib", "256", "--log-level", "info"])
        .arg("--cmdline")
        .arg(format!("hull.exec=\"{script}\""));
    let vm = Running::spawn(cmd);
    let out = vm.wait(DEADLINE);
    let context = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(
        field(&out.stdout, "HULL_AGENT_EXEC_EXIT "),
        r#"{"code":0}"#,
        "{context}"
    );

    let stress = field(&out.stdout, "ymm-stress: ");
    assert!(stress.starts_with("PROCS=4 YIELDS=2000 "), "{context}");
    assert!(stress.ends_with(" corrupted=0 swapped=0"), "{context}");

    let entries: u32 = field(&out.stdout, "proc_entries=")
        .parse()
        .expect("a count");
    assert!(entries > 10, "ls /proc | wc -l gave {entries}: {context}");
    let lines = field(&out.stdout, "cpuinfo_lines=");
    let (piped, direct) = lines.split_once('/').expect("two counts");
    assert_eq!(piped, direct, "cat | wc and wc < differ: {context}");
    assert!(piped.parse::<u32>().expect("a count") > 5, "{context}");
}
