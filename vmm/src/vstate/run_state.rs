//! A vCPU's run state — running, paused, stopped — as the VMM asks for it and the vCPU's own
//! thread acknowledges it.
//!
//! The vCPU fd stays with its thread. To change the state, the owner ([`VcpuHandle`]) records
//! the state asked for under the vCPU's lock and, unless the thread is already parked, sets
//! `immediate_exit` in the vCPU's `kvm_run` and sends the thread the kick signal once:
//! - in `KVM_RUN`, the signal makes KVM return `EINTR`;
//! - about to enter it, `immediate_exit` makes KVM return `EINTR` at once (after completing a
//!   pending I/O or MMIO exit, so the registers are whole);
//! - handling an exit, the next `KVM_RUN` is that second case.
//!
//! On `EINTR` the thread takes the lock, clears `immediate_exit` and looks at what is asked:
//! it parks on a condition variable for "paused", returns for "stopped", and says which (the
//! acknowledgement the owner waits for). Because the request and the clearing happen under the
//! same lock, no kick is lost and none has to be repeated. While parked, the thread runs jobs
//! the owner hands it ([`VcpuHandle::run_paused`]) on its vCPU fd: reading the registers of a
//! paused vCPU is that, and so will be saving a snapshot.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::Killable;

use crate::vstate::vcpu::AssistStats;

/// Errors of the run-state requests.
#[derive(Debug, thiserror::Error)]
pub enum RunStateError {
    /// The vCPU's thread has ended (the VM ended, or the thread panicked).
    #[error("vcpu{index}: its thread has ended")]
    Exited { index: u8 },
    /// The vCPU's thread did not answer in time (stuck in a device call).
    #[error("vcpu{index}: did not acknowledge {what} in time")]
    Unresponsive { index: u8, what: &'static str },
    /// A job for a paused vCPU was handed to one that is not paused.
    #[error("vcpu{index}: not paused")]
    NotPaused { index: u8 },
    /// No vCPU has this index, or the vCPUs have not been started.
    #[error("vcpu{index}: no such running vCPU")]
    NoSuchVcpu { index: u8 },
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] std::io::Error),
}

/// What the owner asks of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Stay out of `KVM_RUN`, parked, with the guest's state complete and readable.
    Paused,
    /// Leave the run loop for good.
    Stopped,
}

/// What the vCPU's thread last said it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// The thread has not reached its loop yet.
    Starting,
    Running,
    Paused,
    /// The thread has left its loop (stopped, ended the VM, or panicked).
    Exited,
}

/// Work for a paused vCPU's thread, on its vCPU fd.
type Job = Box<dyn FnOnce(&VcpuFd) + Send>;

/// The `immediate_exit` byte of a vCPU's `kvm_run` mapping.
struct ImmediateExit(NonNull<u8>);

// SAFETY: the pointer refers to the vCPU's `kvm_run` mapping, which any thread may write (it
// is shared memory, read by KVM at KVM_RUN). It is dereferenced only under the vCPU's lock, and
// only while registered: the vCPU's thread unregisters it before the vCPU fd, and with it the
// mapping, is dropped (`Registration`).
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    fn store(&self, value: u8) {
        // SAFETY: `AtomicU8::from_ptr` needs the pointer to be valid and aligned for the
        // reference's lifetime, and no non-atomic access to race with it. The byte is in the
        // `kvm_run` mapping, which stays mapped while the pointer is registered (see the
        // `Send` impl); a u8 is always aligned; hull-vmm writes the byte only through here,
        // under the vCPU's lock (kvm-ioctls only reads `kvm_run` after KVM_RUN returns).
        unsafe { AtomicU8::from_ptr(self.0.as_ptr()) }.store(value, Ordering::SeqCst);
    }
}

/// What the owner and the vCPU's thread share, under the vCPU's lock.
struct Shared {
    asked: RunState,
    acked: Ack,
    job: Option<Job>,
    /// Registered by the vCPU's thread while its fd exists.
    immediate_exit: Option<ImmediateExit>,
}

