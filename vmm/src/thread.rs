//! The one way hull-vmm starts a thread: [`Spawner::spawn`] with a [`ThreadKind`].
//!
//! Every thread is named after its kind. If one panics, the VM ends with
//! [`VmExit::ThreadPanicked`] naming the thread and the panic's message, and hull-vmm exits 1,
//! instead of running on without it (a dead relay or supervisor would leave a VM that never
//! exits). [`ThreadKind::enter`], run first on every new thread, installs the kind's seccomp
//! filter (`seccomp`); with filters on, the threads are created by the spawner thread, so
//! that none inherits the narrower filter of the thread that asked for it.
//!
//! The main thread is the vmm thread (the event loop) and is not started here; `main` turns a
//! panic there into the same exit status.

use std::any::Any;
use std::io;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use devices::{DeviceThread, ThreadSpawner};

use crate::builder::Stopper;
use crate::seccomp::Filter;
use crate::vstate::vcpu::VmExit;

/// What a thread of hull-vmm does; each kind will get a seccomp filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// One vCPU's `KVM_RUN` loop: KVM ioctls, the device buses.
    Vcpu(u8),
    /// A thread a device starts for itself (the virtio-fs worker).
    Device(DeviceThread),
    /// Container mode: `sigwait` for the signals forwarded to the container's init.
    Signals,
    /// Container mode: the supervisor, which owns the agent's control connection.
    Supervisor,
    /// Container mode: reads the agent's control connection.
    AgentReader,
    /// Container mode: accepts connections on the control socket.
    ControlListener,
    /// Container mode: serves one client of the control socket.
    ControlClient,
    /// Copies one stream between a host descriptor and a vsock connection.
    Relay(&'static str),
    /// Container mode: waits for the init's output to drain after it exited.
    OutputDrain,
}

impl ThreadKind {
    /// The thread's name (Linux keeps 15 bytes of it; the kinds' names fit).
    pub fn name(self) -> String {
        match self {
            ThreadKind::Vcpu(index) => format!("vcpu{index}"),
            ThreadKind::Device(device) => device.name().to_owned(),
            ThreadKind::Signals => "signals".to_owned(),
            ThreadKind::Supervisor => "container".to_owned(),
            ThreadKind::AgentReader => "agent".to_owned(),
            ThreadKind::ControlListener => "control-socket".to_owned(),
            ThreadKind::ControlClient => "control-client".to_owned(),
            ThreadKind::Relay(name) => name.to_owned(),
            ThreadKind::OutputDrain => "output drain".to_owned(),
        }
    }

    /// The seccomp filter threads of this kind run under.
    pub fn filter(self) -> Filter {
        match self {
            ThreadKind::Vcpu(_) => Filter::Vcpu,
            ThreadKind::Device(DeviceThread::FsWorker) => Filter::FsWorker,
            ThreadKind::Signals => Filter::Signals,
            ThreadKind::Supervisor => Filter::Supervisor,
            ThreadKind::AgentReader => Filter::AgentReader,
            ThreadKind::ControlListener => Filter::ControlListener,
            ThreadKind::ControlClient => Filter::ControlClient,
            ThreadKind::Relay(_) => Filter::Relay,
            ThreadKind::OutputDrain => Filter::OutputDrain,
        }
    }

    /// Runs first on every new thread of this kind, before its body: installs the kind's
    /// seccomp filter (when filters are on). A thread that cannot have its filter does not
    /// run: the panic ends the VM.
    fn enter(self) {
        if let Err(err) = self.filter().install() {
            panic!("{err}");
        }
    }
}

/// Work for the spawner thread: start one thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// The spawner thread's inbox, once it runs.
static SPAWNER: OnceLock<Mutex<Sender<SpawnJob>>> = OnceLock::new();

/// Starts the thread that creates every later thread (`seccomp::enable` calls this before
/// any other thread exists). It runs under [`Filter::Spawner`], the union of every kind's
/// list, so each new thread starts from that and narrows it to its own.
pub(crate) fn start_spawner_thread() -> io::Result<()> {
    let (tx, rx) = channel::<SpawnJob>();
    let (ready_tx, ready) = channel();
    std::thread::Builder::new()
        .name("spawner".to_owned())
        .spawn(move || {
            let installed = Filter::Spawner.install();
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if ok {
                for job in rx {
                    job();
                }
            }
        })?;
    match ready.recv() {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(io::Error::other(err)),
        Err(_) => return Err(io::Error::other("the spawner thread ended")),
    }
    SPAWNER
        .set(Mutex::new(tx))
        .map_err(|_| io::Error::other("the spawner thread runs already"))
}

