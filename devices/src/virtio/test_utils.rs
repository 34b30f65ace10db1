//! Driver-side helpers for device tests: play the guest's part of virtio.
//!
//! `DriverQueue` lays out a split virtqueue in guest memory and offers descriptor chains the way
//! a guest driver does (buffers, descriptors, available ring, then a release store of the
//! index), and reads back what the device put in the used ring. The free functions drive a
//! virtio-mmio transport through its registers like Linux's virtio_mmio driver: reset, feature
//! negotiation, queue setup, DRIVER_OK.
//!
//! A device test can either hand `DriverQueue::device_queue()` straight to the device, or go
//! through a real `MmioTransport` with `init_device` and take the queues `activate` received.
//! Raw access (`write_descriptor`, `publish`) is there to build the malformed chains a hostile
//! guest would.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use super::mmio::{
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};
use super::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use crate::bus::BusDevice;

// Descriptor flags (linux/virtio_ring.h).
/// The descriptor continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// The buffer is for the device to write.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;

/// Errors from the driver-side helpers.
#[derive(Debug, thiserror::Error)]
pub enum DriverQueueError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("invalid queue size {0}")]
    InvalidSize(u16),
    /// The queue's rings do not fit in the memory region at the base address.
    #[error("queue rings at {0:#x} do not fit in one guest memory region")]
    NoRoom(u64),
    /// A chain needs more descriptors than are free.
    #[error("chain of {needed} descriptors, but {free} are free")]
    NoDescriptors { needed: usize, free: usize },
    /// A chain was empty.
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    /// The buffer area behind the rings is used up.
    #[error("no guest memory left for a {0}-byte buffer")]
    NoBufferSpace(u64),
    /// The device put a head in the used ring that the driver never offered.
    #[error("used ring entry names descriptor {0}, which heads no outstanding chain")]
    UnknownUsedHead(u32),
    /// The device claims to have written more than the chain can hold.
    #[error("used length {len} exceeds the {capacity} writable bytes of chain {head}")]
    UsedLengthTooLong { head: u16, len: u32, capacity: u64 },
    /// Guest memory could not be accessed.
    #[error("guest memory access at {addr:#x} failed")]
    Memory {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

type Result<T> = std::result::Result<T, DriverQueueError>;

/// One buffer of a descriptor chain, from the driver's side.
#[derive(Debug, Clone, Copy)]
pub enum Buffer<'a> {
    /// Data for the device to read.
    Readable(&'a [u8]),
    /// Room of this many bytes for the device to write.
    Writable(u32),
}

/// A chain the device returned through the used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedChain {
    /// The chain's head descriptor index.
    pub head: u16,
    /// The length the device reported writing.
    pub len: u32,
    /// The first `len` bytes of the chain's writable buffers, in chain order.
    pub written: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    desc: u16,
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// The driver's view of one split virtqueue in guest memory.
#[derive(Debug)]
pub struct DriverQueue {
    mem: GuestMemoryMmap,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    free_descs: Vec<u16>,
    outstanding: HashMap<u16, Vec<Segment>>,
    avail_idx: u16,
    used_idx: u16,
    next_buffer: GuestAddress,
    buffers_end: GuestAddress,
}

impl DriverQueue {
    /// Lays out a queue of `size` entries at `base` (descriptor table, available ring, used
    /// ring, each aligned as the spec asks), zeroes the rings, and keeps the rest of the memory
    /// region holding `base` for buffers.
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> Result<Self> {
        if size == 0 || size > 32768 || !size.is_power_of_two() {
            return Err(DriverQueueError::InvalidSize(size));
        }
        let n = u64::from(size);
        let desc_table = GuestAddress(base.0.next_multiple_of(16));
        let avail_ring = desc_table.unchecked_add(DESC_SIZE * n);
        let used_ring = GuestAddress((avail_ring.0 + 6 + 2 * n).next_multiple_of(4));
        let rings_end = used_ring.unchecked_add(6 + USED_ELEM_SIZE * n);
        let region_end = mem
            .find_region(base)
            .map(|region| region.last_addr().unchecked_add(1))
            .ok_or(DriverQueueError::NoRoom(base.0))?;
        if rings_end > region_end {
            return Err(DriverQueueError::NoRoom(base.0));
        }
        let rings_len = rings_end.unchecked_offset_from(desc_table) as usize;
        write(mem, desc_table, &vec![0u8; rings_len])?;
        Ok(Self {
            mem: mem.clone(),
            size,
            desc_table,
            avail_ring,
            used_ring,
            // Hand out low indices first, like a fresh Linux queue.
            free_descs: (0..size).rev().collect(),
            outstanding: HashMap::new(),
            avail_idx: 0,
            used_idx: 0,
            next_buffer: GuestAddress(rings_end.0.next_multiple_of(16)),
            buffers_end: region_end,
        })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Address of the available (driver) ring.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Address of the used (device) ring.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }

    /// A device-side `Queue` programmed as the transport would after DRIVER_OK, for tests that
    /// drive a device without a transport.
    pub fn device_queue(&self, max_size: u16) -> std::result::Result<Queue, virtio_queue::Error> {
        let mut queue = Queue::new(max_size)?;
        queue.try_set_size(self.size)?;
        queue.try_set_desc_table_address(self.desc_table)?;
        queue.try_set_avail_ring_address(self.avail_ring)?;
        queue.try_set_used_ring_address(self.used_ring)?;
        queue.set_ready(true);
        Ok(queue)
    }

    /// Programs this queue as queue `index` of a virtio-mmio transport, register by register.
    /// The transport must be past FEATURES_OK.
    pub fn configure<D: BusDevice + ?Sized>(&self, transport: &mut D, index: u32) {
        write_reg(transport, VIRTIO_MMIO_QUEUE_SEL, index);
        write_reg(transport, VIRTIO_MMIO_QUEUE_NUM, self.size.into());
        for (low, high, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                self.desc_table,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                self.avail_ring,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                self.used_ring,
            ),
        ] {
            write_reg(transport, low, addr.0 as u32);
            write_reg(transport, high, (addr.0 >> 32) as u32);
        }
        write_reg(transport, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Offers a chain of `buffers` to the device: copies readable data into fresh buffer
    /// memory, links descriptors, and publishes the head. Returns the head index.
    pub fn add_chain(&mut self, buffers: &[Buffer<'_>]) -> Result<u16> {
        if buffers.is_empty() {
            return Err(DriverQueueError::EmptyChain);
        }
        if buffers.len() > self.free_descs.len() {
            return Err(DriverQueueError::NoDescriptors {
                needed: buffers.len(),
                free: self.free_descs.len(),
            });
        }
        let mut segments = Vec::with_capacity(buffers.len());
        for buffer in buffers {
            let (len, writable) = match buffer {
                Buffer::Readable(data) => (data.len() as u32, false),
                Buffer::Writable(len) => (*len, true),
            };
            let addr = self.alloc_buffer(len.into())?;
            if let Buffer::Readable(data) = buffer {
                write(&self.mem, addr, data)?;
            }
            segments.push(Segment {
                desc: 0,
                addr,
                len,
                writable,
            });
        }
        // Checked above: there are enough free descriptors.
        let descs: Vec<u16> = (0..segments.len())
            .filter_map(|_| self.free_descs.pop())
            .collect();
        for (i, segment) in segments.iter_mut().enumerate() {
            segment.desc = descs[i];
            let mut flags = if segment.writable {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            let next = match descs.get(i + 1) {
                Some(&next) => {
                    flags |= VRING_DESC_F_NEXT;
                    next
                }
                None => 0,
            };
            self.write_descriptor(segment.desc, segment.addr, segment.len, flags, next)?;
        }
        let head = descs[0];
        self.outstanding.insert(head, segments);
        self.publish(head)?;
        Ok(head)
    }

    /// Writes descriptor `index` as given, with no checks: for building malformed chains.
    pub fn write_descriptor(
        &self,
        index: u16,
        addr: GuestAddress,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let at = self.desc_table.unchecked_add(DESC_SIZE * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.0.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        write(&self.mem, at, &raw)
    }

    /// Puts `head` in the next available-ring slot and then publishes the new index with a
    /// release store, as a driver does. `head` need not be a valid descriptor.
    pub fn publish(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        write(
            &self.mem,
            self.avail_ring.unchecked_add(4 + 2 * slot),
            &head.to_le_bytes(),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx_addr = self.avail_ring.unchecked_add(2);
        self.mem
            .store(self.avail_idx.to_le(), idx_addr, Ordering::Release)
            .map_err(|source| DriverQueueError::Memory {
                addr: idx_addr.0,
                source,
            })
    }

    /// Sets the available ring's `used_event` field (only meaningful with EVENT_IDX).
    pub fn set_used_event(&self, value: u16) -> Result<()> {
        let at = self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size));
        write(&self.mem, at, &value.to_le_bytes())
    }

    /// Reads the used ring's `flags` field (`VRING_USED_F_NO_NOTIFY` is 1).
    pub fn used_flags(&self) -> Result<u16> {
        read_u16(&self.mem, self.used_ring)
    }

    /// Reads the used ring's `avail_event` field (only meaningful with EVENT_IDX).
    pub fn avail_event(&self) -> Result<u16> {
        read_u16(
            &self.mem,
            self.used_ring
                .unchecked_add(4 + USED_ELEM_SIZE * u64::from(self.size)),
        )
    }

    /// The next chain the device returned, if any, with the bytes it wrote. Its descriptors
    /// are free again afterwards.
    pub fn pop_used(&mut self) -> Result<Option<UsedChain>> {
        let idx_addr = self.used_ring.unchecked_add(2);
        let used_idx = self
            .mem
            .load::<u16>(idx_addr, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|source| DriverQueueError::Memory {
                addr: idx_addr.0,
                source,
            })?;
        if used_idx == self.used_idx {
            return Ok(None);
        }
        let slot = u64::from(self.used_idx % self.size);
        let elem = self.used_ring.unchecked_add(4 + USED_ELEM_SIZE * slot);
        let mut raw = [0u8; 8];
        read(&self.mem, elem, &mut raw)?;
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let head = u16::try_from(id).map_err(|_| DriverQueueError::UnknownUsedHead(id))?;
        let segments = self
            .outstanding
            .remove(&head)
            .ok_or(DriverQueueError::UnknownUsedHead(id))?;
        self.used_idx = self.used_idx.wrapping_add(1);
        self.free_descs
            .extend(segments.iter().rev().map(|s| s.desc));

        let writable = segments.iter().filter(|s| s.writable);
        let capacity: u64 = writable.clone().map(|s| u64::from(s.len)).sum();
        if u64::from(len) > capacity {
            return Err(DriverQueueError::UsedLengthTooLong {
                head,
                len,
                capacity,
            });
        }
        let mut written = vec![0u8; len as usize];
        let mut filled = 0;
        for segment in writable {
            let take = (segment.len as usize).min(written.len() - filled);
            read(&self.mem, segment.addr, &mut written[filled..filled + take])?;
            filled += take;
        }
        Ok(Some(UsedChain { head, len, written }))
    }

    fn alloc_buffer(&mut self, len: u64) -> Result<GuestAddress> {
        let addr = self.next_buffer;
        let end = addr
            .checked_add(len)
            .filter(|end| *end <= self.buffers_end)
            .ok_or(DriverQueueError::NoBufferSpace(len))?;
        self.next_buffer = GuestAddress(end.0.next_multiple_of(16));
        Ok(addr)
    }
}

/// Reads a 32-bit register.
pub fn read_reg<D: BusDevice + ?Sized>(transport: &mut D, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// Writes a 32-bit register.
pub fn write_reg<D: BusDevice + ?Sized>(transport: &mut D, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

/// Resets the device and negotiates `features` up to FEATURES_OK, like Linux's
/// `virtio_dev_probe`. Returns the status read back (FEATURES_OK is clear if refused).
pub fn negotiate<D: BusDevice + ?Sized>(transport: &mut D, features: u64) -> u32 {
    write_reg(transport, VIRTIO_MMIO_STATUS, 0);
    let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    write_reg(transport, VIRTIO_MMIO_STATUS, status);
    status |= VIRTIO_CONFIG_S_DRIVER;
    write_reg(transport, VIRTIO_MMIO_STATUS, status);
    for page in 0..2u32 {
        write_reg(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
        write_reg(
            transport,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * page)) as u32,
        );
    }
    write_reg(
        transport,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    read_reg(transport, VIRTIO_MMIO_STATUS)
}

/// Brings a device up as a driver would: `negotiate`, then each `(index, queue)` configured,
/// then DRIVER_OK. Returns the final status read back.
pub fn init_device<D: BusDevice + ?Sized>(
    transport: &mut D,
    features: u64,
    queues: &[(u32, &DriverQueue)],
) -> u32 {
    let status = negotiate(transport, features);
    for (index, queue) in queues {
        queue.configure(transport, *index);
    }
    write_reg(
        transport,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    read_reg(transport, VIRTIO_MMIO_STATUS)
}

fn write(mem: &GuestMemoryMmap, addr: GuestAddress, data: &[u8]) -> Result<()> {
    mem.write_slice(data, addr)
        .map_err(|source| DriverQueueError::Memory {
            addr: addr.0,
            source,
        })
}

fn read(mem: &GuestMemoryMmap, addr: GuestAddress, data: &mut [u8]) -> Result<()> {
    mem.read_slice(data, addr)
        .map_err(|source| DriverQueueError::Memory {
            addr: addr.0,
            source,
        })
}

fn read_u16(mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<u16> {
    let mut raw = [0u8; 2];
    read(mem, addr, &mut raw)?;
    Ok(u16::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn device_pops_what_the_driver_offers_and_driver_reads_the_reply() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
        let mut queue = driver.device_queue(256).unwrap();
        assert!(queue.is_valid(&mem));

        let head = driver
            .add_chain(&[
                Buffer::Readable(b"ping"),
                Buffer::Writable(3),
                Buffer::Writable(8),
            ])
            .unwrap();
        assert_eq!(head, 0);

        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(chain.head_index(), head);
        let descs: Vec<_> = chain.clone().collect();
        assert_eq!(descs.len(), 3);
        assert!(!descs[0].is_write_only());
        assert_eq!(descs[0].len(), 4);
        assert!(descs[1].is_write_only() && descs[2].is_write_only());

        let mut request = String::new();
        chain
            .clone()
            .reader(&mem)
            .unwrap()
            .read_to_string(&mut request)
            .unwrap();
        assert_eq!(request, "ping");
        let mut writer = chain.writer(&mem).unwrap();
        writer.write_all(b"pong!").unwrap();
        queue.add_used(&mem, head, 5).unwrap();
        assert!(queue.pop_descriptor_chain(&mem).is_none());

        let used = driver.pop_used().unwrap().unwrap();
        assert_eq!(
            used,
            UsedChain {
                head,
                len: 5,
                written: b"pong!".to_vec()
            }
        );
        assert_eq!(driver.pop_used().unwrap(), None);
        // The chain's descriptors are free again; the next chain reuses them.
        assert_eq!(driver.add_chain(&[Buffer::Writable(1)]).unwrap(), 0);
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let mem = memory();
        assert!(matches!(
            DriverQueue::new(&mem, GuestAddress(0), 3),
            Err(DriverQueueError::InvalidSize(3))
        ));
        assert!(matches!(
            DriverQueue::new(&mem, GuestAddress(0xf_ff00), 256),
            Err(DriverQueueError::NoRoom(_))
        ));
        let mut driver = DriverQueue::new(&mem, GuestAddress(0), 2).unwrap();
        assert!(matches!(
            driver.add_chain(&[Buffer::Writable(1); 3]),
            Err(DriverQueueError::NoDescriptors { needed: 3, free: 2 })
        ));
        assert!(matches!(
            driver.add_chain(&[Buffer::Writable(0x20_0000)]),
            Err(DriverQueueError::NoBufferSpace(_))
        ));
        assert!(matches!(
            driver.add_chain(&[]),
            Err(DriverQueueError::EmptyChain)
        ));
    }

    #[test]
    fn a_used_head_the_driver_never_offered_is_reported() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, GuestAddress(0), 4).unwrap();
        let mut queue = driver.device_queue(4).unwrap();
        queue.add_used(&mem, 3, 0).unwrap();
        assert!(matches!(
            driver.pop_used(),
            Err(DriverQueueError::UnknownUsedHead(3))
        ));
    }
}
