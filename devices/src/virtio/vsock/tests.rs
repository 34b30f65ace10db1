//! Device-level tests: the device in a real event manager, driven through its queues the way a
//! guest driver would, with real Unix sockets on the host side. (Unit tests of the parts sit at
//! the bottom of their files; these test what `mod.rs` promises.)

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use super::device::BATCH;
use super::test_utils::{pattern, read_available, Packet, TestGuest, GUEST_BUF_ALLOC, GUEST_CID};
use super::unix::port_socket_path;
use super::*;
use crate::virtio::test_utils::{Buffer, VRING_DESC_F_NEXT};
use crate::virtio::{VirtioDevice, VIRTIO_MMIO_INT_VRING};

/// The guest's end of one stream: what it sent and received, and the device's credit.
#[derive(Debug, Default)]
struct GuestStream {
    tx_cnt: u32,
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    received: Vec<u8>,
    ops: Vec<u16>,
}

impl GuestStream {
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn take(&mut self, (hdr, data): Packet) {
        assert_eq!(hdr.len as usize, data.len());
        assert_eq!((hdr.src_cid, hdr.dst_cid), (VSOCK_HOST_CID, GUEST_CID));
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        self.ops.push(hdr.op);
        if hdr.op == VIRTIO_VSOCK_OP_RW {
            self.rx_cnt = self.rx_cnt.wrapping_add(hdr.len);
            self.received.extend_from_slice(&data);
        }
    }
}

/// Host-initiated connection up to the guest's RESPONSE; returns the client, the local port.
fn host_initiated(g: &mut TestGuest, guest_port: u32) -> (UnixStream, u32) {
    let mut client = g.host_connect(guest_port);
    let (req, _) = g.expect_packet();
    assert_eq!(req.op, VIRTIO_VSOCK_OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (VSOCK_HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, guest_port);
    assert_eq!(req.type_, VIRTIO_VSOCK_TYPE_STREAM);
    let local_port = req.src_port;
    let resp = g.hdr(VIRTIO_VSOCK_OP_RESPONSE, guest_port, local_port);
    g.send(resp, &[]);
    let mut line = Vec::new();
    g.run_until("the OK line", |_| {
        read_available(&mut client, &mut line);
        line.ends_with(b"\n")
    });
    assert_eq!(line, format!("OK {local_port}\n").as_bytes());
    (client, local_port)
}

/// Writes as much of `data[*sent..]` as the non-blocking socket takes.
fn write_some(client: &mut UnixStream, data: &[u8], sent: &mut usize) {
    while *sent < data.len() {
        match client.write(&data[*sent..]) {
            Ok(n) => *sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => panic!("host write failed: {e}"),
        }
    }
}

#[test]
fn offers_version_1_three_queues_and_the_guest_cid() {
    let g = TestGuest::inactive();
    let mut dev = g.device.lock().unwrap();
    assert_eq!(dev.device_type(), crate::virtio::TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_eq!(dev.avail_features(), 1 << crate::virtio::VIRTIO_F_VERSION_1);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    // Linux reads the 64-bit field as two 32-bit halves; out of range reads stay zero.
    let mut high = [0xffu8; 4];
    dev.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut beyond = [0u8; 4];
    dev.read_config(8, &mut beyond);
    dev.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    dev.write_config(0, &[1, 2, 3, 4]);
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);

    assert!(matches!(
        Vsock::new(2, g.dir.path().join("x")),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), g.dir.path().join("x")),
        Err(VsockError::InvalidCid(_))
    ));
    // The socket path is taken while the device lives.
    assert!(matches!(
        Vsock::new(3, g.uds.clone()),
        Err(VsockError::Bind { .. })
    ));
}

