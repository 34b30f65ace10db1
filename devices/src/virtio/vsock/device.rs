//! The vsock `VirtioDevice`: configuration space, activation and reset, and the work on the
//! rx and tx queues.
//!
//! `activate` and `reset` run on a vCPU thread (through the transport); they only hand queues
//! and sockets over to the watch and signal the wake eventfd. All queue and socket work runs
//! in the event loop (see `event_handler`), so the device is never touched by two threads at
//! once beyond its mutex.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fd_watch::FdWatch;
use super::muxer::Muxer;
use super::packet;
use super::{VsockError, MAX_PKT_BUF_SIZE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::{
    ActivateError, ActiveQueue, GuestErrorLog, InterruptKind, IrqTrigger, QueueProgress,
    VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// Chains taken per pass over a queue: a vCPU can refill the tx queue as fast as it is drained,
/// and a host peer can keep the rx side busy; after this many the event loop runs its other
/// events first.
pub(super) const BATCH: usize = 64;

/// The queues and memory the driver handed over at activation.
#[derive(Debug)]
pub(super) struct ActiveState {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<IrqTrigger>,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) rx_evt: EventFd,
    pub(super) tx_evt: EventFd,
    /// The event queue: kept, never used (we send no transport events).
    _event: Option<ActiveQueue>,
    /// The guest broke a queue; nothing more is done until the driver resets the device.
    broken: bool,
}

impl ActiveState {
    fn mark_broken(&mut self, log: &mut GuestErrorLog, what: std::fmt::Arguments<'_>) {
        self.broken = true;
        log.warn(format_args!("vsock: {what}; device needs a reset"));
        if let Err(e) = self.interrupt.signal_needs_reset() {
            log::error!("vsock: {e}");
        }
    }

    fn notify(&mut self, queue: usize) {
        let mem = &self.mem;
        let queue = if queue == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        // Without EVENT_IDX (not offered) this is always true; a read error means the same.
        if queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
                log::error!("vsock: {e}");
            }
        }
    }
}

/// A virtio-vsock device backed by Unix sockets. See the module documentation for the wiring.
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    queue_max_sizes: [u16; 3],
    pub(super) wake_evt: EventFd,
    pub(super) active: Option<ActiveState>,
    pub(super) muxer: Muxer,
    pub(super) watch: FdWatch,
    log: GuestErrorLog,
    /// Payload staging for rx packets, reused.
    scratch: Vec<u8>,
}

impl Vsock {
    /// Creates the device for guest CID `guest_cid`, listening for host clients on `uds_path`
    /// (which must not exist yet; it is removed when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let wake_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        Ok(Self {
            guest_cid,
            acked_features: 0,
            queue_max_sizes: [QUEUE_SIZE; 3],
            wake_evt,
            active: None,
            muxer: Muxer::new(guest_cid, uds_path)?,
            watch: FdWatch::default(),
            log: GuestErrorLog::new(),
            scratch: Vec::with_capacity(MAX_PKT_BUF_SIZE as usize),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where host clients connect.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Whether the driver has activated the device (and not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Whether the device gave up on a queue the guest broke.
    pub fn is_broken(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.broken)
    }

    /// Open connections (for tests and statistics).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Bytes the device holds for all connections (for tests of the memory bound).
    pub fn buffered_bytes(&self) -> usize {
        self.muxer.buffered_bytes()
    }

    /// How many dynamic fds (queues, sockets) the event loop watches.
    #[cfg(test)]
    pub(super) fn watch_registered_count(&self) -> usize {
        self.watch.registered_count()
    }

    fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            log::error!("vsock: cannot signal the wake eventfd: {e}");
        }
    }

    /// Takes the packets the guest put on the tx queue, at most [`BATCH`] of them; with more
    /// left, the tx eventfd is signalled again so the event loop's other events (stop, accept,
    /// the host sockets) get their turn before the rest.
    pub(super) fn process_tx(&mut self) {
        let Self {
            active,
            muxer,
            watch,
            log,
            ..
        } = self;
        let Some(active) = active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mut used = 0;
        loop {
            if used == BATCH {
                if let Err(e) = active.tx_evt.write(1) {
                    log::error!("vsock: cannot re-arm the tx queue: {e}");
                }
                break;
            }
            let mem = &active.mem;
            let chain = match active.tx.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    active.mark_broken(log, format_args!("tx queue: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let result = packet::read_tx_packet(chain, mem);
            if let Err(e) = active.tx.add_used(mem, head, 0) {
                active.mark_broken(
                    log,
                    format_args!("tx queue: cannot return chain {head}: {e}"),
                );
                break;
            }
            used += 1;
            match result {
                Ok(pkt) => muxer.on_guest_packet(&pkt, watch),
                Err(bad) => {
                    log.warn(format_args!("vsock: dropping tx packet: {}", bad.error));
                    if let Some(hdr) = bad.header {
                        muxer.on_bad_packet(&hdr, watch);
                    }
                }
            }
        }
        if used > 0 {
            active.notify(TX_QUEUE);
        }
    }

    /// Fills the guest's rx buffers with whatever waits for it, at most [`BATCH`] of them; with
    /// more waiting, the wake eventfd brings the event loop back here after its other events.
    pub(super) fn process_rx(&mut self) {
        let Self {
            active,
            muxer,
            watch,
            log,
            scratch,
            wake_evt,
            ..
        } = self;
        let Some(active) = active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mut used = 0;
        while muxer.has_rx() {
            if used == BATCH {
                if let Err(e) = wake_evt.write(1) {
                    log::error!("vsock: cannot signal the wake eventfd: {e}");
                }
                break;
            }
            let mem = &active.mem;
            let chain = match active.rx.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    active.mark_broken(log, format_args!("rx queue: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = match packet::rx_capacity(&chain, mem) {
                Ok(room) => match muxer.pop_rx(room.min(MAX_PKT_BUF_SIZE as usize), scratch, watch)
                {
                    Some(mut hdr) => {
                        // scratch holds at most MAX_PKT_BUF_SIZE bytes.
                        hdr.len = scratch.len() as u32;
                        packet::write_rx_packet(chain, mem, &hdr, scratch).unwrap_or_else(|e| {
                            log.warn(format_args!("vsock: rx buffer {head}: {e}; packet lost"));
                            0
                        })
                    }
                    None => {
                        // Nothing fits after all; leave the buffer for later.
                        active.rx.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    log.warn(format_args!("vsock: unusable rx buffer {head}: {e}"));
                    0
                }
            };
            if let Err(e) = active.rx.add_used(mem, head, len) {
                active.mark_broken(
                    log,
                    format_args!("rx queue: cannot return chain {head}: {e}"),
                );
                break;
            }
            used += 1;
        }
        if used > 0 {
            active.notify(RX_QUEUE);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.guest_cid.to_le_bytes();
        crate::virtio::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.warn(format_args!(
            "vsock: ignoring {}-byte write to read-only configuration at {offset:#x}",
            data.len()
        ));
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive {
                device_type: TYPE_VSOCK,
            });
        }
        let [rx, tx, event] = crate::virtio::queue_slots::<3>(queues);
        let missing = |index| ActivateError::MissingQueue {
            device_type: TYPE_VSOCK,
            index,
        };
        let rx = rx.ok_or_else(|| missing(RX_QUEUE))?;
        let tx = tx.ok_or_else(|| missing(TX_QUEUE))?;
        self.wake_evt
            .write(1)
            .map_err(|source| ActivateError::EventFd {
                device_type: TYPE_VSOCK,
                source,
            })?;
        self.watch
            .set(rx.notify.as_raw_fd(), Some(event_manager::EventSet::IN));
        self.watch
            .set(tx.notify.as_raw_fd(), Some(event_manager::EventSet::IN));
        self.active = Some(ActiveState {
            mem,
            interrupt,
            rx: rx.queue,
            tx: tx.queue,
            rx_evt: rx.notify,
            tx_evt: tx.notify,
            _event: event,
            broken: false,
        });
        Ok(())
    }

    /// Only with no connection (a restored VM's host sockets are new ones) and every packet
    /// the guest sent taken: the rx queue's buffers are taken only to deliver a packet, so it
    /// resumes at its used index too.
    fn snapshot_ready(&self, progress: &[QueueProgress]) -> Result<(), String> {
        if self.active.as_ref().is_some_and(|a| a.broken) {
            return Err("the guest broke a queue".into());
        }
        let open = self.muxer.connection_count();
        if open > 0 {
            return Err(format!("{open} connections are open"));
        }
        if self.muxer.has_rx() {
            return Err("packets for the guest are waiting".into());
        }
        match progress.iter().find(|p| p.index == TX_QUEUE) {
            Some(tx) if tx.avail_idx != tx.used_idx => {
                Err("packets from the guest are not all taken yet".into())
            }
            _ => Ok(()),
        }
    }

    fn reset(&mut self) -> bool {
        self.muxer.reset(&mut self.watch);
        if let Some(active) = self.active.take() {
            for evt in [active.rx_evt, active.tx_evt] {
                self.watch.set(evt.as_raw_fd(), None);
                self.watch.retire(evt);
            }
        }
        self.acked_features = 0;
        self.wake();
        true
    }
}
