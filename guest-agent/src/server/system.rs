//! What the owner does to the system: fork the container's processes, signal them, read
//! `/proc`, power off. Behind the [`System`] trait so the owner's rules run in unit tests with a
//! made-up system: no forks, no signals, no namespaces.

use std::collections::HashMap;
use std::fmt::Debug;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use hull_protocol::spec::Process;
use hull_protocol::{ErrorKind, ErrorResponse, ProcessInfo};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::Paths;
use crate::container::{
    self, cgroup, CapPlan, Config, Created, ExecConfig, Handover, SeccompPlan, StdioSetup, Zygote,
};
use crate::{console, power};

/// A process of the container, set up and waiting for its start.
pub trait Waiting: Debug + Send {
    /// Its pid in the agent's PID namespace.
    fn pid(&self) -> Pid;
    /// The master of its terminal, if it has one (once).
    fn take_terminal(&mut self) -> Option<OwnedFd>;
    /// Lets it exec the process; returns once `execve` has succeeded or failed.
    fn start(self: Box<Self>) -> Result<Pid, ErrorResponse>;
}

/// An `exec`'d process, checked, with its stdio claimed.
#[derive(Debug)]
pub struct ExecPlan {
    pub process: Process,
    pub caps: Option<CapPlan>,
    pub seccomp: Option<SeccompPlan>,
    pub stdio: StdioSetup,
}

/// The system calls behind the owner's requests.
pub trait System {
    /// Sets up a container's init (`container::create`) in a cgroup of its own named `cgroup`
    /// (see `container::cgroup::create`).
    fn create(&mut self, cgroup: &str, config: Config) -> Result<Box<dyn Waiting>, ErrorResponse>;
    /// Sets up a process in the namespaces `namespaces` and root of the running `init`, in the
    /// init's cgroup `cgroup`.
    fn exec(
        &mut self,
        init: Pid,
        cgroup: &str,
        namespaces: &[(&'static str, CloneFlags)],
        plan: ExecPlan,
    ) -> Result<Box<dyn Waiting>, ErrorResponse>;
    /// What the cgroup `cgroup` has used.
    fn stats(&self, cgroup: &str) -> Result<hull_protocol::ContainerStats, ErrorResponse>;
    /// Changes the limits of the cgroup `cgroup`.
    fn update(
        &mut self,
        cgroup: &str,
        resources: &hull_protocol::Resources,
    ) -> Result<(), ErrorResponse>;
    /// Removes the cgroup `cgroup`, whose processes have ended.
    fn remove(&mut self, cgroup: &str);
    /// Sets the guest's host name.
    fn set_hostname(&mut self, hostname: &str) -> Result<(), ErrorResponse>;
    fn kill(&mut self, pid: Pid, signal: Signal) -> Result<(), Errno>;
    /// The processes of the container whose init is `init`: those in the init's PID namespace
    /// if it has its own, else every process but the agent.
    fn container_pids(&self, init: Pid) -> Vec<Pid>;
    /// `hull ps` data of one process; `None` if it is gone.
    fn process_info(&self, pid: Pid) -> Option<ProcessInfo>;
    /// Syncs and powers the VM off. The real one never returns.
    fn power_off(&mut self, reason: &str);
}

impl Waiting for Created {
    fn pid(&self) -> Pid {
        self.pid
    }

    fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.terminal.take()
    }

    fn start(self: Box<Self>) -> Result<Pid, ErrorResponse> {
        Created::start(*self)
    }
}

/// The agent's own system.
#[derive(Debug)]
pub struct RealSystem {
    paths: Paths,
    /// The container's init made at boot (`container/zygote.rs`), until a container takes it.
    zygote: Option<Zygote>,
    /// The containers' cgroups (`container/cgroup.rs`) by name, once made.
    cgroups: HashMap<String, PathBuf>,
}

impl RealSystem {
    pub fn new(paths: Paths, zygote: Option<Zygote>) -> Self {
        Self {
            paths,
            zygote,
            cgroups: HashMap::new(),
        }
    }

    /// Sets up the init: in the zygote's process if it fits, else the usual way.
    fn create_unbounded(&mut self, mut config: Config) -> Result<Box<dyn Waiting>, ErrorResponse> {
        // One container per VM: the zygote serves the first create or none. Dropping it
        // dismisses its init.
        if let Some(zygote) = self.zygote.take().filter(|_| Zygote::fits(&config.spec)) {
            let pid = zygote.pid();
            match zygote.create(config) {
                Handover::Taken(created) => {
                    return created.map(|created| Box::new(created) as Box<dyn Waiting>)
                }
                Handover::Refused(back, why) => {
                    console::log(&format!(
                        "the pre-made init (pid {pid}) could not take the container ({why}); \
                         setting it up the usual way"
                    ));
                    config = *back;
                }
            }
        }
        container::create(config).map(|created| Box::new(created) as Box<dyn Waiting>)
    }

