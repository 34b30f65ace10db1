//! Guest-virtual memory, walked the way the MMU would for an instruction the VMM executes on
//! the guest's behalf (the XSAVE family on PVM hosts, and diagnostics).
//!
//! The walk follows 4-level paging with 1 GiB and 2 MiB pages, checks presence, write
//! permission (CR0.WP) and user/supervisor, and sets the accessed and dirty bits as the CPU
//! would: a COW page must fault instead of being written behind the kernel's back, and the
//! kernel must see pages we wrote as dirty. A failed walk yields the page fault the CPU would
//! have raised, for the VMM to inject. Everything read here is guest-controlled: a table that
//! points outside guest memory is a fault, never a panic.

use kvm_bindings::kvm_sregs;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemory, VolatileMemory};

pub(crate) const CR0_PG: u64 = 1 << 31;
const CR0_WP: u64 = 1 << 16;
pub(crate) const EFER_LMA: u64 = 1 << 10;

pub(crate) const PTE_PRESENT: u64 = 1 << 0;
pub(crate) const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
pub(crate) const PTE_HUGE: u64 = 1 << 7;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Page-fault error code bits (`X86_PF_*`).
pub const PF_PROT: u32 = 1 << 0;
/// The access was a write.
pub const PF_WRITE: u32 = 1 << 1;
/// The access came from user mode.
pub const PF_USER: u32 = 1 << 2;
/// A reserved bit was set in a paging structure (here: a table outside guest memory).
pub const PF_RSVD: u32 = 1 << 3;

/// The guest page size.
pub const PAGE_SIZE: u64 = 0x1000;

/// What an access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
}

/// The page fault the CPU would raise for an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address (CR2).
    pub addr: u64,
    /// The error code pushed with the fault.
    pub error_code: u32,
}

/// Translates `gva` for an access from kernel mode (`user` false) or user mode, updating
/// accessed/dirty bits, or returns the page fault.
pub fn translate(
    mem: &impl GuestMemory,
    sregs: &kvm_sregs,
    gva: u64,
    access: Access,
    user: bool,
) -> Result<u64, PageFault> {
    let write = access == Access::Write;
    let fault = |error: u32| PageFault {
        addr: gva,
        error_code: error | if write { PF_WRITE } else { 0 } | if user { PF_USER } else { 0 },
    };
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(gva);
    }
    if sregs.efer & EFER_LMA == 0 {
        // A 64-bit guest kernel never runs with legacy paging.
        return Err(fault(PF_RSVD));
    }
    let enforce_write = user || sregs.cr0 & CR0_WP != 0;
    let mut table = sregs.cr3 & PTE_ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let entry_addr = GuestAddress(table + ((gva >> shift) & 0x1ff) * 8);
        // The entry as one atomic word (it is 8-byte aligned): other vCPUs change page tables
        // while this one walks them, and the CPU sets accessed and dirty bits atomically.
        let slice = mem.get_slice(entry_addr, 8).map_err(|_| fault(PF_RSVD))?;
        let atomic = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| fault(PF_RSVD))?;
        let mut entry = atomic.load(Ordering::SeqCst);
        let leaf = loop {
            if entry & PTE_PRESENT == 0 {
                return Err(fault(0));
            }
            if (write && enforce_write && entry & PTE_WRITABLE == 0)
                || (user && entry & PTE_USER == 0)
            {
                return Err(fault(PF_PROT));
            }
            let leaf = level == 0 || (level < 3 && entry & PTE_HUGE != 0);
            let mut updated = entry | PTE_ACCESSED;
            if leaf && write {
                updated |= PTE_DIRTY;
            }
            if updated == entry {
                break leaf;
            }
            // Changed since it was read: check the new entry instead of writing over it.
            match atomic.compare_exchange(entry, updated, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break leaf,
                Err(now) => entry = now,
            }
        };
        if leaf {
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & PTE_ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    unreachable!("level 0 is always a leaf")
}

