//! The virtio-mmio transport (virtio 1.x, register layout version 2 only).
//!
//! `MmioTransport` puts one [`VirtioDevice`] on the MMIO bus. It owns everything the driver
//! programs through registers: feature negotiation, the device status state machine, and each
//! queue's size and ring addresses. At DRIVER_OK it checks every ready queue against guest
//! memory and hands copies of them, with their notify eventfds, to the device's `activate`.
//!
//! The VMM registers each of `queue_evts()` as a KVM ioeventfd on `VIRTIO_MMIO_QUEUE_NOTIFY`
//! with the queue index as datamatch, and `interrupt().irq_evt()` as the device's irqfd; a
//! notify that still arrives as an MMIO write (no ioeventfd registered) signals the same eventfd.
//!
//! Every register value is guest-controlled. Registers take 32-bit accesses only; anything else
//! reads as zero and is ignored. A write that makes no sense (a bad value, a wrong state, a queue
//! that does not exist) is logged with a rate limit and marks the device as needing a reset;
//! nothing the guest writes can panic the VMM.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    lock_device, ActiveQueue, GuestErrorLog, InterruptError, IrqTrigger, QueueProgress,
    VirtioDevice, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

/// "virt" in little endian, the MagicValue register.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The register layout version: 2 is virtio 1.x ("modern"); legacy version 1 is not supported.
pub const MMIO_VERSION: u32 = 2;
/// The VendorID register; no vendor id is registered for hull, and Linux does not look at it.
pub const MMIO_VENDOR_ID: u32 = 0;
/// The size of one device's MMIO window (registers and configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

// Register offsets (linux/virtio_mmio.h).
pub const VIRTIO_MMIO_MAGIC_VALUE: u64 = 0x000;
pub const VIRTIO_MMIO_VERSION: u64 = 0x004;
pub const VIRTIO_MMIO_DEVICE_ID: u64 = 0x008;
pub const VIRTIO_MMIO_VENDOR_ID: u64 = 0x00c;
pub const VIRTIO_MMIO_DEVICE_FEATURES: u64 = 0x010;
pub const VIRTIO_MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const VIRTIO_MMIO_DRIVER_FEATURES: u64 = 0x020;
pub const VIRTIO_MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const VIRTIO_MMIO_QUEUE_SEL: u64 = 0x030;
pub const VIRTIO_MMIO_QUEUE_NUM_MAX: u64 = 0x034;
pub const VIRTIO_MMIO_QUEUE_NUM: u64 = 0x038;
pub const VIRTIO_MMIO_QUEUE_READY: u64 = 0x044;
/// Where the VMM registers each queue's ioeventfd (datamatch: the queue index).
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x050;
pub const VIRTIO_MMIO_INTERRUPT_STATUS: u64 = 0x060;
pub const VIRTIO_MMIO_INTERRUPT_ACK: u64 = 0x064;
pub const VIRTIO_MMIO_STATUS: u64 = 0x070;
pub const VIRTIO_MMIO_QUEUE_DESC_LOW: u64 = 0x080;
pub const VIRTIO_MMIO_QUEUE_DESC_HIGH: u64 = 0x084;
pub const VIRTIO_MMIO_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const VIRTIO_MMIO_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const VIRTIO_MMIO_QUEUE_USED_LOW: u64 = 0x0a0;
pub const VIRTIO_MMIO_QUEUE_USED_HIGH: u64 = 0x0a4;
pub const VIRTIO_MMIO_SHM_SEL: u64 = 0x0ac;
pub const VIRTIO_MMIO_SHM_LEN_LOW: u64 = 0x0b0;
pub const VIRTIO_MMIO_SHM_LEN_HIGH: u64 = 0x0b4;
pub const VIRTIO_MMIO_SHM_BASE_LOW: u64 = 0x0b8;
pub const VIRTIO_MMIO_SHM_BASE_HIGH: u64 = 0x0bc;
pub const VIRTIO_MMIO_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device configuration space.
pub const VIRTIO_MMIO_CONFIG: u64 = 0x100;

// Split virtqueue area sizes (virtio spec 2.7): what must lie in guest memory for a queue of
// `n` entries.
const DESC_ENTRY_SIZE: u64 = 16;
const AVAIL_RING_META_SIZE: u64 = 6; // flags, idx, used_event
const AVAIL_ENTRY_SIZE: u64 = 2;
const USED_RING_META_SIZE: u64 = 6; // flags, idx, avail_event
const USED_ENTRY_SIZE: u64 = 8;

/// Errors from the virtio-mmio transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioTransportError {
    /// The device declares a queue size virtio does not allow.
    #[error("virtio device type {device_type}: queue {index} has invalid maximum size {max_size}")]
    QueueMaxSize {
        device_type: u32,
        index: usize,
        max_size: u16,
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue's notify eventfd could not be created or cloned.
    #[error("virtio device type {device_type}: cannot set up the notify eventfd of queue {index}")]
    QueueEventFd {
        device_type: u32,
        index: usize,
        #[source]
        source: io::Error,
    },
    /// The interrupt line could not be created.
    #[error("virtio device type {device_type}: cannot set up the interrupt")]
    Interrupt {
        device_type: u32,
        #[source]
        source: InterruptError,
    },
    /// A queue area the driver programmed does not lie in guest memory.
    #[error("queue {index}: {area} at {addr:#x} ({len:#x} bytes) is outside guest memory")]
    QueueOutsideMemory {
        index: usize,
        area: &'static str,
        addr: u64,
        len: u64,
    },
    /// A snapshot's transport state does not fit this transport, or the device refused it.
    #[error("virtio device type {device_type}: cannot restore the snapshot's state: {reason}")]
    Restore { device_type: u32, reason: String },
    /// The device cannot be snapshotted now.
    #[error("virtio device type {device_type}: cannot be snapshotted now: {reason}")]
    NotQuiet { device_type: u32, reason: String },
    /// A validated queue could not be copied for the device.
    #[error("queue {index}: cannot copy the queue configuration")]
    QueueCopy {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
}

/// A transport's registers and its queues' configuration, for a snapshot. The queues'
/// positions are not kept: a snapshot is only taken with nothing in flight
/// ([`VirtioDevice::snapshot_ready`]), so each queue resumes at its used index in guest
/// memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub config_generation: u32,
    pub queues: Vec<QueueRegs>,
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// One virtio device on the MMIO bus, with the registers the driver programs.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    mem: GuestMemoryMmap,
    interrupt: Arc<IrqTrigger>,
    /// The queue configuration the driver programs; copies go to the device at DRIVER_OK.
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
    log: GuestErrorLog,
}

