//! The table of connections: routes the guest's packets to them, accepts host clients, and
//! decides which packet goes into the next rx buffer.
//!
//! Rx order: resets first (a reset for a connection must reach the guest before anything for a
//! new connection under the same ports), then connections round-robin, one packet each, so one
//! busy stream cannot starve the others.
//!
//! The muxer never talks to epoll itself: it records in an [`FdWatch`] what each socket should
//! be watched for, and the event handler applies that. A socket that is closed goes to the
//! watch's graveyard until it is unregistered, so its fd number cannot be reused under epoll.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection};
use super::fd_watch::FdWatch;
use super::packet::{TxPacket, VsockHeader};
use super::unix::{self, PendingHost};
use super::{
    VsockError, CONNECT_TIMEOUT, FIRST_LOCAL_PORT, MAX_CONNECTIONS, MAX_PENDING_HOST_CONNECTIONS,
    MAX_PENDING_RESETS, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
};
use crate::virtio::GuestErrorLog;

/// What an fd the muxer watches belongs to.
#[derive(Debug, Clone, Copy)]
enum FdOwner {
    Conn(ConnKey),
    PendingHost,
}

/// All vsock connections of one device and the host sockets behind them.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    pending_hosts: HashMap<RawFd, PendingHost>,
    fd_owners: HashMap<RawFd, FdOwner>,
    rx_ready: VecDeque<ConnKey>,
    resets: VecDeque<VsockHeader>,
    next_local_port: u32,
    /// Fires when the earliest host-initiated connection should have been answered.
    timer: TimerFd,
    timer_armed: bool,
    pub(super) connect_timeout: Duration,
    log: GuestErrorLog,
    /// While `accept` keeps failing (no descriptors left): when the listener is watched again.
    accept_resume: Option<Instant>,
    /// `accept` failures in a row.
    accept_failures: u64,
}

/// How long the listener is left out of the watch after `accept` failed: epoll reports it for
/// as long as a client waits, and a retry at once would fail the same way.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// One log line per this many `accept` failures in a row (about a minute of pauses).
const ACCEPT_FAILURES_PER_LOG: u64 = 600;

