//! Serving the host: the control connection and the stdio streams (docs/protocol.md).
//!
//! Threads, all started after the signals are blocked (so they inherit the mask and every
//! handled signal still goes to the main loop's `signalfd`):
//! - **control**: accepts one control connection at a time, runs the handshake and serves its
//!   requests one after another. Requests that wait (`wait`) are answered later.
//! - **stdio**: accepts stream connections, reads each one's hello and registers the stream
//!   until a request claims it.
//! - the **main loop** (`main.rs`) reaps and hands what it reaped to [`Server::reaped`], which
//!   sends the `exited` event and answers waits.
//! - one **terminal** relay per process with a terminal (`relay.rs`).
//!
//! The container's processes (its init and those `exec` added) are tracked by pid from before
//! they can run: each waits for a start byte (`container/mod.rs`), so an exit is never reaped
//! before the agent knows whose it is.
//!
//! They share one [`State`] behind a mutex. Nothing blocks while holding it except writes of a
//! frame to the control connection, which the host reads continuously; forks and the start
//! handshake with the container run unlocked.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use hull_protocol::stdio::StreamReply;
use hull_protocol::{
    agent_handshake, decode_body, read_frame_body, read_stream_hello, request_id_of, write_frame,
    AgentMessage, CreateContainer, ErrorKind, ErrorResponse, Event, Exec, ExitStatus, HostMessage,
    ProcessInfo, ProcessRef, Request, RequestBody, Response, ResponseBody, Stdio, StreamKind,
    MAX_FRAME_SIZE,
};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::container::{
    self, Config, Created, ExecConfig, RootfsSource, SeccompPlan, StdioSetup, Validated,
};
use crate::listener::Listener;
use crate::reaper::{Ending, Reaped};
use crate::spec::{Process, Spec};
use crate::{console, power, relay};

/// Where things are: `/...` in the guest, under the test root on a host.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The agent's root directory.
    pub agent_root: PathBuf,
    /// Its `/proc`.
    pub proc_dir: PathBuf,
    /// Where the container's rootfs is mounted (in the container's mount namespace).
    pub rootfs_dir: PathBuf,
    /// Test mode: a directory bind-mounted instead of the virtio-fs share.
    pub rootfs_override: Option<PathBuf>,
    /// Test mode: skip `pivot_root` (the guest's path, see `container/setup.rs`).
    pub no_pivot: bool,
}

/// The running server; the main loop feeds it what it reaps.
#[derive(Debug, Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    paths: Paths,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A clone of the control connection, for responses and events.
    writer: Option<File>,
    /// Streams attached and not yet claimed by a request.
    streams: HashMap<(ProcessRef, StreamKind), File>,
    container_id: Option<String>,
    /// What `exec` needs of the created container's spec.
    container: Option<ContainerInfo>,
    /// The created container, until `start_container` takes it.
    created: Option<Created>,
    /// The init, then every exec'd process, in the order they were created. Entries stay after
    /// the process has ended: `wait` still answers, and an exec id is never reused.
    processes: Vec<Tracked>,
    /// `wait` requests not answered yet: request id and process.
    waits: Vec<(u64, ProcessRef)>,
}

