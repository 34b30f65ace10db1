//! One vsock stream between a guest socket and a host Unix socket.
//!
//! A connection is a small state machine (waiting for the guest's answer, then established)
//! plus the credit accounting of the virtio spec (5.10.6.3), both ways:
//! - guest → host: we advertise `CONN_BUF_SIZE` as `buf_alloc` and count in `fwd_cnt` what we
//!   wrote to the host socket. What the host socket does not take at once waits in `to_host`,
//!   which the guest's credit bounds: a guest that sends past it is reset.
//! - host → guest: we read from the host socket only as much as the guest's last advertised
//!   credit (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`) and one packet's worth of staging
//!   (`to_guest`) allow, so a guest that stops reading stops us reading the host socket too.
//!
//! The connection never blocks: the socket is non-blocking, and what it wants to wait for is
//! told by [`Connection::interest`]. Errors it returns mean "reset this connection"; the muxer
//! sends the RST and closes the socket.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;

use super::packet::{TxPacket, VsockHeader};
use super::{
    CONN_BUF_SIZE, CONN_TO_GUEST_BUF_SIZE, MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HOST_CID,
};

/// Once this much has been forwarded to the host since the guest last heard our `fwd_cnt`,
/// tell it (a sender that ran out of credit waits for this).
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// How much to read from a host socket per `read` call.
const READ_CHUNK: usize = 16 * 1024;
const SHUTDOWN_BOTH: u32 = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND;

/// Identifies a connection: the host-side port (the guest's destination) and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

impl ConnKey {
    /// The connection a packet from the guest names.
    pub fn of_guest_packet(hdr: &VsockHeader) -> Self {
        Self {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }
    }
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent an operation that makes no sense in the connection's state.
    #[error("unexpected op {op} in state {state:?}")]
    UnexpectedOp { op: u16, state: ConnState },
    /// The guest sent data after saying it would send no more.
    #[error("data after the guest shut down sending")]
    DataAfterShutdown,
    /// The guest sent more than the credit we gave it.
    #[error("guest sent {len} bytes with {free} bytes of credit left")]
    CreditExceeded { len: u32, free: u32 },
    /// The host socket failed.
    #[error("host socket i/o failed")]
    HostIo(#[source] io::Error),
    /// The host side went away with data from the guest still undelivered.
    #[error("host socket closed with {0} bytes from the guest undelivered")]
    HostGone(usize),
}

impl ConnError {
    /// Whether the guest caused this (worth a rate-limited warning) rather than the host.
    pub fn is_guest_error(&self) -> bool {
        matches!(
            self,
            Self::UnexpectedOp { .. } | Self::DataAfterShutdown | Self::CreditExceeded { .. }
        )
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: our REQUEST is queued or sent; waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows (until shut down).
    Established,
}

/// Control packets waiting for room in the rx queue.
#[derive(Debug, Default, Clone, Copy)]
struct PendingOps {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    shutdown: bool,
}

/// One stream between a guest port and a host Unix socket.
#[derive(Debug)]
pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    state: ConnState,
    pending: PendingOps,
    // Guest → host.
    to_host: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    // Host → guest.
    to_guest: VecDeque<u8>,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    /// VIRTIO_VSOCK_SHUTDOWN_* flags the guest sent.
    guest_shutdown: u32,
    /// The host socket reached end of file.
    host_eof: bool,
    /// The host socket hung up (both directions); it is no longer watched.
    host_hup: bool,
    /// Our SHUTDOWN has been queued for the guest.
    shutdown_queued: bool,
    /// The host socket's write side is shut (the guest will send no more).
    host_write_shut: bool,
    /// Host-initiated: when to give up waiting for the guest's RESPONSE.
    connect_deadline: Option<Instant>,
    /// Whether the muxer has this connection in its rx round-robin.
    pub(super) rx_queued: bool,
}

impl Connection {
    /// A host-initiated connection to guest port `key.peer_port`; `initial` is what the host
    /// client sent after its CONNECT line, to be delivered once the guest accepts, which it must
    /// do by `deadline`.
    pub fn new_local(
        stream: UnixStream,
        guest_cid: u64,
        key: ConnKey,
        initial: &[u8],
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, guest_cid, key, ConnState::LocalInit);
        conn.to_guest.extend(initial);
        conn.pending.request = true;
        conn.connect_deadline = Some(deadline);
        conn
    }

