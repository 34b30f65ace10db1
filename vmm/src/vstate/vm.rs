//! The KVM VM: in-kernel interrupt controllers (PIC, IOAPIC, LAPICs), the PIT, and guest
//! memory registered as KVM memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDRESS;

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create a KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("cannot set the TSS address")]
    TssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel interrupt controllers")]
    IrqChip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory slot {slot} at {guest_addr:#x}")]
    MemorySlot {
        slot: u32,
        guest_addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A VM with its memory in place.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM, its interrupt controllers and timer, and registers `memory`.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::TssAddress)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        // The speaker port is a dummy: the guest may poke port 0x61 while calibrating.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;

        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let guest_addr = region.start_addr().raw_value();
            let host_addr = memory
                .get_host_address(region.start_addr())
                .expect("the region's own start address is in guest memory");
            let mem_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: guest_addr,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
                flags: 0,
            };
            // SAFETY: the region describes an mmap owned by `memory`, which the returned `Vm`
            // keeps alive as long as the VM fd exists, and slots do not overlap because they
            // come from one `GuestMemoryMmap`.
            unsafe { fd.set_user_memory_region(mem_region) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    guest_addr,
                    source,
                }
            })?;
        }
        Ok(Self { fd, memory })
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}
