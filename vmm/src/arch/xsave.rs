//! The XSAVE family (XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS) executed on behalf of a
//! vCPU, as the Intel SDM Vol. 1 chapter 13 ("Managing State Using the XSAVE Feature Set")
//! specifies them.
//!
//! Why this exists: on a PVM host the guest kernel's kernel-mode instructions run in KVM's
//! instruction emulator, which refuses the XSAVE family and exits with
//! `KVM_EXIT_INTERNAL_ERROR`. Without XSAVE the guest kernel switches only the FXSAVE image
//! between tasks and user-space AVX state leaks from one process into another (DESIGN.md, "This
//! host: KVM is PVM"). The vCPU glue decodes the instruction, translates its memory operand,
//! fetches the extended state with `KVM_GET_XSAVE` and calls [`execute`]; afterwards it stores
//! the state back with `KVM_SET_XSAVE` or injects the fault. This module is the architectural
//! core only: it knows no ioctl, page table or decoder, so each SDM rule has a unit test with
//! made-up state and memory.
//!
//! The vCPU state is the `KVM_GET_XSAVE` buffer: the standard (non-compacted) format with the
//! 64-bit (REX.W) legacy region, XSTATE_BV at byte 512, XCOMP_BV 0 and every user component at
//! its CPUID standard offset. Its XSTATE_BV is read the way XRSTOR reads it: a clear bit means
//! the component is in its initial configuration, whatever bytes the kernel left behind it.
//!
//! Freedoms the SDM leaves, and what this module picks:
//! - XINUSE (SDM 13.6) is "the component's bit is set in the vCPU's XSTATE_BV and its value is
//!   not the initial one". XINUSE\[1\] is also set when MXCSR is not 1F80H: the compacted form of
//!   XRSTOR resets MXCSR when XSTATE_BV\[1\] = 0, so a non-default MXCSR must travel with the bit
//!   set (the SDM allows XINUSE\[i\] = 1 for any component).
//! - XSAVEOPT, XSAVEC and XSAVES use the init optimization; none uses the modified optimization
//!   (SDM 13.9, 13.11: writing a component is always allowed).
//! - Supervisor components (IA32_XSS) have no place in the `KVM_GET_XSAVE` buffer, so XSAVES
//!   saves them as being in their initial configuration and XRSTORS accepts them only in it.
//! - The instruction is assumed to run in 64-bit mode (CS.L = 1): the only code this serves is
//!   the 64-bit guest kernel, so XMM8-15 and the upper halves of YMM8-15 are always included.
//!
//! Everything that comes from the guest (memory, header fields, EDX:EAX, XCR0) and the CPUID
//! layout itself is treated as hostile: bad values end in `#GP` or an error, never in a panic.

use std::ops::Range;

use thiserror::Error;

/// Size of the legacy region, the FXSAVE image (SDM 13.4.1).
pub const XSAVE_LEGACY_REGION_SIZE: usize = 512;
/// Offset of the XSAVE header (SDM 13.4.2).
pub const XSAVE_HDR_OFFSET: usize = XSAVE_LEGACY_REGION_SIZE;
/// Size of the XSAVE header.
pub const XSAVE_HDR_SIZE: usize = 64;
/// Where the extended region, state components 2 and up, begins (SDM 13.4.3).
pub const XSAVE_EXTENDED_REGION_OFFSET: usize = XSAVE_HDR_OFFSET + XSAVE_HDR_SIZE;
/// Every XSAVE-family instruction raises #GP for an operand not aligned to this.
pub const XSAVE_AREA_ALIGNMENT: u64 = 64;

/// State component numbers and bitmap masks (SDM 13.1), named as in Linux's `asm/fpu/types.h`.
pub const XFEATURE_FP: usize = 0;
pub const XFEATURE_SSE: usize = 1;
pub const XFEATURE_YMM: usize = 2;
pub const XFEATURE_MASK_FP: u64 = 1 << XFEATURE_FP;
pub const XFEATURE_MASK_SSE: u64 = 1 << XFEATURE_SSE;
pub const XFEATURE_MASK_YMM: u64 = 1 << XFEATURE_YMM;
/// Components are numbered 0 to 62; bit 63 of a state-component bitmap never names one.
pub const XFEATURE_MAX: usize = 63;
/// XCOMP_BV\[63\]: the area is in the compacted format (SDM 13.4.2).
pub const XCOMP_BV_COMPACTED_FORMAT: u64 = 1 << 63;
const XFEATURE_MASK_ALL: u64 = !XCOMP_BV_COMPACTED_FORMAT;

const CPUID_LEAF_XSTATE: u32 = 0xd;
/// CPUID.(EAX=0DH,ECX=1):EAX\[1\]: XSAVEC and the compacted form of XRSTOR exist.
const CPUID_XSTATE_XSAVEC: u32 = 1 << 1;
/// CPUID.(EAX=0DH,ECX=i):ECX\[0\]: component i is a supervisor (IA32_XSS) component.
const CPUID_XSTATE_SUPERVISOR: u32 = 1 << 0;
/// CPUID.(EAX=0DH,ECX=i):ECX\[1\]: component i is 64-byte aligned in the compacted format.
const CPUID_XSTATE_ALIGNED: u32 = 1 << 1;

// Legacy region (SDM Table 13-1), 64-bit format.
/// FCW, FSW, abridged FTW, FOP, FIP and FDP.
const X87_ENVIRONMENT: Range<usize> = 0..24;
/// ST0-ST7, 16 bytes each.
const X87_REGISTERS: Range<usize> = 32..160;
/// MXCSR and MXCSR_MASK.
const MXCSR_FIELDS: Range<usize> = 24..32;
const FXSAVE_MXCSR: usize = 24;
const FXSAVE_MXCSR_MASK: usize = 28;
/// XMM0-XMM15.
const SSE_REGISTERS: Range<usize> = 160..416;
/// In the 32-bit format these bytes of the x87 environment hold FCS and FDS (plus two unused
/// bytes each) instead of FIP\[63:32\] and FDP\[63:32\] (SDM 13.5.1).
const FIP_HIGH: Range<usize> = 12..16;
const FDP_HIGH: Range<usize> = 20..24;
const X87_ENVIRONMENT_SIZE: usize = 24;
const X87_REGISTERS_SIZE: usize = 128;
const SSE_REGISTERS_SIZE: usize = 256;

// XSAVE header fields, as offsets inside the header.
const HDR_XSTATE_BV: usize = 0;
const HDR_XCOMP_BV: usize = 8;
/// The standard form of XRSTOR requires bytes 23:8 of the header to be zero (SDM 13.8.1).
const HDR_STANDARD_MBZ: Range<usize> = 8..24;
/// The compacted form requires bytes 63:16 to be zero (SDM 13.8.2).
const HDR_COMPACTED_MBZ: Range<usize> = 16..64;

/// Initial x87 control word (SDM 13.6); every other x87 field starts at 0 (an abridged tag
/// word of 0 means every register is empty).
const FCW_INIT: u16 = 0x037f;
/// MXCSR after reset, and what the compacted form of XRSTOR loads when XSTATE_BV\[1\] = 0.
const MXCSR_INIT: u32 = 0x1f80;
/// The MXCSR_MASK that a zero MXCSR_MASK field stands for (SDM Vol. 1 11.6.6).
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;
/// Largest component size accepted from CPUID. The largest real one (AMX tile data) is 8 KiB;
/// the cap keeps a corrupt layout from making us allocate gigabytes.
const MAX_COMPONENT_SIZE: u32 = 1 << 20;

/// What goes wrong while executing an XSAVE-family instruction.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum XsaveError<F> {
    /// The guest gets #GP(0); the message is for a debug log.
    #[error("general protection fault: {0}")]
    GeneralProtection(&'static str),
    /// Guest memory could not be accessed; the glue's own fault, passed through unchanged.
    #[error("guest memory access to the xsave area faulted")]
    Memory(F),
    /// The layout or the vCPU buffer cannot represent a component the instruction needs.
    #[error("state component {component}: {reason}")]
    Unsupported {
        component: usize,
        reason: &'static str,
    },
    /// The vCPU buffer is shorter than the layout says the state is.
    #[error("vcpu xsave buffer of {len} bytes is too small, need {needed}")]
    StateTooSmall { len: usize, needed: usize },
}

/// The instruction to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsaveOp {
    Xsave,
    Xsaveopt,
    Xsavec,
    Xsaves,
    Xrstor,
    Xrstors,
}

impl XsaveOp {
    /// XSAVES and XRSTORS also manage the supervisor components enabled in IA32_XSS.
    fn manages_supervisor_state(self) -> bool {
        matches!(self, Self::Xsaves | Self::Xrstors)
    }

    fn is_save(self) -> bool {
        matches!(
            self,
            Self::Xsave | Self::Xsaveopt | Self::Xsavec | Self::Xsaves
        )
    }

    /// XSAVEC and XSAVES always write the compacted format (SDM 13.10, 13.11).
    fn saves_compacted(self) -> bool {
        matches!(self, Self::Xsavec | Self::Xsaves)
    }

    /// Whether the save skips components in their initial configuration (SDM 13.6).
    fn uses_init_optimization(self) -> bool {
        matches!(self, Self::Xsaveopt | Self::Xsavec | Self::Xsaves)
    }
}

