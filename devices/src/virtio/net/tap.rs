//! A TAP device opened with a virtio-net header on every frame (`IFF_VNET_HDR`, header size
//! [`VNET_HDR_LEN`]), non-blocking, so that checksum and segmentation offloads pass between the
//! guest and the host kernel untouched.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::VNET_HDR_LEN;

// linux/if_tun.h: _IOW('T', 202, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `TUNSETOFFLOAD` flags: what the reader of the TAP (the guest, through the device) accepts.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Errors opening or setting up a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    InvalidName(String),
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("cannot create TAP {name} (TUNSETIFF)")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: {what} failed")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Where the device's frames go and come from, each behind a [`VNET_HDR_LEN`]-byte virtio-net
/// header: a [`Tap`] in the VMM; a socket pair in the fuzz harness. Non-blocking: `WouldBlock`
/// when there is nothing to read or no room to write.
pub trait FrameIo: AsRawFd + Send {
    /// Reads one frame (header first) into `buf`.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame from `parts` (header first).
    fn write_frame(&self, parts: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Which offloads the reader accepts (`TUN_F_*`).
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// A name for logs.
    fn name(&self) -> &str;
}

/// An open TAP: frames in and out, each behind a [`VNET_HDR_LEN`]-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::InvalidName(name.to_owned()));
    }
    // SAFETY: an all-zero `ifreq` is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

impl Tap {
    /// Opens (creating it if it does not exist) the TAP `name` of the calling thread's network
    /// namespace, with virtio-net headers and no offloads until [`Tap::set_offload`].
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: a NUL-terminated literal path; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads and writes only `req`, which outlives the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Create {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            fd,
            name: name.to_owned(),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from `size`, which outlives the call.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the host kernel which offloads the reader accepts (`TUN_F_*`): with `TUN_F_CSUM`
    /// frames may come with partial checksums, with `TUN_F_TSO4`/`6` as large TCP segments.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when there is none.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut slices = [IoSliceMut::new(buf)];
        nix::sys::uio::readv(&self.fd, &mut slices).map_err(io::Error::from)
    }

    /// Writes one frame from `parts` (header first); `WouldBlock` when the TAP's queue is full.
    pub fn write_frame(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        nix::sys::uio::writev(&self.fd, parts).map_err(io::Error::from)
    }
}

impl FrameIo for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }

    fn write_frame(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        Tap::write_frame(self, parts)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }

    fn name(&self) -> &str {
        Tap::name(self)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