#[test]
fn activation_registers_the_queues_with_the_event_loop() {
    let mut g = TestGuest::inactive();
    // Missing queues are refused.
    let mut queues = g.active_queues();
    queues.remove(1);
    let err = g
        .device
        .lock()
        .unwrap()
        .activate(g.mem.clone(), g.interrupt.clone(), queues)
        .unwrap_err();
    assert!(matches!(
        err,
        crate::virtio::ActivateError::MissingQueue { index: 1, .. }
    ));

    g.activate();
    assert!(g.device.lock().unwrap().is_active());
    let again = g.active_queues();
    assert!(g
        .device
        .lock()
        .unwrap()
        .activate(g.mem.clone(), g.interrupt.clone(), again)
        .is_err());
    g.turn();
    {
        let dev = g.device.lock().unwrap();
        // The device registered its clones of the notify eventfds (other fd numbers), beside
        // the listening socket.
        assert_eq!(dev.watch_registered_count(), 3);
    }

    // A guest packet now reaches the device through the tx notify alone: a request to a port
    // nobody listens on gets an RST, and the used buffer raises the interrupt.
    g.post_rx(4);
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 1000, 9999);
    g.send(req, &[]);
    let (rst, _) = g.expect_packet();
    assert_eq!(rst.op, VIRTIO_VSOCK_OP_RST);
    assert_ne!(g.interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn host_initiated_connection_relays_both_ways_past_64_kib() {
    let mut g = TestGuest::new(64);
    let (mut client, local_port) = host_initiated(&mut g, 52);
    let guest_port = 52;

    // Host → guest: 600 KiB, more than twice the guest's 256 KiB buffer, so the device must
    // wait for our credit updates.
    let to_guest = pattern(1, 600 * 1024);
    let mut sent = 0;
    let mut stream = GuestStream::default();
    let mut consumed_acked = 0u32;
    let deadline = std::time::Instant::now() + test_utils::DEADLINE;
    while stream.received.len() < to_guest.len() {
        assert!(std::time::Instant::now() < deadline, "host → guest stalled");
        write_some(&mut client, &to_guest, &mut sent);
        g.turn();
        let _ = g.event_manager.run_with_timeout(5);
        g.turn();
        while let Some(pkt) = g.received.pop_front() {
            assert_eq!((pkt.0.src_port, pkt.0.dst_port), (local_port, guest_port));
            if pkt.0.op == VIRTIO_VSOCK_OP_RW {
                // Never more in flight than the guest allowed.
                let in_flight = stream.rx_cnt + pkt.0.len - consumed_acked;
                assert!(
                    in_flight <= GUEST_BUF_ALLOC,
                    "device overran the guest's credit"
                );
            }
            stream.take(pkt);
        }
        if stream.rx_cnt - consumed_acked >= 64 * 1024 {
            consumed_acked = stream.rx_cnt;
            let mut update = g.hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, guest_port, local_port);
            update.fwd_cnt = consumed_acked;
            g.send(update, &[]);
        }
    }
    assert!(stream.received == to_guest, "host → guest bytes differ");

    // Guest → host: 300 KiB in packets within the device's credit.
    let to_host = pattern(2, 300 * 1024);
    let mut got = Vec::new();
    let mut pos = 0;
    let mut updates = 0;
    while got.len() < to_host.len() {
        assert!(std::time::Instant::now() < deadline, "guest → host stalled");
        let room = stream.peer_free() as usize;
        if pos < to_host.len() && room > 0 {
            let n = room.min(4096).min(to_host.len() - pos);
            g.send_data(
                guest_port,
                local_port,
                stream.rx_cnt,
                &to_host[pos..pos + n],
            );
            stream.tx_cnt += n as u32;
            pos += n;
        } else {
            let _ = g.event_manager.run_with_timeout(5);
        }
        g.turn();
        read_available(&mut client, &mut got);
        while let Some(pkt) = g.received.pop_front() {
            if pkt.0.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE {
                updates += 1;
            }
            stream.take(pkt);
        }
    }
    assert!(got == to_host, "guest → host bytes differ");
    assert!(updates > 0, "the device never sent a credit update");
}

