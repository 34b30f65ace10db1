//! virtio-vsock: a userspace vsock device with a hybrid Unix-socket backend (no vhost).
//!
//! The guest sees an ordinary virtio-vsock device (CID `guest_cid`, stream sockets only); the
//! host sees Unix sockets, the way Firecracker's hybrid vsock works:
//! - host → guest: a host client connects to the listening socket `uds_path` and writes
//!   `CONNECT <port>\n`; the device opens a connection to guest port `<port>` and, once the guest
//!   accepts, answers `OK <local_port>\n` and relays bytes both ways. If the guest refuses, the
//!   client's socket is closed.
//! - guest → host: a guest connection to CID 2 port `P` becomes a connection to the Unix socket
//!   `<uds_path>_<P>`; if nobody listens there, the guest gets a reset.
//!
//! Layout: [`packet`] parses and builds the 44-byte `virtio_vsock_hdr`; [`connection`] holds one
//! stream's state machine, credit accounting and bounded buffers; [`unix`] the host socket
//! plumbing; [`muxer`] the table of connections and the order in which packets go to the guest;
//! [`device`] is the `VirtioDevice`; [`event_handler`] plugs it into the VMM's event loop;
//! [`fd_watch`] records what the device, the muxer and the event handler want epoll to watch
//! (each of them imports it, it imports none of them).
//!
//! # Wiring (for the VMM)
//! `Vsock::new(guest_cid, uds_path)` binds the listening socket. Put the same
//! `Arc<Mutex<Vsock>>` on the bus (`attach_virtio`, as `Arc<Mutex<dyn VirtioDevice>>`) and into
//! the VMM thread's event manager (`add_subscriber`, as a `MutEventSubscriber`) at build time.
//! `init` watches the device's wake eventfd and the listening socket; the transport's
//! `activate` (on a vCPU thread) hands over the queues and signals the wake eventfd, and the
//! device registers its queue eventfds and connection sockets itself from `process`.
//!
//! Everything the guest writes is untrusted: packets that make no sense are dropped (and the
//! connection they name reset) with a rate-limited log; a queue the device cannot use any more
//! marks the device as needing a reset. Buffering is bounded per connection (our advertised
//! `buf_alloc` one way, one packet's worth the other) and the number of connections is capped.

mod connection;
mod device;
mod event_handler;
mod fd_watch;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
mod muxer;
mod packet;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;
mod unix;

use std::io;
use std::path::PathBuf;

pub use device::Vsock;
pub use packet::{VsockHeader, VSOCK_HDR_SIZE};

/// The host's CID (`VMADDR_CID_HOST`).
pub const VSOCK_HOST_CID: u64 = 2;
/// The guest CID used unless the configuration says otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Queue indices (virtio spec 5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Maximum size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

// Socket types, operations and shutdown flags (linux/virtio_vsock.h).
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;
pub const VIRTIO_VSOCK_TYPE_SEQPACKET: u16 = 2;
pub const VIRTIO_VSOCK_OP_INVALID: u16 = 0;
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;
/// The sender will receive no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_SEND: u32 = 2;
/// Feature bit (not offered): SOCK_SEQPACKET support.
pub const VIRTIO_VSOCK_F_SEQPACKET: u32 = 1;

/// The largest payload of one packet, either way (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` in Linux).
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;
/// The receive buffer each connection advertises to the guest (`buf_alloc`): the most
/// guest → host data the device holds for a host socket that does not read.
pub const CONN_BUF_SIZE: u32 = 64 * 1024;
/// The most host → guest data the device reads ahead of the guest, per connection.
pub const CONN_TO_GUEST_BUF_SIZE: usize = MAX_PKT_BUF_SIZE as usize;
/// The most connections (guest- and host-initiated) at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;
/// The most host clients that have connected but not yet sent their `CONNECT` line.
pub const MAX_PENDING_HOST_CONNECTIONS: usize = 64;
/// The most resets for no connection waiting for room in the rx queue; more are dropped.
pub const MAX_PENDING_RESETS: usize = 128;
/// How long a host-initiated connection waits for the guest's answer before the host client
/// is closed.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// First local port handed out for host-initiated connections (as in Firecracker, above the
/// range guest services usually listen on).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Errors while setting up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is one of the reserved ones (0, 1, 2, `u32::MAX`) or does not fit 32 bits.
    #[error("invalid guest CID {0}: must be in 3..=4294967294")]
    InvalidCid(u64),
    /// The listening socket could not be created.
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create the vsock wake eventfd")]
    EventFd(#[source] io::Error),
    /// The connect timer could not be created.
    #[error("cannot create the vsock connect timer")]
    Timer(#[source] io::Error),
}
