//! A byte-driven harness for the virtio-fs request path: the fuzz target `virtio_fs` in
//! `fuzz/` and the seeded random-input test below both run [`run`].
//!
//! A small tree is laid out in a temporary directory:
//!
//! ```text
//! base/secret            what the guest must never read
//! base/outside/inner     nor list, nor change
//! base/share/            the shared directory: a, d/b, a FIFO, and symlinks
//!                        l -> ../secret, abs -> base/secret, up -> ../outside
//! ```
//!
//! The input is a list of FUSE requests (any opcode, node id, handle, names, lengths and body
//! fields, with node ids and handles the server handed out preferred) that go through guest
//! queues into [`FsHandler`] (so `Server`, [`ConfinedFs`] and `PassthroughFs` as the device
//! runs them), laid out over any descriptors, plus the odd runaway available index (followed by
//! a reset). A read-only share is fuzzed too.
//!
//! Checked: no panic anywhere (the handler would catch one and ask for a reset, which counts as
//! a failure here); every reply has the request's `unique`, a length equal to the used length
//! and within the buffers, and an errno (if any) in range; afterwards nothing outside the share
//! was created, removed, changed, opened or read (a snapshot of `base` without `share`, and an
//! inotify watch on `base` and `base/outside`), and a read-only share is unchanged.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::mem::size_of;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, CreateIn, EntryOut, FallocateIn, FlushIn, ForgetIn, ForgetOne,
    FsyncIn, GetattrIn, InHeader, InitIn, InterruptIn, LinkIn, LseekIn, MkdirIn, MknodIn, Opcode,
    OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, WriteIn,
    ROOT_ID,
};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::stat::Mode;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::confine::ConfinedFs;
use super::event_handler::FsHandler;
use super::{HIPRIO_QUEUE, QUEUE_SIZE, REQUEST_QUEUE};
use crate::virtio::fuzz_utils::{warning_budget, warnings_logged, Input, TempDir};
use crate::virtio::test_utils::{Buffer, DriverQueue, DriverQueueError, UsedChain};
use crate::virtio::{ActiveQueue, IrqTrigger};

/// What `base/secret` holds.
pub const SECRET: &[u8] = b"host secret, not for guests\n";
const HIPRIO_BASE: GuestAddress = GuestAddress(0);
const HIPRIO_SIZE: usize = 1 << 20;
const REQUESTS_BASE: GuestAddress = GuestAddress(HIPRIO_SIZE as u64);
const REQUESTS_SIZE: usize = 48 << 20;
const DRIVER_QUEUE_SIZE: u16 = 64;
const MAX_STEPS: usize = 300;
/// Keeps what a request may make the host allocate on disk small (resource use is out of the
/// threat model; the fuzzing machine's disk is not).
const MAX_FALLOCATE: u64 = 1 << 20;

const NAMES: &[&[u8]] = &[
    b"a",
    b"d",
    b"b",
    b"l",
    b"abs",
    b"up",
    b"fifo",
    b"new",
    b"x",
    b".",
    b"..",
    b"",
    b"a/b",
    b"../secret",
    b"/",
    b"secret",
    b"outside",
    b"\xff\xfe",
];

/// Runs one fuzz input against a fresh tree and server.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let read_only = flags & 1 != 0;
    let tree = Tree::new();
    let outside_before = tree.outside_snapshot();
    let share_before = tree.share_snapshot();
    let fs = Arc::new(ConfinedFs::new(&tree.share(), read_only).expect("confined fs"));
    let watch = tree.watch();
    let before = warnings_logged();
    let mut harness = Harness::new(fs.clone());
    if flags & 2 == 0 {
        harness.init();
    }
    for _ in 0..MAX_STEPS {
        if input.is_empty() || harness.lost_track {
            break;
        }
        harness.step(&mut input);
    }
    drop(harness);
    fs.destroy();
    drop(fs);

    let logged = warnings_logged() - before;
    // The handler's limiter, twice per reset.
    let budget = warning_budget(1 + 2 * harness_resets(data));
    assert!(
        logged <= budget,
        "the device logged {logged} warnings for one input"
    );
    let touched = tree.touched_outside(watch);
    assert!(
        touched.is_empty(),
        "the guest reached outside the share: {touched:?}"
    );
    assert_eq!(
        tree.outside_snapshot(),
        outside_before,
        "the guest changed something outside the share"
    );
    if read_only {
        assert_eq!(
            tree.share_snapshot(),
            share_before,
            "the guest changed a read-only share"
        );
    }
}

