//! seccomp filters for hull-vmm's threads (DESIGN.md, Security): one allow-list per kind of
//! thread, the rest killing the process (`SECCOMP_RET_KILL_PROCESS`).
//!
//! How the filters go on:
//! - [`enable`], early in `main`, chooses the action for a call outside the lists and starts
//!   the *spawner* thread. From then on every thread `Spawner` starts is created by the
//!   spawner thread (see `thread`), so it inherits only the spawner's filter, the union of
//!   every kind's list, never the narrower filter of the thread that asked for it (a vCPU
//!   starts the fs worker when the guest activates the device, and a filter, once installed,
//!   is inherited and cannot be lifted).
//! - Each thread installs its own kind's filter first thing (`ThreadKind::enter`).
//! - The main thread installs the event loop's filter ([`Filter::Vmm`]) just before running
//!   it, when the VM is built.
//!
//! The lists are what each kind does, measured with `strace -f` over container lifecycles and
//! the end-to-end suite run with `HULL_VMM_SECCOMP=log` (every call outside a list is then
//! logged by the kernel with the thread's name, and allowed). They filter by system call, not by
//! argument: `ioctl` is open to the threads that use KVM or terminals.
//!
//! `HULL_VMM_SECCOMP`: `kill` (the default), `log` (allow and log what a list misses, for
//! finding what a list lacks), `off` (no filters; for debugging only).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What happens on a call outside the thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The process is killed (`SIGSYS`).
    Kill,
    /// The call is allowed and the kernel logs it (the audit log or `dmesg`).
    Log,
    /// No filters at all.
    Off,
}

impl Mode {
    /// From `HULL_VMM_SECCOMP` (unset: [`Mode::Kill`]).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("HULL_VMM_SECCOMP").as_deref() {
            Err(_) | Ok("") | Ok("kill") => Ok(Mode::Kill),
            Ok("log") => Ok(Mode::Log),
            Ok("off") => Ok(Mode::Off),
            Ok(other) => Err(format!(
                "HULL_VMM_SECCOMP={other:?}: expected kill, log or off"
            )),
        }
    }
}

/// Every kind's filter, compiled once, when filters are on.
static FILTERS: OnceLock<BTreeMap<Filter, BpfProgram>> = OnceLock::new();

/// Which allow-list a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Filter {
    /// The main thread's event loop: devices' host side, vsock sockets, timers.
    Vmm,
    /// A vCPU: `KVM_RUN` and the device buses (activation and reset included).
    Vcpu,
    /// The virtio-fs worker: the file system calls of the FUSE server.
    FsWorker,
    /// `sigwait` for forwarded signals.
    Signals,
    /// The container supervisor: the agent's connection, the host pty, the control socket.
    Supervisor,
    /// Reads the agent's control connection.
    AgentReader,
    /// Accepts control-socket clients.
    ControlListener,
    /// Serves one control-socket client.
    ControlClient,
    /// Copies a stream between a host descriptor and a vsock connection.
    Relay,
    /// Waits for the init's output to drain.
    OutputDrain,
    /// Starts every other thread: the union of all lists, and `clone`.
    Spawner,
}

impl Filter {
    const ALL: [Filter; 11] = [
        Filter::Vmm,
        Filter::Vcpu,
        Filter::FsWorker,
        Filter::Signals,
        Filter::Supervisor,
        Filter::AgentReader,
        Filter::ControlListener,
        Filter::ControlClient,
        Filter::Relay,
        Filter::OutputDrain,
        Filter::Spawner,
    ];

    /// The system calls this kind may make.
    pub fn allowed(self) -> Vec<i64> {
        let own: &[&[i64]] = match self {
            Filter::Vmm => &[VMM, STREAMS],
            Filter::Vcpu => &[VCPU],
            Filter::FsWorker => &[FS_WORKER],
            Filter::Signals => &[SIGNALS],
            Filter::Supervisor => &[SUPERVISOR, STREAMS],
            Filter::AgentReader | Filter::ControlClient | Filter::Relay => &[STREAMS],
            Filter::ControlListener => &[CONTROL_LISTENER],
            Filter::OutputDrain => &[],
            Filter::Spawner => {
                let mut all: Vec<i64> = SPAWNER.to_vec();
                for filter in Filter::ALL {
                    if filter != Filter::Spawner {
                        all.extend(filter.allowed());
                    }
                }
                all.sort_unstable();
                all.dedup();
                return all;
            }
        };
        let mut calls: Vec<i64> = EVERY_THREAD
            .iter()
            .chain(own.iter().copied().flatten())
            .copied()
            .collect();
        calls.sort_unstable();
        calls.dedup();
        calls
    }

