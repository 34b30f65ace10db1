//! The shim process ([`Shim`]) and its task service ([`Service`]): containerd's task API
//! (create, start, state, pids, kill, exec, resize_pty, close_io, wait, stats, update, delete,
//! shutdown, connect) for a pod's sandbox, which is its VM, and the pod's containers and
//! exec'd processes, which the VM's agent runs. Events go back to containerd as they happen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use containerd_shim::api::Empty;
use containerd_shim::api::{self, Status};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, Context, DeleteResponse, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use hull_contract::control::Client;
use hull_protocol::{ExitStatus, ProcessRef, RequestBody, ResponseBody};

use crate::pod::{self, Prepared};
use crate::stdio::{self, Fifos, Relays};

pub const RUNTIME_ID: &str = "io.containerd.hull.v2";
/// CRI's annotations of a pod's tasks.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// For a request to the pod VM's agent.
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
/// After a process ends, for its output to reach containerd.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// The shim process.
pub struct Shim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// Set once the shim is to exit.
#[derive(Default)]
struct ExitSignal {
    exited: Mutex<bool>,
    cond: Condvar,
}

impl ExitSignal {
    fn signal(&self) {
        *self.exited.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }

    fn wait(&self) {
        let mut exited = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        while !*exited {
            exited = self.cond.wait(exited).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The annotation `key` of a bundle's spec, if it has it.
fn annotation(bundle: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    spec.get("annotations")?
        .get(key)?
        .as_str()
        .map(str::to_owned)
}

/// The sandbox a bundle's task belongs to: CRI's annotation, if the bundle's spec has it.
fn sandbox_of(bundle: &Path) -> Option<String> {
    annotation(bundle, SANDBOX_ID)
}

/// `hull`'s state root for a containerd namespace (`HULL_SHIM_ROOT`, default `/run/hull/cri`).
fn hull_root(namespace: &str) -> PathBuf {
    let base = std::env::var_os("HULL_SHIM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/hull/cri"));
    base.join(namespace)
}

/// The `hull` binary: `HULL_BIN`, or beside the shim.
fn hull_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HULL_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the shim's own path")?;
    let hull = exe.with_file_name("hull");
    if !hull.is_file() {
        bail!(
            "hull not found beside {} (install it there, or set HULL_BIN)",
            exe.display()
        );
    }
    Ok(hull)
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // A pod's tasks share the shim of its sandbox (one process per pod).
        let grouping = sandbox_of(Path::new(".")).unwrap_or_else(|| opts.id.clone());
        let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim that served this task is gone: undo what it left (containerd runs this in
        // the task's bundle).
        let bundle = std::env::current_dir().unwrap_or_default();
        let root = hull_root(&self.namespace);
        match sandbox_of(&bundle) {
            Some(sandbox) if sandbox != self.id => {
                let share = root.join(&sandbox).join(hull::state::POD_SHARE);
                pod::release_leftovers(&share, &self.id, &bundle);
            }
            _ => {
                if let Err(err) = hull_delete(&root, &self.id) {
                    log::warn!("{err:#}");
                }
            }
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        Service {
            namespace: self.namespace.clone(),
            root: hull_root(&self.namespace),
            exit: self.exit.clone(),
            publisher: Arc::new(publisher),
            state: Arc::new(Mutex::new(State::default())),
        }
    }
}

/// `hull --root ROOT delete --force ID`: the pod VM, its network mirroring and state.
fn hull_delete(root: &Path, id: &str) -> anyhow::Result<()> {
    if !root.join(id).exists() {
        return Ok(());
    }
    run_hull(root, &["delete", "--force", id])
}

/// Runs `hull --root ROOT ARGS...`. Its standard streams are not pipes: a pod's hull-vmm
/// inherits them and outlives hull, so a pipe would not end. Errors come from a file.
fn run_hull(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let hull = hull_binary()?;
    std::fs::create_dir_all(root).with_context(|| format!("cannot make {}", root.display()))?;
    let errors = root.join(format!(".hull-{}-{}.err", std::process::id(), args[0]));
    let stderr = std::fs::File::create(&errors)
        .with_context(|| format!("cannot make {}", errors.display()))?;
    let status = Command::new(&hull)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .status()
        .with_context(|| format!("cannot run {}", hull.display()));
    let said = std::fs::read_to_string(&errors).unwrap_or_default();
    let _ = std::fs::remove_file(&errors);
    if !status?.success() {
        bail!("hull {}: {}", args.join(" "), said.trim());
    }
    Ok(())
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn status_code(status: ExitStatus) -> u32 {
    status.shell_status() as u32
}

fn rpc_error(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// A ttrpc error as a person reads it: a status's message, without the structure around it.
fn said(err: &ttrpc::Error) -> String {
    match err {
        ttrpc::Error::RpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    }
}

fn internal(err: anyhow::Error) -> ttrpc::Error {
    rpc_error(Code::INTERNAL, format!("{err:#}"))
}

/// The exit of a process, once it has ended, and who waits for it.
#[derive(Default)]
struct Exit {
    at: Mutex<Option<(u32, SystemTime)>>,
    cond: Condvar,
}

impl Exit {
    fn set(&self, code: u32) -> bool {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_some() {
            return false;
        }
        *at = Some((code, SystemTime::now()));
        self.cond.notify_all();
        true
    }

    fn get(&self) -> Option<(u32, SystemTime)> {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self) -> (u32, SystemTime) {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(exit) = *at {
                return exit;
            }
            at = self.cond.wait(at).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A process containerd knows: the sandbox (the VM), a container's init, or an exec.
struct Proc {
    /// How the agent names it (none for the sandbox).
    guest: Option<ProcessRef>,
    fifos: Fifos,
    /// Its pid in the guest once started (containerd is told the pod's hull-vmm).
    guest_pid: Option<i32>,
    started: bool,
    exit: Arc<Exit>,
    relays: Option<Arc<Mutex<Relays>>>,
    /// An exec's process, until it starts.
    pending: Option<Box<hull_protocol::Exec>>,
}

impl Proc {
    fn new(guest: Option<ProcessRef>, fifos: Fifos) -> Self {
        Proc {
            guest,
            fifos,
            guest_pid: None,
            started: false,
            exit: Arc::new(Exit::default()),
            relays: None,
            pending: None,
        }
    }

    fn status(&self) -> Status {
        match (self.started, self.exit.get()) {
            (_, Some(_)) => Status::STOPPED,
            (true, None) => Status::RUNNING,
            (false, None) => Status::CREATED,
        }
    }
}

/// The pod's VM.
struct Sandbox {
    id: String,
    bundle: PathBuf,
    /// hull-vmm's pid.
    pid: i32,
    dir: PathBuf,
    proc: Proc,
}

/// A container of the pod.
struct Task {
    bundle: PathBuf,
    prepared: Prepared,
    init: Proc,
    execs: HashMap<String, Proc>,
}

#[derive(Default)]
struct State {
    sandbox: Option<Sandbox>,
    tasks: HashMap<String, Task>,
}

/// The task service of one pod.
pub struct Service {
    namespace: String,
    /// `hull --root` of this containerd namespace.
    root: PathBuf,
    exit: Arc<ExitSignal>,
    publisher: Arc<RemotePublisher>,
    state: Arc<Mutex<State>>,
}

impl Service {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event);
    }

    /// The pod VM's control socket and vsock socket, if it runs.
    fn sockets(&self) -> TtrpcResult<(PathBuf, PathBuf, PathBuf)> {
        let state = self.state();
        let Some(sandbox) = &state.sandbox else {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                "no pod VM in this shim: create the sandbox task first",
            ));
        };
        if let Some((code, _)) = sandbox.proc.exit.get() {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!(
                    "the pod's VM (sandbox {}) has exited with status {code}",
                    sandbox.id
                ),
            ));
        }
        Ok((
            sandbox.dir.join("control.sock"),
            sandbox.dir.join(hull::state::VSOCK_SOCKET),
            sandbox.dir.join(hull::state::POD_SHARE),
        ))
    }

