//! The fs worker: takes FUSE requests off the queues and answers them.
//!
//! [`FsHandler`] is an `event_manager` subscriber on the queues' notify eventfds and a stop
//! eventfd. [`run_worker`] gives it an event loop of its own on the "fs worker" thread, so a
//! slow or blocked host file system holds up only this device. Each chain is one FUSE request:
//! its readable part goes to `fuse_backend_rs`'s `Server` through a `Reader`, the reply is
//! written into its writable part through a `Writer`, and the chain goes back to the used ring
//! with the reply's length.
//!
//! The guest builds the chains, so everything about them can be wrong:
//! - descriptors outside guest memory, or a request the server cannot decode (a lying header
//!   length, a truncated body): answered with `EINVAL` when the header can be read, otherwise
//!   returned with a used length of 0; logged with a rate limit; the queue carries on;
//! - unknown opcodes: the server answers `ENOSYS`;
//! - an available index more than a queue size ahead, a used ring the device cannot write, or a
//!   panic inside the server: the device stops serving and signals NEEDS_RESET.

use std::io::Write;
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::confine::ConfinedFs;
use crate::virtio::{ActiveQueue, GuestErrorLog, InterruptKind, IrqTrigger};

/// The FUSE server the worker feeds; the device keeps the file system to reset it.
pub type FsServer = Server<Arc<ConfinedFs>>;

/// Event data of the stop eventfd; queue notify events carry their queue index.
const STOP_TOKEN: u32 = u32::MAX;
/// Requests served per pass over a queue. A vCPU can refill a queue as fast as it is drained;
/// after this many the worker re-arms the queue's eventfd and goes back to its event loop, so
/// the stop eventfd and the other queue get their turn.
pub(crate) const BATCH: usize = 256;

/// Serves the queues of one activated virtio-fs device.
pub struct FsHandler {
    mem: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<IrqTrigger>,
    server: Arc<FsServer>,
    stop_evt: EventFd,
    stopped: bool,
    broken: bool,
    log: GuestErrorLog,
}

impl FsHandler {
    /// Creates a handler for `queues` (the transport's active queues, each with its notify
    /// eventfd); it stops when `stop_evt` is signalled.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<IrqTrigger>,
        server: Arc<FsServer>,
        stop_evt: EventFd,
    ) -> Self {
        Self {
            mem,
            queues,
            interrupt,
            server,
            stop_evt,
            stopped: false,
            broken: false,
            log: GuestErrorLog::new(),
        }
    }

    /// Whether the stop eventfd fired.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Whether the handler gave up on the queues and asked for a reset.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Serves the requests waiting in the queue at position `slot` of the active queues, at
    /// most [`BATCH`] of them; with more left, the queue's eventfd is signalled again.
    pub fn process_queue(&mut self, slot: usize) {
        if self.broken {
            return;
        }
        let Some(active) = self.queues.get_mut(slot) else {
            return;
        };
        let index = active.index;
        let mut used_any = false;
        let mut served = 0;
        loop {
            if served == BATCH {
                // More may wait: come back after the event loop's other events.
                if let Err(err) = active.notify.write(1) {
                    log::error!("virtio-fs: cannot re-arm queue {index}: {err}");
                }
                break;
            }
            let chain = match active.queue.iter(&self.mem) {
                Ok(mut avail) => avail.next(),
                Err(err) => {
                    self.log.warn(format_args!(
                        "virtio-fs: queue {index} is unusable ({err}); device needs a reset"
                    ));
                    self.broken = true;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let outcome = serve_request(&self.mem, &self.server, &mut self.log, index, chain);
            let len = match outcome {
                Served::Replied(len) => len,
                Served::Panicked => {
                    self.log.warn(format_args!(
                        "virtio-fs: the file server panicked on queue {index}; device needs a reset"
                    ));
                    self.broken = true;
                    0
                }
            };
            if let Err(err) = active.queue.add_used(&self.mem, head, len) {
                self.log.warn(format_args!(
                    "virtio-fs: queue {index}: cannot return chain {head} ({err}); \
                     device needs a reset"
                ));
                self.broken = true;
                break;
            }
            used_any = true;
            served += 1;
            if self.broken {
                break;
            }
        }
        if used_any {
            // Without EVENT_IDX this is always true; with it, the driver decides.
            let notify = active.queue.needs_notification(&self.mem).unwrap_or(true);
            if notify {
                if let Err(err) = self.interrupt.trigger(InterruptKind::Vring) {
                    log::error!("virtio-fs: {err}");
                }
            }
        }
        if self.broken {
            if let Err(err) = self.interrupt.signal_needs_reset() {
                log::error!("virtio-fs: {err}");
            }
        }
    }
}

/// What became of one request.
enum Served {
    /// The chain goes back with this used length.
    Replied(u32),
    /// The server panicked; the chain goes back empty.
    Panicked,
}

/// Runs one FUSE request through the server, catching what it cannot handle.
fn serve_request(
    mem: &GuestMemoryMmap,
    server: &FsServer,
    log: &mut GuestErrorLog,
    queue_index: usize,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Served {
    let head = chain.head_index();
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(reader) => reader,
        Err(err) => {
            log.warn(format_args!(
                "virtio-fs: queue {queue_index}: unreadable request in chain {head}: {err}"
            ));
            return Served::Replied(0);
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(writer) => writer,
        Err(err) => {
            log.warn(format_args!(
                "virtio-fs: queue {queue_index}: unwritable reply buffers in chain {head}: {err}"
            ));
            return Served::Replied(0);
        }
    };
    // The server is third-party code fed guest bytes; a panic in it (an unwrap or a debug
    // assertion on guest data) must not take the VMM down.
    let result = catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, writer.into(), None, None)
    }));
    match result {
        Ok(Ok(len)) => Served::Replied(u32::try_from(len).unwrap_or(0)),
        Ok(Err(err)) => {
            log.warn(format_args!(
                "virtio-fs: queue {queue_index}: bad request in chain {head}: {err}"
            ));
            Served::Replied(reply_einval(mem, chain))
        }
        Err(_) => Served::Panicked,
    }
}

