//! The container's init, made before anyone asks for a container (docs/warm-start.md).
//!
//! Half of what [`launch`](super::launch) does for a container's init depends on nothing in the
//! bundle: fork the agent, unshare the namespaces, fork the init into the new PID namespace,
//! make its mount tree private. In the guest of a PVM host that half is most of the agent's
//! `create` (about 1.8 s of 3.5 s, measured: every system call runs emulated guest-kernel code,
//! and each fork copies the agent's page tables). So the agent does it once at boot, before its
//! readiness line: a VM restored from a template starts with an init already waiting in fresh
//! namespaces, and a cold-booted VM has it ready by the time the host connects.
//!
//! The zygote unshares every namespace a container may want (mount, UTS, IPC, network, cgroup,
//! PID) and keeps the agent's own UTS, IPC, network and cgroup namespaces open. When the
//! container arrives, its init joins back (`setns`) those the spec shares with the agent (a
//! namespace joined by `path` is the host's business; in the guest the container shares the
//! agent's). A PID namespace cannot be left, so a spec without one is set up the usual way and
//! the zygote is dismissed. Either way the container ends up in exactly the namespaces its spec
//! asks for.
//!
//! The agent hands over on a Unix socket pair: first one byte carrying the stdio descriptors
//! (none for a terminal), then a frame with the spec and the rootfs ([`Order`]). From there the
//! init goes on as any init: it mounts, reports `Ready` on the report pipe, sends its terminal's
//! master back on the socket pair, and waits for the start byte (`mod.rs`). An init that is gone
//! by then (the socket pair refuses the hand-over) sends the agent down the usual path; an agent
//! that dismisses the zygote closes the socket pair, and the init exits (reaped by the main
//! loop like any orphan).
//!
//! What the zygote shares between containers restored from one template: the pre-made init's
//! guest pid and its memory before `execve` (a copy of the agent's at boot: no secrets, no
//! randomness the container could use), and namespaces that held nothing yet.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use hull_protocol::spec::{ContainerSpec, NamespaceKind, Process, Propagation};
use hull_protocol::{read_frame, write_frame, ErrorKind, ErrorResponse};
use nix::fcntl::{open, OFlag};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::{pipe2, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::{
    fdpass, next_report, pid_and, process_stage, report, setup, unexpected, CapPlan, Config,
    Created, Report, RootfsSource, SeccompPlan, Stages, StdioSetup,
};
use crate::sys;

/// The namespaces a container may share with the agent, as `/proc/self/ns/` names. Mount and
/// PID are not among them: a container always has its own mount namespace, and a PID namespace
/// cannot be left.
const SHAREABLE: [(NamespaceKind, &str, CloneFlags); 4] = [
    (NamespaceKind::Uts, "uts", CloneFlags::CLONE_NEWUTS),
    (NamespaceKind::Ipc, "ipc", CloneFlags::CLONE_NEWIPC),
    (NamespaceKind::Network, "net", CloneFlags::CLONE_NEWNET),
    (NamespaceKind::Cgroup, "cgroup", CloneFlags::CLONE_NEWCGROUP),
];

/// Where the init mounts the rootfs and finds bind sources: the agent's `Paths`.
#[derive(Debug, Clone)]
pub struct ZygotePaths {
    pub proc_dir: PathBuf,
    pub rootfs_dir: PathBuf,
    pub agent_root: PathBuf,
}

/// A pre-made init, waiting for its container.
#[derive(Debug)]
pub struct Zygote {
    pid: Pid,
    channel: UnixStream,
    start: File,
    reports: File,
}

/// What the agent sends after the descriptors.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    spec: ContainerSpec,
    rootfs: RootfsSource,
    readonly: bool,
    /// The terminal's size, for `stdio: terminal`; none for pipes (three descriptors came).
    terminal: Option<(u16, u16)>,
    binds_tag: Option<String>,
}

/// What [`Zygote::create`] did with a container.
#[derive(Debug)]
pub enum Handover {
    /// The pre-made init took it: it is set up, or it failed as any init may.
    Taken(Result<Created, ErrorResponse>),
    /// The init could not take it (it is gone); nothing was done with the config.
    Refused(Box<Config>, String),
}

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::Io, format!("{what}: {e}"))
}