/// The vCPU registers and operand an XSAVE-family instruction depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XsaveContext {
    pub xcr0: u64,
    /// IA32_XSS; only XSAVES and XRSTORS look at it.
    pub xss: u64,
    /// EDX:EAX, which the SDM calls the instruction mask; RFBM is this ANDed with XCR0 (and
    /// IA32_XSS for XSAVES and XRSTORS).
    pub rfbm_request: u64,
    /// Linear address of the memory operand, for the 64-byte alignment check.
    pub addr: u64,
    /// REX.W (XSAVE64 and friends) selects the 64-bit FIP/FDP format of the legacy region.
    pub rex_w: bool,
}

/// Guest memory at the instruction's operand. Offsets are from the operand address.
pub trait XsaveMemory {
    /// Why an access failed; opaque here and returned unchanged in [`XsaveError::Memory`].
    type Fault;
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Fault>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Self::Fault>;
}

/// Where state component i (i >= 2) lives, from CPUID leaf 0DH sub-leaf i.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XstateComponent {
    /// EAX: size in bytes.
    pub size: u32,
    /// EBX: offset in the standard format (0 for supervisor components).
    pub offset: u32,
    /// ECX\[0\]: managed through IA32_XSS rather than XCR0.
    pub supervisor: bool,
    /// ECX\[1\]: starts on a 64-byte boundary in the compacted format.
    pub aligned: bool,
}

/// The CPU's XSAVE layout: which extended components exist, where they go, and whether the
/// compacted format is supported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XsaveLayout {
    components: [Option<XstateComponent>; XFEATURE_MAX],
    compaction: bool,
}

/// Offsets of the extended components in a compacted XSAVE area (SDM 13.4.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactedFormat {
    offsets: [Option<u64>; XFEATURE_MAX],
    size: u64,
}

impl CompactedFormat {
    /// Offset of component `index`, if XCOMP_BV gives it space.
    pub fn offset(&self, index: usize) -> Option<u64> {
        self.offsets.get(index).copied().flatten()
    }

    /// Size of the whole area, legacy region and header included.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl XsaveLayout {
    /// A layout with no extended components.
    pub fn new(compaction: bool) -> Self {
        Self {
            components: [None; XFEATURE_MAX],
            compaction,
        }
    }

    /// Adds extended component `index`. Indices 0 and 1 (the legacy region), 63 and above, and
    /// components of size 0 (CPUID's "not supported") are ignored.
    pub fn with_component(mut self, index: usize, component: XstateComponent) -> Self {
        if index >= XFEATURE_YMM && component.size != 0 {
            if let Some(slot) = self.components.get_mut(index) {
                *slot = Some(component);
            }
        }
        self
    }

    /// Reads the layout from CPUID leaf 0DH: sub-leaf 0 EDX:EAX and sub-leaf 1 EDX:ECX name the
    /// supported XCR0 and IA32_XSS components, sub-leaf 1 EAX\[1\] says whether the compacted
    /// format exists, and sub-leaf i describes component i.
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let [xcr0_low, _, _, xcr0_high] = cpuid(CPUID_LEAF_XSTATE, 0);
        let [features, _, xss_low, xss_high] = cpuid(CPUID_LEAF_XSTATE, 1);
        let supported = bitmap(xcr0_low, xcr0_high) | bitmap(xss_low, xss_high);
        let mut layout = Self::new(features & CPUID_XSTATE_XSAVEC != 0);
        for index in extended_components(supported) {
            // `index` is below 63, so it fits in a sub-leaf number.
            let [size, offset, flags, _] = cpuid(CPUID_LEAF_XSTATE, index as u32);
            layout = layout.with_component(
                index,
                XstateComponent {
                    size,
                    offset,
                    supervisor: flags & CPUID_XSTATE_SUPERVISOR != 0,
                    aligned: flags & CPUID_XSTATE_ALIGNED != 0,
                },
            );
        }
        layout
    }

    /// Extended component `index`, if the CPU has it.
    pub fn component(&self, index: usize) -> Option<XstateComponent> {
        self.components.get(index).copied().flatten()
    }

    /// Whether XSAVEC and the compacted form of XRSTOR exist.
    pub fn supports_compaction(&self) -> bool {
        self.compaction
    }

    /// Size of a standard-format area for `xcr0`, as CPUID.(EAX=0DH,ECX=0):EBX reports it.
    pub fn standard_size(&self, xcr0: u64) -> usize {
        let end = extended_components(xcr0)
            .filter_map(|index| self.component(index))
            .filter(|component| !component.supervisor)
            .map(|component| u64::from(component.offset) + u64::from(component.size))
            .max()
            .unwrap_or(0);
        usize::try_from(end)
            .unwrap_or(usize::MAX)
            .max(XSAVE_EXTENDED_REGION_OFFSET)
    }

    /// Offsets of the components in a compacted area whose XCOMP_BV is `xcomp_bv` (SDM 13.4.3):
    /// the first at 576, each next one right after the one before, rounded up to 64 bytes if
    /// its CPUID alignment bit is set. `None` if XCOMP_BV names a component the layout lacks.
    pub fn compacted_format(&self, xcomp_bv: u64) -> Option<CompactedFormat> {
        let mut offsets = [None; XFEATURE_MAX];
        let mut next = XSAVE_EXTENDED_REGION_OFFSET as u64;
        for index in extended_components(xcomp_bv) {
            let component = self.component(index)?;
            let start = if component.aligned {
                next.checked_next_multiple_of(XSAVE_AREA_ALIGNMENT)?
            } else {
                next
            };
            *offsets.get_mut(index)? = Some(start);
            next = start.checked_add(u64::from(component.size))?;
        }
        Some(CompactedFormat {
            offsets,
            size: next,
        })
    }
}

/// Executes `op` for a vCPU whose extended state is `state`, exactly as `KVM_GET_XSAVE`
/// returned it (see the module documentation). Saves read `state` and write `mem`; restores
/// read `mem` and update `state`, XSTATE_BV included, for `KVM_SET_XSAVE`. A restore changes
/// `state` only if it succeeds.
pub fn execute<M: XsaveMemory>(
    op: XsaveOp,
    ctx: &XsaveContext,
    layout: &XsaveLayout,
    state: &mut [u8],
    mem: &mut M,
) -> Result<(), XsaveError<M::Fault>> {
    if ctx.addr % XSAVE_AREA_ALIGNMENT != 0 {
        return Err(XsaveError::GeneralProtection(
            "xsave area is not 64-byte aligned",
        ));
    }
    if state.len() < XSAVE_EXTENDED_REGION_OFFSET {
        return Err(XsaveError::StateTooSmall {
            len: state.len(),
            needed: XSAVE_EXTENDED_REGION_OFFSET,
        });
    }
    let rfbm = ctx.rfbm_request & enabled_components(op, ctx);
    if op.is_save() {
        save(op, ctx, rfbm, layout, state, mem)
    } else {
        restore(op, ctx, rfbm, layout, state, mem)
    }
}

/// XCR0, or XCR0 | IA32_XSS for XSAVES and XRSTORS; bit 63 never names a component.
fn enabled_components(op: XsaveOp, ctx: &XsaveContext) -> u64 {
    let enabled = if op.manages_supervisor_state() {
        ctx.xcr0 | ctx.xss
    } else {
        ctx.xcr0
    };
    enabled & XFEATURE_MASK_ALL
}

/// XSAVE and XSAVEOPT (SDM 13.7, 13.9), XSAVEC (13.10), XSAVES (13.11).
fn save<M: XsaveMemory>(
    op: XsaveOp,
    ctx: &XsaveContext,
    rfbm: u64,
    layout: &XsaveLayout,
    state: &[u8],
    mem: &mut M,
) -> Result<(), XsaveError<M::Fault>> {
    let compacted = op.saves_compacted();
    let slots = slots(layout, rfbm, compacted.then_some(rfbm), state.len())?;
    let vcpu = KvmXstate::new(state);
    let xinuse = vcpu.xinuse(&slots)?;
    let saved = if op.uses_init_optimization() {
        rfbm & xinuse
    } else {
        rfbm
    };
    // XSAVE reads XSTATE_BV before it writes anything (SDM 13.7).
    let old_xstate_bv = if compacted {
        0
    } else {
        u64::from_le_bytes(read_array(mem, XSAVE_HDR_OFFSET + HDR_XSTATE_BV)?)
    };

    if saved & XFEATURE_MASK_FP != 0 {
        let x87 = vcpu.x87();
        write(mem, X87_ENVIRONMENT.start, &x87.area_environment(ctx.rex_w))?;
        write(mem, X87_REGISTERS.start, &x87.registers)?;
    }
    // MXCSR belongs to SSE state, but the standard form also saves it for AVX, and neither
    // optimization applies to it (SDM 13.7, 13.9); the compacted forms follow RFBM[1] alone
    // (SDM 13.10).
    let mxcsr_users = if compacted {
        XFEATURE_MASK_SSE
    } else {
        XFEATURE_MASK_SSE | XFEATURE_MASK_YMM
    };
    if rfbm & mxcsr_users != 0 {
        let mut fields = [0; 8];
        fields[..4].copy_from_slice(&vcpu.mxcsr().to_le_bytes());
        fields[4..].copy_from_slice(&vcpu.mxcsr_mask().to_le_bytes());
        write(mem, MXCSR_FIELDS.start, &fields)?;
    }
    if saved & XFEATURE_MASK_SSE != 0 {
        write(mem, SSE_REGISTERS.start, &vcpu.sse_registers())?;
    }
    for slot in slots.iter().filter(|slot| saved & slot.mask() != 0) {
        let offset = slot.area_offset.ok_or(XsaveError::Unsupported {
            component: slot.index,
            reason: "no place in the xsave area",
        })?;
        match vcpu.component(slot)? {
            Some(data) => write_at(mem, offset, data)?,
            None => write_at(mem, offset, &vec![0; slot.size])?,
        }
    }

    if compacted {
        // XSAVEC and XSAVES write XSTATE_BV and XCOMP_BV and nothing else of the header.
        let mut header = [0; 16];
        header[..8].copy_from_slice(&(rfbm & xinuse).to_le_bytes());
        header[8..].copy_from_slice(&(rfbm | XCOMP_BV_COMPACTED_FORMAT).to_le_bytes());
        write(mem, XSAVE_HDR_OFFSET, &header)
    } else {
        // XSAVE and XSAVEOPT change only the XSTATE_BV bits of the requested components.
        let xstate_bv = (old_xstate_bv & !rfbm) | (xinuse & rfbm);
        write(
            mem,
            XSAVE_HDR_OFFSET + HDR_XSTATE_BV,
            &xstate_bv.to_le_bytes(),
        )
    }
}

