//! The emulation assist: what hull-vmm does when a PVM host's instruction emulator gives up.
//!
//! On PVM the guest kernel's code is emulated, and the emulator stops with
//! `KVM_EXIT_INTERNAL_ERROR` (suberror `KVM_INTERNAL_ERROR_EMULATION`) on a few instructions,
//! handing the VMM the instruction bytes. The ones a Linux guest executes are completed here:
//! - `INT3`, from the kernel's self test and from live code patching (static keys, alternatives)
//!   on the timer tick: step over it and inject the breakpoint exception (vector 3), so the
//!   kernel's `#BP` handler sees exactly what the CPU would have delivered;
//! - `FWAIT`, executed once per task exit: with no x87 exception pending it does nothing, so
//!   step over it.
//!
//! - the XSAVE family (XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS) and XSETBV/XGETBV,
//!   which the guest kernel runs on every context switch once it may use XSAVE: decoded here,
//!   executed by the vCPU against its `KVM_GET_XSAVE` state (see `arch::xsave`).
//!
//! Anything else ends the VM with a message naming the instruction. Deciding is one plain
//! function so each case is unit-tested without KVM.

use std::fmt;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::xsave::XsaveOp;

/// Vector of the breakpoint exception (`#BP`).
pub const BP_VECTOR: u8 = 3;

/// What to do about an instruction the host could not emulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assist {
    /// Advance RIP by `len` and resume.
    Skip { len: u64 },
    /// Advance RIP by `len` and inject exception `vector` (a trap: RIP points past it).
    SkipAndInject { len: u64, vector: u8 },
    /// An XSAVE-family instruction with its memory operand: execute it, then advance RIP.
    ExtendedState {
        op: XsaveOp,
        /// The REX.W (64-bit) form, which stores the 64-bit FPU instruction and data pointers.
        rex_w: bool,
        insn: Box<Instruction>,
    },
    /// XSETBV: write XCR[ECX] from EDX:EAX.
    Xsetbv { len: u64 },
    /// XGETBV: read XCR[ECX] into EDX:EAX.
    Xgetbv { len: u64 },
    /// hull cannot complete this instruction; the VM must stop.
    Unhandled(UnhandledInstruction),
}

/// An instruction neither the host nor hull can execute for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnhandledInstruction {
    /// The decoded mnemonic, or `None` when the bytes do not decode.
    pub mnemonic: Option<String>,
    /// The raw bytes the host handed over.
    pub bytes: Vec<u8>,
}

impl fmt::Display for UnhandledInstruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mnemonic {
            Some(m) => write!(f, "{m}")?,
            None => f.write_str("an undecodable instruction")?,
        }
        f.write_str(" (bytes")?;
        for b in &self.bytes {
            write!(f, " {b:02x}")?;
        }
        f.write_str(")")
    }
}

/// Decodes the first instruction in `bytes` for a diagnostic message.
pub fn describe(bytes: &[u8]) -> UnhandledInstruction {
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return UnhandledInstruction {
            mnemonic: None,
            bytes: bytes.to_vec(),
        };
    }
    UnhandledInstruction {
        mnemonic: Some(format!("{:?}", insn.mnemonic()).to_lowercase()),
        bytes: bytes[..insn.len().min(bytes.len())].to_vec(),
    }
}

/// Decides how to complete the instruction whose bytes the emulator could not run.
pub fn assist(bytes: &[u8]) -> Assist {
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Assist::Unhandled(describe(bytes));
    }
    let len = insn.len() as u64;
    let xstate = |op, rex_w| Assist::ExtendedState {
        op,
        rex_w,
        insn: Box::new(insn),
    };
    match insn.code() {
        Code::Int3 => Assist::SkipAndInject {
            len,
            vector: BP_VECTOR,
        },
        Code::Wait => Assist::Skip { len },
        Code::Xsave_mem => xstate(XsaveOp::Xsave, false),
        Code::Xsave64_mem => xstate(XsaveOp::Xsave, true),
        Code::Xsaveopt_mem => xstate(XsaveOp::Xsaveopt, false),
        Code::Xsaveopt64_mem => xstate(XsaveOp::Xsaveopt, true),
        Code::Xsavec_mem => xstate(XsaveOp::Xsavec, false),
        Code::Xsavec64_mem => xstate(XsaveOp::Xsavec, true),
        Code::Xsaves_mem => xstate(XsaveOp::Xsaves, false),
        Code::Xsaves64_mem => xstate(XsaveOp::Xsaves, true),
        Code::Xrstor_mem => xstate(XsaveOp::Xrstor, false),
        Code::Xrstor64_mem => xstate(XsaveOp::Xrstor, true),
        Code::Xrstors_mem => xstate(XsaveOp::Xrstors, false),
        Code::Xrstors64_mem => xstate(XsaveOp::Xrstors, true),
        Code::Xsetbv => Assist::Xsetbv { len },
        Code::Xgetbv => Assist::Xgetbv { len },
        _ => Assist::Unhandled(describe(bytes)),
    }
}

/// The value of a general-purpose register an address can use (64- or 32-bit).
fn gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    let full = reg.full_register();
    let value = match full {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RSP => regs.rsp,
        Register::RBP => regs.rbp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        _ => return None,
    };
    // A 32-bit address register (address-size prefix) is zero-extended.
    Some(if reg.is_gpr32() {
        value & 0xffff_ffff
    } else {
        value
    })
}

