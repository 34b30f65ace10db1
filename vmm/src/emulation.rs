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
//! Anything else ends the VM with a message naming the instruction. This is one plain function
//! so each case is unit-tested without KVM.

use std::fmt;

use iced_x86::{Code, Decoder, DecoderOptions};

/// Vector of the breakpoint exception (`#BP`).
pub const BP_VECTOR: u8 = 3;

/// What to do about an instruction the host could not emulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assist {
    /// Advance RIP by `len` and resume.
    Skip { len: u64 },
    /// Advance RIP by `len` and inject exception `vector` (a trap: RIP points past it).
    SkipAndInject { len: u64, vector: u8 },
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
    match insn.code() {
        Code::Int3 => Assist::SkipAndInject {
            len,
            vector: BP_VECTOR,
        },
        Code::Wait => Assist::Skip { len },
        _ => Assist::Unhandled(describe(bytes)),
    }
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
    fn other_instructions_are_named() {
        // xrstor64 [rdi]
        let Assist::Unhandled(insn) = assist(&[0x48, 0x0f, 0xae, 0x2f]) else {
            panic!("xrstor must not be assisted yet");
        };
        assert_eq!(insn.to_string(), "xrstor64 (bytes 48 0f ae 2f)");
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