/// XRSTOR (SDM 13.8) and XRSTORS (13.12). Reads and checks everything before changing `state`.
fn restore<M: XsaveMemory>(
    op: XsaveOp,
    ctx: &XsaveContext,
    rfbm: u64,
    layout: &XsaveLayout,
    state: &mut [u8],
    mem: &mut M,
) -> Result<(), XsaveError<M::Fault>> {
    let header: [u8; XSAVE_HDR_SIZE] = read_array(mem, XSAVE_HDR_OFFSET)?;
    let xstate_bv = le_u64(&header, HDR_XSTATE_BV);
    let xcomp_bv = le_u64(&header, HDR_XCOMP_BV);
    check_header(op, ctx, layout, &header).map_err(XsaveError::GeneralProtection)?;
    let compacted = xcomp_bv & XCOMP_BV_COMPACTED_FORMAT != 0;
    let slots = slots(
        layout,
        rfbm,
        compacted.then_some(xcomp_bv & XFEATURE_MASK_ALL),
        state.len(),
    )?;
    let vcpu = KvmXstate::new(state);
    let mxcsr_mask = vcpu.mxcsr_mask();
    let old_xstate_bv = vcpu.xstate_bv;
    let mut next = state.to_vec();
    let loaded = rfbm & xstate_bv;

    if rfbm & XFEATURE_MASK_FP != 0 {
        let x87 = if loaded & XFEATURE_MASK_FP != 0 {
            X87State::from_area(
                read_array(mem, X87_ENVIRONMENT.start)?,
                read_array(mem, X87_REGISTERS.start)?,
                ctx.rex_w,
            )
        } else {
            X87State::init()
        };
        x87.store(&mut next);
    }
    // The standard form loads MXCSR whenever SSE or AVX is requested, whatever XSTATE_BV says;
    // the compacted form loads it with SSE state and otherwise resets it (SDM 13.8.1, 13.8.2).
    let mxcsr = if compacted {
        match (
            rfbm & XFEATURE_MASK_SSE != 0,
            loaded & XFEATURE_MASK_SSE != 0,
        ) {
            (true, true) => Some(read_mxcsr(mem, mxcsr_mask)?),
            (true, false) => Some(MXCSR_INIT),
            (false, _) => None,
        }
    } else if rfbm & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM) != 0 {
        Some(read_mxcsr(mem, mxcsr_mask)?)
    } else {
        None
    };
    if let Some(mxcsr) = mxcsr {
        put(&mut next, FXSAVE_MXCSR, &mxcsr.to_le_bytes());
    }
    if rfbm & XFEATURE_MASK_SSE != 0 {
        let registers = if loaded & XFEATURE_MASK_SSE != 0 {
            read_array(mem, SSE_REGISTERS.start)?
        } else {
            [0; SSE_REGISTERS_SIZE]
        };
        put(&mut next, SSE_REGISTERS.start, &registers);
    }
    let mut supervisor = 0;
    for slot in &slots {
        let data = if loaded & slot.mask() != 0 {
            // check_header made XSTATE_BV a subset of XCOMP_BV, so the offset exists.
            let offset = slot.area_offset.ok_or(XsaveError::GeneralProtection(
                "XSTATE_BV sets a bit that is not set in XCOMP_BV",
            ))?;
            let mut data = vec![0; slot.size];
            mem.read(offset, &mut data).map_err(XsaveError::Memory)?;
            data
        } else {
            vec![0; slot.size]
        };
        match &slot.kvm {
            Some(range) => state_slice_mut(&mut next, range.clone())?.copy_from_slice(&data),
            None if data.iter().all(|&byte| byte == 0) => supervisor |= slot.mask(),
            None => {
                return Err(XsaveError::Unsupported {
                    component: slot.index,
                    reason: "supervisor state has no place in the KVM_SET_XSAVE buffer",
                })
            }
        }
    }

    let mut new_xstate_bv = (old_xstate_bv & !rfbm) | (loaded & !supervisor);
    // KVM_SET_XSAVE takes MXCSR only along with x87, SSE or AVX state, and a compacted XRSTORS
    // in the host kernel resets it unless XSTATE_BV[1] is set: a non-default MXCSR needs the
    // SSE bit. Setting it makes the XMM bytes count, so give them the initial value that the
    // clear bit stood for.
    if le_u32(&next, FXSAVE_MXCSR) != MXCSR_INIT && new_xstate_bv & XFEATURE_MASK_SSE == 0 {
        put(&mut next, SSE_REGISTERS.start, &[0; SSE_REGISTERS_SIZE]);
        new_xstate_bv |= XFEATURE_MASK_SSE;
    }
    put(
        &mut next,
        XSAVE_HDR_OFFSET + HDR_XSTATE_BV,
        &new_xstate_bv.to_le_bytes(),
    );
    state.copy_from_slice(&next);
    Ok(())
}

/// The header checks of XRSTOR (SDM 13.8.1 standard form, 13.8.2 compacted form) and XRSTORS
/// (13.12, compacted form only). The error is the reason for the #GP.
fn check_header(
    op: XsaveOp,
    ctx: &XsaveContext,
    layout: &XsaveLayout,
    header: &[u8; XSAVE_HDR_SIZE],
) -> Result<(), &'static str> {
    let xstate_bv = le_u64(header, HDR_XSTATE_BV);
    let xcomp_bv = le_u64(header, HDR_XCOMP_BV);
    if xcomp_bv & XCOMP_BV_COMPACTED_FORMAT == 0 {
        if op == XsaveOp::Xrstors {
            return Err("xrstors needs the compacted format (XCOMP_BV[63] = 1)");
        }
        if xstate_bv & !(ctx.xcr0 & XFEATURE_MASK_ALL) != 0 {
            return Err("XSTATE_BV sets a bit that is not set in XCR0");
        }
        if !all_zero(header, HDR_STANDARD_MBZ) {
            return Err("bytes 23:8 of the xsave header are not zero");
        }
    } else {
        if !layout.supports_compaction() {
            return Err("the cpu does not support the compacted format");
        }
        if xcomp_bv & XFEATURE_MASK_ALL & !enabled_components(op, ctx) != 0 {
            return Err("XCOMP_BV sets a bit that is not an enabled component");
        }
        // Bit 63 included: it is set in XCOMP_BV, so XSTATE_BV may have it (it names nothing).
        if xstate_bv & !xcomp_bv != 0 {
            return Err("XSTATE_BV sets a bit that is not set in XCOMP_BV");
        }
        if !all_zero(header, HDR_COMPACTED_MBZ) {
            return Err("bytes 63:16 of the xsave header are not zero");
        }
    }
    Ok(())
}

/// Reads MXCSR from the area; loading reserved bits is a #GP (SDM 13.8).
fn read_mxcsr<M: XsaveMemory>(mem: &mut M, mask: u32) -> Result<u32, XsaveError<M::Fault>> {
    let mxcsr = u32::from_le_bytes(read_array(mem, FXSAVE_MXCSR)?);
    if mxcsr & !mask != 0 {
        return Err(XsaveError::GeneralProtection("MXCSR sets reserved bits"));
    }
    Ok(mxcsr)
}

/// An extended component the instruction handles, checked against the layout and the vCPU
/// buffer.
struct Slot {
    index: usize,
    size: usize,
    /// Where it lives in the `KVM_GET_XSAVE` buffer; `None` for supervisor components.
    kvm: Option<Range<usize>>,
    /// Its offset in the guest's area; `None` if a compacted area has no space for it.
    area_offset: Option<u64>,
}

impl Slot {
    fn mask(&self) -> u64 {
        1 << self.index
    }
}

/// The extended components of `mask`, in the format given by `xcomp_bv` (`None`: standard).
fn slots<F>(
    layout: &XsaveLayout,
    mask: u64,
    xcomp_bv: Option<u64>,
    state_len: usize,
) -> Result<Vec<Slot>, XsaveError<F>> {
    let compacted = match xcomp_bv {
        Some(xcomp_bv) => {
            for index in extended_components(xcomp_bv) {
                checked_component(layout, index)?;
            }
            let format = layout
                .compacted_format(xcomp_bv)
                .ok_or(XsaveError::Unsupported {
                    component: XFEATURE_YMM,
                    reason: "compacted offsets overflow",
                })?;
            Some(format)
        }
        None => None,
    };
    extended_components(mask)
        .map(|index| {
            let component = checked_component(layout, index)?;
            let kvm = if component.supervisor {
                if compacted.is_none() {
                    return Err(XsaveError::Unsupported {
                        component: index,
                        reason: "supervisor component in the standard format",
                    });
                }
                None
            } else {
                Some(kvm_range(index, component, state_len)?)
            };
            let area_offset = match &compacted {
                Some(format) => format.offset(index),
                None => Some(u64::from(component.offset)),
            };
            Ok(Slot {
                index,
                size: component.size as usize,
                kvm,
                area_offset,
            })
        })
        .collect()
}

