//! Tiny hand-made guests: a few instructions of 64-bit code in a minimal ELF that hull-vmm
//! boots like a `vmlinux`. They make the VMM's boot path, exits and devices testable in
//! milliseconds instead of a kernel boot.

/// Guest-physical address (and entry point) of the code: where a vmlinux loads, 16 MiB.
pub const LOAD_ADDR: u64 = 0x100_0000;

/// A little x86-64 machine-code assembler, just the instructions the tiny guests use.
#[derive(Default, Clone)]
pub struct Asm {
    code: Vec<u8>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    /// `mov dx, port; mov al, byte; out dx, al` for each byte: writes `text` to a port.
    pub fn out_bytes(&mut self, port: u16, text: &[u8]) -> &mut Self {
        let [lo, hi] = port.to_le_bytes();
        self.emit(&[0x66, 0xba, lo, hi]);
        for &b in text {
            self.emit(&[0xb0, b, 0xee]);
        }
        self
    }

    /// `mov rbx, imm64`.
    pub fn mov_rbx(&mut self, value: u64) -> &mut Self {
        self.emit(&[0x48, 0xbb]).emit(&value.to_le_bytes())
    }

    /// `mov rdi, imm64`.
    pub fn mov_rdi(&mut self, value: u64) -> &mut Self {
        self.emit(&[0x48, 0xbf]).emit(&value.to_le_bytes())
    }

    /// `mov rax, imm64`.
    pub fn mov_rax(&mut self, value: u64) -> &mut Self {
        self.emit(&[0x48, 0xb8]).emit(&value.to_le_bytes())
    }

    /// `mov rcx, imm64`.
    pub fn mov_rcx(&mut self, value: u64) -> &mut Self {
        self.emit(&[0x48, 0xb9]).emit(&value.to_le_bytes())
    }

    /// `inc rcx`.
    pub fn inc_rcx(&mut self) -> &mut Self {
        self.emit(&[0x48, 0xff, 0xc1])
    }

    /// `mov [rdi], rcx`.
    pub fn store_rcx_at_rdi(&mut self) -> &mut Self {
        self.emit(&[0x48, 0x89, 0x0f])
    }

    /// `mov rax, [rdi + offset]`.
    pub fn load_rax_from_rdi(&mut self, offset: i8) -> &mut Self {
        self.emit(&[0x48, 0x8b, 0x47, offset as u8])
    }

    /// `test ecx, imm32`.
    pub fn test_ecx(&mut self, mask: u32) -> &mut Self {
        self.emit(&[0xf7, 0xc1]).emit(&mask.to_le_bytes())
    }

    /// `test rax, rax`.
    pub fn test_rax(&mut self) -> &mut Self {
        self.emit(&[0x48, 0x85, 0xc0])
    }

    /// `jnz rel8` over the next `len` bytes.
    pub fn jnz_over(&mut self, len: usize) -> &mut Self {
        let rel = u8::try_from(len)
            .ok()
            .filter(|r| *r < 128)
            .expect("a short jump");
        self.emit(&[0x75, rel])
    }

    /// `jz rel8` back to `offset` in the code (a loop's start, from [`Asm::code`]'s length).
    pub fn jz_back_to(&mut self, offset: usize) -> &mut Self {
        let rel = i8::try_from(offset as i64 - (self.code.len() as i64 + 2)).expect("a short jump");
        self.emit(&[0x74, rel as u8])
    }

    /// `out imm8, al`: one port write (an exit to the VMM).
    pub fn out_al(&mut self, port: u8) -> &mut Self {
        self.emit(&[0xe6, port])
    }

    /// `mov [rdi], rax`.
    pub fn store_rax_at_rdi(&mut self) -> &mut Self {
        self.emit(&[0x48, 0x89, 0x07])
    }

    /// `mov eax, [rbx]`: a 32-bit load (an MMIO read when rbx points at a device).
    pub fn load_eax_from_rbx(&mut self) -> &mut Self {
        self.emit(&[0x8b, 0x03])
    }

    /// `mov [rbx], eax`: a 32-bit store.
    pub fn store_eax_at_rbx(&mut self) -> &mut Self {
        self.emit(&[0x89, 0x03])
    }

    /// A store of the low `width` bytes of rax (1, 2, 4 or 8) at `[rbx]`.
    pub fn store_at_rbx(&mut self, width: u8) -> &mut Self {
        match width {
            1 => self.emit(&[0x88, 0x03]),
            2 => self.emit(&[0x66, 0x89, 0x03]),
            4 => self.emit(&[0x89, 0x03]),
            8 => self.emit(&[0x48, 0x89, 0x03]),
            _ => panic!("no {width}-byte store"),
        }
    }

