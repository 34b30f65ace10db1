//! The KVM state of a paused VM: each vCPU's, and the VM's own (interrupt controllers, PIT,
//! clock). Read and set in the order that works on both KVM kinds this project runs on
//! (`../shared/DESIGN.md`, "Warm start on this host"; Firecracker's order).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// `IA32_TSC_DEADLINE`: set last, once the LAPIC's timer mode is in place.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs KVM reads and sets beyond its index list (measured on PVM and on hardware KVM).
const EXTRA_MSRS: [u32; 18] = [
    0xc000_0103, // TSC_AUX
    0x0000_0048, // SPEC_CTRL
    0x0000_001b, // APICBASE
    0xc000_0080, // EFER
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0x0000_02ff, // MTRRdefType
    0x0000_0250, // MTRRfix64K_00000
    0x0000_0258, // MTRRfix16K_80000
    0x0000_0259, // MTRRfix16K_A0000
    0x0000_0268, // MTRRfix4K_C0000
    0x0000_0269,
    0x0000_026a,
    0x0000_026b,
    0x0000_026c,
    0x0000_026d,
    0x0000_026e,
    0x0000_026f, // MTRRfix4K_F8000
];
/// Variable MTRR base/mask pairs read.
const VARIABLE_MTRRS: u32 = 8;

/// Why a state cannot be read or set.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("vcpu{index}: {what}")]
    Vcpu {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}")]
    Vm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "this host's XSAVE state is {size} bytes, over the {} that KVM_GET_XSAVE holds",
        std::mem::size_of::<kvm_xsave>()
    )]
    XsaveTooLarge { size: i32 },
    #[error("vcpu{index}: the snapshot's {what} does not fit this host's KVM")]
    Shape { index: u8, what: &'static str },
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The VM's own state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs a snapshot reads: KVM's list and those it takes beyond it.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm.get_msr_index_list().map_err(|source| StateError::Vm {
        what: "cannot read KVM's MSR index list",
        source,
    })?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    indices.extend(EXTRA_MSRS);
    indices.extend((0..VARIABLE_MTRRS * 2).map(|i| 0x200 + i));
    indices.sort_unstable();
    indices.dedup();
    // Last, so that it is set after the LAPIC timer mode it depends on.
    indices.retain(|&i| i != MSR_IA32_TSC_DEADLINE);
    indices.push(MSR_IA32_TSC_DEADLINE);
    Ok(indices)
}

/// Fails unless the host's XSAVE state fits `kvm_xsave` (no AMX).
pub fn check_xsave_size(vm: &VmFd) -> Result<(), StateError> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if size > std::mem::size_of::<kvm_xsave>() as i32 {
        return Err(StateError::XsaveTooLarge { size });
    }
    Ok(())
}

fn entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

/// Reads the MSRs of `indices` that this vCPU has. KVM stops a batch at the first MSR it
/// refuses; that one is left out and the rest read again.
fn read_msrs(fd: &VcpuFd, index: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let mut msrs = Msrs::from_entries(&entries(rest)).map_err(|_| StateError::Shape {
            index,
            what: "MSR list",
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(|source| StateError::Vcpu {
            index,
            what: "cannot read MSRs",
            source,
        })?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Sets `msrs`; one KVM refuses (it stops the batch with a short count: IA32_XSS, MTRRcap and
/// MCG_CAP on PVM) is skipped with a debug line, and the rest set.
fn write_msrs(fd: &VcpuFd, index: u8, msrs: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let batch = Msrs::from_entries(rest).map_err(|_| StateError::Shape {
            index,
            what: "MSR list",
        })?;
        let written = fd.set_msrs(&batch).map_err(|source| StateError::Vcpu {
            index,
            what: "cannot set MSRs",
            source,
        })?;
        if written < rest.len() {
            log::debug!(
                "vcpu{index}: KVM refused MSR {:#x} on restore",
                rest[written].index
            );
        }
        rest = &rest[(written + 1).min(rest.len())..];
    }
    Ok(())
}

impl VcpuState {
    /// Reads the state of paused vCPU `index` (its pending exit completed).
    pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, StateError> {
        let kvm = |what: &'static str| {
            move |source| StateError::Vcpu {
                index,
                what,
                source,
            }
        };
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("cannot read CPUID"))?;
        Ok(Self {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm("cannot read the MP state"))?,
            regs: fd.get_regs().map_err(kvm("cannot read registers"))?,
            sregs: fd
                .get_sregs()
                .map_err(kvm("cannot read special registers"))?,
            xsave: fd.get_xsave().map_err(kvm("cannot read XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(kvm("cannot read XCRs"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(kvm("cannot read debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm("cannot read the local APIC"))?,
            msrs: read_msrs(fd, index, msr_indices)?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm("cannot read pending events"))?,
        })
    }

    /// Sets this state on a new vCPU of a new VM, in the order that works.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let index = self.index;
        let kvm = |what: &'static str| {
            move |source| StateError::Vcpu {
                index,
                what,
                source,
            }
        };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::Shape {
            index,
            what: "CPUID",
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("cannot set CPUID"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("cannot set the MP state"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm("cannot set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("cannot set special registers"))?;
        // SAFETY: `kvm_xsave` is the 4 KiB layout KVM_SET_XSAVE reads, and `check_xsave_size`
        // has made sure that this host's state fits it (it was read by KVM_GET_XSAVE).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("cannot set XSAVE state"))?;
        // A host without XSAVE reads no XCRs and refuses to set any (EINVAL).
        if self.xcrs.nr_xcrs > 0 {
            fd.set_xcrs(&self.xcrs).map_err(kvm("cannot set XCRs"))?;
        }
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("cannot set debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm("cannot set the local APIC"))?;
        write_msrs(fd, index, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("cannot set pending events"))?;
        Ok(())
    }
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|source| StateError::Vm { what, source })?;
    Ok(chip)
}

impl VmState {
    /// Reads the VM's state; its vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let kvm = |what: &'static str| move |source| StateError::Vm { what, source };
        Ok(Self {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "cannot read the master PIC")?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "cannot read the slave PIC")?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "cannot read the IOAPIC")?,
            pit: vm.get_pit2().map_err(kvm("cannot read the PIT"))?,
            clock: vm.get_clock().map_err(kvm("cannot read the KVM clock"))?,
        })
    }

    /// Sets the state on a new VM whose vCPUs have their state. The KVM clock is set to the
    /// snapshot's value and does not advance by the time since: the guest sees no time pass
    /// (its wall clock is the agent's to set from the host after a restore).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        let kvm = |what: &'static str| move |source| StateError::Vm { what, source };
        vm.set_pit2(&self.pit).map_err(kvm("cannot set the PIT"))?;
        // No KVM_CLOCK_REALTIME: that would advance the clock by the wall time since.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(kvm("cannot set the KVM clock"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(kvm("cannot set the master PIC"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(kvm("cannot set the slave PIC"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(kvm("cannot set the IOAPIC"))?;
        Ok(())
    }
}