    /// This kind's filter, compiled, with `mismatch` for calls outside the list.
    pub fn compile(self, mismatch: SeccompAction) -> Result<BpfProgram, String> {
        let rules = self
            .allowed()
            .into_iter()
            .map(|call| (call, vec![]))
            .collect();
        let arch =
            TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
            .map_err(|e| format!("seccomp filter {self:?}: {e}"))?;
        BpfProgram::try_from(filter).map_err(|e| format!("seccomp filter {self:?}: {e}"))
    }

    /// Installs this kind's filter on the calling thread (nothing unless [`enable`]d).
    pub fn install(self) -> Result<(), String> {
        let Some(program) = FILTERS.get().and_then(|programs| programs.get(&self)) else {
            return Ok(());
        };
        seccompiler::apply_filter(program).map_err(|e| format!("seccomp filter {self:?}: {e}"))
    }
}

/// Turns the filters on for this process in `mode`: compiles every list, then starts the
/// spawner thread under its filter. Call once, early in `main`, before any thread starts.
pub fn enable(mode: Mode) -> Result<(), String> {
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
        Mode::Off => return Ok(()),
    };
    let mut programs = BTreeMap::new();
    for filter in Filter::ALL {
        programs.insert(filter, filter.compile(mismatch.clone())?);
    }
    FILTERS
        .set(programs)
        .map_err(|_| "seccomp: enabled twice".to_owned())?;
    crate::thread::start_spawner_thread()
        .map_err(|e| format!("cannot start the spawner thread: {e}"))
}

use libc::{
    SYS_accept, SYS_accept4, SYS_bind, SYS_brk, SYS_clock_gettime, SYS_clock_nanosleep, SYS_clone,
    SYS_clone3, SYS_close, SYS_connect, SYS_copy_file_range, SYS_dup, SYS_dup3, SYS_epoll_create1,
    SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_wait, SYS_eventfd2, SYS_exit, SYS_exit_group,
    SYS_fallocate, SYS_fchmod, SYS_fchmodat, SYS_fchown, SYS_fchownat, SYS_fcntl, SYS_fdatasync,
    SYS_fgetxattr, SYS_flock, SYS_fstat, SYS_fstatfs, SYS_fsync, SYS_ftruncate, SYS_futex,
    SYS_getdents64, SYS_getegid, SYS_geteuid, SYS_getgid, SYS_getpid, SYS_getrandom,
    SYS_getsockname, SYS_getsockopt, SYS_gettid, SYS_getuid, SYS_ioctl, SYS_linkat, SYS_listen,
    SYS_lseek, SYS_madvise, SYS_mkdirat, SYS_mknodat, SYS_mmap, SYS_mprotect, SYS_mremap,
    SYS_munmap, SYS_nanosleep, SYS_newfstatat, SYS_openat, SYS_poll, SYS_ppoll, SYS_prctl,
    SYS_pread64, SYS_preadv, SYS_preadv2, SYS_pwrite64, SYS_pwritev, SYS_pwritev2, SYS_read,
    SYS_readlinkat, SYS_readv, SYS_recvfrom, SYS_recvmsg, SYS_renameat, SYS_renameat2,
    SYS_restart_syscall, SYS_rseq, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn,
    SYS_rt_sigtimedwait, SYS_sched_getaffinity, SYS_sched_yield, SYS_seccomp, SYS_sendmsg,
    SYS_sendto, SYS_set_robust_list, SYS_setgroups, SYS_setresgid, SYS_setresuid, SYS_setsockopt,
    SYS_shutdown, SYS_sigaltstack, SYS_socket, SYS_statfs, SYS_statx, SYS_symlinkat, SYS_tgkill,
    SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime, SYS_tkill, SYS_umask, SYS_unlink,
    SYS_unlinkat, SYS_utimensat, SYS_write, SYS_writev,
};

