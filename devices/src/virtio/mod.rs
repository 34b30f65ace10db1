//! Virtio devices and the one transport they sit on (virtio-mmio, version 2 only).
//!
//! A device implements [`VirtioDevice`]: what it offers (type, queues, features, configuration
//! space) and what happens when the driver brings it up (`activate`) or tears it down (`reset`).
//! [`MmioTransport`] adapts any such device to the MMIO bus: it owns the register file, the
//! driver status state machine, the queue configuration and one notify `EventFd` per queue, and
//! hands the device ready, validated queues at DRIVER_OK. Devices never see MMIO registers; the
//! transport never looks inside a queue.
//!
//! Interrupts go the other way through [`IrqTrigger`], whose eventfd the VMM registers as a KVM
//! irqfd. Nothing here touches KVM.

pub mod fs;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_utils;
pub mod interrupt;
pub mod mmio;
#[cfg(any(test, feature = "fuzzing"))]
pub mod mmio_fuzz;
pub mod net;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod vsock;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::{InterruptError, InterruptKind, IrqTrigger};
pub use mmio::{MmioState, MmioTransport, MmioTransportError, QueueRegs};

// Device types (virtio spec 5, `VIRTIO_ID_*` in linux/virtio_ids.h).
/// Network device.
pub const TYPE_NET: u32 = 1;
/// Socket device (vsock).
pub const TYPE_VSOCK: u32 = 19;
/// File system device (virtio-fs).
pub const TYPE_FS: u32 = 26;

// Feature bit numbers (linux/virtio_config.h, linux/virtio_ring.h): use as `1 << BIT`.
/// The device accepts descriptors with `VRING_DESC_F_INDIRECT`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// The used_event / avail_event fields are in use.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// A virtio 1.x ("modern") device; the transport refuses drivers that do not accept it.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// The device is behind an IOMMU or otherwise limited in what memory it can reach.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Packed virtqueue layout.
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// The device uses buffers in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;

// Device status bits (linux/virtio_config.h).
/// The guest found the device.
pub const VIRTIO_CONFIG_S_ACKNOWLEDGE: u32 = 1;
/// The guest has a driver for the device.
pub const VIRTIO_CONFIG_S_DRIVER: u32 = 2;
/// The driver is set up and ready to drive the device.
pub const VIRTIO_CONFIG_S_DRIVER_OK: u32 = 4;
/// The driver has acknowledged the features it understands; negotiation is complete.
pub const VIRTIO_CONFIG_S_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u32 = 0x40;
/// The driver gave up on the device.
pub const VIRTIO_CONFIG_S_FAILED: u32 = 0x80;

// InterruptStatus bits (linux/virtio_mmio.h).
/// The device used buffers in at least one virtqueue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1 << 0;
/// The device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 1 << 1;

/// Errors a device returns from [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device cannot work without was not set up by the driver.
    #[error("virtio device type {device_type}: queue {index} is not ready")]
    MissingQueue { device_type: u32, index: usize },
    /// The device was activated twice without a reset in between.
    #[error("virtio device type {device_type} is already active")]
    AlreadyActive { device_type: u32 },
    /// An eventfd the device needs could not be created or cloned.
    #[error("virtio device type {device_type}: cannot set up an eventfd")]
    EventFd {
        device_type: u32,
        #[source]
        source: std::io::Error,
    },
    /// The device's backend (socket, file system, tap) could not be started.
    #[error("virtio device type {device_type}: backend failed to start")]
    Backend {
        device_type: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A queue the driver set up and marked ready, handed to the device at activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue's index, as in `queue_max_sizes()` and the QueueSel register.
    pub index: usize,
    /// The queue, with its addresses validated against guest memory and EVENT_IDX set as
    /// negotiated.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (by ioeventfd or by an MMIO write).
    pub notify: EventFd,
}

/// Where a ready queue stands in guest memory, when a snapshot is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueProgress {
    /// The queue's index.
    pub index: usize,
    /// The driver's avail index: buffers it has offered.
    pub avail_idx: u16,
    /// The device's used index: buffers it has given back.
    pub used_idx: u16,
}

