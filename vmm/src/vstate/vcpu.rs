//! vCPUs: boot-time configuration and the run loop.
//!
//! Each vCPU runs on its own thread. Exits are dispatched by `handle_exit`, a plain function
//! that knows no device addresses: port and MMIO accesses go to the buses. What ends the VM
//! (a reset, a triple fault, an instruction nobody can run) is sent to the VMM thread, which
//! stops the other vCPUs. Pausing, resuming and stopping a vCPU are `run_state`'s.

use std::sync::Arc;
use std::thread::JoinHandle;

use devices::Bus;
use kvm_bindings::{
    kvm_lapic_state, kvm_regs, kvm_sregs, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::{cpuid, msr, paging, regs, xsave};
use crate::builder::Stopper;
use crate::emulation::{self, Assist};
use crate::thread::{Spawner, ThreadKind};
use crate::vstate::run_state::{Resume, VcpuControl};
use crate::vstate::vm::Vm;
use crate::vstate::xstate;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vcpu{index}: {what}")]
    Kvm {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Boot structures could not be written.
    #[error("vcpu{index}: boot state")]
    Regs {
        index: u8,
        #[source]
        source: regs::RegsError,
    },
    /// The vCPU thread could not be started.
    #[error("vcpu{index}: cannot start its thread")]
    Thread {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset or a KVM reset event): hull's way to power off.
    Reset,
    /// The guest powered off through a KVM system event.
    PowerOff,
    /// The guest triple-faulted; the text is a diagnosis.
    TripleFault(String),
    /// The VM cannot go on; the text says why.
    Failed(String),
    /// The host stopped the VM (hull-vmm's container supervisor); the text says why.
    Stopped(String),
    /// A thread of hull-vmm panicked (a bug in hull-vmm, not the guest's doing).
    ThreadPanicked { thread: String, message: String },
}

impl VmExit {
    /// The exit status of hull-vmm for this ending.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::PowerOff | VmExit::Stopped(_) => 0,
            VmExit::TripleFault(_) | VmExit::Failed(_) | VmExit::ThreadPanicked { .. } => 1,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => f.write_str("the guest reset the machine"),
            VmExit::PowerOff => f.write_str("the guest powered off"),
            VmExit::TripleFault(diag) => write!(f, "the guest triple-faulted: {diag}"),
            VmExit::Failed(why) => f.write_str(why),
            VmExit::Stopped(why) => write!(f, "stopped by the host: {why}"),
            VmExit::ThreadPanicked { thread, message } => {
                write!(f, "hull-vmm's thread `{thread}` panicked: {message}")
            }
        }
    }
}

/// The buses a vCPU hands its I/O exits to.
#[derive(Clone, Default)]
pub struct IoBuses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the guest again.
    Continue,
    /// The host's instruction emulator gave up; see `kvm_run.emulation_failure`.
    EmulationFailure,
    /// The guest triple-faulted; the caller adds a diagnosis from the vCPU state.
    TripleFault,
    /// The VM ends.
    Stop(VmExit),
}

/// Dispatches one vCPU exit.
pub fn handle_exit(exit: VcpuExit<'_>, io: &IoBuses) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            io.pio.read(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            io.pio.write(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            io.mmio.read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            io.mmio.write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => ExitAction::Continue,
        VcpuExit::InternalError => ExitAction::EmulationFailure,
        VcpuExit::Shutdown => ExitAction::TripleFault,
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => ExitAction::Stop(VmExit::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => ExitAction::Stop(VmExit::PowerOff),
        VcpuExit::Hlt => ExitAction::Stop(VmExit::Failed(
            "the guest halted a vCPU outside the in-kernel interrupt controller".into(),
        )),
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(VmExit::Failed(format!(
            "KVM could not enter the guest on cpu {cpu}: hardware entry failure reason {reason:#x}"
        ))),
        other => ExitAction::Stop(VmExit::Failed(format!("unexpected vCPU exit {other:?}"))),
    }
}

