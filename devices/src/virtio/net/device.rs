//! The virtio-net `VirtioDevice`: configuration space, feature negotiation (and the TAP's
//! offloads that follow from it), activation and reset, and the work on the two queues.
//!
//! `activate` and `reset` run on a vCPU thread (through the transport); they only hand queues
//! over and signal the wake eventfd. All queue and TAP work runs in the event loop (see
//! `event_handler`).

use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::{FrameIo, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::{
    format_mac, NetError, ETH_HLEN, MAX_FRAME_LEN, MIN_MTU, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_S_LINK_UP, VNET_HDR_LEN,
};
use crate::virtio::{
    ActivateError, ActiveQueue, GuestErrorLog, InterruptKind, IrqTrigger, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};

/// Chains taken per pass over a queue before the event loop's other events get their turn.
pub(super) const BATCH: usize = 64;

/// Frames and bytes each way, and the frames dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the guest refused (bad length or header) or refused by the host kernel.
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the TAP that no buffer of the guest could hold.
    pub rx_dropped: u64,
}

/// The queues and memory the driver handed over at activation.
#[derive(Debug)]
pub(super) struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Arc<IrqTrigger>,
    rx: Queue,
    tx: Queue,
    pub(super) rx_evt: EventFd,
    pub(super) tx_evt: EventFd,
    /// The guest broke a queue; nothing more is done until the driver resets the device.
    broken: bool,
}

impl ActiveState {
    fn mark_broken(&mut self, log: &mut GuestErrorLog, what: std::fmt::Arguments<'_>) {
        self.broken = true;
        log.warn(format_args!("net: {what}; device needs a reset"));
        if let Err(e) = self.interrupt.signal_needs_reset() {
            log::error!("net: {e}");
        }
    }

    fn notify(&mut self, index: usize) {
        let queue = if index == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
                log::error!("net: {e}");
            }
        }
    }
}

/// A virtio-net device backed by a TAP (or any [`FrameIo`]).
pub struct Net {
    tap: Box<dyn FrameIo>,
    mac: [u8; 6],
    mtu: u16,
    acked_features: u64,
    queue_max_sizes: [u16; 2],
    pub(super) wake_evt: EventFd,
    pub(super) active: Option<ActiveState>,
    /// The queue eventfds of a reset device, kept open until the event loop unregisters them.
    pub(super) retired: Vec<EventFd>,
    /// Whether the queue eventfds of `active` are registered with the event loop.
    pub(super) registered: bool,
    /// The TAP's queue was full: transmission waits until it is writable.
    pub(super) tx_blocked: bool,
    /// A frame read from the TAP that the guest had no room for yet: its length in `rx_buf`.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    log: GuestErrorLog,
    stats: NetStats,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &format_mac(&self.mac))
            .field("mtu", &self.mtu)
            .field("active", &self.active.is_some())
            .finish()
    }
}

/// Why a frame from the guest is refused.
fn check_tx_frame(frame: &[u8], acked: u64) -> Result<(), String> {
    let has = |bit: u32| acked & (1 << bit) != 0;
    if frame.len() < VNET_HDR_LEN + ETH_HLEN {
        return Err(format!(
            "{} bytes, shorter than a header and an Ethernet header",
            frame.len()
        ));
    }
    let (flags, gso_type) = (frame[0], frame[1]);
    let le16 = |at: usize| u16::from_le_bytes([frame[at], frame[at + 1]]);
    let (gso_size, csum_start, csum_offset) = (le16(4), le16(6), le16(8));
    if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(format!("header flags {flags:#x}"));
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        if !has(VIRTIO_NET_F_CSUM) {
            return Err("a partial checksum, and CSUM was not negotiated".into());
        }
        let payload = frame.len() - VNET_HDR_LEN;
        if usize::from(csum_start) + usize::from(csum_offset) + 2 > payload {
            return Err(format!(
                "checksum at {csum_start}+{csum_offset} past the {payload}-byte frame"
            ));
        }
    }
    let tso = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        other => return Err(format!("segmentation type {other:#x}")),
    };
    if !has(tso) {
        return Err(format!(
            "segmentation type {gso_type}, which was not negotiated"
        ));
    }
    if gso_size == 0 || flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return Err("a segmentation offload without a segment size or a partial checksum".into());
    }
    Ok(())
}