impl Muxer {
    /// Listens on `uds_path` for host clients.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        let listener = unix::bind_listener(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        let timer = TimerFd::new()
            .map_err(|e| VsockError::Timer(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            pending_hosts: HashMap::new(),
            fd_owners: HashMap::new(),
            rx_ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            timer,
            timer_armed: false,
            connect_timeout: CONNECT_TIMEOUT,
            log: GuestErrorLog::new(),
            accept_resume: None,
            accept_failures: 0,
        })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The connect timer, which the event loop watches for `on_timer`.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Bytes buffered over all connections (for tests of the memory bound).
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(Connection::buffered).sum()
    }

    /// Whether an fd belongs to one of our host sockets.
    pub fn owns(&self, fd: RawFd) -> bool {
        self.fd_owners.contains_key(&fd)
    }

    fn guest_warn(&mut self, message: fmt::Arguments<'_>) {
        self.log.warn(format_args!("vsock: {message}"));
    }

    /// Accepts every waiting host client. They stay pending until they send their line.
    pub fn accept(&mut self, watch: &mut FdWatch) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.pause_accepting(&e, watch);
                    return;
                }
            };
            if self.accept_failures > 0 {
                log::info!(
                    "vsock: accepting on {} again after {} failures",
                    self.uds_path.display(),
                    self.accept_failures
                );
                self.accept_failures = 0;
            }
            if self.pending_hosts.len() >= MAX_PENDING_HOST_CONNECTIONS {
                log::warn!("vsock: too many host clients without a CONNECT line; closing one");
                continue;
            }
            let pending = match PendingHost::new(stream) {
                Ok(pending) => pending,
                Err(e) => {
                    log::warn!("vsock: cannot set up a host client socket: {e}");
                    continue;
                }
            };
            let fd = pending.stream().as_raw_fd();
            watch.set(fd, Some(EventSet::IN));
            self.fd_owners.insert(fd, FdOwner::PendingHost);
            self.pending_hosts.insert(fd, pending);
        }
    }

    /// `accept` failed for a reason a retry at once would meet again (no descriptors left):
    /// the listener leaves the watch for [`ACCEPT_PAUSE`] and comes back on the timer, so the
    /// level-triggered event loop does not spin on it. Logged when it starts, then once per
    /// [`ACCEPT_FAILURES_PER_LOG`] failures, with the count.
    fn pause_accepting(&mut self, e: &std::io::Error, watch: &mut FdWatch) {
        self.accept_failures += 1;
        if self.accept_failures % ACCEPT_FAILURES_PER_LOG == 1 {
            log::warn!(
                "vsock: cannot accept on {}: {e} ({} failures in a row; retrying every {} ms)",
                self.uds_path.display(),
                self.accept_failures,
                ACCEPT_PAUSE.as_millis()
            );
        }
        watch.set(self.listener.as_raw_fd(), None);
        self.accept_resume = Some(Instant::now() + ACCEPT_PAUSE);
        self.arm_timer(ACCEPT_PAUSE);
    }

    /// Handles readiness of one of our host sockets. `active` says whether the guest driver
    /// is up (host clients are refused until it is).
    pub fn on_socket_event(
        &mut self,
        fd: RawFd,
        events: EventSet,
        active: bool,
        watch: &mut FdWatch,
    ) {
        match self.fd_owners.get(&fd).copied() {
            Some(FdOwner::PendingHost) => self.on_pending_host(fd, active, watch),
            Some(FdOwner::Conn(key)) => self.on_conn_event(key, events, watch),
            None => {}
        }
    }

    fn on_pending_host(&mut self, fd: RawFd, active: bool, watch: &mut FdWatch) {
        let Some(pending) = self.pending_hosts.get_mut(&fd) else {
            return;
        };
        let result = pending.read_request();
        let request = match result {
            Ok(None) => return,
            Ok(Some(request)) => Some(request),
            Err(e) => {
                log::debug!("vsock: {e}");
                None
            }
        };
        let Some(pending) = self.pending_hosts.remove(&fd) else {
            return;
        };
        self.fd_owners.remove(&fd);
        watch.set(fd, None);
        let stream = pending.into_stream();
        let Some(request) = request else {
            return watch.retire(stream);
        };
        if !active {
            log::debug!(
                "vsock: host client for port {} refused: driver not ready",
                request.port
            );
            return watch.retire(stream);
        }
        let Some(local_port) = self.alloc_local_port(request.port) else {
            log::warn!(
                "vsock: too many connections; refusing host client for port {}",
                request.port
            );
            return watch.retire(stream);
        };
        // Still open, so still registered: `insert` changes what it is watched for.
        let key = ConnKey {
            local_port,
            peer_port: request.port,
        };
        let deadline = Instant::now() + self.connect_timeout;
        let conn =
            Connection::new_local(stream, self.guest_cid, key, &request.early_data, deadline);
        self.insert(conn, watch);
        if !self.timer_armed {
            self.arm_timer(self.connect_timeout);
        }
    }

    fn arm_timer(&mut self, after: Duration) {
        // A zero duration would disarm the timer.
        let after = after.max(Duration::from_millis(1));
        match self.timer.reset(after, None) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::error!("vsock: cannot arm the connect timer: {e}"),
        }
    }

    /// The connect timer fired: closes host clients whose guest port never answered, and
    /// tells the guest (it may still have a half-made socket).
    pub fn on_timer(&mut self, watch: &mut FdWatch) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        match self.accept_resume {
            Some(at) if at <= now => {
                watch.set(self.listener.as_raw_fd(), Some(EventSet::IN));
                self.accept_resume = None;
            }
            Some(at) => next = Some(at),
            None => {}
        }
        for (key, conn) in &self.conns {
            match conn.connect_deadline() {
                Some(deadline) if deadline <= now => expired.push(*key),
                Some(deadline) => next = Some(next.map_or(deadline, |n| n.min(deadline))),
                None => {}
            }
        }
        for key in expired {
            log::debug!(
                "vsock: guest port {} did not answer; closing",
                key.peer_port
            );
            self.kill(key, true, watch);
        }
        if let Some(next) = next {
            self.arm_timer(next.saturating_duration_since(now));
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return None;
        }
        loop {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(next) if next != u32::MAX => next,
                _ => FIRST_LOCAL_PORT,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            // Fewer than MAX_CONNECTIONS keys are taken, so this ends.
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
    }

    fn insert(&mut self, conn: Connection, watch: &mut FdWatch) {
        let key = conn.key();
        let fd = conn.stream().as_raw_fd();
        self.fd_owners.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.touch(key, watch);
    }

    fn on_conn_event(&mut self, key: ConnKey, events: EventSet, watch: &mut FdWatch) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut result = Ok(());
        if events.contains(EventSet::ERROR) {
            result = Err(super::connection::ConnError::HostGone(conn.buffered()));
        } else {
            if events.contains(EventSet::OUT) {
                result = conn.flush_to_host();
            }
            if result.is_ok() && events.contains(EventSet::HANG_UP) {
                result = conn.on_host_hangup();
            } else if result.is_ok() && events.contains(EventSet::IN) {
                result = conn.pump_from_host();
            }
        }
        match result {
            Ok(()) => self.touch(key, watch),
            Err(e) => {
                log::debug!("vsock: connection {key:?}: {e}");
                self.kill(key, true, watch);
            }
        }
    }

    /// Brings the rx round-robin and the watch in line with a connection's state, and ends it
    /// if it is finished.
    fn touch(&mut self, key: ConnKey, watch: &mut FdWatch) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_finished() {
            return self.kill(key, true, watch);
        }
        watch.set(conn.stream().as_raw_fd(), conn.interest());
        if conn.has_rx() && !conn.rx_queued {
            conn.rx_queued = true;
            self.rx_ready.push_back(key);
        }
    }

    /// Closes a connection, telling the guest with an RST if `reset`.
    fn kill(&mut self, key: ConnKey, reset: bool, watch: &mut FdWatch) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        self.fd_owners.remove(&fd);
        watch.set(fd, None);
        watch.retire(conn.into_stream());
        if reset {
            let rst = VsockHeader {
                src_cid: VSOCK_HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                type_: VIRTIO_VSOCK_TYPE_STREAM,
                op: VIRTIO_VSOCK_OP_RST,
                ..VsockHeader::default()
            };
            self.queue_reset(rst);
        }
    }

    fn queue_reset(&mut self, rst: VsockHeader) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            self.guest_warn(format_args!("rx queue not drained; dropping a reset"));
            return;
        }
        self.resets.push_back(rst);
    }

    /// Answers a guest packet that names no connection (or a wrong address) with an RST from
    /// the address it was sent to, so the guest's socket fails fast instead of timing out.
    fn reply_reset(&mut self, hdr: &VsockHeader) {
        if hdr.op == VIRTIO_VSOCK_OP_RST {
            return;
        }
        self.queue_reset(VsockHeader {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: hdr.type_,
            op: VIRTIO_VSOCK_OP_RST,
            ..VsockHeader::default()
        });
    }

    /// Handles a packet the guest sent.
    pub fn on_guest_packet(&mut self, pkt: &TxPacket, watch: &mut FdWatch) {
        let hdr = &pkt.hdr;
        if hdr.src_cid != self.guest_cid {
            let (src, cid) = (hdr.src_cid, self.guest_cid);
            return self.guest_warn(format_args!(
                "dropping packet from CID {src}; the guest's CID is {cid}"
            ));
        }
        if hdr.dst_cid != VSOCK_HOST_CID || hdr.type_ != VIRTIO_VSOCK_TYPE_STREAM {
            // Another VM, the hypervisor, or a socket type we do not offer: refuse.
            return self.reply_reset(hdr);
        }
        let key = ConnKey::of_guest_packet(hdr);
        if !self.conns.contains_key(&key) {
            return match hdr.op {
                VIRTIO_VSOCK_OP_REQUEST => self.connect_to_host(hdr, watch),
                _ => self.reply_reset(hdr),
            };
        }
        if hdr.op == VIRTIO_VSOCK_OP_RST {
            return self.kill(key, false, watch);
        }
        let result = match self.conns.get_mut(&key) {
            Some(conn) => conn.on_packet(pkt),
            None => return,
        };
        match result {
            Ok(()) => self.touch(key, watch),
            Err(e) => {
                if e.is_guest_error() {
                    self.guest_warn(format_args!("resetting connection {key:?}: {e}"));
                } else {
                    log::debug!("vsock: resetting connection {key:?}: {e}");
                }
                self.kill(key, true, watch);
            }
        }
    }

    /// Resets the connection a malformed packet names, if there is one.
    pub fn on_bad_packet(&mut self, hdr: &VsockHeader, watch: &mut FdWatch) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            return;
        }
        let key = ConnKey::of_guest_packet(hdr);
        if self.conns.contains_key(&key) {
            self.kill(key, true, watch);
        }
    }

    fn connect_to_host(&mut self, hdr: &VsockHeader, watch: &mut FdWatch) {
        let port = hdr.dst_port;
        if self.conns.len() >= MAX_CONNECTIONS {
            self.guest_warn(format_args!(
                "refusing connection to port {port}: {MAX_CONNECTIONS} connections open"
            ));
            return self.reply_reset(hdr);
        }
        let path = unix::port_socket_path(&self.uds_path, port);
        match unix::connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::new_peer(stream, self.guest_cid, hdr);
                self.insert(conn, watch);
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.display());
                self.reply_reset(hdr);
            }
        }
    }

    /// Whether a packet may be waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest, with at most `max_data` bytes of payload in `out`.
    pub fn pop_rx(
        &mut self,
        max_data: usize,
        out: &mut Vec<u8>,
        watch: &mut FdWatch,
    ) -> Option<VsockHeader> {
        out.clear();
        if let Some(rst) = self.resets.pop_front() {
            return Some(rst);
        }
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.rx_queued = false;
            match conn.next_rx(max_data, out) {
                Some(hdr) => {
                    found = Some((key, hdr));
                    break;
                }
                // Only payload is waiting, and this buffer has no room for any.
                None if conn.has_rx() => skipped.push(key),
                None => {}
            }
        }
        for key in skipped.into_iter().rev() {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.rx_queued = true;
                self.rx_ready.push_front(key);
            }
        }
        let (key, hdr) = found?;
        if !out.is_empty() {
            let result = match self.conns.get_mut(&key) {
                Some(conn) => conn.after_rx_data(),
                None => Ok(()),
            };
            if let Err(e) = result {
                log::debug!("vsock: connection {key:?}: {e}");
                self.kill(key, true, watch);
                return Some(hdr);
            }
        }
        self.touch(key, watch);
        Some(hdr)
    }

    /// Drops every connection and host client, for a device reset: the guest's sockets are
    /// gone with its driver.
    pub fn reset(&mut self, watch: &mut FdWatch) {
        for (_, conn) in self.conns.drain() {
            let stream = conn.into_stream();
            watch.set(stream.as_raw_fd(), None);
            watch.retire(stream);
        }
        for (fd, pending) in self.pending_hosts.drain() {
            watch.set(fd, None);
            watch.retire(pending.into_stream());
        }
        self.fd_owners.clear();
        self.rx_ready.clear();
        self.resets.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file would make the next bind on this path fail.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing `accept` takes the listener out of the watch, and the timer brings it back.
    #[test]
    fn a_failing_accept_pauses_the_listener_until_the_timer() {
        let dir = std::env::temp_dir().join(format!("hull-vsock-pause-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut muxer = Muxer::new(3, dir.join("v.sock")).unwrap();
        let mut watch = FdWatch::default();
        let fd = muxer.listener().as_raw_fd();
        watch.set(fd, Some(EventSet::IN));
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        muxer.pause_accepting(&emfile, &mut watch);
        muxer.pause_accepting(&emfile, &mut watch);
        assert_eq!(watch.wants(fd), None);
        assert_eq!(muxer.accept_failures, 2);
        // `on_timer` waits for the timer to fire.
        muxer.on_timer(&mut watch);
        assert_eq!(watch.wants(fd), Some(EventSet::IN));
        assert_eq!(muxer.accept_resume, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
