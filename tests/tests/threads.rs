//! A panic in any of hull-vmm's threads ends the VM with a message naming the thread (exit
//! status 1), instead of leaving a VM that never exits. Here the panic is a device's bug hit
//! from a vCPU's thread: a virtio device whose configuration read panics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::{ActivateError, ActiveQueue, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use hull_tests::harness::TempDir;
use hull_tests::tiny_guest::Asm;
use vm_memory::GuestMemoryMmap;
use vmm::{ConsoleConfig, KvmKind, VmConfig, VmExit};

/// A device with a bug: reading its configuration space panics.
struct Buggy;

impl VirtioDevice for Buggy {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {
        panic!("a bug in read_config");
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _interrupt: Arc<IrqTrigger>,
        _queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) -> bool {
        true
    }
}

#[test]
fn a_panicking_vcpu_thread_ends_the_vm_and_names_itself() {
    let base = 0xd000_0000u64;
    let mut asm = Asm::new();
    // Read the device's configuration space (its window's 0x100), then keep the second vCPU
    // company: nothing else would end the VM.
    asm.identity_map_gib_of(base, 0x20_0000)
        .mov_rbx(base + 0x100)
        .load_eax_from_rbx()
        .halt_forever();
    let dir = TempDir::new("thread-panic");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = 64;
    // The other vCPU waits in KVM_RUN; the VM must still end.
    config.vcpus = 2;
    config.console = ConsoleConfig::Null;
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Buggy));
    let vmm = vmm::build_with_devices(&config, KvmKind::detect(), vec![device]).unwrap();

    // On a thread of its own, so that a VM that never ends fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(vmm.run()));
    let outcome = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the VM ends within 30 s of the panic")
        .unwrap();
    assert_eq!(
        outcome.exit,
        VmExit::ThreadPanicked {
            thread: "vcpu0".into(),
            message: "a bug in read_config".into()
        }
    );
    assert_eq!(outcome.exit.exit_code(), 1);
}