/// A virtio device, as the transport sees it.
///
/// Everything here is driven by guest writes: the transport only calls `ack_features` with a
/// subset of `avail_features` that includes `VIRTIO_F_VERSION_1`, but `read_config` and
/// `write_config` get guest-chosen offsets and lengths and must ignore what lies outside the
/// configuration space (the transport zeroes `data` before a read).
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues. Each size must be a
    /// power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers, including `1 << VIRTIO_F_VERSION_1`.
    fn avail_features(&self) -> u64;
    /// The features the driver accepted, once, when it sets FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device when the driver sets DRIVER_OK.
    ///
    /// `queues` holds only the queues the driver marked ready, each with its index (a driver may
    /// leave optional queues unused, such as virtio-net's control queue).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues, for a driver reset; returns false if the device
    /// cannot be reset, in which case the transport marks it FAILED.
    fn reset(&mut self) -> bool;
    /// Whether the running device can be snapshotted now: nothing in flight (every buffer it
    /// took from a queue given back, so each queue resumes at its used index), and no state a
    /// new device of the same configuration would lack. `progress` has the ready queues. The
    /// error says what stands in the way.
    fn snapshot_ready(&self, progress: &[QueueProgress]) -> Result<(), String> {
        let _ = progress;
        Err("this device cannot be snapshotted".into())
    }
}

/// Copies what lies at `offset` of a device's configuration space `config` into `data`; what
/// `data` reaches past the space's end is left as it is (the transport zeroed it).
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The queues handed over at activation, each in the slot of its index (a queue of an index
/// past `N` is dropped).
pub fn queue_slots<const N: usize>(queues: Vec<ActiveQueue>) -> [Option<ActiveQueue>; N] {
    let mut slots: [Option<ActiveQueue>; N] = std::array::from_fn(|_| None);
    for queue in queues {
        if let Some(slot) = slots.get_mut(queue.index) {
            *slot = Some(queue);
        }
    }
    slots
}

/// Locks a device, carrying on with its state if another thread panicked while holding it
/// (see `bus::lock`): one dead thread must not stop every vCPU that touches the device.
pub(crate) fn lock_device(
    device: &Mutex<dyn VirtioDevice>,
) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A rate limit for logging what the guest does wrong, so a guest cannot flood the host's log.
///
/// Lets `BURST` messages through per `WINDOW`, then counts the rest and reports how many were
/// dropped when the next window opens.
#[derive(Debug, Default)]
pub struct GuestErrorLog {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl GuestErrorLog {
    /// Messages let through per window.
    pub const BURST: u32 = 10;
    /// Length of a window.
    pub const WINDOW: Duration = Duration::from_secs(1);

    /// Creates a limiter with a full allowance.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs `message` as a warning unless the allowance is used up; returns whether it logged.
    pub fn warn(&mut self, message: fmt::Arguments<'_>) -> bool {
        let now = Instant::now();
        let window_open = self
            .window_start
            .is_some_and(|start| now.duration_since(start) < Self::WINDOW);
        if !window_open {
            if self.suppressed > 0 {
                log::warn!("{} guest error messages suppressed", self.suppressed);
            }
            self.window_start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::BURST {
            self.logged += 1;
            log::warn!("{message}");
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_error_log_limits_bursts() {
        let mut log = GuestErrorLog::new();
        let logged = (0..100)
            .filter(|i| log.warn(format_args!("bad write {i}")))
            .count();
        assert_eq!(logged, GuestErrorLog::BURST as usize);
        assert_eq!(log.suppressed, 100 - u64::from(GuestErrorLog::BURST));

        // A new window lets messages through again.
        log.window_start = Instant::now().checked_sub(GuestErrorLog::WINDOW);
        assert!(log.warn(format_args!("bad write again")));
        assert_eq!(log.suppressed, 0);
    }
}
