//! Reaping: PID 1 collects every child that ends, its own and the orphans the kernel hands it.
//!
//! The main loop calls [`reap_all`] whenever a `SIGCHLD` arrives (signals are merged while
//! pending, so one signal may stand for many children) and once at start-up for children that
//! ended before the signal was blocked.

use std::fmt;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It called `exit` with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(Signal),
}

/// One child collected by [`reap_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: Pid,
    pub ending: Ending,
}

impl fmt::Display for Reaped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ending {
            Ending::Exited(code) => write!(f, "pid={} exit={code}", self.pid),
            Ending::Signaled(signal) => write!(f, "pid={} signal={}", self.pid, signal.as_str()),
        }
    }
}

/// Collects every child that has ended, without blocking, and says how each ended.
///
/// Stops when no ended child is left (or there are no children at all). Stopped or continued
/// children are not reaped: `WUNTRACED`/`WCONTINUED` are not asked for.
pub fn reap_all() -> Vec<Reaped> {
    let mut reaped = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => reaped.push(Reaped {
                pid,
                ending: Ending::Exited(code),
            }),
            Ok(WaitStatus::Signaled(pid, signal, _core)) => reaped.push(Reaped {
                pid,
                ending: Ending::Signaled(signal),
            }),
            // Nothing more has ended yet.
            Ok(WaitStatus::StillAlive) => break,
            // Not asked for; keep going in case more children have ended.
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            // ECHILD: no children at all. Nothing else is expected from waitpid(-1, WNOHANG).
            Err(_) => break,
        }
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// The only test in this binary that spawns children: `reap_all` takes any child of the
    /// test process, so a second one running in parallel could steal them.
    #[test]
    #[allow(clippy::zombie_processes, reason = "reap_all is the wait under test")]
    fn reaps_direct_children_and_orphans() {
        // Orphans of our children come to us instead of to the host's init.
        nix::sys::prctl::set_child_subreaper(true).unwrap();

        let mut expected = Vec::new();
        for code in [0, 3, 42] {
            let child = Command::new("/bin/sh")
                .args(["-c", &format!("exit {code}")])
                .spawn()
                .unwrap();
            expected.push((Pid::from_raw(child.id() as i32), Ending::Exited(code)));
        }
        let child = Command::new("/bin/sh")
            .args(["-c", "kill -KILL $$"])
            .spawn()
            .unwrap();
        expected.push((
            Pid::from_raw(child.id() as i32),
            Ending::Signaled(Signal::SIGKILL),
        ));

        // A grandchild that outlives its parent: it is re-parented to us and must be reaped.
        let out = Command::new("/bin/sh")
            .args([
                "-c",
                "(sleep 0.2; exit 5) </dev/null >/dev/null 2>&1 & echo $!; exit 7",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let parent = Pid::from_raw(out.id() as i32);
        let out = out.wait_with_output();
        // wait_with_output reaps the parent itself (waitpid on its pid), before we look.
        let orphan: i32 = match out {
            Ok(out) => String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
            Err(e) => panic!("reading the orphan's pid: {e}"),
        };
        expected.push((Pid::from_raw(orphan), Ending::Exited(5)));

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while expected.iter().any(|e| !seen.contains(e)) {
            assert!(
                Instant::now() < deadline,
                "not reaped: expected {expected:?}, seen {seen:?}"
            );
            seen.extend(reap_all().into_iter().map(|r| (r.pid, r.ending)));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !seen.iter().any(|(pid, _)| *pid == parent),
            "parent reaped twice"
        );
        assert_eq!(reap_all(), []);
        assert_eq!(
            Reaped {
                pid: Pid::from_raw(9),
                ending: Ending::Signaled(Signal::SIGTERM)
            }
            .to_string(),
            "pid=9 signal=SIGTERM"
        );
    }
}