/// Counts of instructions the emulation assist completed, for diagnostics and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssistStats {
    /// INT3 stepped over with a breakpoint injected.
    pub int3: u64,
    /// FWAIT stepped over.
    pub fwait: u64,
    /// XSAVE-family instructions and XSETBV/XGETBV executed.
    pub xstate: u64,
    /// Time hull-vmm spent executing them (ioctls, page walks, copies), in nanoseconds.
    pub xstate_ns: u64,
}

/// An exception to raise: vector, error code, CR2.
type Exception = (u8, Option<u32>, Option<u64>);

/// Turns an extended-state outcome into (RIP advance, exception): a completed instruction is
/// stepped over; a fault leaves RIP on it.
fn resolve(outcome: xstate::Outcome, len: u64) -> (u64, Option<Exception>) {
    match outcome {
        xstate::Outcome::Completed => (len, None),
        xstate::Outcome::Fault {
            vector,
            error_code,
            cr2,
        } => (0, Some((vector, error_code, cr2))),
    }
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io: IoBuses,
    memory: GuestMemoryMmap,
    stats: AssistStats,
    /// Where the host's XSAVE components live; computed at the first XSAVE-family exit.
    xsave_layout: Option<xsave::XsaveLayout>,
}

/// Local APIC register offsets and delivery modes used to wire LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(vm: &Vm, index: u8, io: IoBuses) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "cannot create the vCPU",
                source,
            })?;
        Ok(Self {
            index,
            fd,
            io,
            memory: vm.memory().clone(),
            stats: AssistStats::default(),
            xsave_layout: None,
        })
    }

    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets a snapshot's state on this new vCPU, instead of [`Vcpu::configure`].
    pub fn restore_state(
        &self,
        state: &crate::snapshot::VcpuState,
    ) -> Result<(), crate::snapshot::StateError> {
        state.restore(&self.fd)
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID, MSRs and the local APIC's legacy interrupt lines; the boot vCPU (index 0)
    /// also gets the 64-bit boot state with RIP at `entry`. The others wait for INIT/SIPI.
    pub fn configure(
        &mut self,
        kvm: &Kvm,
        vcpu_count: u8,
        entry: GuestAddress,
    ) -> Result<(), VcpuError> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm_err("cannot read the supported CPUID"))?;
        cpuid::filter(cpuid.as_mut_slice(), self.index, vcpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("cannot set CPUID"))?;

        let msrs = msr::boot_msrs();
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("cannot set the boot MSRs"))?;
        if written < msrs.as_slice().len() {
            // KVM stops at the first MSR it refuses; the kernel copes with its default value.
            log::warn!(
                "vcpu{}: KVM refused boot MSR {:#x}",
                self.index,
                msrs.as_slice()[written].index
            );
        }

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.kvm_err("cannot read the local APIC"))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            with_delivery_mode(lvt0, APIC_MODE_EXTINT),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            with_delivery_mode(lvt1, APIC_MODE_NMI),
        );
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("cannot set the local APIC"))?;

        if self.index == 0 {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.kvm_err("cannot read special registers"))?;
            let index = self.index;
            let sregs = regs::setup_sregs(&self.memory, sregs)
                .map_err(|source| VcpuError::Regs { index, source })?;
            self.fd
                .set_sregs(&sregs)
                .map_err(self.kvm_err("cannot set special registers"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry.0))
                .map_err(self.kvm_err("cannot set registers"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.kvm_err("cannot set the FPU"))?;
        }
        Ok(())
    }

    /// Starts the run loop on its own thread (from `threads`), under `control`. When the VM
    /// must end, `stopper` is told why.
    pub fn start(
        self,
        threads: &Spawner,
        control: Arc<VcpuControl>,
        stopper: Stopper,
    ) -> Result<JoinHandle<AssistStats>, VcpuError> {
        let index = self.index;
        threads
            .spawn(ThreadKind::Vcpu(index), move || {
                let mut vcpu = self;
                // Declared after `vcpu`, so dropped before it (on a panic too): the owner stops
                // touching `kvm_run` before the vCPU fd unmaps it.
                let registration = control.register(&mut vcpu.fd);
                if let Some(exit) = vcpu.run(&control) {
                    stopper.end(exit);
                }
                drop(registration);
                vcpu.stats
            })
            .map_err(|source| VcpuError::Thread { index, source })
    }

    /// Runs the guest until it ends the VM (returns why) or the owner stops the vCPU (returns
    /// `None`); parks while the owner has it paused (`run_state`).
    fn run(&mut self, control: &VcpuControl) -> Option<VmExit> {
        loop {
            let action = match self.fd.run() {
                Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => self.port_io(),
                Ok(exit) => handle_exit(exit, &self.io),
                // A kick from the owner (KVM has completed any pending I/O exit), or a signal
                // meant for someone else.
                Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                    match control.park(&self.fd) {
                        Resume::Run => ExitAction::Continue,
                        Resume::Stop => return None,
                    }
                }
                Err(err) => ExitAction::Stop(VmExit::Failed(format!(
                    "vcpu{}: KVM_RUN failed: {err}",
                    self.index
                ))),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::EmulationFailure => {
                    if let Err(exit) = self.emulation_assist() {
                        return Some(exit);
                    }
                }
                ExitAction::TripleFault => {
                    return Some(VmExit::TripleFault(self.shutdown_diagnosis()));
                }
                ExitAction::Stop(exit) => return Some(exit),
            }
        }
    }

    /// A port I/O exit, one access at a time: KVM gives `rep ins`/`rep outs` as one exit of
    /// up to a page of accesses of the instruction's size (which `VcpuExit` does not carry; a
    /// 1-byte device must not see them as one wide access).
    fn port_io(&mut self) -> ExitAction {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO (the caller matched it), for which KVM fills
        // the `io` member of the union: plain integers, valid for any bit pattern.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size).max(1);
        let len = size * io.count as usize;
        let start = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        // SAFETY: for a KVM_EXIT_IO exit, KVM puts `size * count` bytes of data at `data_offset`
        // from the start of `kvm_run`, inside the vCPU's mapping (of KVM_GET_VCPU_MMAP_SIZE
        // bytes), which lives as long as `self.fd`; nothing else touches it until the next
        // KVM_RUN, and `run`'s borrow is not used after this.
        let data =
            unsafe { std::slice::from_raw_parts_mut(start.add(io.data_offset as usize), len) };
        for access in data.chunks_mut(size) {
            let exit = if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
                VcpuExit::IoIn(io.port, access)
            } else {
                VcpuExit::IoOut(io.port, access)
            };
            match handle_exit(exit, &self.io) {
                ExitAction::Continue => {}
                other => return other,
            }
        }
        ExitAction::Continue
    }

    /// Completes an instruction the host's emulator refused (PVM hosts), or says why not.
    fn emulation_assist(&mut self) -> Result<(), VmExit> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR (that is how we got here), for
        // which KVM fills the `internal`/`emulation_failure` member of the union; both are
        // plain integers, valid for any bit pattern.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
            // SAFETY: as above; `internal` overlays the same bytes and is plain integers.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let ndata = (internal.ndata as usize).min(internal.data.len());
            return Err(VmExit::Failed(format!(
                "vcpu{}: KVM internal error, suberror {}, data {:x?}; {}",
                self.index,
                internal.suberror,
                &internal.data[..ndata],
                self.diagnosis()
            )));
        }
        // SAFETY: the union member holds plain bytes, valid for any bit pattern.
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        let mut regs = self.fd.get_regs().map_err(|e| {
            VmExit::Failed(format!("vcpu{}: cannot read registers: {e}", self.index))
        })?;
        let bytes = if failure.flags
            & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            != 0
        {
            insn.insn_bytes[..usize::from(insn.insn_size).min(insn.insn_bytes.len())].to_vec()
        } else {
            self.code_at_rip(regs.rip)
        };
        let index = self.index;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            VmExit::Failed(format!("vcpu{index}: emulation assist: {what}: {e}"))
        };
        // Either step over the instruction (optionally raising a trap after it), or raise a
        // fault with RIP left on it.
        let (step, exception) = match emulation::assist(&bytes) {
            Assist::Skip { len } => {
                self.stats.fwait += 1;
                (len, None)
            }
            Assist::SkipAndInject { len, vector } => {
                self.stats.int3 += 1;
                (len, Some((vector, None, None)))
            }
            Assist::ExtendedState { op, rex_w, insn } => {
                self.stats.xstate += 1;
                let started = std::time::Instant::now();
                let layout = self.xsave_layout.get_or_insert_with(xstate::host_layout);
                let outcome =
                    xstate::execute_xsave(&self.fd, &self.memory, layout, op, rex_w, &insn, &regs)
                        .map_err(|e| fail("extended state", &e))?;
                self.stats.xstate_ns += started.elapsed().as_nanos() as u64;
                resolve(outcome, insn.len() as u64)
            }
            Assist::Xsetbv { len } => {
                self.stats.xstate += 1;
                resolve(
                    xstate::execute_xsetbv(&self.fd, &regs).map_err(|e| fail("xsetbv", &e))?,
                    len,
                )
            }
            Assist::Xgetbv { len } => {
                self.stats.xstate += 1;
                resolve(
                    xstate::execute_xgetbv(&self.fd, &mut regs).map_err(|e| fail("xgetbv", &e))?,
                    len,
                )
            }
            Assist::Unhandled(insn) => {
                return Err(VmExit::Failed(format!(
                    "vcpu{index}: the host cannot emulate guest instruction {insn} at RIP {:#x}",
                    regs.rip
                )))
            }
        };
        regs.rip = regs.rip.wrapping_add(step);
        self.fd
            .set_regs(&regs)
            .map_err(|e| fail("cannot set registers", &e))?;
        if let Some((vector, error_code, cr2)) = exception {
            if let Some(cr2) = cr2 {
                let mut sregs = self
                    .fd
                    .get_sregs()
                    .map_err(|e| fail("cannot read special registers", &e))?;
                sregs.cr2 = cr2;
                self.fd
                    .set_sregs(&sregs)
                    .map_err(|e| fail("cannot set CR2", &e))?;
            }
            let mut events = self
                .fd
                .get_vcpu_events()
                .map_err(|e| fail("cannot read pending events", &e))?;
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = u8::from(error_code.is_some());
            events.exception.error_code = error_code.unwrap_or(0);
            events.exception.pending = 0;
            self.fd
                .set_vcpu_events(&events)
                .map_err(|e| fail("cannot inject the exception", &e))?;
        }
        Ok(())
    }

    /// Up to 15 bytes of guest code at `rip`, read through the guest's page tables (fewer
    /// when the next page is not mapped).
    fn code_at_rip(&self, rip: u64) -> Vec<u8> {
        let Ok(sregs) = self.fd.get_sregs() else {
            return Vec::new();
        };
        let user = sregs.cs.dpl == 3;
        let mut bytes = [0u8; 15];
        let in_page = (paging::PAGE_SIZE - (rip & (paging::PAGE_SIZE - 1))) as usize;
        for len in [bytes.len(), in_page.min(bytes.len())] {
            if paging::read_virt(&self.memory, &sregs, rip, &mut bytes[..len], user).is_ok() {
                return bytes[..len].to_vec();
            }
        }
        Vec::new()
    }

    /// The vCPU's state at a shutdown (triple fault), unless KVM reset the vCPU before
    /// reporting it: that state is the reset vector's, not the fault's, and naming it as the
    /// fault would send whoever reads the report to the wrong place.
    fn shutdown_diagnosis(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) if is_reset_state(&regs, &sregs) => format!(
                "vcpu{}: its state at the fault is not available (KVM reset the vCPU before \
                 reporting the shutdown, as its AMD SVM path does)",
                self.index
            ),
            _ => self.diagnosis(),
        }
    }

    /// The vCPU's state at a fatal exit: RIP, the instruction bytes there, control registers.
    fn diagnosis(&self) -> String {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return format!("vcpu{}: registers unreadable", self.index);
        };
        let code = self.code_at_rip(regs.rip);
        let insn = if code.is_empty() {
            "unreadable".to_owned()
        } else {
            emulation::describe(&code).to_string()
        };
        format!(
            "vcpu{} at RIP {:#x} (instruction {insn}), RSP {:#x}, CR0 {:#x}, CR3 {:#x}, \
             CR4 {:#x}, EFER {:#x}",
            self.index, regs.rip, regs.rsp, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        )
    }
}