#[derive(Debug)]
struct ContainerInfo {
    /// The init's namespaces an exec'd process joins (`container::exec_namespaces`).
    namespaces: Vec<(&'static str, CloneFlags)>,
    seccomp: Option<SeccompPlan>,
}

/// A process of the container, from its creation on.
#[derive(Debug)]
struct Tracked {
    process: ProcessRef,
    pid: Pid,
    /// Whether the `started` response went out.
    started: bool,
    exit: Option<ExitStatus>,
    /// Whether the `exited` event went out (only after the `started` response).
    reported: bool,
    terminal: Option<relay::Handle>,
}

impl State {
    fn send(&mut self, msg: &AgentMessage) {
        if let Some(writer) = &mut self.writer {
            if let Err(e) = write_frame(writer, msg) {
                console::log(&format!("control connection: cannot send: {e}"));
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

    /// The init, if the container is running: started and not ended.
    fn running_init(&self) -> Result<Pid, ErrorResponse> {
        let state = |m: &str| ErrorResponse::new(ErrorKind::InvalidState, m);
        match self.find(&ProcessRef::Init) {
            None => Err(state("no container is created")),
            Some(Tracked { started: false, .. }) => Err(state("the container is not started")),
            Some(Tracked { exit: Some(_), .. }) => Err(state("the init process has exited")),
            Some(init) => Ok(init.pid),
        }
    }
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

impl Server {
    /// Starts the control and stdio threads on listeners that are already listening.
    pub fn start(paths: Paths, control: Listener, stdio: Listener) -> std::io::Result<Self> {
        let server = Self {
            shared: Arc::new(Shared {
                paths,
                state: Mutex::new(State::default()),
            }),
        };
        let s = server.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || s.control_loop(control))?;
        let s = server.clone();
        std::thread::Builder::new()
            .name("stdio".into())
            .spawn(move || s.stdio_loop(stdio))?;
        Ok(server)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic anywhere powers the VM off (the panic hook), so a poisoned lock is never seen
        // by anyone who could go on.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the main loop with every child it reaped.
    pub fn reaped(&self, reaped: &[Reaped]) {
        let mut state = self.lock();
        for r in reaped {
            let Some(tracked) = state
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
            state.flush_exit(&process);
        }
    }

    fn control_loop(self, listener: Listener) {
        loop {
            match listener.accept() {
                Ok(conn) => self.serve(conn),
                Err(e) => {
                    console::log(&format!("control: accept failed: {e}"));
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }

    fn serve(&self, mut conn: File) {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        // Registered before the handshake's answer goes out: the host may attach streams as
        // soon as it has read it.
        match conn.try_clone() {
            Ok(writer) => self.lock().writer = Some(writer),
            Err(e) => {
                console::log(&format!("control: cannot clone the connection: {e}"));
                return;
            }
        }
        if let Err(e) = agent_handshake(&mut conn, env!("CARGO_PKG_VERSION"), &release) {
            console::log(&format!(
                "control: handshake failed: {}",
                crate::error_chain(&e)
            ));
            self.lock().writer = None;
            return;
        }
        loop {
            let body = match read_frame_body(&mut conn, MAX_FRAME_SIZE) {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(e) => {
                    console::log(&format!("control: {}", crate::error_chain(&e)));
                    break;
                }
            };
            match decode_body::<HostMessage>(&body) {
                Ok(HostMessage::Request(request)) => self.handle(request),
                Ok(HostMessage::Hello(_)) => console::log("control: a second hello, ignored"),
                Err(e) => match request_id_of(&body) {
                    Some(id) => self.lock().respond(
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
        // Streams never claimed die with the control connection.
        let mut state = self.lock();
        state.writer = None;
        state.streams.clear();
    }

    fn handle(&self, request: Request) {
        let id = request.id;
        let reply = match request.body {
            RequestBody::CreateContainer(create) => self.create(create),
            RequestBody::StartContainer => self.start_container(id),
            RequestBody::Signal {
                process,
                signal,
                all,
            } => self.signal(&process, signal, all),
            RequestBody::Wait { process } => self.wait(id, process),
            RequestBody::ListProcesses => self.list_processes(),
            RequestBody::Shutdown => {
                self.lock().respond(id, Ok(ResponseBody::Ok));
                self.kill_all(Signal::SIGKILL);
                power::power_off("shutdown requested by the host");
            }
            RequestBody::Exec(exec) => self.exec(id, exec),
            RequestBody::ResizeTerminal {
                process,
                rows,
                cols,
            } => self.resize_terminal(&process, rows, cols),
        };
        if let Reply::Now(result) = reply {
            self.lock().respond(id, result);
        }
    }

    /// `create_container`. On failure the init's streams are closed, claimed or not, so the
    /// host's readers end and a retry attaches fresh ones.
    fn create(&self, create: CreateContainer) -> Reply {
        let reply = self.try_create(create);
        if let Reply::Now(Err(_)) = &reply {
            self.drop_streams(&ProcessRef::Init);
        }
        reply
    }

    fn drop_streams(&self, of: &ProcessRef) {
        self.lock().streams.retain(|(process, _), _| process != of);
    }

    fn try_create(&self, create: CreateContainer) -> Reply {
        let paths = &self.shared.paths;
        if let Some(existing) = &self.lock().container_id {
            return err(
                ErrorKind::InvalidState,
                format!("container {existing:?} is already created"),
            );
        }
        let spec: Spec = match create.parse_spec() {
            Ok(spec) => spec,
            Err(e) => return err(ErrorKind::InvalidSpec, format!("spec: {e}")),
        };
        let Validated {
            process,
            caps,
            seccomp,
        } = match Config::validate(&spec) {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        let (stdio, terminal_conn) =
            match self.claim_stdio(&ProcessRef::Init, &create.stdio, &process) {
                Ok(v) => v,
                Err(e) => return Reply::Now(Err(e)),
            };
        let rootfs = match &paths.rootfs_override {
            Some(dir) => RootfsSource::Bind(dir.clone()),
            None => RootfsSource::Virtiofs {
                tag: create.rootfs.fs_tag.clone(),
            },
        };
        let readonly = create.rootfs.readonly || spec.root.as_ref().is_some_and(|r| r.readonly);
        let info = ContainerInfo {
            namespaces: container::exec_namespaces(&spec),
            seccomp: seccomp.clone(),
        };
        let config = Config {
            spec,
            process,
            caps,
            seccomp,
            rootfs,
            readonly,
            rootfs_dir: paths.rootfs_dir.clone(),
            agent_root: paths.agent_root.clone(),
            no_pivot: paths.no_pivot,
            stdio,
        };
        let mut created = match container::create(config) {
            Ok(created) => created,
            Err(e) => return Reply::Now(Err(e)),
        };
        let terminal = match start_relay(&ProcessRef::Init, &mut created, terminal_conn) {
            Ok(terminal) => terminal,
            Err(e) => return Reply::Now(Err(e)),
        };
        let mut state = self.lock();
        state.container_id = Some(create.container_id);
        state.container = Some(info);
        state.processes.push(Tracked {
            process: ProcessRef::Init,
            pid: created.pid,
            started: false,
            exit: None,
            reported: false,
            terminal,
        });
        state.created = Some(created);
        Reply::Now(Ok(ResponseBody::Ok))
    }

    /// `exec`: checks, forks the process into the container, tracks it, then lets it run. On
    /// failure its streams are closed and the exec id stays free (nothing ran).
    fn exec(&self, id: u64, exec: Exec) -> Reply {
        let process_ref = ProcessRef::Exec(exec.exec_id.clone());
        let reply = self.try_exec(id, &process_ref, &exec);
        if let Reply::Now(Err(_)) = &reply {
            self.drop_streams(&process_ref);
        }
        reply
    }

    fn try_exec(&self, id: u64, process_ref: &ProcessRef, exec: &Exec) -> Reply {
        let (init, namespaces, seccomp) = {
            let state = self.lock();
            let init = match state.running_init() {
                Ok(init) => init,
                Err(e) => return Reply::Now(Err(e)),
            };
            if state.find(process_ref).is_some() {
                return err(
                    ErrorKind::AlreadyExists,
                    format!("exec id {:?} is already taken", exec.exec_id),
                );
            }
            let info = state
                .container
                .as_ref()
                .expect("a running init has its info");
            (init, info.namespaces.clone(), info.seccomp.clone())
        };
        let process: Process = match exec.parse_process() {
            Ok(process) => process,
            Err(e) => return err(ErrorKind::InvalidSpec, format!("process: {e}")),
        };
        let caps = match container::validate_process(&process) {
            Ok(caps) => caps,
            Err(e) => return Reply::Now(Err(e)),
        };
        let (stdio, terminal_conn) = match self.claim_stdio(process_ref, &exec.stdio, &process) {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        let (namespaces, root) =
            match container::open_init_namespaces(&self.shared.paths.proc_dir, init, &namespaces) {
                Ok(v) => v,
                Err(e) => return Reply::Now(Err(e)),
            };
        let mut created = match container::exec(ExecConfig {
            process,
            caps,
            seccomp,
            namespaces,
            root,
            stdio,
        }) {
            Ok(created) => created,
            Err(e) => return Reply::Now(Err(e)),
        };
        let terminal = match start_relay(process_ref, &mut created, terminal_conn) {
            Ok(terminal) => terminal,
            Err(e) => return Reply::Now(Err(e)),
        };
        // Tracked before it may run, so that its exit finds it.
        self.lock().processes.push(Tracked {
            process: process_ref.clone(),
            pid: created.pid,
            started: false,
            exit: None,
            reported: false,
            terminal,
        });
        match created.start() {
            Ok(pid) => {
                let mut state = self.lock();
                state.respond(id, Ok(ResponseBody::Started { pid: pid.as_raw() }));
                if let Some(tracked) = state.find_mut(process_ref) {
                    tracked.started = true;
                }
                state.flush_exit(process_ref);
                Reply::Later
            }
            Err(e) => {
                // It never ran: forget it (its relay sees the end and closes the stream).
                self.lock().processes.retain(|p| p.process != *process_ref);
                Reply::Now(Err(e))
            }
        }
    }

    /// Takes the attached streams `stdio` names for `process`, after checking that `stdio`
    /// agrees with its `terminal` field: the descriptors to become its 0, 1, 2 (`/dev/null` for
    /// streams not asked for), or the terminal's stream connection. Fails, taking none, if one
    /// asked for is not attached.
    fn claim_stdio(
        &self,
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
        let mut state = self.lock();
        let wanted = match *stdio {
            Stdio::Terminal { rows, cols } => {
                let conn = state
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
            if want && !state.streams.contains_key(&(process.clone(), kind)) {
                return Err(not_attached(kind));
            }
        }
        let dev_null = self.shared.paths.agent_root.join("dev/null");
        let mut fds = Vec::with_capacity(3);
        for (want, kind) in wanted {
            let fd = if want {
                OwnedFd::from(
                    state
                        .streams
                        .remove(&(process.clone(), kind))
                        .expect("checked above"),
                )
            } else {
                OwnedFd::from(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&dev_null)
                        .map_err(|e| {
                            ErrorResponse::new(
                                ErrorKind::Io,
                                format!("opening {}: {e}", dev_null.display()),
                            )
                        })?,
                )
            };
            fds.push(fd);
        }
        Ok((
            StdioSetup::Pipes(fds.try_into().expect("three streams")),
            None,
        ))
    }

    fn start_container(&self, id: u64) -> Reply {
        let created = {
            let mut state = self.lock();
            match state.created.take() {
                Some(created) => created,
                None if state.container_id.is_some() => {
                    return err(ErrorKind::InvalidState, "the container is already started")
                }
                None => return err(ErrorKind::InvalidState, "no container is created"),
            }
        };
        match created.start() {
            Ok(pid) => {
                let mut state = self.lock();
                state.respond(id, Ok(ResponseBody::Started { pid: pid.as_raw() }));
                if let Some(init) = state.find_mut(&ProcessRef::Init) {
                    init.started = true;
                }
                state.flush_exit(&ProcessRef::Init);
                Reply::Later
            }
            Err(e) => Reply::Now(Err(e)),
        }
    }

    /// A tracked process's pid and whether it has ended.
    fn pid_of(&self, process: &ProcessRef) -> Result<(Pid, bool), ErrorResponse> {
        match self.lock().find(process) {
            Some(tracked) => Ok((tracked.pid, tracked.exit.is_some())),
            None if *process == ProcessRef::Init => Err(ErrorResponse::new(
                ErrorKind::NotFound,
                "no container is created",
            )),
            None => Err(ErrorResponse::new(
                ErrorKind::NotFound,
                format!("no such process: {process}"),
            )),
        }
    }

    fn init_pid(&self) -> Result<(Pid, bool), ErrorResponse> {
        self.pid_of(&ProcessRef::Init)
    }

    fn signal(&self, process: &ProcessRef, number: i32, all: bool) -> Reply {
        if all && *process != ProcessRef::Init {
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
            self.kill_all(signal);
            return Reply::Now(Ok(ResponseBody::Ok));
        }
        match kill(pid, signal) {
            Ok(()) => Reply::Now(Ok(ResponseBody::Ok)),
            Err(e) => err(ErrorKind::Io, format!("kill({pid}, {signal}): {e}")),
        }
    }

    fn wait(&self, id: u64, process: ProcessRef) -> Reply {
        let mut state = self.lock();
        match state.find(&process) {
            None if process == ProcessRef::Init => {
                err(ErrorKind::NotFound, "no container is created")
            }
            None => err(ErrorKind::NotFound, format!("no such process: {process}")),
            Some(Tracked {
                reported: true,
                exit: Some(status),
                ..
            }) => Reply::Now(Ok(ResponseBody::Exited { status: *status })),
            Some(_) => {
                state.waits.push((id, process));
                Reply::Later
            }
        }
    }

    fn resize_terminal(&self, process: &ProcessRef, rows: u16, cols: u16) -> Reply {
        let state = self.lock();
        let Some(tracked) = state.find(process) else {
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

    /// The processes of the container: those in the init's PID namespace if it has its own,
    /// else every process but the agent.
    fn container_pids(&self) -> Vec<Pid> {
        let Ok((init, _)) = self.init_pid() else {
            return Vec::new();
        };
        let proc_dir = &self.shared.paths.proc_dir;
        let pidns = |pid: &str| {
            nix::sys::stat::stat(&proc_dir.join(pid).join("ns/pid"))
                .ok()
                .map(|s| s.st_ino)
        };
        let own = pidns("self");
        let init_ns = pidns(&init.to_string());
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
            let mine = match (init_ns, own) {
                (Some(init_ns), Some(own)) if init_ns != own => ns == Some(init_ns),
                _ => true,
            };
            if mine {
                pids.push(Pid::from_raw(pid));
            }
        }
        pids
    }

    fn kill_all(&self, signal: Signal) {
        for pid in self.container_pids() {
            let _ = kill(pid, signal);
        }
    }

    fn list_processes(&self) -> Reply {
        let proc_dir = &self.shared.paths.proc_dir;
        let list = self
            .container_pids()
            .into_iter()
            .filter_map(|pid| process_info(proc_dir, pid))
            .collect();
        Reply::Now(Ok(ResponseBody::Processes(list)))
    }

    fn stdio_loop(self, listener: Listener) {
        loop {
            let mut conn = match listener.accept() {
                Ok(conn) => conn,
                Err(e) => {
                    console::log(&format!("stdio: accept failed: {e}"));
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let hello = match read_stream_hello(&mut conn) {
                Ok(hello) => hello,
                Err(e) => {
                    console::log(&format!("stdio: {}", crate::error_chain(&e)));
                    continue;
                }
            };
            let reply = match conn.try_clone() {
                Ok(stream) => self.attach(hello.process, hello.stream, stream),
                Err(e) => StreamReply::Rejected(ErrorResponse::new(ErrorKind::Io, e.to_string())),
            };
            if let Err(e) = write_frame(&mut conn, &reply) {
                console::log(&format!("stdio: cannot answer a stream hello: {e}"));
            }
        }
    }

    fn attach(&self, process: ProcessRef, kind: StreamKind, stream: File) -> StreamReply {
        let mut state = self.lock();
        let rejected = |kind: ErrorKind, message: String| {
            StreamReply::Rejected(ErrorResponse::new(kind, message))
        };
        if state.writer.is_none() {
            return rejected(
                ErrorKind::InvalidState,
                "no control connection: streams belong to one".into(),
            );
        }
        let exists = match &process {
            ProcessRef::Init => state.container_id.is_some(),
            ProcessRef::Exec(_) => state.find(&process).is_some(),
        };
        if exists {
            return rejected(
                ErrorKind::AlreadyExists,
                format!("{process} already exists"),
            );
        }
        let key = (process, kind);
        if state.streams.contains_key(&key) {
            return rejected(
                ErrorKind::AlreadyExists,
                format!("{kind} of {} is already attached", key.0),
            );
        }
        state.streams.insert(key, stream);
        StreamReply::Accepted
    }
}

/// Starts the relay of a new process's terminal, if it has one.
fn start_relay(
    process: &ProcessRef,
    created: &mut Created,
    conn: Option<File>,
) -> Result<Option<relay::Handle>, ErrorResponse> {
    match (created.terminal.take(), conn) {
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
