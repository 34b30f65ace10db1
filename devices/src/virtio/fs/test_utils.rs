//! A guest's side of virtio-fs for tests: queues, hand-built FUSE requests, parsed replies.
//!
//! [`FuseGuest`] activates an [`Fs`] on two driver-side queues (the real worker thread serves
//! them), sends FUSE requests the way the Linux driver lays them out (request in readable
//! buffers, reply room in a writable one), notifies, and waits on the interrupt eventfd with a
//! deadline for the used chain. The per-opcode helpers return the reply body or the errno.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    Attr, AttrOut, CreateIn, Dirent, EntryOut, ForgetIn, GetattrIn, InHeader, InitIn, LinkIn,
    MkdirIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, WriteIn,
    WriteOut,
};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Fs, FsConfig, HIPRIO_QUEUE, QUEUE_SIZE, REQUEST_QUEUE};
use crate::spawn::StdSpawner;
use crate::virtio::test_utils::{Buffer, DriverQueue, UsedChain};
use crate::virtio::{ActiveQueue, IrqTrigger, VirtioDevice};

const DEADLINE: Duration = Duration::from_secs(10);
const REQUESTS_BASE: u64 = 0x40_0000;

/// Guest memory for a test: one region per queue, so their buffer areas do not overlap.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REQUESTS_BASE as usize),
        (GuestAddress(REQUESTS_BASE), 0x80_0000),
    ])
    .expect("test guest memory")
}

pub use crate::virtio::fuzz_utils::TempDir;

/// A host directory with a secret beside the share: `base/secret` and `base/share/`.
pub struct Sandbox {
    base: TempDir,
}

/// What the host keeps outside the share, which the guest must never read.
pub const SECRET: &[u8] = b"host secret, not for guests\n";

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// Creates `base/secret` and an empty `base/share/`.
    pub fn new() -> Self {
        let base = TempDir::new("hull-devices-test");
        std::fs::write(base.path().join("secret"), SECRET).expect("write the secret");
        std::fs::create_dir(base.path().join("share")).expect("create the share");
        Self { base }
    }

    /// The shared directory.
    pub fn share(&self) -> PathBuf {
        self.base.path().join("share")
    }

    /// The file outside the share.
    pub fn secret(&self) -> PathBuf {
        self.base.path().join("secret")
    }

    /// A device configuration for the share.
    pub fn config(&self, read_only: bool) -> FsConfig {
        FsConfig {
            shared_dir: self.share(),
            tag: "rootfs".into(),
            read_only,
        }
    }
}

/// The driver's side of an active virtio-fs device.
pub struct FuseGuest {
    device: Option<Fs>,
    /// The high-priority queue (FORGET).
    pub hiprio: DriverQueue,
    /// The request queue.
    pub requests: DriverQueue,
    notify: Vec<EventFd>,
    interrupt: Arc<IrqTrigger>,
    epoll: Epoll,
    unique: u64,
}

impl FuseGuest {
    /// Activates `device` on fresh queues in `mem`.
    pub fn start(mut device: Fs, mem: GuestMemoryMmap) -> Self {
        let hiprio = DriverQueue::new(&mem, GuestAddress(0), 64).expect("hiprio queue");
        let requests =
            DriverQueue::new(&mem, GuestAddress(REQUESTS_BASE), 64).expect("request queue");
        let notify: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("notify eventfd"))
            .collect();
        let queues = [(HIPRIO_QUEUE, &hiprio), (REQUEST_QUEUE, &requests)]
            .into_iter()
            .map(|(index, driver)| ActiveQueue {
                index,
                queue: driver.device_queue(QUEUE_SIZE).expect("device queue"),
                notify: notify[index].try_clone().expect("clone notify eventfd"),
            })
            .collect();
        let interrupt = Arc::new(IrqTrigger::new().expect("irq"));
        device
            .activate(mem, interrupt.clone(), queues)
            .expect("activate the device");
        let epoll = Epoll::new().expect("epoll");
        epoll
            .ctl(
                ControlOperation::Add,
                interrupt.irq_evt().as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .expect("watch the irq eventfd");
        Self {
            device: Some(device),
            hiprio,
            requests,
            notify,
            interrupt,
            epoll,
            unique: 0,
        }
    }

    /// Creates a device for `config` and activates it in fresh guest memory.
    pub fn start_dir(config: &FsConfig) -> Self {
        Self::start(
            Fs::new(config, Arc::new(StdSpawner)).expect("create the device"),
            guest_memory(),
        )
    }

