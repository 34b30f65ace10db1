//! How a device starts a thread of its own (today only the virtio-fs worker).
//!
//! Devices do not depend on the VMM, yet every thread of hull-vmm must start through its one
//! helper (`vmm::thread`), which names the thread, ends the VM if the thread panics and is where
//! each kind of thread gets its seccomp filter. So a device that needs a thread takes a
//! [`ThreadSpawner`] when it is created: the VMM hands it its helper; tests and fuzz targets
//! use [`StdSpawner`].

use std::io;
use std::thread::JoinHandle;

/// The threads devices start, so that the VMM can give each kind its own treatment (name,
/// seccomp filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceThread {
    /// A virtio-fs device's request worker: file system calls on the shared directory.
    FsWorker,
}

impl DeviceThread {
    /// The thread's name (at most 15 bytes: Linux keeps no more).
    pub fn name(self) -> &'static str {
        match self {
            DeviceThread::FsWorker => "fs worker",
        }
    }
}

/// Starts a device's thread running `body`.
pub trait ThreadSpawner: Send + Sync {
    /// Starts `body` on a new thread of kind `kind`.
    fn spawn_device_thread(
        &self,
        kind: DeviceThread,
        body: Box<dyn FnOnce() + Send>,
    ) -> io::Result<JoinHandle<()>>;
}

/// A plain named thread, with nothing around it: for tests and fuzz targets, where no VM exists.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdSpawner;

impl ThreadSpawner for StdSpawner {
    fn spawn_device_thread(
        &self,
        kind: DeviceThread,
        body: Box<dyn FnOnce() + Send>,
    ) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(kind.name().into())
            .spawn(body)
    }
}
