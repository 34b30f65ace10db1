//! Pausing and resuming a running VM (`Vmm::pause`, `Vmm::resume`), the way a warm start's
//! snapshot will: a tiny guest counts in RCX and in memory, with a port write now and then
//! (`tiny_guest::counting_guest`); the host pauses and resumes it a thousand times, reads its
//! registers while it is paused, and finally lets it finish.

use std::time::{Duration, Instant};

use hull_tests::harness::TempDir;
use hull_tests::tiny_guest::{counting_guest, Asm};
use vm_memory::{Bytes, GuestAddress};
use vmm::{ConsoleConfig, KvmKind, VmConfig, VmExit, Vmm};

/// The guest's counter; the stop flag is the next quadword.
const DATA: u64 = 0x30_0000;
const CYCLES: usize = 1000;
const DEADLINE: Duration = Duration::from_secs(60);

fn counter(vmm: &Vmm) -> u64 {
    vmm.memory()
        .read_obj(GuestAddress(DATA))
        .expect("the counter is in guest memory")
}

/// Spins (yielding) until the guest's counter passes `value`.
fn wait_past(vmm: &Vmm, value: u64, deadline: Instant) {
    while counter(vmm) <= value {
        assert!(
            Instant::now() < deadline,
            "the guest did not count past {value} after a resume"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_thousand_pauses_read_consistent_state_and_the_guest_goes_on() {
    let (asm, looping) = counting_guest(DATA);
    let dir = TempDir::new("pause");
    let kernel = dir.path().join("tiny.elf");
    let console = dir.path().join("console.log");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = 64;
    // The second vCPU waits for a SIPI inside KVM_RUN: pausing must reach it there too.
    config.vcpus = 2;
    config.console = ConsoleConfig::File(console.clone());

    let mut vmm = vmm::build(&config, KvmKind::detect()).unwrap();
    vmm.start().unwrap();
    let deadline = Instant::now() + DEADLINE;
    wait_past(&vmm, 0, deadline);

    let mut last_rcx = 0;
    for cycle in 0..CYCLES {
        vmm.pause().unwrap();
        let first = vmm.on_paused_vcpu(0, |fd| fd.get_regs()).unwrap().unwrap();
        let in_memory = counter(&vmm);
        let again = vmm.on_paused_vcpu(0, |fd| fd.get_regs()).unwrap().unwrap();
        assert_eq!(first, again, "cycle {cycle}: two reads while paused differ");
        assert_eq!(
            counter(&vmm),
            in_memory,
            "cycle {cycle}: the guest counted while paused"
        );
        assert!(
            looping.contains(&first.rip),
            "cycle {cycle}: RIP {:#x} outside the loop {looping:#x?}",
            first.rip
        );
        // Never back, and forward since the last pause: the guest ran in between.
        assert!(
            first.rcx > last_rcx,
            "cycle {cycle}: the counter went from {last_rcx} to {}",
            first.rcx
        );
        // Paused between the increment and the store, memory is one behind.
        assert!(
            in_memory == first.rcx || in_memory + 1 == first.rcx,
            "cycle {cycle}: RCX {} and memory {in_memory} disagree",
            first.rcx
        );
        last_rcx = first.rcx;
        vmm.resume().unwrap();
        wait_past(&vmm, first.rcx, deadline);
    }

    // The guest goes on to its end when told to.
    vmm.memory()
        .write_obj(1u64, GuestAddress(DATA + 8))
        .unwrap();
    let outcome = vmm.run().unwrap();
    assert_eq!(outcome.exit, VmExit::Reset);
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "done\n");
}

/// Once a vCPU's thread has ended (here: the guest triple-faulted), pausing is an error that
/// names it, not a hang; the VM still ends with the fault.
#[test]
fn pausing_after_a_vcpu_ended_is_an_error() {
    let mut asm = Asm::new();
    asm.ud2();
    let dir = TempDir::new("pause-ended");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = 64;
    config.console = ConsoleConfig::Null;
    let mut vmm = vmm::build(&config, KvmKind::detect()).unwrap();
    vmm.start().unwrap();
    let deadline = Instant::now() + DEADLINE;
    // Until the fault, the vCPU pauses and resumes like any other.
    let err = loop {
        if let Err(err) = vmm.pause().and_then(|()| vmm.resume()) {
            break err;
        }
        assert!(Instant::now() < deadline, "the guest never faulted");
    };
    assert!(err.to_string().contains("vcpu0"), "{err}");
    assert!(vmm.on_paused_vcpu(0, |_| ()).is_err());
    assert!(matches!(vmm.run().unwrap().exit, VmExit::TripleFault(_)));
}