impl Zygote {
    /// Forks the zygote and waits until its init is ready for a container. The agent calls it
    /// before it starts any thread.
    pub fn spawn(paths: ZygotePaths) -> Result<Self, ErrorResponse> {
        let mut shared = Vec::with_capacity(SHAREABLE.len());
        for (kind, name, flag) in SHAREABLE {
            let path = paths.proc_dir.join("self/ns").join(name);
            let fd = open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| io(format!("opening {}", path.display()), e))?;
            shared.push((kind, flag, fd));
        }
        let (reports_r, reports_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io("pipe", e))?;
        let (start_r, start_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io("pipe", e))?;
        let (agent_end, init_end) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io("socketpair", e))?;
        match sys::fork().map_err(|e| io("fork", e))? {
            ForkResult::Child => {
                drop((reports_r, start_w, agent_end));
                intermediate(
                    Waiting {
                        paths,
                        shared,
                        start: start_r,
                        channel: init_end,
                    },
                    File::from(reports_w),
                )
            }
            ForkResult::Parent { .. } => {}
        }
        drop((reports_w, start_r, init_end, shared));
        let mut reports = File::from(reports_r);
        let pid = pid_and(&mut reports, |r| matches!(r, Report::Waiting))?;
        Ok(Self {
            pid,
            channel: UnixStream::from(agent_end),
            start: File::from(start_w),
            reports,
        })
    }

    /// The pre-made init's pid in the agent's PID namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether the pre-made init can be this container's: only if the spec gives it a PID
    /// namespace of its own (every other namespace can be joined back) and no user namespace
    /// (which must own the others, so it comes before them).
    pub fn fits(spec: &ContainerSpec) -> bool {
        spec.unshares(NamespaceKind::Pid) && !spec.unshares(NamespaceKind::User)
    }

    /// Hands the container to the pre-made init and waits until it is set up (or has failed),
    /// as [`create`](super::create) does.
    pub fn create(mut self, config: Config) -> Handover {
        let terminal = match &config.stdio {
            StdioSetup::Pipes(_) => None,
            StdioSetup::Terminal { rows, cols } => Some((*rows, *cols)),
        };
        let fds: Vec<_> = match &config.stdio {
            StdioSetup::Pipes(fds) => fds.iter().map(|fd| fd.as_fd()).collect(),
            StdioSetup::Terminal { .. } => Vec::new(),
        };
        let order = (
            &config.spec,
            &config.rootfs,
            config.readonly,
            terminal,
            &config.binds_tag,
        );
        let sent = fdpass::send(self.channel.as_fd(), &fds)
            .map_err(|e| e.to_string())
            .and_then(|()| write_frame(&mut self.channel, &order).map_err(|e| e.to_string()));
        drop(fds);
        if let Err(e) = sent {
            return Handover::Refused(Box::new(config), e);
        }
        // The init holds its own copies now.
        drop(config);
        Handover::Taken(self.wait(terminal.is_some()))
    }

    fn wait(mut self, terminal: bool) -> Result<Created, ErrorResponse> {
        match next_report(&mut self.reports)? {
            Report::Ready => {}
            other => return Err(unexpected(other)),
        }
        // The init sent its terminal's master before `Ready`.
        let terminal = terminal
            .then(|| super::terminal::recv_fd(self.channel.as_fd()))
            .transpose()?;
        Ok(Created {
            pid: self.pid,
            terminal,
            start: self.start,
            reports: self.reports,
        })
    }
}

/// The zygote's init until its container arrives.
struct Waiting {
    paths: ZygotePaths,
    /// The agent's namespaces, to join back those the spec does not unshare.
    shared: Vec<(NamespaceKind, CloneFlags, OwnedFd)>,
    start: OwnedFd,
    channel: OwnedFd,
}

/// The intermediate child: new namespaces, the init forked into them. Never returns.
fn intermediate(waiting: Waiting, mut reports: File) -> ! {
    let forked = (|| -> Result<Pid, ErrorResponse> {
        let all = SHAREABLE
            .iter()
            .fold(CloneFlags::CLONE_NEWNS, |flags, (_, _, flag)| flags | *flag);
        unshare(all).map_err(|e| io(format!("unshare({all:?})"), e))?;
        unshare(CloneFlags::CLONE_NEWPID).map_err(|e| io("unshare(CLONE_NEWPID)", e))?;
        match sys::fork().map_err(|e| io("fork", e))? {
            ForkResult::Child => {
                let reports = reports.try_clone().unwrap_or_else(|_| sys::exit_now(1));
                init(waiting, reports)
            }
            ForkResult::Parent { child } => Ok(child),
        }
    })();
    match forked {
        Ok(pid) => report(&mut reports, Report::Pid(pid.as_raw())),
        Err(err) => report(&mut reports, Report::Failed(err)),
    }
    sys::exit_now(0)
}

