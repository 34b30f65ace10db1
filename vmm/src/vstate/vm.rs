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
    /// `madvise(MADV_DONTDUMP)` on guest memory failed.
    #[error("cannot keep guest memory out of core dumps")]
    DontDump(#[source] std::io::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory slot {slot} at {guest_addr:#x}")]
    MemorySlot {
        slot: u32,
        guest_addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Keeps guest RAM out of hull-vmm's core dumps (`MADV_DONTDUMP`): it is the guest's data, and
/// a crash of the VMM must not write it to the host's disk (nor take minutes to dump it).
pub fn exclude_from_core_dumps(memory: &GuestMemoryMmap) -> std::io::Result<()> {
    for region in memory.iter() {
        let host = memory
            .get_host_address(region.start_addr())
            .expect("the region's own start address is in guest memory");
        // SAFETY: the range is exactly one mapping `memory` owns; MADV_DONTDUMP only sets the
        // mapping's flag that core dumps skip, and changes no memory.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTDUMP) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether the mapping that holds `addr` is left out of core dumps (`dd` in its `VmFlags` in
/// `/proc/self/smaps`); `None` if nothing is mapped there.
pub fn excluded_from_core_dumps(addr: *const u8) -> Option<bool> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let addr = addr as usize;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line
            .split_once(' ')
            .and_then(|(range, _)| range.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((start, end)) = range {
            inside = start <= addr && addr < end;
        } else if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
            return Some(flags.split_whitespace().any(|f| f == "dd"));
        }
    }
    None
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
        exclude_from_core_dumps(&memory).map_err(VmError::DontDump)?;

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

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn guest_memory_is_left_out_of_core_dumps() {
        let memory = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let starts: Vec<*const u8> = memory
            .iter()
            .map(|r| memory.get_host_address(r.start_addr()).unwrap() as *const u8)
            .collect();
        for start in &starts {
            assert_eq!(excluded_from_core_dumps(*start), Some(false));
        }
        exclude_from_core_dumps(&memory).unwrap();
        for start in &starts {
            assert_eq!(excluded_from_core_dumps(*start), Some(true));
        }
    }
}
