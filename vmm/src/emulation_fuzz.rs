//! A byte-driven harness for the PVM emulation assist: the fuzz target `emulation_assist` in
//! `fuzz/` and the seeded random-input test below both run [`run`].
//!
//! Everything here is what a guest controls when the host's emulator gives up: the
//! instruction bytes, the registers, the page tables and the memory behind them. One input:
//! - instruction bytes (mostly XSAVE-family encodings with any prefixes, REX, ModRM, SIB and
//!   displacement, sometimes INT3, FWAIT, XSETBV, XGETBV or anything, cut short or not) go to
//!   `emulation::assist` and `describe`;
//! - for an XSAVE-family instruction, registers (GPRs, RIP, CR0/CR3/CR4/EFER for 4-level
//!   paging, CS.DPL 0 or 3, FS and GS bases) give the operand's linear address through
//!   `memory_operand_address`, usually nudged to a 64-byte boundary;
//! - in 4 MiB of guest memory, page tables map the operand (valid chains usually, with any
//!   present, writable, user and huge bits, leaves outside memory) and then have random entries
//!   overwritten; the operand's area holds an XSAVE image (plausible header, random rest);
//! - `arch::xsave::execute` runs with a random standard-format vCPU state, a fuzz-chosen
//!   `XsaveContext` and the host's `XsaveLayout` or one made from a fuzz-made CPUID, against
//!   the operand through `vstate::xstate::GuestOperand`, as the vCPU does (after the same #UD
//!   and #GP checks);
//! - `arch::paging::translate` on its own for addresses around the operand and anywhere.
//!
//! Checked: no panic; `assist` lengths within the bytes given and 15; a restore that fails
//! leaves the vCPU state as it was; every access stays inside the XSAVE area the layout allows,
//! and a page fault names an address inside the access that faulted, with the write and user
//! bits of that access; `translate` keeps the page offset, and its faults name the address
//! asked for with the access's write and user bits.

use std::sync::OnceLock;

use devices::virtio::fuzz_utils::{Input, XorShift};
use iced_x86::Register;
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::paging::{
    self, Access, PageFault, CR0_PG, EFER_LMA, PAGE_SIZE, PF_USER, PF_WRITE, PTE_HUGE, PTE_PRESENT,
    PTE_WRITABLE,
};
use crate::arch::xsave::{
    self, XsaveContext, XsaveError, XsaveLayout, XsaveMemory, XsaveOp, XCOMP_BV_COMPACTED_FORMAT,
    XSAVE_EXTENDED_REGION_OFFSET, XSAVE_HDR_OFFSET,
};
use crate::emulation::{self, Assist};
use crate::vstate::xstate::{host_layout, GuestOperand};

const MEM_SIZE: u64 = 4 << 20;
/// Page tables come from here up.
const TABLES_BASE: u64 = 0x1000;
const TABLES_END: u64 = 0x8_0000;
/// The operand's pages come from here up.
const DATA_BASE: u64 = 0x10_0000;
/// `struct kvm_xsave`'s region, what `KVM_GET_XSAVE` hands the vCPU.
const STATE_SIZE: usize = 4096;
/// How much of the operand is mapped and filled: more than any area the host layout allows
/// up to AMX (which needs more than the vCPU buffer anyway).
const AREA_SIZE: usize = 8192;
const PTE_USER: u64 = 1 << 2;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PE: u64 = 1 << 0;
const CR0_TS: u64 = 1 << 3;
const CR0_WP: u64 = 1 << 16;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const CPUID_XSAVEC: u32 = 1 << 1;
const FXSAVE_MXCSR: usize = 24;
const MXCSR_INIT: u32 = 0x1f80;
/// The kernel's direct map and text, where a Linux guest's XSAVE areas and code live.
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;