/// The linear address of `insn`'s memory operand, decoded at `regs.rip`: base, index, scale
/// and displacement from the registers, plus the FS or GS base for those segment overrides
/// (the other segments have base 0 in 64-bit mode).
pub fn memory_operand_address(
    insn: &Instruction,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Option<u64> {
    let operand = (0..insn.op_count()).find(|&i| insn.op_kind(i) == OpKind::Memory)?;
    if insn.is_ip_rel_memory_operand() {
        // Decoded at IP 0 (`assist`): the target iced computed is the next instruction's
        // offset plus the displacement, relative to the instruction's real RIP.
        let segment = match insn.memory_segment() {
            Register::FS => sregs.fs.base,
            Register::GS => sregs.gs.base,
            _ => 0,
        };
        return Some(segment.wrapping_add(regs.rip.wrapping_add(insn.ip_rel_memory_address())));
    }
    insn.virtual_address(operand, 0, |reg, _, _| match reg {
        Register::FS => Some(sregs.fs.base),
        Register::GS => Some(sregs.gs.base),
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        other => gpr(regs, other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_steps_over_and_injects_a_breakpoint() {
        // The emulator hands over up to 15 bytes: the INT3 and whatever follows it.
        assert_eq!(
            assist(&[0xcc, 0x0f, 0x1f, 0x44, 0x00, 0x00]),
            Assist::SkipAndInject { len: 1, vector: 3 }
        );
    }

    #[test]
    fn fwait_is_stepped_over() {
        assert_eq!(assist(&[0x9b, 0xc3]), Assist::Skip { len: 1 });
    }

    #[test]
    fn xsave_family_is_decoded_with_its_operand() {
        let regs = kvm_regs {
            rdi: 0xffff_8880_0123_4000,
            rax: 0x10,
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            gs: kvm_bindings::kvm_segment {
                base: 0xffff_8880_7fc0_0000,
                ..Default::default()
            },
            ..Default::default()
        };
        // (bytes, op, rex_w, operand address)
        let cases: [(&[u8], XsaveOp, bool, u64); 8] = [
            // xsave [rip+0x100]: relative to the instruction's end at its real RIP
            (
                &[0x0f, 0xae, 0x25, 0x00, 0x01, 0, 0],
                XsaveOp::Xsave,
                false,
                regs.rip + 7 + 0x100,
            ),
            // xrstor [gs:rip-0x10]
            (
                &[0x65, 0x0f, 0xae, 0x2d, 0xf0, 0xff, 0xff, 0xff],
                XsaveOp::Xrstor,
                false,
                sregs.gs.base.wrapping_add(regs.rip + 8 - 0x10),
            ),
            (&[0x48, 0x0f, 0xae, 0x27], XsaveOp::Xsave, true, regs.rdi), // xsave64 [rdi]
            (&[0x48, 0x0f, 0xae, 0x2f], XsaveOp::Xrstor, true, regs.rdi), // xrstor64 [rdi]
            (&[0x48, 0x0f, 0xc7, 0x2f], XsaveOp::Xsaves, true, regs.rdi), // xsaves64 [rdi]
            (&[0x48, 0x0f, 0xc7, 0x1f], XsaveOp::Xrstors, true, regs.rdi), // xrstors64 [rdi]
            (
                &[0x48, 0x0f, 0xae, 0x77, 0x40],
                XsaveOp::Xsaveopt,
                true,
                regs.rdi + 0x40,
            ),
            // xsavec [gs:rax*2+8]: a segment override, an index, a 32-bit form
            (
                &[0x65, 0x0f, 0xc7, 0x24, 0x45, 0x08, 0, 0, 0],
                XsaveOp::Xsavec,
                false,
                sregs.gs.base + 0x28,
            ),
        ];
        for (bytes, op, rex_w, addr) in cases {
            let Assist::ExtendedState {
                op: got,
                rex_w: w,
                insn,
            } = assist(bytes)
            else {
                panic!("{bytes:x?} not decoded as an XSAVE-family instruction");
            };
            assert_eq!((got, w), (op, rex_w), "{bytes:x?}");
            assert_eq!(insn.len(), bytes.len());
            assert_eq!(
                memory_operand_address(&insn, &regs, &sregs),
                Some(addr),
                "{bytes:x?}"
            );
        }
        assert_eq!(assist(&[0x0f, 0x01, 0xd1]), Assist::Xsetbv { len: 3 });
        assert_eq!(assist(&[0x0f, 0x01, 0xd0]), Assist::Xgetbv { len: 3 });
    }

    #[test]
    fn other_instructions_are_named() {
        // fxrstor64 [rdi]
        let Assist::Unhandled(insn) = assist(&[0x48, 0x0f, 0xae, 0x0f]) else {
            panic!("fxrstor is not assisted");
        };
        assert_eq!(insn.to_string(), "fxrstor64 (bytes 48 0f ae 0f)");
        // popcnt rax, rbx; the trailing byte is not part of the instruction.
        let Assist::Unhandled(insn) = assist(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3, 0x90]) else {
            panic!("popcnt must not be assisted");
        };
        assert_eq!(insn.to_string(), "popcnt (bytes f3 48 0f b8 c3)");
    }

    #[test]
    fn garbage_and_nothing_are_unhandled_not_a_panic() {
        assert_eq!(
            assist(&[]),
            Assist::Unhandled(UnhandledInstruction {
                mnemonic: None,
                bytes: vec![]
            })
        );
        let Assist::Unhandled(insn) = assist(&[0x06]) else {
            panic!("invalid opcode must be unhandled");
        };
        assert!(insn.to_string().starts_with("an undecodable instruction"));
    }
}
