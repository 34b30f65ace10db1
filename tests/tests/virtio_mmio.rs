//! A tiny guest drives a virtio-mmio transport through real MMIO exits: the register window
//! the device manager announces answers with the virtio magic, the device's id and its
//! config space, and status writes stick.

use std::sync::{Arc, Mutex};

use devices::virtio::{ActivateError, ActiveQueue, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use hull_tests::harness::TempDir;
use hull_tests::tiny_guest::Asm;
use vm_memory::GuestMemoryMmap;
use vmm::{ConsoleConfig, KvmKind, VmConfig, VmExit};

const COM1: u16 = 0x3f8;
const DEVICE_TYPE: u32 = 0x2a;
const CONFIG_WORD: u32 = 0x6c6c_7568; // "hull"

/// A device with one queue and a 4-byte config space; it never gets activated here.
struct ConfigOnly;

impl VirtioDevice for ConfigOnly {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = CONFIG_WORD.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(offset as usize + i).copied().unwrap_or(0);
        }
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
fn guest_reads_and_writes_virtio_registers() {
    let base = 0xd000_0000u64;
    let mut asm = Asm::new();
    asm.identity_map_gib_of(base, 0x20_0000);
    // (register offset, expected value, label)
    for (offset, expected, label) in [
        (0x000, 0x7472_6976, "magic"),
        (0x004, 2, "version"),
        (0x008, DEVICE_TYPE, "device"),
        (0x100, CONFIG_WORD, "config"),
    ] {
        asm.mov_rbx(base + offset)
            .load_eax_from_rbx()
            .report_eax_equals(
                expected,
                COM1,
                format!("{label} ok\n").as_bytes(),
                format!("{label} BAD\n").as_bytes(),
            );
    }
    // Status: ACKNOWLEDGE, then read it back.
    asm.mov_rbx(base + 0x70)
        .mov_rax(1)
        .store_eax_at_rbx()
        .load_eax_from_rbx()
        .report_eax_equals(1, COM1, b"status ok\n", b"status BAD\n")
        .i8042_reset();

    let dir = TempDir::new("virtio-mmio");
    let kernel = dir.path().join("tiny.elf");
    let console = dir.path().join("console.log");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = 64;
    config.console = ConsoleConfig::File(console.clone());

    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(ConfigOnly));
    let vmm = vmm::build_with_devices(&config, KvmKind::detect(), vec![device]).unwrap();
    assert!(
        vmm.cmdline().contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        vmm.cmdline()
    );
    let outcome = vmm.run().unwrap();
    assert_eq!(outcome.exit, VmExit::Reset);
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "magic ok\nversion ok\ndevice ok\nconfig ok\nstatus ok\n"
    );
}
