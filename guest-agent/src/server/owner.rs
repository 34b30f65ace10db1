//! The owner of the server's state: the one thread that handles requests, stream attaches,
//! reaped children and connections, in the order their [`Event`]s arrive (see `mod.rs` for the
//! threads around it).
//!
//! Nothing here locks, and nothing here writes to a socket: frames for the host go into the
//! connection's [`Outbox`], and a host that leaves too much unread loses its connection. What
//! it does to the system (forks, signals, `/proc`, power off) goes through [`System`], so the
//! unit tests at the bottom drive it with made-up events and a made-up system.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use hull_protocol::spec::Process;
use hull_protocol::stdio::StreamReply;
use hull_protocol::{
    decode_body, request_id_of, AgentMessage, CreateContainer, ErrorKind, ErrorResponse, Event,
    Exec, ExitStatus, HostMessage, ProcessRef, Request, RequestBody, Response, ResponseBody, Stdio,
    StreamKind,
};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::outbox::{Outbox, OutboxError};
use super::system::{ExecPlan, System, Waiting};
use super::{ConnectionId, Event as ServerEvent, Paths};
use crate::container::{self, Config, RootfsSource, SeccompPlan, StdioSetup, Validated};
use crate::reaper::{Ending, Reaped};
use crate::{console, relay};

/// How long `shutdown` waits for its answer to be written before powering off anyway.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The server's state and the one thread that changes it.
#[derive(Debug)]
pub struct Owner<S> {
    paths: Paths,
    system: S,
    /// The control connection, for responses and events.
    connection: Option<Connection>,
    /// Streams attached and not yet claimed by a request.
    streams: HashMap<(ProcessRef, StreamKind), File>,
    /// The VM's one container, or a pod's containers, in the order they were created.
    containers: Vec<Container>,
    /// The inits, then every exec'd process, in the order they were created. Entries stay
    /// after the process has ended (`wait` still answers, and an exec id is never reused)
    /// until a pod's container is removed.
    processes: Vec<Tracked>,
    /// `wait` requests not answered yet: request id and process.
    waits: Vec<(u64, ProcessRef)>,
}

#[derive(Debug)]
struct Connection {
    id: ConnectionId,
    outbox: Outbox,
    /// Told after each frame of the connection is handled.
    handled: Sender<()>,
}

/// A created container.
#[derive(Debug)]
struct Container {
    id: String,
    /// Its init: [`ProcessRef::Init`], or a pod's [`ProcessRef::Container`].
    init: ProcessRef,
    /// Its cgroup's name (`container`, or `pod-<id>`).
    cgroup: String,
    info: ContainerInfo,
    /// Its init until a start takes it.
    created: Option<Box<dyn Waiting>>,
}

#[derive(Debug)]
struct ContainerInfo {
    /// The init's namespaces an exec'd process joins (`container::exec_namespaces`).
    namespaces: Vec<(&'static str, CloneFlags)>,
    seccomp: Option<SeccompPlan>,
    /// The init's `process.oomScoreAdj`: an exec'd process's own, when it gives none.
    oom_score_adj: Option<i32>,
}

/// A process of the container, from its creation on.
#[derive(Debug)]
struct Tracked {
    process: ProcessRef,
    /// The id of the container it belongs to.
    container: String,
    pid: Pid,
    /// Whether the `started` response went out.
    started: bool,
    exit: Option<ExitStatus>,
    /// Whether the `exited` event went out (only after the `started` response).
    reported: bool,
    terminal: Option<relay::Handle>,
}

/// What a request handler gives back.
enum Reply {
    Now(Result<ResponseBody, ErrorResponse>),
    /// Answered already, or later.
    Later,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> Reply {
    Reply::Now(Err(ErrorResponse::new(kind, message)))
}

/// The error for a request about a container's init before that container exists.
fn not_created(init: &ProcessRef) -> ErrorResponse {
    match init {
        ProcessRef::Container(id) => ErrorResponse::new(
            ErrorKind::NotFound,
            format!("no container {id:?} in this pod"),
        ),
        _ => ErrorResponse::new(ErrorKind::NotFound, "no container is created"),
    }
}

impl<S: System> Owner<S> {
    pub fn new(paths: Paths, system: S) -> Self {
        Self {
            paths,
            system,
            connection: None,
            streams: HashMap::new(),
            containers: Vec::new(),
            processes: Vec::new(),
            waits: Vec::new(),
        }
    }

    /// Handles events until every sender is gone (never, in the agent).
    pub fn run(mut self, inbox: Receiver<ServerEvent>) {
        while let Ok(event) = inbox.recv() {
            self.handle(event);
        }
    }

    pub fn handle(&mut self, event: ServerEvent) {
        match event {
            ServerEvent::Connected {
                id,
                outbox,
                handled,
            } => {
                self.connection = Some(Connection {
                    id,
                    outbox,
                    handled,
                })
            }
            ServerEvent::Frame { id, body } => {
                if !self.is_current(id) {
                    return;
                }
                self.frame(&body);
                if let Some(connection) = self.connection.as_ref().filter(|c| c.id == id) {
                    let _ = connection.handled.send(());
                }
            }
            ServerEvent::Disconnected { id } => {
                if self.is_current(id) {
                    self.let_go();
                }
            }
            ServerEvent::Attach {
                hello,
                stream,
                reply,
            } => {
                let answer = self.attach(hello.process, hello.stream, stream);
                let _ = reply.send(answer);
            }
            ServerEvent::Reaped(reaped) => self.reaped(&reaped),
        }
    }

    fn is_current(&self, id: ConnectionId) -> bool {
        self.connection.as_ref().is_some_and(|c| c.id == id)
    }

    /// Forgets the control connection. Streams never claimed die with it.
    fn let_go(&mut self) {
        self.connection = None;
        self.streams.clear();
    }

    fn send(&mut self, msg: &AgentMessage) {
        let Some(connection) = &self.connection else {
            return;
        };
        match connection.outbox.send(msg) {
            Ok(()) => {}
            Err(e @ OutboxError::Encode(_)) => {
                console::log(&format!(
                    "control connection: cannot send: {}",
                    crate::error_chain(&e)
                ));
            }
            Err(e) => {
                console::log(&format!("control connection: {e}; closing it"));
                connection.outbox.close();
                self.let_go();
            }
        }
    }

    fn respond(&mut self, id: u64, result: Result<ResponseBody, ErrorResponse>) {
        self.send(&AgentMessage::Response(Response { id, result }));
    }

    fn find(&self, process: &ProcessRef) -> Option<&Tracked> {
        self.processes.iter().find(|p| p.process == *process)
    }

    fn find_mut(&mut self, process: &ProcessRef) -> Option<&mut Tracked> {
        self.processes.iter_mut().find(|p| p.process == *process)
    }

    /// Sends a process's `exited` event and answers its waits, once it has started and ended.
    fn flush_exit(&mut self, process: &ProcessRef) {
        let Some(tracked) = self.find_mut(process) else {
            return;
        };
        let (true, false, Some(status)) = (tracked.started, tracked.reported, tracked.exit) else {
            return;
        };
        tracked.reported = true;
        let pid = tracked.pid.as_raw();
        self.send(&AgentMessage::Event(Event::Exited {
            process: process.clone(),
            pid,
            status,
        }));
        let waits = std::mem::take(&mut self.waits);
        for (id, waiting_for) in waits {
            if waiting_for == *process {
                self.respond(id, Ok(ResponseBody::Exited { status }));
            } else {
                self.waits.push((id, waiting_for));
            }
        }
    }