/// An upper bound of the resets an input can ask for (each makes a new handler and limiter).
fn harness_resets(data: &[u8]) -> u64 {
    data.len() as u64 / 4 + 1
}

/// The directory tree of one run.
struct Tree {
    base: TempDir,
}

/// What a path looked like: type and mode, size, links, owner, times, and content.
type Snapshot = BTreeMap<PathBuf, (u32, u64, u64, u32, u32, i64, i64, i64, i64, Vec<u8>)>;

impl Tree {
    fn new() -> Self {
        let base = TempDir::in_memory("hull-fs-fuzz");
        let b = base.path();
        std::fs::write(b.join("secret"), SECRET).expect("secret");
        std::fs::create_dir(b.join("outside")).expect("outside");
        std::fs::write(b.join("outside/inner"), b"inner").expect("inner");
        let share = b.join("share");
        std::fs::create_dir_all(share.join("d")).expect("share");
        std::fs::write(share.join("a"), b"hello from a\n").expect("a");
        std::fs::write(share.join("d/b"), vec![7u8; 10_000]).expect("b");
        symlink("../secret", share.join("l")).expect("l");
        symlink(b.join("secret"), share.join("abs")).expect("abs");
        symlink("../outside", share.join("up")).expect("up");
        nix::unistd::mkfifo(&share.join("fifo"), Mode::from_bits_truncate(0o644)).expect("fifo");
        Self { base }
    }

    fn share(&self) -> PathBuf {
        self.base.path().join("share")
    }

    /// Watches `base` (for its entries) and `base/outside` for anything at all.
    fn watch(&self) -> Inotify {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
        for dir in [
            self.base.path().to_path_buf(),
            self.base.path().join("outside"),
        ] {
            inotify
                .add_watch(&dir, AddWatchFlags::IN_ALL_EVENTS)
                .expect("inotify watch");
        }
        inotify
    }

    /// Every inotify event but those on `share` itself (the server opens and reads the root).
    fn touched_outside(&self, inotify: Inotify) -> Vec<String> {
        let mut touched = Vec::new();
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Too much happened to tell; the snapshots still check changes.
                    continue;
                }
                if event.name.as_deref() == Some(OsStr::new("share"))
                    && !event.mask.intersects(
                        AddWatchFlags::IN_DELETE
                            | AddWatchFlags::IN_MOVED_FROM
                            | AddWatchFlags::IN_MOVED_TO,
                    )
                {
                    continue;
                }
                touched.push(format!("{:?} {:?}", event.mask, event.name));
            }
        }
        touched
    }

    fn outside_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::new();
        snap(self.base.path(), Path::new(""), true, &mut snapshot);
        snapshot
    }

    fn share_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::new();
        snap(&self.share(), Path::new(""), false, &mut snapshot);
        snapshot
    }
}

/// Records `root/rel` and everything under it (but not `share` if `skip_share`).
fn snap(root: &Path, rel: &Path, skip_share: bool, into: &mut Snapshot) {
    let path = root.join(rel);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return;
    };
    let content = if meta.is_file() {
        std::fs::read(&path).unwrap_or_default()
    } else if meta.file_type().is_symlink() {
        std::fs::read_link(&path)
            .map(|target| target.into_os_string().into_encoded_bytes())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    // A directory's times change when the harness lists it (atime); leave atime out.
    into.insert(
        rel.to_path_buf(),
        (
            meta.mode(),
            if meta.is_dir() { 0 } else { meta.len() },
            meta.nlink(),
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            content,
        ),
    );
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if skip_share && rel.as_os_str().is_empty() && name == "share" {
                continue;
            }
            snap(root, &rel.join(name), skip_share, into);
        }
    }
}