fn checked_component<F>(
    layout: &XsaveLayout,
    index: usize,
) -> Result<XstateComponent, XsaveError<F>> {
    let component = layout.component(index).ok_or(XsaveError::Unsupported {
        component: index,
        reason: "not enumerated by CPUID leaf 0xd",
    })?;
    if component.size > MAX_COMPONENT_SIZE {
        return Err(XsaveError::Unsupported {
            component: index,
            reason: "CPUID size is implausibly large",
        });
    }
    Ok(component)
}

/// Where a user component lives in the `KVM_GET_XSAVE` buffer (its standard offset).
fn kvm_range<F>(
    index: usize,
    component: XstateComponent,
    state_len: usize,
) -> Result<Range<usize>, XsaveError<F>> {
    let start = component.offset as usize;
    if start < XSAVE_EXTENDED_REGION_OFFSET {
        return Err(XsaveError::Unsupported {
            component: index,
            reason: "standard offset overlaps the legacy region or the header",
        });
    }
    let end = start.saturating_add(component.size as usize);
    if end > state_len {
        return Err(XsaveError::StateTooSmall {
            len: state_len,
            needed: end,
        });
    }
    Ok(start..end)
}

/// The vCPU's state as `KVM_GET_XSAVE` reports it, read through its XSTATE_BV.
struct KvmXstate<'a> {
    buf: &'a [u8],
    xstate_bv: u64,
}

impl<'a> KvmXstate<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            xstate_bv: le_u64(buf, XSAVE_HDR_OFFSET + HDR_XSTATE_BV),
        }
    }

    fn in_use(&self, mask: u64) -> bool {
        self.xstate_bv & mask != 0
    }

    fn x87(&self) -> X87State {
        if self.in_use(XFEATURE_MASK_FP) {
            X87State::from_image(self.buf)
        } else {
            X87State::init()
        }
    }

    fn sse_registers(&self) -> [u8; SSE_REGISTERS_SIZE] {
        if self.in_use(XFEATURE_MASK_SSE) {
            array(self.buf, SSE_REGISTERS.start)
        } else {
            [0; SSE_REGISTERS_SIZE]
        }
    }

    /// MXCSR is not tracked by XSTATE_BV: the kernel always stores it.
    fn mxcsr(&self) -> u32 {
        le_u32(self.buf, FXSAVE_MXCSR)
    }

    fn mxcsr_mask(&self) -> u32 {
        match le_u32(self.buf, FXSAVE_MXCSR_MASK) {
            0 => MXCSR_MASK_DEFAULT,
            mask => mask,
        }
    }

    /// The value of an extended component; `None` when it is in its initial configuration
    /// (all zeros for every extended component, SDM 13.6), including every supervisor
    /// component since the buffer has none.
    fn component<F>(&self, slot: &Slot) -> Result<Option<&'a [u8]>, XsaveError<F>> {
        match &slot.kvm {
            Some(range) if self.in_use(slot.mask()) => {
                let len = self.buf.len();
                let data = self
                    .buf
                    .get(range.clone())
                    .ok_or(XsaveError::StateTooSmall {
                        len,
                        needed: range.end,
                    })?;
                Ok(Some(data))
            }
            _ => Ok(None),
        }
    }

    /// XINUSE for the components of `slots` and the legacy ones (see the module documentation).
    fn xinuse<F>(&self, slots: &[Slot]) -> Result<u64, XsaveError<F>> {
        let mut xinuse = 0;
        if self.x87() != X87State::init() {
            xinuse |= XFEATURE_MASK_FP;
        }
        if self.sse_registers() != [0; SSE_REGISTERS_SIZE] || self.mxcsr() != MXCSR_INIT {
            xinuse |= XFEATURE_MASK_SSE;
        }
        for slot in slots {
            if let Some(data) = self.component(slot)? {
                if data.iter().any(|&byte| byte != 0) {
                    xinuse |= slot.mask();
                }
            }
        }
        Ok(xinuse)
    }
}

/// The x87 state component: bytes 23:0 and 159:32 of the legacy region (SDM 13.5.1), kept in
/// the 64-bit format of the `KVM_GET_XSAVE` buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct X87State {
    environment: [u8; X87_ENVIRONMENT_SIZE],
    registers: [u8; X87_REGISTERS_SIZE],
}

impl X87State {
    /// FCW 037FH, everything else 0 (SDM 13.6).
    fn init() -> Self {
        let mut environment = [0; X87_ENVIRONMENT_SIZE];
        environment[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        Self {
            environment,
            registers: [0; X87_REGISTERS_SIZE],
        }
    }

    fn from_image(image: &[u8]) -> Self {
        Self {
            environment: array(image, X87_ENVIRONMENT.start),
            registers: array(image, X87_REGISTERS.start),
        }
    }

    fn store(&self, image: &mut [u8]) {
        put(image, X87_ENVIRONMENT.start, &self.environment);
        put(image, X87_REGISTERS.start, &self.registers);
    }

    /// The environment as the instruction writes it. Without REX.W, FIP and FDP are 32 bits
    /// followed by FCS and FDS; the buffer has no selectors (64-bit mode does not keep them), so
    /// they are written as 0, as processors that deprecate FCS/FDS do, and so are the unused
    /// bytes after them.
    fn area_environment(&self, rex_w: bool) -> [u8; X87_ENVIRONMENT_SIZE] {
        let mut environment = self.environment;
        if !rex_w {
            environment[FIP_HIGH].fill(0);
            environment[FDP_HIGH].fill(0);
        }
        environment
    }

    /// The inverse of `area_environment`: without REX.W, FIP and FDP are zero-extended and the
    /// selectors dropped.
    fn from_area(
        environment: [u8; X87_ENVIRONMENT_SIZE],
        registers: [u8; X87_REGISTERS_SIZE],
        rex_w: bool,
    ) -> Self {
        let area = Self {
            environment,
            registers,
        };
        Self {
            environment: area.area_environment(rex_w),
            registers,
        }
    }
}

/// Components 2 to 62 named in `mask`.
fn extended_components(mask: u64) -> impl Iterator<Item = usize> {
    (XFEATURE_YMM..XFEATURE_MAX).filter(move |&index| mask & (1 << index) != 0)
}

fn bitmap(low: u32, high: u32) -> u64 {
    (u64::from(high) << 32) | u64::from(low)
}

fn all_zero(bytes: &[u8], range: Range<usize>) -> bool {
    bytes
        .get(range)
        .is_some_and(|bytes| bytes.iter().all(|&byte| byte == 0))
}

/// `N` bytes of `bytes` at `offset`. Only used at fixed offsets inside the 576 bytes `execute`
/// checked for; out of range would read as zeros rather than panic.
fn array<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0; N];
    if let Some(src) = offset.checked_add(N).and_then(|end| bytes.get(offset..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Copies `data` into `bytes` at a fixed offset inside the 576 bytes `execute` checked for.
fn put(bytes: &mut [u8], offset: usize, data: &[u8]) {
    if let Some(dst) = offset
        .checked_add(data.len())
        .and_then(|end| bytes.get_mut(offset..end))
    {
        dst.copy_from_slice(data);
    }
}

fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(array(bytes, offset))
}

fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(array(bytes, offset))
}

fn state_slice_mut<F>(state: &mut [u8], range: Range<usize>) -> Result<&mut [u8], XsaveError<F>> {
    let len = state.len();
    state
        .get_mut(range.clone())
        .ok_or(XsaveError::StateTooSmall {
            len,
            needed: range.end,
        })
}

fn read_array<M: XsaveMemory, const N: usize>(
    mem: &mut M,
    offset: usize,
) -> Result<[u8; N], XsaveError<M::Fault>> {
    let mut buf = [0; N];
    mem.read(offset as u64, &mut buf)
        .map_err(XsaveError::Memory)?;
    Ok(buf)
}

fn write<M: XsaveMemory>(
    mem: &mut M,
    offset: usize,
    data: &[u8],
) -> Result<(), XsaveError<M::Fault>> {
    write_at(mem, offset as u64, data)
}