    /// When the guest must have answered our REQUEST (host-initiated, still waiting).
    pub fn connect_deadline(&self) -> Option<Instant> {
        self.connect_deadline
    }

    /// A guest-initiated connection, connected to its host socket, answering `request`.
    pub fn new_peer(stream: UnixStream, guest_cid: u64, request: &VsockHeader) -> Self {
        let key = ConnKey::of_guest_packet(request);
        let mut conn = Self::new(stream, guest_cid, key, ConnState::Established);
        conn.update_peer_credit(request);
        conn.pending.response = true;
        conn
    }

    fn new(stream: UnixStream, guest_cid: u64, key: ConnKey, state: ConnState) -> Self {
        Self {
            key,
            guest_cid,
            stream,
            state,
            pending: PendingOps::default(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_guest: VecDeque::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            guest_shutdown: 0,
            host_eof: false,
            host_hup: false,
            shutdown_queued: false,
            host_write_shut: false,
            connect_deadline: None,
            rx_queued: false,
        }
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Bytes held for the host socket plus bytes held for the guest (bounded by design).
    pub fn buffered(&self) -> usize {
        self.to_host.len() + self.to_guest.len()
    }

    /// Credit the guest has left for us, by its last word.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
    }

    fn guest_shut(&self, flag: u32) -> bool {
        self.guest_shutdown & flag != 0
    }

    /// Handles a packet (other than RST, which the muxer handles) the guest sent on this
    /// connection.
    pub fn on_packet(&mut self, pkt: &TxPacket) -> Result<(), ConnError> {
        let hdr = &pkt.hdr;
        self.update_peer_credit(hdr);
        let unexpected = || ConnError::UnexpectedOp {
            op: hdr.op,
            state: self.state,
        };
        match (hdr.op, self.state) {
            (VIRTIO_VSOCK_OP_RESPONSE, ConnState::LocalInit) => {
                self.state = ConnState::Established;
                self.pending.request = false;
                self.connect_deadline = None;
                let reply = format!("OK {}\n", self.key.local_port);
                // A fresh socket has room for a line; anything else means the client is gone.
                match self.stream.write(reply.as_bytes()) {
                    Ok(n) if n == reply.len() => {}
                    Ok(_) => return Err(ConnError::HostGone(0)),
                    Err(e) => return Err(ConnError::HostIo(e)),
                }
                self.pump_from_host()
            }
            (VIRTIO_VSOCK_OP_RW, ConnState::Established) => self.on_data(&pkt.data),
            (VIRTIO_VSOCK_OP_CREDIT_UPDATE, ConnState::Established) => self.pump_from_host(),
            (VIRTIO_VSOCK_OP_CREDIT_REQUEST, ConnState::Established) => {
                self.pending.credit_update = true;
                Ok(())
            }
            (VIRTIO_VSOCK_OP_SHUTDOWN, ConnState::Established) => {
                self.guest_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                if self.guest_shut(VIRTIO_VSOCK_SHUTDOWN_RCV) {
                    // Nobody will read it: drop what waits and stop reading the host.
                    self.to_guest.clear();
                }
                self.flush_to_host()
            }
            _ => Err(unexpected()),
        }
    }

    fn on_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.guest_shut(VIRTIO_VSOCK_SHUTDOWN_SEND) {
            return Err(ConnError::DataAfterShutdown);
        }
        let free = CONN_BUF_SIZE.saturating_sub(self.to_host.len() as u32);
        if data.len() > free as usize {
            return Err(ConnError::CreditExceeded {
                len: data.len() as u32,
                free,
            });
        }
        if self.host_hup || self.host_write_shut {
            return Err(ConnError::HostGone(data.len()));
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            written = match self.stream.write(data) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(e) => return Err(ConnError::HostIo(e)),
            };
            self.forwarded(written);
        }
        self.to_host.extend(&data[written..]);
        self.after_host_write();
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        // n is at most CONN_BUF_SIZE; the counter wraps as the spec intends.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
    }

    /// Writes what waits for the host socket, as far as it takes it.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ConnError::HostGone(self.to_host.len())),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::HostIo(e)),
            }
        }
        if self.to_host.is_empty() && self.to_host.capacity() > READ_CHUNK {
            // Idle connections should not keep a full buffer's worth of memory.
            self.to_host = VecDeque::new();
        }
        self.after_host_write();
        Ok(())
    }

    fn after_host_write(&mut self) {
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
        if self.to_host.is_empty()
            && self.guest_shut(VIRTIO_VSOCK_SHUTDOWN_SEND)
            && !self.host_write_shut
            && !self.host_hup
        {
            // The host client sees end of file; it may still be sending.
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// How many more bytes from the host we may take now.
    fn read_room(&self) -> usize {
        if self.state != ConnState::Established
            || self.host_eof
            || self.guest_shut(VIRTIO_VSOCK_SHUTDOWN_RCV)
        {
            return 0;
        }
        let by_credit = (self.peer_free() as usize).saturating_sub(self.to_guest.len());
        let by_buffer = CONN_TO_GUEST_BUF_SIZE.saturating_sub(self.to_guest.len());
        by_credit.min(by_buffer)
    }

    /// Reads from the host socket as much as the guest's credit and our staging allow.
    pub fn pump_from_host(&mut self) -> Result<(), ConnError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            let room = self.read_room();
            if room == 0 {
                break;
            }
            let want = room.min(READ_CHUNK);
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    break;
                }
                Ok(n) => self.to_guest.extend(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::HostIo(e)),
            }
        }
        if self.state == ConnState::Established
            && self.peer_free() == 0
            && !self.credit_requested
            && !self.host_eof
        {
            // Out of credit with (maybe) more to send: ask, in case the guest does not tell us.
            self.credit_requested = true;
            self.pending.credit_request = true;
        }
        self.check_host_done();
        Ok(())
    }

    /// Queues our SHUTDOWN once the host has nothing more for the guest.
    fn check_host_done(&mut self) {
        if self.host_eof && self.to_guest.is_empty() && !self.shutdown_queued {
            self.shutdown_queued = true;
            self.pending.shutdown = true;
        }
    }

    /// The host socket hung up (EPOLLHUP): it will never read again, and is no longer watched.
    pub fn on_host_hangup(&mut self) -> Result<(), ConnError> {
        self.host_hup = true;
        if !self.to_host.is_empty() {
            return Err(ConnError::HostGone(self.to_host.len()));
        }
        if self.state == ConnState::LocalInit {
            return Err(ConnError::HostGone(0));
        }
        if self.guest_shut(VIRTIO_VSOCK_SHUTDOWN_RCV) {
            self.host_eof = true;
        }
        // Drain what is left as the guest's credit allows; later calls continue.
        self.pump_from_host()
    }

    /// What to watch the host socket for; `None` once it hung up.
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if self.read_room() > 0 {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Whether the connection is over: both sides are done and everything was delivered. The
    /// muxer then sends the guest an RST and closes the socket.
    pub fn is_finished(&self) -> bool {
        let guest_done = self.guest_shutdown == SHUTDOWN_BOTH && self.to_host.is_empty();
        let all_gone = self.host_hup
            && self.shutdown_queued
            && !self.pending.shutdown
            && self.guest_shut(VIRTIO_VSOCK_SHUTDOWN_SEND)
            && self.to_host.is_empty();
        guest_done || all_gone
    }

    /// Whether a packet is waiting for the guest (with `max_data` bytes of payload room).
    pub fn has_rx(&self) -> bool {
        let p = self.pending;
        p.request
            || p.response
            || p.credit_update
            || p.credit_request
            || p.shutdown
            || self.data_ready()
    }

    fn data_ready(&self) -> bool {
        self.state == ConnState::Established && !self.to_guest.is_empty() && self.peer_free() > 0
    }

    /// The next packet for the guest, with its payload (at most `max_data` bytes) in `out`.
    /// Returns `None` if nothing fits.
    pub fn next_rx(&mut self, max_data: usize, out: &mut Vec<u8>) -> Option<VsockHeader> {
        out.clear();
        let op = if self.pending.request {
            self.pending.request = false;
            VIRTIO_VSOCK_OP_REQUEST
        } else if self.pending.response {
            self.pending.response = false;
            VIRTIO_VSOCK_OP_RESPONSE
        } else if self.data_ready() && max_data > 0 {
            let len = self
                .to_guest
                .len()
                .min(max_data)
                .min(self.peer_free() as usize)
                .min(MAX_PKT_BUF_SIZE as usize);
            out.extend(self.to_guest.drain(..len));
            // len <= MAX_PKT_BUF_SIZE.
            self.tx_cnt = self.tx_cnt.wrapping_add(len as u32);
            // Every packet carries our fwd_cnt; a separate update is not needed now.
            self.pending.credit_update = false;
            self.check_host_done();
            VIRTIO_VSOCK_OP_RW
        } else if self.pending.credit_update {
            self.pending.credit_update = false;
            VIRTIO_VSOCK_OP_CREDIT_UPDATE
        } else if self.pending.credit_request {
            self.pending.credit_request = false;
            VIRTIO_VSOCK_OP_CREDIT_REQUEST
        } else if self.pending.shutdown {
            self.pending.shutdown = false;
            VIRTIO_VSOCK_OP_SHUTDOWN
        } else {
            return None;
        };
        let flags = if op == VIRTIO_VSOCK_OP_SHUTDOWN {
            if self.host_hup {
                SHUTDOWN_BOTH
            } else {
                VIRTIO_VSOCK_SHUTDOWN_SEND
            }
        } else {
            0
        };
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some(VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: out.len() as u32,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        })
    }

    /// After a data packet went to the guest: there is room to read the host again.
    pub fn after_rx_data(&mut self) -> Result<(), ConnError> {
        if self.to_guest.is_empty() && self.to_guest.capacity() > READ_CHUNK {
            self.to_guest = VecDeque::new();
        }
        self.pump_from_host()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_CID: u64 = 3;

    fn guest_hdr(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 8192,
            fwd_cnt: 0,
        }
    }

    fn pkt(op: u16, data: &[u8]) -> TxPacket {
        TxPacket {
            hdr: guest_hdr(op, data.len() as u32),
            data: data.to_vec(),
        }
    }

    fn peer_conn() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let conn = Connection::new_peer(ours, GUEST_CID, &guest_hdr(VIRTIO_VSOCK_OP_REQUEST, 0));
        (conn, host)
    }

    fn next(conn: &mut Connection, max: usize) -> Option<(VsockHeader, Vec<u8>)> {
        let mut out = Vec::new();
        conn.next_rx(max, &mut out).map(|h| (h, out))
    }

    #[test]
    fn guest_initiated_answers_response_then_relays() {
        let (mut conn, mut host) = peer_conn();
        let (hdr, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(hdr.op, VIRTIO_VSOCK_OP_RESPONSE);
        assert_eq!((hdr.src_port, hdr.dst_port), (52, 1000));
        assert_eq!(hdr.buf_alloc, CONN_BUF_SIZE);
        assert!(!conn.has_rx());

        conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RW, b"to host"))
            .unwrap();
        let mut got = [0u8; 7];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to host");

        host.write_all(b"to guest").unwrap();
        conn.pump_from_host().unwrap();
        let (hdr, data) = next(&mut conn, 4096).unwrap();
        assert_eq!((hdr.op, hdr.len, hdr.fwd_cnt), (VIRTIO_VSOCK_OP_RW, 8, 7));
        assert_eq!(data, b"to guest");
    }

    #[test]
    fn host_reads_stop_at_the_guest_credit() {
        let (mut conn, mut host) = peer_conn();
        next(&mut conn, 4096).unwrap();
        host.write_all(&[7u8; 20000]).unwrap();
        conn.pump_from_host().unwrap();
        // The guest advertised 8192 bytes: that is all we take from the socket.
        assert_eq!(conn.buffered(), 8192);
        assert_eq!(conn.interest(), Some(EventSet::empty()));
        let mut sent = 0;
        while let Some((hdr, data)) = next(&mut conn, 4096) {
            if hdr.op == VIRTIO_VSOCK_OP_RW {
                sent += data.len();
            } else {
                assert_eq!(hdr.op, VIRTIO_VSOCK_OP_CREDIT_REQUEST);
            }
        }
        assert_eq!(sent, 8192);
        // The guest consumed it all: more credit, more reading.
        let mut update = pkt(VIRTIO_VSOCK_OP_CREDIT_UPDATE, b"");
        update.hdr.fwd_cnt = 8192;
        conn.on_packet(&update).unwrap();
        assert_eq!(conn.buffered(), 8192);
        assert!(conn.has_rx());
    }

    #[test]
    fn guest_past_its_credit_is_an_error() {
        let (mut conn, _host) = peer_conn();
        next(&mut conn, 4096).unwrap();
        // The host never reads: CONN_BUF_SIZE bytes fit (socket buffer plus ours), then no more.
        let chunk = vec![1u8; MAX_PKT_BUF_SIZE as usize];
        let mut total = 0usize;
        let err = loop {
            match conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RW, &chunk)) {
                Ok(()) => total += chunk.len(),
                Err(e) => break e,
            }
            assert!(total < 64 << 20, "never ran out of credit");
        };
        assert!(matches!(err, ConnError::CreditExceeded { .. }), "{err}");
        assert!(err.is_guest_error());
        assert!(conn.buffered() <= CONN_BUF_SIZE as usize);
    }

    #[test]
    fn credit_updates_follow_forwarding() {
        let (mut conn, mut host) = peer_conn();
        next(&mut conn, 4096).unwrap();
        conn.on_packet(&pkt(
            VIRTIO_VSOCK_OP_RW,
            &vec![0u8; CREDIT_UPDATE_THRESHOLD as usize],
        ))
        .unwrap();
        let mut sink = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
        host.read_exact(&mut sink).unwrap();
        let (hdr, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(hdr.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
        assert_eq!(hdr.fwd_cnt, CREDIT_UPDATE_THRESHOLD);

        conn.on_packet(&pkt(VIRTIO_VSOCK_OP_CREDIT_REQUEST, b""))
            .unwrap();
        let (hdr, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(hdr.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
    }

    #[test]
    fn shutdowns_both_ways() {
        let (mut conn, mut host) = peer_conn();
        next(&mut conn, 4096).unwrap();
        // The guest stops sending: the host sees end of file after the data.
        conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RW, b"last")).unwrap();
        let mut shut = pkt(VIRTIO_VSOCK_OP_SHUTDOWN, b"");
        shut.hdr.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
        conn.on_packet(&shut).unwrap();
        host.set_nonblocking(false).unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last");
        assert!(conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RW, b"more")).is_err());

        // The host stops sending: the guest gets SHUTDOWN(SEND) after the data.
        host.write_all(b"bye").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        conn.pump_from_host().unwrap();
        assert_eq!(next(&mut conn, 4096).unwrap().1, b"bye");
        let (hdr, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND)
        );
        assert!(!conn.is_finished());
        shut.hdr.flags = SHUTDOWN_BOTH;
        conn.on_packet(&shut).unwrap();
        assert!(conn.is_finished());
    }

    #[test]
    fn host_initiated_waits_for_the_response() {
        let (ours, _host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 52,
        };
        let mut conn = Connection::new_local(ours, GUEST_CID, key, b"early", Instant::now());
        assert_eq!(conn.interest(), Some(EventSet::empty()));
        let (hdr, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (VIRTIO_VSOCK_OP_REQUEST, 1 << 30, 52)
        );
        // Data before the handshake is a protocol error.
        let mut rw = pkt(VIRTIO_VSOCK_OP_RW, b"x");
        rw.hdr.src_port = 52;
        assert!(conn.on_packet(&rw).is_err());

        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::new_local(ours, GUEST_CID, key, b"early", Instant::now());
        next(&mut conn, 4096).unwrap();
        conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RESPONSE, b"")).unwrap();
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        assert_eq!(next(&mut conn, 4096).unwrap().1, b"early");
        assert!(conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RESPONSE, b"")).is_err());
    }

    #[test]
    fn host_hangup_drains_then_shuts_down_both() {
        let (mut conn, mut host) = peer_conn();
        next(&mut conn, 4096).unwrap();
        host.write_all(b"tail").unwrap();
        drop(host);
        conn.on_host_hangup().unwrap();
        assert_eq!(conn.interest(), None);
        assert_eq!(next(&mut conn, 4096).unwrap().1, b"tail");
        let (hdr, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (VIRTIO_VSOCK_OP_SHUTDOWN, SHUTDOWN_BOTH)
        );
        // Data for a host that is gone resets the connection.
        assert!(matches!(
            conn.on_packet(&pkt(VIRTIO_VSOCK_OP_RW, b"late")),
            Err(ConnError::HostGone(4))
        ));
    }
}
