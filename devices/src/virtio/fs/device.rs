//! The virtio-fs device as the transport sees it: type 26, two queues, a tag.
//!
//! `Fs` owns the FUSE server from construction on (so the shared directory and `/proc/self/fd`
//! are opened while the VMM still sees the host's file system) and, while the driver has it
//! running, the fs worker thread that serves the queues.

use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::confine::ConfinedFs;
use super::event_handler::{run_worker, FsHandler, FsServer};
use super::{
    encode_tag, FsConfig, FsError, CONFIG_SPACE_SIZE, HIPRIO_QUEUE, NUM_REQUEST_QUEUES, QUEUE_SIZE,
    REQUEST_QUEUE, TAG_LEN,
};
use crate::spawn::{DeviceThread, ThreadSpawner};
use crate::virtio::{
    ActivateError, ActiveQueue, IrqTrigger, QueueProgress, VirtioDevice, TYPE_FS,
    VIRTIO_F_VERSION_1,
};

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

/// The fs worker thread and the eventfd that stops it.
struct Worker {
    stop_evt: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-fs device sharing one host directory.
pub struct Fs {
    config_space: [u8; CONFIG_SPACE_SIZE],
    tag: String,
    acked_features: u64,
    fs: Arc<ConfinedFs>,
    server: Arc<FsServer>,
    worker: Option<Worker>,
    /// Starts the fs worker: the VMM's thread helper ([`StdSpawner`] in tests).
    spawner: Arc<dyn ThreadSpawner>,
}

impl Fs {
    /// Creates the device for `config`: checks the tag, resolves the shared directory and sets
    /// up the FUSE server (which opens `/proc/self/fd`). Call it before the VMM is jailed. The
    /// fs worker will start through `spawner` (the VMM's thread helper).
    pub fn new(config: &FsConfig, spawner: Arc<dyn ThreadSpawner>) -> Result<Self, FsError> {
        let tag_field = encode_tag(&config.tag)?;
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        config_space[..TAG_LEN].copy_from_slice(&tag_field);
        config_space[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let fs = Arc::new(ConfinedFs::new(&config.shared_dir, config.read_only)?);
        Ok(Self {
            config_space,
            tag: config.tag.clone(),
            acked_features: 0,
            server: Arc::new(Server::new(fs.clone())),
            fs,
            worker: None,
            spawner,
        })
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether the device refuses every change.
    pub fn read_only(&self) -> bool {
        self.fs.read_only()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the fs worker is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn stop_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if let Err(err) = worker.stop_evt.write(1) {
            // The worker cannot be told to stop; leave it rather than wait forever.
            log::error!("virtio-fs: cannot stop the fs worker: {err}");
            return;
        }
        if worker.thread.join().is_err() {
            log::error!("virtio-fs: the fs worker panicked");
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(available) = self.config_space.get(start..) else {
            return;
        };
        let len = data.len().min(available.len());
        data[..len].copy_from_slice(&available[..len]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The virtio-fs configuration space is read-only for the driver.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive {
                device_type: TYPE_FS,
            });
        }
        queues.sort_by_key(|queue| queue.index);
        for (slot, index) in [HIPRIO_QUEUE, REQUEST_QUEUE].into_iter().enumerate() {
            if queues.get(slot).map(|queue| queue.index) != Some(index) {
                return Err(ActivateError::MissingQueue {
                    device_type: TYPE_FS,
                    index,
                });
            }
        }
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| ActivateError::EventFd {
            device_type: TYPE_FS,
            source,
        })?;
        let worker_stop = stop_evt
            .try_clone()
            .map_err(|source| ActivateError::EventFd {
                device_type: TYPE_FS,
                source,
            })?;
        let handler = FsHandler::new(mem, queues, interrupt, self.server.clone(), worker_stop);
        let thread = self
            .spawner
            .spawn_device_thread(
                DeviceThread::FsWorker,
                Box::new(move || run_worker(handler)),
            )
            .map_err(|source| ActivateError::Backend {
                device_type: TYPE_FS,
                source: Box::new(source),
            })?;
        self.worker = Some(Worker { stop_evt, thread });
        Ok(())
    }

    /// Only before the guest mounts the share (a FUSE session's inodes and handles live in
    /// this process) and with every request answered.
    fn snapshot_ready(&self, progress: &[QueueProgress]) -> Result<(), String> {
        if self.fs.is_mounted() {
            return Err("the guest has the share mounted".into());
        }
        match progress.iter().find(|p| p.avail_idx != p.used_idx) {
            Some(p) => Err(format!("queue {} has requests in flight", p.index)),
            None => Ok(()),
        }
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        // Forget every inode and open file of the old session; the next INIT starts afresh.
        self.fs.destroy();
        self.acked_features = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader, ROOT_ID};
    use vm_memory::{ByteValued, GuestAddress};

    use super::*;
    use crate::spawn::StdSpawner;
    use crate::virtio::fs::test_utils::{guest_memory, FuseGuest, TempDir};
    use crate::virtio::mmio::{MmioTransport, VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_DEVICE_ID};
    use crate::virtio::test_utils::{read_reg, Buffer, DriverQueue};

    fn config(dir: &TempDir, read_only: bool) -> FsConfig {
        FsConfig {
            shared_dir: dir.path().to_path_buf(),
            tag: "rootfs".into(),
            read_only,
        }
    }

    #[test]
    fn transport_shows_type_tag_and_one_request_queue() {
        let dir = TempDir::new("hull-devices-test");
        let device = Fs::new(&config(&dir, false), Arc::new(StdSpawner)).unwrap();
        assert_eq!(device.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(device));
        let mut transport = MmioTransport::new(guest_memory(), device).unwrap();
        assert_eq!(read_reg(&mut transport, VIRTIO_MMIO_DEVICE_ID), TYPE_FS);
        let mut tag = [0u8; TAG_LEN];
        for (i, chunk) in tag.chunks_mut(4).enumerate() {
            let word = read_reg(&mut transport, VIRTIO_MMIO_CONFIG + 4 * i as u64);
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        assert_eq!(&tag[..7], b"rootfs\0");
        let queues = read_reg(&mut transport, VIRTIO_MMIO_CONFIG + TAG_LEN as u64);
        assert_eq!(queues, 1);
        // Past the end reads as zero.
        assert_eq!(read_reg(&mut transport, VIRTIO_MMIO_CONFIG + 0x40), 0);
    }

    #[test]
    fn config_reads_at_odd_offsets_stay_in_bounds() {
        let dir = TempDir::new("hull-devices-test");
        let device = Fs::new(&config(&dir, false), Arc::new(StdSpawner)).unwrap();
        let mut data = [0xffu8; 8];
        device.read_config(38, &mut data);
        assert_eq!(data, [0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        device.read_config(u64::MAX, &mut data);
        device.read_config(0, &mut []);
    }

    #[test]
    fn bad_configs_are_refused() {
        let dir = TempDir::new("hull-devices-test");
        let mut bad = config(&dir, false);
        bad.tag = String::new();
        assert!(matches!(
            Fs::new(&bad, Arc::new(StdSpawner)),
            Err(FsError::InvalidTag { .. })
        ));
        let mut bad = config(&dir, false);
        bad.shared_dir = dir.path().join("missing");
        assert!(matches!(
            Fs::new(&bad, Arc::new(StdSpawner)),
            Err(FsError::SharedDir { .. })
        ));
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let mut bad = config(&dir, false);
        bad.shared_dir = dir.path().join("file");
        assert!(matches!(
            Fs::new(&bad, Arc::new(StdSpawner)),
            Err(FsError::SharedDir { .. })
        ));
    }

    #[test]
    fn activation_needs_both_queues_and_reset_stops_the_worker() {
        let dir = TempDir::new("hull-devices-test");
        let mem = guest_memory();
        let mut device = Fs::new(&config(&dir, false), Arc::new(StdSpawner)).unwrap();
        let driver = DriverQueue::new(&mem, GuestAddress(0), 16).unwrap();
        let only_request = vec![ActiveQueue {
            index: REQUEST_QUEUE,
            queue: driver.device_queue(QUEUE_SIZE).unwrap(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }];
        let irq = Arc::new(IrqTrigger::new().unwrap());
        assert!(matches!(
            device.activate(mem.clone(), irq.clone(), only_request),
            Err(ActivateError::MissingQueue { index: 0, .. })
        ));
        assert!(!device.is_active());

        let mut guest = FuseGuest::start(device, mem);
        guest.init();
        assert!(guest.lookup(ROOT_ID, "missing").is_err());
        let mut device = guest.into_device();
        assert!(device.is_active());
        assert!(device.reset());
        assert!(!device.is_active());
        // After a reset the device comes up again and serves a new session.
        let mut guest = FuseGuest::start(device, guest_memory());
        guest.init();
        std::fs::write(dir.path().join("again"), b"x").unwrap();
        assert!(guest.lookup(ROOT_ID, "again").is_ok());
    }

    fn header(opcode: u32, len: u32, unique: u64) -> Vec<u8> {
        InHeader {
            len,
            opcode,
            unique,
            nodeid: ROOT_ID,
            ..Default::default()
        }
        .as_slice()
        .to_vec()
    }

    fn out_header(bytes: &[u8]) -> OutHeader {
        *OutHeader::from_slice(&bytes[..16]).unwrap()
    }

    #[test]
    fn hostile_requests_get_errors_not_panics() {
        let dir = TempDir::new("hull-devices-test");
        let mut guest = FuseGuest::start_dir(&config(&dir, false));
        guest.init();

        // Unknown opcode: ENOSYS.
        let used = guest.send(&[Buffer::Readable(&header(9999, 40, 7)), Buffer::Writable(64)]);
        let out = out_header(&used.written);
        assert_eq!((out.error, out.unique), (-libc::ENOSYS, 7));

        // A LOOKUP whose header claims less than the header itself: EINVAL.
        let mut request = header(Opcode::Lookup as u32, 5, 8);
        request.extend_from_slice(b"name\0");
        let used = guest.send(&[Buffer::Readable(&request), Buffer::Writable(256)]);
        let out = out_header(&used.written);
        assert_eq!((out.error, out.unique), (-libc::EINVAL, 8));

        // A LOOKUP whose header claims far more than the chain holds.
        let mut request = header(Opcode::Lookup as u32, 4000, 9);
        request.extend_from_slice(b"name\0");
        let used = guest.send(&[Buffer::Readable(&request), Buffer::Writable(256)]);
        assert_eq!(out_header(&used.written).error, -libc::EINVAL);

        // A length beyond the server's maximum: ENOMEM, nothing allocated.
        let request = header(Opcode::Lookup as u32, u32::MAX, 10);
        let used = guest.send(&[Buffer::Readable(&request), Buffer::Writable(256)]);
        assert_eq!(out_header(&used.written).error, -libc::ENOMEM);

        // A truncated header: nothing to answer, the chain comes back empty.
        let used = guest.send(&[Buffer::Readable(&[1, 2, 3]), Buffer::Writable(256)]);
        assert_eq!(used.len, 0);

        // No room for the reply.
        let used = guest.send(&[
            Buffer::Readable(&header(Opcode::Getattr as u32, 56, 11)),
            Buffer::Readable(&[0u8; 16]),
            Buffer::Writable(4),
        ]);
        assert_eq!(used.len, 0);

        // A descriptor pointing outside guest memory.
        let head = guest.requests.add_chain(&[Buffer::Writable(16)]).unwrap();
        guest
            .requests
            .write_descriptor(head, GuestAddress(0xffff_0000_0000), 64, 0, 0)
            .unwrap();
        let used = guest.kick_and_wait();
        assert_eq!((used.head, used.len), (head, 0));

        // A name without its NUL terminator.
        let mut request = header(Opcode::Lookup as u32, 44, 12);
        request.extend_from_slice(b"abcd");
        let used = guest.send(&[Buffer::Readable(&request), Buffer::Writable(256)]);
        assert_eq!(out_header(&used.written).error, -libc::EINVAL);

        // The device is still healthy and serving.
        assert!(!guest.interrupt().needs_reset());
        assert!(guest.lookup(ROOT_ID, "missing").is_err());
    }

    #[test]
    fn a_runaway_available_index_needs_a_reset() {
        let dir = TempDir::new("hull-devices-test");
        let mut guest = FuseGuest::start_dir(&config(&dir, false));
        guest.init();
        // Claim 1000 more chains than a 64-entry queue can hold.
        for _ in 0..1000 {
            guest.requests.publish(0).unwrap();
        }
        guest.notify_requests();
        guest.wait_needs_reset();
        // A reset brings it back.
        let mut device = guest.into_device();
        assert!(device.reset());
        let mut guest = FuseGuest::start(device, guest_memory());
        guest.init();
        assert!(!guest.interrupt().needs_reset());
    }

    #[test]
    fn reads_and_writes_are_byte_exact() {
        let dir = TempDir::new("hull-devices-test");
        let host_bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(dir.path().join("existing"), &host_bytes).unwrap();
        let mut guest = FuseGuest::start_dir(&config(&dir, false));
        guest.init();

        // Reading what the host put there, in pieces at odd offsets.
        let node = guest.lookup(ROOT_ID, "existing").unwrap();
        assert_eq!(node.attr.size, host_bytes.len() as u64);
        let fh = guest.open(node.nodeid, libc::O_RDONLY).unwrap();
        let mut read_back = Vec::new();
        while read_back.len() < host_bytes.len() {
            let chunk = guest
                .read(node.nodeid, fh, read_back.len() as u64, 65_521)
                .unwrap();
            assert!(!chunk.is_empty());
            read_back.extend_from_slice(&chunk);
        }
        assert_eq!(read_back, host_bytes);
        assert!(guest
            .read(node.nodeid, fh, host_bytes.len() as u64, 4096)
            .unwrap()
            .is_empty());
        guest.release(node.nodeid, fh).unwrap();

        // Writing a new file, including a hole, and reading it back both ways.
        let (entry, fh) = guest.create(ROOT_ID, "new", 0o644, libc::O_RDWR).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(guest.write(entry.nodeid, fh, 0, &data).unwrap(), 100_000);
        assert_eq!(guest.write(entry.nodeid, fh, 300_000, b"tail").unwrap(), 4);
        // Across the end of the data into the hole.
        let back = guest.read(entry.nodeid, fh, 99_990, 20).unwrap();
        assert_eq!(&back[..10], &data[99_990..]);
        assert_eq!(&back[10..], &[0u8; 10]);
        guest.release(entry.nodeid, fh).unwrap();
        let on_host = std::fs::read(dir.path().join("new")).unwrap();
        assert_eq!(on_host.len(), 300_004);
        assert_eq!(&on_host[..100_000], &data[..]);
        assert!(on_host[100_000..300_000].iter().all(|&b| b == 0));
        assert_eq!(&on_host[300_000..], b"tail");
        assert_eq!(guest.getattr(entry.nodeid).unwrap().size, 300_004);
        assert_eq!(guest.truncate(entry.nodeid, 10).unwrap().size, 10);
        assert_eq!(std::fs::read(dir.path().join("new")).unwrap(), &data[..10]);
    }

    #[test]
    fn directories_links_and_names() {
        let dir = TempDir::new("hull-devices-test");
        let mut guest = FuseGuest::start_dir(&config(&dir, false));
        guest.init();

        let sub = guest.mkdir(ROOT_ID, "sub", 0o755).unwrap();
        assert!(dir.path().join("sub").is_dir());
        let (file, fh) = guest
            .create(sub.nodeid, "a", 0o600, libc::O_WRONLY)
            .unwrap();
        guest.write(file.nodeid, fh, 0, b"hello").unwrap();
        guest.release(file.nodeid, fh).unwrap();

        // A hard link inside the share is fine.
        let linked = guest.link(file.nodeid, ROOT_ID, "b").unwrap();
        assert_eq!(linked.attr.nlink, 2);
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"hello");

        // Symlinks are created as text and read back as text.
        let link = guest.symlink(sub.nodeid, "l", "../b").unwrap();
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(guest.readlink(link.nodeid).unwrap(), b"../b");
        assert_eq!(
            std::fs::read_link(dir.path().join("sub/l")).unwrap(),
            std::path::Path::new("../b")
        );

        let dh = guest.opendir(sub.nodeid).unwrap();
        let mut names = guest.readdir(sub.nodeid, dh).unwrap();
        names.sort();
        assert_eq!(names, ["a", "l"]);
        let plus = guest.readdirplus(sub.nodeid, dh).unwrap();
        let a = plus.iter().find(|(name, _)| name == "a").unwrap();
        assert_eq!(a.1, file.nodeid);

        guest.rename(sub.nodeid, "a", ROOT_ID, "c").unwrap();
        assert!(dir.path().join("c").is_file());
        guest.unlink(ROOT_ID, "c").unwrap();
        assert!(!dir.path().join("c").exists());
        assert_eq!(guest.lookup(ROOT_ID, "c").unwrap_err(), libc::ENOENT);
        // New names are single components.
        assert_eq!(
            guest.mkdir(ROOT_ID, "x/y", 0o755).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(guest.mkdir(ROOT_ID, "..", 0o755).unwrap_err(), libc::EINVAL);
    }

    #[test]
    fn serves_a_driver_through_the_mmio_transport() {
        use crate::virtio::mmio::{VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_STATUS};
        use crate::virtio::test_utils::{init_device, write_reg};
        use crate::virtio::VIRTIO_CONFIG_S_DRIVER_OK;
        use fuse_backend_rs::abi::fuse_abi::InitIn;
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

        let dir = TempDir::new("hull-devices-test");
        let mem = guest_memory();
        let fs = Arc::new(Mutex::new(
            Fs::new(&config(&dir, false), Arc::new(StdSpawner)).unwrap(),
        ));
        let device: Arc<Mutex<dyn VirtioDevice>> = fs.clone();
        let mut transport = MmioTransport::new(mem.clone(), device).unwrap();
        let hiprio = DriverQueue::new(&mem, GuestAddress(0), 64).unwrap();
        let mut requests = DriverQueue::new(&mem, GuestAddress(0x40_0000), 64).unwrap();
        let status = init_device(
            &mut transport,
            1 << VIRTIO_F_VERSION_1,
            &[(0, &hiprio), (1, &requests)],
        );
        assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        assert!(fs.lock().unwrap().is_active());

        let mut request = header(Opcode::Init as u32, 56, 1);
        let init = InitIn {
            major: 7,
            minor: 31,
            ..Default::default()
        };
        request.extend_from_slice(init.as_slice());
        requests
            .add_chain(&[Buffer::Readable(&request), Buffer::Writable(256)])
            .unwrap();
        // The notify register write reaches the worker through the queue's eventfd.
        write_reg(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(transport.interrupt().irq_evt()),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let start = std::time::Instant::now();
        let used = loop {
            if let Some(used) = requests.pop_used().unwrap() {
                break used;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            let _ = epoll.wait(100, &mut [EpollEvent::default()]);
        };
        let out = out_header(&used.written);
        assert_eq!((out.error, out.unique), (0, 1));
        assert_ne!(transport.interrupt().status() & 1, 0);

        // A driver reset stops the worker.
        write_reg(&mut transport, VIRTIO_MMIO_STATUS, 0);
        assert!(!fs.lock().unwrap().is_active());
    }
}