const PREFIXES: [u8; 10] = [0x66, 0xf2, 0xf3, 0x67, 0x64, 0x65, 0x2e, 0x3e, 0x26, 0xf0];
/// (second opcode byte, ModRM reg) of the XSAVE family after 0x0f.
const XSAVE_OPCODES: [(u8, u8); 6] = [
    (0xae, 4), // xsave
    (0xae, 5), // xrstor
    (0xae, 6), // xsaveopt
    (0xc7, 3), // xrstors
    (0xc7, 4), // xsavec
    (0xc7, 5), // xsaves
];

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let bytes = instruction(&mut input);
    check_describe(&bytes);
    let assist = emulation::assist(&bytes);
    let max_len = bytes.len().min(15) as u64;
    match assist {
        Assist::Skip { len }
        | Assist::SkipAndInject { len, .. }
        | Assist::Xsetbv { len }
        | Assist::Xgetbv { len } => {
            assert!(
                (1..=max_len).contains(&len),
                "length {len} for {bytes:02x?}"
            );
        }
        Assist::ExtendedState { op, rex_w, insn } => {
            assert!((1..=max_len).contains(&(insn.len() as u64)));
            extended_state(&mut input, op, rex_w, &insn);
        }
        Assist::Unhandled(unhandled) => {
            let _ = unhandled.to_string();
        }
    }
}

fn check_describe(bytes: &[u8]) {
    let described = emulation::describe(bytes);
    assert!(described.bytes.len() <= bytes.len());
    assert_eq!(&bytes[..described.bytes.len()], &described.bytes[..]);
    let _ = described.to_string();
}

fn instruction(input: &mut Input<'_>) -> Vec<u8> {
    let mut bytes = Vec::new();
    match input.u8() % 16 {
        0 => bytes.extend_from_slice(input.bytes(20)),
        1 => {
            let fixed: &[u8] = input.pick(&[
                &[0xcc][..],
                &[0x9b],
                &[0x0f, 0x01, 0xd0],
                &[0x0f, 0x01, 0xd1],
            ]);
            bytes.extend_from_slice(fixed);
            bytes.extend_from_slice(input.bytes(4));
        }
        _ => {
            for _ in 0..input.below(4) {
                bytes.push(input.pick(&PREFIXES));
            }
            match input.u8() % 4 {
                0 => {}
                1 => bytes.push(0x40 | input.u8() & 0xf),
                _ => bytes.push(0x48),
            }
            let (opcode, reg) = input.pick(&XSAVE_OPCODES);
            let mode = match input.u8() % 16 {
                0 => 3,
                m => m % 3,
            };
            let rm = input.below(8) as u8;
            bytes.extend_from_slice(&[0x0f, opcode, mode << 6 | reg << 3 | rm]);
            // SIB and displacement, as many as the ModRM asks for and maybe more.
            bytes.extend_from_slice(input.bytes(6));
            if input.u8() % 16 == 0 {
                let keep = input.below(bytes.len());
                bytes.truncate(keep);
            }
        }
    }
    bytes
}

/// A register value: zero, small, a direct-map address, kernel text, or anything.
fn register(input: &mut Input<'_>) -> u64 {
    match input.u8() % 8 {
        0 | 1 => 0,
        2 => input.below(0x1000) as u64,
        3 | 4 => DIRECT_MAP + 64 * u64::from(input.u16()),
        5 => KERNEL_TEXT + u64::from(input.u16()),
        6 => 0x7fff_0000_0000 + 64 * u64::from(input.u16()),
        _ => input.u64(),
    }
}

fn registers(input: &mut Input<'_>) -> kvm_regs {
    let text = KERNEL_TEXT + u64::from(input.u16());
    kvm_regs {
        rax: register(input),
        rbx: register(input),
        rcx: register(input),
        rdx: register(input),
        rsi: register(input),
        rdi: register(input),
        rsp: register(input),
        rbp: register(input),
        r8: register(input),
        r9: register(input),
        r10: register(input),
        r11: register(input),
        r12: register(input),
        r13: register(input),
        r14: register(input),
        r15: register(input),
        rip: input.mostly_u64(text, &[0, u64::MAX - 3]),
        rflags: 2,
    }
}

fn gpr_mut(regs: &mut kvm_regs, reg: Register) -> Option<&mut u64> {
    Some(match reg.full_register() {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        Register::RIP => &mut regs.rip,
        _ => return None,
    })
}