#[test]
fn host_client_is_closed_when_the_guest_refuses() {
    let mut g = TestGuest::new(8);
    let mut client = g.host_connect(77);
    let (req, _) = g.expect_packet();
    let rst = g.hdr(VIRTIO_VSOCK_OP_RST, 77, req.src_port);
    g.send(rst, &[]);
    let mut got = Vec::new();
    g.run_until("the host client to be closed", |_| {
        read_available(&mut client, &mut got).is_none()
    });
    assert!(got.is_empty());
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn host_client_is_closed_when_the_guest_never_answers() {
    let mut g = TestGuest::new(8);
    g.device.lock().unwrap().muxer.connect_timeout = std::time::Duration::from_millis(50);
    let mut client = g.host_connect(77);
    let (req, _) = g.expect_packet();
    assert_eq!(req.op, VIRTIO_VSOCK_OP_REQUEST);
    let mut got = Vec::new();
    g.run_until("the host client to be closed", |_| {
        read_available(&mut client, &mut got).is_none()
    });
    assert!(got.is_empty());
    // The guest hears that the request is withdrawn.
    let (rst, _) = g.expect_packet();
    assert_eq!((rst.op, rst.src_port), (VIRTIO_VSOCK_OP_RST, req.src_port));
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn host_clients_are_refused_before_activation_and_on_bad_lines() {
    let mut g = TestGuest::inactive();
    let mut early = g.host_connect(52);
    let mut got = Vec::new();
    g.run_until("the early client to be closed", |_| {
        read_available(&mut early, &mut got).is_none()
    });

    g.activate();
    g.post_rx(4);
    let mut bad = UnixStream::connect(&g.uds).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    bad.set_nonblocking(true).unwrap();
    g.run_until("the bad client to be closed", |_| {
        read_available(&mut bad, &mut got).is_none()
    });
    assert!(g.received.is_empty());
}

#[test]
fn guest_connects_to_a_host_port_socket() {
    let mut g = TestGuest::new(16);
    let listener = UnixListener::bind(port_socket_path(&g.uds, 1024)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 5000, 1024);
    g.send(req, &[]);
    let (resp, _) = g.expect_packet();
    assert_eq!(resp.op, VIRTIO_VSOCK_OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (1024, 5000));
    assert_eq!(resp.buf_alloc, CONN_BUF_SIZE);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();

    g.send_data(5000, 1024, 0, b"ping");
    let mut got = Vec::new();
    g.run_until("ping on the host", |_| {
        read_available(&mut host, &mut got);
        got == b"ping"
    });
    host.write_all(b"pong").unwrap();
    let (hdr, data) = g.expect_packet();
    assert_eq!(
        (hdr.op, data.as_slice()),
        (VIRTIO_VSOCK_OP_RW, &b"pong"[..])
    );
    assert_eq!(hdr.fwd_cnt, 4);
}

#[test]
fn guest_connect_without_a_listener_is_reset() {
    let mut g = TestGuest::new(4);
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 5000, 1234);
    g.send(req, &[]);
    let (rst, _) = g.expect_packet();
    assert_eq!(rst.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (1234, 5000));
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);

    // Data for a connection that does not exist is answered with an RST too.
    g.send_data(5000, 1234, 0, b"stray");
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RST);
}

