//! A byte-driven harness for the vsock device: the fuzz target `vsock` in `fuzz/` and the
//! seeded random-input test below both run [`run`].
//!
//! The input is a program for a hostile guest and a busy host at once. The device sits in a
//! real event manager with real Unix sockets in a temporary directory (a listening socket for
//! host clients, and host services at `<uds>_52` and `<uds>_1024`); each step of the program
//! sends a packet (any op, type, flags, len, buf_alloc, fwd_cnt, ports and CIDs, laid out over
//! any descriptors), posts rx buffers of any size, offers a malformed chain, runs the available
//! index away, resets the device, connects a host client, writes, reads or closes a host
//! socket, or turns the event loop.
//!
//! Checked throughout: no panic; the used rings only hold what the driver offered, with
//! lengths its buffers can hold; every rx packet's `len` is its payload, its payload at most
//! `MAX_PKT_BUF_SIZE`, and it is addressed to the guest; connections and buffered bytes stay
//! under their caps; what the device logs stays within its rate limits. At the end, with
//! nothing new from either side, the event loop must go idle (a socket or eventfd that stays
//! ready without being dealt with would spin the VMM thread).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{VsockHeader, VSOCK_HDR_SIZE};
use super::unix::{port_socket_path, MAX_REQUEST_LINE};
use super::{
    Vsock, CONN_BUF_SIZE, CONN_TO_GUEST_BUF_SIZE, MAX_CONNECTIONS, MAX_PKT_BUF_SIZE, QUEUE_SIZE,
    VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HOST_CID,
};
use crate::virtio::fuzz_utils::{warning_budget, warnings_logged, Input, TempDir};
use crate::virtio::test_utils::{Buffer, DriverQueue, DriverQueueError};
use crate::virtio::{ActiveQueue, IrqTrigger, VirtioDevice};

const GUEST_CID: u64 = 3;
/// Host services listen on `<uds>_<port>` for these ports.
const SERVICE_PORTS: [u32; 2] = [52, 1024];
/// Ports the guest's sockets use.
const GUEST_PORTS: [u32; 3] = [1000, 1001, 40000];
const RX_BUF_SIZE: u32 = VSOCK_HDR_SIZE as u32 + 4096;
const REGION_SIZE: u64 = 4 << 20;
const RX_BASE: GuestAddress = GuestAddress(0);
const TX_BASE: GuestAddress = GuestAddress(REGION_SIZE);
const EVENT_BASE: GuestAddress = GuestAddress(2 * REGION_SIZE);
/// Steps per input, so that a long input cannot make one run slow.
const MAX_STEPS: usize = 400;
/// Host clients per input (below the device's cap on clients without a request line).
const MAX_HOST_CLIENTS: usize = 48;
/// Event loop turns after which a quiet device must have gone idle.
const IDLE_TURNS: usize = 64;

/// Runs one fuzz input against a fresh device.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut harness = Harness::new(input.u8());
    let before = warnings_logged();
    for _ in 0..MAX_STEPS {
        if input.is_empty() || harness.lost_track {
            break;
        }
        harness.step(&mut input);
    }
    harness.check_goes_idle();
    let logged = warnings_logged() - before;
    let budget = warning_budget(2) + harness.host_clients;
    assert!(
        logged <= budget,
        "the device logged {logged} warnings for one input (budget {budget})"
    );
}

struct Harness {
    _dir: TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_notify: EventFd,
    tx_notify: EventFd,
    interrupt: Arc<IrqTrigger>,
    device: Arc<Mutex<Vsock>>,
    event_manager: EventManager<Arc<Mutex<Vsock>>>,
    services: Vec<UnixListener>,
    /// Host clients of the device's socket and accepted service connections.
    host: Vec<UnixStream>,
    host_clients: u64,
    /// Local ports of host-initiated connections, from the REQUESTs the guest saw.
    local_ports: Vec<u32>,
    /// Payload bytes the guest received per (guest port, host port): its `fwd_cnt`.
    rx_cnt: HashMap<(u32, u32), u32>,
    refill_rx: bool,
    /// The guest wrote descriptors or indices behind the driver's back: the driver-side
    /// bookkeeping may not match the rings any more, so only the device's own invariants count.
    malformed: bool,
    /// The driver-side view is beyond repair; stop.
    lost_track: bool,
}

