//! Snapshots and restores (`Vmm::snapshot`, `vmm::restore`): a tiny guest counts in RCX and in
//! memory (`tiny_guest::counting_guest`); the host snapshots it while it runs, restores the
//! snapshot into new VMs, and checks that each continues exactly from the snapshot's count,
//! ends as the original does, and that the snapshot's files are never written by a restore.
//! Bad snapshots (corrupt, truncated, mismatched, from another VM shape) are refused with the
//! file and the reason, before any vCPU runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hull_tests::harness::TempDir;
use hull_tests::tiny_guest::counting_guest;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmm::{ConsoleConfig, KvmKind, VmConfig, VmExit, Vmm};

/// The guest's counter; the stop flag is the next quadword.
const DATA: u64 = 0x30_0000;
const DEADLINE: Duration = Duration::from_secs(60);

fn counter(vmm: &Vmm) -> u64 {
    vmm.memory()
        .read_obj(GuestAddress(DATA))
        .expect("the counter is in guest memory")
}

fn wait_past(vmm: &Vmm, value: u64) {
    let deadline = Instant::now() + DEADLINE;
    while counter(vmm) <= value {
        assert!(
            Instant::now() < deadline,
            "the guest did not count past {value}"
        );
        std::thread::yield_now();
    }
}

/// Tells the guest to stop, runs it to its end, and checks that it ended as it should.
fn finish(vmm: Vmm, console: &Path) {
    vmm.memory()
        .write_obj(1u64, GuestAddress(DATA + 8))
        .unwrap();
    let outcome = vmm.run().unwrap();
    assert_eq!(outcome.exit, VmExit::Reset);
    assert_eq!(std::fs::read_to_string(console).unwrap(), "done\n");
}

struct Setup {
    dir: TempDir,
    config: VmConfig,
    console: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Self {
        let (asm, _) = counting_guest(DATA);
        let dir = TempDir::new(name);
        let kernel = dir.path().join("tiny.elf");
        std::fs::write(&kernel, asm.to_elf()).unwrap();
        let mut config = VmConfig::new(kernel);
        config.mem_size_mib = 64;
        // The second vCPU waits for a SIPI: its state is restored as it is.
        config.vcpus = 2;
        let console = dir.path().join("console.log");
        config.console = ConsoleConfig::File(console.clone());
        Self {
            dir,
            config,
            console,
        }
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.dir.path().join("snap")
    }

    /// The config of a restored VM: its own console.
    fn restored_config(&self, name: &str) -> (VmConfig, PathBuf) {
        let mut config = self.config.clone();
        let console = self.dir.path().join(format!("{name}.log"));
        config.console = ConsoleConfig::File(console.clone());
        (config, console)
    }

    /// Boots the guest, lets it count, snapshots it; returns the paused original and the count
    /// and registers at the snapshot.
    fn snapshot(&self) -> (Vmm, u64, kvm_bindings::kvm_regs) {
        let mut vmm = vmm::build(&self.config, KvmKind::detect()).unwrap();
        vmm.start().unwrap();
        wait_past(&vmm, 1000);
        let report = vmm.snapshot(&self.snapshot_dir()).unwrap();
        let regs = vmm.on_paused_vcpu(0, |fd| fd.get_regs()).unwrap().unwrap();
        let count = counter(&vmm);
        eprintln!(
            "snapshot: {} bytes of state, {} of {} bytes of memory written, in {:?}",
            report.state_bytes, report.memory.written, report.memory.ram, report.elapsed
        );
        assert!(report.memory.written > 0 && report.memory.written < report.memory.ram);
        (vmm, count, regs)
    }
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_restored_vm_continues_from_the_snapshot_and_two_restores_share_one_file() {
    let setup = Setup::new("snapshot-restore");
    let (original, count, regs) = setup.snapshot();
    let before = files_of(&setup.snapshot_dir());
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["memory", "state"]);

    // The original goes on and ends as it would have.
    original.resume().unwrap();
    wait_past(&original, count);
    finish(original, &setup.console);