#[test]
fn shutdown_and_reset_both_ways() {
    let mut g = TestGuest::new(16);
    let listener = UnixListener::bind(port_socket_path(&g.uds, 7)).unwrap();

    // The guest half-closes: the host reads the data, then end of file, and can still answer.
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 100, 7);
    g.send(req, &[]);
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    g.send_data(100, 7, 0, b"request");
    let mut shut = g.hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 100, 7);
    shut.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
    g.send(shut, &[]);
    let mut got = Vec::new();
    g.run_until("end of file on the host", |_| {
        read_available(&mut host, &mut got).is_none()
    });
    assert_eq!(got, b"request");
    host.write_all(b"reply").unwrap();
    drop(host);
    // The host closed: the reply, then SHUTDOWN with both flags. Nothing can flow either way
    // any more, so the device ends the connection with an RST.
    let (hdr, data) = g.expect_packet();
    assert_eq!(
        (hdr.op, data.as_slice()),
        (VIRTIO_VSOCK_OP_RW, &b"reply"[..])
    );
    let (hdr, _) = g.expect_packet();
    assert_eq!(hdr.op, VIRTIO_VSOCK_OP_SHUTDOWN);
    assert_eq!(
        hdr.flags,
        VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
    );
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);

    // The guest closes first: the device confirms with an RST; the host sees end of file.
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 101, 7);
    g.send(req, &[]);
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    let mut shut = g.hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 101, 7);
    shut.flags = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND;
    g.send(shut, &[]);
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RST);
    g.run_until("end of file on the host", |_| {
        read_available(&mut host, &mut got).is_none()
    });
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);

    // A guest RST closes the host socket without a reply.
    let (mut client, local_port) = host_initiated(&mut g, 8);
    let rst = g.hdr(VIRTIO_VSOCK_OP_RST, 8, local_port);
    g.send(rst, &[]);
    g.run_until("the host client to be closed", |_| {
        read_available(&mut client, &mut got).is_none()
    });
    assert!(g.received.is_empty());
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn many_concurrent_streams_stay_apart() {
    let mut g = TestGuest::new(128);
    const N: u32 = 24;
    let listener = UnixListener::bind(port_socket_path(&g.uds, 2000)).unwrap();
    // Half host-initiated, half guest-initiated, all open at once.
    let mut hosts: HashMap<(u32, u32), UnixStream> = HashMap::new();
    for i in 0..N / 2 {
        let guest_port = 100 + i;
        let (client, local_port) = host_initiated(&mut g, guest_port);
        hosts.insert((guest_port, local_port), client);
    }
    for i in 0..N / 2 {
        let guest_port = 3000 + i;
        let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, guest_port, 2000);
        g.send(req, &[]);
        assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RESPONSE);
        let (host, _) = listener.accept().unwrap();
        hosts.insert((guest_port, 2000), host);
    }
    assert_eq!(g.device.lock().unwrap().connection_count(), N as usize);

    // Every stream sends its own pattern both ways, interleaved.
    let size = 20_000;
    for (&(guest_port, host_port), host) in hosts.iter_mut() {
        host.set_nonblocking(true).unwrap();
        host.write_all(&pattern(guest_port, size)).unwrap();
        g.send_data(guest_port, host_port, 0, &pattern(guest_port + 1, size / 4));
        g.send_data(guest_port, host_port, 0, &pattern(guest_port + 2, size / 4));
    }
    let mut at_guest: HashMap<(u32, u32), Vec<u8>> = HashMap::new();
    let mut at_host: HashMap<(u32, u32), Vec<u8>> = HashMap::new();
    g.run_until("all streams to arrive", |g| {
        while let Some((hdr, data)) = g.received.pop_front() {
            assert_eq!(hdr.op, VIRTIO_VSOCK_OP_RW, "{hdr:?}");
            at_guest
                .entry((hdr.dst_port, hdr.src_port))
                .or_default()
                .extend(data);
        }
        for (key, host) in hosts.iter_mut() {
            read_available(host, at_host.entry(*key).or_default());
        }
        at_guest.values().map(Vec::len).sum::<usize>() == N as usize * size
            && at_host.values().map(Vec::len).sum::<usize>() == N as usize * size / 2
    });
    for &(guest_port, host_port) in hosts.keys() {
        assert!(at_guest[&(guest_port, host_port)] == pattern(guest_port, size));
        let mut expected = pattern(guest_port + 1, size / 4);
        expected.extend(pattern(guest_port + 2, size / 4));
        assert!(at_host[&(guest_port, host_port)] == expected);
    }
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mut g = TestGuest::new(16);
    let listener = UnixListener::bind(port_socket_path(&g.uds, 9)).unwrap();
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 100, 9);
    g.send(req, &[]);
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RESPONSE);
    // The host never reads. Fill its socket buffer, then the device's.
    let (_host, _) = listener.accept().unwrap();
    let chunk = vec![0x5a; MAX_PKT_BUF_SIZE as usize];
    let mut sent = 0usize;
    loop {
        g.send_data(100, 9, 0, &chunk);
        sent += chunk.len();
        g.turn();
        if let Some((hdr, _)) = g.received.pop_front() {
            if hdr.op == VIRTIO_VSOCK_OP_RST {
                break;
            }
        }
        assert!(sent < 64 << 20, "never reset");
        let buffered = g.device.lock().unwrap().buffered_bytes();
        assert!(buffered <= CONN_BUF_SIZE as usize);
    }
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);
    assert!(!g.device.lock().unwrap().is_broken());
}

