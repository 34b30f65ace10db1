//! The interrupt line of one virtio-mmio device, shared by the transport and the device.
//!
//! A virtio-mmio device has a single level-style interrupt and an InterruptStatus register that
//! tells the driver why it fired (used buffers, a configuration change, or both). `IrqTrigger`
//! holds that register and the `EventFd` the VMM registers as a KVM irqfd, so raising an interrupt
//! is one atomic OR plus one eventfd write, from any thread, without KVM in sight.
//!
//! It also carries the two pieces of state a running device needs to report back to the
//! transport: the configuration generation (bumped with every configuration-change interrupt)
//! and the "needs reset" flag a device sets when the guest gives it garbage.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// Errors from the interrupt line.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The irq eventfd could not be created.
    #[error("cannot create the virtio irq eventfd")]
    CreateEventFd(#[source] io::Error),
    /// The irq eventfd could not be signalled.
    #[error("cannot signal the virtio irq eventfd for a {} interrupt", kind.name())]
    Signal {
        kind: InterruptKind,
        #[source]
        source: io::Error,
    },
}

/// Why an interrupt is raised; each kind is one bit of the InterruptStatus register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device has put buffers in a used ring (`VIRTIO_MMIO_INT_VRING`).
    Vring,
    /// The device configuration space (or the device status) changed
    /// (`VIRTIO_MMIO_INT_CONFIG`).
    Config,
}

impl InterruptKind {
    /// The kind's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            InterruptKind::Vring => "vring",
            InterruptKind::Config => "config",
        }
    }

    /// The InterruptStatus bit for this kind.
    pub fn status_bit(self) -> u32 {
        match self {
            InterruptKind::Vring => VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// The interrupt status register and irq eventfd of one virtio-mmio device.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    irq_evt: EventFd,
}

impl IrqTrigger {
    /// Creates an interrupt line with a fresh non-blocking eventfd and nothing pending.
    pub fn new() -> Result<Self, InterruptError> {
        Ok(Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq_evt: EventFd::new(EFD_NONBLOCK).map_err(InterruptError::CreateEventFd)?,
        })
    }

    /// The eventfd the VMM registers as the device's KVM irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// Sets the status bit for `kind` and signals the irq eventfd.
    ///
    /// A configuration-change interrupt also bumps the configuration generation, so a driver
    /// reading a multi-word configuration field notices that it changed under it.
    pub fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        if kind == InterruptKind::Config {
            self.config_generation.fetch_add(1, Ordering::AcqRel);
        }
        // The status bit must be visible before the guest can take the interrupt and read it.
        self.status.fetch_or(kind.status_bit(), Ordering::AcqRel);
        self.irq_evt
            .write(1)
            .map_err(|source| InterruptError::Signal { kind, source })
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the InterruptStatus bits set in `bits` (a write to InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Reports that the device hit an error it cannot recover from without a reset (for
    /// example, the guest put garbage in a queue): the transport shows
    /// `VIRTIO_CONFIG_S_NEEDS_RESET` in the device status, and the driver gets a
    /// configuration-change interrupt, as the virtio spec asks once DRIVER_OK is set.
    pub fn signal_needs_reset(&self) -> Result<(), InterruptError> {
        self.needs_reset.store(true, Ordering::Release);
        self.trigger(InterruptKind::Config)
    }

    /// Whether the device (or the transport) asked for a reset since the last one.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Sets the needs-reset flag without an interrupt (before DRIVER_OK the spec asks for none).
    pub(crate) fn mark_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
    }

    /// Puts the line in a snapshot's state, without an interrupt (the interrupt controllers'
    /// own state says what the guest has yet to take).
    pub fn restore(&self, status: u32, needs_reset: bool, config_generation: u32) {
        self.status.store(status, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
    }

    /// Clears the pending status bits and the needs-reset flag, for a device reset.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_status_and_signals_eventfd() {
        let irq = IrqTrigger::new().unwrap();
        assert_eq!(irq.status(), 0);
        // Nothing pending: a non-blocking read fails with EAGAIN.
        assert!(irq.irq_evt().read().is_err());

        irq.trigger(InterruptKind::Vring).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.irq_evt().read().unwrap(), 1);

        irq.trigger(InterruptKind::Config).unwrap();
        irq.trigger(InterruptKind::Vring).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        assert_eq!(irq.config_generation(), 1);

        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        // Acking bits that are not pending (or do not exist) changes nothing else.
        irq.ack(0xffff_fff0);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.ack(VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn needs_reset_raises_config_interrupt_and_clears_on_reset() {
        let irq = IrqTrigger::new().unwrap();
        irq.signal_needs_reset().unwrap();
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.irq_evt().read().unwrap(), 1);

        irq.reset();
        assert!(!irq.needs_reset());
        assert_eq!(irq.status(), 0);

        irq.mark_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), 0);
        assert!(irq.irq_evt().read().is_err());
    }
}
