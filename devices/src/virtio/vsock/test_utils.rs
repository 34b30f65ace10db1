//! Test helpers: a temporary directory, and [`TestGuest`], which plays the guest driver of a
//! vsock device that runs in a real event manager (epoll, no KVM), with real Unix sockets.
//!
//! Everything is single-threaded: the test alternates between acting as the guest (queues),
//! acting as a host client (non-blocking sockets), and turning the event loop. Waits have
//! deadlines; none is a fixed sleep.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{VsockHeader, VSOCK_HDR_SIZE};
use super::{Vsock, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HOST_CID};
use crate::virtio::test_utils::{Buffer, DriverQueue};
use crate::virtio::{ActiveQueue, IrqTrigger, VirtioDevice};

pub const GUEST_CID: u64 = 3;
/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Size of the rx buffers the test guest posts (header plus a page, like Linux).
pub const RX_BUF_SIZE: u32 = VSOCK_HDR_SIZE as u32 + 4096;
/// The buffer the test guest advertises per connection.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;

const REGION_SIZE: u64 = 64 << 20;

pub use crate::virtio::fuzz_utils::TempDir;

/// A received rx packet.
pub type Packet = (VsockHeader, Vec<u8>);

/// The guest side of a vsock device, with the device in an event manager.
pub struct TestGuest {
    pub dir: TempDir,
    pub uds: PathBuf,
    pub mem: GuestMemoryMmap,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    pub rx_notify: EventFd,
    pub tx_notify: EventFd,
    pub interrupt: Arc<IrqTrigger>,
    pub device: Arc<Mutex<Vsock>>,
    pub event_manager: EventManager<Arc<Mutex<Vsock>>>,
    /// Packets taken from the rx used ring, oldest first.
    pub received: VecDeque<Packet>,
    /// Whether to post a fresh rx buffer for each one used.
    pub refill_rx: bool,
}

impl TestGuest {
    /// A device registered with an event manager, activated with `rx_buffers` rx buffers.
    pub fn new(rx_buffers: usize) -> Self {
        let mut guest = Self::inactive();
        guest.activate();
        guest.post_rx(rx_buffers);
        guest.turn();
        guest
    }

