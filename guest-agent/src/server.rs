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
    AgentMessage, CreateContainer, ErrorKind, ErrorResponse, Event, ExitStatus, HostMessage,
    ProcessInfo, ProcessRef, Request, RequestBody, Response, ResponseBody, Stdio, StreamKind,
    MAX_FRAME_SIZE,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::container::{self, Config, Created, RootfsSource, Validated};
use crate::listener::Listener;
use crate::reaper::{Ending, Reaped};
use crate::spec::Spec;
use crate::{console, power};

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
    /// The created container, until `start_container` takes it.
    created: Option<Created>,
    init: Option<InitProcess>,
    /// `wait` requests not answered yet: request id and process.
    waits: Vec<(u64, ProcessRef)>,
}

#[derive(Debug)]
struct InitProcess {
    pid: Pid,
    started: bool,
    exit: Option<ExitStatus>,
    /// Whether the `exited` event went out (only after the `started` response).
    reported: bool,
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

    /// Sends the init's `exited` event and answers its waits, once it has started and ended.
    fn flush_exit(&mut self) {
        let Some(init) = &mut self.init else { return };
        let (true, false, Some(status)) = (init.started, init.reported, init.exit) else {
            return;
        };
        init.reported = true;
        let pid = init.pid.as_raw();
        self.send(&AgentMessage::Event(Event::Exited {
            process: ProcessRef::Init,
            pid,
            status,
        }));
        let waits = std::mem::take(&mut self.waits);
        for (id, process) in waits {
            if process == ProcessRef::Init {
                self.respond(id, Ok(ResponseBody::Exited { status }));
            } else {
                self.waits.push((id, process));
            }
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
            let Some(init) = &mut state.init else { break };
            if init.pid == r.pid && init.exit.is_none() {
                init.exit = Some(match r.ending {
                    Ending::Exited(code) => ExitStatus::Code(code),
                    Ending::Signaled(signal) => ExitStatus::Signal(signal as i32),
                });
            }
        }
        state.flush_exit();
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
            RequestBody::Exec(_) => err(ErrorKind::Unsupported, "exec is not implemented yet"),
            RequestBody::ResizeTerminal { .. } => {
                err(ErrorKind::Unsupported, "terminals are not implemented yet")
            }
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
            self.lock()
                .streams
                .retain(|(process, _), _| *process != ProcessRef::Init);
        }
        reply
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
        let Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } = create.stdio
        else {
            return err(
                ErrorKind::InvalidRequest,
                "stdio terminal does not match process.terminal false",
            );
        };
        let stdio = match self.claim_streams(&[
            (stdin, StreamKind::Stdin),
            (stdout, StreamKind::Stdout),
            (stderr, StreamKind::Stderr),
        ]) {
            Ok(stdio) => stdio,
            Err(e) => return Reply::Now(Err(e)),
        };
        let rootfs = match &paths.rootfs_override {
            Some(dir) => RootfsSource::Bind(dir.clone()),
            None => RootfsSource::Virtiofs {
                tag: create.rootfs.fs_tag.clone(),
            },
        };
        let readonly = create.rootfs.readonly || spec.root.as_ref().is_some_and(|r| r.readonly);
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
        match container::create(config) {
            Ok(created) => {
                let mut state = self.lock();
                state.container_id = Some(create.container_id);
                state.init = Some(InitProcess {
                    pid: created.init_pid,
                    started: false,
                    exit: None,
                    reported: false,
                });
                state.created = Some(created);
                Reply::Now(Ok(ResponseBody::Ok))
            }
            Err(e) => Reply::Now(Err(e)),
        }
    }

    /// Takes the init's attached streams; `/dev/null` for those not asked for. Fails, taking
    /// none, if one asked for is not attached.
    fn claim_streams(
        &self,
        wanted: &[(bool, StreamKind); 3],
    ) -> Result<[OwnedFd; 3], ErrorResponse> {
        let mut state = self.lock();
        for (want, kind) in wanted {
            if *want && !state.streams.contains_key(&(ProcessRef::Init, *kind)) {
                return Err(ErrorResponse::new(
                    ErrorKind::InvalidState,
                    format!("the {kind} stream of the init process is not attached"),
                ));
            }
        }
        let dev_null = self.shared.paths.agent_root.join("dev/null");
        let mut fds = Vec::with_capacity(3);
        for (want, kind) in wanted {
            let fd = if *want {
                OwnedFd::from(
                    state
                        .streams
                        .remove(&(ProcessRef::Init, *kind))
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
        Ok(fds.try_into().expect("three streams"))
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
                if let Some(init) = &mut state.init {
                    init.started = true;
                }
                state.flush_exit();
                Reply::Later
            }
            Err(e) => Reply::Now(Err(e)),
        }
    }

    fn init_pid(&self) -> Result<(Pid, bool), ErrorResponse> {
        match &self.lock().init {
            Some(init) => Ok((init.pid, init.exit.is_some())),
            None => Err(ErrorResponse::new(
                ErrorKind::NotFound,
                "no container is created",
            )),
        }
    }

    fn signal(&self, process: &ProcessRef, number: i32, all: bool) -> Reply {
        if *process != ProcessRef::Init {
            return err(ErrorKind::NotFound, format!("no such process: {process}"));
        }
        let Ok(signal) = Signal::try_from(number) else {
            return err(
                ErrorKind::InvalidRequest,
                format!("signal {number} is not supported"),
            );
        };
        let (pid, exited) = match self.init_pid() {
            Ok(v) => v,
            Err(e) => return Reply::Now(Err(e)),
        };
        if exited {
            return err(ErrorKind::InvalidState, "the init process has exited");
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
        if process != ProcessRef::Init {
            return err(ErrorKind::NotFound, format!("no such process: {process}"));
        }
        let mut state = self.lock();
        match &state.init {
            None => err(ErrorKind::NotFound, "no container is created"),
            Some(InitProcess {
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
            ProcessRef::Exec(_) => false,
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
