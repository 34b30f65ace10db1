//! Setting up and starting the container's processes, the way runc does it, in child processes.
//!
//! The agent (which has threads by now) forks an intermediate child that is a copy of one
//! thread only. It takes the stdio descriptors as 0, 1, 2 and enters the container's namespaces:
//! for the init it unshares those the spec asks for (always a mount namespace), for an exec'd
//! process it joins the init's (`setns`). Then it forks the process itself, which is in the
//! container's PID namespace if there is one, reports the process's pid and exits (the process
//! is re-parented to the agent, which reaps it). The process sets up its mounts and root
//! (`setup.rs`; an exec'd process takes the init's root), opens its terminal if it has one
//! (`terminal.rs`), reports `Ready` and blocks on the start pipe. [`Created::start`] writes one
//! byte there; the process then takes on the OCI process's identity (`process.rs`) and calls
//! `execve`. An exec'd process waits for the start byte too, so the agent knows its pid before
//! it can end.
//!
//! Reports travel on one pipe, as `hull-protocol` frames of [`Report`], each small enough for a
//! single atomic pipe write. The pipe is close-on-exec: after the start byte, its end of file
//! means `execve` succeeded; a `Failed` report means it did not. Errors carry the message the
//! host sees, naming the spec field and value at fault. A terminal's master comes back on a Unix
//! socket pair, before `Ready`.
//!
//! The init of a container with its own PID namespace is made ahead, at boot, by a zygote
//! (`zygote.rs`): the forks and namespaces above, done before the bundle is known.

mod caps;
pub mod cgroup;
mod fdpass;
mod process;
mod seccomp;
mod setup;
mod syscalls;
mod terminal;
mod zygote;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use hull_protocol::spec::{ContainerSpec, NamespaceKind, Process};
use hull_protocol::{read_frame, write_frame, ErrorKind, ErrorResponse, Stdio};
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{pipe2, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::sys;

pub use caps::CapPlan;
pub use process::set_rlimits_of;
pub use seccomp::SeccompPlan;
pub use setup::{exec_namespaces, open_init_namespaces};
pub use zygote::{Handover, Zygote, ZygotePaths};

/// Where the container's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsSource {
    /// A virtio-fs share with this tag (the guest).
    Virtiofs { tag: String },
    /// A directory bind-mounted in its place (the host tests).
    Bind(PathBuf),
    /// A directory of a pod VM's share (`hull_protocol::POD_FS_TAG`): the share is mounted
    /// on `agent_root/run/hull/pod` in the container's mount namespace (where the host points
    /// its bind sources), and `subdir` of it bound as the rootfs.
    Share { tag: String, subdir: String },
}

/// Everything the children need, gathered and checked before the fork.
#[derive(Debug)]
pub struct Config {
    /// The container's spec; its `process` is the init's.
    pub spec: ContainerSpec,
    pub caps: Option<CapPlan>,
    pub seccomp: Option<SeccompPlan>,
    pub rootfs: RootfsSource,
    pub readonly: bool,
    /// The virtio-fs share of the host's bind mounts, mounted on `agent_root/run/hull/binds`
    /// (where the host pointed their sources) before the spec's mounts.
    pub binds_tag: Option<String>,
    /// Where the root file system is mounted before the switch of root.
    pub rootfs_dir: PathBuf,
    /// The agent's root: `/` in the guest, the test root on a host. Bind sources are here.
    pub agent_root: PathBuf,
    pub stdio: StdioSetup,
}

/// How the process's standard streams are set up.
#[derive(Debug)]
pub enum StdioSetup {
    /// These descriptors (stream connections or `/dev/null`) become its 0, 1, 2.
    Pipes([OwnedFd; 3]),
    /// A pty from the container's `/dev/ptmx` with this initial window size; its master comes
    /// back in [`Created::terminal`].
    Terminal { rows: u16, cols: u16 },
}

/// An extra process in the running container (`exec`), gathered and checked before the fork.
#[derive(Debug)]
pub struct ExecConfig {
    pub process: Process,
    pub caps: Option<CapPlan>,
    /// The container's `linux.seccomp`, which runc applies to exec'd processes too.
    pub seccomp: Option<SeccompPlan>,
    /// The init's namespaces to join, `/proc/<init>/ns/*` opened by the agent
    /// ([`open_init_namespaces`]), in the order they are joined.
    pub namespaces: Vec<(CloneFlags, OwnedFd)>,
    /// The init's root directory (`/proc/<init>/root`), opened by the agent.
    pub root: OwnedFd,
    pub stdio: StdioSetup,
}

