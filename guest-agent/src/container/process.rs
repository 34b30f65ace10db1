//! The container's init after the start: it becomes the spec's process and calls `execve`.
//!
//! Order, as runc's: rlimits; the bounding set (needs `CAP_SETPCAP`, so before the user
//! change); the user with `PR_SET_KEEPCAPS` so permitted capabilities survive `setresuid`; the
//! capability sets and the ambient set; umask; working directory; `no_new_privs`; signal mask and
//! `SIGPIPE` back to their defaults; the seccomp filter; `execve` with the program looked up in
//! the `PATH` of `process.env`.
//!
//! The seccomp filter comes last so that the setup's own system calls are not filtered, but only
//! with `noNewPrivileges`: without it, installing a filter takes `CAP_SYS_ADMIN`, which a
//! non-root `process.user` or the capability sets may take away. Then, as in runc, the filter
//! goes in right after the rlimits, while the init still has every capability, and the rest of
//! the setup runs under it.

use std::ffi::CString;
use std::path::Path;

use hull_protocol::spec::{Process, RlimitKind};
use hull_protocol::{ErrorKind, ErrorResponse};
use nix::errno::Errno;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chdir, execve, setgroups, setresgid, setresuid, Gid, Uid};

use super::{CapPlan, SeccompPlan};
use crate::boot_command::DEFAULT_PATH;
use crate::sys;

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::Io, format!("{what}: {e}"))
}

/// The rlimit of a kind.
pub fn resource(kind: RlimitKind) -> Resource {
    match kind {
        RlimitKind::As => Resource::RLIMIT_AS,
        RlimitKind::Core => Resource::RLIMIT_CORE,
        RlimitKind::Cpu => Resource::RLIMIT_CPU,
        RlimitKind::Data => Resource::RLIMIT_DATA,
        RlimitKind::Fsize => Resource::RLIMIT_FSIZE,
        RlimitKind::Locks => Resource::RLIMIT_LOCKS,
        RlimitKind::Memlock => Resource::RLIMIT_MEMLOCK,
        RlimitKind::Msgqueue => Resource::RLIMIT_MSGQUEUE,
        RlimitKind::Nice => Resource::RLIMIT_NICE,
        RlimitKind::Nofile => Resource::RLIMIT_NOFILE,
        RlimitKind::Nproc => Resource::RLIMIT_NPROC,
        RlimitKind::Rss => Resource::RLIMIT_RSS,
        RlimitKind::Rtprio => Resource::RLIMIT_RTPRIO,
        RlimitKind::Rttime => Resource::RLIMIT_RTTIME,
        RlimitKind::Sigpending => Resource::RLIMIT_SIGPENDING,
        RlimitKind::Stack => Resource::RLIMIT_STACK,
    }
}

/// Gives the process `pid`, which has not started yet, `process.rlimits` (`prlimit`), from the
/// agent, as runc sets them from outside: rlimits are not namespaced, and a process in a user
/// namespace cannot raise a hard limit itself (`RLIMIT_NOFILE` of 1048576 from Podman). The
/// process sets the same values again, which is then no raise.
pub fn set_rlimits_of(pid: nix::unistd::Pid, process: &Process) -> Result<(), ErrorResponse> {
    for (i, r) in process.rlimits.iter().enumerate() {
        sys::prlimit(pid, resource(r.kind), r.soft, r.hard)
            .map_err(|e| io(format!("process.rlimits[{i}] {}", r.kind.oci_name()), e))?;
    }
    Ok(())
}

