//! virtio-net with a TAP backend (no vhost), as Firecracker's: one receive and one transmit
//! queue, no control queue.
//!
//! The guest sees a virtio-net device with the MAC and MTU given at creation (the interface it
//! mirrors) and a link that is up. Offloads pass through untouched: a frame carries its
//! `virtio_net_hdr_v1` ([`VNET_HDR_LEN`] bytes) from the guest to the TAP and from the TAP to
//! the guest. The device offers checksum offload and TSO both ways (`CSUM`, `HOST_TSO4/6`;
//! `GUEST_CSUM`, `GUEST_TSO4/6`) and mergeable receive buffers, and tells the TAP
//! (`TUNSETOFFLOAD`) what the driver accepted.
//!
//! Everything the guest writes is untrusted. A transmitted frame is checked before it reaches
//! the host kernel: its length (a header and an Ethernet header at least, [`MAX_FRAME_LEN`] at
//! most), its header (only the offloads that were negotiated, a checksum position inside the
//! frame, a segment size for a segmentation offload). A frame that fails is dropped with a
//! rate-limited log. A queue the device cannot use any more (a ring outside guest memory, a
//! used entry it cannot write) marks the device as needing a reset. Nothing the guest does
//! panics the device.
//!
//! Layout: [`tap`] opens and drives the TAP; [`device`] is the `VirtioDevice` and the queue
//! work; [`event_handler`] plugs it into the VMM's event loop (the wake eventfd, the two queue
//! eventfds, the TAP's descriptor, edge-triggered).

mod device;
mod event_handler;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
mod slot;
pub mod tap;
#[cfg(test)]
mod tests;

pub use device::{Net, NetStats};
pub use slot::{NetSlot, SlotError};
pub use tap::{FrameIo, Tap, TapError};

/// Queue indices (virtio spec 5.1.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// The largest frame either way, header included: a 64 KiB segment behind its headers
/// (Firecracker's bound).
pub const MAX_FRAME_LEN: usize = 65562;
/// The smallest MTU virtio-net allows (5.1.4.1).
pub const MIN_MTU: u16 = 68;

// Feature bits (linux/virtio_net.h).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
pub const VIRTIO_NET_F_MTU: u32 = 3;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
pub const VIRTIO_NET_F_STATUS: u32 = 16;

// Header fields.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_S_LINK_UP`.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("MAC {0} is multicast or all zeros: a guest NIC cannot take it")]
    InvalidMac(String),
    #[error("MTU {0} is below virtio-net's minimum of {MIN_MTU}")]
    InvalidMtu(u16),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

pub use hull_protocol::format_mac;