    fn exec_unbounded(
        &mut self,
        init: Pid,
        namespaces: &[(&'static str, CloneFlags)],
        plan: ExecPlan,
    ) -> Result<Box<dyn Waiting>, ErrorResponse> {
        let (namespaces, root) =
            container::open_init_namespaces(&self.paths.proc_dir, init, namespaces)?;
        let ExecPlan {
            process,
            caps,
            seccomp,
            stdio,
        } = plan;
        container::exec(ExecConfig {
            process,
            caps,
            seccomp,
            namespaces,
            root,
            stdio,
        })
        .map(|created| Box::new(created) as Box<dyn Waiting>)
    }

    /// What the agent sets for a process that has not started yet, as runc sets it from the
    /// host: `process.rlimits` (see [`container::set_rlimits_of`]) and `process.oomScoreAdj`
    /// (the process itself may lack `CAP_SYS_RESOURCE` to lower it, or a `/proc` to write it
    /// to).
    fn set_from_outside(
        &self,
        waiting: &dyn Waiting,
        process: &Process,
    ) -> Result<(), ErrorResponse> {
        container::set_rlimits_of(waiting.pid(), process)?;
        let Some(adj) = process.oom_score_adj else {
            return Ok(());
        };
        let path = self
            .paths
            .proc_dir
            .join(waiting.pid().to_string())
            .join("oom_score_adj");
        std::fs::write(&path, adj.to_string()).map_err(|e| {
            ErrorResponse::new(
                ErrorKind::Io,
                format!("process.oomScoreAdj {adj}: writing {}: {e}", path.display()),
            )
        })
    }

    /// Puts a process that has not started yet in the container's cgroup. Without one (no
    /// cgroup v2 with the memory and pids controllers) the container runs unbounded: logged.
    fn bound(&self, cgroup: &str, waiting: Box<dyn Waiting>) -> Box<dyn Waiting> {
        if let Some(dir) = self.cgroups.get(cgroup) {
            if let Err(err) = cgroup::enter(dir, waiting.pid()) {
                console::log(&format!("warning: {err}"));
            }
        }
        waiting
    }
}

impl System for RealSystem {
    fn create(&mut self, name: &str, config: Config) -> Result<Box<dyn Waiting>, ErrorResponse> {
        if let Some(root) = &self.paths.cgroup_root {
            let (memory, pids) = (config.spec.memory_limit, config.spec.pids_limit);
            match cgroup::create(root, name, &self.paths.proc_dir, memory, pids) {
                Ok(dir) => {
                    self.cgroups.insert(name.to_owned(), dir);
                }
                Err(err) => console::log(&format!(
                    "warning: the container gets no cgroup of its own: {err}"
                )),
            }
        }
        let process = config.spec.process.clone();
        let waiting = self.create_unbounded(config)?;
        self.set_from_outside(waiting.as_ref(), &process)?;
        Ok(self.bound(name, waiting))
    }

    fn exec(
        &mut self,
        init: Pid,
        name: &str,
        namespaces: &[(&'static str, CloneFlags)],
        plan: ExecPlan,
    ) -> Result<Box<dyn Waiting>, ErrorResponse> {
        let process = plan.process.clone();
        let waiting = self.exec_unbounded(init, namespaces, plan)?;
        self.set_from_outside(waiting.as_ref(), &process)?;
        Ok(self.bound(name, waiting))
    }

    fn stats(&self, name: &str) -> Result<hull_protocol::ContainerStats, ErrorResponse> {
        let dir = self.cgroups.get(name).ok_or_else(|| {
            ErrorResponse::new(ErrorKind::Unsupported, "the container has no cgroup")
        })?;
        Ok(cgroup::stats(dir))
    }

    fn update(
        &mut self,
        name: &str,
        resources: &hull_protocol::Resources,
    ) -> Result<(), ErrorResponse> {
        let dir = self.cgroups.get(name).ok_or_else(|| {
            ErrorResponse::new(ErrorKind::Unsupported, "the container has no cgroup")
        })?;
        cgroup::update(dir, resources).map_err(|e| ErrorResponse::new(ErrorKind::Io, e))
    }

    fn remove(&mut self, name: &str) {
        if let Some(dir) = self.cgroups.remove(name) {
            if let Err(err) = cgroup::remove(&dir) {
                console::log(&format!("warning: {err}"));
            }
        }
    }

    fn set_hostname(&mut self, hostname: &str) -> Result<(), ErrorResponse> {
        nix::unistd::sethostname(hostname).map_err(|e| {
            ErrorResponse::new(ErrorKind::Io, format!("sethostname({hostname:?}): {e}"))
        })
    }

    fn kill(&mut self, pid: Pid, signal: Signal) -> Result<(), Errno> {
        kill(pid, signal)
    }

    fn container_pids(&self, init: Pid) -> Vec<Pid> {
        let proc_dir = &self.paths.proc_dir;
        let pidns = |pid: &str| {
            nix::sys::stat::stat(&proc_dir.join(pid).join("ns/pid"))
                .ok()
                .map(|s| s.st_ino)
        };
        let own = pidns("self");
        let Some(init_ns) = pidns(&init.to_string()) else {
            // The init is gone: so is what it could tell apart.
            return Vec::new();
        };
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir(proc_dir) else {
            return pids;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if pid == std::process::id() as i32 {
                continue;
            }
            let ns = pidns(&pid.to_string());
            let mine = match own {
                Some(own) if init_ns != own => ns == Some(init_ns),
                _ => true,
            };
            if mine {
                pids.push(Pid::from_raw(pid));
            }
        }
        pids
    }

    fn process_info(&self, pid: Pid) -> Option<ProcessInfo> {
        process_info(&self.paths.proc_dir, pid)
    }

    fn power_off(&mut self, reason: &str) {
        power::power_off(reason)
    }
}

/// `hull ps` data of one process from `/proc`; `None` if it is gone.
fn process_info(proc_dir: &Path, pid: Pid) -> Option<ProcessInfo> {
    let dir = proc_dir.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_owned();
    let ppid = rest.split(' ').nth(1)?.parse().ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())?;
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(ProcessInfo {
        pid: pid.as_raw(),
        ppid,
        uid,
        args,
        comm,
    })
}