/// The guest's queues and the handler serving them, on this thread.
struct Harness {
    fs: Arc<ConfinedFs>,
    mem: GuestMemoryMmap,
    hiprio: DriverQueue,
    requests: DriverQueue,
    handler: FsHandler,
    interrupt: Arc<IrqTrigger>,
    unique: u64,
    nodes: Vec<u64>,
    handles: Vec<u64>,
    /// The guest wrote descriptors behind the driver's back.
    malformed: bool,
    lost_track: bool,
}

impl Harness {
    fn new(fs: Arc<ConfinedFs>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (HIPRIO_BASE, HIPRIO_SIZE),
            (REQUESTS_BASE, REQUESTS_SIZE),
        ])
        .expect("guest memory");
        let interrupt = Arc::new(IrqTrigger::new().expect("irq"));
        let (hiprio, requests, handler) = Self::queues(&fs, &mem, &interrupt);
        Self {
            fs,
            mem,
            hiprio,
            requests,
            handler,
            interrupt,
            unique: 0,
            nodes: vec![ROOT_ID],
            handles: Vec::new(),
            malformed: false,
            lost_track: false,
        }
    }

    fn queues(
        fs: &Arc<ConfinedFs>,
        mem: &GuestMemoryMmap,
        interrupt: &Arc<IrqTrigger>,
    ) -> (DriverQueue, DriverQueue, FsHandler) {
        let hiprio = DriverQueue::new(mem, HIPRIO_BASE, DRIVER_QUEUE_SIZE).expect("hiprio");
        let requests = DriverQueue::new(mem, REQUESTS_BASE, DRIVER_QUEUE_SIZE).expect("requests");
        let queues = [(HIPRIO_QUEUE, &hiprio), (REQUEST_QUEUE, &requests)]
            .into_iter()
            .map(|(index, driver)| ActiveQueue {
                index,
                queue: driver.device_queue(QUEUE_SIZE).expect("device queue"),
                notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            })
            .collect();
        let server = Arc::new(Server::new(fs.clone()));
        let stop = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let handler = FsHandler::new(mem.clone(), queues, interrupt.clone(), server, stop);
        (hiprio, requests, handler)
    }

    /// A driver reset: the file system forgets the session, the queues start afresh.
    fn reset(&mut self) {
        self.fs.destroy();
        let (hiprio, requests, handler) = Self::queues(&self.fs, &self.mem, &self.interrupt);
        self.hiprio = hiprio;
        self.requests = requests;
        self.handler = handler;
        self.nodes = vec![ROOT_ID];
        self.handles.clear();
        self.malformed = false;
        self.init();
    }

    fn init(&mut self) {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: 0,
        };
        let mut request = header(Opcode::Init as u32, ROOT_ID, 1, init.as_slice().len());
        request.extend_from_slice(init.as_slice());
        self.send(false, &[Buffer::Readable(&request), Buffer::Writable(256)]);
    }

    fn node(&self, input: &mut Input<'_>) -> u64 {
        match input.u8() % 16 {
            0 => input.u64(),
            1 => input.pick(&[0, 2, 3, u64::MAX, 1 << 32]),
            _ => input.pick(&self.nodes),
        }
    }

    fn handle(&self, input: &mut Input<'_>) -> u64 {
        match input.u8() % 8 {
            0 => input.u64(),
            1 => input.pick(&[0, 1, u64::MAX]),
            _ if self.handles.is_empty() => 0,
            _ => input.pick(&self.handles),
        }
    }

    fn offset(input: &mut Input<'_>) -> u64 {
        match input.u8() % 8 {
            0 => input.u64(),
            1 => u64::from(input.u32()),
            _ => u64::from(input.u16()),
        }
    }

    fn size(input: &mut Input<'_>) -> u32 {
        match input.u8() % 8 {
            0 => input.u32(),
            1 => input.pick(&[0, 1 << 20, (1 << 20) + 1, u32::MAX]),
            _ => u32::from(input.u16() % 8192),
        }
    }

    fn name(input: &mut Input<'_>) -> Vec<u8> {
        let mut name = match input.u8() % 16 {
            0 => input.bytes(40).to_vec(),
            1 => vec![b'n'; 255 + input.below(8)],
            _ => input.pick(NAMES).to_vec(),
        };
        match input.u8() % 16 {
            // No terminator.
            0 => {}
            // An embedded one.
            1 => name.extend_from_slice(b"\0tail\0"),
            _ => name.push(0),
        }
        name
    }

    fn step(&mut self, input: &mut Input<'_>) {
        let choice = input.u8();
        if choice == 0xff && input.bool() {
            return self.runaway_index(input);
        }
        let op = input.pick(OPCODES);
        let opcode = match op {
            Some(opcode) => opcode as u32,
            None => input.u32(),
        };
        let nodeid = self.node(input);
        let body = self.body(op, input);
        let len = size_of::<InHeader>() + body.len();
        self.unique += 1;
        let mut request = header(opcode, nodeid, self.unique, body.len());
        request.extend_from_slice(&body);
        // Sometimes the header's length lies.
        if input.u8() % 8 == 0 {
            let any = input.u32();
            let lie = input.pick(&[
                0,
                39,
                40,
                len as u32 - 1,
                len as u32 + 1,
                u32::MAX,
                (1 << 20) + 4096,
                any,
            ]);
            request[0..4].copy_from_slice(&lie.to_le_bytes());
        }
        if input.u8() % 16 == 0 {
            // Another uid/gid as the file system ids.
            let uid = input.pick(&[1000, 65534, u32::MAX]);
            request[24..28].copy_from_slice(&uid.to_le_bytes());
            request[28..32].copy_from_slice(&uid.to_le_bytes());
        }
        let room = match input.u8() % 8 {
            0 => input.pick(&[0, 8, 16, 17, 100]),
            1 => (1 << 20) + 4096,
            _ => 16 + 8192,
        };
        // Request in up to three pieces, reply room in up to two.
        let mut buffers = Vec::new();
        let pieces = 1 + input.below(3);
        let mut rest = &request[..];
        for i in 0..pieces {
            let take = if i + 1 == pieces {
                rest.len()
            } else {
                input.below(rest.len() + 1)
            };
            let (piece, tail) = rest.split_at(take);
            buffers.push(Buffer::Readable(piece));
            rest = tail;
        }
        match input.u8() % 16 {
            0 => {}
            1 => buffers.insert(0, Buffer::Writable(room)),
            2 => {
                buffers.push(Buffer::Writable(room / 2));
                buffers.push(Buffer::Writable(room - room / 2));
            }
            _ => buffers.push(Buffer::Writable(room)),
        }
        let hiprio = matches!(op, Some(Opcode::Forget | Opcode::BatchForget)) && input.bool();
        if input.u8() % 32 == 0 {
            self.malformed_chain(hiprio, input);
            return;
        }
        let Some(used) = self.send(hiprio, &buffers) else {
            return;
        };
        if !self.malformed {
            self.check_reply(op, &used);
        }
    }

    /// The body of a request for `op`, from the input.
    fn body(&mut self, op: Option<Opcode>, input: &mut Input<'_>) -> Vec<u8> {
        let mut body = Vec::new();
        let Some(op) = op else {
            body.extend_from_slice(input.bytes(64));
            return body;
        };
        match op {
            Opcode::Init => {
                let init = InitIn {
                    major: input.mostly_u32(7, &[0, 6, 8, u32::MAX]),
                    minor: input.mostly_u32(31, &[0, 12, 13, 36, u32::MAX]),
                    max_readahead: input.u32(),
                    flags: input.u32(),
                };
                body.extend_from_slice(init.as_slice());
                if input.bool() {
                    // FUSE_INIT_EXT's second flags word.
                    body.extend_from_slice(&[input.u8(); 48]);
                }
            }
            Opcode::Lookup
            | Opcode::Unlink
            | Opcode::Rmdir
            | Opcode::Getxattr
            | Opcode::Removexattr => body.extend(Self::name(input)),
            Opcode::Forget => body.extend_from_slice(
                ForgetIn {
                    nlookup: input.mostly_u64(1, &[0, u64::MAX]),
                }
                .as_slice(),
            ),
            Opcode::BatchForget => {
                let count = input.below(8) as u32;
                let claimed = input.mostly_u32(count, &[u32::MAX, count + 1, 1 << 20]);
                body.extend_from_slice(
                    BatchForgetIn {
                        count: claimed,
                        dummy: 0,
                    }
                    .as_slice(),
                );
                for _ in 0..count {
                    let one = ForgetOne {
                        nodeid: self.node(input),
                        nlookup: input.mostly_u64(1, &[0, u64::MAX]),
                    };
                    body.extend_from_slice(one.as_slice());
                }
            }
            Opcode::Getattr => body.extend_from_slice(
                GetattrIn {
                    flags: input.mostly_u32(0, &[1, u32::MAX]),
                    dummy: 0,
                    fh: self.handle(input),
                }
                .as_slice(),
            ),
            Opcode::Setattr => {
                let valid = input.u32();
                let size = match input.u8() % 4 {
                    0 => input.u64(),
                    _ => u64::from(input.u32() % (1 << 30)),
                };
                body.extend_from_slice(
                    SetattrIn {
                        valid,
                        fh: self.handle(input),
                        size,
                        atime: input.u64(),
                        mtime: input.u64(),
                        atimensec: input.u32(),
                        mtimensec: input.u32(),
                        mode: input.u32(),
                        uid: input.mostly_u32(0, &[1000, u32::MAX]),
                        gid: input.mostly_u32(0, &[1000, u32::MAX]),
                        ..Default::default()
                    }
                    .as_slice(),
                );
            }
            Opcode::Symlink => {
                body.extend(Self::name(input));
                let target: &[u8] = input.pick(&[
                    b"../secret\0" as &[u8],
                    b"/etc/hostname\0",
                    b"a\0",
                    b"../../../..\0",
                    b"\0",
                ]);
                body.extend_from_slice(target);
            }
            Opcode::Mknod => {
                let kind = input.pick(&[
                    libc::S_IFREG,
                    libc::S_IFIFO,
                    libc::S_IFSOCK,
                    libc::S_IFCHR,
                    libc::S_IFBLK,
                    libc::S_IFDIR,
                    libc::S_IFLNK,
                    0,
                ]);
                let mknod = MknodIn {
                    mode: input.mostly_u32(kind | 0o644, &[u32::MAX, kind | 0o7777]),
                    rdev: input.u32(),
                    umask: input.u32() & 0o777,
                    padding: 0,
                };
                body.extend_from_slice(mknod.as_slice());
                body.extend(Self::name(input));
            }
            Opcode::Mkdir => {
                let mkdir = MkdirIn {
                    mode: input.mostly_u32(0o755, &[u32::MAX, 0o7777 | libc::S_IFREG]),
                    umask: input.u32() & 0o777,
                };
                body.extend_from_slice(mkdir.as_slice());
                body.extend(Self::name(input));
            }
            Opcode::Rename | Opcode::Rename2 => {
                let newdir = self.node(input);
                if matches!(op, Opcode::Rename) {
                    body.extend_from_slice(RenameIn { newdir }.as_slice());
                } else {
                    let any = input.u32();
                    let flags = input.pick(&[0, 1, 2, 4, any]);
                    body.extend_from_slice(
                        Rename2In {
                            newdir,
                            flags,
                            padding: 0,
                        }
                        .as_slice(),
                    );
                }
                body.extend(Self::name(input));
                body.extend(Self::name(input));
            }
            Opcode::Link => {
                let oldnodeid = self.node(input);
                body.extend_from_slice(LinkIn { oldnodeid }.as_slice());
                body.extend(Self::name(input));
            }
            Opcode::Open | Opcode::Opendir => {
                let any = input.u32() as i32;
                let flags = input.pick(&[
                    libc::O_RDONLY,
                    libc::O_WRONLY,
                    libc::O_RDWR,
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    libc::O_RDWR | libc::O_TRUNC,
                    libc::O_RDONLY | libc::O_NONBLOCK,
                    libc::O_WRONLY | libc::O_APPEND,
                    any,
                ]);
                body.extend_from_slice(
                    OpenIn {
                        flags: flags as u32,
                        fuse_flags: input.mostly_u32(0, &[1, u32::MAX]),
                    }
                    .as_slice(),
                );
            }
            Opcode::Read | Opcode::Readdir | Opcode::Readdirplus => body.extend_from_slice(
                ReadIn {
                    fh: self.handle(input),
                    offset: Self::offset(input),
                    size: Self::size(input),
                    read_flags: input.mostly_u32(0, &[1, 2, u32::MAX]),
                    lock_owner: input.u64(),
                    flags: input.mostly_u32(0, &[u32::MAX]),
                    padding: 0,
                }
                .as_slice(),
            ),
            Opcode::Write => {
                let data_len = input.below(9000);
                let size = input.mostly_u32(data_len as u32, &[0, u32::MAX, 1 << 20]);
                body.extend_from_slice(
                    WriteIn {
                        fh: self.handle(input),
                        offset: Self::offset(input),
                        size,
                        fuse_flags: input.mostly_u32(0, &[1, 2, 4, u32::MAX]),
                        lock_owner: input.u64(),
                        flags: input.mostly_u32(0, &[u32::MAX]),
                        padding: 0,
                    }
                    .as_slice(),
                );
                body.resize(body.len() + data_len, input.u8());
            }
            Opcode::Release | Opcode::Releasedir => body.extend_from_slice(
                ReleaseIn {
                    fh: self.handle(input),
                    flags: input.u32(),
                    release_flags: input.mostly_u32(0, &[1, 2, u32::MAX]),
                    lock_owner: input.u64(),
                }
                .as_slice(),
            ),
            Opcode::Fsync | Opcode::Fsyncdir => body.extend_from_slice(
                FsyncIn {
                    fh: self.handle(input),
                    fsync_flags: input.u32(),
                    padding: 0,
                }
                .as_slice(),
            ),
            Opcode::Flush => body.extend_from_slice(
                FlushIn {
                    fh: self.handle(input),
                    unused: 0,
                    padding: 0,
                    lock_owner: input.u64(),
                }
                .as_slice(),
            ),
            Opcode::Access => body.extend_from_slice(
                AccessIn {
                    mask: input.mostly_u32(libc::R_OK as u32, &[2, 1, 7, u32::MAX]),
                    padding: 0,
                }
                .as_slice(),
            ),
            Opcode::Create => {
                let any = input.u32() as i32;
                let flags = input.pick(&[
                    libc::O_RDWR | libc::O_CREAT,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    libc::O_RDONLY,
                    libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
                    any,
                ]);
                let create = CreateIn {
                    flags: flags as u32,
                    mode: input.mostly_u32(0o644, &[0o7777, u32::MAX, libc::S_IFCHR | 0o644]),
                    umask: input.u32() & 0o777,
                    fuse_flags: input.mostly_u32(0, &[u32::MAX]),
                };
                body.extend_from_slice(create.as_slice());
                body.extend(Self::name(input));
            }
            Opcode::Interrupt => body.extend_from_slice(
                InterruptIn {
                    unique: input.u64(),
                }
                .as_slice(),
            ),
            Opcode::Fallocate => body.extend_from_slice(
                FallocateIn {
                    fh: self.handle(input),
                    offset: Self::offset(input) % (1 << 30),
                    length: Self::offset(input) % MAX_FALLOCATE,
                    mode: input.mostly_u32(0, &[1, 2, 3, 8, 0x10, 0x20, u32::MAX]),
                    padding: 0,
                }
                .as_slice(),
            ),
            Opcode::Lseek => body.extend_from_slice(
                LseekIn {
                    fh: self.handle(input),
                    offset: Self::offset(input),
                    whence: input.mostly_u32(0, &[1, 2, 3, 4, u32::MAX]),
                    padding: 0,
                }
                .as_slice(),
            ),
            _ => body.extend_from_slice(input.bytes(80)),
        }
        body
    }

    /// Offers a chain, then overwrites its head descriptor with whatever the input says.
    fn malformed_chain(&mut self, hiprio: bool, input: &mut Input<'_>) {
        let queue = if hiprio {
            &mut self.hiprio
        } else {
            &mut self.requests
        };
        let Ok(head) = queue.add_chain(&[Buffer::Readable(&[0; 64]), Buffer::Writable(256)]) else {
            return;
        };
        let end = (HIPRIO_SIZE + REQUESTS_SIZE) as u64;
        let addr = match input.u8() % 4 {
            0 => input.u64(),
            1 => end - 8,
            2 => u64::MAX - 4,
            _ => u64::from(input.u32()) % end,
        };
        let len = input.mostly_u32(64, &[0, 1, 40, u32::MAX]);
        let flags = input.u16() & 7;
        let next = input.u16() % (DRIVER_QUEUE_SIZE + 2);
        queue
            .write_descriptor(head, GuestAddress(addr), len, flags, next)
            .expect("descriptor table is in memory");
        self.malformed = true;
        self.process(hiprio);
        self.drain();
    }

    /// Publishes far more heads than the queue holds: the device must ask for a reset.
    fn runaway_index(&mut self, input: &mut Input<'_>) {
        let head = input.u16();
        for _ in 0..usize::from(DRIVER_QUEUE_SIZE) + 1 + input.below(256) {
            self.requests
                .publish(head)
                .expect("avail ring is in memory");
        }
        self.handler.process_queue(1);
        assert!(self.handler.broken(), "a runaway index went unnoticed");
        assert!(self.interrupt.needs_reset());
        self.reset();
    }

    fn process(&mut self, hiprio: bool) {
        self.handler.process_queue(usize::from(!hiprio));
        assert!(
            !self.handler.broken(),
            "the device broke on a request (a panic in the server?)"
        );
    }

    /// Takes back what the device used without looking at it.
    fn drain(&mut self) {
        for queue in [&mut self.hiprio, &mut self.requests] {
            loop {
                match queue.pop_used() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        self.lost_track = true;
                        return;
                    }
                }
            }
        }
    }

    /// Sends one chain and returns what the device put in the used ring for it.
    fn send(&mut self, hiprio: bool, buffers: &[Buffer<'_>]) -> Option<UsedChain> {
        let queue = if hiprio {
            &mut self.hiprio
        } else {
            &mut self.requests
        };
        match queue.add_chain(buffers) {
            Ok(_) => {}
            Err(DriverQueueError::NoDescriptors { .. } | DriverQueueError::NoBufferSpace(_)) => {
                self.lost_track = true;
                return None;
            }
            Err(e) => panic!("driver queue: {e}"),
        }
        self.process(hiprio);
        let queue = if hiprio {
            &mut self.hiprio
        } else {
            &mut self.requests
        };
        match queue.pop_used() {
            Ok(Some(used)) => Some(used),
            Ok(None) => panic!("the device did not return a request"),
            Err(_) if self.malformed => {
                self.lost_track = true;
                None
            }
            Err(e) => panic!("used ring: {e}"),
        }
    }

    /// A reply must match its request; learn the node ids and handles it hands out.
    fn check_reply(&mut self, op: Option<Opcode>, used: &UsedChain) {
        if used.len == 0 {
            return;
        }
        assert!(
            used.written.len() >= size_of::<OutHeader>(),
            "a {}-byte reply",
            used.len
        );
        let out =
            *OutHeader::from_slice(&used.written[..size_of::<OutHeader>()]).expect("out header");
        assert_eq!(out.len, used.len, "reply length is not the used length");
        assert_eq!(out.unique, self.unique, "reply to another request");
        assert!((-4095..=0).contains(&out.error), "errno {}", out.error);
        if out.error != 0 {
            return;
        }
        let body = &used.written[size_of::<OutHeader>()..];
        let entry = |body: &[u8]| EntryOut::from_slice(body.get(..size_of::<EntryOut>())?).copied();
        match op {
            Some(
                Opcode::Lookup | Opcode::Mkdir | Opcode::Mknod | Opcode::Symlink | Opcode::Link,
            ) => {
                if let Some(entry) = entry(body) {
                    self.learn_node(entry.nodeid);
                }
            }
            Some(Opcode::Create) => {
                if let Some(entry) = entry(body) {
                    self.learn_node(entry.nodeid);
                }
                let open = body
                    .get(size_of::<EntryOut>()..size_of::<EntryOut>() + size_of::<OpenOut>())
                    .and_then(OpenOut::from_slice);
                if let Some(open) = open {
                    self.handles.push(open.fh);
                }
            }
            Some(Opcode::Open | Opcode::Opendir) => {
                if let Some(open) = body
                    .get(..size_of::<OpenOut>())
                    .and_then(OpenOut::from_slice)
                {
                    self.handles.push(open.fh);
                }
            }
            _ => {}
        }
    }

    fn learn_node(&mut self, nodeid: u64) {
        if nodeid != 0 && !self.nodes.contains(&nodeid) && self.nodes.len() < 64 {
            self.nodes.push(nodeid);
        }
    }
}