/// Runs `spawn` (which starts a thread) on the spawner thread if there is one, else here.
fn on_spawner_thread<T: Send + 'static>(
    spawn: impl FnOnce() -> io::Result<JoinHandle<T>> + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let Some(spawner) = SPAWNER.get() else {
        return spawn();
    };
    let (reply, answer) = channel();
    let job: SpawnJob = Box::new(move || {
        let _ = reply.send(spawn());
    });
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread did not answer"))?
}

/// Starts hull-vmm's threads. In a VMM ([`Spawner::new`]) a panic in any of them ends the VM;
/// outside one ([`Spawner::detached`], the `hull` CLI's relays and unit tests) it is logged.
#[derive(Clone)]
pub struct Spawner {
    on_panic: Option<Stopper>,
}

impl Spawner {
    /// Threads of the VM that `stopper` ends.
    pub fn new(stopper: Stopper) -> Self {
        Self {
            on_panic: Some(stopper),
        }
    }

    /// Threads of a process without a VM: a panic is logged and the thread ends.
    pub fn detached() -> Self {
        Self { on_panic: None }
    }

    /// This spawner as a device's, for devices that start threads of their own.
    pub fn for_devices(&self) -> Arc<dyn ThreadSpawner> {
        Arc::new(self.clone())
    }

    /// Starts `body` on a new thread of kind `kind`. If `body` panics, the VM ends (see the
    /// module's documentation) and joining the thread returns the panic, as with `std`.
    pub fn spawn<F, T>(&self, kind: ThreadKind, body: F) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let name = kind.name();
        let on_panic = self.on_panic.clone();
        let builder = std::thread::Builder::new().name(name.clone());
        on_spawner_thread(move || {
            builder.spawn(move || {
                // Unwind safety: nothing of `body` is used after its panic, which goes on
                // unwinding once the VM has been told.
                match catch_unwind(AssertUnwindSafe(move || {
                    kind.enter();
                    body()
                })) {
                    Ok(value) => value,
                    Err(payload) => {
                        let message = panic_message(&*payload);
                        log::error!("thread `{name}` panicked: {message}");
                        if let Some(stopper) = on_panic {
                            stopper.end(VmExit::ThreadPanicked {
                                thread: name,
                                message,
                            });
                        }
                        resume_unwind(payload)
                    }
                }
            })
        })
    }
}

impl ThreadSpawner for Spawner {
    fn spawn_device_thread(
        &self,
        kind: DeviceThread,
        body: Box<dyn FnOnce() + Send>,
    ) -> io::Result<JoinHandle<()>> {
        self.spawn(ThreadKind::Device(kind), body)
    }
}

/// The text of a panic (`panic!` with a literal or with formatting), or a placeholder.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn a_panic_ends_the_vm_naming_the_thread() {
        let (tx, rx) = channel();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let spawner = Spawner::new(Stopper::new(tx, evt.try_clone().unwrap()));
        let thread = spawner
            .spawn(ThreadKind::Relay("test relay"), || -> u32 {
                panic!("bad {}", "luck")
            })
            .unwrap();
        assert!(thread.join().is_err(), "the panic reaches the joiner");
        assert_eq!(evt.read().unwrap(), 1);
        let exit = rx.try_recv().unwrap();
        assert_eq!(
            exit,
            VmExit::ThreadPanicked {
                thread: "test relay".into(),
                message: "bad luck".into()
            }
        );
        assert_eq!(exit.exit_code(), 1);
        assert_eq!(
            exit.to_string(),
            "hull-vmm's thread `test relay` panicked: bad luck"
        );
    }

    #[test]
    fn threads_are_named_and_return_their_value() {
        let thread = Spawner::detached()
            .spawn(ThreadKind::Vcpu(3), || {
                std::thread::current().name().map(str::to_owned)
            })
            .unwrap();
        assert_eq!(thread.join().unwrap().as_deref(), Some("vcpu3"));
        let quiet = Spawner::detached()
            .spawn(ThreadKind::OutputDrain, || panic!("only logged"))
            .unwrap();
        assert!(quiet.join().is_err());
        for kind in [
            ThreadKind::Device(DeviceThread::FsWorker),
            ThreadKind::ControlListener,
            ThreadKind::Vcpu(255),
        ] {
            assert!(kind.name().len() <= 15, "{kind:?}");
        }
    }
}