/// Becomes `process` and execs it; returns only the error that stopped it.
pub fn exec(
    process: &Process,
    caps: Option<&CapPlan>,
    seccomp: Option<&SeccompPlan>,
) -> ErrorResponse {
    match prepare(process, caps, seccomp).and_then(|()| exec_program(process)) {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

fn prepare(
    process: &Process,
    caps: Option<&CapPlan>,
    seccomp: Option<&SeccompPlan>,
) -> Result<(), ErrorResponse> {
    // Nothing of the agent's reaches the container but its stdio (or terminal); first, before
    // a seccomp filter could refuse the call.
    sys::cloexec_above_stdio().map_err(|e| io("close_range(3, ~0, CLOSE_RANGE_CLOEXEC)", e))?;
    for (i, r) in process.rlimits.iter().enumerate() {
        setrlimit(resource(r.kind), r.soft, r.hard)
            .map_err(|e| io(format!("process.rlimits[{i}] {}", r.kind.oci_name()), e))?;
    }
    if let Some(seccomp) = seccomp.filter(|_| !process.no_new_privileges) {
        seccomp.install()?;
    }
    if let Some(caps) = caps {
        let last = super::caps::last_cap(Path::new("/proc"));
        for cap in 0..=last.min(63) {
            if caps.bounding & (1 << cap) == 0 {
                sys::capbset_drop(cap)
                    .map_err(|e| io("process.capabilities.bounding: dropping", e))?;
            }
        }
        nix::sys::prctl::set_keepcaps(true).map_err(|e| io("prctl(PR_SET_KEEPCAPS)", e))?;
    }
    let user = &process.user;
    let groups: Vec<Gid> = user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(|e| {
        io(
            format!("process.user.additionalGids {:?}", user.additional_gids),
            e,
        )
    })?;
    let gid = Gid::from_raw(user.gid);
    setresgid(gid, gid, gid).map_err(|e| io(format!("process.user.gid {}", user.gid), e))?;
    let uid = Uid::from_raw(user.uid);
    setresuid(uid, uid, uid).map_err(|e| io(format!("process.user.uid {}", user.uid), e))?;
    if let Some(caps) = caps {
        nix::sys::prctl::set_keepcaps(false).map_err(|e| io("prctl(PR_SET_KEEPCAPS)", e))?;
        sys::capset(caps.sets).map_err(|e| io("process.capabilities: capset", e))?;
        sys::ambient_clear().map_err(|e| io("process.capabilities.ambient: clearing", e))?;
        for cap in 0..64 {
            if caps.ambient & (1 << cap) != 0 {
                // An ambient capability must also be permitted and inheritable. runc's default
                // spec lists ambient capabilities without inheritable ones and runc goes on when
                // raising them fails (with a warning in its own log); so does the agent, whose
                // only channel here would be the container's own stderr.
                let _ = sys::ambient_raise(cap);
            }
        }
    }
    umask(Mode::from_bits_truncate(user.umask.unwrap_or(0o022)));
    chdir(process.cwd.as_str()).map_err(|e| io(format!("process.cwd {:?}", process.cwd), e))?;
    if process.no_new_privileges {
        nix::sys::prctl::set_no_new_privs().map_err(|e| io("process.noNewPrivileges", e))?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| io("resetting the signal mask", e))?;
    sys::default_sigpipe().map_err(|e| io("resetting SIGPIPE", e))?;
    if let Some(seccomp) = seccomp.filter(|_| process.no_new_privileges) {
        seccomp.install()?;
    }
    Ok(())
}

fn cstring(field: &str, s: &str) -> Result<CString, ErrorResponse> {
    CString::new(s).map_err(|_| {
        ErrorResponse::new(
            ErrorKind::InvalidSpec,
            format!("{field} {s:?} contains a NUL byte"),
        )
    })
}

fn exec_program(process: &Process) -> Result<std::convert::Infallible, ErrorResponse> {
    let args = process
        .args
        .iter()
        .map(|a| cstring("process.args", a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = process
        .env
        .iter()
        .map(|e| cstring("process.env", e))
        .collect::<Result<Vec<_>, _>>()?;
    // Checked before the fork (`validate_process`); a child that cannot go on says so anyway.
    let Some(program) = process.args.first() else {
        return Err(ErrorResponse::new(
            ErrorKind::InvalidSpec,
            "process.args is empty",
        ));
    };
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.clone()]
    } else {
        let path = process
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .map(|dir| {
                let dir = if dir.is_empty() { "." } else { dir };
                format!("{dir}/{program}")
            })
            .collect()
    };
    // Like execvpe: a missing candidate moves on; any other error is remembered.
    let mut found_error = None;
    for candidate in &candidates {
        let c = cstring("process.args[0]", candidate)?;
        match execve(&c, &args, &env) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
            Err(e) => {
                found_error.get_or_insert((candidate.clone(), e));
            }
            Ok(never) => match never {},
        }
    }
    Err(match found_error {
        Some((candidate, e)) => io(
            format!("process.args[0] {program:?}: execve {candidate}"),
            e,
        ),
        None => ErrorResponse::new(
            ErrorKind::InvalidSpec,
            format!("process.args[0] {program:?}: not found in the PATH of process.env"),
        ),
    })
}
