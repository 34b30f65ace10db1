//! Bounds hull-vmm sets on itself before anything else (part of the jail, DESIGN.md Security):
//! its descriptor table fits what the file server may hold and no more, it never writes a core
//! dump, and it is not dumpable (no ptrace or `/proc/<pid>/mem` by other processes of its
//! user).

use std::io;

use devices::virtio::fs::confine::{MAX_HANDLES, MAX_INODES};

/// Descriptors hull-vmm may have open: the file server's inodes and handles at their caps,
/// and room for everything else (KVM, eventfds, sockets, vsock connections).
pub const MAX_DESCRIPTORS: u64 = (MAX_INODES + MAX_HANDLES) as u64 + 8192;

/// Sets `RLIMIT_NOFILE` to [`MAX_DESCRIPTORS`] (or the hard limit, if lower and it cannot be
/// raised), `RLIMIT_CORE` to 0, and makes the process not dumpable.
pub fn apply() -> io::Result<()> {
    let (_, hard) = rlimit(libc::RLIMIT_NOFILE)?;
    if set_rlimit(libc::RLIMIT_NOFILE, MAX_DESCRIPTORS, MAX_DESCRIPTORS).is_err() {
        // Without CAP_SYS_RESOURCE the hard limit cannot be raised: as many as it allows.
        let most = MAX_DESCRIPTORS.min(hard);
        set_rlimit(libc::RLIMIT_NOFILE, most, most)?;
    }
    set_rlimit(libc::RLIMIT_CORE, 0, 0)?;
    // SAFETY: prctl with PR_SET_DUMPABLE takes an integer argument and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The soft and hard limits of `resource`.
pub fn rlimit(resource: libc::__rlimit_resource_t) -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which lives for the call.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one rlimit from `limit`, which lives for the call.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_applied_them_has_them() {
        // Without CAP_SYS_RESOURCE (not even root has it on some hosts) the hard limit stays.
        let (_, hard) = rlimit(libc::RLIMIT_NOFILE).unwrap();
        // In a child: the limits would otherwise stay on the test process.
        // SAFETY: the child makes only system calls (no allocation, no locks) and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = match apply() {
                Err(_) => 1,
                Ok(()) => {
                    // SAFETY: as above.
                    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
                    match (rlimit(libc::RLIMIT_NOFILE), rlimit(libc::RLIMIT_CORE)) {
                        (Ok((soft, max)), Ok((0, 0)))
                            if soft == max
                                && (soft == MAX_DESCRIPTORS
                                    || soft == hard.min(MAX_DESCRIPTORS))
                                && dumpable == 0 =>
                        {
                            0
                        }
                        _ => 2,
                    }
                }
            };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` lives for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child's verdict");
    }
}