impl Harness {
    fn new(flags: u8) -> Self {
        let dir = TempDir::new("hull-vsock-fuzz");
        let uds = dir.path().join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[
            (RX_BASE, REGION_SIZE as usize),
            (TX_BASE, REGION_SIZE as usize),
            (EVENT_BASE, 0x1_0000),
        ])
        .expect("guest memory");
        let services = SERVICE_PORTS
            .iter()
            .map(|&port| {
                let listener =
                    UnixListener::bind(port_socket_path(&uds, port)).expect("service socket");
                listener.set_nonblocking(true).expect("non-blocking");
                listener
            })
            .collect();
        let mut vsock = Vsock::new(GUEST_CID, uds.clone()).expect("vsock device");
        if flags & 1 != 0 {
            // Host-initiated connections time out at once (after the timer's 1 ms).
            vsock.muxer.connect_timeout = Duration::ZERO;
        }
        let device = Arc::new(Mutex::new(vsock));
        let mut event_manager = EventManager::new().expect("event manager");
        event_manager.add_subscriber(device.clone());
        let mut harness = Self {
            _dir: dir,
            uds,
            rx: DriverQueue::new(&mem, RX_BASE, QUEUE_SIZE).expect("rx queue"),
            tx: DriverQueue::new(&mem, TX_BASE, QUEUE_SIZE).expect("tx queue"),
            mem,
            rx_notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            tx_notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            interrupt: Arc::new(IrqTrigger::new().expect("irq")),
            device,
            event_manager,
            services,
            host: Vec::new(),
            host_clients: 0,
            local_ports: Vec::new(),
            rx_cnt: HashMap::new(),
            refill_rx: flags & 2 == 0,
            malformed: false,
            lost_track: false,
        };
        harness.activate();
        harness.post_rx(16, RX_BUF_SIZE, 0);
        harness.turn(8);
        harness
    }

    fn activate(&mut self) {
        let event = DriverQueue::new(&self.mem, EVENT_BASE, 16).expect("event queue");
        let queue = |driver: &DriverQueue| driver.device_queue(QUEUE_SIZE).expect("queue");
        let queues = vec![
            ActiveQueue {
                index: 0,
                queue: queue(&self.rx),
                notify: self.rx_notify.try_clone().expect("clone"),
            },
            ActiveQueue {
                index: 1,
                queue: queue(&self.tx),
                notify: self.tx_notify.try_clone().expect("clone"),
            },
            ActiveQueue {
                index: 2,
                queue: queue(&event),
                notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            },
        ];
        self.device
            .lock()
            .expect("device lock")
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .expect("activate");
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 16 {
            0..=3 => self.send_packet(input),
            4 => self.malformed_chain(input),
            5 => {
                let n = 1 + input.below(16);
                let size = input.pick(&[
                    RX_BUF_SIZE,
                    0,
                    1,
                    VSOCK_HDR_SIZE as u32 - 1,
                    VSOCK_HDR_SIZE as u32,
                    VSOCK_HDR_SIZE as u32 + 1,
                    100,
                    VSOCK_HDR_SIZE as u32 + MAX_PKT_BUF_SIZE,
                ]);
                let layout = input.u8();
                self.post_rx(n, size, layout);
            }
            6 => self.host_connect(input),
            7 => self.host_write(input),
            8 => self.host_read(input),
            9 => self.host_close(input),
            10 => self.accept_services(),
            11 if input.u8() % 8 == 0 => self.runaway_index(input),
            12 if input.u8() % 4 == 0 => self.reset(),
            13 => self.config(input),
            _ => {
                let turns = 1 + input.below(4);
                self.turn(turns);
            }
        }
    }

    fn guest_port(&self, input: &mut Input<'_>) -> u32 {
        match input.u8() % 8 {
            0 => input.u32(),
            _ => input.pick(&GUEST_PORTS),
        }
    }

    fn host_port(&self, input: &mut Input<'_>) -> u32 {
        match input.u8() % 8 {
            0 => input.u32(),
            1..=3 if !self.local_ports.is_empty() => input.pick(&self.local_ports),
            _ => input.pick(&SERVICE_PORTS),
        }
    }

    fn send_packet(&mut self, input: &mut Input<'_>) {
        let src_port = self.guest_port(input);
        let dst_port = self.host_port(input);
        let fwd_cnt = self.rx_cnt.get(&(src_port, dst_port)).copied().unwrap_or(0);
        let op = match input.u8() % 16 {
            0 => input.u16(),
            op => u16::from(op % 8),
        };
        let data_len = match input.u8() % 16 {
            0..=7 => input.below(64),
            8..=11 => input.below(4096),
            12 => 4096,
            13 => MAX_PKT_BUF_SIZE as usize,
            14 => MAX_PKT_BUF_SIZE as usize + 1,
            _ => CONN_BUF_SIZE as usize / 2 + input.below(4096),
        };
        let mut hdr = VsockHeader {
            src_cid: input.mostly_u64(GUEST_CID, &[0, 1, 2, 4, u64::MAX, GUEST_CID | 1 << 32]),
            dst_cid: input.mostly_u64(VSOCK_HOST_CID, &[0, 1, 3, u64::MAX, 2 | 1 << 32]),
            src_port,
            dst_port,
            len: data_len as u32,
            type_: input.mostly_u32(VIRTIO_VSOCK_TYPE_STREAM.into(), &[0, 2, 3, 0xffff]) as u16,
            op,
            flags: input.mostly_u32(0, &[1, 2, 3, u32::MAX]),
            buf_alloc: input.mostly_u32(256 * 1024, &[0, 1, 4096, 65536, u32::MAX]),
            fwd_cnt: input.mostly_u32(fwd_cnt, &[0, u32::MAX, fwd_cnt.wrapping_add(1 << 20)]),
        };
        if input.u8() % 8 == 0 {
            hdr.len = input.pick(&[0, 1, data_len as u32 + 1, MAX_PKT_BUF_SIZE + 1, u32::MAX]);
        }
        let mut packet = hdr.to_bytes().to_vec();
        let seed = input.bytes(32);
        packet.extend((0..data_len).map(|i| seed.get(i % 32).copied().unwrap_or(i as u8)));

        // Lay it out over up to four readable descriptors, maybe with a writable one at an end.
        let mut buffers = Vec::new();
        let pieces = 1 + input.below(4);
        let mut rest = &packet[..];
        for i in 0..pieces {
            let take = if i + 1 == pieces {
                rest.len()
            } else {
                input.below(rest.len() + 1)
            };
            let (piece, tail) = rest.split_at(take);
            buffers.push(Buffer::Readable(piece));
            rest = tail;
        }
        match input.u8() % 16 {
            0 => buffers.push(Buffer::Writable(64)),
            1 => buffers.insert(0, Buffer::Writable(8)),
            _ => {}
        }
        self.offer(true, &buffers);
    }

    /// Offers a chain on tx or rx and kicks; skipped if the driver has no room.
    fn offer(&mut self, tx: bool, buffers: &[Buffer<'_>]) -> Option<u16> {
        let (queue, notify) = if tx {
            (&mut self.tx, &self.tx_notify)
        } else {
            (&mut self.rx, &self.rx_notify)
        };
        let head = match queue.add_chain(buffers) {
            Ok(head) => head,
            Err(DriverQueueError::NoDescriptors { .. }) => return None,
            Err(DriverQueueError::NoBufferSpace(_)) => {
                // Every buffer address has been handed out once: enough for one input.
                self.lost_track = true;
                return None;
            }
            Err(e) => panic!("driver queue: {e}"),
        };
        notify.write(1).expect("kick");
        Some(head)
    }

    fn post_rx(&mut self, n: usize, size: u32, layout: u8) {
        for _ in 0..n {
            let header = size.min(VSOCK_HDR_SIZE as u32);
            let buffers: &[Buffer<'_>] = match layout % 8 {
                // Header and payload apart, as Linux's mergeable-less rx does.
                1 => &[Buffer::Writable(header), Buffer::Writable(size - header)],
                // A readable descriptor in an rx chain.
                2 => &[Buffer::Readable(b"junk"), Buffer::Writable(size)],
                _ => &[Buffer::Writable(size)],
            };
            if self.offer(false, buffers).is_none() {
                return;
            }
        }
    }

    /// Offers a chain, then overwrites one descriptor with whatever the input says.
    fn malformed_chain(&mut self, input: &mut Input<'_>) {
        let tx = input.bool();
        let Some(head) = self.offer(tx, &[Buffer::Writable(64), Buffer::Readable(&[0; 64])]) else {
            return;
        };
        let index = if input.bool() {
            head
        } else {
            input.u16() % (QUEUE_SIZE + 2)
        };
        let addr = match input.u8() % 8 {
            0 => input.u64(),
            1 => REGION_SIZE - 8,
            2 => 2 * REGION_SIZE + 0x1_0000 - 4,
            3 => u64::MAX - 4,
            4 => 0xffff_0000_0000,
            _ => u64::from(input.u32()) % (2 * REGION_SIZE),
        };
        let len = input.mostly_u32(4096, &[0, 1, 44, 45, 0x1_0000, u32::MAX]);
        let flags = match input.u8() % 4 {
            0 => input.u16(),
            _ => input.u16() & 7,
        };
        let next = input.u16() % (QUEUE_SIZE + 4);
        let queue = if tx { &self.tx } else { &self.rx };
        queue
            .write_descriptor(index, GuestAddress(addr), len, flags, next)
            .expect("descriptor table is in memory");
        self.malformed = true;
    }

    /// Publishes far more heads than the queue holds.
    fn runaway_index(&mut self, input: &mut Input<'_>) {
        let tx = input.bool();
        let count = usize::from(QUEUE_SIZE) + 1 + input.below(512);
        let head = input.u16();
        let queue = if tx { &mut self.tx } else { &mut self.rx };
        for _ in 0..count {
            queue.publish(head).expect("avail ring is in memory");
        }
        let notify = if tx { &self.tx_notify } else { &self.rx_notify };
        notify.write(1).expect("kick");
        self.malformed = true;
        self.turn(4);
    }

    /// A driver reset, then a fresh activation with fresh rings.
    fn reset(&mut self) {
        assert!(self.device.lock().expect("device lock").reset());
        self.turn(2);
        self.rx = DriverQueue::new(&self.mem, RX_BASE, QUEUE_SIZE).expect("rx queue");
        self.tx = DriverQueue::new(&self.mem, TX_BASE, QUEUE_SIZE).expect("tx queue");
        self.local_ports.clear();
        self.rx_cnt.clear();
        self.activate();
        self.post_rx(16, RX_BUF_SIZE, 0);
        self.turn(4);
    }

    fn config(&mut self, input: &mut Input<'_>) {
        let offset = match input.u8() % 4 {
            0 => input.u64(),
            _ => u64::from(input.u8() % 16),
        };
        let mut data = vec![0u8; input.below(16)];
        let mut device = self.device.lock().expect("device lock");
        device.read_config(offset, &mut data);
        device.write_config(offset, &data);
    }

    fn host_connect(&mut self, input: &mut Input<'_>) {
        if self.host_clients as usize >= MAX_HOST_CLIENTS {
            return;
        }
        let Ok(mut client) = connect_nonblocking(&self.uds) else {
            return;
        };
        self.host_clients += 1;
        let port = match input.u8() % 8 {
            0 => input.u32(),
            _ => input.pick(&GUEST_PORTS),
        };
        let line = match input.u8() % 8 {
            0 => input.bytes(MAX_REQUEST_LINE + 8).to_vec(),
            1 => b"CONN".to_vec(),
            2 => format!("CONNECT {port}\n").into_bytes(),
            _ => {
                let mut line = format!("CONNECT {port}\n").into_bytes();
                line.extend_from_slice(input.bytes(8));
                line
            }
        };
        let _ = client.write(&line);
        self.host.push(client);
    }

    fn accept_services(&mut self) {
        for listener in &self.services {
            while let Ok((stream, _)) = listener.accept() {
                stream.set_nonblocking(true).expect("non-blocking");
                self.host.push(stream);
            }
        }
    }

    fn host_write(&mut self, input: &mut Input<'_>) {
        if self.host.is_empty() {
            return;
        }
        let index = input.below(self.host.len());
        let len = match input.u8() % 4 {
            0 => 64 * 1024,
            _ => input.below(4096),
        };
        let data = vec![input.u8(); len];
        let _ = self.host[index].write(&data);
    }

    fn host_read(&mut self, input: &mut Input<'_>) {
        if self.host.is_empty() {
            return;
        }
        let index = input.below(self.host.len());
        let mut buf = [0u8; 16 * 1024];
        for _ in 0..16 {
            match self.host[index].read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn host_close(&mut self, input: &mut Input<'_>) {
        if self.host.is_empty() {
            return;
        }
        let index = input.below(self.host.len());
        match input.u8() % 4 {
            0 => {
                let _ = self.host[index].shutdown(Shutdown::Write);
            }
            1 => {
                let _ = self.host[index].shutdown(Shutdown::Read);
            }
            _ => {
                self.host.swap_remove(index);
            }
        }
    }

    /// Turns the event loop up to `max` times (fewer if it has nothing to do).
    fn turn(&mut self, max: usize) {
        for _ in 0..max {
            let n = self.event_manager.run_with_timeout(0).expect("event loop");
            self.collect();
            if n == 0 {
                break;
            }
        }
    }

    /// Takes what the device returned on both queues and checks it.
    fn collect(&mut self) {
        let mut used = 0;
        loop {
            let chain = match self.rx.pop_used() {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) if self.malformed => {
                    let _ = e;
                    self.lost_track = true;
                    return;
                }
                Err(e) => panic!("rx used ring: {e}"),
            };
            used += 1;
            if chain.written.len() < VSOCK_HDR_SIZE {
                assert!(
                    self.malformed || chain.len == 0,
                    "rx chain used with {} bytes, less than a header",
                    chain.len
                );
                continue;
            }
            let raw: [u8; VSOCK_HDR_SIZE] = chain.written[..VSOCK_HDR_SIZE]
                .try_into()
                .expect("header size");
            let hdr = VsockHeader::from_bytes(&raw);
            let payload = chain.written.len() - VSOCK_HDR_SIZE;
            if !self.malformed {
                assert_eq!(
                    hdr.len as usize, payload,
                    "rx packet len is not its payload"
                );
                assert_eq!(hdr.dst_cid, GUEST_CID, "rx packet for another CID: {hdr:?}");
            }
            assert!(payload <= MAX_PKT_BUF_SIZE as usize);
            match hdr.op {
                VIRTIO_VSOCK_OP_REQUEST if !self.local_ports.contains(&hdr.src_port) => {
                    self.local_ports.push(hdr.src_port);
                }
                VIRTIO_VSOCK_OP_RW => {
                    let cnt = self.rx_cnt.entry((hdr.dst_port, hdr.src_port)).or_default();
                    *cnt = cnt.wrapping_add(hdr.len);
                }
                _ => {}
            }
        }
        loop {
            match self.tx.pop_used() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) if self.malformed => {
                    self.lost_track = true;
                    return;
                }
                Err(e) => panic!("tx used ring: {e}"),
            }
        }
        let device = self.device.lock().expect("device lock");
        let conns = device.connection_count();
        assert!(conns <= MAX_CONNECTIONS, "{conns} connections");
        let bound = conns * (CONN_BUF_SIZE as usize + CONN_TO_GUEST_BUF_SIZE + MAX_REQUEST_LINE);
        let buffered = device.buffered_bytes();
        assert!(buffered <= bound, "{buffered} bytes buffered for {conns}");
        drop(device);
        if self.refill_rx && used > 0 && !self.lost_track {
            self.post_rx(used, RX_BUF_SIZE, 0);
        }
    }

    /// With nothing new from the guest or the host, the event loop must have nothing to do.
    fn check_goes_idle(&mut self) {
        self.refill_rx = false;
        let _ = self.rx_notify.read();
        let _ = self.tx_notify.read();
        for _ in 0..IDLE_TURNS {
            let n = self.event_manager.run_with_timeout(0).expect("event loop");
            if !self.lost_track {
                self.collect();
            }
            if n == 0 {
                return;
            }
        }
        let device = self.device.lock().expect("device lock");
        panic!(
            "the event loop never goes idle: {} connections, watch {:?}",
            device.connection_count(),
            device.watch
        );
    }
}

/// Connects to a Unix socket without blocking (a full backlog is a refusal, not a wait).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzz_utils::run_seeded;

    /// Random programs.
    #[test]
    fn random_inputs_neither_panic_nor_spin() {
        run_seeded(0x7673_6f63_6b21, 600, 600, run);
    }
}