fn special_registers(input: &mut Input<'_>, cr3: u64) -> kvm_sregs {
    let mut sregs = kvm_sregs {
        cr0: input.mostly_u64(CR0_PE | CR0_PG | CR0_WP, &[CR0_PE | CR0_PG, CR0_PE, 0]),
        cr3: input.mostly_u64(cr3, &[0, MEM_SIZE, cr3 | 0xfff, u64::MAX]),
        cr4: input.mostly_u64(CR4_PAE | CR4_OSXSAVE, &[CR4_PAE, 0]),
        efer: input.mostly_u64(EFER_LME | EFER_LMA, &[EFER_LME, 0]),
        ..Default::default()
    };
    sregs.cs.dpl = if input.u8() % 4 == 0 { 3 } else { 0 };
    sregs.fs.base = input.mostly_u64(0, &[DIRECT_MAP, 0x7fff_0000_0000, u64::MAX - 63]);
    sregs.gs.base = input.mostly_u64(0, &[DIRECT_MAP + 0x1000, u64::MAX - 63]);
    sregs
}

/// 4-level page tables built in guest memory from the input.
struct Tables {
    next_free: u64,
    pages: Vec<u64>,
    root: u64,
}

impl Tables {
    fn new(mem: &GuestMemoryMmap) -> Option<Self> {
        let mut tables = Self {
            next_free: TABLES_BASE,
            pages: Vec::new(),
            root: 0,
        };
        tables.root = tables.allocate(mem)?;
        Some(tables)
    }

    fn allocate(&mut self, mem: &GuestMemoryMmap) -> Option<u64> {
        if self.next_free >= TABLES_END {
            return None;
        }
        let page = self.next_free;
        self.next_free += PAGE_SIZE;
        mem.write_slice(&[0; PAGE_SIZE as usize], GuestAddress(page))
            .ok()?;
        self.pages.push(page);
        Some(page)
    }

    /// Maps the page of `gva` to `gpa` with a leaf at `level` (0: 4 KiB, 1: 2 MiB, 2: 1 GiB),
    /// reusing the tables already there.
    fn map(
        &mut self,
        mem: &GuestMemoryMmap,
        gva: u64,
        gpa: u64,
        level: u32,
        table_flags: u64,
        leaf_flags: u64,
    ) -> Option<()> {
        let mut table = self.root;
        for walk in (level + 1..4).rev() {
            let at = GuestAddress(table + ((gva >> (12 + 9 * walk)) & 0x1ff) * 8);
            let entry: u64 = mem.read_obj(at).ok()?;
            let next = entry & PTE_ADDR_MASK;
            table = if entry & PTE_PRESENT != 0
                && entry & PTE_HUGE == 0
                && self.pages.contains(&next)
            {
                next
            } else {
                let page = self.allocate(mem)?;
                mem.write_obj(page | table_flags, at).ok()?;
                page
            };
        }
        let at = GuestAddress(table + ((gva >> (12 + 9 * level)) & 0x1ff) * 8);
        let huge = if level > 0 { PTE_HUGE } else { 0 };
        let page_mask = (1u64 << (12 + 9 * level)) - 1;
        mem.write_obj((gpa & !page_mask & PTE_ADDR_MASK) | leaf_flags | huge, at)
            .ok()
    }
}

/// Usually present, writable and user; sometimes without one of them, or anything.
fn pte_flags(input: &mut Input<'_>) -> u64 {
    let usual = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    match input.u8() % 16 {
        0 => usual & !PTE_PRESENT,
        1 => usual & !PTE_WRITABLE,
        2 => usual & !PTE_USER,
        3 => input.u64() & !PTE_ADDR_MASK,
        _ => usual,
    }
}

