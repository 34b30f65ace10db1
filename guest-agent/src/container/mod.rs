//! Setting up and starting the container, the way runc does it, in child processes.
//!
//! The agent (which has threads by now) forks an intermediate child that is a copy of one
//! thread only. It takes the stdio descriptors as 0, 1, 2, unshares the namespaces the spec asks
//! for (always a mount namespace) and forks the container's init, which is PID 1 of the new PID
//! namespace if there is one; it reports the init's pid and exits (the init is re-parented to
//! the agent, which reaps it). The init sets up its mounts and root (`setup.rs`), reports
//! `Ready` and blocks on the start pipe. [`Created::start`] writes one byte there; the init
//! then takes on the process's identity (`process.rs`) and calls `execve`.
//!
//! Reports travel on one pipe, as `hull-protocol` frames of [`Report`], each small enough for a
//! single atomic pipe write. The pipe is close-on-exec: after the start byte, its end of file
//! means `execve` succeeded; a `Failed` report means it did not. Errors carry the message the
//! host sees, naming the spec field and value at fault.

mod caps;
mod process;
mod seccomp;
mod setup;
mod syscalls;

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use hull_protocol::{read_frame, write_frame, ErrorKind, ErrorResponse};
use nix::fcntl::OFlag;
use nix::unistd::{pipe2, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::spec::{Process, Spec};
use crate::sys;

pub use caps::CapPlan;
pub use seccomp::SeccompPlan;

/// Where the container's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// A virtio-fs share with this tag (the guest).
    Virtiofs { tag: String },
    /// A directory bind-mounted in its place (the host tests).
    Bind(PathBuf),
}

/// Everything the children need, gathered and checked before the fork.
#[derive(Debug)]
pub struct Config {
    pub spec: Spec,
    pub process: Process,
    pub caps: Option<CapPlan>,
    pub seccomp: Option<SeccompPlan>,
    pub rootfs: RootfsSource,
    pub readonly: bool,
    /// Where the root file system is mounted before the switch of root.
    pub rootfs_dir: PathBuf,
    /// The agent's root: `/` in the guest, the test root on a host. Bind sources are here.
    pub agent_root: PathBuf,
    /// Do not try `pivot_root`; move the root and `chroot` (what the guest's initramfs needs
    /// anyway, see `setup.rs`). The host tests set it to cover that path.
    pub no_pivot: bool,
    /// The process's stdin, stdout, stderr.
    pub stdio: [OwnedFd; 3],
}

/// What [`Config::validate`] takes from the spec for the container's process.
#[derive(Debug)]
pub struct Validated {
    pub process: Process,
    pub caps: Option<CapPlan>,
    pub seccomp: Option<SeccompPlan>,
}

/// What the children report on the report pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    /// From the intermediate child: the init's pid in the agent's PID namespace.
    Pid(i32),
    /// From the init: set up, waiting for the start byte.
    Ready,
    /// From either: what failed.
    Failed(ErrorResponse),
}

/// A set-up container whose init waits for [`Created::start`].
#[derive(Debug)]
pub struct Created {
    pub init_pid: Pid,
    start: File,
    reports: File,
}

impl Config {
    /// Checks what can be checked before any process exists, so these errors are immediate
    /// and exact.
    pub fn validate(spec: &Spec) -> Result<Validated, ErrorResponse> {
        let invalid = |m: String| ErrorResponse::new(ErrorKind::InvalidSpec, m);
        let unsupported = |m: String| ErrorResponse::new(ErrorKind::Unsupported, m);
        let process = spec
            .process
            .clone()
            .ok_or_else(|| invalid("the spec has no process".into()))?;
        if process.args.is_empty() {
            return Err(invalid("process.args is empty".into()));
        }
        if !process.cwd.starts_with('/') {
            return Err(invalid(format!(
                "process.cwd {:?} is not absolute",
                process.cwd
            )));
        }
        if process.terminal {
            return Err(unsupported(
                "process.terminal true: a pty in the guest is not implemented yet".into(),
            ));
        }
        for (i, ns) in spec.linux.namespaces.iter().enumerate() {
            match ns.kind.as_str() {
                "pid" | "network" | "mount" | "ipc" | "uts" | "cgroup" => {}
                "user" => {
                    return Err(unsupported(format!(
                        "linux.namespaces[{i}] type \"user\": user namespaces are not implemented \
                         yet"
                    )))
                }
                other => {
                    return Err(invalid(format!(
                        "linux.namespaces[{i}]: unknown type {other:?}"
                    )))
                }
            }
        }
        if spec.hostname.is_some() && !spec.has_namespace("uts") {
            return Err(invalid(
                "hostname is set but linux.namespaces has no \"uts\" namespace".into(),
            ));
        }
        for (i, r) in process.rlimits.iter().enumerate() {
            process::resource(&r.kind).ok_or_else(|| {
                invalid(format!("process.rlimits[{i}]: unknown type {:?}", r.kind))
            })?;
        }
        let caps = process
            .capabilities
            .as_ref()
            .map(CapPlan::from_spec)
            .transpose()?;
        let seccomp = spec
            .linux
            .seccomp
            .as_ref()
            .map(SeccompPlan::from_spec)
            .transpose()?;
        Ok(Validated {
            process,
            caps,
            seccomp,
        })
    }
}