/// One vCPU's run state: the lock and the condition variable both sides wait on.
pub struct VcpuControl {
    index: u8,
    shared: Mutex<Shared>,
    changed: Condvar,
}

/// What the run loop does after a kick.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// Enter the guest again.
    Run,
    /// Leave the loop.
    Stop,
}

/// While it lives, the owner may set `immediate_exit` of the registered vCPU; when dropped
/// (also while the vCPU's thread unwinds from a panic), the thread counts as exited.
pub struct Registration(Arc<VcpuControl>);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shared = self.0.lock();
        shared.immediate_exit = None;
        shared.acked = Ack::Exited;
        shared.job = None;
        self.0.changed.notify_all();
    }
}

impl VcpuControl {
    /// The run state of vCPU `index`, asked to run.
    pub fn new(index: u8) -> Arc<Self> {
        Arc::new(Self {
            index,
            shared: Mutex::new(Shared {
                asked: RunState::Running,
                acked: Ack::Starting,
                job: None,
                immediate_exit: None,
            }),
            changed: Condvar::new(),
        })
    }

    /// The lock holds plain values, each consistent on its own: a panic elsewhere does not
    /// make them wrong.
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called on the vCPU's thread before its loop: lets the owner kick `fd` out of
    /// `KVM_RUN`. Keep the registration until just before `fd` is dropped.
    pub fn register(self: &Arc<Self>, fd: &mut VcpuFd) -> Registration {
        let immediate_exit = ImmediateExit(NonNull::from(&mut fd.get_kvm_run().immediate_exit));
        let mut shared = self.lock();
        // Asked to pause or stop before the thread ran: the first KVM_RUN returns at once.
        immediate_exit.store(u8::from(shared.asked != RunState::Running));
        shared.immediate_exit = Some(immediate_exit);
        shared.acked = Ack::Running;
        self.changed.notify_all();
        Registration(self.clone())
    }

