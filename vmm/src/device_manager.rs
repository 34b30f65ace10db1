//! Puts devices on the buses and wires their interrupts and notifications into KVM.
//!
//! Legacy devices sit at their fixed PC ports. Virtio devices get a 4 KiB window in the MMIO
//! gap and a legacy interrupt line each, and are announced to the guest on the kernel command
//! line (`virtio_mmio.device=4K@0xd0000000:5`), so the guest needs no ACPI and no PCI.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::{
    I8042Device, SerialDevice, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_IRQ, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN,
};
use devices::virtio::mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use devices::virtio::{MmioState, MmioTransport, MmioTransportError, VirtioDevice};
use devices::BusError;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{MMIO_GAP_START, VIRTIO_IRQS, VIRTIO_MMIO_WINDOW};
use crate::vstate::vcpu::IoBuses;

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for {device}")]
    EventFd {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("cannot wire {device} into KVM")]
    Kvm {
        device: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The device's range is taken.
    #[error("cannot put {device} on the bus")]
    Bus {
        device: &'static str,
        #[source]
        source: BusError,
    },
    /// A snapshot's serial state does not fit a 16550.
    #[error("the snapshot's serial port state is invalid: {0}")]
    SerialState(String),
    /// The virtio transport could not be created.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioTransportError),
    /// Every virtio window or interrupt line is in use.
    #[error("no room for another virtio device (at most {max})")]
    NoSlot { max: usize },
}

/// A virtio-mmio window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base of the 4 KiB register window.
    pub addr: u64,
    /// Legacy interrupt line (GSI).
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel command-line argument that announces a virtio-mmio device in this slot.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_WINDOW >> 10,
            self.addr,
            self.irq
        )
    }
}

/// Owns the buses while the VM is being built.
#[derive(Default)]
pub struct DeviceManager {
    buses: IoBuses,
    slots: Vec<MmioSlot>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The virtio transports, in slot order.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl DeviceManager {
    /// Creates a manager with empty buses.
    pub fn new() -> Self {
        Self::default()
    }

    /// The buses the vCPUs dispatch to.
    pub fn buses(&self) -> &IoBuses {
        &self.buses
    }

    /// Every virtio transport's state, in slot order, for a snapshot; fails if a device is
    /// not quiet (see `VirtioDevice::snapshot_ready`).
    pub fn virtio_states(&self) -> Result<Vec<MmioState>, MmioTransportError> {
        self.transports
            .iter()
            .map(|t| lock_transport(t).save_state())
            .collect()
    }

    /// Puts the virtio transports (attached in the snapshot's order) in the snapshot's state.
    pub fn restore_virtio(&self, states: &[MmioState]) -> Result<(), DeviceError> {
        if states.len() != self.transports.len() {
            return Err(DeviceError::Transport(MmioTransportError::Restore {
                device_type: 0,
                reason: format!(
                    "the snapshot has {} virtio devices, the VM configuration {}",
                    states.len(),
                    self.transports.len()
                ),
            }));
        }
        for (transport, state) in self.transports.iter().zip(states) {
            lock_transport(transport)
                .restore_state(state)
                .map_err(DeviceError::Transport)?;
        }
        Ok(())
    }

    /// The serial port's state, for a snapshot (`None` before [`DeviceManager::attach_legacy`]).
    pub fn serial_state(&self) -> Option<SerialState> {
        self.serial.as_ref().map(|s| {
            s.lock()
                .expect("the serial port never panics while locked")
                .state()
        })
    }

    /// Puts COM1 (writing to `console`; in `state` if restoring) and the i8042 (signalling
    /// `reset_evt`) on the port bus.
    pub fn attach_legacy(
        &mut self,
        vm: &VmFd,
        console: Box<dyn Write + Send>,
        reset_evt: EventFd,
        state: Option<&SerialState>,
    ) -> Result<(), DeviceError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            device: "the serial port",
            source,
        })?;
        vm.register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|source| DeviceError::Kvm {
                device: "the serial port",
                source,
            })?;
        let serial = match state {
            None => SerialDevice::new(irq, console),
            Some(state) => SerialDevice::from_state(irq, console, state)
                .map_err(|e| DeviceError::SerialState(format!("{e:?}")))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        self.serial = Some(serial.clone());
        self.buses
            .pio
            .insert(serial, SERIAL_PORT_BASE, SERIAL_PORT_LEN)
            .map_err(|source| DeviceError::Bus {
                device: "the serial port",
                source,
            })?;
        let i8042 = Arc::new(Mutex::new(I8042Device::new(reset_evt)));
        self.buses
            .pio
            .insert(i8042, I8042_PORT_BASE, I8042_PORT_LEN)
            .map_err(|source| DeviceError::Bus {
                device: "the i8042 controller",
                source,
            })
    }

    /// Reserves the next virtio-mmio window and interrupt line.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, DeviceError> {
        let n = self.slots.len();
        let irq = *VIRTIO_IRQS.get(n).ok_or(DeviceError::NoSlot {
            max: VIRTIO_IRQS.len(),
        })?;
        let slot = MmioSlot {
            addr: MMIO_GAP_START + n as u64 * VIRTIO_MMIO_WINDOW,
            irq,
        };
        self.slots.push(slot);
        Ok(slot)
    }

    /// The kernel command-line arguments announcing every virtio device.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.slots.iter().map(MmioSlot::cmdline_arg).collect()
    }

    /// Attaches a virtio device: a transport in the next MMIO window, each queue's notify
    /// register as a KVM ioeventfd (a guest kick wakes the device without a VM exit to
    /// userspace), and its interrupt as a KVM irqfd. Returns the slot it took.
    pub fn attach_virtio(
        &mut self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<MmioSlot, DeviceError> {
        let transport =
            MmioTransport::new(memory.clone(), device).map_err(DeviceError::Transport)?;
        let slot = self.allocate_mmio_slot()?;
        let kvm_err = |source| DeviceError::Kvm {
            device: "a virtio device",
            source,
        };
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(slot.addr + VIRTIO_MMIO_QUEUE_NOTIFY);
            vm.register_ioevent(evt, &addr, index as u32)
                .map_err(kvm_err)?;
        }
        vm.register_irqfd(transport.interrupt().irq_evt(), slot.irq)
            .map_err(kvm_err)?;
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        self.buses
            .mmio
            .insert(transport, slot.addr, VIRTIO_MMIO_WINDOW)
            .map_err(|source| DeviceError::Bus {
                device: "a virtio device",
                source,
            })?;
        Ok(slot)
    }
}

fn lock_transport(t: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_announced_on_the_cmdline() {
        let mut dm = DeviceManager::new();
        assert_eq!(
            dm.allocate_mmio_slot().unwrap(),
            MmioSlot {
                addr: 0xd000_0000,
                irq: 5
            }
        );
        dm.allocate_mmio_slot().unwrap();
        assert_eq!(
            dm.cmdline_args(),
            vec![
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6"
            ]
        );
        for _ in 2..VIRTIO_IRQS.len() {
            dm.allocate_mmio_slot().unwrap();
        }
        assert!(matches!(
            dm.allocate_mmio_slot(),
            Err(DeviceError::NoSlot { max: 9 })
        ));
    }
}
