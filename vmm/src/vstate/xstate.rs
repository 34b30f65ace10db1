//! Executes the XSAVE family and XSETBV/XGETBV for a vCPU whose host refused to (PVM).
//!
//! The vCPU's extended state comes from `KVM_GET_XSAVE` (standard format), XCR0 from
//! `KVM_GET_XCRS`, IA32_XSS from `KVM_GET_MSRS`; the memory operand is reached through the
//! guest's page tables (`arch::paging`); the architectural work is `arch::xsave`. A fault the
//! CPU would raise (#GP for a bad header or alignment, #PF for an unmapped or read-only page)
//! is injected into the guest with RIP left on the instruction, as the CPU would.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use crate::arch::paging::{self, PageFault};
use crate::arch::xsave::{self, XsaveContext, XsaveError, XsaveLayout, XsaveMemory, XsaveOp};
use crate::emulation::memory_operand_address;

/// `MSR_IA32_XSS`: the supervisor state components XSAVES/XRSTORS manage.
const MSR_IA32_XSS: u32 = 0xda0;
/// Vector of the invalid-opcode exception.
pub const UD_VECTOR: u8 = 6;
/// Vector of the device-not-available exception.
pub const NM_VECTOR: u8 = 7;
const CR0_TS: u64 = 1 << 3;
const CR4_OSXSAVE: u64 = 1 << 18;
/// Vector of the general-protection exception.
pub const GP_VECTOR: u8 = 13;
/// Vector of the page-fault exception.
pub const PF_VECTOR: u8 = 14;
/// Size of `struct kvm_xsave`'s region: the standard-format XSAVE area KVM exchanges.
const KVM_XSAVE_SIZE: usize = 4096;

/// What the vCPU must do after an extended-state instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done: advance RIP past the instruction.
    Completed,
    /// Raise this fault; RIP stays on the instruction.
    Fault {
        vector: u8,
        error_code: Option<u32>,
        /// CR2 for a page fault.
        cr2: Option<u64>,
    },
}

fn fault(vector: u8, error_code: Option<u32>) -> Outcome {
    Outcome::Fault {
        vector,
        error_code,
        cr2: None,
    }
}

/// Why the instruction could not be executed at all (the VM must stop).
#[derive(Debug, thiserror::Error)]
pub enum XstateError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The memory operand could not be decoded.
    #[error("cannot compute the memory operand's address")]
    Operand,
    /// The architectural core refused the layout or state.
    #[error("{0}")]
    Unsupported(String),
}

/// The XSAVE layout of the CPU the guest runs on. On a PVM host the guest reads the host's
/// CPUID, so the VMM's own CPUID is exactly what the guest kernel laid its buffers out by.
pub fn host_layout() -> XsaveLayout {
    XsaveLayout::from_cpuid(|leaf, subleaf| {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    })
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> XstateError {
    move |source| XstateError::Kvm { what, source }
}

/// The memory operand as seen from the instruction's privilege level.
pub(crate) struct GuestOperand<'a> {
    memory: &'a GuestMemoryMmap,
    sregs: &'a kvm_sregs,
    base: u64,
    user: bool,
}

impl<'a> GuestOperand<'a> {
    /// The operand at linear address `base`, reached through the page tables `sregs` name,
    /// with user-mode permission checks when the instruction runs at CPL 3.
    pub(crate) fn new(memory: &'a GuestMemoryMmap, sregs: &'a kvm_sregs, base: u64) -> Self {
        Self {
            memory,
            sregs,
            base,
            user: sregs.cs.dpl == 3,
        }
    }
}

impl XsaveMemory for GuestOperand<'_> {
    type Fault = PageFault;

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), PageFault> {
        paging::read_virt(
            self.memory,
            self.sregs,
            self.base.wrapping_add(offset),
            buf,
            self.user,
        )
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), PageFault> {
        paging::write_virt(
            self.memory,
            self.sregs,
            self.base.wrapping_add(offset),
            data,
            self.user,
        )
    }
}