    fn request(&self, body: RequestBody) -> TtrpcResult<ResponseBody> {
        let (control, _, _) = self.sockets()?;
        let mut client = Client::connect(&control).map_err(|e| internal(anyhow!(e)))?;
        client
            .request(body, Some(REQUEST_DEADLINE))
            .map_err(|e| match e {
                hull_contract::control::ControlError::Agent(e)
                    if e.kind == hull_protocol::ErrorKind::NotFound =>
                {
                    rpc_error(Code::NOT_FOUND, e.to_string())
                }
                e => internal(anyhow!(e)),
            })
    }

    /// The vmm pid containerd is told for every task of the pod.
    fn vmm_pid(&self) -> u32 {
        self.state().sandbox.as_ref().map_or(0, |s| s.pid as u32)
    }

    fn create_sandbox(&self, req: &api::CreateTaskRequest) -> anyhow::Result<u32> {
        let bundle = PathBuf::from(&req.bundle);
        let pid_file = bundle.join("hull-vmm.pid");
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot make {}", self.root.display()))?;
        let bundle_arg = bundle.to_string_lossy().into_owned();
        let pid_arg = pid_file.to_string_lossy().into_owned();
        let args = [
            "create",
            "--pod",
            "--bundle",
            &bundle_arg,
            "--pid-file",
            &pid_arg,
            &req.id,
        ];
        let started = std::time::Instant::now();
        run_hull(&self.root, &args).context("cannot make the pod's VM")?;
        log::info!(
            "pod VM {} created in {} ms",
            req.id,
            started.elapsed().as_millis()
        );
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("cannot read {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{}: not a pid", pid_file.display()))?;
        let proc = Proc::new(None, fifos_of(req));
        let exit = proc.exit.clone();
        self.state().sandbox = Some(Sandbox {
            id: req.id.clone(),
            bundle,
            pid,
            dir: self.root.join(&req.id),
            proc,
        });
        self.watch_vmm(req.id.clone(), pid, exit);
        Ok(pid as u32)
    }

    /// Waits for the pod's hull-vmm (the shim's child since `hull create` exited: the shim is
    /// a subreaper) and publishes the sandbox's exit; every container of the pod ended with it.
    fn watch_vmm(&self, id: String, pid: i32, exit: Arc<Exit>) {
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        let state = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name("vmm-wait".into())
            .spawn(move || {
                let code = wait_pid(pid);
                log::info!("pod VM {id} (pid {pid}) exited with {code}");
                let tasks: Vec<(String, Arc<Exit>)> = {
                    let state = state.lock().unwrap_or_else(|p| p.into_inner());
                    state
                        .tasks
                        .iter()
                        .flat_map(|(tid, t)| {
                            std::iter::once((tid.clone(), t.init.exit.clone()))
                                .chain(t.execs.values().map(|e| (tid.clone(), e.exit.clone())))
                        })
                        .collect()
                };
                for (tid, task_exit) in tasks {
                    if task_exit.set(255) {
                        publish_exit(&publisher, &namespace, &tid, "", pid as u32, 255);
                    }
                }
                if exit.set(code) {
                    publish_exit(&publisher, &namespace, &id, "", pid as u32, code);
                }
            });
        if let Err(err) = spawned {
            log::error!("cannot watch the pod VM: {err}");
        }
    }

    fn create_container(&self, req: &api::CreateTaskRequest) -> anyhow::Result<u32> {
        let (_, vsock, share) = self.sockets().map_err(|e| anyhow!("{}", said(&e)))?;
        let fifos = fifos_of(req);
        let stdio = fifos.stdio(24, 80);
        let bundle = PathBuf::from(&req.bundle);
        let (prepared, create) = pod::prepare(&share, &req.id, &bundle, &req.rootfs, stdio)?;
        let guest = ProcessRef::Container(req.id.clone());
        let created = (|| {
            let attached = stdio::attach(&vsock, &guest, &stdio)?;
            self.request(RequestBody::CreateContainer(Box::new(create)))
                .map_err(|e| anyhow!("the pod VM's agent refused: {}", said(&e)))?;
            stdio::relay(attached, &fifos)
        })();
        let relays = match created {
            Ok(relays) => relays,
            Err(err) => {
                let _ = self.request(RequestBody::RemoveContainer {
                    container_id: req.id.clone(),
                });
                prepared.release();
                return Err(err);
            }
        };
        let mut init = Proc::new(Some(guest), fifos);
        init.relays = Some(Arc::new(Mutex::new(relays)));
        self.state().tasks.insert(
            req.id.clone(),
            Task {
                bundle,
                prepared,
                init,
                execs: HashMap::new(),
            },
        );
        Ok(self.vmm_pid())
    }

    /// Starts waiting for a guest process's end, then publishes it.
    fn watch(
        &self,
        id: String,
        exec_id: String,
        guest: ProcessRef,
        proc_exit: Arc<Exit>,
        relays: Option<Arc<Mutex<Relays>>>,
    ) {
        let (control, _, _) = match self.sockets() {
            Ok(s) => s,
            Err(_) => return,
        };
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        let pid = self.vmm_pid();
        let spawned = std::thread::Builder::new()
            .name("wait".into())
            .spawn(move || {
                let answer = Client::connect(&control).and_then(|mut c| {
                    c.request(
                        RequestBody::Wait {
                            process: guest.clone(),
                        },
                        None,
                    )
                });
                let code = match answer {
                    Ok(ResponseBody::Exited { status }) => status_code(status),
                    Ok(other) => {
                        log::warn!("wait for {guest}: unexpected answer {other:?}");
                        255
                    }
                    Err(err) => {
                        log::warn!("wait for {guest}: {err}");
                        255
                    }
                };
                if let Some(relays) = relays {
                    relays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .drain(OUTPUT_GRACE);
                }
                if proc_exit.set(code) {
                    publish_exit(&publisher, &namespace, &id, &exec_id, pid, code);
                }
            });
        if let Err(err) = spawned {
            log::error!("cannot wait for a process: {err}");
        }
    }

    /// Runs `f` on the process `id`/`exec_id`.
    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        let mut state = self.state();
        if let Some(sandbox) = state.sandbox.as_mut().filter(|s| s.id == id) {
            if exec_id.is_empty() {
                return f(&mut sandbox.proc);
            }
            return Err(rpc_error(
                Code::NOT_FOUND,
                format!("the pod VM {id} runs no exec {exec_id}"),
            ));
        }
        let Some(task) = state.tasks.get_mut(id) else {
            return Err(rpc_error(Code::NOT_FOUND, format!("no task {id}")));
        };
        if exec_id.is_empty() {
            return f(&mut task.init);
        }
        match task.execs.get_mut(exec_id) {
            Some(proc) => f(proc),
            None => Err(rpc_error(
                Code::NOT_FOUND,
                format!("no exec {exec_id} in task {id}"),
            )),
        }
    }

    fn is_sandbox(&self, id: &str) -> bool {
        self.state().sandbox.as_ref().is_some_and(|s| s.id == id)
    }
}