/// What [`Config::validate`] takes from the spec for the container's process.
#[derive(Debug)]
pub struct Validated {
    pub caps: Option<CapPlan>,
    pub seccomp: Option<SeccompPlan>,
}

/// What the children report on the report pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    /// From the intermediate child: the init's pid in the agent's PID namespace.
    Pid(i32),
    /// From the zygote's init (`zygote.rs`): in its namespaces, waiting for its container.
    Waiting,
    /// From the init: set up, waiting for the start byte.
    Ready,
    /// From either: what failed.
    Failed(ErrorResponse),
}

/// A set-up process (the init or an exec'd one) that waits for [`Created::start`].
#[derive(Debug)]
pub struct Created {
    /// Its pid in the agent's PID namespace.
    pub pid: Pid,
    /// The master of its terminal, if it has one.
    pub terminal: Option<OwnedFd>,
    start: File,
    reports: File,
}

/// What the init and an exec'd process do differently; the rest of [`launch`] is the same.
trait Stages {
    fn process(&self) -> &Process;
    fn caps(&self) -> Option<&CapPlan>;
    fn seccomp(&self) -> Option<&SeccompPlan>;
    fn stdio(&self) -> &StdioSetup;
    /// In the intermediate child: enter the container's namespaces.
    fn enter_namespaces(&self) -> Result<(), ErrorResponse>;
    /// In the process, before `Ready`: mounts and root.
    fn prepare_root(&self) -> Result<(), ErrorResponse>;
}

impl Stages for Config {
    fn process(&self) -> &Process {
        &self.spec.process
    }
    fn caps(&self) -> Option<&CapPlan> {
        self.caps.as_ref()
    }
    fn seccomp(&self) -> Option<&SeccompPlan> {
        self.seccomp.as_ref()
    }
    fn stdio(&self) -> &StdioSetup {
        &self.stdio
    }
    fn enter_namespaces(&self) -> Result<(), ErrorResponse> {
        setup::unshare_namespaces(self)
    }
    fn prepare_root(&self) -> Result<(), ErrorResponse> {
        setup::prepare(self)
    }
}

impl Stages for ExecConfig {
    fn process(&self) -> &Process {
        &self.process
    }
    fn caps(&self) -> Option<&CapPlan> {
        self.caps.as_ref()
    }
    fn seccomp(&self) -> Option<&SeccompPlan> {
        self.seccomp.as_ref()
    }
    fn stdio(&self) -> &StdioSetup {
        &self.stdio
    }
    fn enter_namespaces(&self) -> Result<(), ErrorResponse> {
        setup::join_namespaces(&self.namespaces)
    }
    fn prepare_root(&self) -> Result<(), ErrorResponse> {
        setup::enter_init_root(&self.root)
    }
}

impl Config {
    /// Checks what can be checked before any process exists, so these errors are immediate
    /// and exact. The host has checked the spec already and sends only what the guest can
    /// honour; what the agent checks again here is what the protocol's types still allow and
    /// what would otherwise fail later, less clearly, in a forked child.
    pub fn validate(spec: &ContainerSpec) -> Result<Validated, ErrorResponse> {
        let caps = validate_process(&spec.process)?;
        // As in runc, a namespace joined by `path` counts too.
        let uts = spec
            .namespaces
            .iter()
            .any(|ns| ns.kind == NamespaceKind::Uts);
        if spec.hostname.is_some() && !uts {
            return Err(ErrorResponse::new(
                ErrorKind::InvalidSpec,
                "hostname is set but linux.namespaces has no \"uts\" namespace",
            ));
        }
        if spec.unshares(NamespaceKind::User)
            && (spec.uid_mappings.is_empty() || spec.gid_mappings.is_empty())
        {
            return Err(ErrorResponse::new(
                ErrorKind::InvalidSpec,
                "a new user namespace needs linux.uidMappings and linux.gidMappings",
            ));
        }
        let seccomp = spec
            .seccomp
            .as_ref()
            .map(SeccompPlan::from_spec)
            .transpose()?;
        Ok(Validated { caps, seccomp })
    }
}

/// Checks a `process` (the spec's, or an exec's) before any process exists; gives its
/// capability plan.
pub fn validate_process(process: &Process) -> Result<Option<CapPlan>, ErrorResponse> {
    let invalid = |m: String| ErrorResponse::new(ErrorKind::InvalidSpec, m);
    if process.args.is_empty() {
        return Err(invalid("process.args is empty".into()));
    }
    if !process.cwd.starts_with('/') {
        return Err(invalid(format!(
            "process.cwd {:?} is not absolute",
            process.cwd
        )));
    }
    process
        .capabilities
        .as_ref()
        .map(CapPlan::from_spec)
        .transpose()
}