    /// Called on the vCPU's thread when `KVM_RUN` returned `EINTR`: clears `immediate_exit`,
    /// then does what is asked, parking (and running jobs on `fd`) while paused.
    pub fn park(&self, fd: &VcpuFd) -> Resume {
        let mut shared = self.lock();
        if let Some(immediate_exit) = &shared.immediate_exit {
            immediate_exit.store(0);
        }
        loop {
            match shared.asked {
                RunState::Running => {
                    if shared.acked != Ack::Running {
                        shared.acked = Ack::Running;
                        self.changed.notify_all();
                    }
                    return Resume::Run;
                }
                RunState::Stopped => return Resume::Stop,
                RunState::Paused => {
                    if shared.acked != Ack::Paused {
                        shared.acked = Ack::Paused;
                        self.changed.notify_all();
                    }
                    if let Some(job) = shared.job.take() {
                        drop(shared);
                        job(fd);
                        shared = self.lock();
                    } else {
                        shared = self
                            .changed
                            .wait(shared)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        }
    }

    /// Asks for `state`; returns whether the thread must be kicked (it may be in `KVM_RUN`).
    fn ask(&self, state: RunState) -> bool {
        let mut shared = self.lock();
        if shared.acked == Ack::Exited || shared.asked == RunState::Stopped {
            return false;
        }
        shared.asked = state;
        self.changed.notify_all();
        if state == RunState::Running || shared.acked == Ack::Paused {
            // A parked thread wakes on the condition variable.
            return false;
        }
        if let Some(immediate_exit) = &shared.immediate_exit {
            immediate_exit.store(1);
        }
        true
    }

    /// Waits until the thread acknowledges `want` (or exits), until `deadline`.
    fn wait_for(&self, want: Ack, deadline: Instant) -> Result<Ack, RunStateError> {
        let mut shared = self.lock();
        while shared.acked != want && shared.acked != Ack::Exited {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RunStateError::Unresponsive {
                    index: self.index,
                    what: match want {
                        Ack::Paused => "a pause",
                        Ack::Running => "a resume",
                        Ack::Starting | Ack::Exited => "a stop",
                    },
                });
            }
            shared = self
                .changed
                .wait_timeout(shared, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(shared.acked)
    }
}

/// The owner's side of a started vCPU: its run state and its thread.
pub struct VcpuHandle {
    control: Arc<VcpuControl>,
    thread: JoinHandle<AssistStats>,
}

impl VcpuHandle {
    /// The handle of a vCPU whose thread runs with `control`.
    pub fn new(control: Arc<VcpuControl>, thread: JoinHandle<AssistStats>) -> Self {
        Self { control, thread }
    }

    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.control.index
    }

    /// Asks for `state` and kicks the thread out of `KVM_RUN` if needed; does not wait.
    pub fn request(&self, state: RunState) {
        if self.control.ask(state) {
            // One signal is enough (see the module's documentation). A thread that has just
            // exited is still joinable, so its pthread handle is valid.
            if let Err(err) = self.thread.kill(kick_signal()) {
                log::error!("vcpu{}: cannot send the kick signal: {err}", self.index());
            }
        }
    }

    /// Waits until the thread acknowledges the pause asked with [`Self::request`].
    pub fn wait_paused(&self, deadline: Instant) -> Result<(), RunStateError> {
        match self.control.wait_for(Ack::Paused, deadline)? {
            Ack::Paused => Ok(()),
            _ => Err(RunStateError::Exited {
                index: self.index(),
            }),
        }
    }

    /// Waits until the thread acknowledges the resume asked with [`Self::request`].
    pub fn wait_running(&self, deadline: Instant) -> Result<(), RunStateError> {
        match self.control.wait_for(Ack::Running, deadline)? {
            Ack::Running => Ok(()),
            _ => Err(RunStateError::Exited {
                index: self.index(),
            }),
        }
    }

    /// Waits until the thread has left its loop (after a stop), then joins it. A thread still
    /// running at `deadline` is left behind, with an error naming it.
    pub fn join(self, deadline: Instant) -> Result<Option<AssistStats>, RunStateError> {
        self.control.wait_for(Ack::Exited, deadline)?;
        // A thread that panicked has no statistics (the panic has ended the VM already).
        Ok(self.thread.join().ok())
    }

    /// Runs `job` on the paused vCPU's thread, on its vCPU fd, and returns its result; the
    /// vCPU stays paused. Fails if the vCPU is not paused or does not answer by `deadline`.
    pub fn run_paused<T: Send + 'static>(
        &self,
        job: impl FnOnce(&VcpuFd) -> T + Send + 'static,
        deadline: Instant,
    ) -> Result<T, RunStateError> {
        let index = self.index();
        let (tx, rx) = channel();
        {
            let mut shared = self.control.lock();
            match (shared.asked, shared.acked) {
                (RunState::Paused, Ack::Paused) => {}
                (_, Ack::Exited) => return Err(RunStateError::Exited { index }),
                _ => return Err(RunStateError::NotPaused { index }),
            }
            shared.job = Some(Box::new(move |fd: &VcpuFd| {
                let _ = tx.send(job(fd));
            }));
            self.control.changed.notify_all();
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|err| match err {
                RecvTimeoutError::Timeout => RunStateError::Unresponsive {
                    index,
                    what: "a job while paused",
                },
                // The job was dropped: the thread exited before running it.
                RecvTimeoutError::Disconnected => RunStateError::Exited { index },
            })
    }
}

/// The signal that knocks a vCPU's thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler, which does nothing: the signal is there to interrupt
/// `KVM_RUN` (which it would not do if ignored, and would end the process by default).
/// `SA_RESTART` keeps a kick that lands during a device's system call (a console write) from
/// failing it; `KVM_RUN` itself is never restarted.
pub fn install_kick_handler() -> Result<(), RunStateError> {
    // SAFETY: all-zero is a valid `sigaction` (no handler, empty mask, no flags); the fields
    // that matter are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_kick;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `sigemptyset` writes the set it is given, a field of a live local.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is a complete `sigaction` whose handler is an `extern "C"` function
    // doing nothing (so async-signal-safe); the old action may be a null pointer.
    let rc = unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(RunStateError::KickHandler(std::io::Error::last_os_error()));
    }
    Ok(())
}