/// Answers a request the server could not decode with `EINVAL`, if its header can be read and
/// it expects an answer; returns the used length.
fn reply_einval(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let Ok(mut reader) = Reader::from_descriptor_chain(mem, chain.clone()) else {
        return 0;
    };
    let Ok(header) = reader.read_obj::<InHeader>() else {
        return 0;
    };
    if header.opcode == Opcode::Forget as u32 || header.opcode == Opcode::BatchForget as u32 {
        return 0;
    }
    let Ok(mut writer) = VirtioFsWriter::new(mem, chain) else {
        return 0;
    };
    let out = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -libc::EINVAL,
        unique: header.unique,
    };
    match writer.write_all(out.as_slice()) {
        Ok(()) => out.len,
        Err(_) => 0,
    }
}

impl MutEventSubscriber for FsHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        if token == STOP_TOKEN {
            let _ = self.stop_evt.read();
            self.stopped = true;
            return;
        }
        let slot = token as usize;
        if let Some(active) = self.queues.get(slot) {
            // EAGAIN only means another wakeup already drained it.
            let _ = active.notify.read();
        }
        self.process_queue(slot);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::with_data(&self.stop_evt, STOP_TOKEN, EventSet::IN)) {
            log::error!("virtio-fs: cannot watch the stop eventfd: {err:?}");
        }
        for (slot, active) in self.queues.iter().enumerate() {
            let token = u32::try_from(slot).expect("a device has at most a few queues");
            if let Err(err) = ops.add(Events::with_data(&active.notify, token, EventSet::IN)) {
                log::error!(
                    "virtio-fs: cannot watch queue {}'s notify eventfd: {err:?}",
                    active.index
                );
            }
        }
    }
}

/// The fs worker thread's body: serves `handler` until its stop eventfd fires.
///
/// Requests that arrived before activation are served first (a driver may notify before the
/// worker is waiting).
pub fn run_worker(mut handler: FsHandler) {
    for slot in 0..handler.queues.len() {
        handler.process_queue(slot);
    }
    let mut event_manager = match EventManager::<FsHandler>::new() {
        Ok(manager) => manager,
        Err(err) => {
            log::error!("virtio-fs: cannot create the fs worker's event loop: {err:?}");
            let _ = handler.interrupt.signal_needs_reset();
            return;
        }
    };
    let id = event_manager.add_subscriber(handler);
    loop {
        if let Err(err) = event_manager.run() {
            log::error!("virtio-fs: fs worker event loop failed: {err:?}");
            return;
        }
        match event_manager.subscriber_mut(id) {
            Ok(handler) if handler.stopped() => return,
            Ok(_) => {}
            Err(err) => {
                log::error!("virtio-fs: fs worker lost its handler: {err:?}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::virtio::fs::test_utils::{guest_memory, TempDir};
    use crate::virtio::fs::{HIPRIO_QUEUE, QUEUE_SIZE, REQUEST_QUEUE};
    use crate::virtio::test_utils::{Buffer, DriverQueue};

    #[test]
    fn a_full_queue_is_served_in_batches_between_other_events() {
        let dir = TempDir::new("hull-devices-test");
        let mem = guest_memory();
        let hiprio = DriverQueue::new(&mem, GuestAddress(0), 16).unwrap();
        let mut requests = DriverQueue::new(&mem, GuestAddress(0x40_0000), QUEUE_SIZE).unwrap();
        let queues = vec![
            ActiveQueue {
                index: HIPRIO_QUEUE,
                queue: hiprio.device_queue(QUEUE_SIZE).unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ActiveQueue {
                index: REQUEST_QUEUE,
                queue: requests.device_queue(QUEUE_SIZE).unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ];
        let notify = queues[1].notify.try_clone().unwrap();
        let fs = ConfinedFs::new(dir.path(), false).unwrap();
        let server = Arc::new(Server::new(Arc::new(fs)));
        let interrupt = Arc::new(IrqTrigger::new().unwrap());
        let mut handler = FsHandler::new(
            mem,
            queues,
            interrupt,
            server,
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        let sent = BATCH * 2 + 10;
        for _ in 0..sent {
            // Too short for a FUSE header: the chain goes back with nothing written.
            requests.add_chain(&[Buffer::Readable(&[0; 4])]).unwrap();
        }
        let mut served = Vec::new();
        loop {
            handler.process_queue(1);
            let mut used = 0;
            while requests.pop_used().unwrap().is_some() {
                used += 1;
            }
            served.push(used);
            // Re-armed while requests are left; the event loop would come back.
            if notify.read().is_err() {
                break;
            }
            assert!(served.len() < 10, "{served:?}");
        }
        assert_eq!(served, [BATCH, BATCH, 10]);
        assert!(!handler.broken());
    }
}