/// Splits `[gva, gva + len)` into pieces that do not cross a 4 KiB page: `(gva, offset, len)`.
fn page_chunks(gva: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let addr = gva.wrapping_add(offset as u64);
        let in_page = (PAGE_SIZE - (addr & (PAGE_SIZE - 1))) as usize;
        let n = in_page.min(len - offset);
        let chunk = (addr, offset, n);
        offset += n;
        Some(chunk)
    })
}

/// Reads guest-virtual memory page by page, as kernel or user code would.
pub fn read_virt(
    mem: &impl GuestMemory,
    sregs: &kvm_sregs,
    gva: u64,
    buf: &mut [u8],
    user: bool,
) -> Result<(), PageFault> {
    for (addr, offset, n) in page_chunks(gva, buf.len()) {
        let gpa = translate(mem, sregs, addr, Access::Read, user)?;
        mem.read_slice(&mut buf[offset..offset + n], GuestAddress(gpa))
            .map_err(|_| PageFault {
                addr,
                error_code: PF_RSVD | if user { PF_USER } else { 0 },
            })?;
    }
    Ok(())
}

/// Writes guest-virtual memory page by page. Every page is translated (and checked for
/// write permission) before anything is written, so a fault leaves memory untouched.
pub fn write_virt(
    mem: &impl GuestMemory,
    sregs: &kvm_sregs,
    gva: u64,
    data: &[u8],
    user: bool,
) -> Result<(), PageFault> {
    let mut pieces = Vec::new();
    for (addr, offset, n) in page_chunks(gva, data.len()) {
        pieces.push((
            translate(mem, sregs, addr, Access::Write, user)?,
            offset,
            n,
            addr,
        ));
    }
    for (gpa, offset, n, addr) in pieces {
        mem.write_slice(&data[offset..offset + n], GuestAddress(gpa))
            .map_err(|_| PageFault {
                addr,
                error_code: PF_RSVD | PF_WRITE | if user { PF_USER } else { 0 },
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    /// Maps: 0x20_0000 (2 MiB page, writable) -> 0x40_0000; 0x1000_0000.. (4K pages) where
    /// page 0 -> 0x5000 writable user, page 1 -> 0x6000 read-only, page 2 not present.
    fn setup() -> (GuestMemoryMmap, kvm_sregs) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let w = |addr: u64, val: u64| mem.write_obj(val, GuestAddress(addr)).unwrap();
        w(PML4, PDPT | 0x7);
        w(PDPT, PD | 0x7);
        w(PD + 8, 0x40_0000 | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE);
        w(PD + 8 * 128, PT | 0x7); // 0x1000_0000
        w(PT, 0x5000 | 0x7);
        w(PT + 8, 0x6000 | PTE_PRESENT | PTE_USER);
        let sregs = kvm_sregs {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: PML4,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        (mem, sregs)
    }

    #[test]
    fn walks_huge_and_small_pages_and_sets_accessed_dirty() {
        let (mem, sregs) = setup();
        assert_eq!(
            translate(&mem, &sregs, 0x20_1234, Access::Read, false),
            Ok(0x40_1234)
        );
        assert_eq!(
            translate(&mem, &sregs, 0x1000_0010, Access::Write, true),
            Ok(0x5010)
        );
        let pte: u64 = mem.read_obj(GuestAddress(PT)).unwrap();
        assert_eq!(pte & (PTE_ACCESSED | PTE_DIRTY), PTE_ACCESSED | PTE_DIRTY);
        let pde: u64 = mem.read_obj(GuestAddress(PD + 8)).unwrap();
        assert_eq!(
            pde & (PTE_ACCESSED | PTE_DIRTY),
            PTE_ACCESSED,
            "read: no dirty bit"
        );
    }

    /// Accessed bits are set without losing what another vCPU writes to the entry meanwhile:
    /// here one thread keeps clearing the accessed bit and flipping an available bit (9) of a
    /// PTE, while another walks through it; no flip may be lost.
    #[test]
    fn accessed_bits_never_overwrite_a_concurrent_change() {
        const FLIPS: u32 = 200_000;
        const AVAILABLE: u64 = 1 << 9;
        let (mem, sregs) = setup();
        let before: u64 = mem.read_obj(GuestAddress(PT)).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let _ = translate(&mem, &sregs, 0x1000_0010, Access::Read, true);
                }
            });
            let slice = mem.get_slice(GuestAddress(PT), 8).unwrap();
            let pte = slice.get_atomic_ref::<AtomicU64>(0).unwrap();
            for _ in 0..FLIPS {
                pte.fetch_and(!PTE_ACCESSED, Ordering::SeqCst);
                pte.fetch_xor(AVAILABLE, Ordering::SeqCst);
            }
            done.store(true, Ordering::Relaxed);
        });
        let after: u64 = mem.read_obj(GuestAddress(PT)).unwrap();
        // An even number of flips: bit 9 is back where it was.
        assert_eq!(after & AVAILABLE, before & AVAILABLE, "a flip was lost");
    }

    #[test]
    fn faults_carry_the_cpu_error_code() {
        let (mem, sregs) = setup();
        // Not present, kernel write.
        assert_eq!(
            translate(&mem, &sregs, 0x1000_2000, Access::Write, false),
            Err(PageFault {
                addr: 0x1000_2000,
                error_code: PF_WRITE
            })
        );
        // Read-only page: a kernel write faults with WP set (a COW page must not be written).
        assert_eq!(
            translate(&mem, &sregs, 0x1000_1008, Access::Write, false),
            Err(PageFault {
                addr: 0x1000_1008,
                error_code: PF_PROT | PF_WRITE
            })
        );
        // ...and is writable by the kernel with WP clear.
        let mut no_wp = sregs;
        no_wp.cr0 &= !CR0_WP;
        assert_eq!(
            translate(&mem, &no_wp, 0x1000_1008, Access::Write, false),
            Ok(0x6008)
        );
        // User access to a supervisor page (the 2 MiB one lacks the user bit).
        assert_eq!(
            translate(&mem, &sregs, 0x20_0000, Access::Read, true),
            Err(PageFault {
                addr: 0x20_0000,
                error_code: PF_PROT | PF_USER
            })
        );
    }

    #[test]
    fn hostile_tables_fault_instead_of_panicking() {
        let (mem, mut sregs) = setup();
        sregs.cr3 = 0xffff_f000; // outside guest memory
        assert_eq!(
            translate(&mem, &sregs, 0, Access::Read, false),
            Err(PageFault {
                addr: 0,
                error_code: PF_RSVD
            })
        );
        sregs.efer = 0;
        assert!(translate(&mem, &sregs, 0, Access::Read, false).is_err());
    }

    #[test]
    fn cross_page_accesses_are_all_or_nothing() {
        let (mem, sregs) = setup();
        // Spans pages 0 (writable) and 1 (read-only): nothing may be written.
        let err = write_virt(&mem, &sregs, 0x1000_0ffc, &[0xaa; 8], false).unwrap_err();
        assert_eq!(err.addr, 0x1000_1000);
        let mut probe = [0u8; 4];
        mem.read_slice(&mut probe, GuestAddress(0x5ffc)).unwrap();
        assert_eq!(probe, [0; 4]);
        // Reads across the two pages work and see both.
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x5ffc))
            .unwrap();
        mem.write_slice(&[5, 6, 7, 8], GuestAddress(0x6000))
            .unwrap();
        let mut buf = [0u8; 8];
        read_virt(&mem, &sregs, 0x1000_0ffc, &mut buf, false).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn chunks_split_at_page_boundaries() {
        let chunks: Vec<_> = page_chunks(0xff0, 0x1020).collect();
        assert_eq!(
            chunks,
            vec![
                (0xff0, 0, 0x10),
                (0x1000, 0x10, 0x1000),
                (0x2000, 0x1010, 0x10)
            ]
        );
        assert_eq!(page_chunks(0, 0).count(), 0);
    }
}
