//! The agent's raw system calls: the few that neither std nor nix wraps safely.
//!
//! This is the only module with `unsafe` code. Each call has a `// SAFETY:` comment.

#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::unistd::ForkResult;

/// `fork(2)`. The agent has threads (control, stdio) when it forks containers, so the child
/// holds a copy of the calling thread only.
///
/// Callers' child side must stay away from locks other threads may have held at the fork: the
/// server's state, stdout/stderr (`console`). It may allocate: glibc's `fork` resets malloc's
/// locks in the child.
pub fn fork() -> nix::Result<ForkResult> {
    // SAFETY: nix requires the child of a multithreaded process to call only async-signal-safe
    // functions. The agent's children keep to what is stated above: system calls, heap
    // allocation (made fork-safe by glibc's atfork handling of malloc) and no lock shared with
    // another thread; they end in `execve` or `_exit`.
    unsafe { nix::unistd::fork() }
}

/// Restores the default disposition of `SIGPIPE`, which Rust's runtime ignores and `execve`
/// would pass on to the container's process as "ignored".
pub fn default_sigpipe() -> nix::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_DFL installs no handler, so no Rust code runs in signal context.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map(drop)
}

/// `prctl(PR_CAPBSET_DROP, cap)`: removes `cap` from the bounding set.
pub fn capbset_drop(cap: u32) -> nix::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes an integer argument and touches no memory of ours.
    let res = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
    Errno::result(res).map(drop)
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)`.
pub fn ambient_raise(cap: u32) -> nix::Result<()> {
    // SAFETY: integer arguments only; no memory of ours is touched.
    let res = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(cap),
            0,
            0,
        )
    };
    Errno::result(res).map(drop)
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
pub fn ambient_clear() -> nix::Result<()> {
    // SAFETY: integer arguments only; no memory of ours is touched.
    let res = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Errno::result(res).map(drop)
}

/// The three capability sets of `capset(2)`, as 64-bit masks (bit N = capability N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// `_LINUX_CAPABILITY_VERSION_3` from `include/uapi/linux/capability.h`: two 32-bit words.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `capset(2)` on the calling thread.
pub fn capset(sets: CapSets) -> nix::Result<()> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |mask: u64, i: u32| (mask >> (32 * i)) as u32;
    let data = [0, 1].map(|i| CapUserData {
        effective: word(sets.effective, i),
        permitted: word(sets.permitted, i),
        inheritable: word(sets.inheritable, i),
    });
    // SAFETY: version 3 takes a header and an array of two data structs, which is what is
    // passed; both live across the call and have the kernel's C layout.
    let res = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapUserHeader,
            data.as_ptr(),
        )
    };
    Errno::result(res).map(drop)
}

/// Takes ownership of a descriptor a system call just returned (`accept4`).
pub fn owned_fd(raw: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller passes a descriptor fresh from a system call, open and owned by
    // nothing else, so the OwnedFd is its only owner and closes it once.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}

/// `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`: every descriptor above the standard streams
/// closes at the next `execve`, whether or not it was opened close-on-exec (those still needed
/// until then, like the report pipe, stay usable).
pub fn cloexec_above_stdio() -> nix::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes plain integers and only sets descriptor flags; no memory is
    // passed.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    Errno::result(rc).map(drop)
}

/// `_exit(2)`: ends a forked child without running the parent's exit handlers or flushing
/// buffers it copied from the agent.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it ends the process and never returns.
    unsafe { libc::_exit(code) }
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)` on the calling thread. Unlike seccompiler's
/// `apply_filter` it leaves `no_new_privs` alone: that is `process.noNewPrivileges`'s to decide
/// (without it the caller needs `CAP_SYS_ADMIN`).
pub fn seccomp_set_filter(
    program: &[seccompiler::sock_filter],
    flags: libc::c_ulong,
) -> nix::Result<()> {
    let len = u16::try_from(program.len()).map_err(|_| Errno::EINVAL)?;
    let prog = libc::sock_fprog {
        len,
        // seccompiler's `sock_filter` is `repr(C)` with the kernel's fields (u16, u8, u8, u32),
        // the same layout as libc's.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `prog` points at `len` instructions of the kernel's `struct sock_filter` layout,
    // alive across the call; the kernel copies them and keeps no pointer to our memory.
    let res = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    Errno::result(res).map(drop)
}

/// `ioctl(master, TIOCSPTLCK, &0)`: unlocks the slave of a pty master (`unlockpt(3)`).
pub fn pty_unlock(master: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through its pointer argument, which points at a live
    // local of that type; the descriptor is borrowed, so it is open across the call.
    let res = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) };
    Errno::result(res).map(drop)
}