/// Forks the container's processes and waits until its init is set up (or has failed).
pub fn create(config: Config) -> Result<Created, ErrorResponse> {
    let io = |what: &str, e: nix::Error| ErrorResponse::new(ErrorKind::Io, format!("{what}: {e}"));
    let (reports_r, reports_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io("pipe", e))?;
    let (start_r, start_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io("pipe", e))?;
    match sys::fork().map_err(|e| io("fork", e))? {
        ForkResult::Child => {
            drop(reports_r);
            drop(start_w);
            intermediate(&config, File::from(reports_w), start_r)
        }
        ForkResult::Parent { .. } => {}
    }
    // Only the children hold these now, so the pipes end when the children do.
    drop(reports_w);
    drop(start_r);
    drop(config);
    let mut reports = File::from(reports_r);
    let mut pid = None;
    let mut ready = false;
    while pid.is_none() || !ready {
        match read_frame::<_, Report>(&mut reports) {
            Ok(Some(Report::Pid(p))) => pid = Some(Pid::from_raw(p)),
            Ok(Some(Report::Ready)) => ready = true,
            Ok(Some(Report::Failed(err))) => return Err(err),
            Ok(None) => {
                return Err(ErrorResponse::new(
                    ErrorKind::Internal,
                    "container setup ended without a report",
                ))
            }
            Err(e) => {
                return Err(ErrorResponse::new(
                    ErrorKind::Internal,
                    format!("reading the container setup report: {e}"),
                ))
            }
        }
    }
    Ok(Created {
        init_pid: pid.expect("the loop ends only with a pid"),
        start: File::from(start_w),
        reports,
    })
}

impl Created {
    /// Lets the init exec the process; returns once `execve` has succeeded or failed.
    pub fn start(mut self) -> Result<Pid, ErrorResponse> {
        // A dead init (killed before the start) makes this fail; its exit is reported anyway.
        let _ = self.start.write_all(&[1]);
        drop(self.start);
        match read_frame::<_, Report>(&mut self.reports) {
            Ok(None) => Ok(self.init_pid),
            Ok(Some(Report::Failed(err))) => Err(err),
            Ok(Some(other)) => Err(ErrorResponse::new(
                ErrorKind::Internal,
                format!("unexpected container report after start: {other:?}"),
            )),
            Err(e) => Err(ErrorResponse::new(
                ErrorKind::Internal,
                format!("reading the container start report: {e}"),
            )),
        }
    }
}

/// Writes one report; a message too long for one atomic pipe write is cut.
fn report(pipe: &mut File, report: Report) {
    let report = match report {
        Report::Failed(mut err) if err.message.len() > 3000 => {
            let mut end = 3000;
            while !err.message.is_char_boundary(end) {
                end -= 1;
            }
            err.message.truncate(end);
            Report::Failed(err)
        }
        other => other,
    };
    // Nothing to do if the agent is gone: the child ends right after.
    let _ = write_frame(pipe, &report);
}

/// The intermediate child. Never returns.
fn intermediate(config: &Config, mut reports: File, start: OwnedFd) -> ! {
    let result = (|| -> Result<Pid, ErrorResponse> {
        setup::take_stdio(&config.stdio)?;
        setup::unshare_namespaces(&config.spec)?;
        match sys::fork().map_err(|e| ErrorResponse::new(ErrorKind::Io, format!("fork: {e}")))? {
            ForkResult::Child => init(config, reports.try_clone_or_exit(), start),
            ForkResult::Parent { child } => Ok(child),
        }
    })();
    match result {
        Ok(pid) => report(&mut reports, Report::Pid(pid.as_raw())),
        Err(err) => report(&mut reports, Report::Failed(err)),
    }
    sys::exit_now(0)
}

/// The container's init. Never returns.
fn init(config: &Config, mut reports: File, start: OwnedFd) -> ! {
    if let Err(err) = setup::prepare(config) {
        report(&mut reports, Report::Failed(err));
        sys::exit_now(1);
    }
    report(&mut reports, Report::Ready);
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(&start, &mut byte) {
            Ok(1) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            // The agent dropped the container without starting it.
            _ => sys::exit_now(0),
        }
    }
    drop(start);
    let err = process::exec(
        &config.process,
        config.caps.as_ref(),
        config.seccomp.as_ref(),
    );
    report(&mut reports, Report::Failed(err));
    sys::exit_now(127)
}

trait TryCloneOrExit {
    fn try_clone_or_exit(&self) -> Self;
}

impl TryCloneOrExit for File {
    /// In a forked child there is nobody to tell; without its report pipe the child can only
    /// end, and the agent sees the pipe end without a report.
    fn try_clone_or_exit(&self) -> Self {
        self.try_clone().unwrap_or_else(|_| sys::exit_now(1))
    }
}