    // Two VMs restored from the one snapshot, side by side; the second into a VM prepared
    // before (`hull-vmm --standby`), its RAM replaced by the snapshot's.
    let mut restored = Vec::new();
    for name in ["first", "second"] {
        let (config, console) = setup.restored_config(name);
        let prepared =
            (name == "second").then(|| vmm::PreparedVm::new(config.mem_size_mib).unwrap());
        let vmm = vmm::restore(&config, &setup.snapshot_dir(), prepared).unwrap();
        // Before it runs, the restored VM is exactly the snapshot.
        assert_eq!(counter(&vmm), count, "{name}");
        // Its RAM stays out of hull-vmm's core dumps, the prepared VM's too.
        for region in vmm.memory().iter() {
            let host = vmm.memory().get_host_address(region.start_addr()).unwrap();
            assert_eq!(
                vmm::vstate::vm::excluded_from_core_dumps(host),
                Some(true),
                "{name}"
            );
        }
        restored.push((name, vmm, console));
    }
    for (name, vmm, _) in &mut restored {
        vmm.start().unwrap();
        vmm.pause().unwrap();
        let now = vmm.on_paused_vcpu(0, |fd| fd.get_regs()).unwrap().unwrap();
        // Counting on from the snapshot's RCX, never from 0 and never back.
        assert!(
            now.rcx >= regs.rcx,
            "{name}: RCX {} < {}",
            now.rcx,
            regs.rcx
        );
        assert_eq!(now.rdi, regs.rdi, "{name}");
        vmm.resume().unwrap();
        wait_past(vmm, count + 1000);
    }
    // One VM's writes are its own.
    let (_, first, _) = &restored[0];
    first.pause().unwrap();
    let frozen = counter(first);
    let (_, second, _) = &restored[1];
    wait_past(second, frozen + 1000);
    assert_eq!(counter(first), frozen);
    first.resume().unwrap();

    for (_, vmm, console) in restored {
        finish(vmm, &console);
    }
    assert_eq!(
        files_of(&setup.snapshot_dir()),
        before,
        "a restore wrote the snapshot's files"
    );
}

/// The error restoring `dir` gives, the same with and without a prepared VM.
fn restore_error(config: &VmConfig, dir: &Path) -> String {
    let error = |prepared: Option<vmm::PreparedVm>| match vmm::restore(config, dir, prepared) {
        Ok(_) => panic!("restoring {} worked", dir.display()),
        Err(err) => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        }
    };
    let plain = error(None);
    let prepared = vmm::PreparedVm::new(config.mem_size_mib).unwrap();
    assert_eq!(error(Some(prepared)), plain, "with a prepared VM");
    plain
}

#[test]
fn bad_snapshots_are_refused_naming_the_file() {
    let setup = Setup::new("snapshot-bad");
    let (original, _, _) = setup.snapshot();
    drop(original);
    let dir = setup.snapshot_dir();
    let (state, memory) = (dir.join("state"), dir.join("memory"));
    let (config, _) = setup.restored_config("bad");
    let good_state = std::fs::read(&state).unwrap();

    // Another VM shape.
    let mut other = config.clone();
    other.vcpus = 1;
    let err = restore_error(&other, &dir);
    assert!(
        err.contains(&state.display().to_string()) && err.contains("vCPUs"),
        "{err}"
    );
    let mut other = config.clone();
    other.mem_size_mib = 128;
    assert!(restore_error(&other, &dir).contains("MiB of memory"));

    // A corrupt state file: one flipped bit in the middle.
    let mut bad = good_state.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x10;
    std::fs::write(&state, &bad).unwrap();
    let err = restore_error(&config, &dir);
    assert!(
        err.contains(&format!("{}: checksum mismatch", state.display())),
        "{err}"
    );

    // Truncated.
    std::fs::write(&state, &good_state[..good_state.len() - 9]).unwrap();
    let err = restore_error(&config, &dir);
    assert!(err.contains("truncated"), "{err}");

    // A memory file of another snapshot.
    std::fs::write(&state, &good_state).unwrap();
    let other_setup = Setup::new("snapshot-bad-other");
    let (other_vm, _, _) = other_setup.snapshot();
    drop(other_vm);
    std::fs::copy(other_setup.snapshot_dir().join("memory"), &memory).unwrap();
    let err = restore_error(&config, &dir);
    assert!(
        err.contains(&format!(
            "{}: belongs to another snapshot",
            memory.display()
        )),
        "{err}"
    );

    // Missing.
    std::fs::remove_file(&memory).unwrap();
    let err = restore_error(&config, &dir);
    assert!(err.contains("cannot read snapshot memory file"), "{err}");
    let err = restore_error(&config, &setup.dir.path().join("nowhere"));
    assert!(err.contains("cannot read snapshot state file"), "{err}");
}
