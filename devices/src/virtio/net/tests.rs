//! The net device on a real TAP, in a network namespace of the test's thread, driven as a
//! guest driver would drive it (the driver-side queue helper) in a real event manager; the
//! host's side of the TAP is a packet socket on the interface. Needs `CAP_NET_ADMIN` and
//! `CAP_SYS_ADMIN` (a new network namespace); without them a test says so and passes nothing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::test_utils::{Buffer, DriverQueue};
use crate::virtio::{ActiveQueue, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};

const DEADLINE: Duration = Duration::from_secs(10);
/// An EtherType for local experiments (IEEE 802): the tests' frames, told apart from what the
/// kernel sends on an interface by itself.
const ETHERTYPE_TEST: u16 = 0x88b5;
const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x6c, 0x6c, 0x01];
const REGION: u64 = 32 << 20;

/// Enters a new network namespace (this thread's only), or says why not.
fn own_network_namespace() -> bool {
    match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        Ok(()) => {
            // No IPv6 on the test's interfaces: the kernel would send its own frames (router
            // and neighbour solicitations) into the guest's buffers.
            for conf in ["all", "default"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
            true
        }
        Err(e) => {
            eprintln!("skipping: cannot make a network namespace ({e}); needs CAP_SYS_ADMIN");
            false
        }
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero `ifreq` is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// Brings `name` up with an MTU of 9000 (so that the host's side can send frames over 1500
/// bytes) and gives its index.
fn link_up(name: &str) -> i32 {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let mut req = ifreq(name);
    // SAFETY: the ioctls read and write only `req`.
    unsafe {
        req.ifr_ifru.ifru_mtu = 9000;
        assert_eq!(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req), 0);
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            0
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req), 0);
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req),
            0
        );
        req.ifr_ifru.ifru_ifindex
    }
}

/// A packet socket on the TAP's interface: the host's side of the guest's link.
struct HostSide(OwnedFd);