    /// The container whose init is `init`.
    fn container(&self, init: &ProcessRef) -> Option<&Container> {
        self.containers.iter().find(|c| c.init == *init)
    }

    /// A pod's container by id, or why not.
    fn pod_container(&self, id: &str) -> Result<&Container, ErrorResponse> {
        self.container(&ProcessRef::Container(id.to_owned()))
            .ok_or_else(|| not_created(&ProcessRef::Container(id.to_owned())))
    }

    /// The init `init`, if its container is running: started and not ended.
    fn running_init(&self, init: &ProcessRef) -> Result<Pid, ErrorResponse> {
        let state = |m: &str| ErrorResponse::new(ErrorKind::InvalidState, m);
        match self.find(init) {
            None => Err(state(&not_created(init).message)),
            Some(Tracked { started: false, .. }) => Err(state("the container is not started")),
            Some(Tracked { exit: Some(_), .. }) => Err(state("the init process has exited")),
            Some(init) => Ok(init.pid),
        }
    }

    /// Children the main loop reaped: the container's processes among them have ended.
    fn reaped(&mut self, reaped: &[Reaped]) {
        for r in reaped {
            let Some(tracked) = self
                .processes
                .iter_mut()
                .find(|p| p.pid == r.pid && p.exit.is_none())
            else {
                continue;
            };
            tracked.exit = Some(match r.ending {
                Ending::Exited(code) => ExitStatus::Code(code),
                Ending::Signaled(signal) => ExitStatus::Signal(signal as i32),
            });
            if let Some(terminal) = &mut tracked.terminal {
                terminal.process_ended();
            }
            let process = tracked.process.clone();
            self.flush_exit(&process);
        }
    }

    /// One frame from the host. Whatever it holds, the answer is a response or a log line.
    fn frame(&mut self, body: &[u8]) {
        match decode_body::<HostMessage>(body) {
            Ok(HostMessage::Request(request)) => self.request(request),
            Ok(HostMessage::Hello(_)) => console::log("control: a second hello, ignored"),
            Err(e) => match request_id_of(body) {
                Some(id) => self.respond(
                    id,
                    Err(ErrorResponse::new(
                        ErrorKind::InvalidRequest,
                        crate::error_chain(&e),
                    )),
                ),
                None => console::log(&format!(
                    "control: unreadable frame: {}",
                    crate::error_chain(&e)
                )),
            },
        }
    }

    fn request(&mut self, request: Request) {
        let id = request.id;
        let reply = match request.body {
            RequestBody::CreateContainer(create) => self.create(*create),
            RequestBody::ConfigureNetwork(config) => self.configure_network(&config),
            RequestBody::StartContainer => self.start(id, &ProcessRef::Init),
            RequestBody::Start { process } => self.start(id, &process),
            RequestBody::ContainerProcesses { container_id } => {
                self.container_processes(&container_id)
            }
            RequestBody::Stats { container_id } => self.stats(&container_id),
            RequestBody::Update {
                container_id,
                resources,
            } => self.update(&container_id, &resources),
            RequestBody::RemoveContainer { container_id } => self.remove_container(&container_id),
            RequestBody::SetHostname { hostname } => self.set_hostname(&hostname),
            RequestBody::Signal {
                process,
                signal,
                all,
            } => self.signal(&process, signal, all),
            RequestBody::Wait { process } => self.wait(id, process),
            RequestBody::ListProcesses => self.list_processes(),
            RequestBody::Shutdown => self.shutdown(id),
            RequestBody::Exec(exec) => self.exec(id, *exec),
            RequestBody::ResizeTerminal {
                process,
                rows,
                cols,
            } => self.resize_terminal(&process, rows, cols),
        };
        if let Reply::Now(result) = reply {
            self.respond(id, result);
        }
    }

    /// `shutdown`: answers (and waits a little for the answer to be written, since the VM is
    /// about to go), kills what is left of the container and powers off.
    fn shutdown(&mut self, id: u64) -> Reply {
        self.respond(id, Ok(ResponseBody::Ok));
        if let Some(connection) = &self.connection {
            if !connection.outbox.flush(SHUTDOWN_FLUSH_TIMEOUT) {
                console::log("shutdown: the answer was not written in time");
            }
        }
        self.kill_all(Signal::SIGKILL);
        self.system.power_off("shutdown requested by the host");
        Reply::Later
    }

    /// `create_container`. On failure the init's streams are closed, claimed or not, so the
    /// host's readers end and a retry attaches fresh ones.
    fn create(&mut self, create: CreateContainer) -> Reply {
        let init = if create.pod {
            ProcessRef::Container(create.container_id.clone())
        } else {
            ProcessRef::Init
        };
        let reply = self.try_create(&init, create);
        if let Reply::Now(Err(_)) = &reply {
            self.drop_streams(&init);
        }
        reply
    }

    fn drop_streams(&mut self, of: &ProcessRef) {
        self.streams.retain(|(process, _), _| process != of);
    }

