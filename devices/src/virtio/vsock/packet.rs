//! The vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little endian) and the two
//! ways packets cross a queue: the guest's tx chains (header, then payload) and the guest's rx
//! buffers.
//!
//! The rust-vmm `virtio-vsock` crate (0.11, which matches the pinned vm-memory 0.17.1 and
//! virtio-queue 0.17) insists that the header and the payload each sit in exactly one
//! descriptor. Linux splits a non-linear skb's payload over several descriptors, so this parser
//! reads through virtio-queue's `Reader`/`Writer` instead, which accept any layout and check
//! every descriptor against guest memory.

use std::io::{self, Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::{MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_OP_RW};

/// Size of `struct virtio_vsock_hdr`.
pub const VSOCK_HDR_SIZE: usize = 44;

/// A descriptor chain as popped from a queue over guest memory.
pub(crate) type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes a header from its wire form.
    pub fn from_bytes(raw: &[u8; VSOCK_HDR_SIZE]) -> Self {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at =
            |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in its wire form.
    pub fn to_bytes(&self) -> [u8; VSOCK_HDR_SIZE] {
        let mut raw = [0u8; VSOCK_HDR_SIZE];
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.type_.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        raw
    }
}

/// What is wrong with a packet the guest put on a queue.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain's descriptors do not lie in guest memory (or overflow).
    #[error("descriptor chain is invalid")]
    Chain(#[source] virtio_queue::Error),
    /// The chain's readable part cannot hold a header.
    #[error("tx chain has {0} readable bytes, too few for a header")]
    TooShort(usize),
    /// The header's `len` exceeds what any packet may carry.
    #[error("packet len {0} exceeds the maximum of {MAX_PKT_BUF_SIZE}")]
    LenTooLarge(u32),
    /// The header's `len` exceeds the chain's readable bytes after the header.
    #[error("packet len {len} exceeds the {available} payload bytes in the chain")]
    LenBeyondChain { len: u32, available: usize },
    /// The chain's writable part cannot hold a header.
    #[error("rx buffer has {0} writable bytes, too few for a header")]
    RxTooShort(usize),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed")]
    Memory(#[source] io::Error),
}

/// A packet that could not be taken off the tx queue, with its header if that was readable.
#[derive(Debug)]
pub struct BadPacket {
    pub header: Option<VsockHeader>,
    pub error: PacketError,
}

/// A packet the guest sent, copied out of guest memory (so the guest cannot change it under us).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: VsockHeader,
    /// The payload; empty except for `OP_RW` (other operations carry none).
    pub data: Vec<u8>,
}

/// Copies a packet out of a tx chain, checking the header's `len` against the chain.
pub fn read_tx_packet(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Result<TxPacket, BadPacket> {
    let bad = |header, error| BadPacket { header, error };
    let mut reader = chain
        .reader(mem)
        .map_err(|e| bad(None, PacketError::Chain(e)))?;
    let available = reader.available_bytes();
    if available < VSOCK_HDR_SIZE {
        return Err(bad(None, PacketError::TooShort(available)));
    }
    let mut raw = [0u8; VSOCK_HDR_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(|e| bad(None, PacketError::Memory(e)))?;
    let hdr = VsockHeader::from_bytes(&raw);
    if hdr.op != VIRTIO_VSOCK_OP_RW {
        return Ok(TxPacket {
            hdr,
            data: Vec::new(),
        });
    }
    if hdr.len > MAX_PKT_BUF_SIZE {
        return Err(bad(Some(hdr), PacketError::LenTooLarge(hdr.len)));
    }
    let available = reader.available_bytes();
    if hdr.len as usize > available {
        return Err(bad(
            Some(hdr),
            PacketError::LenBeyondChain {
                len: hdr.len,
                available,
            },
        ));
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader
        .read_exact(&mut data)
        .map_err(|e| bad(Some(hdr), PacketError::Memory(e)))?;
    Ok(TxPacket { hdr, data })
}

/// The payload room of an rx chain (its writable bytes past a header), or why it has none.
pub fn rx_capacity(chain: &Chain<'_>, mem: &GuestMemoryMmap) -> Result<usize, PacketError> {
    let writer = chain.clone().writer(mem).map_err(PacketError::Chain)?;
    let available = writer.available_bytes();
    available
        .checked_sub(VSOCK_HDR_SIZE)
        .ok_or(PacketError::RxTooShort(available))
}

/// Writes a packet into an rx chain; returns the bytes written (the used length).
pub fn write_rx_packet(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    hdr: &VsockHeader,
    data: &[u8],
) -> Result<u32, PacketError> {
    let mut writer = chain.writer(mem).map_err(PacketError::Chain)?;
    if writer.available_bytes() < VSOCK_HDR_SIZE + data.len() {
        return Err(PacketError::RxTooShort(writer.available_bytes()));
    }
    writer
        .write_all(&hdr.to_bytes())
        .and_then(|()| writer.write_all(data))
        .map_err(PacketError::Memory)?;
    // At most a header plus MAX_PKT_BUF_SIZE: the caller sizes `data` from `rx_capacity`.
    Ok(u32::try_from(writer.bytes_written()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::test_utils::{Buffer, DriverQueue, VRING_DESC_F_NEXT};
    use crate::virtio::vsock::VIRTIO_VSOCK_TYPE_STREAM;
    use virtio_queue::QueueOwnedT;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rw_header(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_the_wire_layout() {
        let hdr = rw_header(5);
        let raw = hdr.to_bytes();
        assert_eq!(raw[0], 3);
        assert_eq!(raw[8], 2);
        assert_eq!(&raw[16..20], &1000u32.to_le_bytes());
        assert_eq!(&raw[24..28], &5u32.to_le_bytes());
        assert_eq!(&raw[30..32], &VIRTIO_VSOCK_OP_RW.to_le_bytes());
        assert_eq!(&raw[40..44], &7u32.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&raw), hdr);
    }

    #[test]
    fn reads_header_and_payload_split_any_way() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
        let mut queue = driver.device_queue(16).unwrap();
        let raw = rw_header(10).to_bytes();
        let mut whole = raw.to_vec();
        whole.extend_from_slice(b"0123456789");
        // Header and payload in one descriptor, split, and the header itself split.
        driver.add_chain(&[Buffer::Readable(&whole)]).unwrap();
        driver
            .add_chain(&[Buffer::Readable(&raw), Buffer::Readable(b"0123456789")])
            .unwrap();
        driver
            .add_chain(&[
                Buffer::Readable(&whole[..20]),
                Buffer::Readable(&whole[20..50]),
                Buffer::Readable(&whole[50..]),
            ])
            .unwrap();
        for _ in 0..3 {
            let chain = queue.iter(&mem).unwrap().next().unwrap();
            assert!(chain.clone().all(|d| !d.is_write_only()));
            let pkt = read_tx_packet(chain, &mem).unwrap();
            assert_eq!(pkt.hdr, rw_header(10));
            assert_eq!(pkt.data, b"0123456789");
        }
    }

    #[test]
    fn rejects_short_chains_and_lying_lengths() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
        let mut queue = driver.device_queue(16).unwrap();
        let pop = |queue: &mut virtio_queue::Queue| queue.iter(&mem).unwrap().next().unwrap();

        driver.add_chain(&[Buffer::Readable(&[0u8; 43])]).unwrap();
        let err = read_tx_packet(pop(&mut queue), &mem).unwrap_err();
        assert!(matches!(err.error, PacketError::TooShort(43)) && err.header.is_none());

        let raw = rw_header(100).to_bytes();
        driver
            .add_chain(&[Buffer::Readable(&raw), Buffer::Readable(&[1u8; 99])])
            .unwrap();
        let err = read_tx_packet(pop(&mut queue), &mem).unwrap_err();
        assert!(matches!(
            err.error,
            PacketError::LenBeyondChain {
                len: 100,
                available: 99
            }
        ));
        assert_eq!(err.header, Some(rw_header(100)));

        let raw = rw_header(u32::MAX).to_bytes();
        driver.add_chain(&[Buffer::Readable(&raw)]).unwrap();
        let err = read_tx_packet(pop(&mut queue), &mem).unwrap_err();
        assert!(matches!(err.error, PacketError::LenTooLarge(u32::MAX)));

        // Writable descriptors carry nothing for the device to read.
        driver.add_chain(&[Buffer::Writable(64)]).unwrap();
        let err = read_tx_packet(pop(&mut queue), &mem).unwrap_err();
        assert!(matches!(err.error, PacketError::TooShort(0)));

        // A descriptor pointing outside guest memory.
        let head = driver.add_chain(&[Buffer::Readable(&raw)]).unwrap();
        driver
            .write_descriptor(head, GuestAddress(0xffff_0000), 44, 0, 0)
            .unwrap();
        let err = read_tx_packet(pop(&mut queue), &mem).unwrap_err();
        assert!(matches!(err.error, PacketError::Chain(_)));

        // A chain whose `next` loops back on itself ends after queue-size (16) descriptors.
        let head = driver.add_chain(&[Buffer::Readable(&[0u8; 1])]).unwrap();
        driver
            .write_descriptor(head, GuestAddress(0x8000), 1, VRING_DESC_F_NEXT, head)
            .unwrap();
        let err = read_tx_packet(pop(&mut queue), &mem).unwrap_err();
        assert!(matches!(err.error, PacketError::TooShort(16)));
    }

    #[test]
    fn control_packets_ignore_their_len() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
        let mut queue = driver.device_queue(16).unwrap();
        let mut hdr = rw_header(1 << 20);
        hdr.op = super::super::VIRTIO_VSOCK_OP_REQUEST;
        driver
            .add_chain(&[Buffer::Readable(&hdr.to_bytes())])
            .unwrap();
        let pkt = read_tx_packet(queue.iter(&mem).unwrap().next().unwrap(), &mem).unwrap();
        assert_eq!(pkt.hdr, hdr);
        assert!(pkt.data.is_empty());
    }

    #[test]
    fn writes_into_rx_buffers_of_any_layout() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
        let mut queue = driver.device_queue(16).unwrap();
        let hdr = rw_header(5);
        driver
            .add_chain(&[Buffer::Writable(30), Buffer::Writable(30)])
            .unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(rx_capacity(&chain, &mem).unwrap(), 16);
        let head = chain.head_index();
        let len = write_rx_packet(chain, &mem, &hdr, b"hello").unwrap();
        assert_eq!(len, 49);
        use virtio_queue::QueueT;
        queue.add_used(&mem, head, len).unwrap();
        let used = driver.pop_used().unwrap().unwrap();
        let raw: [u8; VSOCK_HDR_SIZE] = used.written[..VSOCK_HDR_SIZE].try_into().unwrap();
        assert_eq!(VsockHeader::from_bytes(&raw), hdr);
        assert_eq!(&used.written[VSOCK_HDR_SIZE..], b"hello");

        driver.add_chain(&[Buffer::Writable(43)]).unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert!(matches!(
            rx_capacity(&chain, &mem),
            Err(PacketError::RxTooShort(43))
        ));
        assert!(matches!(
            write_rx_packet(chain, &mem, &hdr, b""),
            Err(PacketError::RxTooShort(43))
        ));
    }
}