/// What every thread does: memory, locks, signals, time, logging (a write to the log file or
/// standard error), a thread's start and end, a panic's message and unwinding, and what the
/// standard library reads once (`/sys` and `/proc` files, `/dev/urandom`).
const EVERY_THREAD: &[i64] = &[
    SYS_read,
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_openat,
    SYS_fstat,
    SYS_statx,
    SYS_newfstatat,
    SYS_lseek,
    SYS_fcntl,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_madvise,
    SYS_brk,
    SYS_sigaltstack,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_restart_syscall,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_gettid,
    SYS_getpid,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_getrandom,
    SYS_exit,
    SYS_exit_group,
    // `abort` after a panic during a panic.
    SYS_tgkill,
];

/// The event loop: epoll, eventfds, the vsock device's Unix sockets (accepting host clients,
/// connecting to host services), its connect timer, pausing vCPUs, and the end of the run.
const VMM: &[i64] = &[
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_ioctl,
    SYS_accept4,
    SYS_socket,
    SYS_connect,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
    SYS_tkill,
    SYS_dup,
    SYS_unlink,
    SYS_pread64,
    SYS_pwrite64,
    // The net device's TAP.
    SYS_readv,
];

/// A vCPU: KVM's ioctls, eventfds (ioeventfd writes, a device's activation and reset, which
/// may re-open the shared directory), and kicking another vCPU.
const VCPU: &[i64] = &[
    SYS_ioctl,
    SYS_eventfd2,
    SYS_epoll_ctl,
    SYS_umask,
    SYS_readlinkat,
    SYS_getdents64,
    SYS_tkill,
    SYS_dup,
];

/// The FUSE server: every file operation virtio-fs passes through, and the credential switch
/// it makes for a request from a guest user other than root.
const FS_WORKER: &[i64] = &[
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_fstatfs,
    SYS_statfs,
    SYS_getdents64,
    SYS_readlinkat,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_readv,
    SYS_umask,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_symlinkat,
    SYS_linkat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_renameat2,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_utimensat,
    SYS_flock,
    SYS_copy_file_range,
    SYS_fgetxattr,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setgroups,
    SYS_geteuid,
    SYS_getegid,
    SYS_dup,
];

const SIGNALS: &[i64] = &[SYS_rt_sigtimedwait];

/// Talking over a connected socket: the agent's connection, a stdio stream, a control client.
const STREAMS: &[i64] = &[
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_shutdown,
    SYS_poll,
    SYS_ppoll,
];

/// Besides [`STREAMS`]: connecting to the agent, the host pty (opened, made the controlling
/// terminal, its size read), the console socket, and the control socket; and a NIC put in a
/// slot (its TAP attached by `TUNSETIFF`, its wake eventfd made).
const SUPERVISOR: &[i64] = &[
    SYS_socket,
    SYS_connect,
    SYS_getsockname,
    SYS_bind,
    SYS_listen,
    SYS_unlink,
    SYS_ioctl,
    SYS_dup,
    SYS_dup3,
    SYS_eventfd2,
];

const CONTROL_LISTENER: &[i64] = &[
    SYS_accept,
    SYS_accept4,
    SYS_getsockopt,
    SYS_geteuid,
    SYS_getuid,
    SYS_getgid,
];