impl MmioTransport {
    /// Creates the transport for `device`: one queue per `queue_max_sizes()` entry, each with a
    /// non-blocking notify eventfd, and the device's interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioTransportError> {
        let (device_type, max_sizes) = {
            let locked = lock_device(&device);
            (locked.device_type(), locked.queue_max_sizes().to_vec())
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &max_size) in max_sizes.iter().enumerate() {
            queues.push(Queue::new(max_size).map_err(|source| {
                MmioTransportError::QueueMaxSize {
                    device_type,
                    index,
                    max_size,
                    source,
                }
            })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(|source| {
                MmioTransportError::QueueEventFd {
                    device_type,
                    index,
                    source,
                }
            })?);
        }
        let interrupt = IrqTrigger::new().map_err(|source| MmioTransportError::Interrupt {
            device_type,
            source,
        })?;
        Ok(Self {
            device,
            device_type,
            mem,
            interrupt: Arc::new(interrupt),
            queues,
            queue_evts,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
            log: GuestErrorLog::new(),
        })
    }

    /// The device type, for the kernel command line and logs.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// One notify eventfd per queue, in queue order, for the VMM to register as ioeventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt line; the VMM registers `irq_evt()` as an irqfd.
    pub fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.interrupt
    }

    /// Whether the device is running (DRIVER_OK was accepted and `activate` succeeded).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Where each ready queue stands in guest memory.
    fn progress(&self) -> Result<Vec<QueueProgress>, String> {
        let mut out = Vec::new();
        for (index, queue) in self.queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let idx = |ring: u64| {
                let at = GuestAddress(ring)
                    .checked_add(2)
                    .ok_or_else(|| format!("queue {index}: ring at {ring:#x}"))?;
                self.mem
                    .read_obj::<u16>(at)
                    .map(u16::from_le)
                    .map_err(|e| format!("queue {index}: cannot read a ring index: {e}"))
            };
            out.push(QueueProgress {
                index,
                avail_idx: idx(queue.avail_ring())?,
                used_idx: idx(queue.used_ring())?,
            });
        }
        Ok(out)
    }

    /// The transport's state, once the device says nothing is in flight (the vCPUs are
    /// paused, so the driver adds nothing meanwhile).
    pub fn save_state(&self) -> Result<MmioState, MmioTransportError> {
        let not_quiet = |reason| MmioTransportError::NotQuiet {
            device_type: self.device_type,
            reason,
        };
        if self.activated {
            let progress = self.progress().map_err(not_quiet)?;
            lock_device(&self.device)
                .snapshot_ready(&progress)
                .map_err(not_quiet)?;
        } else if self.device_status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return Err(not_quiet(
                "the driver set it up but it did not start".into(),
            ));
        }
        Ok(MmioState {
            device_type: self.device_type,
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            config_generation: self.interrupt.config_generation(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegs {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
        })
    }

    /// Puts a new transport (and its new, unstarted device) in the snapshot's `state`: the
    /// registers, the queues' configuration, the device's features, and, if the device was
    /// running, the device started with each queue at its used index in (restored) guest
    /// memory.
    pub fn restore_state(&mut self, state: &MmioState) -> Result<(), MmioTransportError> {
        let device_type = self.device_type;
        let fail = |reason: String| MmioTransportError::Restore {
            device_type,
            reason,
        };
        if state.device_type != self.device_type {
            return Err(fail(format!(
                "the snapshot has a device of type {} here",
                state.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(fail(format!(
                "{} queues in the snapshot, {} here",
                state.queues.len(),
                self.queues.len()
            )));
        }
        for (index, (queue, regs)) in self.queues.iter_mut().zip(&state.queues).enumerate() {
            let set = |queue: &mut Queue| -> Result<(), virtio_queue::Error> {
                queue.try_set_size(regs.size)?;
                queue.try_set_desc_table_address(GuestAddress(regs.desc_table))?;
                queue.try_set_avail_ring_address(GuestAddress(regs.avail_ring))?;
                queue.try_set_used_ring_address(GuestAddress(regs.used_ring))?;
                queue.set_ready(regs.ready);
                Ok(())
            };
            set(queue).map_err(|e| fail(format!("queue {index}: {e}")))?;
        }
        self.device_status = state.device_status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore(
            state.interrupt_status,
            state.needs_reset,
            state.config_generation,
        );
        if state.device_status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = lock_device(&self.device).avail_features();
            if state.driver_features & !offered != 0 {
                return Err(fail(format!(
                    "the driver's features {:#x} are not all offered here ({offered:#x})",
                    state.driver_features
                )));
            }
            lock_device(&self.device).ack_features(state.driver_features);
        }
        if state.activated {
            let mut queues = self.active_queues().map_err(|e| fail(error_chain(&e)))?;
            for active in &mut queues {
                let used_ring = active.queue.used_ring();
                let at = GuestAddress(used_ring).checked_add(2).ok_or_else(|| {
                    fail(format!(
                        "queue {}: used ring at {used_ring:#x}",
                        active.index
                    ))
                })?;
                let used = self
                    .mem
                    .read_obj::<u16>(at)
                    .map(u16::from_le)
                    .map_err(|e| fail(format!("queue {}: {e}", active.index)))?;
                active.queue.set_next_avail(used);
                active.queue.set_next_used(used);
            }
            let mem = self.mem.clone();
            let interrupt = Arc::clone(&self.interrupt);
            lock_device(&self.device)
                .activate(mem, interrupt, queues)
                .map_err(|e| fail(error_chain(&e)))?;
            self.activated = true;
        }
        Ok(())
    }

    /// The Status register as the driver reads it.
    fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            0
        };
        self.device_status | needs_reset
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.device_status & (set | clear) == set
    }

    /// Logs something the guest got wrong, without further consequence.
    fn guest_warn(&mut self, message: fmt::Arguments<'_>) {
        let device_type = self.device_type;
        self.log.warn(format_args!(
            "virtio-mmio device type {device_type}: {message}"
        ));
    }

    /// Logs a guest write that makes no sense and marks the device as needing a reset.
    fn guest_error(&mut self, message: fmt::Arguments<'_>) {
        self.guest_warn(message);
        self.set_needs_reset();
    }

    fn set_needs_reset(&mut self) {
        // The spec asks for a configuration-change notification only once DRIVER_OK is set.
        if self.device_status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            self.interrupt.mark_needs_reset();
        } else if let Err(err) = self.interrupt.signal_needs_reset() {
            log::error!("virtio-mmio device type {}: {err}", self.device_type);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            // Asked each time: a NIC slot's changes when a NIC is put in it.
            VIRTIO_MMIO_DEVICE_ID => lock_device(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = lock_device(&self.device).avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            // A queue that does not exist has size 0 and is never ready: that is how a driver
            // learns the number of queues, so it is not an error.
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: a length of all ones says "no such region".
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                self.guest_warn(format_args!(
                    "read of unknown or write-only register {offset:#x}"
                ));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.setup_queue("QueueNum", value, |q, v| {
                let size = u16::try_from(v).map_err(|_| virtio_queue::Error::InvalidSize)?;
                q.try_set_size(size)
            }),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.setup_queue("QueueDescLow", value, |q, v| {
                q.try_set_desc_table_address(with_low(q.desc_table(), v))
            }),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.setup_queue("QueueDescHigh", value, |q, v| {
                q.try_set_desc_table_address(with_high(q.desc_table(), v))
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.setup_queue("QueueDriverLow", value, |q, v| {
                q.try_set_avail_ring_address(with_low(q.avail_ring(), v))
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.setup_queue("QueueDriverHigh", value, |q, v| {
                q.try_set_avail_ring_address(with_high(q.avail_ring(), v))
            }),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.setup_queue("QueueDeviceLow", value, |q, v| {
                q.try_set_used_ring_address(with_low(q.used_ring(), v))
            }),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.setup_queue("QueueDeviceHigh", value, |q, v| {
                q.try_set_used_ring_address(with_high(q.used_ring(), v))
            }),
            // There are no shared memory regions to select; the selector has no effect.
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.guest_error(format_args!(
                "write of {value:#x} to unknown or read-only register {offset:#x}"
            )),
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.has_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
        ) {
            let status = self.device_status;
            return self.guest_error(format_args!(
                "DriverFeatures written in device status {status:#x}"
            ));
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel => {
                // Pages past the second describe features nobody offers: accepting any is wrong.
                if value != 0 {
                    self.guest_error(format_args!(
                        "DriverFeatures page {sel} written with {value:#x}"
                    ));
                }
            }
        }
    }

    /// Applies a queue configuration write to the selected queue, if the driver may configure
    /// queues now (after FEATURES_OK, before DRIVER_OK) and the queue exists.
    fn setup_queue(
        &mut self,
        register: &str,
        value: u32,
        apply: impl FnOnce(&mut Queue, u32) -> Result<(), virtio_queue::Error>,
    ) {
        if !self.has_status(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        ) {
            let status = self.device_status;
            return self.guest_error(format_args!(
                "{register} written in device status {status:#x}"
            ));
        }
        let sel = self.queue_sel;
        let result = match self.queues.get_mut(sel as usize) {
            Some(queue) => apply(queue, value),
            None => {
                return self.guest_error(format_args!(
                    "{register} written for queue {sel}, which does not exist"
                ))
            }
        };
        if let Err(err) = result {
            self.guest_error(format_args!(
                "{register} value {value:#x} rejected for queue {sel}: {err}"
            ));
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        match value {
            // Linux writes 0 when it deletes a queue, after resetting the device, so clearing
            // readiness is fine in any state but a running one (we offer no per-queue reset).
            0 if self.device_status & VIRTIO_CONFIG_S_DRIVER_OK == 0 => {
                let sel = self.queue_sel;
                match self.queues.get_mut(sel as usize) {
                    Some(queue) => queue.set_ready(false),
                    None => self.guest_error(format_args!(
                        "QueueReady cleared for queue {sel}, which does not exist"
                    )),
                }
            }
            0 => self.guest_error(format_args!("QueueReady cleared on a running device")),
            1 => self.setup_queue("QueueReady", value, |q, _| {
                q.set_ready(true);
                Ok(())
            }),
            _ => self.guest_error(format_args!("QueueReady written with {value:#x}")),
        }
    }

    /// A notify that reached us as an MMIO write, because no ioeventfd caught it: signal the
    /// queue's eventfd, as the ioeventfd would have. Without VIRTIO_F_NOTIFICATION_DATA (which
    /// this transport does not support) the value is the queue index.
    fn notify(&mut self, value: u32) {
        let result = match self.queue_evts.get(value as usize) {
            Some(evt) => evt.write(1),
            None => {
                return self.guest_error(format_args!(
                    "QueueNotify for queue {value}, which does not exist"
                ))
            }
        };
        if let Err(err) = result {
            log::error!(
                "virtio-mmio device type {}: cannot signal queue {value}: {err}",
                self.device_type
            );
        }
    }

    /// The device status state machine (virtio spec 3.1.1): each write adds one step, in order;
    /// 0 resets; FAILED may be set at any time.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        // Drivers write back what they read plus one bit; NEEDS_RESET is the device's to set.
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.device_status;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if new & old != old {
            return self.guest_error(format_args!(
                "device status {new:#x} clears bits of {old:#x} without a reset"
            ));
        }
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const ACK_DRIVER: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
        const ACK_DRIVER_FEATURES: u32 = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        match (old, new & !old) {
            (_, 0) => {}
            (0, ACK) | (ACK, VIRTIO_CONFIG_S_DRIVER) => self.device_status = new,
            (ACK_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK) => self.accept_features(),
            (ACK_DRIVER_FEATURES, VIRTIO_CONFIG_S_DRIVER_OK) => self.activate(),
            _ => self.guest_error(format_args!(
                "invalid device status transition {old:#x} -> {new:#x}"
            )),
        }
    }

    /// FEATURES_OK: accept the driver's features if they are a subset of the device's and
    /// include VERSION_1. Otherwise FEATURES_OK stays clear, which is how the spec has a device
    /// refuse; the driver reads it back and gives up.
    fn accept_features(&mut self) {
        let offered = lock_device(&self.device).avail_features();
        let accepted = self.driver_features;
        if accepted & !offered != 0 {
            return self.guest_warn(format_args!(
                "refusing features {accepted:#x}: not offered {:#x}",
                accepted & !offered
            ));
        }
        if accepted & (1 << VIRTIO_F_VERSION_1) == 0 {
            return self.guest_warn(format_args!(
                "refusing features {accepted:#x}: VIRTIO_F_VERSION_1 missing (legacy driver)"
            ));
        }
        lock_device(&self.device).ack_features(accepted);
        self.device_status |= VIRTIO_CONFIG_S_FEATURES_OK;
    }

    /// DRIVER_OK: hand the device its ready queues. A queue outside guest memory, a device
    /// that fails to start, or a setup the transport already refused leaves DRIVER_OK set with
    /// NEEDS_RESET, as the spec describes.
    fn activate(&mut self) {
        self.device_status |= VIRTIO_CONFIG_S_DRIVER_OK;
        if self.interrupt.needs_reset() {
            // The driver ignored NEEDS_RESET; what it set up is not what it meant.
            return self.guest_error(format_args!("not activated: the device needs a reset"));
        }
        let queues = match self.active_queues() {
            Ok(queues) => queues,
            Err(err) => {
                let err = error_chain(&err);
                return self.guest_error(format_args!("not activated: {err}"));
            }
        };
        let mem = self.mem.clone();
        let interrupt = Arc::clone(&self.interrupt);
        let result = lock_device(&self.device).activate(mem, interrupt, queues);
        match result {
            Ok(()) => self.activated = true,
            Err(err) => {
                let err = error_chain(&err);
                self.guest_error(format_args!("device failed to activate: {err}"));
            }
        }
    }

    /// Copies of the ready queues, validated against guest memory, with their eventfds.
    fn active_queues(&self) -> Result<Vec<ActiveQueue>, MmioTransportError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        for (index, (queue, evt)) in self.queues.iter().zip(&self.queue_evts).enumerate() {
            if !queue.ready() {
                continue;
            }
            check_queue_in_memory(&self.mem, index, queue)?;
            let mut copy = Queue::try_from(queue.state())
                .map_err(|source| MmioTransportError::QueueCopy { index, source })?;
            copy.set_event_idx(event_idx);
            let notify = evt
                .try_clone()
                .map_err(|source| MmioTransportError::QueueEventFd {
                    device_type: self.device_type,
                    index,
                    source,
                })?;
            active.push(ActiveQueue {
                index,
                queue: copy,
                notify,
            });
        }
        Ok(active)
    }

    /// Status 0: reset the device, then the transport. A device that cannot be reset is
    /// marked FAILED and keeps its state.
    fn reset(&mut self) {
        // A device that never got past feature negotiation has nothing to reset (Linux resets
        // every device before probing it).
        if self.device_status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && !lock_device(&self.device).reset()
        {
            log::warn!(
                "virtio-mmio device type {}: device cannot be reset, marking it failed",
                self.device_type
            );
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        // Drop notifications from before the reset so the next activation starts clean.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.reset();
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.activated = false;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= VIRTIO_MMIO_CONFIG {
            return lock_device(&self.device).read_config(offset - VIRTIO_MMIO_CONFIG, data);
        }
        let len = data.len();
        match <&mut [u8; 4]>::try_from(data) {
            Ok(out) => *out = self.read_register(offset).to_le_bytes(),
            Err(_) => self.guest_warn(format_args!(
                "{len}-byte read of register {offset:#x}; only 32-bit accesses are allowed"
            )),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= VIRTIO_MMIO_CONFIG {
            if !self.has_status(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED) {
                let status = self.device_status;
                return self.guest_error(format_args!(
                    "configuration space written in device status {status:#x}"
                ));
            }
            return lock_device(&self.device).write_config(offset - VIRTIO_MMIO_CONFIG, data);
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) => self.write_register(offset, u32::from_le_bytes(bytes)),
            Err(_) => self.guest_error(format_args!(
                "{}-byte write to register {offset:#x}; only 32-bit accesses are allowed",
                data.len()
            )),
        }
    }
}

/// An error and its causes, on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

fn with_low(addr: u64, low: u32) -> GuestAddress {
    GuestAddress((addr & !0xffff_ffff) | u64::from(low))
}

fn with_high(addr: u64, high: u32) -> GuestAddress {
    GuestAddress((addr & 0xffff_ffff) | (u64::from(high) << 32))
}

/// Checks that a queue's three areas lie wholly in guest memory.
///
/// This is `QueueT::is_valid` made exact: `is_valid` requires the first byte *after* each area
/// to be guest memory too, so it refuses rings that end at the top of RAM, which a guest may
/// legitimately put there; it also logs every refusal without a rate limit.
fn check_queue_in_memory(
    mem: &GuestMemoryMmap,
    index: usize,
    queue: &Queue,
) -> Result<(), MmioTransportError> {
    let size = u64::from(queue.size());
    let areas = [
        (
            "descriptor table",
            queue.desc_table(),
            DESC_ENTRY_SIZE * size,
        ),
        (
            "available ring",
            queue.avail_ring(),
            AVAIL_RING_META_SIZE + AVAIL_ENTRY_SIZE * size,
        ),
        (
            "used ring",
            queue.used_ring(),
            USED_RING_META_SIZE + USED_ENTRY_SIZE * size,
        ),
    ];
    for (area, addr, len) in areas {
        // `len` is at most 6 + 16 * 32768, so it fits a usize.
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(MmioTransportError::QueueOutsideMemory {
                index,
                area,
                addr,
                len,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::virtio::test_utils::{init_device, negotiate, read_reg, write_reg};
    use crate::virtio::test_utils::{Buffer, DriverQueue};
    use crate::virtio::{
        ActivateError, InterruptKind, TYPE_VSOCK, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    };

    const MEM_SIZE: u64 = 0x10_0000;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

    /// A device that records what the transport tells it.
    struct FakeDevice {
        max_sizes: Vec<u16>,
        features: u64,
        config: [u8; 8],
        acked: Vec<u64>,
        active: Option<(Arc<IrqTrigger>, Vec<ActiveQueue>)>,
        mem: Option<GuestMemoryMmap>,
        resets: usize,
        can_reset: bool,
        fail_activate: bool,
        /// What `snapshot_ready` answers.
        busy: Option<&'static str>,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                max_sizes: vec![16, 8],
                features: VERSION_1 | EVENT_IDX | 1 << 3,
                config: *b"cfgspace",
                acked: Vec::new(),
                active: None,
                mem: None,
                resets: 0,
                can_reset: true,
                fail_activate: false,
                busy: None,
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            TYPE_VSOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn ack_features(&mut self, features: u64) {
            self.acked.push(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let Some(src) = usize::try_from(offset)
                .ok()
                .and_then(|start| self.config.get(start..start.checked_add(data.len())?))
            else {
                return;
            };
            data.copy_from_slice(src);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = usize::try_from(offset)
                .ok()
                .and_then(|start| self.config.get_mut(start..start.checked_add(data.len())?))
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            interrupt: Arc<IrqTrigger>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::MissingQueue {
                    device_type: TYPE_VSOCK,
                    index: 1,
                });
            }
            self.active = Some((interrupt, queues));
            self.mem = Some(mem);
            Ok(())
        }
        fn snapshot_ready(&self, _progress: &[QueueProgress]) -> Result<(), String> {
            self.busy.map_or(Ok(()), |why| Err(why.to_owned()))
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.active = None;
            self.can_reset
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn transport_on(
        mem: &GuestMemoryMmap,
        device: FakeDevice,
    ) -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(mem.clone(), device.clone()).unwrap();
        (transport, device)
    }

    fn transport_with(device: FakeDevice) -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        transport_on(&memory(), device)
    }

    fn transport() -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        transport_with(FakeDevice::new())
    }

    fn status(t: &mut MmioTransport) -> u32 {
        read_reg(t, VIRTIO_MMIO_STATUS)
    }

    fn set_status(t: &mut MmioTransport, value: u32) {
        write_reg(t, VIRTIO_MMIO_STATUS, value)
    }

    /// Whether the irq eventfd fired since the last call, draining it.
    fn irq_fired(t: &MmioTransport) -> bool {
        t.interrupt().irq_evt().read().is_ok()
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_DEVICE_ID), TYPE_VSOCK);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(status(&mut t), 0);
        assert_eq!(t.device_type(), TYPE_VSOCK);
        assert_eq!(t.queue_evts().len(), 2);
    }

    #[test]
    fn device_features_over_both_select_words() {
        let (mut t, _) = transport();
        let offered = VERSION_1 | EVENT_IDX | 1 << 3;
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            offered as u32
        );
        write_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            (offered >> 32) as u32
        );
        write_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        write_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn accepts_a_subset_with_version_1() {
        let (mut t, dev) = transport();
        let status = negotiate(&mut t, VERSION_1 | 1 << 3);
        assert_eq!(status, ACK | DRIVER | FEATURES_OK);
        assert_eq!(dev.lock().unwrap().acked, vec![VERSION_1 | 1 << 3]);

        // Features are fixed once FEATURES_OK is set.
        write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(status_of(&mut t), ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
        assert_eq!(dev.lock().unwrap().acked.len(), 1);
    }

    fn status_of(t: &mut MmioTransport) -> u32 {
        status(t)
    }

    #[test]
    fn refuses_features_not_offered_or_without_version_1() {
        let (mut t, dev) = transport();
        // Bit 40 is not offered: FEATURES_OK stays clear, which is the spec's refusal.
        assert_eq!(negotiate(&mut t, VERSION_1 | 1 << 40), ACK | DRIVER);
        // A legacy driver (no VERSION_1).
        assert_eq!(negotiate(&mut t, 1 << 3), ACK | DRIVER);
        // The feature pages past the second take nothing but zero.
        set_status(&mut t, 0);
        set_status(&mut t, ACK);
        set_status(&mut t, ACK | DRIVER);
        write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(status(&mut t), ACK | DRIVER);
        write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        assert_eq!(status(&mut t), ACK | DRIVER | NEEDS_RESET);
        assert!(dev.lock().unwrap().acked.is_empty());
        // Linux then gives up on the device.
        set_status(&mut t, ACK | DRIVER | FAILED);
        assert_eq!(status(&mut t) & FAILED, FAILED);
    }

    #[test]
    fn status_state_machine_refuses_bad_transitions() {
        let (mut t, dev) = transport();
        // Skipping ACKNOWLEDGE.
        set_status(&mut t, DRIVER);
        assert_eq!(status(&mut t), NEEDS_RESET);
        set_status(&mut t, 0);
        assert_eq!(status(&mut t), 0);

        set_status(&mut t, ACK);
        // Jumping to DRIVER_OK, setting two steps at once, unknown bits.
        for bad in [
            ACK | DRIVER_OK,
            ACK | DRIVER | FEATURES_OK,
            ACK | 0x10,
            ACK | 0x20,
        ] {
            set_status(&mut t, bad);
            assert_eq!(status(&mut t), ACK | NEEDS_RESET, "after writing {bad:#x}");
        }
        // Writing back what was read (NEEDS_RESET included) plus the next step still works:
        // NEEDS_RESET belongs to the device and is masked from writes.
        set_status(&mut t, ACK | NEEDS_RESET | DRIVER);
        assert_eq!(status(&mut t), ACK | DRIVER | NEEDS_RESET);
        // Clearing bits without a reset.
        set_status(&mut t, DRIVER);
        assert_eq!(status(&mut t), ACK | DRIVER | NEEDS_RESET);
        // Same value again is a no-op.
        set_status(&mut t, ACK | DRIVER);
        assert_eq!(status(&mut t), ACK | DRIVER | NEEDS_RESET);

        // Reset clears everything, including NEEDS_RESET.
        set_status(&mut t, 0);
        assert_eq!(status(&mut t), 0);
        // FAILED may be set at any time, and nothing but a reset follows it.
        set_status(&mut t, ACK);
        set_status(&mut t, FAILED);
        assert_eq!(status(&mut t), ACK | FAILED);
        set_status(&mut t, ACK | FAILED | DRIVER);
        assert_eq!(status(&mut t), ACK | FAILED);
        set_status(&mut t, ACK | DRIVER);
        assert_eq!(status(&mut t) & !NEEDS_RESET, ACK | FAILED);
        assert!(dev.lock().unwrap().active.is_none());
        assert_eq!(
            dev.lock().unwrap().resets,
            0,
            "nothing to reset before FEATURES_OK"
        );
    }

    #[test]
    fn activation_hands_over_ready_valid_queues() {
        let (mut t, dev) = transport();
        let mem = memory();
        let driver = DriverQueue::new(&mem, GuestAddress(0x2000), 8).unwrap();
        // Linux probes the queue count: a queue that does not exist has size 0.
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);

        // Only queue 1 is set up; queue 0 stays unused.
        let status = init_device(&mut t, VERSION_1 | EVENT_IDX, &[(1, &driver)]);
        assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(t.is_activated());
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);

        let dev = dev.lock().unwrap();
        let (interrupt, queues) = dev.active.as_ref().unwrap();
        assert!(Arc::ptr_eq(interrupt, t.interrupt()));
        assert_eq!(queues.len(), 1);
        let active = &queues[0];
        assert_eq!(active.index, 1);
        assert_eq!(active.queue.size(), 8);
        assert_eq!(active.queue.max_size(), 8);
        assert!(active.queue.ready());
        assert!(active.queue.event_idx_enabled());
        assert_eq!(active.queue.desc_table(), driver.desc_table().0);
        assert_eq!(active.queue.avail_ring(), driver.avail_ring().0);
        assert_eq!(active.queue.used_ring(), driver.used_ring().0);
        // The device's notify eventfd is the one the VMM registers for queue 1.
        t.queue_evts()[1].write(1).unwrap();
        assert_eq!(active.notify.read().unwrap(), 1);
    }

    #[test]
    fn event_idx_stays_off_unless_negotiated() {
        let (mut t, dev) = transport();
        let driver = DriverQueue::new(&memory(), GuestAddress(0), 16).unwrap();
        init_device(&mut t, VERSION_1, &[(0, &driver)]);
        let dev = dev.lock().unwrap();
        let (_, queues) = dev.active.as_ref().unwrap();
        assert!(!queues[0].queue.event_idx_enabled());
    }

    #[test]
    fn queue_areas_must_lie_wholly_in_guest_memory() {
        // Two regions with a hole between them.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x8_0000),
            (GuestAddress(0x9_0000), 0x7_0000),
        ])
        .unwrap();
        let driver = DriverQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
        let table_len = 16 * 16;

        // A descriptor table ending on the last byte of RAM is fine, though virtio-queue's
        // `is_valid` wants the byte after it to be memory too.
        let top = MEM_SIZE - table_len;
        let mut queue = driver.device_queue(16).unwrap();
        queue.try_set_desc_table_address(GuestAddress(top)).unwrap();
        assert!(!queue.is_valid(&mem));
        assert!(check_queue_in_memory(&mem, 0, &queue).is_ok());

        // One that starts in the hole is not, though `is_valid` only looks at its end.
        let in_hole = 0x9_0000 - table_len / 2;
        queue
            .try_set_desc_table_address(GuestAddress(in_hole))
            .unwrap();
        assert!(queue.is_valid(&mem));
        assert!(matches!(
            check_queue_in_memory(&mem, 0, &queue),
            Err(MmioTransportError::QueueOutsideMemory {
                area: "descriptor table",
                ..
            })
        ));

        // Through the registers, the first activates and the second does not.
        for (addr, activates) in [(top, true), (in_hole, false)] {
            let (mut t, _) = transport_on(&mem, FakeDevice::new());
            negotiate(&mut t, VERSION_1);
            driver.configure(&mut t, 0);
            write_reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, addr as u32);
            set_status(&mut t, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            assert_eq!(t.is_activated(), activates, "table at {addr:#x}");
        }
    }

    #[test]
    fn invalid_queue_setup_needs_reset_and_never_activates() {
        type Setup = fn(&mut MmioTransport);
        let cases: [(&str, Setup); 9] = [
            ("size not a power of two", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_NUM, 3)
            }),
            ("size above the maximum", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_NUM, 32)
            }),
            ("size zero", |t| write_reg(t, VIRTIO_MMIO_QUEUE_NUM, 0)),
            ("size beyond u16", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_NUM, 0x1_0010)
            }),
            ("misaligned descriptor table", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008)
            }),
            ("misaligned used ring", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1002)
            }),
            ("descriptor table beyond memory", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 1)
            }),
            ("available ring straddling the end of memory", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, MEM_SIZE as u32 - 8)
            }),
            ("queue that does not exist", |t| {
                write_reg(t, VIRTIO_MMIO_QUEUE_SEL, 7);
                write_reg(t, VIRTIO_MMIO_QUEUE_NUM, 8);
            }),
        ];
        for (what, setup) in cases {
            let (mut t, dev) = transport();
            let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 16).unwrap();
            negotiate(&mut t, VERSION_1);
            driver.configure(&mut t, 0);
            setup(&mut t);
            set_status(&mut t, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            assert!(!t.is_activated(), "{what}");
            assert!(dev.lock().unwrap().active.is_none(), "{what}");
            assert_eq!(
                status(&mut t),
                ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET,
                "{what}"
            );
            // Once DRIVER_OK is set the driver hears about it through a config interrupt.
            assert!(irq_fired(&t), "{what}");
            assert_eq!(
                read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
                VIRTIO_MMIO_INT_CONFIG,
                "{what}"
            );
            // And it can start over.
            set_status(&mut t, 0);
            assert_eq!(status(&mut t), 0, "{what}");
            assert_eq!(read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0, "{what}");
        }
    }

    #[test]
    fn queue_registers_only_between_features_ok_and_driver_ok() {
        let (mut t, dev) = transport();
        let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 16).unwrap();
        // Before FEATURES_OK.
        set_status(&mut t, ACK);
        set_status(&mut t, ACK | DRIVER);
        driver.configure(&mut t, 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(status(&mut t), ACK | DRIVER | NEEDS_RESET);

        // After DRIVER_OK, changes to a running queue are refused.
        set_status(&mut t, 0);
        init_device(&mut t, VERSION_1, &[(0, &driver)]);
        assert!(t.is_activated());
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(status(&mut t) & NEEDS_RESET, NEEDS_RESET);
        let dev = dev.lock().unwrap();
        assert_eq!(dev.active.as_ref().unwrap().1[0].queue.size(), 16);
    }

    #[test]
    fn clearing_queue_ready_after_reset_is_fine() {
        // Linux's vm_del_vq, after the device was reset.
        let (mut t, _) = transport();
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(status(&mut t), 0);
        // Any value but 0 and 1 is garbage.
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 2);
        assert_eq!(status(&mut t), NEEDS_RESET);
    }

    #[test]
    fn reset_returns_device_and_queues_to_their_initial_state() {
        let (mut t, dev) = transport();
        let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 4).unwrap();
        init_device(&mut t, VERSION_1, &[(0, &driver)]);
        assert!(t.is_activated());
        // A notify from before the reset must not reach the next activation.
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        t.interrupt().trigger(InterruptKind::Vring).unwrap();

        set_status(&mut t, 0);
        assert_eq!(status(&mut t), 0);
        assert!(!t.is_activated());
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(dev.lock().unwrap().active.is_none());
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert!(t.queue_evts()[0].read().is_err());
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);

        // The driver can bring it up again, with other features.
        assert_eq!(
            init_device(&mut t, VERSION_1 | EVENT_IDX, &[(0, &driver)]),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert_eq!(
            dev.lock().unwrap().acked,
            vec![VERSION_1, VERSION_1 | EVENT_IDX]
        );
        let dev = dev.lock().unwrap();
        assert_eq!(dev.active.as_ref().unwrap().1[0].queue.size(), 4);
    }

    #[test]
    fn a_device_that_cannot_reset_is_marked_failed() {
        let mut device = FakeDevice::new();
        device.can_reset = false;
        let (mut t, _) = transport_with(device);
        let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 4).unwrap();
        init_device(&mut t, VERSION_1, &[(0, &driver)]);
        set_status(&mut t, 0);
        assert_eq!(
            status(&mut t),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED
        );
        assert!(t.is_activated());
    }

    #[test]
    fn a_device_that_fails_to_activate_needs_reset() {
        let mut device = FakeDevice::new();
        device.fail_activate = true;
        let (mut t, _) = transport_with(device);
        let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 4).unwrap();
        let status = init_device(&mut t, VERSION_1, &[(0, &driver)]);
        assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
        assert!(!t.is_activated());
        assert!(irq_fired(&t));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, dev) = transport();
        let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 4).unwrap();
        init_device(&mut t, VERSION_1, &[(0, &driver)]);
        let interrupt = Arc::clone(&dev.lock().unwrap().active.as_ref().unwrap().0);

        interrupt.trigger(InterruptKind::Vring).unwrap();
        assert!(irq_fired(&t));
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        write_reg(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        write_reg(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, u32::MAX);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // A device that finds garbage in its queue asks for a reset.
        interrupt.signal_needs_reset().unwrap();
        assert_eq!(status(&mut t) & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn notify_by_mmio_write_signals_the_queue_eventfd() {
        let (mut t, _) = transport();
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 2);
        assert!(t.queue_evts()[0].read().is_err());
        // A queue that does not exist.
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
        assert_eq!(status(&mut t), NEEDS_RESET);
    }

    #[test]
    fn config_space_goes_to_the_device_at_any_width() {
        let (mut t, dev) = transport();
        let mut byte = [0u8; 1];
        t.read(VIRTIO_MMIO_CONFIG + 3, &mut byte);
        assert_eq!(&byte, b"s");
        let mut word = [0u8; 8];
        t.read(VIRTIO_MMIO_CONFIG, &mut word);
        assert_eq!(&word, b"cfgspace");
        // Past the device's configuration space: zeroes, no panic.
        let mut past = [0xaau8; 4];
        t.read(VIRTIO_MMIO_CONFIG + 6, &mut past);
        assert_eq!(past, [0; 4]);

        // Writes before the driver is there are refused.
        t.write(VIRTIO_MMIO_CONFIG, b"XY");
        assert_eq!(&dev.lock().unwrap().config, b"cfgspace");
        set_status(&mut t, 0);
        set_status(&mut t, ACK);
        set_status(&mut t, ACK | DRIVER);
        t.write(VIRTIO_MMIO_CONFIG + 1, b"XY");
        assert_eq!(&dev.lock().unwrap().config, b"cXYspace");
    }

    #[test]
    fn wrong_widths_read_zero_and_are_ignored() {
        let (mut t, _) = transport();
        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0xaau8; len];
            t.read(VIRTIO_MMIO_MAGIC_VALUE, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{len}-byte read");
        }
        t.write(VIRTIO_MMIO_STATUS, &[1]);
        t.write(VIRTIO_MMIO_STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(status(&mut t), NEEDS_RESET);
        // Unaligned and unknown offsets.
        assert_eq!(read_reg(&mut t, 0x001), 0);
        assert_eq!(read_reg(&mut t, 0x0f8), 0);
        assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    }

    #[test]
    fn garbage_never_panics() {
        // Every offset of the window and a little past it, every width, pseudo-random values,
        // in a mix of states; the transport must neither panic nor hand out invalid queues.
        let (mut t, dev) = transport();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..4u32 {
            match round {
                1 => {
                    negotiate(&mut t, VERSION_1);
                }
                2 => {
                    let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 4).unwrap();
                    init_device(&mut t, VERSION_1, &[(0, &driver)]);
                }
                _ => {}
            }
            for offset in 0..MMIO_WINDOW_SIZE + 0x10 {
                for len in [1usize, 2, 4, 8] {
                    let mut data = vec![0u8; len];
                    t.read(offset, &mut data);
                    let value = next().to_le_bytes();
                    // Leave the status alone most of the time, so other registers see every
                    // state rather than a device that was just reset.
                    if offset != VIRTIO_MMIO_STATUS || next() % 8 == 0 {
                        t.write(offset, &value[..len]);
                    }
                    // Status-shaped values too: small numbers are the interesting ones.
                    t.write(offset, &((next() % 0x100) as u32).to_le_bytes());
                }
            }
        }
        // Whatever happened, a device that got queues got ones inside guest memory.
        if let Some((_, queues)) = dev.lock().unwrap().active.as_ref() {
            for active in queues {
                check_queue_in_memory(&memory(), active.index, &active.queue).unwrap();
            }
        }
        // And the driver can still bring the device up cleanly.
        let driver = DriverQueue::new(&memory(), GuestAddress(0x1000), 4).unwrap();
        assert_eq!(
            init_device(&mut t, VERSION_1, &[(0, &driver)]),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    #[test]
    fn device_pops_a_chain_the_driver_built() {
        let mem = memory();
        let (mut t, dev) = transport_on(&mem, FakeDevice::new());
        let mut driver = DriverQueue::new(&mem, GuestAddress(0x4000), 16).unwrap();
        assert_eq!(
            init_device(&mut t, VERSION_1, &[(0, &driver)]),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
        let head = driver
            .add_chain(&[
                Buffer::Readable(b"hello, "),
                Buffer::Readable(b"device"),
                Buffer::Writable(16),
            ])
            .unwrap();
        // The guest kicks the queue; without an ioeventfd that is an MMIO write.
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        // The device side: woken by its notify eventfd, it pops the chain from its queue.
        let mut guard = dev.lock().unwrap();
        // The device uses the memory it was given, which is the driver's.
        let mem = guard.mem.clone().unwrap();
        let (interrupt, queues) = guard.active.as_mut().unwrap();
        let active = &mut queues[0];
        assert_eq!(active.notify.read().unwrap(), 1);
        let chain = active.queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(chain.head_index(), head);
        let mut request = String::new();
        chain
            .clone()
            .reader(&mem)
            .unwrap()
            .read_to_string(&mut request)
            .unwrap();
        assert_eq!(request, "hello, device");
        let mut writer = chain.writer(&mem).unwrap();
        writer.write_all(b"hello, driver").unwrap();
        active.queue.add_used(&mem, head, 13).unwrap();
        assert!(active.queue.pop_descriptor_chain(&mem).is_none());
        interrupt.trigger(InterruptKind::Vring).unwrap();
        drop(guard);

        assert!(irq_fired(&t));
        let used = driver.pop_used().unwrap().unwrap();
        assert_eq!(used.head, head);
        assert_eq!(used.written, b"hello, driver");
    }

    #[test]
    fn a_running_transport_restores_into_a_new_one_at_the_used_index() {
        let mem = memory();
        let (mut t, dev) = transport_on(&mem, FakeDevice::new());
        let driver = DriverQueue::new(&mem, GuestAddress(0x2000), 8).unwrap();
        init_device(&mut t, VERSION_1 | EVENT_IDX, &[(1, &driver)]);
        write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        t.interrupt().trigger(InterruptKind::Vring).unwrap();
        // The device has given back 5 buffers of the 5 offered.
        for ring in [driver.avail_ring().0, driver.used_ring().0] {
            mem.write_obj(5u16.to_le(), GuestAddress(ring + 2)).unwrap();
        }

        dev.lock().unwrap().busy = Some("2 requests in flight");
        let err = t.save_state().unwrap_err().to_string();
        assert!(
            err.contains("cannot be snapshotted now: 2 requests in flight"),
            "{err}"
        );
        dev.lock().unwrap().busy = None;
        let state = t.save_state().unwrap();
        assert!(state.activated);
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
        assert_eq!(state.queues[1].size, 8);
        assert!(!state.queues[0].ready);

        let (mut restored, new_dev) = transport_on(&mem, FakeDevice::new());
        restored.restore_state(&state).unwrap();
        assert!(restored.is_activated());
        assert_eq!(
            status(&mut restored),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert_eq!(
            read_reg(&mut restored, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(restored.save_state().unwrap(), state);
        let new_dev = new_dev.lock().unwrap();
        assert_eq!(new_dev.acked, [VERSION_1 | EVENT_IDX]);
        let (_, queues) = new_dev.active.as_ref().unwrap();
        assert_eq!(queues.len(), 1);
        let queue = &queues[0].queue;
        assert_eq!(
            (queues[0].index, queue.next_avail(), queue.next_used()),
            (1, 5, 5)
        );
        assert_eq!(queue.used_ring(), driver.used_ring().0);
        assert!(queue.event_idx_enabled());
    }

    #[test]
    fn a_state_of_another_device_shape_is_refused() {
        let (t, _) = transport();
        let mut state = t.save_state().unwrap();
        state.device_type = 26;
        let (mut other, _) = transport();
        let err = other.restore_state(&state).unwrap_err().to_string();
        assert!(err.contains("a device of type 26"), "{err}");
        state.device_type = TYPE_VSOCK;
        state.queues.pop();
        let err = other.restore_state(&state).unwrap_err().to_string();
        assert!(err.contains("1 queues in the snapshot, 2 here"), "{err}");
    }
}