fn write_at<M: XsaveMemory>(
    mem: &mut M,
    offset: u64,
    data: &[u8],
) -> Result<(), XsaveError<M::Fault>> {
    mem.write(offset, data).map_err(XsaveError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_XSAVE_SIZE: usize = 4096;
    const AVX_XCR0: u64 = 0x7;
    const AVX512_XCR0: u64 = 0xe7;
    const PKRU: usize = 9;
    /// A made-up user component with the compacted-format alignment bit (like AMX TILECFG).
    const ALIGNED: usize = 17;
    /// A supervisor component (like CET_U).
    const SUPERVISOR: usize = 11;
    const AREA: u64 = 0x1_0000;
    /// What untouched guest memory holds.
    const SENTINEL: u8 = 0xaa;

    fn user(size: u32, offset: u32, aligned: bool) -> XstateComponent {
        XstateComponent {
            size,
            offset,
            supervisor: false,
            aligned,
        }
    }

    /// An AVX-only CPU (x87, SSE, AVX).
    fn avx_layout() -> XsaveLayout {
        XsaveLayout::new(true).with_component(XFEATURE_YMM, user(256, 576, false))
    }

    /// An AVX-512 CPU with PKRU, a made-up aligned component and a supervisor component.
    fn big_layout() -> XsaveLayout {
        avx_layout()
            .with_component(5, user(64, 1088, false))
            .with_component(6, user(512, 1152, false))
            .with_component(7, user(1024, 1664, false))
            .with_component(PKRU, user(8, 2688, false))
            .with_component(ALIGNED, user(64, 2752, true))
            .with_component(
                SUPERVISOR,
                XstateComponent {
                    size: 16,
                    offset: 0,
                    supervisor: true,
                    aligned: false,
                },
            )
    }

    /// Guest memory for the operand: `len` bytes of SENTINEL, optionally faulting in `fault`.
    struct FakeMemory {
        bytes: Vec<u8>,
        fault: Option<Range<u64>>,
        accesses: usize,
        writes: Vec<Range<u64>>,
    }

    impl FakeMemory {
        fn new() -> Self {
            Self {
                bytes: vec![SENTINEL; 8192],
                fault: None,
                accesses: 0,
                writes: Vec::new(),
            }
        }

        fn faulting(mut self, fault: Range<u64>) -> Self {
            self.fault = Some(fault);
            self
        }

        fn range(&mut self, offset: u64, len: usize) -> Result<Range<usize>, u64> {
            self.accesses += 1;
            let end = offset + len as u64;
            if let Some(fault) = &self.fault {
                if offset < fault.end && fault.start < end {
                    return Err(fault.start.max(offset));
                }
            }
            if end > self.bytes.len() as u64 {
                return Err(offset);
            }
            Ok(offset as usize..end as usize)
        }

        fn at(&self, offset: usize, len: usize) -> &[u8] {
            &self.bytes[offset..offset + len]
        }

        fn u64_at(&self, offset: usize) -> u64 {
            u64::from_le_bytes(self.at(offset, 8).try_into().unwrap())
        }

        fn u32_at(&self, offset: usize) -> u32 {
            u32::from_le_bytes(self.at(offset, 4).try_into().unwrap())
        }

        fn set(&mut self, offset: usize, data: &[u8]) {
            self.bytes[offset..offset + data.len()].copy_from_slice(data);
        }

        fn untouched(&self, range: Range<usize>) -> bool {
            self.bytes[range].iter().all(|&b| b == SENTINEL)
        }

        /// A valid header for a restore: XSTATE_BV, XCOMP_BV, the rest zero.
        fn header(&mut self, xstate_bv: u64, xcomp_bv: u64) {
            self.set(512, &[0; 64]);
            self.set(512, &xstate_bv.to_le_bytes());
            self.set(520, &xcomp_bv.to_le_bytes());
        }
    }

    impl XsaveMemory for FakeMemory {
        type Fault = u64;

        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), u64> {
            let range = self.range(offset, buf.len())?;
            buf.copy_from_slice(&self.bytes[range]);
            Ok(())
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u64> {
            let range = self.range(offset, data.len())?;
            self.writes.push(offset..offset + data.len() as u64);
            self.bytes[range].copy_from_slice(data);
            Ok(())
        }
    }

    fn ctx(xcr0: u64, rfbm_request: u64) -> XsaveContext {
        XsaveContext {
            xcr0,
            xss: 0,
            rfbm_request,
            addr: AREA,
            rex_w: true,
        }
    }

    fn run(
        op: XsaveOp,
        ctx: &XsaveContext,
        layout: &XsaveLayout,
        state: &mut [u8],
        mem: &mut FakeMemory,
    ) -> Result<(), XsaveError<u64>> {
        execute(op, ctx, layout, state, mem)
    }

    /// A `KVM_GET_XSAVE` buffer of a vCPU in its initial configuration.
    fn init_state() -> Vec<u8> {
        let mut state = vec![0; KVM_XSAVE_SIZE];
        state[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        state[24..28].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        state[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        state
    }

    fn xstate_bv(state: &[u8]) -> u64 {
        le_u64(state, 512)
    }

    fn set_xstate_bv(state: &mut [u8], value: u64) {
        state[512..520].copy_from_slice(&value.to_le_bytes());
    }

    /// A vCPU using every user component of `xcr0`, each with its own byte pattern.
    fn busy_state(layout: &XsaveLayout, xcr0: u64) -> Vec<u8> {
        let mut state = init_state();
        // FCW, FSW (TOP = 7), abridged FTW (ST0 valid), FOP, FIP, FDP.
        state[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
        state[2..4].copy_from_slice(&0x3800u16.to_le_bytes());
        state[4] = 0x01;
        state[6..8].copy_from_slice(&0x0123u16.to_le_bytes());
        state[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        state[16..24].copy_from_slice(&0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        state[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
        for (i, byte) in state[32..42].iter_mut().enumerate() {
            *byte = 0x40 + i as u8;
        }
        for (i, byte) in state[160..416].iter_mut().enumerate() {
            *byte = (i % 251) as u8 + 1;
        }
        let mut bv = xcr0 & (XFEATURE_MASK_FP | XFEATURE_MASK_SSE);
        for index in extended_components(xcr0) {
            let component = layout.component(index).unwrap();
            let start = component.offset as usize;
            for byte in &mut state[start..start + component.size as usize] {
                *byte = index as u8;
            }
            bv |= 1 << index;
        }
        set_xstate_bv(&mut state, bv);
        state
    }

    fn all_ops() -> [XsaveOp; 6] {
        [
            XsaveOp::Xsave,
            XsaveOp::Xsaveopt,
            XsaveOp::Xsavec,
            XsaveOp::Xsaves,
            XsaveOp::Xrstor,
            XsaveOp::Xrstors,
        ]
    }

    // ---- Layout ----

    #[test]
    fn from_cpuid_reads_leaf_0xd() {
        let layout = XsaveLayout::from_cpuid(|leaf, subleaf| {
            assert_eq!(leaf, 0xd);
            match subleaf {
                0 => [0xe7, 2696, 2696, 0],
                1 => [0xf, 0, 1 << SUPERVISOR, 0],
                2 => [256, 576, 0, 0],
                5 => [64, 1088, 0, 0],
                6 => [512, 1152, 0, 0],
                7 => [1024, 1664, 0, 0],
                11 => [16, 0, 1, 0],
                other => panic!("sub-leaf {other} of an unsupported component was queried"),
            }
        });
        assert!(layout.supports_compaction());
        assert_eq!(layout.component(2), Some(user(256, 576, false)));
        assert_eq!(layout.component(7), Some(user(1024, 1664, false)));
        assert!(layout.component(SUPERVISOR).unwrap().supervisor);
        assert_eq!(layout.component(3), None);
        assert_eq!(layout.component(0), None);
        assert_eq!(layout, big_layout().clone_without(&[PKRU, ALIGNED]));
    }

    impl XsaveLayout {
        fn clone_without(&self, indices: &[usize]) -> Self {
            let mut layout = self.clone();
            for &index in indices {
                layout.components[index] = None;
            }
            layout
        }
    }

    #[test]
    fn from_cpuid_without_xsavec_has_no_compaction() {
        let layout = XsaveLayout::from_cpuid(|_, subleaf| match subleaf {
            0 => [0x7, 0, 0, 0],
            2 => [256, 576, 0, 0],
            _ => [0; 4],
        });
        assert!(!layout.supports_compaction());
        assert_eq!(layout.component(2), Some(user(256, 576, false)));
    }

    #[test]
    fn standard_size_matches_cpuid_ebx() {
        assert_eq!(avx_layout().standard_size(0x3), 576);
        assert_eq!(avx_layout().standard_size(AVX_XCR0), 832);
        assert_eq!(big_layout().standard_size(AVX512_XCR0), 2688);
        assert_eq!(big_layout().standard_size(AVX512_XCR0 | 1 << PKRU), 2696);
        // Supervisor components have no standard offset.
        assert_eq!(big_layout().standard_size(0x3 | 1 << SUPERVISOR), 576);
    }

    #[test]
    fn compacted_offsets_follow_each_other_from_576() {
        let format = big_layout()
            .compacted_format(AVX512_XCR0 | XCOMP_BV_COMPACTED_FORMAT)
            .unwrap();
        assert_eq!(format.offset(2), Some(576));
        assert_eq!(format.offset(5), Some(832));
        assert_eq!(format.offset(6), Some(896));
        assert_eq!(format.offset(7), Some(1408));
        assert_eq!(format.offset(3), None);
        assert_eq!(format.size(), 2432);
    }

    #[test]
    fn compacted_offsets_round_aligned_components_up_to_64() {
        let layout = big_layout();
        let format = layout
            .compacted_format(AVX_XCR0 | 1 << PKRU | 1 << ALIGNED)
            .unwrap();
        assert_eq!(format.offset(2), Some(576));
        assert_eq!(format.offset(PKRU), Some(832));
        // 832 + 8 = 840, rounded up to 896.
        assert_eq!(format.offset(ALIGNED), Some(896));
        assert_eq!(format.size(), 960);
        // Already aligned: no padding.
        let format = layout.compacted_format(1 << ALIGNED).unwrap();
        assert_eq!(format.offset(ALIGNED), Some(576));
    }

    #[test]
    fn compacted_format_needs_every_component() {
        assert_eq!(avx_layout().compacted_format(1 << 5), None);
    }

    // ---- Common rules ----

    #[test]
    fn misaligned_operand_is_gp_for_every_op() {
        for op in all_ops() {
            let mut state = busy_state(&avx_layout(), AVX_XCR0);
            let before = state.clone();
            let mut mem = FakeMemory::new();
            let mut ctx = ctx(AVX_XCR0, !0);
            ctx.addr = AREA + 16;
            assert!(matches!(
                run(op, &ctx, &avx_layout(), &mut state, &mut mem),
                Err(XsaveError::GeneralProtection(_))
            ));
            assert_eq!(mem.accesses, 0, "{op:?} touched memory");
            assert_eq!(state, before);
        }
    }

    #[test]
    fn rfbm_is_instruction_mask_and_xcr0() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut mem = FakeMemory::new();
        mem.set(512, &0u64.to_le_bytes());
        // EDX:EAX asks for everything; XCR0 enables x87 and SSE only.
        run(XsaveOp::Xsave, &ctx(0x3, !0), &layout, &mut state, &mut mem).unwrap();
        assert!(
            mem.untouched(576..832),
            "AVX state saved although XCR0[2] = 0"
        );
        assert_eq!(mem.u64_at(512), 0x3);
    }

    #[test]
    fn rfbm_includes_ia32_xss_only_for_xsaves() {
        let layout = big_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut ctx = ctx(AVX_XCR0, !0);
        ctx.xss = 1 << SUPERVISOR;
        let mut mem = FakeMemory::new();
        run(XsaveOp::Xsavec, &ctx, &layout, &mut state, &mut mem).unwrap();
        assert_eq!(mem.u64_at(520), AVX_XCR0 | XCOMP_BV_COMPACTED_FORMAT);
        let mut mem = FakeMemory::new();
        run(XsaveOp::Xsaves, &ctx, &layout, &mut state, &mut mem).unwrap();
        assert_eq!(
            mem.u64_at(520),
            AVX_XCR0 | 1 << SUPERVISOR | XCOMP_BV_COMPACTED_FORMAT
        );
    }

    // ---- XSAVE, XSAVEOPT (standard format) ----

    #[test]
    fn xsave_writes_only_requested_components() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsave,
            &ctx(AVX_XCR0, XFEATURE_MASK_FP),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.at(0, 24), &state[0..24]);
        assert_eq!(mem.at(32, 128), &state[32..160]);
        assert!(mem.untouched(24..32), "MXCSR saved without SSE or AVX");
        assert!(mem.untouched(160..512));
        assert!(mem.untouched(576..832));
    }

    #[test]
    fn xsave_saves_mxcsr_when_sse_or_avx_is_requested() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsave,
            &ctx(AVX_XCR0, XFEATURE_MASK_YMM),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.u32_at(24), 0x1fa0);
        assert_eq!(mem.u32_at(28), 0xffff);
        assert!(mem.untouched(0..24));
        assert!(
            mem.untouched(160..416),
            "XMM registers saved without RFBM[1]"
        );
        assert_eq!(mem.at(576, 256), &state[576..832]);
    }

    #[test]
    fn xsave_header_is_read_modify_write_of_xstate_bv_only() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        // AVX state is in its initial configuration.
        set_xstate_bv(&mut state, 0x3);
        let mut mem = FakeMemory::new();
        let old = 0x8000_0000_0000_00f4u64;
        mem.set(512, &old.to_le_bytes());
        run(
            XsaveOp::Xsave,
            &ctx(AVX_XCR0, XFEATURE_MASK_SSE | XFEATURE_MASK_YMM),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        // Bits 1 and 2 follow XINUSE, every other bit keeps what memory had.
        assert_eq!(mem.u64_at(512), (old & !0x6) | 0x2);
        assert!(
            mem.untouched(520..576),
            "XSAVE wrote more of the header than XSTATE_BV"
        );
        assert!(
            mem.untouched(416..512),
            "XSAVE wrote bytes 511:416 of the legacy region"
        );
    }

    #[test]
    fn xsave_writes_initial_values_for_components_not_in_use() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        // XSTATE_BV says x87 and AVX are initial; the bytes behind the bits are stale.
        set_xstate_bv(&mut state, XFEATURE_MASK_SSE);
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsave,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.at(0, 24), &X87State::init().environment);
        assert_eq!(mem.at(32, 128), &[0; 128]);
        assert_eq!(mem.at(576, 256), &[0; 256]);
        assert_eq!(mem.at(160, 256), &state[160..416]);
        assert_eq!(mem.u64_at(512) & AVX_XCR0, XFEATURE_MASK_SSE);
    }

    #[test]
    fn xsaveopt_skips_components_in_their_initial_configuration() {
        let layout = avx_layout();
        let mut state = init_state();
        state[160] = 1;
        set_xstate_bv(&mut state, XFEATURE_MASK_SSE | XFEATURE_MASK_YMM);
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsaveopt,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert!(
            mem.untouched(0..24) && mem.untouched(32..160),
            "initial x87 state written"
        );
        assert!(mem.untouched(576..832), "initial AVX state written");
        // MXCSR is outside both optimizations.
        assert_eq!(mem.u32_at(24), MXCSR_INIT);
        assert_eq!(mem.at(160, 256), &state[160..416]);
        assert_eq!(mem.u64_at(512) & AVX_XCR0, XFEATURE_MASK_SSE);
    }

    #[test]
    fn xsaveopt_saves_mxcsr_for_avx_alone() {
        let layout = avx_layout();
        let mut state = init_state();
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsaveopt,
            &ctx(AVX_XCR0, XFEATURE_MASK_YMM),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.u32_at(24), MXCSR_INIT);
        assert!(mem.untouched(160..416));
    }

    #[test]
    fn rex_w_clear_uses_32_bit_fpu_pointers() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut ctx = ctx(AVX_XCR0, XFEATURE_MASK_FP);
        ctx.rex_w = false;
        let mut mem = FakeMemory::new();
        run(XsaveOp::Xsave, &ctx, &layout, &mut state, &mut mem).unwrap();
        // FIP[31:0], FCS = 0 and two unused bytes; FDP[31:0], FDS = 0 and two unused bytes.
        assert_eq!(mem.u64_at(8), 0x5566_7788);
        assert_eq!(mem.u64_at(16), 0xddee_ff00);

        // Restoring zero-extends the pointers and drops the selectors.
        mem.set(12, &[0x33, 0, 0xff, 0xff]);
        mem.header(XFEATURE_MASK_FP, 0);
        let mut restored = init_state();
        run(XsaveOp::Xrstor, &ctx, &layout, &mut restored, &mut mem).unwrap();
        assert_eq!(le_u64(&restored, 8), 0x5566_7788);
        assert_eq!(le_u64(&restored, 16), 0xddee_ff00);
        assert_eq!(&restored[0..8], &state[0..8]);
    }

    // ---- XSAVEC, XSAVES (compacted format) ----

    #[test]
    fn xsavec_of_initial_avx_state_clears_its_bit_and_leaves_its_area() {
        let layout = avx_layout();
        for kvm_bit in [0, XFEATURE_MASK_YMM] {
            let mut state = busy_state(&layout, AVX_XCR0);
            state[576..832].fill(0);
            set_xstate_bv(&mut state, 0x3 | kvm_bit);
            let mut mem = FakeMemory::new();
            run(
                XsaveOp::Xsavec,
                &ctx(AVX_XCR0, !0),
                &layout,
                &mut state,
                &mut mem,
            )
            .unwrap();
            assert_eq!(mem.u64_at(512), 0x3);
            assert_eq!(mem.u64_at(520), AVX_XCR0 | XCOMP_BV_COMPACTED_FORMAT);
            assert!(mem.untouched(576..832), "initial AVX state written");
        }
    }

    #[test]
    fn xsavec_writes_the_compacted_avx512_layout() {
        let layout = big_layout();
        let mut state = busy_state(&layout, AVX512_XCR0);
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsavec,
            &ctx(AVX512_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.u64_at(512), AVX512_XCR0);
        assert_eq!(mem.u64_at(520), AVX512_XCR0 | XCOMP_BV_COMPACTED_FORMAT);
        assert!(
            mem.untouched(528..576),
            "XSAVEC wrote bytes 63:16 of the header"
        );
        assert!(mem.untouched(416..512));
        for (index, offset, size) in [(2, 576, 256), (5, 832, 64), (6, 896, 512), (7, 1408, 1024)] {
            assert!(
                mem.at(offset, size).iter().all(|&b| b == index as u8),
                "component {index}"
            );
        }
        assert!(mem.untouched(2432..4096));
    }

    #[test]
    fn xsavec_places_aligned_components_on_64_byte_boundaries() {
        let layout = big_layout();
        let xcr0 = AVX_XCR0 | 1 << PKRU | 1 << ALIGNED;
        let mut state = busy_state(&layout, xcr0);
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsavec,
            &ctx(xcr0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.at(832, 8), &[PKRU as u8; 8]);
        assert!(mem.untouched(840..896), "padding written");
        assert_eq!(mem.at(896, 64), &[ALIGNED as u8; 64]);
    }

    #[test]
    fn xsavec_saves_mxcsr_only_when_sse_is_requested() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut mem = FakeMemory::new();
        let rfbm = XFEATURE_MASK_FP | XFEATURE_MASK_YMM;
        run(
            XsaveOp::Xsavec,
            &ctx(AVX_XCR0, rfbm),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert!(mem.untouched(24..32), "RFBM[2] made XSAVEC save MXCSR");

        // SSE requested but XMM registers initial: MXCSR is written, the registers are not.
        let mut state = init_state();
        let mut mem = FakeMemory::new();
        run(
            XsaveOp::Xsavec,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(mem.u32_at(24), MXCSR_INIT);
        assert_eq!(mem.u32_at(28), 0xffff);
        assert!(mem.untouched(0..24) && mem.untouched(32..160) && mem.untouched(160..416));
        assert_eq!(mem.u64_at(512), 0);
    }

    #[test]
    fn non_default_mxcsr_puts_sse_state_in_use() {
        let layout = avx_layout();
        let mut state = init_state();
        state[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
        let mut mem = FakeMemory::new();
        mem.header(0, 0);
        run(
            XsaveOp::Xsavec,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        // Otherwise the compacted XRSTOR below would reset MXCSR to 1F80H.
        assert_eq!(mem.u64_at(512), XFEATURE_MASK_SSE);
        let mut restored = init_state();
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut restored,
            &mut mem,
        )
        .unwrap();
        assert_eq!(le_u32(&restored, 24), 0x1fa0);
    }

    #[test]
    fn xsaves_saves_supervisor_components_as_initial() {
        let layout = big_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut ctx = ctx(AVX_XCR0, !0);
        ctx.xss = 1 << SUPERVISOR;
        let mut mem = FakeMemory::new();
        run(XsaveOp::Xsaves, &ctx, &layout, &mut state, &mut mem).unwrap();
        assert_eq!(mem.u64_at(512), AVX_XCR0);
        assert!(mem.untouched(832..848));
    }

    // ---- Round trips ----

    fn round_trip(
        save: XsaveOp,
        restore: XsaveOp,
        layout: &XsaveLayout,
        ctx: &XsaveContext,
        source: &[u8],
    ) {
        let mut state = source.to_vec();
        let mut mem = FakeMemory::new();
        mem.header(0, 0);
        run(save, ctx, layout, &mut state, &mut mem).unwrap();
        assert_eq!(state, source, "{save:?} changed the vCPU state");
        let mut restored = init_state();
        run(restore, ctx, layout, &mut restored, &mut mem).unwrap();
        assert_eq!(restored, source, "{save:?} then {restore:?}");
    }

    #[test]
    fn save_then_restore_reproduces_the_state() {
        let big_xcr0 = AVX512_XCR0 | 1 << PKRU | 1 << ALIGNED;
        for (layout, xcr0) in [(avx_layout(), AVX_XCR0), (big_layout(), big_xcr0)] {
            let busy = busy_state(&layout, xcr0);
            let mut partly_initial = busy.clone();
            partly_initial[0..24].copy_from_slice(&X87State::init().environment);
            partly_initial[32..160].fill(0);
            partly_initial[576..832].fill(0);
            set_xstate_bv(
                &mut partly_initial,
                xcr0 & !(XFEATURE_MASK_FP | XFEATURE_MASK_YMM),
            );
            for source in [&busy, &partly_initial, &init_state()] {
                let mut ctx = ctx(xcr0, !0);
                if layout.component(SUPERVISOR).is_some() {
                    ctx.xss = 1 << SUPERVISOR;
                }
                for (save, restore) in [
                    (XsaveOp::Xsave, XsaveOp::Xrstor),
                    (XsaveOp::Xsaveopt, XsaveOp::Xrstor),
                    (XsaveOp::Xsavec, XsaveOp::Xrstor),
                    (XsaveOp::Xsaves, XsaveOp::Xrstors),
                ] {
                    round_trip(save, restore, &layout, &ctx, source);
                }
            }
        }
    }

    // ---- XRSTOR, XRSTORS ----

    #[test]
    fn xrstor_initializes_components_whose_xstate_bv_bit_is_clear() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let mut mem = FakeMemory::new();
        mem.set(0, &[0x11; 512]);
        mem.set(24, &0x1f80u32.to_le_bytes());
        mem.header(XFEATURE_MASK_FP, 0);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(&state[0..24], mem.at(0, 24));
        assert_eq!(&state[160..416], &[0; 256]);
        assert_eq!(&state[576..832], &[0; 256]);
        assert_eq!(xstate_bv(&state), XFEATURE_MASK_FP);
    }

    #[test]
    fn xrstor_leaves_components_outside_rfbm_alone() {
        let layout = avx_layout();
        let mut state = busy_state(&layout, AVX_XCR0);
        let before = state.clone();
        let mut mem = FakeMemory::new();
        mem.set(0, &[0; 576]);
        mem.header(0, 0);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, XFEATURE_MASK_FP),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(&state[0..24], &X87State::init().environment);
        assert_eq!(&state[24..32], &before[24..32], "MXCSR changed");
        assert_eq!(&state[160..512], &before[160..512], "SSE state changed");
        assert_eq!(&state[576..], &before[576..]);
        assert_eq!(xstate_bv(&state), AVX_XCR0 & !XFEATURE_MASK_FP);
    }

    #[test]
    fn standard_xrstor_loads_mxcsr_for_avx_whatever_xstate_bv_says() {
        let layout = avx_layout();
        let mut state = init_state();
        let mut mem = FakeMemory::new();
        mem.set(24, &0x1fc0u32.to_le_bytes());
        mem.header(0, 0);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, XFEATURE_MASK_YMM),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(le_u32(&state, 24), 0x1fc0);
    }

    #[test]
    fn compacted_xrstor_resets_mxcsr_without_sse_and_ignores_avx() {
        let layout = avx_layout();
        let compacted = AVX_XCR0 | XCOMP_BV_COMPACTED_FORMAT;
        let mut mem = FakeMemory::new();
        mem.set(24, &0x1fc0u32.to_le_bytes());
        mem.header(0, compacted);
        let mut state = busy_state(&layout, AVX_XCR0);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(le_u32(&state, 24), MXCSR_INIT);

        let mut state = busy_state(&layout, AVX_XCR0);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, XFEATURE_MASK_YMM),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(
            le_u32(&state, 24),
            0x1fa0,
            "RFBM[2] made the compacted form load MXCSR"
        );

        mem.header(XFEATURE_MASK_SSE, compacted);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(le_u32(&state, 24), 0x1fc0);
    }

    #[test]
    fn xrstor_gp_on_reserved_mxcsr_bits() {
        let layout = avx_layout();
        for (mask, mxcsr) in [(0xffff, 0x1_0000), (0, 0x1fc0 | 0x40)] {
            let mut state = busy_state(&layout, AVX_XCR0);
            state[28..32].copy_from_slice(&u32::to_le_bytes(mask));
            let before = state.clone();
            let mut mem = FakeMemory::new();
            mem.set(24, &u32::to_le_bytes(mxcsr));
            mem.header(0, 0);
            assert_eq!(
                run(
                    XsaveOp::Xrstor,
                    &ctx(AVX_XCR0, !0),
                    &layout,
                    &mut state,
                    &mut mem
                ),
                Err(XsaveError::GeneralProtection("MXCSR sets reserved bits"))
            );
            assert_eq!(state, before);
        }
    }

    fn assert_restore_gp(op: XsaveOp, ctx: &XsaveContext, layout: &XsaveLayout, header: &[u8]) {
        let mut state = busy_state(layout, AVX_XCR0);
        let before = state.clone();
        let mut mem = FakeMemory::new();
        mem.set(0, &[0; 576]);
        mem.set(24, &MXCSR_INIT.to_le_bytes());
        mem.set(512, header);
        let result = run(op, ctx, layout, &mut state, &mut mem);
        assert!(
            matches!(result, Err(XsaveError::GeneralProtection(_))),
            "{op:?} accepted header {header:02x?}: {result:?}"
        );
        assert_eq!(state, before);
    }

    fn header(xstate_bv: u64, xcomp_bv: u64, extra: &[(usize, u8)]) -> [u8; 64] {
        let mut header = [0; 64];
        header[0..8].copy_from_slice(&xstate_bv.to_le_bytes());
        header[8..16].copy_from_slice(&xcomp_bv.to_le_bytes());
        for &(offset, byte) in extra {
            header[offset] = byte;
        }
        header
    }

    #[test]
    fn standard_xrstor_header_checks() {
        let layout = avx_layout();
        let ctx = ctx(AVX_XCR0, !0);
        // XSTATE_BV names a component XCR0 does not enable, even one outside RFBM.
        assert_restore_gp(XsaveOp::Xrstor, &ctx, &layout, &header(1 << 5, 0, &[]));
        assert_restore_gp(XsaveOp::Xrstor, &ctx, &layout, &header(1 << 63, 0, &[]));
        // Bytes 23:8 must be zero: XCOMP_BV without bit 63, and the next eight bytes.
        assert_restore_gp(XsaveOp::Xrstor, &ctx, &layout, &header(0x3, 0x3, &[]));
        assert_restore_gp(XsaveOp::Xrstor, &ctx, &layout, &header(0x3, 0, &[(23, 1)]));
        // Bytes 63:24 are not checked by the standard form.
        let mut state = init_state();
        let mut mem = FakeMemory::new();
        mem.set(0, &[0; 576]);
        mem.set(24, &MXCSR_INIT.to_le_bytes());
        mem.set(512, &header(0x3, 0, &[(24, 1), (63, 0xff)]));
        run(XsaveOp::Xrstor, &ctx, &layout, &mut state, &mut mem).unwrap();
    }

    #[test]
    fn compacted_xrstor_header_checks() {
        let layout = big_layout();
        let ctx = XsaveContext {
            xss: 1 << SUPERVISOR,
            ..ctx(AVX_XCR0, !0)
        };
        let compacted = XCOMP_BV_COMPACTED_FORMAT;
        // XCOMP_BV names a component XCR0 does not enable; for XRSTOR, IA32_XSS does not count.
        assert_restore_gp(
            XsaveOp::Xrstor,
            &ctx,
            &layout,
            &header(0, compacted | 1 << 5, &[]),
        );
        assert_restore_gp(
            XsaveOp::Xrstor,
            &ctx,
            &layout,
            &header(0, compacted | 1 << SUPERVISOR, &[]),
        );
        assert_restore_gp(
            XsaveOp::Xrstors,
            &ctx,
            &layout,
            &header(0, compacted | 1 << 5, &[]),
        );
        // XSTATE_BV names a component XCOMP_BV does not.
        assert_restore_gp(
            XsaveOp::Xrstor,
            &ctx,
            &layout,
            &header(0x4, compacted | 0x3, &[]),
        );
        // Bytes 63:16 must be zero.
        for offset in [16, 40, 63] {
            assert_restore_gp(
                XsaveOp::Xrstor,
                &ctx,
                &layout,
                &header(0x3, compacted | 0x3, &[(offset, 1)]),
            );
        }
        // A CPU without XSAVEC has no compacted form.
        let old_cpu = XsaveLayout::new(false).with_component(2, user(256, 576, false));
        assert_restore_gp(
            XsaveOp::Xrstor,
            &ctx,
            &old_cpu,
            &header(0x3, compacted | 0x3, &[]),
        );
    }

    #[test]
    fn xrstors_needs_the_compacted_format() {
        let layout = big_layout();
        assert_restore_gp(
            XsaveOp::Xrstors,
            &ctx(AVX_XCR0, !0),
            &layout,
            &header(0x3, 0, &[]),
        );
    }

    #[test]
    fn xrstors_accepts_initial_supervisor_state_and_refuses_live_state() {
        let layout = big_layout();
        let ctx = XsaveContext {
            xss: 1 << SUPERVISOR,
            ..ctx(AVX_XCR0, !0)
        };
        let xcomp_bv = AVX_XCR0 | 1 << SUPERVISOR | XCOMP_BV_COMPACTED_FORMAT;
        let mut mem = FakeMemory::new();
        mem.set(0, &[0; 576]);
        mem.set(24, &MXCSR_INIT.to_le_bytes());
        mem.header(0x3 | 1 << SUPERVISOR, xcomp_bv);
        // The supervisor component sits after AVX: 576 + 256.
        mem.set(832, &[0; 16]);
        let mut state = busy_state(&layout, AVX_XCR0);
        run(XsaveOp::Xrstors, &ctx, &layout, &mut state, &mut mem).unwrap();
        assert_eq!(xstate_bv(&state), 0x3);
        assert_eq!(&state[576..832], &[0; 256]);

        mem.set(840, &[1]);
        let before = state.clone();
        assert!(matches!(
            run(XsaveOp::Xrstors, &ctx, &layout, &mut state, &mut mem),
            Err(XsaveError::Unsupported {
                component: SUPERVISOR,
                ..
            })
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn xrstor_keeps_a_non_default_mxcsr_with_sse_state() {
        let layout = avx_layout();
        let mut state = init_state();
        // Stale XMM bytes behind a clear XSTATE_BV[1].
        state[160..416].fill(0x55);
        let mut mem = FakeMemory::new();
        mem.set(24, &0x1fa0u32.to_le_bytes());
        mem.header(0, 0);
        run(
            XsaveOp::Xrstor,
            &ctx(AVX_XCR0, XFEATURE_MASK_YMM),
            &layout,
            &mut state,
            &mut mem,
        )
        .unwrap();
        assert_eq!(xstate_bv(&state), XFEATURE_MASK_SSE);
        assert_eq!(&state[160..416], &[0; 256]);
    }

    // ---- Faults ----

    #[test]
    fn restore_memory_fault_leaves_the_state_unchanged() {
        let layout = avx_layout();
        let mut source = busy_state(&layout, AVX_XCR0);
        let mut mem = FakeMemory::new();
        mem.header(0, 0);
        run(
            XsaveOp::Xsave,
            &ctx(AVX_XCR0, !0),
            &layout,
            &mut source,
            &mut mem,
        )
        .unwrap();
        for fault in [0..1, 24..28, 200..201, 512..513, 700..701] {
            let mut mem = FakeMemory {
                bytes: mem.bytes.clone(),
                ..FakeMemory::new().faulting(fault.clone())
            };
            let mut state = init_state();
            assert_eq!(
                run(
                    XsaveOp::Xrstor,
                    &ctx(AVX_XCR0, !0),
                    &layout,
                    &mut state,
                    &mut mem
                ),
                Err(XsaveError::Memory(fault.start))
            );
            assert_eq!(state, init_state(), "fault at {fault:?}");
        }
    }

    #[test]
    fn save_memory_fault_propagates() {
        let layout = avx_layout();
        for op in [
            XsaveOp::Xsave,
            XsaveOp::Xsaveopt,
            XsaveOp::Xsavec,
            XsaveOp::Xsaves,
        ] {
            let mut state = busy_state(&layout, AVX_XCR0);
            let before = state.clone();
            let mut mem = FakeMemory::new().faulting(600..601);
            assert_eq!(
                run(op, &ctx(AVX_XCR0, !0), &layout, &mut state, &mut mem),
                Err(XsaveError::Memory(600))
            );
            assert_eq!(state, before);
        }
    }

    // ---- Hostile input ----

    #[test]
    fn components_the_layout_cannot_hold_are_errors() {
        let mut state = busy_state(&avx_layout(), AVX_XCR0);
        let mut mem = FakeMemory::new();
        mem.header(0, XCOMP_BV_COMPACTED_FORMAT);
        for op in all_ops() {
            // XCR0 enables a component CPUID does not describe.
            assert!(matches!(
                run(
                    op,
                    &ctx(AVX_XCR0 | 1 << 40, !0),
                    &avx_layout(),
                    &mut state,
                    &mut mem
                ),
                Err(XsaveError::Unsupported { component: 40, .. })
            ));
        }
        let hostile = [
            (user(u32::MAX, u32::MAX, true), "huge size and offset"),
            (user(256, u32::MAX - 10, false), "offset beyond the buffer"),
            (user(256, 100, false), "offset inside the legacy region"),
            (user(4000, 576, false), "size beyond the buffer"),
            (
                XstateComponent {
                    size: 256,
                    offset: 0,
                    supervisor: true,
                    aligned: false,
                },
                "supervisor component enabled in XCR0",
            ),
        ];
        // Standard-format restores below.
        mem.header(0, 0);
        for (component, what) in hostile {
            let layout = XsaveLayout::new(true).with_component(2, component);
            for op in [XsaveOp::Xsave, XsaveOp::Xsaveopt, XsaveOp::Xrstor] {
                let mut state = init_state();
                let result = run(op, &ctx(AVX_XCR0, !0), &layout, &mut state, &mut mem);
                assert!(
                    matches!(
                        result,
                        Err(XsaveError::Unsupported { .. } | XsaveError::StateTooSmall { .. })
                    ),
                    "{op:?} with {what}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn short_state_buffers_are_errors() {
        let layout = avx_layout();
        for len in [0, 100, 575, 576, 800] {
            for op in all_ops() {
                let mut state = init_state();
                state.truncate(len);
                let mut mem = FakeMemory::new();
                mem.header(0, AVX_XCR0 | XCOMP_BV_COMPACTED_FORMAT);
                let result = run(op, &ctx(AVX_XCR0, !0), &layout, &mut state, &mut mem);
                assert!(
                    matches!(result, Err(XsaveError::StateTooSmall { .. })),
                    "{op:?} with {len} bytes: {result:?}"
                );
            }
        }
        // A buffer that holds x87 and SSE is enough when AVX is not requested.
        let mut state = init_state();
        state.truncate(576);
        let mut mem = FakeMemory::new();
        run(XsaveOp::Xsave, &ctx(0x3, !0), &layout, &mut state, &mut mem).unwrap();
    }

    /// xorshift64*, so the fuzz loop below is repeatable.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bits(&mut self) -> u64 {
            // Mostly plausible bitmaps, sometimes anything.
            match self.next() % 4 {
                0 => self.next(),
                1 => self.next() | XCOMP_BV_COMPACTED_FORMAT,
                _ => self.next() & 0x20ee7,
            }
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let layouts = [avx_layout(), big_layout(), XsaveLayout::new(false)];
        let (mut completed, mut faulted) = (0, 0);
        for round in 0..5000 {
            let layout = &layouts[round % layouts.len()];
            let op = all_ops()[(rng.next() % 6) as usize];
            let ctx = XsaveContext {
                xcr0: rng.bits(),
                xss: rng.bits(),
                rfbm_request: rng.bits(),
                addr: AREA + (rng.next() % 4) * 32,
                rex_w: rng.next() % 2 == 0,
            };
            let mut state = busy_state(&big_layout(), AVX512_XCR0 | 1 << PKRU | 1 << ALIGNED);
            set_xstate_bv(&mut state, rng.bits());
            state.truncate([KVM_XSAVE_SIZE, 576, 1000, 3000][(rng.next() % 4) as usize]);
            let mut mem = FakeMemory::new();
            for byte in mem.bytes.iter_mut() {
                *byte = rng.next() as u8;
            }
            mem.header(rng.bits(), rng.bits());
            if rng.next() % 8 == 0 {
                let start = rng.next() % 4096;
                mem.fault = Some(start..start + 1);
            }
            match run(op, &ctx, layout, &mut state, &mut mem) {
                Ok(()) => completed += 1,
                Err(XsaveError::GeneralProtection(_)) => faulted += 1,
                Err(_) => {}
            }
        }
        // The inputs reach the instructions' work, not only the early checks.
        assert!(
            completed > 100 && faulted > 100,
            "{completed} completed, {faulted} #GP"
        );
    }
}