/// Starting a thread (its stack is `mmap`ed and guarded, in the list every thread has), which
/// then names itself and installs its own filter (`PR_SET_NO_NEW_PRIVS`, `seccomp`): inherited
/// from here, in no kind's own list.
const SPAWNER: &[i64] = &[SYS_clone, SYS_clone3, SYS_prctl, SYS_seccomp];

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child under `filter` (killing on a miss); returns how the child
    /// ended: `Ok(exit code)` or `Err(signal)`.
    fn in_child(filter: Filter, body: impl FnOnce() -> i32) -> Result<i32, i32> {
        let program = filter.compile(SeccompAction::KillProcess).unwrap();
        // SAFETY: the child makes system calls only (the program is compiled before the fork,
        // nothing allocates) and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match seccompiler::apply_filter(&program) {
                Ok(()) => body(),
                Err(_) => 100,
            };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFEXITED(status) {
            Ok(libc::WEXITSTATUS(status))
        } else {
            Err(libc::WTERMSIG(status))
        }
    }

    #[test]
    fn every_kind_of_thread_is_killed_by_a_call_outside_its_list() {
        for filter in Filter::ALL {
            // Allowed everywhere: the child goes on and exits normally.
            let pid = || {
                // SAFETY: getpid takes no arguments and touches no memory.
                let pid = unsafe { libc::getpid() };
                if pid > 0 {
                    7
                } else {
                    8
                }
            };
            assert_eq!(in_child(filter, pid), Ok(7), "{filter:?}");
            // Allowed nowhere: execve, mount, ptrace.
            for call in [libc::SYS_execve, libc::SYS_mount, libc::SYS_ptrace] {
                assert!(
                    !filter.allowed().contains(&call),
                    "{filter:?} allows {call}"
                );
                // SAFETY: a raw system call with null arguments; the filter stops it first.
                let ended = in_child(filter, || unsafe { libc::syscall(call, 0, 0, 0, 0) } as i32);
                assert_eq!(ended, Err(libc::SIGSYS), "{filter:?}, call {call}");
            }
        }
    }

    /// In a process of its own (this test binary run again): filters on, a vCPU thread starts
    /// the fs worker (as activation does); the worker may make a directory although the vCPU
    /// may not, because the spawner thread, not the vCPU, created it.
    #[test]
    fn a_thread_started_by_another_gets_its_own_filter_not_its_parent_s() {
        const CHILD: &str = "HULL_SECCOMP_TEST_CHILD";
        if let Ok(dir) = std::env::var(CHILD) {
            enable(Mode::Kill).unwrap();
            let spawner = crate::Spawner::detached();
            let inner = spawner.clone();
            let dir = std::path::PathBuf::from(dir);
            let vcpu = spawner
                .spawn(crate::ThreadKind::Vcpu(0), move || {
                    inner
                        .spawn(
                            crate::ThreadKind::Device(devices::DeviceThread::FsWorker),
                            move || {
                                use std::os::unix::ffi::OsStrExt;
                                let path =
                                    std::ffi::CString::new(dir.join("made").as_os_str().as_bytes())
                                        .unwrap();
                                // SAFETY: `path` is a NUL-terminated string that outlives the
                                // call. (mkdirat, as the FUSE server makes directories.)
                                let made =
                                    unsafe { libc::mkdirat(libc::AT_FDCWD, path.as_ptr(), 0o755) };
                                made == 0
                            },
                        )
                        .unwrap()
                        .join()
                        .unwrap()
                })
                .unwrap();
            std::process::exit(if vcpu.join().unwrap() { 0 } else { 3 });
        }
        let dir = std::env::temp_dir().join(format!("hull-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::a_thread_started_by_another_gets_its_own_filter_not_its_parent_s",
                "--test-threads=1",
            ])
            .env(CHILD, &dir)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        let made = dir.join("made").is_dir();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(made);
        // And a vCPU thread itself may not.
        assert!(!Filter::Vcpu.allowed().contains(&libc::SYS_mkdirat));
    }

    #[test]
    fn each_kind_is_narrower_than_the_spawner() {
        let spawner = Filter::Spawner.allowed();
        // SAFETY: a raw socket call; the filter stops it first.
        let socket = || unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, 1, 0) } as i32;
        for filter in Filter::ALL {
            for call in filter.allowed() {
                assert!(spawner.contains(&call), "{filter:?}: {call}");
            }
            let has_socket = filter.allowed().contains(&libc::SYS_socket);
            let ended = in_child(filter, || if socket() >= 0 { 0 } else { 1 });
            if has_socket {
                assert_eq!(ended, Ok(0), "{filter:?}");
            } else {
                assert_eq!(ended, Err(libc::SIGSYS), "{filter:?} may make sockets");
            }
        }
        // Kinds that must not open sockets or run KVM.
        assert!(!Filter::Vcpu.allowed().contains(&libc::SYS_socket));
        assert!(!Filter::FsWorker.allowed().contains(&libc::SYS_ioctl));
        assert!(!Filter::FsWorker.allowed().contains(&libc::SYS_socket));
        assert!(!Filter::Vcpu.allowed().contains(&libc::SYS_clone3));
    }
}