/// Maps the operand's pages (or not), then overwrites random entries.
fn build_tables(input: &mut Input<'_>, mem: &GuestMemoryMmap, addr: u64) -> u64 {
    let Some(mut tables) = Tables::new(mem) else {
        return 0;
    };
    let first_page = addr & !(PAGE_SIZE - 1);
    let data_page = DATA_BASE + PAGE_SIZE * input.below(0x200) as u64;
    for i in 0..=(AREA_SIZE as u64 / PAGE_SIZE) {
        let gva = first_page.wrapping_add(i * PAGE_SIZE);
        let (level, gpa) = match input.u8() % 16 {
            0 => (0, MEM_SIZE + PAGE_SIZE * input.below(4) as u64),
            1 => (0, input.u64()),
            2 => (1, 0x20_0000),
            3 => (2, 0),
            4 => continue,
            _ => (0, data_page + i * PAGE_SIZE),
        };
        let table_flags = pte_flags(input);
        let leaf_flags = pte_flags(input);
        if tables
            .map(mem, gva, gpa, level, table_flags, leaf_flags)
            .is_none()
        {
            break;
        }
    }
    // A few more mappings anywhere, then random damage.
    for _ in 0..input.below(3) {
        let gva = register(input) & !(PAGE_SIZE - 1);
        let gpa = DATA_BASE + PAGE_SIZE * input.below(0x200) as u64;
        let flags = pte_flags(input);
        let _ = tables.map(mem, gva, gpa, 0, flags, flags);
    }
    for _ in 0..input.below(4) {
        let page = tables.pages[input.below(tables.pages.len())];
        let at = GuestAddress(page + 8 * input.below(512) as u64);
        let Ok(entry) = mem.read_obj::<u64>(at) else {
            continue;
        };
        let damaged = match input.u8() % 8 {
            0 => input.u64(),
            1 => entry ^ PTE_PRESENT,
            2 => entry ^ PTE_WRITABLE,
            3 => entry ^ PTE_USER,
            4 => entry ^ PTE_HUGE,
            5 => (entry & !PTE_ADDR_MASK) | MEM_SIZE,
            6 => tables.root | PTE_PRESENT | PTE_WRITABLE,
            _ => (entry & !PTE_ADDR_MASK) | (input.u64() & PTE_ADDR_MASK),
        };
        let _ = mem.write_obj(damaged, at);
    }
    tables.root
}

/// CPUID leaf 0xd as a fuzz-made CPU would report it: realistic components mostly, any sizes,
/// offsets and flags sometimes.
fn fuzz_layout(input: &mut Input<'_>) -> XsaveLayout {
    let mut table = [[0u32; 4]; 64];
    let supported = match input.u8() % 4 {
        0 => input.u64(),
        _ => 0x7 | input.u64() & 0x6_02e0,
    };
    let xss = match input.u8() % 4 {
        0 => input.u64(),
        _ => input.u64() & 0x1_9900,
    };
    let compaction = if input.u8() % 4 == 0 { 0 } else { CPUID_XSAVEC };
    table[0] = [supported as u32, 0, 0, (supported >> 32) as u32];
    table[1] = [compaction, 0, xss as u32, (xss >> 32) as u32];
    let mut offset = XSAVE_EXTENDED_REGION_OFFSET as u32;
    for (index, entry) in table.iter_mut().enumerate().skip(2) {
        if (supported | xss) & 1 << index == 0 {
            continue;
        }
        let supervisor = xss & 1 << index != 0;
        let size = match input.u8() % 8 {
            0 => input.u32(),
            1 => 0,
            2 => 8,
            _ => 64 * (1 + input.below(16) as u32),
        };
        let at = match input.u8() % 8 {
            0 => input.u32(),
            1 => XSAVE_HDR_OFFSET as u32,
            _ => offset,
        };
        let aligned = u32::from(input.bool()) << 1;
        *entry = [
            size,
            if supervisor { 0 } else { at },
            u32::from(supervisor) | aligned,
            0,
        ];
        if !supervisor {
            offset = offset.wrapping_add(size);
        }
    }
    XsaveLayout::from_cpuid(move |leaf, subleaf| {
        if leaf == 0xd {
            table.get(subleaf as usize).copied().unwrap_or_default()
        } else {
            [0; 4]
        }
    })
}

fn host() -> &'static XsaveLayout {
    static HOST: OnceLock<XsaveLayout> = OnceLock::new();
    HOST.get_or_init(host_layout)
}

