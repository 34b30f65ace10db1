//! End to end: hull-vmm boots the real guest kernel (kernel-config/) with the real agent as
//! PID 1 (guest-agent/), the agent reports ready, and the VM powers off cleanly.
//!
//! On a PVM host this takes about a minute (guest kernel code is emulated); on hardware KVM
//! well under a second. The deadline is generous; nothing here sleeps.

use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{guest_artifacts, require_guest_artifacts, workspace_bin, Running};

/// Boot deadline: several times the ~45 s this PVM host needs.
const DEADLINE: Duration = Duration::from_secs(300);
const READY_PREFIX: &str = "HULL_AGENT_READY ";

#[test]
fn real_kernel_boots_to_the_agent_and_powers_off() {
    require_guest_artifacts();
    let (kernel, initramfs) = guest_artifacts();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--mem-size-mib", "128", "--boot-messages"])
        .args(["--cmdline", "hull.poweroff=ready"]);
    let mut vm = Running::spawn(cmd);

    let (line, _) = vm.wait_for_line(DEADLINE, |l| l.contains(READY_PREFIX));
    let json = &line[line.find(READY_PREFIX).expect("matched above") + READY_PREFIX.len()..];
    let ready: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("readiness line is not JSON ({e}): {line:?}"));
    assert_eq!(ready["version"], 1, "{line}");
    let release = ready["kernel_release"]
        .as_str()
        .expect("kernel_release is a string");
    // Our own kernel: 6.12 with the -hull local version from kernel-config/hull.config.
    assert!(
        release.starts_with("6.12.") && release.ends_with("-hull"),
        "the guest runs {release}, not hull's kernel"
    );
    let uptime_ms = ready["uptime_ms"].as_u64().expect("uptime_ms is a number");
    assert!(uptime_ms > 0, "{line}");

    // hull.poweroff=ready: the agent powers off right after the readiness line, and the
    // VMM exits 0 when the guest resets through the i8042.
    let finished = vm.wait(DEADLINE);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        finished.stdout,
        finished.stderr
    );
    assert!(
        !finished.stdout.contains("HULL_AGENT_FATAL"),
        "{}",
        finished.stdout
    );
}