    /// Gives the device back (still active).
    pub fn into_device(mut self) -> Fs {
        self.device.take().expect("the device is present")
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &IrqTrigger {
        &self.interrupt
    }

    /// Notifies the request queue.
    pub fn notify_requests(&self) {
        self.notify[REQUEST_QUEUE].write(1).expect("notify");
    }

    /// Notifies the request queue and waits for the next used chain on it.
    pub fn kick_and_wait(&mut self) -> UsedChain {
        self.notify_requests();
        wait_used(&mut self.requests, &self.epoll, &self.interrupt)
    }

    /// Offers `buffers` as one chain on the request queue and waits for it to come back.
    pub fn send(&mut self, buffers: &[Buffer<'_>]) -> UsedChain {
        self.requests.add_chain(buffers).expect("add a chain");
        self.kick_and_wait()
    }

    /// Offers `buffers` on the high-priority queue and waits for them to come back.
    pub fn send_hiprio(&mut self, buffers: &[Buffer<'_>]) -> UsedChain {
        self.hiprio.add_chain(buffers).expect("add a chain");
        self.notify[HIPRIO_QUEUE].write(1).expect("notify");
        wait_used(&mut self.hiprio, &self.epoll, &self.interrupt)
    }

    /// Waits until the device asks for a reset.
    pub fn wait_needs_reset(&self) {
        let start = Instant::now();
        while !self.interrupt.needs_reset() {
            assert!(
                start.elapsed() < DEADLINE,
                "the device never asked for a reset"
            );
            let mut events = [EpollEvent::default()];
            let _ = self.epoll.wait(100, &mut events);
            let _ = self.interrupt.irq_evt().read();
        }
    }

    /// Sends one FUSE request; returns the reply body or the errno.
    pub fn call(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        parts: &[&[u8]],
        reply_room: u32,
    ) -> Result<Vec<u8>, i32> {
        self.unique += 1;
        let body_len: usize = parts.iter().map(|part| part.len()).sum();
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body_len) as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut request = header.as_slice().to_vec();
        for part in parts {
            request.extend_from_slice(part);
        }
        let used = self.send(&[
            Buffer::Readable(&request),
            Buffer::Writable(reply_room + 16),
        ]);
        assert!(
            used.written.len() >= 16,
            "short reply to {opcode:?}: {used:?}"
        );
        let out = *OutHeader::from_slice(&used.written[..16]).expect("out header");
        assert_eq!(out.unique, self.unique, "reply to another request");
        assert_eq!(
            out.len, used.len,
            "reply length disagrees with the used length"
        );
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(used.written[16..].to_vec())
    }

    /// FUSE_INIT, as Linux 7.31 would.
    pub fn init(&mut self) {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: 0,
        };
        self.call(Opcode::Init, 0, &[init.as_slice()], 256)
            .expect("INIT succeeds");
    }

    /// LOOKUP.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        self.call(Opcode::Lookup, parent, &[&cstr(name)], 256)
            .map(|reply| obj(&reply))
    }