/// `ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)`: opens the slave of a pty master
/// through the master itself, so no `/dev/pts` path is looked up (Linux 4.13).
pub fn pty_peer(master: std::os::fd::BorrowedFd<'_>) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as an integer argument and touches no memory of
    // ours; the master is borrowed, so it is open across the call.
    let res = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    Errno::result(res).map(owned_fd)
}

/// `ioctl(fd, TIOCSCTTY, 0)`: makes the terminal `fd` the controlling terminal of the calling
/// process, which must be a session leader without one (after `setsid`).
pub fn set_controlling_terminal(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal it from another session)
    // and touches no memory of ours; the descriptor is borrowed, so it is open.
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0 as libc::c_int) };
    Errno::result(res).map(drop)
}

/// `ioctl(fd, TIOCSWINSZ)`: sets a terminal's window size (on the master or the slave); the
/// kernel sends `SIGWINCH` to the foreground process group if it changed.
pub fn set_window_size(fd: std::os::fd::BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` through its pointer argument, which points
    // at a live local of libc's (the kernel's) layout; the descriptor is borrowed, so it is open.
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    Errno::result(res).map(drop)
}

/// `ioctl(fd, TIOCGWINSZ)`: a terminal's window size as (rows, columns).
/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// The most entropy [`add_entropy`] credits at once.
pub const MAX_ENTROPY: usize = 512;

/// `struct rand_pool_info` with its buffer.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

/// Credits `entropy` (at most [`MAX_ENTROPY`] bytes are taken) to the kernel's pool through
/// `random` (`/dev/urandom` opened for writing), then has the kernel reseed its generator.
pub fn add_entropy(random: std::os::fd::BorrowedFd<'_>, entropy: &[u8]) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let len = entropy.len().min(MAX_ENTROPY);
    let mut info = RandPoolInfo {
        entropy_count: (len * 8) as libc::c_int,
        buf_size: len as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..len].copy_from_slice(&entropy[..len]);
    // SAFETY: RNDADDENTROPY reads a `rand_pool_info` whose buffer holds `buf_size` bytes; `info`
    // is one, alive across the call.
    Errno::result(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    Errno::result(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) })?;
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `ns` nanoseconds since the epoch.
pub fn set_realtime(ns: u64) -> nix::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec, alive across the call.
    Errno::result(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

#[cfg(test)]
pub fn window_size(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<(u16, u16)> {
    use std::os::fd::AsRawFd;
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through its pointer argument, which points
    // at a live, writable local of libc's (the kernel's) layout; the descriptor is borrowed.
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    Errno::result(res).map(|_| (size.ws_row, size.ws_col))
}

/// Brings the loopback interface `lo` of the calling process's network namespace up
/// (`SIOCGIFFLAGS`, then `SIOCSIFFLAGS` with `IFF_UP`), as runc does in a new network
/// namespace: a new namespace's `lo` starts down, and programs that talk to themselves over
/// `127.0.0.1` would get "Network is unreachable".
pub fn loopback_up() -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: an all-zero `ifreq` is valid; the name is NUL-terminated within it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: both ioctls read and write only `req`, which lives across the calls.
    let got = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(got)?;
    // SAFETY: `SIOCGIFFLAGS` filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    let set = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(set).map(drop)
}

/// `setdomainname(2)`.
pub fn set_domainname(name: &str) -> nix::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which the call only reads.
    let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    Errno::result(rc).map(drop)
}

/// `personality(2)` with the execution domain `persona` (`PER_LINUX`, `PER_LINUX32`).
pub fn set_personality(persona: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: takes a value, touches no memory of ours.
    let rc = unsafe { libc::personality(persona) };
    Errno::result(rc).map(drop)
}

/// `prlimit(2)`: sets the limit `resource` of process `pid` to `soft` and `hard`.
pub fn prlimit(
    pid: nix::unistd::Pid,
    resource: nix::sys::resource::Resource,
    soft: u64,
    hard: u64,
) -> nix::Result<()> {
    let limit = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` outlives the call, which only reads it; no old limit is asked for.
    let rc = unsafe { libc::prlimit64(pid.as_raw(), resource as _, &limit, std::ptr::null_mut()) };
    Errno::result(rc).map(drop)
}
