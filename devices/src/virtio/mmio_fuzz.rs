//! A byte-driven harness for the virtio-mmio transport: the fuzz target `virtio_mmio` in
//! `fuzz/` and the seeded random-input test below both run [`run`].
//!
//! An [`MmioTransport`] sits over a real device (a vsock device listening in a temporary
//! directory and turned by a real event manager, or, for one input in four, a read-only
//! virtio-fs device over an empty temporary share, whose worker thread starts at DRIVER_OK)
//! and guest memory of two regions with a hole between them. The input is a program for a
//! hostile driver: reads and writes of any width (0 to 8 bytes) at any offset of the window,
//! biased to the registers and the configuration space; the status dance done right or wrong
//! (features, FEATURES_OK, queues selected, sized, placed anywhere, inside memory, across its
//! end, in the hole, overlapping each other, made ready), DRIVER_OK, resets, activation again
//! and again, notifies, interrupts raised and acknowledged, guest memory scribbled over, event
//! loop turns and snapshots of the transport's state.
//!
//! Checked throughout: no panic; a 32-bit read of a register returns what the register holds
//! (the identification registers, the selected queue's maximum size and features, a status
//! with only spec bits) and any other width reads zeros; the configuration space reads the
//! device's bytes at every offset and width, zeros past its end; after a reset the status
//! reads 0, no interrupt is pending and the device is not running; a running device always has
//! DRIVER_OK set; what the transport and the device log stays within their rate limits.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::fs::{Fs, FsConfig};
use super::fuzz_utils::{warning_budget, warnings_logged, Input, TempDir};
use super::mmio::*;
use super::test_utils::{init_device, negotiate, read_reg, write_reg, DriverQueue};
use super::vsock::Vsock;
use super::{
    lock_device, InterruptKind, MmioTransport, VirtioDevice, VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

const GUEST_CID: u64 = 3;
const LOW_SIZE: u64 = 1 << 20;
/// The second region starts after a hole of the first one's size.
const HIGH_BASE: u64 = 2 * LOW_SIZE;
const HIGH_SIZE: u64 = 0x1_0000;
/// Steps per input, so that a long input cannot make one run slow.
const MAX_STEPS: usize = 256;
/// How much of the configuration space the harness models; both devices' are shorter.
const CONFIG_MODEL_LEN: usize = 256;
/// Every status bit the spec defines.
const STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

const REGISTERS: [u64; 30] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG + 8,
];

/// Runs one fuzz input against a fresh transport and device.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut harness = Harness::new(input.u8());
    let before = warnings_logged();
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        harness.step(&mut input);
        harness.check_invariants();
    }
    let logged = warnings_logged() - before;
    // The transport's limiter, the device's and the vsock muxer's.
    let budget = warning_budget(3);
    assert!(
        logged <= budget,
        "the transport logged {logged} warnings for one input (budget {budget})"
    );
}

/// The device behind the transport, and what keeps it running.
enum Backend {
    Vsock {
        _dir: TempDir,
        event_manager: Box<EventManager<Arc<Mutex<Vsock>>>>,
    },
    Fs {
        _dir: TempDir,
    },
}

struct Harness {
    mem: GuestMemoryMmap,
    transport: MmioTransport,
    device: Arc<Mutex<dyn VirtioDevice>>,
    backend: Backend,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    features: u64,
    /// The device's configuration space as it was at the start (neither device changes it).
    config: [u8; CONFIG_MODEL_LEN],
    /// The selectors as the driver last wrote them (a reset clears them).
    queue_sel: u32,
    device_features_sel: u32,
}

