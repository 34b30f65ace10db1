//! The fuzz harness of the net device (`fuzz/fuzz_targets/net.rs`; a seeded unit test runs it
//! on every `cargo test`): a hostile guest's transmit chains (any layout, any header, any
//! length, writable descriptors where none belong), receive buffers of any size (none, tiny,
//! huge), frames of any length from the host's side, runs of the event loop, and resets, in any
//! order. The backend is a socket pair that keeps frame boundaries (`SOCK_SEQPACKET`), so no
//! privilege is needed.
//!
//! Checked: nothing panics; every used entry names a chain the driver offered and reports no
//! more than its writable room (the driver-side queue checks both); the event loop goes idle;
//! the logs stay within the rate limiter's budget.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::FrameIo;
use super::{Net, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::virtio::fuzz_utils::{warning_budget, warnings_logged, Input};
use crate::virtio::test_utils::{Buffer, DriverQueue};
use crate::virtio::{ActiveQueue, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};

const MAX_STEPS: usize = 256;
const REGION: u64 = 16 << 20;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// One end of a `SOCK_SEQPACKET` pair as the device's backend.
pub struct PairIo(pub OwnedFd);

impl AsRawFd for PairIo {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl FrameIo for PairIo {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.0.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
    }

    fn write_frame(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg::<UnixAddr>(self.0.as_raw_fd(), parts, &[], MsgFlags::MSG_DONTWAIT, None)
            .map_err(io::Error::from)
    }

    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn name(&self) -> &str {
        "fuzz-pair"
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let before = warnings_logged();
    let mut harness = Harness::new(input.u64());
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        harness.step(&mut input);
    }
    harness.check_goes_idle();
    let logged = warnings_logged() - before;
    assert!(
        logged <= warning_budget(1),
        "the device logged {logged} warnings for one input"
    );
}

struct Harness {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    device: Arc<Mutex<Net>>,
    events: EventManager<Arc<Mutex<Net>>>,
    interrupt: Arc<IrqTrigger>,
    host: OwnedFd,
    features: u64,
}

impl Harness {
    fn new(features: u64) -> Self {
        let (ours, host) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let device = Net::new(Box::new(PairIo(ours)), MAC, 1500).expect("net");
        let device = Arc::new(Mutex::new(device));
        let mut events = EventManager::new().expect("event manager");
        events.add_subscriber(device.clone());
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .expect("memory");
        let mut harness = Self {
            rx: DriverQueue::new(&mem, GuestAddress(0), QUEUE_SIZE).expect("rx"),
            tx: DriverQueue::new(&mem, GuestAddress(REGION), QUEUE_SIZE).expect("tx"),
            mem,
            device,
            events,
            interrupt: Arc::new(IrqTrigger::new().expect("irq")),
            host,
            features,
        };
        harness.activate();
        harness
    }

    fn activate(&mut self) {
        let queue = |q: &DriverQueue, index| ActiveQueue {
            index,
            queue: q.device_queue(QUEUE_SIZE).expect("queue"),
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        };
        let queues = vec![queue(&self.rx, RX_QUEUE), queue(&self.tx, TX_QUEUE)];
        let mut device = self.device.lock().unwrap();
        let offered = device.avail_features();
        device.ack_features((self.features & offered) | 1 << VIRTIO_F_VERSION_1);
        device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .expect("activate");
    }

    fn notify(&self, index: usize) {
        let device = self.device.lock().unwrap();
        if let Some(active) = &device.active {
            let evt = if index == RX_QUEUE {
                &active.rx_evt
            } else {
                &active.tx_evt
            };
            evt.write(1).expect("notify");
        }
    }

    fn turn(&mut self) -> usize {
        let n = self.events.run_with_timeout(0).expect("event loop");
        // The driver-side queues check every used entry: a head never offered or a length past
        // the chain's room is the device's bug.
        while let Some(chain) = self.rx.pop_used().expect("receive used ring") {
            assert!(chain.len as usize <= MAX_FRAME_LEN);
        }
        while self.tx.pop_used().expect("transmit used ring").is_some() {}
        n
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 6 {
            0 => {
                // A transmit chain: a header of any fields, then readable (or writable) parts.
                let mut parts: Vec<Vec<u8>> = Vec::new();
                let mut writable = Vec::new();
                let n = 1 + input.below(4);
                for _ in 0..n {
                    if input.u8() % 5 == 0 {
                        writable.push(input.below(4096) as u32);
                        parts.push(Vec::new());
                        continue;
                    }
                    let len = input.pick(&[0, 1, VNET_HDR_LEN, 14, 60, 1514, 9000, 70_000]);
                    let len = if input.bool() { len } else { input.below(2048) };
                    let mut part = input.bytes(VNET_HDR_LEN).to_vec();
                    part.resize(len, 0x5a);
                    parts.push(part);
                }
                let mut w = writable.into_iter();
                let buffers: Vec<Buffer<'_>> = parts
                    .iter()
                    .map(|p| {
                        if p.is_empty() {
                            Buffer::Writable(w.next().unwrap_or(0))
                        } else {
                            Buffer::Readable(p)
                        }
                    })
                    .collect();
                if self.tx.add_chain(&buffers).is_ok() {
                    self.notify(TX_QUEUE);
                }
            }
            1 => {
                let count = 1 + input.below(8);
                let size = input.pick(&[0u32, 1, 11, 12, 100, 1526, 4096, 65_562]);
                let size = if input.bool() {
                    size
                } else {
                    u32::from(input.u16())
                };
                for _ in 0..count {
                    if self.rx.add_chain(&[Buffer::Writable(size)]).is_err() {
                        break;
                    }
                }
                self.notify(RX_QUEUE);
            }
            2 => {
                let len = input.pick(&[0usize, 5, 12, 25, 60, 1514, 9000, 65_562]);
                let len = if input.bool() { len } else { input.below(3000) };
                let mut frame = input.bytes(26).to_vec();
                frame.resize(len, 0xa5);
                // Full or too big: the host's side may fail, as a TAP's writer may.
                let _ = sendmsg::<UnixAddr>(
                    self.host.as_raw_fd(),
                    &[IoSlice::new(&frame)],
                    &[],
                    MsgFlags::MSG_DONTWAIT,
                    None,
                );
            }
            3 => {
                self.turn();
            }
            4 => {
                // A reset, and a driver that starts again with new rings.
                assert!(self.device.lock().unwrap().reset());
                self.turn();
                self.rx = DriverQueue::new(&self.mem, GuestAddress(0), QUEUE_SIZE).expect("rx");
                self.tx =
                    DriverQueue::new(&self.mem, GuestAddress(REGION), QUEUE_SIZE).expect("tx");
                self.features = input.u64();
                self.activate();
            }
            _ => {
                // Whatever the guest's frames became on the host's side.
                let mut buf = vec![0u8; MAX_FRAME_LEN];
                while recv(self.host.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
            }
        }
    }

    /// With nothing more coming, the event loop runs dry: no event re-arms itself for ever.
    fn check_goes_idle(&mut self) {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        for _ in 0..10_000 {
            while recv(self.host.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
            if self.turn() == 0 {
                return;
            }
        }
        panic!("the net device's events never stop");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzz_utils::run_seeded;

    #[test]
    fn random_inputs_neither_panic_nor_spin() {
        run_seeded(0x6e65_7421, 300, 1500, run);
    }
}