/// The pre-made init: waits for its container, then goes on as any init. Never returns.
fn init(waiting: Waiting, mut reports: File) -> ! {
    if let Err(err) = setup::set_propagation(Propagation::Private) {
        report(&mut reports, Report::Failed(err));
        sys::exit_now(1);
    }
    report(&mut reports, Report::Waiting);
    let Waiting {
        paths,
        shared,
        start,
        channel,
    } = waiting;
    let received = match fdpass::recv(channel.as_fd()) {
        Ok(Some(fds)) => fds,
        // Dismissed, or the agent is gone.
        Ok(None) | Err(_) => sys::exit_now(0),
    };
    let mut stream = UnixStream::from(channel);
    let order = match read_frame::<_, Order>(&mut stream) {
        Ok(Some(order)) => order,
        Ok(None) | Err(_) => sys::exit_now(0),
    };
    let adopted = Adopted::new(order, received, paths, shared);
    match adopted {
        Ok(adopted) => process_stage(&adopted, reports, start, Some(OwnedFd::from(stream))),
        Err(err) => {
            report(&mut reports, Report::Failed(err));
            sys::exit_now(1)
        }
    }
}

/// A container taken on by the pre-made init.
struct Adopted {
    config: Config,
    shared: Vec<(NamespaceKind, CloneFlags, OwnedFd)>,
}

impl Adopted {
    fn new(
        order: Order,
        fds: Vec<OwnedFd>,
        paths: ZygotePaths,
        shared: Vec<(NamespaceKind, CloneFlags, OwnedFd)>,
    ) -> Result<Self, ErrorResponse> {
        let stdio = match order.terminal {
            Some((rows, cols)) if fds.is_empty() => StdioSetup::Terminal { rows, cols },
            None => StdioSetup::Pipes(fds.try_into().map_err(|fds: Vec<OwnedFd>| {
                ErrorResponse::new(
                    ErrorKind::Internal,
                    format!("the zygote received {} stdio descriptors, not 3", fds.len()),
                )
            })?),
            Some(_) => {
                return Err(ErrorResponse::new(
                    ErrorKind::Internal,
                    "the zygote received descriptors with a terminal",
                ))
            }
        };
        // Checked by the agent already; the plans are made again here, from the same spec.
        let validated = Config::validate(&order.spec)?;
        Ok(Self {
            config: Config {
                spec: order.spec,
                caps: validated.caps,
                seccomp: validated.seccomp,
                rootfs: order.rootfs,
                readonly: order.readonly,
                binds_tag: order.binds_tag,
                rootfs_dir: paths.rootfs_dir,
                agent_root: paths.agent_root,
                stdio,
            },
            shared,
        })
    }
}

impl Stages for Adopted {
    fn process(&self) -> &Process {
        &self.config.spec.process
    }
    fn caps(&self) -> Option<&CapPlan> {
        self.config.caps.as_ref()
    }
    fn seccomp(&self) -> Option<&SeccompPlan> {
        self.config.seccomp.as_ref()
    }
    fn stdio(&self) -> &StdioSetup {
        &self.config.stdio
    }
    fn enter_namespaces(&self) -> Result<(), ErrorResponse> {
        // Done by the zygote before the container was known; see `prepare_root`.
        Ok(())
    }
    fn prepare_root(&self) -> Result<(), ErrorResponse> {
        let spec = &self.config.spec;
        for (kind, flag, fd) in &self.shared {
            if !spec.unshares(*kind) {
                setns(fd, *flag).map_err(|e| {
                    io(
                        format!("joining the agent's {kind:?} namespace (linux.namespaces)"),
                        e,
                    )
                })?;
            }
        }
        if let StdioSetup::Pipes(stdio) = &self.config.stdio {
            setup::take_stdio(stdio)?;
        }
        setup::mount_and_enter(&self.config)
    }
}