/// Copies a transmit chain into `buf`: only readable descriptors, at most [`MAX_FRAME_LEN`]
/// bytes. Gives the frame's length.
fn read_tx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err("a device-writable descriptor in a transmit chain".into());
        }
        let part = desc.len() as usize;
        let end = len
            .checked_add(part)
            .filter(|end| *end <= buf.len())
            .ok_or_else(|| format!("longer than {} bytes", buf.len()))?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|e| format!("descriptor at {:#x}: {e}", desc.addr().0))?;
        len = end;
    }
    Ok(len)
}

/// The bytes the device may write into a chain.
fn writable_capacity(chain: &DescriptorChain<&GuestMemoryMmap>) -> u64 {
    chain.clone().writable().map(|d| u64::from(d.len())).sum()
}

/// Writes as much of `data` as fits into a chain's writable descriptors; gives how much.
fn write_rx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    data: &[u8],
) -> Result<usize, String> {
    let mut done = 0usize;
    for desc in chain.writable() {
        if done == data.len() {
            break;
        }
        let n = (desc.len() as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], desc.addr())
            .map_err(|e| format!("descriptor at {:#x}: {e}", desc.addr().0))?;
        done += n;
    }
    Ok(done)
}

/// What became of one frame for the guest.
enum Delivery {
    /// In the guest's buffers: this many chains used.
    Delivered(usize),
    /// Not enough buffers yet; nothing taken.
    NoRoom,
    /// Dropped (a buffer too small without mergeable buffers, or one the device could not
    /// write); this many chains used.
    Dropped(usize),
    /// The queue is broken.
    Broken,
}