    /// A load of `width` bytes (1, 2, 4 or 8) from `[rbx]` into rax's low bytes.
    pub fn load_from_rbx(&mut self, width: u8) -> &mut Self {
        match width {
            1 => self.emit(&[0x8a, 0x03]),
            2 => self.emit(&[0x66, 0x8b, 0x03]),
            4 => self.emit(&[0x8b, 0x03]),
            8 => self.emit(&[0x48, 0x8b, 0x03]),
            _ => panic!("no {width}-byte load"),
        }
    }

    /// `mov rbx, addr; mov rax, value; mov [rbx], <width>`: one store of `width` bytes.
    pub fn store(&mut self, addr: u64, value: u64, width: u8) -> &mut Self {
        self.mov_rbx(addr).mov_rax(value).store_at_rbx(width)
    }

    /// Raw machine code, for an instruction no helper here makes.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.emit(bytes)
    }

    /// `jmp rel32` back to `offset` in the code (a loop's start, from [`Asm::code`]'s length).
    pub fn jmp_back_to(&mut self, offset: usize) -> &mut Self {
        let rel = i32::try_from(offset as i64 - (self.code.len() as i64 + 5)).expect("a near jump");
        self.emit(&[0xe9]).emit(&rel.to_le_bytes())
    }

    /// `mov rax, cr3; mov cr3, rax`: flushes the TLB after changing page tables.
    pub fn flush_tlb(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8])
    }

    /// Prints `yes` on the port if `eax == value`, else `no`.
    pub fn report_eax_equals(&mut self, value: u32, port: u16, yes: &[u8], no: &[u8]) -> &mut Self {
        let mut yes_branch = Asm::new();
        yes_branch.out_bytes(port, yes);
        let mut no_branch = Asm::new();
        no_branch.out_bytes(port, no);
        // cmp eax, imm32; jne no; <yes>; jmp end; no: <no>; end:
        self.emit(&[0x3d]).emit(&value.to_le_bytes());
        let jmp_over_no = 2 + no_branch.code.len();
        let yes_len = yes_branch.code.len() + 2;
        assert!(
            yes_len < 128 && jmp_over_no < 128,
            "branch too long for rel8"
        );
        self.emit(&[0x75, yes_len as u8]);
        self.emit(&yes_branch.code);
        self.emit(&[0xeb, no_branch.code.len() as u8]);
        self.emit(&no_branch.code)
    }

    /// Maps the 1 GiB that holds `addr` (above the boot identity map) with 2 MiB identity
    /// pages, using a page directory at guest-physical `pd` and the boot PDPT at 0xa000.
    pub fn identity_map_gib_of(&mut self, addr: u64, pd: u64) -> &mut Self {
        let gib = addr >> 30;
        for i in 0..512u64 {
            let page = (gib << 30) | (i << 21);
            self.mov_rdi(pd + i * 8)
                .mov_rax(page | 0x83)
                .store_rax_at_rdi();
        }
        self.mov_rdi(0xa000 + gib * 8)
            .mov_rax(pd | 0x3)
            .store_rax_at_rdi()
            .flush_tlb()
    }

    /// `mov al, 0xfe; out 0x64, al`: pulses the reset line through the i8042.
    pub fn i8042_reset(&mut self) -> &mut Self {
        self.emit(&[0xb0, 0xfe, 0xe6, 0x64])
    }

    /// `ud2` with no IDT: the CPU cannot deliver #UD and triple-faults.
    pub fn ud2(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x0b])
    }

    /// `int3`: a breakpoint.
    pub fn int3(&mut self) -> &mut Self {
        self.emit(&[0xcc])
    }

    /// `fwait`.
    pub fn fwait(&mut self) -> &mut Self {
        self.emit(&[0x9b])
    }

    /// `iretq`.
    pub fn iretq(&mut self) -> &mut Self {
        self.emit(&[0x48, 0xcf])
    }

    /// `lidt [rdi]`.
    pub fn lidt_at_rdi(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x01, 0x1f])
    }

    /// Installs an IDT at `idt` (with its descriptor at `idt + 0x1000`) whose gate `vector`
    /// is a 64-bit interrupt gate to `handler`.
    pub fn install_idt_gate(&mut self, idt: u64, vector: u8, handler: u64) -> &mut Self {
        let low = (handler & 0xffff)
            | (0x8 << 16) // the boot GDT's code segment
            | (0x8e00 << 32) // present, DPL 0, 64-bit interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        let gate = idt + u64::from(vector) * 16;
        self.mov_rdi(gate).mov_rax(low).store_rax_at_rdi();
        self.mov_rdi(gate + 8)
            .mov_rax(handler >> 32)
            .store_rax_at_rdi();
        let idtr = idt + 0x1000;
        self.mov_rdi(idtr)
            .mov_rax(0xfff | (idt << 16))
            .store_rax_at_rdi();
        self.mov_rdi(idtr + 8).mov_rax(idt >> 48).store_rax_at_rdi();
        self.mov_rdi(idtr).lidt_at_rdi()
    }

    /// Appends `other`'s code.
    pub fn append(&mut self, other: &Asm) -> &mut Self {
        self.emit(&other.code.clone())
    }

    /// `jmp rel8` over the next `len` bytes.
    pub fn jmp_over(&mut self, len: usize) -> &mut Self {
        let rel = u8::try_from(len)
            .ok()
            .filter(|r| *r < 128)
            .expect("a short jump");
        self.emit(&[0xeb, rel])
    }

    /// `hlt; jmp $-1`: stop for good.
    pub fn halt_forever(&mut self) -> &mut Self {
        self.emit(&[0xf4, 0xeb, 0xfd])
    }

    /// The machine code.
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// The program as an ELF image loaded (and entered) at `LOAD_ADDR`.
    pub fn to_elf(&self) -> Vec<u8> {
        elf_image(&self.code, LOAD_ADDR)
    }
}

