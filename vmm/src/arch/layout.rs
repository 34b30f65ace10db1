//! The guest-physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT                     0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, PDPT, PD (identity map of the first GiB)
//! 0x0002_0000  kernel command line     0x0009_fc00  EBDA (reserved)
//! 0x0010_0000  high memory: the kernel (at its ELF physical address), then free RAM;
//!              the initramfs sits at the top of low RAM
//! 0xd000_0000  MMIO gap: virtio-mmio devices, up to 4 GiB; RAM beyond the gap continues at 4 GiB
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty: the kernel installs its own before enabling interrupts).
pub const IDT_START: u64 = 0x520;
/// The zero page: `struct boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the boot page tables.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot page tables (512 entries of 2 MiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line the x86 kernel accepts (`COMMAND_LINE_SIZE`), including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB); the kernel must load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap, where the devices live.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Address KVM uses for the TSS of real-mode emulation, inside the MMIO gap's top page range.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// Legacy interrupt lines free for virtio-mmio devices (0 timer, 1 keyboard, 2 cascade,
/// 3 and 4 serial, 8 RTC, 13 FPU are taken).
pub const VIRTIO_IRQS: [u32; 9] = [5, 6, 7, 9, 10, 11, 12, 14, 15];
/// Page size of the guest.
pub const PAGE_SIZE: u64 = 0x1000;