/// The components a layout has (bits 0 and 1 always).
fn layout_components(layout: &XsaveLayout) -> u64 {
    (2..63)
        .filter(|&index| layout.component(index).is_some())
        .fold(0b11, |mask, index| mask | 1 << index)
}

/// Random bytes with a plausible XSAVE header and MXCSR, as a kernel's buffer or a vCPU's
/// state would look.
fn xsave_image(input: &mut Input<'_>, len: usize, components: u64, compacted: bool) -> Vec<u8> {
    let mut image = XorShift::new(input.u64()).bytes(len);
    if input.u8() % 8 != 0 {
        image[FXSAVE_MXCSR..FXSAVE_MXCSR + 4].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        image[FXSAVE_MXCSR + 4..FXSAVE_MXCSR + 8].copy_from_slice(&0xffffu32.to_le_bytes());
    }
    if input.u8() % 8 != 0 {
        let xstate_bv = components & input.u64();
        let xcomp_bv = if compacted {
            XCOMP_BV_COMPACTED_FORMAT | (components & input.mostly_u64(u64::MAX, &[]))
        } else {
            0
        };
        let header = &mut image[XSAVE_HDR_OFFSET..XSAVE_EXTENDED_REGION_OFFSET];
        header.fill(0);
        let xstate_bv = if compacted {
            xstate_bv & xcomp_bv
        } else {
            xstate_bv
        };
        header[..8].copy_from_slice(&xstate_bv.to_le_bytes());
        header[8..16].copy_from_slice(&xcomp_bv.to_le_bytes());
    }
    image
}

/// Guest memory at the operand, with every access checked against the area's bounds.
struct CheckedOperand<'a> {
    inner: GuestOperand<'a>,
    base: u64,
    /// Bytes from the operand address the layout lets any instruction touch.
    bound: u64,
    /// The last access: (offset, len, write).
    last: Option<(u64, usize, bool)>,
}

impl CheckedOperand<'_> {
    fn note(&mut self, offset: u64, len: usize, write: bool) {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|end| end <= self.bound),
            "access of {len} bytes at offset {offset:#x}, past the area's {:#x}",
            self.bound
        );
        self.last = Some((offset, len, write));
    }
}

impl XsaveMemory for CheckedOperand<'_> {
    type Fault = PageFault;

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), PageFault> {
        self.note(offset, buf.len(), false);
        self.inner.read(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), PageFault> {
        self.note(offset, data.len(), true);
        self.inner.write(offset, data)
    }
}