fn publish(publisher: &RemotePublisher, namespace: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(err) = publisher.publish(Context::default(), topic, namespace, event) {
        log::warn!("cannot publish {topic}: {err}");
    }
}

fn publish_exit(
    publisher: &RemotePublisher,
    namespace: &str,
    id: &str,
    exec_id: &str,
    pid: u32,
    code: u32,
) {
    let event = TaskExit {
        container_id: id.to_owned(),
        id: if exec_id.is_empty() { id } else { exec_id }.to_owned(),
        pid,
        exit_status: code,
        exited_at: MessageField::some(timestamp(SystemTime::now())),
        ..Default::default()
    };
    publish(
        publisher,
        namespace,
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(event),
    );
}

/// Waits for `pid`, a child of the shim; its status as a shell gives it.
fn wait_pid(pid: i32) -> u32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code as u32,
            Ok(WaitStatus::Signaled(_, signal, _)) => return 128 + signal as u32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                // Not the shim's child (it was not reparented here): its status cannot be had,
                // only its end, seen by polling.
                log::warn!("cannot wait for pid {pid} ({err}); polling it");
                while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                }
                return 255;
            }
        }
    }
}

fn fifos_of(req: &api::CreateTaskRequest) -> Fifos {
    Fifos {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    }
}

/// Whether a bundle is a pod's sandbox (CRI's container type).
fn is_sandbox_spec(bundle: &Path) -> bool {
    annotation(bundle, CONTAINER_TYPE).as_deref() == Some("sandbox")
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {:?}", req.id);
        let bundle = PathBuf::from(&req.bundle);
        let sandbox = is_sandbox_spec(&bundle);
        let made = if sandbox {
            if self.state().sandbox.is_some() {
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    "this shim runs a pod VM already",
                ));
            }
            self.create_sandbox(&req)
        } else if sandbox_of(&bundle).is_none() {
            Err(anyhow!(
                "{}: no `{SANDBOX_ID}` annotation: io.containerd.hull.v2 runs the containers of \
                 Kubernetes pods (through CRI); run single containers with hull under the runc \
                 shim (ctr run --runc-binary hull)",
                bundle.join("config.json").display()
            ))
        } else {
            self.create_container(&req)
        };
        let pid = made.map_err(|e| {
            log::error!("create {}: {e:#}", req.id);
            internal(e)
        })?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(containerd_shim::protos::events::task::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        log::info!("start {:?}", req.id);
        let pid = self.vmm_pid();
        if self.is_sandbox(&req.id) && req.exec_id.is_empty() {
            self.with_proc(&req.id, "", |p| {
                p.started = true;
                Ok(())
            })?;
        } else {
            let (guest, pending, exit, relays) = self.with_proc(&req.id, &req.exec_id, |p| {
                if p.started {
                    return Err(rpc_error(Code::FAILED_PRECONDITION, "already started"));
                }
                Ok((
                    p.guest.clone(),
                    p.pending.take(),
                    p.exit.clone(),
                    p.relays.clone(),
                ))
            })?;
            let guest = guest.ok_or_else(|| internal(anyhow!("a task without a guest process")))?;
            let (relays, answer) = match pending {
                Some(exec) => {
                    let (_, vsock, _) = self.sockets()?;
                    let fifos = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.fifos.clone()))?;
                    let attached = stdio::attach(&vsock, &guest, &exec.stdio).map_err(internal)?;
                    let answer = self.request(RequestBody::Exec(exec))?;
                    let relays = Arc::new(Mutex::new(
                        stdio::relay(attached, &fifos).map_err(internal)?,
                    ));
                    (Some(relays), answer)
                }
                None => (
                    relays,
                    self.request(RequestBody::Start {
                        process: guest.clone(),
                    })?,
                ),
            };
            let guest_pid = match answer {
                ResponseBody::Started { pid } => Some(pid),
                _ => None,
            };
            self.with_proc(&req.id, &req.exec_id, |p| {
                p.started = true;
                p.guest_pid = guest_pid;
                p.relays = relays.clone();
                Ok(())
            })?;
            self.watch(req.id.clone(), req.exec_id.clone(), guest, exit, relays);
        }
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        log::debug!("state {:?}", req.id);
        let pid = self.vmm_pid();
        let bundle = {
            let state = self.state();
            match (&state.sandbox, state.tasks.get(&req.id)) {
                (Some(s), _) if s.id == req.id => s.bundle.clone(),
                (_, Some(t)) => t.bundle.clone(),
                _ => PathBuf::new(),
            }
        };
        self.with_proc(&req.id, &req.exec_id, |p| {
            let exit = p.exit.get();
            Ok(api::StateResponse {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                bundle: bundle.to_string_lossy().into_owned(),
                pid,
                status: p.status().into(),
                stdin: p.fifos.stdin.clone(),
                stdout: p.fifos.stdout.clone(),
                stderr: p.fifos.stderr.clone(),
                terminal: p.fifos.terminal,
                exit_status: exit.map_or(0, |e| e.0),
                exited_at: exit.map(|e| timestamp(e.1)).into(),
                ..Default::default()
            })
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        if self.is_sandbox(&req.id) {
            let pid = self.vmm_pid();
            return Ok(api::PidsResponse {
                processes: vec![containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        let answer = self.request(RequestBody::ContainerProcesses {
            container_id: req.id.clone(),
        })?;
        let ResponseBody::Processes(list) = answer else {
            return Err(internal(anyhow!("unexpected answer {answer:?}")));
        };
        Ok(api::PidsResponse {
            processes: list
                .into_iter()
                .map(|p| containerd_shim::protos::types::task::ProcessInfo {
                    pid: p.pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        log::info!("kill {:?}", req.id);
        if self.is_sandbox(&req.id) && req.exec_id.is_empty() {
            let pid = self.vmm_pid() as i32;
            let exited = self.with_proc(&req.id, "", |p| Ok(p.exit.get().is_some()))?;
            if exited {
                return Ok(Empty::new());
            }
            let signal = nix::sys::signal::Signal::try_from(req.signal as i32)
                .map_err(|_| rpc_error(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
                .map_err(|e| internal(anyhow!("cannot signal the pod VM (pid {pid}): {e}")))?;
            return Ok(Empty::new());
        }
        let (guest, ended) = self.with_proc(&req.id, &req.exec_id, |p| {
            Ok((p.guest.clone(), p.exit.get().is_some() || !p.started))
        })?;
        let Some(guest) = guest else {
            return Ok(Empty::new());
        };
        if ended {
            // Never started, or gone: nothing to signal (as runc's shim says of a stopped one).
            return Ok(Empty::new());
        }
        match self.request(RequestBody::Signal {
            process: guest,
            signal: req.signal as i32,
            all: req.all,
        }) {
            Ok(_) => Ok(Empty::new()),
            // Ended meanwhile.
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::NOT_FOUND => Ok(Empty::new()),
            Err(err) => Err(err),
        }
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        log::info!("exec {:?}", req.id);
        let bundle = {
            let state = self.state();
            match state.tasks.get(&req.id) {
                Some(task) => task.bundle.clone(),
                None => return Err(rpc_error(Code::NOT_FOUND, format!("no task {}", req.id))),
            }
        };
        let value: serde_json::Value = serde_json::from_slice(&req.spec.value).map_err(|e| {
            rpc_error(
                Code::INVALID_ARGUMENT,
                format!("exec {}: process: {e}", req.exec_id),
            )
        })?;
        let file = bundle.join("config.json");
        let origin = hull::spec::oci::Origin {
            file: &file,
            prefix: "exec process",
        };
        let process = hull::spec::oci::read_process(origin, &value)
            .and_then(|p| hull::spec::oci::process(origin, &p))
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // Exec ids are the agent's for the whole VM: the container's id makes them unique.
        let guest_id = format!("{}.{}", req.id, req.exec_id);
        let exec = hull_protocol::Exec {
            exec_id: guest_id.clone(),
            stdio: fifos.stdio(24, 80),
            process,
            container_id: Some(req.id.clone()),
        };
        let mut proc = Proc::new(Some(ProcessRef::Exec(guest_id)), fifos);
        proc.pending = Some(Box::new(exec));
        {
            let mut state = self.state();
            let Some(task) = state.tasks.get_mut(&req.id) else {
                return Err(rpc_error(Code::NOT_FOUND, format!("no task {}", req.id)));
            };
            if task.execs.contains_key(&req.exec_id) {
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    format!("exec {} exists in task {}", req.exec_id, req.id),
                ));
            }
            task.execs.insert(req.exec_id.clone(), proc);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let guest = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.guest.clone()))?;
        let Some(process) = guest else {
            return Ok(Empty::new());
        };
        self.request(RequestBody::ResizeTerminal {
            process,
            rows: req.height.min(u32::from(u16::MAX)) as u16,
            cols: req.width.min(u32::from(u16::MAX)) as u16,
        })?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            let relays = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.relays.clone()))?;
            if let Some(relays) = relays {
                relays
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .close_stdin();
            }
        }
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        if self.is_sandbox(&req.id) {
            // The VM's size is fixed when it is made; the pod's own cgroup is the kubelet's.
            return Ok(Empty::new());
        }
        let value: serde_json::Value = serde_json::from_slice(&req.resources.value)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("resources: {e}")))?;
        let number = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, k| v.get(k))
                .and_then(serde_json::Value::as_i64)
        };
        let resources = hull_protocol::Resources {
            memory_limit: number(&["memory", "limit"])
                .filter(|n| *n > 0)
                .map(|n| n as u64),
            pids_limit: number(&["pids", "limit"])
                .filter(|n| *n > 0)
                .map(|n| n as u64),
        };
        self.request(RequestBody::Update {
            container_id: req.id.clone(),
            resources,
        })?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        log::debug!("wait {:?}", req.id);
        let exit = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.exit.clone()))?;
        let (code, at) = exit.wait();
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics as v2;
        let mut metrics = v2::Metrics::new();
        if !self.is_sandbox(&req.id) {
            let answer = self.request(RequestBody::Stats {
                container_id: req.id.clone(),
            })?;
            let ResponseBody::Stats(s) = answer else {
                return Err(internal(anyhow!("unexpected answer {answer:?}")));
            };
            let limit = |n: u64| if n == u64::MAX { 0 } else { n };
            metrics.pids = MessageField::some(v2::PidsStat {
                current: s.pids_current,
                limit: limit(s.pids_limit),
                ..Default::default()
            });
            metrics.cpu = MessageField::some(v2::CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                ..Default::default()
            });
            metrics.memory = MessageField::some(v2::MemoryStat {
                usage: s.memory_usage_bytes,
                usage_limit: limit(s.memory_limit_bytes),
                anon: s.memory_anon_bytes,
                file: s.memory_file_bytes,
                inactive_file: s.memory_inactive_file_bytes,
                ..Default::default()
            });
            metrics.memory_events = MessageField::some(v2::MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            });
        }
        let mut any = Any::new();
        any.type_url = "io.containerd.cgroups.v2.Metrics".to_owned();
        any.value = metrics
            .write_to_bytes()
            .map_err(|e| internal(anyhow!("cannot encode the metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        log::info!("delete {:?}", req.id);
        let pid = self.vmm_pid();
        let (code, at) = self.with_proc(&req.id, &req.exec_id, |p| {
            if p.started && p.exit.get().is_none() {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("task {} is running: kill it first", req.id),
                ));
            }
            Ok(p.exit.get().unwrap_or((0, SystemTime::now())))
        })?;
        if !req.exec_id.is_empty() {
            let mut state = self.state();
            if let Some(task) = state.tasks.get_mut(&req.id) {
                task.execs.remove(&req.exec_id);
            }
        } else if self.is_sandbox(&req.id) {
            let tasks: Vec<String> = self.state().tasks.keys().cloned().collect();
            if !tasks.is_empty() {
                log::warn!("the pod VM {} goes with containers {tasks:?}", req.id);
            }
            if let Err(err) = hull_delete(&self.root, &req.id) {
                log::error!("{err:#}");
                return Err(internal(err));
            }
            let mut state = self.state();
            for (_, task) in state.tasks.drain() {
                task.prepared.release();
            }
            state.sandbox = None;
        } else {
            // The VM may be gone already (then so is the container).
            if let Err(err) = self.request(RequestBody::RemoveContainer {
                container_id: req.id.clone(),
            }) {
                log::info!(
                    "remove container {} from the pod VM: {}",
                    req.id,
                    said(&err)
                );
            }
            if let Some(task) = self.state().tasks.remove(&req.id) {
                task.prepared.release();
            }
        }
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status: code,
                    exited_at: MessageField::some(timestamp(at)),
                    ..Default::default()
                }),
            );
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.vmm_pid(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        log::info!("shutdown");
        let state = self.state();
        if state.sandbox.is_some() || !state.tasks.is_empty() {
            return Ok(Empty::new());
        }
        self.exit.signal();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_grouped_with_its_sandbox_by_cri_s_annotations() {
        let dir = std::env::temp_dir().join(format!("hull-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |spec: serde_json::Value| {
            std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        };
        write(serde_json::json!({"annotations": {SANDBOX_ID: "pod1", CONTAINER_TYPE: "sandbox"}}));
        assert_eq!(sandbox_of(&dir).as_deref(), Some("pod1"));
        assert!(is_sandbox_spec(&dir));
        write(
            serde_json::json!({"annotations": {SANDBOX_ID: "pod1", CONTAINER_TYPE: "container"}}),
        );
        assert_eq!(sandbox_of(&dir).as_deref(), Some("pod1"));
        assert!(!is_sandbox_spec(&dir));
        write(serde_json::json!({"process": {}}));
        assert_eq!(sandbox_of(&dir), None);
        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        assert_eq!(sandbox_of(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_exit_is_set_once_and_waiters_see_it() {
        let exit = Arc::new(Exit::default());
        let waiter = {
            let exit = exit.clone();
            std::thread::spawn(move || exit.wait().0)
        };
        assert!(exit.set(143));
        assert!(!exit.set(0));
        assert_eq!(waiter.join().unwrap(), 143);
        assert_eq!(exit.get().map(|e| e.0), Some(143));
    }
}