#[test]
fn a_guest_that_stops_reading_bounds_memory() {
    let mut g = TestGuest::new(4);
    g.refill_rx = false;
    let (mut client, _) = host_initiated(&mut g, 52);
    // The host pushes until its socket is full; the device takes at most one packet's worth
    // beyond the four rx buffers the guest left.
    let data = vec![7u8; 8 << 20];
    let mut sent = 0;
    for _ in 0..50 {
        write_some(&mut client, &data, &mut sent);
        g.turn();
    }
    assert!(sent < data.len(), "the host was never pushed back");
    let dev = g.device.lock().unwrap();
    assert!(dev.buffered_bytes() <= CONN_TO_GUEST_BUF_SIZE);
    assert_eq!(dev.connection_count(), 1);
}

#[test]
fn malformed_packets_are_dropped_without_harm() {
    let mut g = TestGuest::new(32);
    let (_client, local_port) = host_initiated(&mut g, 52);
    // Too short for a header; only writable buffers; a descriptor outside memory; a loop.
    g.send_raw(&[Buffer::Readable(&[0u8; 10])]);
    g.send_raw(&[Buffer::Writable(64)]);
    let raw = g.hdr(VIRTIO_VSOCK_OP_RW, 52, local_port).to_bytes();
    let head = g.tx.add_chain(&[Buffer::Readable(&raw)]).unwrap();
    g.tx.write_descriptor(head, vm_memory::GuestAddress(1 << 40), 44, 0, 0)
        .unwrap();
    let head = g.tx.add_chain(&[Buffer::Readable(&raw)]).unwrap();
    // Zeroed memory: the header read through the loop names CID 0 and is dropped.
    let addr = vm_memory::GuestAddress(128 << 20);
    g.tx.write_descriptor(head, addr, 44, VRING_DESC_F_NEXT, head)
        .unwrap();
    g.tx_notify.write(1).unwrap();
    // Wrong source CID: dropped silently. Unknown type: RST. Unknown op on a connection:
    // that connection is reset.
    let mut wrong_cid = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 2);
    wrong_cid.src_cid = 99;
    g.send(wrong_cid, &[]);
    let mut dgram = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 2);
    dgram.type_ = VIRTIO_VSOCK_TYPE_SEQPACKET;
    g.send(dgram, &[]);
    g.turn();
    let ops: Vec<_> = g.received.drain(..).map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![VIRTIO_VSOCK_OP_RST]);
    assert_eq!(g.device.lock().unwrap().connection_count(), 1);

    let mut len_lie = g.hdr(VIRTIO_VSOCK_OP_RW, 52, local_port);
    len_lie.len = 1000;
    g.send(len_lie, b"short");
    let (rst, _) = g.expect_packet();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (VIRTIO_VSOCK_OP_RST, local_port, 52)
    );
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);

    let (_client, local_port) = host_initiated(&mut g, 53);
    let bogus_op = g.hdr(42, 53, local_port);
    g.send(bogus_op, &[]);
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!(g.device.lock().unwrap().connection_count(), 0);
    assert!(!g.device.lock().unwrap().is_broken());
    assert!(!g.interrupt.needs_reset());
}

