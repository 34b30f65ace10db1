//! Bounds hull-vmm sets on itself before anything else (part of the jail, DESIGN.md Security):
//! its descriptor table fits what the file server may hold and no more, it never writes a core
//! dump, and it is not dumpable (no ptrace or `/proc/<pid>/mem` by other processes of its
//! user).

use std::io;

use nix::sys::prctl::set_dumpable;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use devices::virtio::fs::confine::{MAX_HANDLES, MAX_INODES};

/// Descriptors hull-vmm may have open: the file server's inodes and handles at their caps,
/// and room for everything else (KVM, eventfds, sockets, vsock connections).
pub const MAX_DESCRIPTORS: u64 = (MAX_INODES + MAX_HANDLES) as u64 + 8192;

/// Sets `RLIMIT_NOFILE` (soft and hard) to [`MAX_DESCRIPTORS`], or to the hard limit hull-vmm
/// inherited where that is lower: a host that set a lower one meant it, and the file server's
/// caps follow it. Sets `RLIMIT_CORE` to 0 and makes the process not dumpable.
pub fn apply() -> io::Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let most = MAX_DESCRIPTORS.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, most, most)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    set_dumpable(false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_applied_them_has_them() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // In a child: the limits would otherwise stay on the test process.
        // SAFETY: the child makes only system calls (no allocation, no locks) and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = match apply() {
                Err(_) => 1,
                Ok(()) => {
                    let dumpable = nix::sys::prctl::get_dumpable();
                    let nofile = getrlimit(Resource::RLIMIT_NOFILE);
                    match (nofile, getrlimit(Resource::RLIMIT_CORE)) {
                        (Ok((soft, max)), Ok((0, 0)))
                            if soft == max
                                && soft == hard.min(MAX_DESCRIPTORS)
                                && dumpable == Ok(false) =>
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
