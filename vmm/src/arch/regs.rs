//! Boot-time CPU state for the Linux 64-bit boot protocol: long mode with paging on, flat
//! segments, an identity map of the first GiB, and `rsi` pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};
use super::paging::{CR0_PG, EFER_LMA, PTE_HUGE, PTE_PRESENT, PTE_WRITABLE};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;

/// Errors while writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure does not fit in guest memory.
    #[error("cannot write the boot {what} at guest address {addr:#x}")]
    WriteMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

/// The GDT the kernel starts on: null, 64-bit code, data, and a TSS descriptor.
/// Entries are `(flags, base, limit)` as in the kernel's `GDT_ENTRY` macro.
const GDT_ENTRIES: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff), // code: present, DPL 0, execute/read, long mode, 4K granularity
    (0xc093, 0, 0xfffff), // data: present, DPL 0, read/write, 32-bit, 4K granularity
    (0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
];

/// Encodes a GDT entry the way the kernel's `GDT_ENTRY(flags, base, limit)` does.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment KVM loads for selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            // With 4K granularity the limit counts pages.
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &impl GuestMemory,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes the GDT, an empty IDT and the identity-mapping page tables, and returns the special
/// registers that enter long mode on them.
pub fn setup_sregs(mem: &impl GuestMemory, mut sregs: kvm_sregs) -> Result<kvm_sregs, RegsError> {
    let gdt: Vec<u64> = GDT_ENTRIES
        .iter()
        .map(|&(flags, base, limit)| gdt_entry(flags, base, limit))
        .collect();
    for (i, entry) in gdt.iter().enumerate() {
        write(mem, *entry, GDT_START + 8 * i as u64, "GDT")?;
    }
    write(mem, 0u64, IDT_START, "IDT")?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    setup_page_tables(mem)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel to reach its own
/// page tables.
fn setup_page_tables(mem: &impl GuestMemory) -> Result<(), RegsError> {
    write(
        mem,
        PDPTE_START | PTE_PRESENT | PTE_WRITABLE,
        PML4_START,
        "PML4",
    )?;
    write(
        mem,
        PDE_START | PTE_PRESENT | PTE_WRITABLE,
        PDPTE_START,
        "PDPT",
    )?;
    for i in 0..512u64 {
        let entry = (i << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
        write(mem, entry, PDE_START + i * 8, "page directory")?;
    }
    Ok(())
}

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::super::paging::Access;
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 0x8);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 0x3));
        assert_eq!(data.base, 0x1234_5678);
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn sregs_enter_long_mode_on_identity_page_tables() {
        let mem = memory();
        let sregs = setup_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.gdt.limit, 31);
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt_entry(0xa09b, 0, 0xfffff));
        let last_pde: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last_pde, (511 << 21) | 0x83);
        // The map is the identity for the whole first GiB, through 2 MiB pages.
        let walk = |gva| super::super::paging::translate(&mem, &sregs, gva, Access::Read, false);
        for gva in [0u64, 0x7000, 0x1000_0000 + 0x123, (1 << 30) - 1] {
            assert_eq!(walk(gva), Ok(gva));
        }
        assert!(walk(1 << 30).is_err());
    }

    #[test]
    fn boot_structures_outside_memory_are_an_error() {
        let tiny = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = setup_sregs(&tiny, kvm_sregs::default()).unwrap_err();
        assert!(err.to_string().contains("PML4"), "{err}");
    }

    #[test]
    fn boot_registers_follow_the_64bit_protocol() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, ZERO_PAGE_START, 2)
        );
        assert_eq!(boot_fpu().mxcsr, 0x1f80);
    }
}