    fn try_create(&mut self, init: &ProcessRef, create: CreateContainer) -> Reply {
        if let Err(e) = self.may_create(&create) {
            return Reply::Now(Err(e));
        }
        let CreateContainer {
            container_id,
            spec,
            rootfs,
            stdio,
            binds_fs_tag,
            pod,
        } = create;
        let Validated { caps, seccomp } = match Config::validate(&spec) {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        let (stdio, terminal_conn) = match self.claim_stdio(init, &stdio, &spec.process) {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        let paths = &self.paths;
        let readonly = rootfs.readonly || spec.readonly_root;
        let rootfs = match (&paths.rootfs_override, rootfs.subdir) {
            (Some(dir), None) => RootfsSource::Bind(dir.clone()),
            (Some(dir), Some(subdir)) => RootfsSource::Bind(dir.join(subdir)),
            (None, None) => RootfsSource::Virtiofs { tag: rootfs.fs_tag },
            (None, Some(subdir)) => RootfsSource::Share {
                tag: rootfs.fs_tag,
                subdir,
            },
        };
        // The host's bind mounts come over virtio-fs; the host tests bind guest paths.
        let binds_tag = binds_fs_tag.filter(|_| paths.rootfs_override.is_none());
        let info = ContainerInfo {
            namespaces: container::exec_namespaces(&spec),
            seccomp: seccomp.clone(),
            oom_score_adj: spec.process.oom_score_adj,
        };
        let config = Config {
            spec,
            caps,
            seccomp,
            rootfs,
            readonly,
            binds_tag,
            rootfs_dir: paths.rootfs_dir.clone(),
            agent_root: paths.agent_root.clone(),
            stdio,
        };
        let cgroup = if pod {
            format!("pod-{container_id}")
        } else {
            "container".to_owned()
        };
        let mut created = match self.system.create(&cgroup, config) {
            Ok(created) => created,
            Err(e) => return Reply::Now(Err(e)),
        };
        let terminal = match start_relay(init, created.as_mut(), terminal_conn) {
            Ok(terminal) => terminal,
            Err(e) => return Reply::Now(Err(e)),
        };
        self.processes.push(Tracked {
            process: init.clone(),
            container: container_id.clone(),
            pid: created.pid(),
            started: false,
            exit: None,
            reported: false,
            terminal,
        });
        self.containers.push(Container {
            id: container_id,
            init: init.clone(),
            cgroup,
            info,
            created: Some(created),
        });
        Reply::Now(Ok(ResponseBody::Ok))
    }

    /// Whether `create` may make a container now: a VM holds one container, or a pod's
    /// containers (each id once, a plain name since it names a cgroup), never both.
    fn may_create(&self, create: &CreateContainer) -> Result<(), ErrorResponse> {
        if let Some(existing) = self.containers.first() {
            let existing_pod = existing.init != ProcessRef::Init;
            if !create.pod || !existing_pod {
                let why = if existing_pod {
                    " in this pod VM, which takes only pod containers"
                } else {
                    ""
                };
                return Err(ErrorResponse::new(
                    ErrorKind::InvalidState,
                    format!("container {:?} is already created{why}", existing.id),
                ));
            }
        }
        if !create.pod {
            return Ok(());
        }
        let id = &create.container_id;
        let plain = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !plain {
            return Err(ErrorResponse::new(
                ErrorKind::InvalidRequest,
                format!(
                    "container_id {id:?}: a pod container's id is 1 to 128 of [A-Za-z0-9_.-], \
                     not starting with a dot"
                ),
            ));
        }
        if self.containers.iter().any(|c| c.id == *id) {
            return Err(ErrorResponse::new(
                ErrorKind::AlreadyExists,
                format!("container {id:?} is already created"),
            ));
        }
        if let Some(subdir) = &create.rootfs.subdir {
            let path = std::path::Path::new(subdir);
            let relative = path.components().count() > 0
                && path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !relative {
                return Err(ErrorResponse::new(
                    ErrorKind::InvalidRequest,
                    format!("rootfs.subdir {subdir:?}: not a relative path without `..`"),
                ));
            }
        }
        Ok(())
    }

    /// `exec`: checks, forks the process into the container, tracks it, then lets it run. On
    /// failure its streams are closed and the exec id stays free (nothing ran).
    fn exec(&mut self, id: u64, exec: Exec) -> Reply {
        let process_ref = ProcessRef::Exec(exec.exec_id.clone());
        let reply = self.try_exec(id, &process_ref, exec);
        if let Reply::Now(Err(_)) = &reply {
            self.drop_streams(&process_ref);
        }
        reply
    }

    fn try_exec(&mut self, id: u64, process_ref: &ProcessRef, exec: Exec) -> Reply {
        let init_ref = match &exec.container_id {
            Some(id) => ProcessRef::Container(id.clone()),
            None => ProcessRef::Init,
        };
        let init = match self.running_init(&init_ref) {
            Ok(init) => init,
            Err(e) => return Reply::Now(Err(e)),
        };
        if self.find(process_ref).is_some() {
            return err(
                ErrorKind::AlreadyExists,
                format!("exec id {:?} is already taken", exec.exec_id),
            );
        }
        let Some(container) = self.container(&init_ref) else {
            return err(ErrorKind::Internal, "a running init without its container");
        };
        let info = &container.info;
        let (namespaces, seccomp) = (info.namespaces.clone(), info.seccomp.clone());
        let (container_id, cgroup) = (container.id.clone(), container.cgroup.clone());
        let Exec {
            mut process, stdio, ..
        } = exec;
        process.oom_score_adj = process.oom_score_adj.or(info.oom_score_adj);
        let caps = match container::validate_process(&process) {
            Ok(caps) => caps,
            Err(e) => return Reply::Now(Err(e)),
        };
        let (stdio, terminal_conn) = match self.claim_stdio(process_ref, &stdio, &process) {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        let plan = ExecPlan {
            process,
            caps,
            seccomp,
            stdio,
        };
        let mut created = match self.system.exec(init, &cgroup, &namespaces, plan) {
            Ok(created) => created,
            Err(e) => return Reply::Now(Err(e)),
        };
        let terminal = match start_relay(process_ref, created.as_mut(), terminal_conn) {
            Ok(terminal) => terminal,
            Err(e) => return Reply::Now(Err(e)),
        };
        // Tracked before it may run, so that its exit finds it.
        self.processes.push(Tracked {
            process: process_ref.clone(),
            container: container_id,
            pid: created.pid(),
            started: false,
            exit: None,
            reported: false,
            terminal,
        });
        match created.start() {
            Ok(pid) => {
                self.started(id, process_ref, pid);
                Reply::Later
            }
            Err(e) => {
                // It never ran: forget it (its relay sees the end and closes the stream).
                self.processes.retain(|p| p.process != *process_ref);
                Reply::Now(Err(e))
            }
        }
    }

    /// Answers the request that started `process`, then reports its exit if it has ended
    /// already: the `exited` event always follows the `started` response.
    fn started(&mut self, id: u64, process: &ProcessRef, pid: Pid) {
        self.respond(id, Ok(ResponseBody::Started { pid: pid.as_raw() }));
        if let Some(tracked) = self.find_mut(process) {
            tracked.started = true;
        }
        self.flush_exit(process);
    }

    /// Takes the attached streams `stdio` names for `process`, after checking that `stdio`
    /// agrees with its `terminal` field: the descriptors to become its 0, 1, 2 (`/dev/null` for
    /// streams not asked for), or the terminal's stream connection. Fails, taking none, if one
    /// asked for is not attached.
    fn claim_stdio(
        &mut self,
        process: &ProcessRef,
        stdio: &Stdio,
        spec_process: &Process,
    ) -> Result<(StdioSetup, Option<File>), ErrorResponse> {
        container::check_terminal(stdio, spec_process)?;
        let not_attached = |kind: StreamKind| {
            ErrorResponse::new(
                ErrorKind::InvalidState,
                format!("the {kind} stream of {process} is not attached"),
            )
        };
        let wanted = match *stdio {
            Stdio::Terminal { rows, cols } => {
                let conn = self
                    .streams
                    .remove(&(process.clone(), StreamKind::Terminal))
                    .ok_or_else(|| not_attached(StreamKind::Terminal))?;
                return Ok((StdioSetup::Terminal { rows, cols }, Some(conn)));
            }
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => [
                (stdin, StreamKind::Stdin),
                (stdout, StreamKind::Stdout),
                (stderr, StreamKind::Stderr),
            ],
        };
        for (want, kind) in wanted {
            if want && !self.streams.contains_key(&(process.clone(), kind)) {
                return Err(not_attached(kind));
            }
        }
        let dev_null = self.paths.agent_root.join("dev/null");
        let open_null = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev_null)
                .map_err(|e| {
                    ErrorResponse::new(
                        ErrorKind::Io,
                        format!("opening {}: {e}", dev_null.display()),
                    )
                })
        };
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(3);
        for (want, kind) in wanted {
            let stream = if want {
                self.streams.remove(&(process.clone(), kind))
            } else {
                None
            };
            let file = match stream {
                Some(stream) => stream,
                None => open_null()?,
            };
            fds.push(file.into());
        }
        let fds: [OwnedFd; 3] = fds.try_into().expect("three streams");
        Ok((StdioSetup::Pipes(fds), None))
    }

    /// Starts the init `init` of a created container.
    fn start(&mut self, id: u64, init: &ProcessRef) -> Reply {
        if matches!(init, ProcessRef::Exec(_)) {
            return err(
                ErrorKind::InvalidRequest,
                format!("start names {init}; it must name a container's init"),
            );
        }
        let Some(container) = self.containers.iter_mut().find(|c| c.init == *init) else {
            return err(ErrorKind::InvalidState, not_created(init).message);
        };
        let Some(created) = container.created.take() else {
            return err(ErrorKind::InvalidState, "the container is already started");
        };
        match created.start() {
            Ok(pid) => {
                self.started(id, init, pid);
                Reply::Later
            }
            Err(e) => Reply::Now(Err(e)),
        }
    }

    /// A tracked process's pid and whether it has ended.
    fn pid_of(&self, process: &ProcessRef) -> Result<(Pid, bool), ErrorResponse> {
        match self.find(process) {
            Some(tracked) => Ok((tracked.pid, tracked.exit.is_some())),
            None if !matches!(process, ProcessRef::Exec(_)) => Err(not_created(process)),
            None => Err(ErrorResponse::new(
                ErrorKind::NotFound,
                format!("no such process: {process}"),
            )),
        }
    }

    fn signal(&mut self, process: &ProcessRef, number: i32, all: bool) -> Reply {
        if all && matches!(process, ProcessRef::Exec(_)) {
            return err(
                ErrorKind::InvalidRequest,
                format!("signal with all: true names {process}; it must name the init process"),
            );
        }
        let Ok(signal) = Signal::try_from(number) else {
            return err(
                ErrorKind::InvalidRequest,
                format!("signal {number} is not supported"),
            );
        };
        let (pid, exited) = match self.pid_of(process) {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        if exited {
            return err(ErrorKind::InvalidState, format!("{process} has exited"));
        }
        if all {
            for pid in self.container_pids(process) {
                let _ = self.system.kill(pid, signal);
            }
            return Reply::Now(Ok(ResponseBody::Ok));
        }
        match self.system.kill(pid, signal) {
            Ok(()) => Reply::Now(Ok(ResponseBody::Ok)),
            Err(e) => err(ErrorKind::Io, format!("kill({pid}, {signal}): {e}")),
        }
    }

    fn wait(&mut self, id: u64, process: ProcessRef) -> Reply {
        match self.find(&process) {
            None if !matches!(process, ProcessRef::Exec(_)) => {
                Reply::Now(Err(not_created(&process)))
            }
            None => err(ErrorKind::NotFound, format!("no such process: {process}")),
            Some(Tracked {
                reported: true,
                exit: Some(status),
                ..
            }) => Reply::Now(Ok(ResponseBody::Exited { status: *status })),
            Some(_) => {
                self.waits.push((id, process));
                Reply::Later
            }
        }
    }

    fn resize_terminal(&self, process: &ProcessRef, rows: u16, cols: u16) -> Reply {
        let Some(tracked) = self.find(process) else {
            return err(ErrorKind::NotFound, format!("no such process: {process}"));
        };
        let Some(terminal) = &tracked.terminal else {
            return err(
                ErrorKind::InvalidRequest,
                format!("{process} has no terminal (its stdio is pipes)"),
            );
        };
        if tracked.exit.is_some() {
            return err(ErrorKind::InvalidState, format!("{process} has exited"));
        }
        Reply::Now(terminal.resize(rows, cols).map(|()| ResponseBody::Ok))
    }

    /// `configure_network`: in the network namespace of the container's init, or the agent's
    /// own before there is a container.
    fn configure_network(&self, config: &hull_protocol::NetworkConfig) -> Reply {
        // A pod's containers share the VM's own namespace (they make none of their own).
        let target = match self.pid_of(&ProcessRef::Init) {
            Ok((init, _)) => match std::fs::File::open(format!("/proc/{init}/ns/net")) {
                Ok(file) => Some(file),
                Err(e) => {
                    return Reply::Now(Err(ErrorResponse::new(
                        ErrorKind::Io,
                        format!("the container's network namespace (pid {init}): {e}"),
                    )))
                }
            },
            Err(_) => None,
        };
        Reply::Now(crate::network::configure(config, target.as_ref()).map(|()| ResponseBody::Ok))
    }

    /// The processes of the container whose init is `init` (see [`System::container_pids`]);
    /// none before it is created.
    fn container_pids(&self, init: &ProcessRef) -> Vec<Pid> {
        match self.pid_of(init) {
            Ok((pid, false)) => self.system.container_pids(pid),
            // Ended: its PID namespace went with it (and its pid may be another's now).
            Ok((_, true)) | Err(_) => Vec::new(),
        }
    }

    /// Every container's processes.
    fn kill_all(&mut self, signal: Signal) {
        let inits: Vec<ProcessRef> = self.containers.iter().map(|c| c.init.clone()).collect();
        for init in inits {
            for pid in self.container_pids(&init) {
                let _ = self.system.kill(pid, signal);
            }
        }
    }

    fn processes_of(&self, init: &ProcessRef) -> Reply {
        let list = self
            .container_pids(init)
            .into_iter()
            .filter_map(|pid| self.system.process_info(pid))
            .collect();
        Reply::Now(Ok(ResponseBody::Processes(list)))
    }

    fn list_processes(&self) -> Reply {
        self.processes_of(&ProcessRef::Init)
    }

    fn container_processes(&self, container_id: &str) -> Reply {
        match self.pod_container(container_id) {
            Ok(container) => self.processes_of(&container.init.clone()),
            Err(e) => Reply::Now(Err(e)),
        }
    }

    fn stats(&self, container_id: &str) -> Reply {
        let container = match self.pod_container(container_id) {
            Ok(container) => container,
            Err(e) => return Reply::Now(Err(e)),
        };
        Reply::Now(
            self.system
                .stats(&container.cgroup)
                .map(ResponseBody::Stats),
        )
    }

    fn update(&mut self, container_id: &str, resources: &hull_protocol::Resources) -> Reply {
        let cgroup = match self.pod_container(container_id) {
            Ok(container) => container.cgroup.clone(),
            Err(e) => return Reply::Now(Err(e)),
        };
        Reply::Now(
            self.system
                .update(&cgroup, resources)
                .map(|()| ResponseBody::Ok),
        )
    }

    /// `remove_container`: a pod's container that was never started, or whose init has ended.
    /// What is left of it is killed, its processes forgotten and its cgroup removed.
    fn remove_container(&mut self, container_id: &str) -> Reply {
        let init = ProcessRef::Container(container_id.to_owned());
        let Some(index) = self.containers.iter().position(|c| c.init == init) else {
            return Reply::Now(Err(not_created(&init)));
        };
        if self.containers[index].created.is_none() {
            if let Ok((_, false)) = self.pid_of(&init) {
                return err(
                    ErrorKind::InvalidState,
                    format!("{init} is running: stop it first"),
                );
            }
        }
        for pid in self.container_pids(&init) {
            let _ = self.system.kill(pid, Signal::SIGKILL);
        }
        // A container never started: dropping its waiting init dismisses it.
        let container = self.containers.remove(index);
        drop(container.created);
        self.processes.retain(|p| p.container != container.id);
        let processes = &self.processes;
        self.waits
            .retain(|(_, process)| processes.iter().any(|p| p.process == *process));
        self.streams.retain(|(process, _), _| *process != init);
        self.system.remove(&container.cgroup);
        Reply::Now(Ok(ResponseBody::Ok))
    }

    fn set_hostname(&mut self, hostname: &str) -> Reply {
        let valid = !hostname.is_empty()
            && hostname.len() <= 64
            && hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
        if !valid {
            return err(
                ErrorKind::InvalidRequest,
                format!("hostname {hostname:?}: 1 to 64 of [A-Za-z0-9.-]"),
            );
        }
        Reply::Now(
            self.system
                .set_hostname(hostname)
                .map(|()| ResponseBody::Ok),
        )
    }

    /// A stream connection's hello: keeps the stream until a request claims it, or says why not.
    fn attach(&mut self, process: ProcessRef, kind: StreamKind, stream: File) -> StreamReply {
        let rejected = |kind: ErrorKind, message: String| {
            StreamReply::Rejected(ErrorResponse::new(kind, message))
        };
        if self.connection.is_none() {
            return rejected(
                ErrorKind::InvalidState,
                "no control connection: streams belong to one".into(),
            );
        }
        let exists = match &process {
            ProcessRef::Init | ProcessRef::Container(_) => self.container(&process).is_some(),
            ProcessRef::Exec(_) => self.find(&process).is_some(),
        };
        if exists {
            return rejected(
                ErrorKind::AlreadyExists,
                format!("{process} already exists"),
            );
        }
        let key = (process, kind);
        if self.streams.contains_key(&key) {
            return rejected(
                ErrorKind::AlreadyExists,
                format!("{kind} of {} is already attached", key.0),
            );
        }
        self.streams.insert(key, stream);
        StreamReply::Accepted
    }
}

/// Starts the relay of a new process's terminal, if it has one.
fn start_relay(
    process: &ProcessRef,
    created: &mut dyn Waiting,
    conn: Option<File>,
) -> Result<Option<relay::Handle>, ErrorResponse> {
    match (created.take_terminal(), conn) {
        (Some(master), Some(conn)) => relay::start(process.to_string(), master, conn)
            .map(Some)
            .map_err(|e| {
                ErrorResponse::new(
                    ErrorKind::Io,
                    format!("starting the terminal relay of {process}: {e}"),
                )
            }),
        (None, None) => Ok(None),
        _ => Err(ErrorResponse::new(
            ErrorKind::Internal,
            format!("the terminal of {process} and its stream do not match"),
        )),
    }
}

#[cfg(test)]
mod tests {
    //! The owner driven with made-up events over a made-up system: no forks, no signals sent,
    //! no VM. The host's end of the control connection is a Unix socket pair read here.

    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::mpsc;

    use hull_protocol::spec::{ContainerSpec, Namespace, NamespaceKind};
    use hull_protocol::stdio::StreamHello;
    use hull_protocol::{encode_frame, read_frame, Rootfs};

    use super::*;
    use crate::server::outbox::MAX_QUEUED_BYTES;

    const INIT_PID: i32 = 4100;

    /// What the made-up system was asked to do.
    #[derive(Debug, Default)]
    struct FakeSystem {
        next_pid: i32,
        /// The next `start` fails with this.
        start_fails: Option<ErrorResponse>,
        kills: Vec<(Pid, Signal)>,
        /// What `container_pids` gives.
        pids: Vec<Pid>,
        powered_off: Option<String>,
        /// The cgroups made and not removed.
        cgroups: Vec<String>,
        /// Each exec's init and cgroup.
        execs: Vec<(Pid, String)>,
        updates: Vec<(String, hull_protocol::Resources)>,
        hostname: Option<String>,
    }

    #[derive(Debug)]
    struct FakeWaiting {
        pid: Pid,
        fails: Option<ErrorResponse>,
    }

    impl Waiting for FakeWaiting {
        fn pid(&self) -> Pid {
            self.pid
        }
        fn take_terminal(&mut self) -> Option<OwnedFd> {
            None
        }
        fn start(self: Box<Self>) -> Result<Pid, ErrorResponse> {
            match self.fails {
                Some(e) => Err(e),
                None => Ok(self.pid),
            }
        }
    }

    impl FakeSystem {
        fn waiting(&mut self) -> Box<dyn Waiting> {
            let pid = Pid::from_raw(INIT_PID + self.next_pid);
            self.next_pid += 1;
            Box::new(FakeWaiting {
                pid,
                fails: self.start_fails.take(),
            })
        }
    }

    impl System for FakeSystem {
        fn create(
            &mut self,
            cgroup: &str,
            _config: Config,
        ) -> Result<Box<dyn Waiting>, ErrorResponse> {
            self.cgroups.push(cgroup.to_owned());
            Ok(self.waiting())
        }
        fn exec(
            &mut self,
            init: Pid,
            cgroup: &str,
            _namespaces: &[(&'static str, CloneFlags)],
            _plan: ExecPlan,
        ) -> Result<Box<dyn Waiting>, ErrorResponse> {
            self.execs.push((init, cgroup.to_owned()));
            Ok(self.waiting())
        }
        fn stats(&self, cgroup: &str) -> Result<hull_protocol::ContainerStats, ErrorResponse> {
            assert!(self.cgroups.iter().any(|c| c == cgroup), "{cgroup}");
            Ok(hull_protocol::ContainerStats {
                pids_current: 1,
                ..Default::default()
            })
        }
        fn update(
            &mut self,
            cgroup: &str,
            resources: &hull_protocol::Resources,
        ) -> Result<(), ErrorResponse> {
            self.updates.push((cgroup.to_owned(), *resources));
            Ok(())
        }
        fn remove(&mut self, cgroup: &str) {
            self.cgroups.retain(|c| c != cgroup);
        }
        fn set_hostname(&mut self, hostname: &str) -> Result<(), ErrorResponse> {
            self.hostname = Some(hostname.to_owned());
            Ok(())
        }
        fn kill(&mut self, pid: Pid, signal: Signal) -> Result<(), nix::errno::Errno> {
            self.kills.push((pid, signal));
            Ok(())
        }
        fn container_pids(&self, _init: Pid) -> Vec<Pid> {
            self.pids.clone()
        }
        fn process_info(&self, pid: Pid) -> Option<hull_protocol::ProcessInfo> {
            Some(hull_protocol::ProcessInfo {
                pid: pid.as_raw(),
                ppid: 1,
                uid: 0,
                args: vec!["sh".into()],
                comm: "sh".into(),
            })
        }
        fn power_off(&mut self, reason: &str) {
            self.powered_off = Some(reason.into());
        }
    }

    fn owner() -> Owner<FakeSystem> {
        let paths = Paths {
            // `/dev/null` of this host stands in for the streams not asked for.
            agent_root: PathBuf::from("/"),
            proc_dir: PathBuf::from("/nonexistent-hull/proc"),
            rootfs_dir: PathBuf::from("/nonexistent-hull/rootfs"),
            rootfs_override: Some(PathBuf::from("/nonexistent-hull/bundle")),
            cgroup_root: None,
        };
        Owner::new(paths, FakeSystem::default())
    }

    /// The host's end of one control connection.
    struct Host {
        id: ConnectionId,
        conn: UnixStream,
        handled: Receiver<()>,
        writer: Option<std::thread::JoinHandle<()>>,
    }

    impl Host {
        /// Connects (the handshake is the control thread's, not the owner's) and starts the
        /// connection's writer.
        fn connect(owner: &mut Owner<FakeSystem>, id: u64) -> Self {
            let (host, agent) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let agent = File::from(OwnedFd::from(agent));
            let (outbox, writer) = Outbox::new(&agent).unwrap();
            let (handled, each_handled) = mpsc::channel();
            let id = ConnectionId(id);
            owner.handle(ServerEvent::Connected {
                id,
                outbox,
                handled,
            });
            Self {
                id,
                conn: host,
                handled: each_handled,
                writer: Some(std::thread::spawn(move || writer.run())),
            }
        }

        /// Sends one frame body and checks that the owner has handled it.
        fn frame(&self, owner: &mut Owner<FakeSystem>, body: Vec<u8>) {
            owner.handle(ServerEvent::Frame { id: self.id, body });
            self.handled.try_recv().expect("the frame was handled");
        }

        fn send(&self, owner: &mut Owner<FakeSystem>, id: u64, body: RequestBody) {
            let frame = encode_frame(&HostMessage::Request(Request { id, body })).unwrap();
            self.frame(owner, frame[4..].to_vec());
        }

        fn next(&mut self) -> AgentMessage {
            read_frame::<_, AgentMessage>(&mut self.conn)
                .unwrap()
                .expect("a frame, not the end of the connection")
        }

        fn response(&mut self, id: u64) -> Result<ResponseBody, ErrorResponse> {
            match self.next() {
                AgentMessage::Response(r) if r.id == id => r.result,
                other => panic!("expected the response to {id}, got {other:?}"),
            }
        }

        fn request(
            &mut self,
            owner: &mut Owner<FakeSystem>,
            id: u64,
            body: RequestBody,
        ) -> Result<ResponseBody, ErrorResponse> {
            self.send(owner, id, body);
            self.response(id)
        }

        fn disconnect(mut self, owner: &mut Owner<FakeSystem>) {
            owner.handle(ServerEvent::Disconnected { id: self.id });
            // The owner let go of the outbox: the writer drains it and ends.
            self.writer.take().unwrap().join().unwrap();
        }
    }

    fn attach(owner: &mut Owner<FakeSystem>, process: ProcessRef, kind: StreamKind) -> StreamReply {
        let (_host, agent) = UnixStream::pair().unwrap();
        let (reply, answer) = mpsc::channel();
        owner.handle(ServerEvent::Attach {
            hello: StreamHello {
                process,
                stream: kind,
            },
            stream: File::from(OwnedFd::from(agent)),
            reply,
        });
        answer.try_recv().expect("attach is answered at once")
    }

    fn process(args: &[&str]) -> Process {
        Process {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            cwd: "/".into(),
            ..Process::default()
        }
    }

    fn create_body(stdio: Stdio) -> RequestBody {
        let ns = |kind| Namespace { kind, path: None };
        RequestBody::CreateContainer(Box::new(CreateContainer {
            container_id: "box".into(),
            spec: ContainerSpec {
                process: process(&["sh"]),
                namespaces: vec![ns(NamespaceKind::Pid), ns(NamespaceKind::Mount)],
                ..ContainerSpec::default()
            },
            rootfs: Rootfs {
                fs_tag: "rootfs".into(),
                readonly: false,
                subdir: None,
            },
            stdio,
            binds_fs_tag: None,
            pod: false,
        }))
    }

    fn exec_body(exec_id: &str) -> RequestBody {
        RequestBody::Exec(Box::new(Exec {
            exec_id: exec_id.into(),
            process: process(&["true"]),
            stdio: Stdio::NULL,
            container_id: None,
        }))
    }

    fn reaped(pid: i32, ending: Ending) -> ServerEvent {
        ServerEvent::Reaped(vec![Reaped {
            pid: Pid::from_raw(pid),
            ending,
        }])
    }

    fn kind_of(result: Result<ResponseBody, ErrorResponse>) -> ErrorKind {
        result.expect_err("an error response").kind
    }

    /// A created and started container: the host, and the init's pid.
    fn running(owner: &mut Owner<FakeSystem>) -> Host {
        let mut host = Host::connect(owner, 1);
        assert_eq!(
            host.request(owner, 1, create_body(Stdio::NULL)),
            Ok(ResponseBody::Ok)
        );
        assert_eq!(
            host.request(owner, 2, RequestBody::StartContainer),
            Ok(ResponseBody::Started { pid: INIT_PID })
        );
        host
    }

    #[test]
    fn requests_before_a_container_get_clear_errors() {
        let mut owner = owner();
        let mut host = Host::connect(&mut owner, 1);
        let o = &mut owner;
        assert_eq!(
            host.request(o, 1, RequestBody::StartContainer),
            Err(ErrorResponse::new(
                ErrorKind::InvalidState,
                "no container is created"
            ))
        );
        let wait = RequestBody::Wait {
            process: ProcessRef::Init,
        };
        assert_eq!(kind_of(host.request(o, 2, wait)), ErrorKind::NotFound);
        let signal = RequestBody::Signal {
            process: ProcessRef::Init,
            signal: 15,
            all: false,
        };
        assert_eq!(kind_of(host.request(o, 3, signal)), ErrorKind::NotFound);
        assert_eq!(
            kind_of(host.request(o, 4, exec_body("e"))),
            ErrorKind::InvalidState
        );
        let resize = RequestBody::ResizeTerminal {
            process: ProcessRef::Init,
            rows: 1,
            cols: 1,
        };
        assert_eq!(kind_of(host.request(o, 5, resize)), ErrorKind::NotFound);
        assert_eq!(
            host.request(o, 6, RequestBody::ListProcesses),
            Ok(ResponseBody::Processes(Vec::new()))
        );
        assert!(o.system.kills.is_empty());
    }

    #[test]
    fn a_spec_outside_the_protocol_s_types_is_an_invalid_request() {
        let mut owner = owner();
        let mut host = Host::connect(&mut owner, 1);
        let o = &mut owner;
        let valid = HostMessage::Request(Request {
            id: 1,
            body: create_body(Stdio::NULL),
        });
        let create = |spec: serde_json::Value| {
            let mut message = serde_json::to_value(&valid).unwrap();
            message["request"]["body"]["create_container"]["spec"] = spec;
            serde_json::to_vec(&message).unwrap()
        };
        // What the host refuses cannot even be decoded: a time namespace, a capability name,
        // a seccomp argument index that is no u8; and the OCI layout itself.
        for spec in [
            serde_json::json!({"process": {"args": ["sh"], "cwd": "/"},
                "namespaces": [{"kind": "time"}]}),
            serde_json::json!({"process": {"args": ["sh"], "cwd": "/",
                "capabilities": {"bounding": ["CAP_KILL"]}}}),
            serde_json::json!({"process": {"args": ["sh"], "cwd": "/"},
                "seccomp": {"defaultAction": "allow", "syscalls": [{"names": ["kill"],
                    "action": "allow", "args": [{"index": 256, "op": {"eq": 1}}]}]}}),
            serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]},
                "linux": {"namespaces": [{"type": "pid"}]}}),
        ] {
            host.frame(o, create(spec));
            let err = host.response(1).expect_err("an error response");
            assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err:?}");
        }
        assert!(o.containers.is_empty());
        assert_eq!(
            host.request(o, 2, create_body(Stdio::NULL)),
            Ok(ResponseBody::Ok)
        );
    }