fn extended_state(input: &mut Input<'_>, op: XsaveOp, rex_w: bool, insn: &iced_x86::Instruction) {
    let mut regs = registers(input);
    let flags = input.u8();
    // The tables' root is known before they are built: the first table page.
    let mut sregs = special_registers(input, TABLES_BASE);
    let Some(mut addr) = emulation::memory_operand_address(insn, &regs, &sregs) else {
        return;
    };
    if flags & 3 != 0 {
        // Move the base register so that the operand is 64-byte aligned, as a kernel's is.
        let base = if insn.is_ip_rel_memory_operand() {
            Register::RIP
        } else {
            insn.memory_base()
        };
        if let Some(value) = gpr_mut(&mut regs, base) {
            *value = value.wrapping_sub(addr % 64);
            addr = emulation::memory_operand_address(insn, &regs, &sregs).unwrap_or(addr);
        }
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let root = build_tables(input, &mem, addr);
    if sregs.cr3 == TABLES_BASE {
        sregs.cr3 = root;
    }
    let layout = if flags & 4 != 0 {
        fuzz_layout(input)
    } else {
        host().clone()
    };
    let components = layout_components(&layout);
    let (dropped, supervisor) = (input.u64(), input.u64());
    let ctx = XsaveContext {
        xcr0: input.mostly_u64(components & !dropped | 0b11, &[1, 0, u64::MAX]),
        xss: input.mostly_u64(components & supervisor, &[0, u64::MAX]),
        rfbm_request: input.mostly_u64(u64::MAX, &[0, 0b11, 0xffff_ffff, components]),
        addr,
        rex_w,
    };

    // The operand's image, written through a kernel's view of the same tables.
    let compacted = input.u8() % 2 == 0;
    let image = xsave_image(input, AREA_SIZE, components, compacted);
    let kernel = kvm_sregs {
        cr0: sregs.cr0 & !CR0_WP,
        ..sregs
    };
    for (i, chunk) in image.chunks(PAGE_SIZE as usize).enumerate() {
        let gva = addr.wrapping_add((i * PAGE_SIZE as usize) as u64);
        let _ = paging::write_virt(&mem, &kernel, gva, chunk, false);
    }

    // The checks the vCPU makes before it touches any state (`execute_xsave`).
    let runs = sregs.cr4 & CR4_OSXSAVE != 0
        && sregs.cr0 & CR0_TS == 0
        && (layout.supports_compaction()
            || !matches!(op, XsaveOp::Xsavec | XsaveOp::Xsaves | XsaveOp::Xrstors))
        && (sregs.cs.dpl == 0 || !matches!(op, XsaveOp::Xsaves | XsaveOp::Xrstors))
        && layout.standard_size(ctx.xcr0) <= STATE_SIZE;
    if runs {
        let mut state = xsave_image(input, STATE_SIZE, components, false);
        let before = state.clone();
        let bound = layout
            .compacted_format(components & !0b11)
            .map_or(u64::MAX, |format| format.size())
            .max(STATE_SIZE as u64);
        let mut operand = CheckedOperand {
            inner: GuestOperand::new(&mem, &sregs, addr),
            base: addr,
            bound,
            last: None,
        };
        let result = xsave::execute(op, &ctx, &layout, &mut state, &mut operand);
        let restore = matches!(op, XsaveOp::Xrstor | XsaveOp::Xrstors);
        if restore && result.is_err() {
            assert!(state == before, "a failed {op:?} changed the vCPU state");
        }
        if let Err(XsaveError::Memory(fault)) = result {
            check_operand_fault(&operand, &fault, sregs.cs.dpl == 3);
        }
    }

    // The page walk on its own.
    for _ in 0..input.below(8) {
        let gva = match input.u8() % 4 {
            0 => register(input),
            _ => addr.wrapping_add(input.below(AREA_SIZE + 64) as u64),
        };
        let access = if input.bool() {
            Access::Write
        } else {
            Access::Read
        };
        let user = input.bool();
        check_translate(&mem, &sregs, gva, access, user);
    }
}

fn check_operand_fault(operand: &CheckedOperand<'_>, fault: &PageFault, user: bool) {
    let (offset, len, write) = operand.last.expect("a memory fault without an access");
    let start = operand.base.wrapping_add(offset);
    assert!(
        fault.addr.wrapping_sub(start) < len as u64,
        "page fault at {:#x}, outside the access of {len} bytes at {start:#x}",
        fault.addr
    );
    assert_eq!(fault.error_code & PF_WRITE != 0, write, "{fault:?}");
    assert_eq!(fault.error_code & PF_USER != 0, user, "{fault:?}");
}

fn check_translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, gva: u64, access: Access, user: bool) {
    match paging::translate(mem, sregs, gva, access, user) {
        Ok(gpa) => {
            assert_eq!(gpa & (PAGE_SIZE - 1), gva & (PAGE_SIZE - 1));
            if sregs.cr0 & CR0_PG == 0 {
                assert_eq!(gpa, gva);
            }
        }
        Err(fault) => {
            assert_eq!(fault.addr, gva);
            assert_eq!(fault.error_code & PF_WRITE != 0, access == Access::Write);
            assert_eq!(fault.error_code & PF_USER != 0, user);
            assert!(sregs.cr0 & CR0_PG != 0, "a fault without paging");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::fuzz_utils::run_seeded;

    /// Random instructions, registers, page tables and images.
    #[test]
    fn random_instructions_fault_instead_of_panicking() {
        run_seeded(0x7873_6176_6521, 3000, 512, run);
    }
}