/// Whether a vCPU is in the state x86 defines after RESET: real mode at the reset vector
/// (CS selector 0xf000, base 0xffff0000, RIP 0xfff0). hull boots straight into 64-bit mode,
/// so a guest never runs there; seen at a shutdown exit, it means KVM reset the vCPU (AMD SVM
/// does, because the VMCB is undefined after a shutdown intercept; Intel VMX keeps the state).
fn is_reset_state(regs: &kvm_regs, sregs: &kvm_sregs) -> bool {
    const CR0_PE: u64 = 1;
    regs.rip == 0xfff0
        && sregs.cs.selector == 0xf000
        && sregs.cs.base == 0xffff_0000
        && sregs.cr0 & CR0_PE == 0
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use devices::BusDevice;

    use super::*;

    #[derive(Default)]
    struct Port {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Port {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn buses() -> (IoBuses, Arc<Mutex<Port>>, Arc<Mutex<Port>>) {
        let pio_dev = Arc::new(Mutex::new(Port::default()));
        let mmio_dev = Arc::new(Mutex::new(Port::default()));
        let mut io = IoBuses::default();
        io.pio.insert(pio_dev.clone(), 0x3f8, 8).unwrap();
        io.mmio
            .insert(mmio_dev.clone(), 0xd000_0000, 0x1000)
            .unwrap();
        (io, pio_dev, mmio_dev)
    }

    #[test]
    fn io_exits_go_to_the_buses() {
        let (io, pio, mmio) = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &io),
            ExitAction::Continue
        );
        assert_eq!(pio.lock().unwrap().last_write, Some((0, b"A".to_vec())));
        let mut byte = [0u8];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut byte), &io),
            ExitAction::Continue
        );
        assert_eq!(byte, [0x45]);
        let mut word = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0004, &mut word), &io);
        assert_eq!(word, [0x44; 4]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0070, &[1, 0, 0, 0]), &io);
        assert_eq!(
            mmio.lock().unwrap().last_write,
            Some((0x70, vec![1, 0, 0, 0]))
        );
        // Nobody home: reads as ones, the guest goes on.
        let mut none = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x2f8, &mut none), &io),
            ExitAction::Continue
        );
        assert_eq!(none, [0xff; 2]);
    }

    #[test]
    fn ending_exits_stop_the_vm() {
        let io = IoBuses::default();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &io),
            ExitAction::TripleFault
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &io),
            ExitAction::EmulationFailure
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &io),
            ExitAction::Stop(VmExit::Reset)
        );
        let ExitAction::Stop(VmExit::Failed(why)) = handle_exit(VcpuExit::FailEntry(0x21, 0), &io)
        else {
            panic!("a failed entry must stop the VM");
        };
        assert!(why.contains("0x21"), "{why}");
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::TripleFault(String::new()).exit_code(), 1);
    }

    #[test]
    fn the_reset_state_is_told_apart_from_a_fault() {
        let mut regs = kvm_regs {
            rip: 0xfff0,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0xf000;
        sregs.cs.base = 0xffff_0000;
        sregs.cr0 = 0x6000_0010;
        assert!(is_reset_state(&regs, &sregs));
        // A 64-bit guest that faulted: protected mode, its own RIP.
        let mut faulted = sregs;
        faulted.cr0 = 0x8005_0033;
        assert!(!is_reset_state(&regs, &faulted));
        regs.rip = 0x100_0007;
        assert!(!is_reset_state(&regs, &sregs));
        regs.rip = 0xfff0;
        let mut other_segment = sregs;
        other_segment.cs.base = 0;
        assert!(!is_reset_state(&regs, &other_segment));
    }

    #[test]
    fn lapic_lint_wiring() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        let lvt0 = with_delivery_mode(lapic_reg(&lapic, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(lvt0, 0x0001_0700);
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }
}