fn xcr0(fd: &VcpuFd) -> Result<u64, XstateError> {
    let xcrs = fd.get_xcrs().map_err(kvm("cannot read XCRs"))?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    Ok(xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value))
}

fn xss(fd: &VcpuFd) -> u64 {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_XSS,
        ..Default::default()
    }]) else {
        return 0;
    };
    match fd.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice()[0].data,
        // Without XSAVES support there is no IA32_XSS: no supervisor state.
        _ => 0,
    }
}

fn state_bytes(region: &[u32; 1024]) -> [u8; KVM_XSAVE_SIZE] {
    let mut bytes = [0u8; KVM_XSAVE_SIZE];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(region) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

fn state_words(bytes: &[u8; KVM_XSAVE_SIZE], region: &mut [u32; 1024]) {
    for (word, chunk) in region.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

/// Executes an XSAVE-family instruction decoded as `insn` at `regs.rip`.
pub fn execute_xsave(
    fd: &VcpuFd,
    memory: &GuestMemoryMmap,
    layout: &XsaveLayout,
    op: XsaveOp,
    rex_w: bool,
    insn: &iced_x86::Instruction,
    regs: &kvm_regs,
) -> Result<Outcome, XstateError> {
    let sregs = fd
        .get_sregs()
        .map_err(kvm("cannot read special registers"))?;
    // The checks the CPU makes before touching any state (SDM Vol. 1, 13.7-13.12).
    if sregs.cr4 & CR4_OSXSAVE == 0
        || (matches!(op, XsaveOp::Xsavec | XsaveOp::Xsaves | XsaveOp::Xrstors)
            && !layout.supports_compaction())
    {
        return Ok(fault(UD_VECTOR, None));
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(fault(NM_VECTOR, None));
    }
    if matches!(op, XsaveOp::Xsaves | XsaveOp::Xrstors) && sregs.cs.dpl != 0 {
        return Ok(fault(GP_VECTOR, Some(0)));
    }
    let xcr0 = xcr0(fd)?;
    let needed = layout.standard_size(xcr0);
    if needed > KVM_XSAVE_SIZE {
        return Err(XstateError::Unsupported(format!(
            "the extended state for XCR0 {xcr0:#x} needs {needed} bytes, \
             more than KVM_GET_XSAVE's {KVM_XSAVE_SIZE}"
        )));
    }
    let addr = memory_operand_address(insn, regs, &sregs).ok_or(XstateError::Operand)?;
    let ctx = XsaveContext {
        xcr0,
        xss: xss(fd),
        rfbm_request: (regs.rdx << 32) | (regs.rax & 0xffff_ffff),
        addr,
        rex_w,
    };
    let mut kvm_state = fd
        .get_xsave()
        .map_err(kvm("cannot read the extended state"))?;
    let mut state = state_bytes(&kvm_state.region);
    let mut operand = GuestOperand::new(memory, &sregs, addr);
    match xsave::execute(op, &ctx, layout, &mut state, &mut operand) {
        Ok(()) => {
            if matches!(op, XsaveOp::Xrstor | XsaveOp::Xrstors) {
                state_words(&state, &mut kvm_state.region);
                // SAFETY: KVM reads at most the standard-format size of the enabled features,
                // checked above to fit the 4096-byte `kvm_xsave` we pass; `kvm_state` is a
                // complete struct read from this vCPU with only its region changed.
                unsafe { fd.set_xsave(&kvm_state) }
                    .map_err(kvm("cannot set the extended state"))?;
            }
            Ok(Outcome::Completed)
        }
        Err(XsaveError::GeneralProtection(why)) => {
            log::debug!("{op:?} at {:#x}: #GP: {why}", regs.rip);
            Ok(fault(GP_VECTOR, Some(0)))
        }
        Err(XsaveError::Memory(pf)) => Ok(Outcome::Fault {
            vector: PF_VECTOR,
            error_code: Some(pf.error_code),
            cr2: Some(pf.addr),
        }),
        Err(other) => Err(XstateError::Unsupported(format!("{op:?}: {other}"))),
    }
}

/// The faults XSETBV and XGETBV raise before they touch anything (SDM Vol. 2, XSETBV and
/// XGETBV): #UD without CR4.OSXSAVE, and for XSETBV #GP(0) outside ring 0, where it is
/// privileged.
fn xcr_access_fault(sregs: &kvm_sregs, set: bool) -> Option<Outcome> {
    if sregs.cr4 & CR4_OSXSAVE == 0 {
        return Some(fault(UD_VECTOR, None));
    }
    if set && sregs.cs.dpl != 0 {
        return Some(fault(GP_VECTOR, Some(0)));
    }
    None
}

/// XSETBV: sets XCR[ECX] to EDX:EAX; KVM validates the value (#GP if it refuses).
pub fn execute_xsetbv(fd: &VcpuFd, regs: &kvm_regs) -> Result<Outcome, XstateError> {
    let sregs = fd
        .get_sregs()
        .map_err(kvm("cannot read special registers"))?;
    if let Some(fault) = xcr_access_fault(&sregs, true) {
        return Ok(fault);
    }
    let mut xcrs = fd.get_xcrs().map_err(kvm("cannot read XCRs"))?;
    let index = (regs.rcx & 0xffff_ffff) as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
    xcrs.nr_xcrs = 1;
    xcrs.xcrs[0].xcr = index;
    xcrs.xcrs[0].value = value;
    Ok(match fd.set_xcrs(&xcrs) {
        Ok(()) => Outcome::Completed,
        Err(_) => fault(GP_VECTOR, Some(0)),
    })
}

/// XGETBV: reads XCR[ECX] into EDX:EAX; only XCR0 exists here (#GP otherwise).
pub fn execute_xgetbv(fd: &VcpuFd, regs: &mut kvm_regs) -> Result<Outcome, XstateError> {
    let sregs = fd
        .get_sregs()
        .map_err(kvm("cannot read special registers"))?;
    if let Some(fault) = xcr_access_fault(&sregs, false) {
        return Ok(fault);
    }
    if regs.rcx & 0xffff_ffff != 0 {
        return Ok(fault(GP_VECTOR, Some(0)));
    }
    let value = xcr0(fd)?;
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    Ok(Outcome::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsetbv_is_privileged_and_both_need_osxsave() {
        let mut sregs = kvm_sregs::default();
        let is = |outcome: Option<Outcome>, vector: u8| matches!(outcome, Some(Outcome::Fault { vector: v, .. }) if v == vector);
        // CR4.OSXSAVE clear: #UD for both, at any privilege.
        assert!(is(xcr_access_fault(&sregs, true), UD_VECTOR));
        assert!(is(xcr_access_fault(&sregs, false), UD_VECTOR));
        sregs.cr4 |= CR4_OSXSAVE;
        assert!(xcr_access_fault(&sregs, true).is_none());
        assert!(xcr_access_fault(&sregs, false).is_none());
        // Guest user mode: XSETBV is #GP(0), XGETBV is allowed.
        sregs.cs.dpl = 3;
        assert!(matches!(
            xcr_access_fault(&sregs, true),
            Some(Outcome::Fault {
                vector: GP_VECTOR,
                error_code: Some(0),
                ..
            })
        ));
        assert!(xcr_access_fault(&sregs, false).is_none());
    }

    #[test]
    fn kvm_region_round_trips_as_little_endian_bytes() {
        let mut region = [0u32; 1024];
        region[0] = 0x0403_0201;
        region[128] = 0xdead_beef; // XSTATE_BV's low half, at byte 512
        let bytes = state_bytes(&region);
        assert_eq!(&bytes[..4], &[1, 2, 3, 4]);
        assert_eq!(&bytes[512..516], &0xdead_beefu32.to_le_bytes());
        let mut back = [0u32; 1024];
        state_words(&bytes, &mut back);
        assert_eq!(back, region);
    }
}
