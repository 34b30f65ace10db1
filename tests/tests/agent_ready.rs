//! The agent's readiness line reaches hull-vmm from the serial device as the guest writes it
//! (`Vmm::agent_reports`, `container::ready`), while the console file still gets every byte.

use std::time::{Duration, Instant};

use hull_tests::harness::TempDir;
use hull_tests::tiny_guest::Asm;
use vmm::container::ready::{wait_ready, ReadyError};
use vmm::{ConsoleConfig, KvmKind, VmConfig, VmExit};

const COM1: u16 = 0x3f8;

fn boot(lines: &[u8]) -> (vmm::Vmm, std::path::PathBuf, TempDir) {
    let mut asm = Asm::new();
    asm.out_bytes(COM1, lines).i8042_reset().halt_forever();
    let dir = TempDir::new("agent-ready");
    let kernel = dir.path().join("tiny.elf");
    let console = dir.path().join("console.log");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = 64;
    config.console = ConsoleConfig::File(console.clone());
    let vmm = vmm::build(&config, KvmKind::detect()).unwrap();
    (vmm, console, dir)
}

#[test]
fn the_readiness_line_arrives_in_process() {
    let text = b"[    0.1] booting\r\nHULL_AGENT_READY {\"uptime_ms\":1234}\r\nafter\n";
    let (mut vmm, console, _dir) = boot(text);
    let reports = vmm
        .agent_reports()
        .expect("the first caller gets the reports");
    assert!(vmm.agent_reports().is_none());
    let since = Instant::now();
    vmm.start().unwrap();
    let ready = wait_ready(&reports, since, Duration::from_secs(60)).unwrap();
    assert_eq!(ready.guest_uptime_ms, Some(1234));
    assert!(ready.at >= since);
    assert_eq!(vmm.run().unwrap().exit, VmExit::Reset);
    assert_eq!(std::fs::read(&console).unwrap(), text);
}

#[test]
fn a_fatal_line_or_the_end_of_the_vm_is_an_error() {
    let (mut vmm, _console, _dir) = boot(b"HULL_AGENT_FATAL cannot mount /proc\n");
    let reports = vmm.agent_reports().unwrap();
    vmm.start().unwrap();
    let err = wait_ready(&reports, Instant::now(), Duration::from_secs(60)).unwrap_err();
    assert!(
        matches!(err, ReadyError::Fatal(ref m) if m == "cannot mount /proc"),
        "{err}"
    );
    vmm.run().unwrap();

    let (mut vmm, _console, _dir) = boot(b"no agent here\n");
    let reports = vmm.agent_reports().unwrap();
    assert_eq!(vmm.run().unwrap().exit, VmExit::Reset);
    let err = wait_ready(&reports, Instant::now(), Duration::from_secs(60)).unwrap_err();
    assert!(matches!(err, ReadyError::ConsoleClosed), "{err}");
}