    /// FORGET on the high-priority queue (no reply).
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) {
        self.unique += 1;
        let header = InHeader {
            len: 48,
            opcode: Opcode::Forget as u32,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(ForgetIn { nlookup }.as_slice());
        let used = self.send_hiprio(&[Buffer::Readable(&request)]);
        assert_eq!(used.len, 0);
    }

    /// GETATTR.
    pub fn getattr(&mut self, nodeid: u64) -> Result<Attr, i32> {
        let body = GetattrIn::default();
        self.call(Opcode::Getattr, nodeid, &[body.as_slice()], 256)
            .map(|reply| obj::<AttrOut>(&reply).attr)
    }

    /// SETATTR of the size (truncate).
    pub fn truncate(&mut self, nodeid: u64, size: u64) -> Result<Attr, i32> {
        let body = SetattrIn {
            valid: 1 << 3, // FATTR_SIZE
            size,
            ..Default::default()
        };
        self.call(Opcode::Setattr, nodeid, &[body.as_slice()], 256)
            .map(|reply| obj::<AttrOut>(&reply).attr)
    }

    /// OPEN with `flags`; returns the file handle.
    pub fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, i32> {
        self.open_op(Opcode::Open, nodeid, flags)
    }

    /// OPENDIR; returns the directory handle.
    pub fn opendir(&mut self, nodeid: u64) -> Result<u64, i32> {
        self.open_op(Opcode::Opendir, nodeid, libc::O_RDONLY)
    }

    /// OPEN; returns the handle and the open flags (`FOPEN_*`).
    pub fn open_with_flags(&mut self, nodeid: u64, flags: i32) -> Result<(u64, u32), i32> {
        self.open_out(Opcode::Open, nodeid, flags)
            .map(|out| (out.fh, out.open_flags))
    }

    fn open_op(&mut self, opcode: Opcode, nodeid: u64, flags: i32) -> Result<u64, i32> {
        self.open_out(opcode, nodeid, flags).map(|out| out.fh)
    }

    fn open_out(&mut self, opcode: Opcode, nodeid: u64, flags: i32) -> Result<OpenOut, i32> {
        let body = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(opcode, nodeid, &[body.as_slice()], 64)
            .map(|reply| obj::<OpenOut>(&reply))
    }

    /// RELEASE.
    pub fn release(&mut self, nodeid: u64, fh: u64) -> Result<(), i32> {
        let body = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Release, nodeid, &[body.as_slice()], 0)
            .map(drop)
    }

    /// READ of `size` bytes at `offset`.
    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let body = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        self.call(Opcode::Read, nodeid, &[body.as_slice()], size)
    }

    /// WRITE of `data` at `offset`; returns the count written.
    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let body = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        self.call(Opcode::Write, nodeid, &[body.as_slice(), data], 64)
            .map(|reply| obj::<WriteOut>(&reply).size)
    }

    /// CREATE; returns the new entry and its file handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(EntryOut, u64), i32> {
        let body = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        self.call(Opcode::Create, parent, &[body.as_slice(), &cstr(name)], 512)
            .map(|reply| {
                let entry: EntryOut = obj(&reply);
                let open: OpenOut = obj(&reply[std::mem::size_of::<EntryOut>()..]);
                (entry, open.fh)
            })
    }

    /// MKDIR.
    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let body = MkdirIn { mode, umask: 0 };
        self.call(Opcode::Mkdir, parent, &[body.as_slice(), &cstr(name)], 256)
            .map(|reply| obj(&reply))
    }

    /// UNLINK.
    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Unlink, parent, &[&cstr(name)], 0)
            .map(drop)
    }

    /// RENAME.
    pub fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> Result<(), i32> {
        let body = RenameIn { newdir };
        self.call(
            Opcode::Rename,
            olddir,
            &[body.as_slice(), &cstr(old), &cstr(new)],
            0,
        )
        .map(drop)
    }

    /// READLINK.
    pub fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        self.call(Opcode::Readlink, nodeid, &[], 4096)
    }

    /// SYMLINK `name` -> `target` in `parent`.
    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, i32> {
        self.call(Opcode::Symlink, parent, &[&cstr(name), &cstr(target)], 256)
            .map(|reply| obj(&reply))
    }

    /// LINK: a new name `newname` in `newparent` for `nodeid`.
    pub fn link(&mut self, nodeid: u64, newparent: u64, newname: &str) -> Result<EntryOut, i32> {
        let body = LinkIn { oldnodeid: nodeid };
        self.call(
            Opcode::Link,
            newparent,
            &[body.as_slice(), &cstr(newname)],
            256,
        )
        .map(|reply| obj(&reply))
    }

    /// READDIR of a whole (small) directory; returns the names.
    pub fn readdir(&mut self, nodeid: u64, fh: u64) -> Result<Vec<String>, i32> {
        let reply = self.read_dir_op(Opcode::Readdir, nodeid, fh)?;
        Ok(parse_dirents(&reply, 0)
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// READDIRPLUS of a whole (small) directory; returns names and node ids.
    pub fn readdirplus(&mut self, nodeid: u64, fh: u64) -> Result<Vec<(String, u64)>, i32> {
        let reply = self.read_dir_op(Opcode::Readdirplus, nodeid, fh)?;
        Ok(parse_dirents(&reply, std::mem::size_of::<EntryOut>()))
    }

    fn read_dir_op(&mut self, opcode: Opcode, nodeid: u64, fh: u64) -> Result<Vec<u8>, i32> {
        let body = ReadIn {
            fh,
            size: 8192,
            ..Default::default()
        };
        self.call(opcode, nodeid, &[body.as_slice()], 8192)
    }
}

impl Drop for FuseGuest {
    fn drop(&mut self) {
        // Stop the worker before the queues' memory goes away.
        drop(self.device.take());
    }
}

fn wait_used(queue: &mut DriverQueue, epoll: &Epoll, interrupt: &IrqTrigger) -> UsedChain {
    let start = Instant::now();
    loop {
        if let Some(used) = queue.pop_used().expect("a sane used ring") {
            return used;
        }
        assert!(start.elapsed() < DEADLINE, "no reply from the device");
        let mut events = [EpollEvent::default()];
        let _ = epoll.wait(100, &mut events);
        let _ = interrupt.irq_evt().read();
    }
}

/// `name` with its NUL terminator.
pub fn cstr(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Reads a `T` from the start of `bytes` (which must be long enough).
pub fn obj<T: ByteValued>(bytes: &[u8]) -> T {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len() >= size,
        "reply of {} bytes, wanted {size}",
        bytes.len()
    );
    *T::from_slice(&bytes[..size]).expect("a plain reply struct")
}

/// Parses `struct fuse_dirent` records, each after `entry_len` bytes of `fuse_entry_out`.
fn parse_dirents(mut bytes: &[u8], entry_len: usize) -> Vec<(String, u64)> {
    let mut entries = Vec::new();
    let dirent_len = std::mem::size_of::<Dirent>();
    while bytes.len() >= entry_len + dirent_len {
        let nodeid = if entry_len > 0 {
            obj::<EntryOut>(bytes).nodeid
        } else {
            0
        };
        let dirent: Dirent = obj(&bytes[entry_len..]);
        let name_start = entry_len + dirent_len;
        let name_end = name_start + dirent.namelen as usize;
        let name = String::from_utf8_lossy(&bytes[name_start..name_end]).into_owned();
        entries.push((name, nodeid));
        let record = (name_end + 7) & !7;
        bytes = &bytes[record.min(bytes.len())..];
    }
    entries
}