impl Harness {
    fn new(flags: u8) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), LOW_SIZE as usize),
            (GuestAddress(HIGH_BASE), HIGH_SIZE as usize),
        ])
        .expect("guest memory");
        let (device, backend): (Arc<Mutex<dyn VirtioDevice>>, _) = if flags & 3 == 0 {
            let dir = TempDir::in_memory("hull-mmio-fuzz-fs");
            let config = FsConfig {
                shared_dir: dir.path().to_path_buf(),
                tag: "rootfs".into(),
                read_only: true,
            };
            let fs = Fs::new(&config, Arc::new(crate::spawn::StdSpawner)).expect("fs device");
            (Arc::new(Mutex::new(fs)), Backend::Fs { _dir: dir })
        } else {
            let dir = TempDir::new("hull-mmio-fuzz-vsock");
            let vsock = Vsock::new(GUEST_CID, dir.path().join("v.sock")).expect("vsock device");
            let vsock = Arc::new(Mutex::new(vsock));
            let mut event_manager = EventManager::new().expect("event manager");
            event_manager.add_subscriber(vsock.clone());
            let backend = Backend::Vsock {
                _dir: dir,
                event_manager: Box::new(event_manager),
            };
            (vsock, backend)
        };
        let transport = MmioTransport::new(mem.clone(), device.clone()).expect("transport");
        let (device_type, queue_max_sizes, features, config) = {
            let locked = lock_device(&device);
            let mut config = [0u8; CONFIG_MODEL_LEN];
            locked.read_config(0, &mut config);
            (
                locked.device_type(),
                locked.queue_max_sizes().to_vec(),
                locked.avail_features(),
                config,
            )
        };
        Self {
            mem,
            transport,
            device,
            backend,
            device_type,
            queue_max_sizes,
            features,
            config,
            queue_sel: 0,
            device_features_sel: 0,
        }
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 16 {
            0..=3 => self.write(input),
            4 | 5 => self.read(input),
            6 => self.config(input),
            7 => self.bring_up(input),
            8 => self.status_step(input),
            9 => self.setup_queue(input),
            10 => {
                let value = self.queue_index(input);
                self.write_reg(VIRTIO_MMIO_QUEUE_NOTIFY, value);
            }
            11 => self.interrupt(input),
            12 => self.reset(),
            13 => self.scribble(input),
            14 => self.turn(1 + input.below(4)),
            _ => self.save_state(),
        }
    }

    fn offset(&self, input: &mut Input<'_>) -> u64 {
        match input.u8() % 16 {
            0..=8 => input.pick(&REGISTERS),
            9 => input.pick(&REGISTERS) + 1 + input.below(3) as u64,
            10 | 11 => VIRTIO_MMIO_CONFIG + input.below(64) as u64,
            12 => input.below(MMIO_WINDOW_SIZE as usize) as u64,
            13 => MMIO_WINDOW_SIZE - 1 - input.below(8) as u64,
            14 => u64::from(input.u8()),
            _ => input.u64(),
        }
    }

    fn width(input: &mut Input<'_>) -> usize {
        match input.u8() % 8 {
            0..=3 => 4,
            _ => input.below(9),
        }
    }

    /// A value shaped for the register it goes to, or anything.
    fn value(&mut self, input: &mut Input<'_>, offset: u64) -> u32 {
        if input.u8() % 8 == 0 {
            return input.u32();
        }
        match offset {
            VIRTIO_MMIO_STATUS => self.status_value(input),
            VIRTIO_MMIO_QUEUE_SEL | VIRTIO_MMIO_QUEUE_NOTIFY => self.queue_index(input),
            VIRTIO_MMIO_QUEUE_NUM => self.queue_size(input).into(),
            VIRTIO_MMIO_QUEUE_READY => input.pick(&[0, 1, 1, 2, u32::MAX]),
            VIRTIO_MMIO_DRIVER_FEATURES => {
                input.pick(&[1, 0, 1 << VIRTIO_RING_F_EVENT_IDX, u32::MAX])
            }
            VIRTIO_MMIO_DEVICE_FEATURES_SEL | VIRTIO_MMIO_DRIVER_FEATURES_SEL => {
                input.pick(&[0, 1, 2, u32::MAX])
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_USED_LOW => self.address(input) as u32,
            VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_HIGH => (self.address(input) >> 32) as u32,
            VIRTIO_MMIO_INTERRUPT_ACK => input.pick(&[1, 2, 3, u32::MAX]),
            _ => u32::from(input.u8()),
        }
    }

    fn status_value(&mut self, input: &mut Input<'_>) -> u32 {
        let current = self.status();
        let bit = input.pick(&[
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
            VIRTIO_CONFIG_S_FAILED,
            VIRTIO_CONFIG_S_NEEDS_RESET,
        ]);
        match input.u8() % 8 {
            0 => 0,
            1 => bit,
            2 => u32::from(input.u8()),
            3 => current & !bit,
            _ => current | bit,
        }
    }

    fn queue_index(&self, input: &mut Input<'_>) -> u32 {
        match input.u8() % 8 {
            0 => input.u32(),
            1 => self.queue_max_sizes.len() as u32,
            _ => input.below(self.queue_max_sizes.len()) as u32,
        }
    }

    fn queue_size(&self, input: &mut Input<'_>) -> u16 {
        let max = self.queue_max_sizes.first().copied().unwrap_or(1);
        match input.u8() % 8 {
            0 => input.u16(),
            1 => max,
            2 => max.wrapping_mul(2),
            3 => input.pick(&[0, 3, 1000, u16::MAX]),
            _ => 1 << input.below(11),
        }
    }

    /// A guest-physical address for a queue area: usually inside memory, often at its edges,
    /// in the hole, past its end, or anywhere.
    fn address(&self, input: &mut Input<'_>) -> u64 {
        match input.u8() % 16 {
            0..=5 => (input.below(LOW_SIZE as usize / 0x1000) as u64) * 0x1000,
            6 => LOW_SIZE - 2 * input.below(64) as u64,
            7 => HIGH_BASE + 16 * input.below(HIGH_SIZE as usize / 16) as u64,
            8 => HIGH_BASE + HIGH_SIZE - 16 * input.below(64) as u64,
            9 => LOW_SIZE + 0x1000 * input.below(16) as u64,
            10 => u64::MAX - input.below(0x1000) as u64,
            11 => 1 + 2 * input.below(0x1000) as u64,
            12 => 1 << (32 + input.below(32)),
            _ => input.u64(),
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport_write(offset, &value.to_le_bytes());
    }

    /// Every write goes through here, to keep the selectors the harness checks reads against.
    fn transport_write(&mut self, offset: u64, data: &[u8]) {
        self.transport.write(offset, data);
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            let value = u32::from_le_bytes(bytes);
            match offset {
                VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
                VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
                VIRTIO_MMIO_STATUS if value == 0 => self.check_reset(),
                _ => {}
            }
        }
    }

    fn write(&mut self, input: &mut Input<'_>) {
        let offset = self.offset(input);
        let width = Self::width(input);
        let value = u64::from(self.value(input, offset)) | u64::from(input.u32()) << 32;
        let bytes = value.to_le_bytes();
        let data = if width <= 8 {
            &bytes[..width]
        } else {
            &bytes[..]
        };
        self.transport_write(offset, data);
    }

    fn status(&mut self) -> u32 {
        read_reg(&mut self.transport, VIRTIO_MMIO_STATUS)
    }

    /// Reads at any width; a register's value is checked against what it must hold.
    fn read(&mut self, input: &mut Input<'_>) {
        let offset = self.offset(input);
        let width = Self::width(input);
        let mut data = vec![0xa5u8; width];
        self.transport.read(offset, &mut data);
        if offset >= VIRTIO_MMIO_CONFIG {
            return self.check_config(offset - VIRTIO_MMIO_CONFIG, &data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(&data[..]) else {
            assert!(
                data.iter().all(|&b| b == 0),
                "{width}-byte read of register {offset:#x} returned {data:02x?}"
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let queue = self.queue_max_sizes.get(self.queue_sel as usize).copied();
        let expected = match offset {
            VIRTIO_MMIO_MAGIC_VALUE => Some(MMIO_MAGIC_VALUE),
            VIRTIO_MMIO_VERSION => Some(MMIO_VERSION),
            VIRTIO_MMIO_DEVICE_ID => Some(self.device_type),
            VIRTIO_MMIO_VENDOR_ID => Some(MMIO_VENDOR_ID),
            VIRTIO_MMIO_DEVICE_FEATURES => Some(match self.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            }),
            VIRTIO_MMIO_QUEUE_NUM_MAX => Some(queue.map_or(0, u32::from)),
            VIRTIO_MMIO_QUEUE_READY => {
                assert!(value <= 1, "QueueReady reads {value:#x}");
                queue.is_none().then_some(0)
            }
            VIRTIO_MMIO_INTERRUPT_STATUS => {
                assert_eq!(value & !3, 0, "InterruptStatus reads {value:#x}");
                None
            }
            VIRTIO_MMIO_STATUS => {
                assert_eq!(value & !STATUS_BITS, 0, "Status reads {value:#x}");
                None
            }
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => Some(u32::MAX),
            VIRTIO_MMIO_CONFIG_GENERATION => None,
            _ => Some(0),
        };
        if let Some(expected) = expected {
            assert_eq!(
                value, expected,
                "register {offset:#x} reads {value:#x}, not {expected:#x}"
            );
        }
    }

    fn check_config(&self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            let expected = at
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at).copied())
                .unwrap_or(0);
            assert_eq!(
                byte,
                expected,
                "{}-byte configuration read at {offset:#x} returned {data:02x?}",
                data.len()
            );
        }
    }

    fn config(&mut self, input: &mut Input<'_>) {
        let offset = VIRTIO_MMIO_CONFIG
            + match input.u8() % 4 {
                0 => input.u64() % (u64::MAX - VIRTIO_MMIO_CONFIG),
                _ => input.below(48) as u64,
            };
        let width = Self::width(input);
        let mut data = vec![0x5au8; width];
        self.transport.read(offset, &mut data);
        self.check_config(offset - VIRTIO_MMIO_CONFIG, &data);
        if input.bool() {
            let junk = input.bytes(8).to_vec();
            self.transport_write(offset, &junk);
        }
    }

    /// The status dance the way Linux does it, with features and queue placement from the
    /// input: usually a running device, sometimes a refused one.
    fn bring_up(&mut self, input: &mut Input<'_>) {
        let features = match input.u8() % 8 {
            0 => input.u64(),
            1 => 1 << VIRTIO_RING_F_EVENT_IDX,
            2 => self.features | 1 << VIRTIO_RING_F_EVENT_IDX,
            _ => self.features,
        };
        let queues = self.queue_max_sizes.len();
        let mut drivers = Vec::new();
        for index in 0..queues {
            if input.u8() % 8 == 0 {
                continue;
            }
            let base = match input.u8() % 8 {
                0 => self.address(input) & !0xfff,
                _ => (index as u64) * 0x4_0000,
            };
            let size = match input.u8() % 4 {
                0 => 1 << input.below(11),
                _ => 64,
            };
            // A queue that does not fit in memory is programmed by hand instead (the
            // driver-side helper only takes addresses in or near memory).
            let driver = (base < HIGH_BASE + HIGH_SIZE)
                .then(|| DriverQueue::new(&self.mem, GuestAddress(base), size).ok())
                .flatten();
            match driver {
                Some(driver) => drivers.push((index as u32, driver)),
                None => {
                    negotiate(&mut self.transport, features);
                    self.queue_sel = 0;
                    self.device_features_sel = 0;
                    return self.setup_queue(input);
                }
            }
        }
        let configs: Vec<(u32, &DriverQueue)> = drivers.iter().map(|(i, d)| (*i, d)).collect();
        let status = init_device(&mut self.transport, features, &configs);
        self.queue_sel = drivers.last().map_or(0, |(index, _)| *index);
        self.device_features_sel = 0;
        let accepted = features & !self.features == 0 && features & 1 << VIRTIO_F_VERSION_1 != 0;
        if accepted {
            assert_ne!(
                status & VIRTIO_CONFIG_S_FEATURES_OK,
                0,
                "features {features:#x} refused"
            );
        } else {
            assert_eq!(
                status & VIRTIO_CONFIG_S_FEATURES_OK,
                0,
                "features {features:#x} accepted"
            );
        }
    }

    fn status_step(&mut self, input: &mut Input<'_>) {
        let value = self.status_value(input);
        self.write_reg(VIRTIO_MMIO_STATUS, value);
    }

    /// Programs one queue register by register, each value from the input.
    fn setup_queue(&mut self, input: &mut Input<'_>) {
        let index = self.queue_index(input);
        self.write_reg(VIRTIO_MMIO_QUEUE_SEL, index);
        if input.u8() % 4 != 0 {
            let size = self.queue_size(input);
            self.write_reg(VIRTIO_MMIO_QUEUE_NUM, size.into());
        }
        let desc = self.address(input);
        // Overlapping areas, or each its own.
        let avail = match input.u8() % 4 {
            0 => desc,
            _ => self.address(input),
        };
        let used = match input.u8() % 4 {
            0 => avail,
            1 => desc.wrapping_add(8),
            _ => self.address(input),
        };
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, used),
        ] {
            if input.u8() % 8 != 0 {
                self.write_reg(low, addr as u32);
                self.write_reg(low + 4, (addr >> 32) as u32);
            }
        }
        if input.u8() % 4 != 0 {
            let ready = input.pick(&[1, 1, 1, 0, 2]);
            self.write_reg(VIRTIO_MMIO_QUEUE_READY, ready);
        }
    }

    /// The device raises an interrupt (as a running device would), then the driver reads the
    /// status and acknowledges some of it.
    fn interrupt(&mut self, input: &mut Input<'_>) {
        let interrupt = Arc::clone(self.transport.interrupt());
        match input.u8() % 4 {
            0 => {
                let _ = interrupt.trigger(InterruptKind::Vring);
            }
            1 => {
                let _ = interrupt.trigger(InterruptKind::Config);
            }
            2 => {
                let _ = interrupt.signal_needs_reset();
            }
            _ => {}
        }
        let pending = read_reg(&mut self.transport, VIRTIO_MMIO_INTERRUPT_STATUS);
        let ack = match input.u8() % 4 {
            0 => input.u32(),
            _ => pending,
        };
        self.write_reg(VIRTIO_MMIO_INTERRUPT_ACK, ack);
        let left = read_reg(&mut self.transport, VIRTIO_MMIO_INTERRUPT_STATUS);
        if matches!(self.backend, Backend::Fs { .. }) {
            // The fs worker may raise an interrupt meanwhile.
            return;
        }
        assert_eq!(
            left,
            pending & !ack,
            "interrupt status {pending:#x} acknowledged with {ack:#x} left {left:#x}"
        );
    }

    fn reset(&mut self) {
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
    }

    /// After a status write of 0: both devices always reset, so everything is back to start.
    fn check_reset(&mut self) {
        self.queue_sel = 0;
        self.device_features_sel = 0;
        let status = self.status();
        assert_eq!(status, 0, "status {status:#x} after a reset");
        assert!(!self.transport.is_activated(), "running after a reset");
        let pending = read_reg(&mut self.transport, VIRTIO_MMIO_INTERRUPT_STATUS);
        assert_eq!(pending, 0, "interrupt status {pending:#x} after a reset");
        for index in 0..self.queue_max_sizes.len() as u32 {
            write_reg(&mut self.transport, VIRTIO_MMIO_QUEUE_SEL, index);
            let ready = read_reg(&mut self.transport, VIRTIO_MMIO_QUEUE_READY);
            assert_eq!(ready, 0, "queue {index} ready after a reset");
        }
        write_reg(&mut self.transport, VIRTIO_MMIO_QUEUE_SEL, 0);
    }

    /// The guest writes anything anywhere, rings included.
    fn scribble(&mut self, input: &mut Input<'_>) {
        let addr = match input.u8() % 4 {
            0 => HIGH_BASE + input.below(HIGH_SIZE as usize) as u64,
            _ => input.below(LOW_SIZE as usize) as u64,
        };
        let data = input.bytes(64);
        let _ = self.mem.write_slice(data, GuestAddress(addr));
    }

    fn turn(&mut self, max: usize) {
        if let Backend::Vsock { event_manager, .. } = &mut self.backend {
            for _ in 0..max {
                if event_manager.run_with_timeout(0).expect("event loop") == 0 {
                    break;
                }
            }
        }
    }

    fn save_state(&mut self) {
        let status = self.status();
        if let Ok(state) = self.transport.save_state() {
            assert_eq!(state.activated, self.transport.is_activated());
            assert_eq!(state.device_status, status & !VIRTIO_CONFIG_S_NEEDS_RESET);
            assert_eq!(state.queues.len(), self.queue_max_sizes.len());
        }
    }

    fn check_invariants(&mut self) {
        if self.transport.is_activated() {
            let status = self.status();
            assert_ne!(
                status & VIRTIO_CONFIG_S_DRIVER_OK,
                0,
                "running without DRIVER_OK: {status:#x}"
            );
        }
        // The device is never left locked (a poisoned lock would be a panic somewhere).
        assert!(self.device.try_lock().is_ok(), "the device lock is held");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzz_utils::run_seeded;

    /// Random programs.
    #[test]
    fn random_register_programs_keep_the_transport_sane() {
        run_seeded(0x6d6d_696f_2121, 3000, 1024, run);
    }
}