/// Checks that a request's `stdio` agrees with the process's `terminal` field.
pub fn check_terminal(stdio: &Stdio, process: &Process) -> Result<(), ErrorResponse> {
    let (name, terminal) = match stdio {
        Stdio::Pipes { .. } => ("pipes", false),
        Stdio::Terminal { .. } => ("terminal", true),
    };
    if terminal != process.terminal {
        return Err(ErrorResponse::new(
            ErrorKind::InvalidRequest,
            format!(
                "stdio {name} does not match process.terminal {}",
                process.terminal
            ),
        ));
    }
    Ok(())
}

/// Forks the container's processes and waits until its init is set up (or has failed).
pub fn create(config: Config) -> Result<Created, ErrorResponse> {
    launch(config)
}

/// Forks an extra process into the running container and waits until it is set up (or has
/// failed).
pub fn exec(config: ExecConfig) -> Result<Created, ErrorResponse> {
    launch(config)
}

fn launch<S: Stages>(stages: S) -> Result<Created, ErrorResponse> {
    let io = |what: &str, e: nix::Error| ErrorResponse::new(ErrorKind::Io, format!("{what}: {e}"));
    let (reports_r, reports_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io("pipe", e))?;
    let (start_r, start_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io("pipe", e))?;
    let channel = match stages.stdio() {
        StdioSetup::Pipes(_) => None,
        StdioSetup::Terminal { .. } => Some(
            socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| io("socketpair", e))?,
        ),
    };
    let (agent_end, child_end) = channel.map_or((None, None), |(a, c)| (Some(a), Some(c)));
    match sys::fork().map_err(|e| io("fork", e))? {
        ForkResult::Child => {
            drop(reports_r);
            drop(start_w);
            drop(agent_end);
            intermediate(&stages, File::from(reports_w), start_r, child_end)
        }
        ForkResult::Parent { .. } => {}
    }
    // Only the children hold these now, so the pipes end when the children do, and the stream
    // descriptors are the process's alone.
    drop(reports_w);
    drop(start_r);
    drop(child_end);
    drop(stages);
    let mut reports = File::from(reports_r);
    let pid = pid_and(&mut reports, |r| matches!(r, Report::Ready))?;
    // The process sent its terminal's master before `Ready`.
    let terminal = agent_end
        .map(|channel| terminal::recv_fd(channel.as_fd()))
        .transpose()?;
    Ok(Created {
        pid,
        terminal,
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
            Ok(None) => Ok(self.pid),
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

/// The next report; `Failed`, the pipe's end without a report and an unreadable report are
/// errors.
fn next_report(reports: &mut File) -> Result<Report, ErrorResponse> {
    let internal = |m: String| ErrorResponse::new(ErrorKind::Internal, m);
    match read_frame::<_, Report>(reports) {
        Ok(Some(Report::Failed(err))) => Err(err),
        Ok(Some(report)) => Ok(report),
        Ok(None) => Err(internal("container setup ended without a report".into())),
        Err(e) => Err(internal(format!("reading the container setup report: {e}"))),
    }
}

/// The intermediate's `Pid` report and the one `then` accepts from the process, in either
/// order (the process may report before its parent does); returns the pid.
fn pid_and(reports: &mut File, then: impl Fn(&Report) -> bool) -> Result<Pid, ErrorResponse> {
    let mut pid = None;
    let mut other = false;
    while pid.is_none() || !other {
        match next_report(reports)? {
            Report::Pid(p) => pid = Some(Pid::from_raw(p)),
            report if then(&report) => other = true,
            report => return Err(unexpected(report)),
        }
    }
    Ok(pid.expect("the loop ends only with a pid"))
}

fn unexpected(report: Report) -> ErrorResponse {
    ErrorResponse::new(
        ErrorKind::Internal,
        format!("unexpected container setup report: {report:?}"),
    )
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
fn intermediate<S: Stages>(
    stages: &S,
    mut reports: File,
    start: OwnedFd,
    channel: Option<OwnedFd>,
) -> ! {
    let result = (|| -> Result<Pid, ErrorResponse> {
        if let StdioSetup::Pipes(stdio) = stages.stdio() {
            setup::take_stdio(stdio)?;
        }
        stages.enter_namespaces()?;
        match sys::fork().map_err(|e| ErrorResponse::new(ErrorKind::Io, format!("fork: {e}")))? {
            ForkResult::Child => process_stage(stages, reports.try_clone_or_exit(), start, channel),
            ForkResult::Parent { child } => Ok(child),
        }
    })();
    match result {
        Ok(pid) => report(&mut reports, Report::Pid(pid.as_raw())),
        Err(err) => report(&mut reports, Report::Failed(err)),
    }
    sys::exit_now(0)
}

/// The container's init or exec'd process, until `execve`. Never returns.
fn process_stage<S: Stages>(
    stages: &S,
    mut reports: File,
    start: OwnedFd,
    channel: Option<OwnedFd>,
) -> ! {
    let prepared = stages.prepare_root().and_then(|()| {
        let (StdioSetup::Terminal { rows, cols }, Some(channel)) = (stages.stdio(), channel) else {
            return Ok(());
        };
        let master = terminal::take(*rows, *cols, stages.process().user.uid)?;
        terminal::send_fd(channel.as_fd(), master.as_fd())
    });
    if let Err(err) = prepared {
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
    let err = process::exec(stages.process(), stages.caps(), stages.seccomp());
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

#[cfg(test)]
mod tests {
    use hull_protocol::spec::{Capabilities, Namespace, Seccomp, SeccompAction};

    use super::*;

    fn process(args: &[&str]) -> Process {
        Process {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            cwd: "/".into(),
            ..Process::default()
        }
    }

    #[test]
    fn stdio_must_agree_with_process_terminal() {
        let pipes = Stdio::NULL;
        let tty = Stdio::Terminal { rows: 24, cols: 80 };
        let with = Process {
            terminal: true,
            ..process(&["sh"])
        };
        let without = process(&["sh"]);
        assert!(check_terminal(&pipes, &without).is_ok());
        assert!(check_terminal(&tty, &with).is_ok());
        let err = check_terminal(&tty, &without).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            err.message,
            "stdio terminal does not match process.terminal false"
        );
        let err = check_terminal(&pipes, &with).unwrap_err();
        assert_eq!(
            err.message,
            "stdio pipes does not match process.terminal true"
        );
    }

    #[test]
    fn an_exec_process_is_checked_like_the_init() {
        // The host never sends these; the agent refuses them rather than failing in a child.
        let err = validate_process(&process(&[])).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(err.message, "process.args is empty");
        let relative = Process {
            cwd: "tmp".into(),
            ..process(&["sh"])
        };
        let err = validate_process(&relative).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(err.message, "process.cwd \"tmp\" is not absolute");
        let unknown_cap = Process {
            capabilities: Some(Capabilities {
                effective: 1 << 60,
                ..Capabilities::default()
            }),
            ..process(&["sh"])
        };
        let err = validate_process(&unknown_cap).unwrap_err();
        assert!(
            err.message
                .starts_with("process.capabilities.effective: unknown capability number 60"),
            "{}",
            err.message
        );
        let with_caps = Process {
            capabilities: Some(Capabilities {
                bounding: 1 << 5,
                ..Capabilities::default()
            }),
            ..process(&["sh"])
        };
        let caps = validate_process(&with_caps).unwrap().unwrap();
        assert_eq!(caps.bounding, 1 << 5);
        assert_eq!(validate_process(&process(&["sh"])).unwrap(), None);
        // The init's process is checked the same way.
        let spec = ContainerSpec {
            process: process(&[]),
            ..ContainerSpec::default()
        };
        let err = Config::validate(&spec).unwrap_err();
        assert_eq!(err.message, "process.args is empty");
    }

    #[test]
    fn a_hostname_needs_a_uts_namespace() {
        let uts = |path: Option<&str>| Namespace {
            kind: NamespaceKind::Uts,
            path: path.map(str::to_owned),
        };
        let spec = |namespaces| ContainerSpec {
            process: process(&["sh"]),
            hostname: Some("box".into()),
            namespaces,
            ..ContainerSpec::default()
        };
        let err = Config::validate(&spec(vec![])).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(
            err.message,
            "hostname is set but linux.namespaces has no \"uts\" namespace"
        );
        assert!(Config::validate(&spec(vec![uts(None)])).is_ok());
        assert!(Config::validate(&spec(vec![uts(Some("/proc/1/ns/uts"))])).is_ok());
    }

    #[test]
    fn seccomp_is_compiled_before_the_fork() {
        let mut spec = ContainerSpec {
            process: process(&["sh"]),
            seccomp: Some(Seccomp {
                default_action: SeccompAction::Allow,
                log: false,
                spec_allow: false,
                syscalls: Vec::new(),
            }),
            ..ContainerSpec::default()
        };
        assert!(Config::validate(&spec).unwrap().seccomp.is_some());
        if let Some(seccomp) = &mut spec.seccomp {
            seccomp.default_action = SeccompAction::Errno(5000);
        }
        let err = Config::validate(&spec).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert!(
            err.message
                .starts_with("linux.seccomp.defaultErrnoRet 5000"),
            "{}",
            err.message
        );
    }
}