    #[test]
    fn frames_that_make_no_sense_are_answered_or_logged_and_the_next_is_served() {
        let mut owner = owner();
        let mut host = Host::connect(&mut owner, 1);
        let o = &mut owner;
        // Unreadable, but with an id: an error response to that id.
        host.frame(
            o,
            br#"{"request": {"id": 7, "body": "no_such_request"}}"#.to_vec(),
        );
        assert_eq!(kind_of(host.response(7)), ErrorKind::InvalidRequest);
        // No id to answer, a second hello, nothing at all, bytes that are no JSON: logged.
        let hello = encode_frame(&HostMessage::Hello(hull_protocol::HostHello::new("h"))).unwrap();
        for body in [
            br#"{"request": {"body": "list_processes"}}"#.to_vec(),
            hello[4..].to_vec(),
            Vec::new(),
            vec![0xff, 0x00, b'{', b'"'],
            br#"{"request": {"id": -1}}"#.to_vec(),
        ] {
            host.frame(o, body);
        }
        // Nothing was sent for those: the next frame the host reads answers the next request.
        assert_eq!(
            host.request(o, 8, RequestBody::ListProcesses),
            Ok(ResponseBody::Processes(Vec::new()))
        );
    }

    #[test]
    fn an_exit_is_reported_after_started_then_waits_are_answered() {
        let mut owner = owner();
        let mut host = running(&mut owner);
        let o = &mut owner;
        let wait = || RequestBody::Wait {
            process: ProcessRef::Init,
        };
        host.send(o, 3, wait());
        host.send(o, 4, wait());
        // A child that is not the container's: nothing to tell the host.
        o.handle(reaped(99, Ending::Exited(0)));
        o.handle(reaped(INIT_PID, Ending::Exited(3)));
        assert_eq!(
            host.next(),
            AgentMessage::Event(Event::Exited {
                process: ProcessRef::Init,
                pid: INIT_PID,
                status: ExitStatus::Code(3)
            })
        );
        let exited = Ok(ResponseBody::Exited {
            status: ExitStatus::Code(3),
        });
        assert_eq!(host.response(3), exited);
        assert_eq!(host.response(4), exited);
        // Once reported, `wait` answers at once; a second reap of the pid changes nothing.
        o.handle(reaped(INIT_PID, Ending::Signaled(Signal::SIGKILL)));
        assert_eq!(host.request(o, 5, wait()), exited);
        let signal = RequestBody::Signal {
            process: ProcessRef::Init,
            signal: 15,
            all: false,
        };
        assert_eq!(kind_of(host.request(o, 6, signal)), ErrorKind::InvalidState);
        assert_eq!(
            kind_of(host.request(o, 7, RequestBody::StartContainer)),
            ErrorKind::InvalidState
        );
    }