/// A guest that counts for ever in RCX, storing each count at guest-physical `data`, with a
/// write to port 0x80 every 16th count, until the quadword at `data + 8` is not zero; then it
/// prints `done` on COM1 and resets. Returns it with the guest-physical range of its loop.
pub fn counting_guest(data: u64) -> (Asm, std::ops::Range<u64>) {
    let mut asm = Asm::new();
    asm.mov_rdi(data).mov_rcx(0);
    let top = asm.code().len();
    let mut port_write = Asm::new();
    port_write.out_al(0x80);
    asm.inc_rcx()
        .store_rcx_at_rdi()
        .test_ecx(0xf)
        .jnz_over(port_write.code().len())
        .append(&port_write)
        .load_rax_from_rdi(8)
        .test_rax()
        .jz_back_to(top);
    let end = asm.code().len();
    asm.out_bytes(0x3f8, b"done\n").i8042_reset().halt_forever();
    (asm, LOAD_ADDR + top as u64..LOAD_ADDR + end as u64)
}

/// A minimal ELF64 executable with one loadable segment holding `code` at `addr`.
pub fn elf_image(code: &[u8], addr: u64) -> Vec<u8> {
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    let code_offset = u64::from(EHDR_SIZE + PHDR_SIZE);
    let mut elf = Vec::with_capacity(code_offset as usize + code.len());
    // e_ident: magic, 64-bit, little endian, version 1, System V ABI.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&addr.to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                                // Program header: PT_LOAD, read + execute.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&code_offset.to_le_bytes()); // p_offset
    elf.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_header_is_well_formed() {
        let elf = elf_image(&[0xf4], LOAD_ADDR);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf.len(), 64 + 56 + 1);
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap()),
            LOAD_ADDR
        );
        assert_eq!(elf[120], 0xf4);
    }

    #[test]
    fn branches_skip_the_other_side() {
        let mut asm = Asm::new();
        asm.report_eax_equals(7, 0x3f8, b"Y", b"N");
        let code = asm.code();
        // cmp (5) + jne (2) + yes (4 + 3) + jmp (2) + no (4 + 3)
        assert_eq!(code.len(), 5 + 2 + 7 + 2 + 7);
        assert_eq!(code[6], 9, "jne skips the yes branch and the jmp");
        assert_eq!(code[15], 7, "jmp skips the no branch");
    }

    #[test]
    fn a_backward_jump_lands_on_its_target() {
        let mut asm = Asm::new();
        asm.mov_rcx(0);
        let top = asm.code().len();
        asm.inc_rcx().test_rax().jz_back_to(top);
        let code = asm.code();
        // inc (3) + test (3) + jz (2): back 8 bytes from the end of the jump.
        assert_eq!(&code[code.len() - 2..], &[0x74, (-8i8) as u8]);
    }
}