#[test]
fn a_broken_queue_needs_reset_and_reset_recovers() {
    let mut g = TestGuest::new(8);
    let (mut client, _) = host_initiated(&mut g, 52);
    // An available index far ahead of what the queue can hold.
    for _ in 0..300 {
        g.tx.publish(0).unwrap();
    }
    g.tx_notify.write(1).unwrap();
    g.run_until("the device to give up", |g| g.interrupt.needs_reset());
    assert!(g.device.lock().unwrap().is_broken());

    // The driver resets the device: connections go, and the host client sees it.
    assert!(g.device.lock().unwrap().reset());
    let mut got = Vec::new();
    g.run_until("the host client to be closed", |_| {
        read_available(&mut client, &mut got).is_none()
    });
    assert!(!g.device.lock().unwrap().is_active());
    // Only the listening socket is left.
    assert_eq!(g.device.lock().unwrap().watch_registered_count(), 1);

    // The driver brings it up again with fresh queues.
    g.reactivate(8);
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 4444);
    g.send(req, &[]);
    assert_eq!(g.expect_packet().0.op, VIRTIO_VSOCK_OP_RST);
    assert!(!g.device.lock().unwrap().is_broken());
}

#[test]
fn rx_buffers_too_small_for_a_header_are_returned_empty() {
    let mut g = TestGuest::new(0);
    g.refill_rx = false;
    g.rx.add_chain(&[Buffer::Writable(16)]).unwrap();
    g.rx.add_chain(&[Buffer::Writable(44)]).unwrap();
    g.rx_notify.write(1).unwrap();
    let req = g.hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 4444);
    g.send(req, &[]);
    g.turn();
    // The 16-byte buffer comes back unused; the RST goes into the 44-byte one.
    let ops: Vec<_> = g.received.drain(..).map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![VIRTIO_VSOCK_OP_RST]);
    assert!(!g.device.lock().unwrap().is_broken());
}

#[test]
fn comes_up_through_the_mmio_transport() {
    use crate::bus::BusDevice;
    use crate::virtio::mmio::VIRTIO_MMIO_CONFIG;
    use crate::virtio::test_utils::{init_device, read_reg, DriverQueue};
    use crate::virtio::{MmioTransport, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestAddress;

    let g = TestGuest::inactive();
    let device: Arc<Mutex<dyn VirtioDevice>> = g.device.clone();
    let mut transport = MmioTransport::new(g.mem.clone(), device).unwrap();
    let rx = DriverQueue::new(&g.mem, GuestAddress(0), 256).unwrap();
    let tx = DriverQueue::new(&g.mem, GuestAddress(64 << 20), 256).unwrap();
    let ev = DriverQueue::new(&g.mem, GuestAddress(128 << 20), 16).unwrap();
    let status = init_device(
        &mut transport,
        1 << crate::virtio::VIRTIO_F_VERSION_1,
        &[(0, &rx), (1, &tx), (2, &ev)],
    );
    assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(g.device.lock().unwrap().is_active());
    assert_eq!(
        read_reg(&mut transport, VIRTIO_MMIO_CONFIG),
        GUEST_CID as u32
    );
    let mut high = [0u8; 4];
    transport.read(VIRTIO_MMIO_CONFIG + 4, &mut high);
    assert_eq!(high, [0; 4]);
    // A driver reset goes through to the device.
    crate::virtio::test_utils::write_reg(
        &mut transport,
        crate::virtio::mmio::VIRTIO_MMIO_STATUS,
        0,
    );
    assert!(!g.device.lock().unwrap().is_active());
}

#[test]
fn a_full_tx_queue_is_taken_in_batches_between_other_events() {
    let mut g = TestGuest::new(8);
    let packets = BATCH + BATCH / 2;
    for port in 0..packets as u32 {
        // Resets of connections that do not exist: taken and dropped.
        let rst = g.hdr(VIRTIO_VSOCK_OP_RST, 5000 + port, 6000);
        g.send(rst, &[]);
    }
    // One pass of the event loop takes one batch and leaves the tx eventfd signalled.
    let _ = g.event_manager.run_with_timeout(0).expect("event loop");
    let mut taken = 0;
    while g.tx.pop_used().expect("tx used ring").is_some() {
        taken += 1;
    }
    assert_eq!(taken, BATCH);
    assert_eq!(g.tx_notify.read().expect("re-armed"), 1);
    g.tx_notify.write(1).unwrap();
    let _ = g.event_manager.run_with_timeout(0).expect("event loop");
    let mut rest = 0;
    while g.tx.pop_used().expect("tx used ring").is_some() {
        rest += 1;
    }
    assert_eq!(rest, packets - BATCH);
}