    #[test]
    fn an_init_that_ends_before_its_start_is_reported_after_the_started_response() {
        let mut owner = owner();
        let mut host = Host::connect(&mut owner, 1);
        let o = &mut owner;
        assert_eq!(
            host.request(o, 1, create_body(Stdio::NULL)),
            Ok(ResponseBody::Ok)
        );
        o.handle(reaped(INIT_PID, Ending::Signaled(Signal::SIGKILL)));
        assert_eq!(
            host.request(o, 2, RequestBody::StartContainer),
            Ok(ResponseBody::Started { pid: INIT_PID })
        );
        assert_eq!(
            host.next(),
            AgentMessage::Event(Event::Exited {
                process: ProcessRef::Init,
                pid: INIT_PID,
                status: ExitStatus::Signal(9)
            })
        );
    }

    #[test]
    fn exec_ids_signals_and_a_failed_start() {
        let mut owner = owner();
        let mut host = running(&mut owner);
        let o = &mut owner;
        let exec_pid = INIT_PID + 1;
        assert_eq!(
            host.request(o, 3, exec_body("a")),
            Ok(ResponseBody::Started { pid: exec_pid })
        );
        assert_eq!(
            kind_of(host.request(o, 4, exec_body("a"))),
            ErrorKind::AlreadyExists
        );
        // A start that fails leaves the id free.
        o.system.start_fails = Some(ErrorResponse::new(ErrorKind::NotFound, "no such program"));
        assert_eq!(
            kind_of(host.request(o, 5, exec_body("b"))),
            ErrorKind::NotFound
        );
        assert_eq!(
            host.request(o, 6, exec_body("b")),
            Ok(ResponseBody::Started { pid: exec_pid + 2 })
        );

        let a = ProcessRef::Exec("a".into());
        let signal = |process: &ProcessRef, signal, all| RequestBody::Signal {
            process: process.clone(),
            signal,
            all,
        };
        assert_eq!(
            host.request(o, 7, signal(&a, 15, false)),
            Ok(ResponseBody::Ok)
        );
        assert_eq!(
            kind_of(host.request(o, 8, signal(&a, 15, true))),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            kind_of(host.request(o, 9, signal(&ProcessRef::Init, 999, false))),
            ErrorKind::InvalidRequest
        );
        o.system.pids = vec![Pid::from_raw(INIT_PID), Pid::from_raw(exec_pid)];
        assert_eq!(
            host.request(o, 10, signal(&ProcessRef::Init, 2, true)),
            Ok(ResponseBody::Ok)
        );
        assert_eq!(
            o.system.kills,
            [
                (Pid::from_raw(exec_pid), Signal::SIGTERM),
                (Pid::from_raw(INIT_PID), Signal::SIGINT),
                (Pid::from_raw(exec_pid), Signal::SIGINT),
            ]
        );

        o.handle(reaped(exec_pid, Ending::Exited(0)));
        assert_eq!(
            host.next(),
            AgentMessage::Event(Event::Exited {
                process: a.clone(),
                pid: exec_pid,
                status: ExitStatus::Code(0)
            })
        );
        assert_eq!(
            kind_of(host.request(o, 11, signal(&a, 15, false))),
            ErrorKind::InvalidState
        );
        // Ended, but its id stays taken.
        assert_eq!(
            kind_of(host.request(o, 12, exec_body("a"))),
            ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn streams_belong_to_a_control_connection() {
        let mut owner = owner();
        let o = &mut owner;
        let rejected_with = |reply: StreamReply| match reply {
            StreamReply::Rejected(e) => e.kind,
            StreamReply::Accepted => panic!("accepted"),
        };
        let stdout = |o: &mut Owner<FakeSystem>| attach(o, ProcessRef::Init, StreamKind::Stdout);
        assert_eq!(rejected_with(stdout(o)), ErrorKind::InvalidState);

        let host = Host::connect(o, 1);
        assert_eq!(stdout(o), StreamReply::Accepted);
        assert_eq!(rejected_with(stdout(o)), ErrorKind::AlreadyExists);
        // Streams not claimed die with the connection.
        host.disconnect(o);
        assert_eq!(rejected_with(stdout(o)), ErrorKind::InvalidState);

        let mut host = Host::connect(o, 2);
        let pipes = Stdio::Pipes {
            stdin: false,
            stdout: true,
            stderr: false,
        };
        let err = host.request(o, 1, create_body(pipes)).unwrap_err();
        assert_eq!(
            err.message,
            "the stdout stream of the init process is not attached"
        );
        assert_eq!(stdout(o), StreamReply::Accepted);
        assert_eq!(host.request(o, 2, create_body(pipes)), Ok(ResponseBody::Ok));
        assert!(o.streams.is_empty(), "claimed by the create");
        assert_eq!(rejected_with(stdout(o)), ErrorKind::AlreadyExists);
        assert_eq!(
            kind_of(host.request(o, 3, create_body(Stdio::NULL))),
            ErrorKind::InvalidState
        );
    }

    #[test]
    fn events_of_a_connection_let_go_are_ignored() {
        let mut owner = owner();
        let old = Host::connect(&mut owner, 1);
        let mut new = Host::connect(&mut owner, 2);
        // The old connection's frames are not served, and its end does not end the new one.
        owner.handle(ServerEvent::Frame {
            id: old.id,
            body: br#"{"request": {"id": 1, "body": "list_processes"}}"#.to_vec(),
        });
        assert!(old.handled.try_recv().is_err());
        owner.handle(ServerEvent::Disconnected { id: old.id });
        assert_eq!(
            new.request(&mut owner, 2, RequestBody::ListProcesses),
            Ok(ResponseBody::Processes(Vec::new()))
        );
    }

    #[test]
    fn a_host_that_stops_reading_loses_its_connection_and_reaping_goes_on() {
        let mut owner = owner();
        let mut host = running(&mut owner);
        let o = &mut owner;
        // The host sends and never reads: the socket fills, then the outbox.
        let mut sent = 0u64;
        while o.connection.is_some() {
            o.handle(ServerEvent::Frame {
                id: host.id,
                body: br#"{"request": {"id": 1, "body": "list_processes"}}"#.to_vec(),
            });
            sent += 1;
            assert!(sent < 1_000_000, "the connection was never let go");
        }
        // Let go once the outbox was full (each answer is under 100 bytes), not before; the
        // owner never blocked, and the host's connection ends.
        assert!(
            sent as usize > MAX_QUEUED_BYTES / 100,
            "let go after {sent} frames"
        );
        host.writer.take().unwrap().join().unwrap();
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut host.conn, &mut rest);
        // Reaping goes on: the exit is recorded, to be told to a `wait` on a new connection.
        o.handle(reaped(INIT_PID, Ending::Exited(0)));
        let mut host = Host::connect(o, 2);
        let wait = RequestBody::Wait {
            process: ProcessRef::Init,
        };
        assert_eq!(
            host.request(o, 1, wait),
            Ok(ResponseBody::Exited {
                status: ExitStatus::Code(0)
            })
        );
    }

    #[test]
    fn shutdown_answers_then_kills_what_is_left_and_powers_off() {
        let mut owner = owner();
        let mut host = running(&mut owner);
        let o = &mut owner;
        o.system.pids = vec![Pid::from_raw(INIT_PID)];
        assert_eq!(
            host.request(o, 3, RequestBody::Shutdown),
            Ok(ResponseBody::Ok)
        );
        assert_eq!(o.system.kills, [(Pid::from_raw(INIT_PID), Signal::SIGKILL)]);
        assert_eq!(
            o.system.powered_off.as_deref(),
            Some("shutdown requested by the host")
        );
    }

    fn pod_create(id: &str) -> RequestBody {
        let RequestBody::CreateContainer(mut create) = create_body(Stdio::NULL) else {
            unreachable!()
        };
        create.container_id = id.into();
        create.pod = true;
        create.rootfs.fs_tag = hull_protocol::POD_FS_TAG.into();
        create.rootfs.subdir = Some(format!("{id}/rootfs"));
        RequestBody::CreateContainer(create)
    }

    #[test]
    fn a_pod_vm_holds_several_containers_each_with_its_own_init_and_cgroup() {
        let mut owner = owner();
        let mut host = Host::connect(&mut owner, 1);
        let o = &mut owner;
        let (a, b) = (
            ProcessRef::Container("a".into()),
            ProcessRef::Container("b".into()),
        );
        assert_eq!(host.request(o, 1, pod_create("a")), Ok(ResponseBody::Ok));
        assert_eq!(host.request(o, 2, pod_create("b")), Ok(ResponseBody::Ok));
        assert_eq!(o.system.cgroups, ["pod-a", "pod-b"]);
        // One id once; no single container beside pod ones; ids that are no plain names.
        assert_eq!(
            kind_of(host.request(o, 3, pod_create("a"))),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            kind_of(host.request(o, 4, create_body(Stdio::NULL))),
            ErrorKind::InvalidState
        );
        for bad in ["", "../x", ".hidden", "a/b"] {
            assert_eq!(
                kind_of(host.request(o, 5, pod_create(bad))),
                ErrorKind::InvalidRequest,
                "{bad:?}"
            );
        }
        // The single container's requests do not reach a pod's containers.
        assert_eq!(
            kind_of(host.request(o, 6, RequestBody::StartContainer)),
            ErrorKind::InvalidState
        );
        assert_eq!(
            host.request(o, 7, RequestBody::Start { process: b.clone() }),
            Ok(ResponseBody::Started { pid: INIT_PID + 1 })
        );
        assert_eq!(
            kind_of(host.request(o, 8, RequestBody::Start { process: b.clone() })),
            ErrorKind::InvalidState
        );
        // An exec joins the container it names: its init and its cgroup.
        let RequestBody::Exec(mut exec) = exec_body("e1") else {
            unreachable!()
        };
        exec.container_id = Some("b".into());
        assert_eq!(
            host.request(o, 9, RequestBody::Exec(exec.clone())),
            Ok(ResponseBody::Started { pid: INIT_PID + 2 })
        );
        assert_eq!(
            o.system.execs,
            [(Pid::from_raw(INIT_PID + 1), "pod-b".to_owned())]
        );
        exec.exec_id = "e2".into();
        exec.container_id = Some("a".into());
        // `a` is created, not started.
        assert_eq!(
            kind_of(host.request(o, 10, RequestBody::Exec(exec))),
            ErrorKind::InvalidState
        );
        assert_eq!(
            host.request(
                o,
                11,
                RequestBody::Stats {
                    container_id: "b".into()
                }
            ),
            Ok(ResponseBody::Stats(hull_protocol::ContainerStats {
                pids_current: 1,
                ..Default::default()
            }))
        );
        let resources = hull_protocol::Resources {
            memory_limit: Some(64 << 20),
            pids_limit: None,
        };
        assert_eq!(
            host.request(
                o,
                12,
                RequestBody::Update {
                    container_id: "b".into(),
                    resources
                }
            ),
            Ok(ResponseBody::Ok)
        );
        assert_eq!(o.system.updates, [("pod-b".to_owned(), resources)]);
        assert_eq!(
            kind_of(host.request(
                o,
                13,
                RequestBody::Stats {
                    container_id: "c".into()
                }
            )),
            ErrorKind::NotFound
        );
        // A running container is not removed; an ended one is, and its id is free again.
        let remove = |id: &str| RequestBody::RemoveContainer {
            container_id: id.into(),
        };
        assert_eq!(
            kind_of(host.request(o, 14, remove("b"))),
            ErrorKind::InvalidState
        );
        o.handle(reaped(INIT_PID + 1, Ending::Exited(0)));
        assert_eq!(
            host.next(),
            AgentMessage::Event(Event::Exited {
                process: b.clone(),
                pid: INIT_PID + 1,
                status: ExitStatus::Code(0)
            })
        );
        // An ended init's pid tells nothing any more: nothing is killed for it (another
        // container's processes would be).
        o.system.pids = vec![Pid::from_raw(4242)];
        let kills = o.system.kills.len();
        assert_eq!(host.request(o, 15, remove("b")), Ok(ResponseBody::Ok));
        assert_eq!(o.system.kills.len(), kills);
        assert_eq!(o.system.cgroups, ["pod-a"]);
        assert_eq!(
            kind_of(host.request(o, 16, RequestBody::Wait { process: b })),
            ErrorKind::NotFound
        );
        // A container never started is removed too.
        assert_eq!(host.request(o, 17, remove("a")), Ok(ResponseBody::Ok));
        assert_eq!(
            kind_of(host.request(o, 18, RequestBody::Start { process: a })),
            ErrorKind::InvalidState
        );
        assert_eq!(host.request(o, 19, pod_create("b")), Ok(ResponseBody::Ok));
        assert_eq!(
            host.request(
                o,
                20,
                RequestBody::SetHostname {
                    hostname: "pod-1".into()
                }
            ),
            Ok(ResponseBody::Ok)
        );
        assert_eq!(o.system.hostname.as_deref(), Some("pod-1"));
        assert_eq!(
            kind_of(host.request(
                o,
                21,
                RequestBody::SetHostname {
                    hostname: "a b".into()
                }
            )),
            ErrorKind::InvalidRequest
        );
    }
}