impl Net {
    /// A device on `tap` whose guest NIC has `mac` and `mtu`.
    pub fn new(tap: Box<dyn FrameIo>, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac(format_mac(&mac)));
        }
        if mtu < MIN_MTU {
            return Err(NetError::InvalidMtu(mtu));
        }
        Ok(Self {
            tap,
            mac,
            mtu,
            acked_features: 0,
            queue_max_sizes: [QUEUE_SIZE; 2],
            wake_evt: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            active: None,
            retired: Vec::new(),
            registered: false,
            tx_blocked: false,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            tx_buf: vec![0; MAX_FRAME_LEN],
            log: GuestErrorLog::new(),
            stats: NetStats::default(),
        })
    }

    /// The TAP.
    pub fn tap(&self) -> &dyn FrameIo {
        self.tap.as_ref()
    }

    /// Frames each way so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the device gave up on a queue the guest broke.
    pub fn is_broken(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.broken)
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// The TAP offloads that follow from what the driver accepted (a driver may accept TSO
    /// only with checksum offload).
    fn tap_offload(&self) -> u32 {
        if !self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = TUN_F_CSUM;
        if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
        flags
    }

    pub(super) fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            log::error!("net: cannot signal the wake eventfd: {e}");
        }
    }

    /// Takes the frames the guest put on the transmit queue, at most [`BATCH`], and writes them
    /// to the TAP. A full TAP leaves the chain in the queue for when it is writable again.
    pub(super) fn process_tx(&mut self) {
        let acked = self.acked_features;
        let Self {
            active,
            tap,
            tx_buf,
            log,
            stats,
            tx_blocked,
            ..
        } = self;
        let Some(active) = active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        if *tx_blocked {
            return;
        }
        let mut used = 0;
        loop {
            if used == BATCH {
                if let Err(e) = active.tx_evt.write(1) {
                    log::error!("net: cannot re-arm the transmit queue: {e}");
                }
                break;
            }
            let mem = &active.mem;
            let chain = match active.tx.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    active.mark_broken(log, format_args!("transmit queue: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let frame = read_tx_chain(chain, mem, tx_buf)
                .and_then(|len| check_tx_frame(&tx_buf[..len], acked).map(|()| len));
            match frame {
                Ok(len) => match tap.write_frame(&[IoSlice::new(&tx_buf[..len])]) {
                    Ok(_) => {
                        stats.tx_frames += 1;
                        stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        active.tx.go_to_previous_position();
                        *tx_blocked = true;
                        break;
                    }
                    Err(e) => {
                        stats.tx_dropped += 1;
                        log.warn(format_args!(
                            "net: the host refused a {}-byte frame: {e}",
                            len - VNET_HDR_LEN
                        ));
                    }
                },
                Err(why) => {
                    stats.tx_dropped += 1;
                    log.warn(format_args!("net: dropping transmit chain {head}: {why}"));
                }
            }
            if let Err(e) = active.tx.add_used(mem, head, 0) {
                active.mark_broken(
                    log,
                    format_args!("transmit queue: cannot return chain {head}: {e}"),
                );
                break;
            }
            used += 1;
        }
        if used > 0 {
            active.notify(TX_QUEUE);
        }
    }

    /// Reads frames from the TAP into the guest's receive buffers, at most [`BATCH`] chains'
    /// worth; a frame the guest has no room for waits for more buffers.
    pub(super) fn process_rx(&mut self) {
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let Self {
            active,
            tap,
            rx_buf,
            rx_pending,
            log,
            stats,
            wake_evt,
            ..
        } = self;
        let Some(active) = active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mut used = 0;
        loop {
            if used >= BATCH {
                if let Err(e) = wake_evt.write(1) {
                    log::error!("net: cannot signal the wake eventfd: {e}");
                }
                break;
            }
            let len = match rx_pending.take() {
                Some(len) => len,
                None => match tap.read_frame(rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::error!("net: reading the TAP {}: {e}", tap.name());
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN + ETH_HLEN {
                stats.rx_dropped += 1;
                continue;
            }
            match deliver(active, &mut rx_buf[..len], mergeable, log) {
                Delivery::Delivered(chains) => {
                    used += chains;
                    stats.rx_frames += 1;
                    stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Delivery::Dropped(chains) => {
                    used += chains;
                    stats.rx_dropped += 1;
                }
                Delivery::NoRoom => {
                    *rx_pending = Some(len);
                    break;
                }
                Delivery::Broken => break,
            }
        }
        if used > 0 {
            active.notify(RX_QUEUE);
        }
    }
}

/// Puts one frame (`frame` starts with its header) into the guest's receive buffers: across as
/// many as it takes with mergeable buffers (`num_buffers` says how many), else into one.
fn deliver(
    active: &mut ActiveState,
    frame: &mut [u8],
    mergeable: bool,
    log: &mut GuestErrorLog,
) -> Delivery {
    let mem = &active.mem;
    let start = active.rx.next_avail();
    let mut chains = Vec::new();
    let mut room = 0u64;
    while room < frame.len() as u64 {
        let chain = match active.rx.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                active.mark_broken(log, format_args!("receive queue: {e}"));
                return Delivery::Broken;
            }
        };
        let Some(chain) = chain else {
            active.rx.set_next_avail(start);
            return Delivery::NoRoom;
        };
        room += writable_capacity(&chain);
        chains.push(chain);
        if !mergeable {
            break;
        }
    }
    let mut dropped = false;
    if room < frame.len() as u64 {
        // One buffer without mergeable buffers, and it is too small.
        log.warn(format_args!(
            "net: a {}-byte receive buffer for a {}-byte frame; frame dropped",
            room,
            frame.len()
        ));
        dropped = true;
    }
    // `num_buffers`: at most the queue's size, which fits.
    frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let mut done = 0usize;
    let mut lens = Vec::with_capacity(chains.len());
    for chain in chains {
        let head = chain.head_index();
        let written = if dropped {
            0
        } else {
            match write_rx_chain(chain, mem, &frame[done..]) {
                Ok(n) => n,
                Err(e) => {
                    log.warn(format_args!(
                        "net: receive chain {head}: {e}; frame dropped"
                    ));
                    dropped = true;
                    0
                }
            }
        };
        done += written;
        lens.push((head, written as u32));
    }
    let count = lens.len();
    for (head, len) in lens {
        if let Err(e) = active.rx.add_used(&active.mem, head, len) {
            active.mark_broken(
                log,
                format_args!("receive queue: cannot return chain {head}: {e}"),
            );
            return Delivery::Broken;
        }
    }
    if dropped {
        Delivery::Dropped(count)
    } else {
        Delivery::Delivered(count)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0, |features, bit| features | 1 << bit)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs;
        // le16 mtu; }
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        crate::virtio::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is the mirrored interface's: a driver may not change it (no CTRL_MAC_ADDR).
        self.log.warn(format_args!(
            "net: ignoring {}-byte write to the configuration at {offset:#x}",
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
                device_type: TYPE_NET,
            });
        }
        let [rx, tx] = crate::virtio::queue_slots::<2>(queues);
        let missing = |index| ActivateError::MissingQueue {
            device_type: TYPE_NET,
            index,
        };
        let rx = rx.ok_or_else(|| missing(RX_QUEUE))?;
        let tx = tx.ok_or_else(|| missing(TX_QUEUE))?;
        self.tap
            .set_offload(self.tap_offload())
            .map_err(|e| ActivateError::Backend {
                device_type: TYPE_NET,
                source: Box::new(e),
            })?;
        self.active = Some(ActiveState {
            mem,
            interrupt,
            rx: rx.queue,
            tx: tx.queue,
            rx_evt: rx.notify,
            tx_evt: tx.notify,
            broken: false,
        });
        self.registered = false;
        self.tx_blocked = false;
        self.wake();
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            // Only what the event loop watches needs unwatching; the rest just closes.
            if self.registered {
                self.retired.push(active.rx_evt);
                self.retired.push(active.tx_evt);
            }
        }
        self.registered = false;
        self.rx_pending = None;
        self.tx_blocked = false;
        self.acked_features = 0;
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("net: {e}");
        }
        self.wake();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(hdr: [u8; VNET_HDR_LEN], payload: usize) -> Vec<u8> {
        let mut f = hdr.to_vec();
        f.resize(VNET_HDR_LEN + payload, 0xab);
        f
    }

    fn hdr(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso;
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&csum_start.to_le_bytes());
        h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
        h
    }

    #[test]
    fn transmitted_headers_are_checked_against_what_was_negotiated() {
        let all = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);
        let ok = |f: &[u8], acked| check_tx_frame(f, acked).is_ok();
        assert!(ok(&frame(hdr(0, 0, 0, 0, 0), 60), 0));
        assert!(
            !ok(&frame(hdr(0, 0, 0, 0, 0), 13), all),
            "shorter than Ethernet"
        );
        assert!(!ok(&frame(hdr(4, 0, 0, 0, 0), 60), all), "unknown flags");
        assert!(
            !ok(&frame(hdr(1, 0, 0, 34, 16), 60), 0),
            "csum not negotiated"
        );
        assert!(ok(&frame(hdr(1, 0, 0, 34, 16), 60), all));
        assert!(
            !ok(&frame(hdr(1, 0, 0, 50, 16), 60), all),
            "csum past the end"
        );
        assert!(
            !ok(&frame(hdr(1, 0, 0, 65535, 65535), 60), all),
            "no overflow"
        );
        assert!(ok(&frame(hdr(1, 1, 1448, 34, 16), 60), all));
        assert!(
            !ok(&frame(hdr(1, 4, 1448, 34, 16), 60), all),
            "TSO6 not negotiated"
        );
        assert!(
            !ok(&frame(hdr(1, 1, 0, 34, 16), 60), all),
            "no segment size"
        );
        assert!(
            !ok(&frame(hdr(0, 1, 1448, 0, 0), 60), all),
            "TSO without a partial csum"
        );
        assert!(
            !ok(&frame(hdr(1, 3, 1448, 34, 16), 60), all),
            "UDP segmentation"
        );
        assert!(
            !ok(&frame(hdr(1, 0x81, 1448, 34, 16), 60), all),
            "ECN not negotiated"
        );
    }
}