    /// A device registered with an event manager, not yet activated.
    pub fn inactive() -> Self {
        let dir = TempDir::new("hull-devices-test");
        let uds = dir.path().join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION_SIZE as usize),
            (GuestAddress(REGION_SIZE), REGION_SIZE as usize),
            (GuestAddress(2 * REGION_SIZE), REGION_SIZE as usize),
        ])
        .expect("guest memory");
        let rx = DriverQueue::new(&mem, GuestAddress(0), 256).expect("rx queue");
        let tx = DriverQueue::new(&mem, GuestAddress(REGION_SIZE), 256).expect("tx queue");
        let device = Arc::new(Mutex::new(
            Vsock::new(GUEST_CID, uds.clone()).expect("vsock device"),
        ));
        let mut event_manager = EventManager::new().expect("event manager");
        event_manager.add_subscriber(device.clone());
        Self {
            dir,
            uds,
            mem,
            rx,
            tx,
            rx_notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            tx_notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            interrupt: Arc::new(IrqTrigger::new().expect("irq")),
            device,
            event_manager,
            received: VecDeque::new(),
            refill_rx: true,
        }
    }

    /// The three queues as the transport would hand them over.
    pub fn active_queues(&self) -> Vec<ActiveQueue> {
        let event = DriverQueue::new(&self.mem, GuestAddress(2 * REGION_SIZE), 16).expect("event");
        vec![
            ActiveQueue {
                index: 0,
                queue: self.rx.device_queue(256).expect("rx"),
                notify: self.rx_notify.try_clone().expect("clone"),
            },
            ActiveQueue {
                index: 1,
                queue: self.tx.device_queue(256).expect("tx"),
                notify: self.tx_notify.try_clone().expect("clone"),
            },
            ActiveQueue {
                index: 2,
                queue: event.device_queue(256).expect("event"),
                notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            },
        ]
    }

    pub fn activate(&mut self) {
        let queues = self.active_queues();
        self.device
            .lock()
            .unwrap()
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .expect("activate");
    }

    /// Lays the queues out afresh (as a driver does after a reset) and activates again.
    pub fn reactivate(&mut self, rx_buffers: usize) {
        self.rx = DriverQueue::new(&self.mem, GuestAddress(0), 256).expect("rx queue");
        self.tx = DriverQueue::new(&self.mem, GuestAddress(REGION_SIZE), 256).expect("tx queue");
        self.received.clear();
        self.activate();
        self.post_rx(rx_buffers);
        self.turn();
    }

    /// Posts `n` rx buffers and kicks the rx queue.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx
                .add_chain(&[Buffer::Writable(RX_BUF_SIZE)])
                .expect("rx buffer");
        }
        self.rx_notify.write(1).expect("kick rx");
    }

    /// Sends a chain of raw buffers on tx and kicks.
    pub fn send_raw(&mut self, buffers: &[Buffer<'_>]) {
        self.tx.add_chain(buffers).expect("tx chain");
        self.tx_notify.write(1).expect("kick tx");
    }

    /// Sends a packet on tx (header and payload in separate descriptors, as Linux does).
    pub fn send(&mut self, hdr: VsockHeader, data: &[u8]) {
        let raw = hdr.to_bytes();
        if data.is_empty() {
            self.send_raw(&[Buffer::Readable(&raw)]);
        } else {
            self.send_raw(&[Buffer::Readable(&raw), Buffer::Readable(data)]);
        }
    }

    /// Runs the event loop until it has nothing to do, then collects rx packets.
    pub fn turn(&mut self) {
        for _ in 0..1000 {
            let n = self.event_manager.run_with_timeout(0).expect("event loop");
            self.collect();
            if n == 0 {
                break;
            }
        }
    }

    fn collect(&mut self) {
        let mut used = 0;
        while let Some(chain) = self.rx.pop_used().expect("rx used ring") {
            used += 1;
            if chain.written.len() < VSOCK_HDR_SIZE {
                continue;
            }
            let raw: [u8; VSOCK_HDR_SIZE] = chain.written[..VSOCK_HDR_SIZE]
                .try_into()
                .expect("header size");
            let hdr = VsockHeader::from_bytes(&raw);
            self.received
                .push_back((hdr, chain.written[VSOCK_HDR_SIZE..].to_vec()));
        }
        // Drain the tx used ring so its descriptors are free again.
        while self.tx.pop_used().expect("tx used ring").is_some() {}
        if self.refill_rx && used > 0 {
            self.post_rx(used);
        }
    }

    /// Turns the event loop until `done` holds; panics after the deadline.
    pub fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.turn();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            let _ = self.event_manager.run_with_timeout(10).expect("event loop");
            self.collect();
        }
    }

    /// Waits for the next rx packet.
    pub fn expect_packet(&mut self) -> Packet {
        self.run_until("an rx packet", |g| !g.received.is_empty());
        self.received.pop_front().expect("checked")
    }

    /// A header from the guest's port `src_port` to host port `dst_port`.
    pub fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    /// A data packet with the guest's `fwd_cnt`.
    pub fn send_data(&mut self, src_port: u32, dst_port: u32, fwd_cnt: u32, data: &[u8]) {
        let mut hdr = self.hdr(VIRTIO_VSOCK_OP_RW, src_port, dst_port);
        hdr.len = data.len() as u32;
        hdr.fwd_cnt = fwd_cnt;
        self.send(hdr, data);
    }

    /// Connects a host client to the device's socket and sends `CONNECT <port>`.
    pub fn host_connect(&self, port: u32) -> UnixStream {
        let mut client = UnixStream::connect(&self.uds).expect("connect to the vsock socket");
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("write CONNECT");
        client.set_nonblocking(true).expect("non-blocking");
        client
    }
}

/// Reads what is there from a non-blocking socket; `None` at end of file.
pub fn read_available(stream: &mut UnixStream, into: &mut Vec<u8>) -> Option<usize> {
    let mut buf = [0u8; 16384];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return if total > 0 { Some(total) } else { None },
            Ok(n) => {
                into.extend_from_slice(&buf[..n]);
                total += n;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(total),
            Err(e) => panic!("host socket read failed: {e}"),
        }
    }
}

/// A deterministic byte pattern, different per stream.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7)) as u8
        })
        .collect()
}