impl HostSide {
    fn bind(ifindex: i32) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero `sockaddr_ll` is valid; bind reads it.
        let bound = unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex;
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        Self(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` outlives the call, which only reads it.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next test frame the interface received (others are skipped), if one comes.
    fn recv(&self, within: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + within;
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < end {
            // SAFETY: `buf` outlives the call, which writes at most its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let frame = &buf[..n as usize];
            if frame.len() >= ETH_HLEN && frame[12..14] == ETHERTYPE_TEST.to_be_bytes() {
                return Some(frame.to_vec());
            }
        }
        None
    }
}

/// An Ethernet frame of the tests' type with `len` bytes of payload from `seed`.
fn test_frame(seed: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

/// The guest's side: the queues in guest memory, the device in an event manager.
struct Guest {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    device: Arc<Mutex<Net>>,
    events: EventManager<Arc<Mutex<Net>>>,
    host: HostSide,
    interrupt: Arc<IrqTrigger>,
}

impl Guest {
    fn new(features: u64) -> Self {
        let tap = Tap::open("hulltest0").expect("tap");
        let ifindex = link_up("hulltest0");
        let mut device = Net::new(Box::new(tap), MAC, 1500).expect("net");
        device.ack_features(features | 1 << VIRTIO_F_VERSION_1);
        let device = Arc::new(Mutex::new(device));
        let mut events = EventManager::new().expect("event manager");
        events.add_subscriber(device.clone());
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .expect("memory");
        let rx = DriverQueue::new(&mem, GuestAddress(0), QUEUE_SIZE).expect("rx");
        let tx = DriverQueue::new(&mem, GuestAddress(REGION), QUEUE_SIZE).expect("tx");
        let queues = vec![
            ActiveQueue {
                index: RX_QUEUE,
                queue: rx.device_queue(QUEUE_SIZE).expect("rx"),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ActiveQueue {
                index: TX_QUEUE,
                queue: tx.device_queue(QUEUE_SIZE).expect("tx"),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ];
        let interrupt = Arc::new(IrqTrigger::new().unwrap());
        device
            .lock()
            .unwrap()
            .activate(mem.clone(), interrupt.clone(), queues)
            .expect("activate");
        let mut guest = Self {
            mem,
            rx,
            tx,
            device,
            events,
            host: HostSide::bind(ifindex),
            interrupt,
        };
        guest.turn();
        guest
    }

    fn turn(&mut self) {
        let _ = self.events.run_with_timeout(10).expect("event loop");
    }

    fn notify(&self, index: usize) {
        let device = self.device.lock().unwrap();
        let active = device.active.as_ref().expect("active");
        let evt = if index == RX_QUEUE {
            &active.rx_evt
        } else {
            &active.tx_evt
        };
        evt.write(1).unwrap();
    }

    fn send(&mut self, buffers: &[Buffer<'_>]) {
        self.tx.add_chain(buffers).expect("tx chain");
        self.notify(TX_QUEUE);
        self.turn();
    }

    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            self.rx
                .add_chain(&[Buffer::Writable(size)])
                .expect("rx chain");
        }
        self.notify(RX_QUEUE);
        self.turn();
    }

    /// Used receive chains until `n` have come (or the deadline).
    fn used_rx(&mut self, n: usize) -> Vec<crate::virtio::test_utils::UsedChain> {
        let end = Instant::now() + DEADLINE;
        let mut used = Vec::new();
        while used.len() < n && Instant::now() < end {
            self.turn();
            while let Some(chain) = self.rx.pop_used().expect("used ring") {
                used.push(chain);
            }
        }
        used
    }

    fn used_tx(&mut self) -> usize {
        let mut n = 0;
        while self.tx.pop_used().expect("used ring").is_some() {
            n += 1;
        }
        n
    }
}

fn no_offloads() -> [u8; VNET_HDR_LEN] {
    [0; VNET_HDR_LEN]
}

#[test]
fn frames_cross_a_real_tap_both_ways_with_mergeable_buffers() {
    std::thread::spawn(|| {
        if !own_network_namespace() {
            return;
        }
        let mut guest = Guest::new(1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_MAC);
        let _ = guest.mem.clone();

        // Guest to host: the frame the host's side receives is the guest's, without header.
        let out = test_frame(1, 1000);
        let hdr = no_offloads();
        guest.send(&[Buffer::Readable(&hdr), Buffer::Readable(&out)]);
        assert_eq!(guest.host.recv(DEADLINE).as_deref(), Some(&out[..]));
        assert_eq!(guest.used_tx(), 1);

        // Host to guest: 3000 bytes span two 1526-byte buffers; num_buffers says so.
        guest.post_rx(4, 1526);
        let back = test_frame(2, 3000);
        guest.host.send(&back);
        let used = guest.used_rx(2);
        assert_eq!(used.len(), 2, "{used:?}");
        let mut got = Vec::new();
        for chain in &used {
            got.extend_from_slice(&chain.written);
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &back[..]);
        let stats = guest.device.lock().unwrap().stats();
        assert_eq!((stats.tx_frames, stats.rx_frames), (1, 1), "{stats:?}");
    })
    .join()
    .unwrap();
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_buffer_or_is_dropped() {
    std::thread::spawn(|| {
        if !own_network_namespace() {
            return;
        }
        let mut guest = Guest::new(0);
        guest.post_rx(1, 1526);
        let small = test_frame(3, 200);
        guest.host.send(&small);
        let used = guest.used_rx(1);
        assert_eq!(used.len(), 1);
        assert_eq!(
            u16::from_le_bytes([used[0].written[10], used[0].written[11]]),
            1
        );
        assert_eq!(&used[0].written[VNET_HDR_LEN..], &small[..]);

        // Too big for the one buffer: dropped, the buffer given back empty, the next frame
        // still comes.
        guest.post_rx(2, 1526);
        guest.host.send(&test_frame(4, 3000));
        let used = guest.used_rx(1);
        assert_eq!(used[0].len, 0);
        let next = test_frame(5, 100);
        guest.host.send(&next);
        let used = guest.used_rx(1);
        assert_eq!(&used[0].written[VNET_HDR_LEN..], &next[..]);
        assert_eq!(guest.device.lock().unwrap().stats().rx_dropped, 1);
    })
    .join()
    .unwrap();
}

#[test]
fn a_guest_s_bad_frames_are_dropped_and_never_reach_the_host() {
    std::thread::spawn(|| {
        if !own_network_namespace() {
            return;
        }
        let mut guest = Guest::new(1 << VIRTIO_NET_F_CSUM);
        let frame = test_frame(6, 100);
        let with = |flags: u8, gso: u8, gso_size: u16, start: u16, offset: u16| {
            let mut h = [0u8; VNET_HDR_LEN];
            h[0] = flags;
            h[1] = gso;
            h[4..6].copy_from_slice(&gso_size.to_le_bytes());
            h[6..8].copy_from_slice(&start.to_le_bytes());
            h[8..10].copy_from_slice(&offset.to_le_bytes());
            h
        };
        let bad = [
            with(0x10, 0, 0, 0, 0),
            with(1, 0, 0, 200, 16),
            with(1, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16),
            with(1, 0x55, 1448, 34, 16),
        ];
        for hdr in &bad {
            guest.send(&[Buffer::Readable(hdr), Buffer::Readable(&frame)]);
        }
        // Too short, a writable descriptor, and past the largest frame.
        guest.send(&[Buffer::Readable(&[0u8; 20])]);
        let hdr = no_offloads();
        guest.send(&[
            Buffer::Readable(&hdr),
            Buffer::Readable(&frame),
            Buffer::Writable(64),
        ]);
        let huge = vec![0u8; MAX_FRAME_LEN];
        guest.send(&[Buffer::Readable(&hdr), Buffer::Readable(&huge)]);
        assert_eq!(guest.used_tx(), 7, "every bad chain is given back");
        assert_eq!(guest.host.recv(Duration::from_millis(200)), None);
        {
            let device = guest.device.lock().unwrap();
            assert_eq!(device.stats().tx_dropped, 7);
            assert!(!device.is_broken());
        }
        // A good frame still goes.
        guest.send(&[Buffer::Readable(&hdr), Buffer::Readable(&frame)]);
        assert_eq!(guest.host.recv(DEADLINE).as_deref(), Some(&frame[..]));
    })
    .join()
    .unwrap();
}

#[test]
fn the_configuration_has_the_mirrored_mac_and_mtu_and_a_link_that_is_up() {
    std::thread::spawn(|| {
        if !own_network_namespace() {
            return;
        }
        let tap = Tap::open("hulltest1").expect("tap");
        let mut device = Net::new(Box::new(tap), MAC, 9000).expect("net");
        let mut config = [0u8; 12];
        device.read_config(0, &mut config);
        assert_eq!(config[..6], MAC);
        assert_eq!(
            u16::from_le_bytes([config[6], config[7]]),
            VIRTIO_NET_S_LINK_UP
        );
        assert_eq!(u16::from_le_bytes([config[10], config[11]]), 9000);
        let mut mtu = [0u8; 2];
        device.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 9000);
        let mut past = [0xeeu8; 4];
        device.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0xee; 4], "nothing read past the space");
        device.write_config(0, &[0; 6]);
        device.read_config(0, &mut config);
        assert_eq!(config[..6], MAC, "the guest cannot change the MAC");

        for (mac, mtu) in [([0x01, 0, 0, 0, 0, 1], 1500), ([0; 6], 1500), (MAC, 67)] {
            let tap = Tap::open("hulltest2").expect("tap");
            assert!(Net::new(Box::new(tap), mac, mtu).is_err(), "{mac:?} {mtu}");
        }
        assert!(matches!(
            Tap::open("a-name-far-too-long"),
            Err(TapError::InvalidName(_))
        ));
    })
    .join()
    .unwrap();
}

#[test]
fn a_frame_waits_for_the_guest_s_buffers_and_a_reset_device_starts_again() {
    std::thread::spawn(|| {
        if !own_network_namespace() {
            return;
        }
        let mut guest = Guest::new(1 << VIRTIO_NET_F_MRG_RXBUF);
        // No buffers yet: the frame waits, then arrives once the guest posts some.
        let early = test_frame(7, 500);
        guest.host.send(&early);
        for _ in 0..5 {
            guest.turn();
        }
        assert!(guest.rx.pop_used().unwrap().is_none());
        guest.post_rx(2, 1526);
        let used = guest.used_rx(1);
        assert_eq!(&used[0].written[VNET_HDR_LEN..], &early[..]);

        // A reset: the queues go, and the device takes new ones.
        assert!(guest.device.lock().unwrap().reset());
        guest.turn();
        let rx = DriverQueue::new(&guest.mem, GuestAddress(REGION / 2), QUEUE_SIZE).unwrap();
        let tx =
            DriverQueue::new(&guest.mem, GuestAddress(REGION + REGION / 2), QUEUE_SIZE).unwrap();
        let queues = vec![
            ActiveQueue {
                index: RX_QUEUE,
                queue: rx.device_queue(QUEUE_SIZE).unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ActiveQueue {
                index: TX_QUEUE,
                queue: tx.device_queue(QUEUE_SIZE).unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ];
        {
            let mut device = guest.device.lock().unwrap();
            device.ack_features(1 << VIRTIO_F_VERSION_1);
            device
                .activate(guest.mem.clone(), guest.interrupt.clone(), queues)
                .expect("activate again");
        }
        guest.rx = rx;
        guest.tx = tx;
        guest.turn();
        let out = test_frame(8, 64);
        let hdr = no_offloads();
        guest.send(&[Buffer::Readable(&hdr), Buffer::Readable(&out)]);
        assert_eq!(guest.host.recv(DEADLINE).as_deref(), Some(&out[..]));
    })
    .join()
    .unwrap();
}

#[test]
fn a_queue_outside_guest_memory_marks_the_device_as_needing_a_reset() {
    std::thread::spawn(|| {
        if !own_network_namespace() {
            return;
        }
        let mut guest = Guest::new(0);
        // The driver moves the transmit queue's rings past the end of memory, as a hostile
        // guest may: the device gives up on it and asks for a reset, without panicking.
        let mut queue = virtio_queue::Queue::new(QUEUE_SIZE).unwrap();
        queue.try_set_size(QUEUE_SIZE).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(1 << 40))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(1 << 40))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(1 << 40))
            .unwrap();
        queue.set_ready(true);
        {
            let mut device = guest.device.lock().unwrap();
            assert!(device.reset());
            device.ack_features(1 << VIRTIO_F_VERSION_1);
            let queues = vec![
                ActiveQueue {
                    index: RX_QUEUE,
                    queue: guest.rx.device_queue(QUEUE_SIZE).unwrap(),
                    notify: EventFd::new(EFD_NONBLOCK).unwrap(),
                },
                ActiveQueue {
                    index: TX_QUEUE,
                    queue,
                    notify: EventFd::new(EFD_NONBLOCK).unwrap(),
                },
            ];
            device
                .activate(guest.mem.clone(), guest.interrupt.clone(), queues)
                .unwrap();
        }
        guest.turn();
        guest.notify(TX_QUEUE);
        guest.turn();
        assert!(guest.device.lock().unwrap().is_broken());
        assert!(guest.interrupt.needs_reset());
    })
    .join()
    .unwrap();
}