/// A request header for a body of `body_len` bytes.
fn header(opcode: u32, nodeid: u64, unique: u64, body_len: usize) -> Vec<u8> {
    InHeader {
        len: (size_of::<InHeader>() + body_len) as u32,
        opcode,
        unique,
        nodeid,
        ..Default::default()
    }
    .as_slice()
    .to_vec()
}

/// The opcodes requests are drawn from; `None` is any number at all.
const OPCODES: &[Option<Opcode>] = &[
    Some(Opcode::Lookup),
    Some(Opcode::Lookup),
    Some(Opcode::Lookup),
    Some(Opcode::Forget),
    Some(Opcode::Getattr),
    Some(Opcode::Setattr),
    Some(Opcode::Readlink),
    Some(Opcode::Symlink),
    Some(Opcode::Mknod),
    Some(Opcode::Mkdir),
    Some(Opcode::Unlink),
    Some(Opcode::Rmdir),
    Some(Opcode::Rename),
    Some(Opcode::Link),
    Some(Opcode::Open),
    Some(Opcode::Open),
    Some(Opcode::Read),
    Some(Opcode::Write),
    Some(Opcode::Statfs),
    Some(Opcode::Release),
    Some(Opcode::Fsync),
    Some(Opcode::Setxattr),
    Some(Opcode::Getxattr),
    Some(Opcode::Listxattr),
    Some(Opcode::Removexattr),
    Some(Opcode::Flush),
    Some(Opcode::Init),
    Some(Opcode::Opendir),
    Some(Opcode::Readdir),
    Some(Opcode::Releasedir),
    Some(Opcode::Fsyncdir),
    Some(Opcode::Getlk),
    Some(Opcode::Setlk),
    Some(Opcode::Setlkw),
    Some(Opcode::Access),
    Some(Opcode::Create),
    Some(Opcode::Interrupt),
    Some(Opcode::Bmap),
    Some(Opcode::Destroy),
    Some(Opcode::Ioctl),
    Some(Opcode::Poll),
    Some(Opcode::NotifyReply),
    Some(Opcode::BatchForget),
    Some(Opcode::Fallocate),
    Some(Opcode::Readdirplus),
    Some(Opcode::Rename2),
    Some(Opcode::Lseek),
    Some(Opcode::CopyFileRange),
    Some(Opcode::SetupMapping),
    Some(Opcode::RemoveMapping),
    None,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzz_utils::run_seeded;

    /// Random request streams.
    #[test]
    fn random_requests_stay_inside_the_share() {
        run_seeded(0x6675_7365_2166_7321, 300, 1500, run);
    }
}
