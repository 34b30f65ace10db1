//! `hull run`: one container in one micro-VM, from bundle to exit status.
//!
//! 1. Read `config.json` (`spec`), find the guest and `hull-vmm` (`paths`).
//! 2. Make `<root>/<id>/` (`state`), write `vm.json`, start `hull-vmm` on it (`vm`), and
//!    wait for the agent's readiness line on `console.log`.
//! 3. The agent's host contract (docs/agent.md): control connection and handshake, three
//!    stdio stream connections for the init, `create_container`, `start_container`.
//! 4. Relay stdin, stdout and stderr (one thread each, raw bytes), forward SIGINT, SIGTERM and
//!    SIGHUP as `signal` requests, wait for the init's `exited` event, drain its output (with a
//!    grace period for descendants that keep it open), `shutdown`, wait for `hull-vmm`.
//! 5. Remove the state directory; the caller exits with the container's status.
//!
//! Every way out kills `hull-vmm` and removes the state directory (their guards' `Drop`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hull_protocol::{
    attach_stream, host_handshake, hybrid, read_frame, write_frame, AgentMessage, CreateContainer,
    Event, ExitStatus, HostMessage, ProcessRef, Request, RequestBody, ResponseBody, Rootfs, Stdio,
    StreamKind, CONTROL_PORT, STDIO_PORT,
};

use crate::spec::{BundleSpec, VmPaths, ROOTFS_TAG};
use crate::state::StateDir;
use crate::vm::{Interrupt, VmmProcess};

/// From starting `hull-vmm` to the agent's readiness line (a PVM boot takes about a minute).
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// For a vsock connection to be accepted, and for the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// For `create_container` and `start_container` to be answered.
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
/// After the init's exit, for its output to drain (descendants may hold it open).
const OUTPUT_GRACE: Duration = Duration::from_secs(10);
/// After `shutdown`, for the agent to answer and for `hull-vmm` to exit.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(60);

/// What `hull run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub id: String,
    pub debug: bool,
}

/// A forwarded signal interrupted the run before the container started.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by signal {0}")]
pub struct Interrupted(pub i32);

/// What the main thread waits for.
#[derive(Debug)]
pub enum Incoming {
    /// `hull` received a signal to forward.
    Signal(i32),
    /// A message from the agent on the control connection.
    Agent(AgentMessage),
    /// The control connection ended (why).
    AgentGone(String),
}

/// The main thread's queue: signals and agent messages.
pub struct Inbox {
    pub tx: Sender<Incoming>,
    pub rx: Receiver<Incoming>,
}

impl Interrupt for Inbox {
    fn pending_signal(&self) -> Option<i32> {
        loop {
            match self.rx.try_recv() {
                Ok(Incoming::Signal(signal)) => return Some(signal),
                Ok(other) => log::debug!("ignoring {other:?} while booting"),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            }
        }
    }
}

/// Runs the container; returns its shell-style exit status (code, or 128 + signal).
pub fn run(opts: &RunOptions, inbox: &Inbox) -> anyhow::Result<i32> {
    let t_start = Instant::now();
    let bundle = opts
        .bundle
        .canonicalize()
        .with_context(|| format!("bundle {}", opts.bundle.display()))?;
    let spec = BundleSpec::load(&bundle)?;
    crate::state::validate_id(&opts.id)?;
    let (kernel, initramfs) = crate::paths::guest_files()?;
    let vmm_bin = crate::paths::vmm_binary()?;

    let state = StateDir::create(&opts.root, &opts.id)?;
    log::debug!("state directory {}", state.path().display());
    let paths = VmPaths {
        kernel,
        initramfs,
        console: state.console(),
        vsock_uds: state.vsock(),
    };
    let max_vcpus = host_max_vcpus();
    let config = spec.vm_config(&paths, max_vcpus);
    let config_path = state.vm_config();
    config
        .validate(usize::from(max_vcpus))
        .with_context(|| format!("VM configuration for {}", spec.config_path.display()))?;
    let json = serde_json::to_vec_pretty(&config).expect("a VmConfig always serializes");
    std::fs::write(&config_path, json)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    log::debug!(
        "container {}: {} vCPUs, {} MiB, rootfs {}{}",
        opts.id,
        config.vcpus,
        config.mem_size_mib,
        spec.rootfs.display(),
        if spec.readonly { " (read-only)" } else { "" }
    );

    let mut vm = VmmProcess::spawn(
        &vmm_bin,
        &config_path,
        state.console(),
        state.vsock(),
        state.vmm_log(),
        opts.debug,
    )?;
    let boot = vm.wait_ready(BOOT_DEADLINE, inbox)?;

    let mut control = Control::connect(&state.vsock(), inbox.tx.clone())
        .with_context(|| format!("cannot reach the guest agent{}", vm.describe()))?;
    let streams = [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr]
        .map(|kind| open_stream(&state.vsock(), kind));
    let [stdin_conn, stdout_conn, stderr_conn] = streams;
    let (stdin_conn, stdout_conn, stderr_conn) = (stdin_conn?, stdout_conn?, stderr_conn?);

    let create = RequestBody::CreateContainer(CreateContainer {
        container_id: opts.id.clone(),
        spec: spec.spec.clone(),
        rootfs: Rootfs {
            fs_tag: ROOTFS_TAG.to_owned(),
            readonly: spec.readonly,
        },
        stdio: Stdio::Pipes {
            stdin: true,
            stdout: true,
            stderr: true,
        },
    });
    let what = format!("create container {}", opts.id);
    control.request(inbox, create, &what, &mut vm)?;
    let what = format!("start container {}", opts.id);
    let started = control.request(inbox, RequestBody::StartContainer, &what, &mut vm)?;
    let t_started = Instant::now();
    if let ResponseBody::Started { pid } = started {
        log::debug!("container {} started: pid {pid} in the guest", opts.id);
    }

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    relay_stdin(stdin_conn);
    relay_output(stdout_conn, io::stdout().as_fd(), "stdout", done_tx.clone());
    relay_output(stderr_conn, io::stderr().as_fd(), "stderr", done_tx);

    let status = wait_for_exit(&mut control, inbox, &mut vm)?;
    let t_exited = Instant::now();
    let grace_end = t_exited + OUTPUT_GRACE;
    for _ in 0..2 {
        let left = grace_end.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            log::warn!(
                "container output still open {} s after its init exited; leaving it",
                OUTPUT_GRACE.as_secs()
            );
            break;
        }
    }
    let t_drained = Instant::now();

    control.shutdown(inbox);
    let vmm_status = vm.wait_exit(SHUTDOWN_DEADLINE);
    if !vmm_status.success() {
        log::warn!(
            "hull-vmm exited with {vmm_status} after shutdown{}",
            vm.describe()
        );
    }
    let t_end = Instant::now();
    log_timings(&boot, t_start, t_started, t_exited, t_drained, t_end);
    drop(vm);
    drop(state);
    Ok(status.shell_status())
}

fn log_timings(
    boot: &crate::vm::BootTimes,
    start: Instant,
    started: Instant,
    exited: Instant,
    drained: Instant,
    end: Instant,
) {
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_millis();
    let vmm_setup = boot
        .vmm_ready
        .map_or("?".to_owned(), |t| ms(boot.spawned, t).to_string());
    let uptime = boot
        .guest_uptime_ms
        .map_or("?".to_owned(), |u| u.to_string());
    log::debug!(
        "timings (ms): prepare {}, vmm setup {vmm_setup}, boot to agent ready {} \
         (guest uptime {uptime}), create+start {}, process {}, output drain {}, \
         shutdown {}, total {}",
        ms(start, boot.spawned),
        ms(boot.vmm_ready.unwrap_or(boot.spawned), boot.agent_ready),
        ms(boot.agent_ready, started),
        ms(started, exited),
        ms(exited, drained),
        ms(drained, end),
        ms(start, end)
    );
}

/// How many vCPUs a VM may have here: KVM's limit, the host's CPUs, and a `u8`.
fn host_max_vcpus() -> u8 {
    let kvm = kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus())
        .unwrap_or(1);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    kvm.min(cpus).clamp(1, usize::from(u8::MAX)) as u8
}

/// The control connection's sending half; a thread reads the other half into the inbox.
struct Control {
    conn: UnixStream,
    next_id: u64,
}

impl Control {
    fn connect(uds: &Path, tx: Sender<Incoming>) -> anyhow::Result<Self> {
        let mut conn = hybrid::connect(uds, CONTROL_PORT, Some(CONNECT_TIMEOUT))?;
        conn.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let hello = host_handshake(&mut conn, env!("CARGO_PKG_VERSION"))?;
        conn.set_read_timeout(None)?;
        log::debug!(
            "agent {} (protocol {}, kernel {})",
            hello.agent_version,
            hello.protocol_version,
            hello.kernel_release
        );
        let mut reader = conn
            .try_clone()
            .context("cannot clone the control connection")?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || loop {
                let gone = match read_frame::<_, AgentMessage>(&mut reader) {
                    Ok(Some(msg)) => {
                        if tx.send(Incoming::Agent(msg)).is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => "closed".to_owned(),
                    Err(err) => format!("{:#}", anyhow!(err)),
                };
                let _ = tx.send(Incoming::AgentGone(gone));
                return;
            })
            .context("cannot start the control reader thread")?;
        Ok(Self { conn, next_id: 1 })
    }

    fn send(&mut self, body: RequestBody) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.conn, &HostMessage::Request(Request { id, body }))
            .context("cannot send a request to the guest agent")?;
        Ok(id)
    }

    /// Sends a request and waits for its answer; a signal before then interrupts.
    fn request(
        &mut self,
        inbox: &Inbox,
        body: RequestBody,
        what: &str,
        vm: &mut VmmProcess,
    ) -> anyhow::Result<ResponseBody> {
        let id = self.send(body).with_context(|| what.to_owned())?;
        let end = Instant::now() + REQUEST_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match inbox.rx.recv_timeout(left) {
                Ok(Incoming::Agent(AgentMessage::Response(r))) if r.id == id => {
                    return r
                        .result
                        .map_err(|e| anyhow!("{what}: the guest agent refused: {e}"));
                }
                Ok(Incoming::Signal(signal)) => {
                    return Err(anyhow!(Interrupted(signal))).context(what.to_owned());
                }
                Ok(Incoming::AgentGone(why)) => {
                    bail!(
                        "{what}: the guest agent's control connection ended ({why}){}",
                        vm.describe()
                    )
                }
                Ok(other) => log::debug!("ignoring {other:?} during {what}"),
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{what}: no answer from the guest agent within {} s{}",
                    REQUEST_DEADLINE.as_secs(),
                    vm.describe()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!("{what}: internal channel closed"),
            }
        }
    }

    /// Asks the agent to power the VM off; waits a while for its answer or for the end of
    /// the connection, which comes with the power-off.
    fn shutdown(&mut self, inbox: &Inbox) {
        let id = match self.send(RequestBody::Shutdown) {
            Ok(id) => id,
            Err(err) => {
                log::warn!("{err:#}");
                return;
            }
        };
        let end = Instant::now() + SHUTDOWN_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match inbox.rx.recv_timeout(left) {
                Ok(Incoming::Agent(AgentMessage::Response(r))) if r.id == id => {
                    if let Err(err) = r.result {
                        log::warn!("shutdown: the guest agent refused: {err}");
                    }
                    return;
                }
                Ok(Incoming::AgentGone(_)) => return,
                Ok(other) => log::debug!("ignoring {other:?} during shutdown"),
                Err(_) => {
                    log::warn!("shutdown: no answer from the guest agent");
                    return;
                }
            }
        }
    }
}

/// Waits for the init's `exited` event, forwarding signals meanwhile.
fn wait_for_exit(
    control: &mut Control,
    inbox: &Inbox,
    vm: &mut VmmProcess,
) -> anyhow::Result<ExitStatus> {
    loop {
        let incoming = inbox
            .rx
            .recv()
            .map_err(|_| anyhow!("internal channel closed"))?;
        match incoming {
            Incoming::Signal(signal) => {
                log::debug!("forwarding signal {signal} to the container");
                let body = RequestBody::Signal {
                    process: ProcessRef::Init,
                    signal,
                    all: false,
                };
                if let Err(err) = control.send(body) {
                    log::warn!("cannot forward signal {signal}: {err:#}");
                }
            }
            Incoming::Agent(AgentMessage::Event(Event::Exited {
                process: ProcessRef::Init,
                status,
                pid,
            })) => {
                log::debug!("container init (pid {pid}) exited: {status:?}");
                return Ok(status);
            }
            Incoming::Agent(AgentMessage::Response(r)) => {
                if let Err(err) = r.result {
                    log::warn!("the guest agent refused request {}: {err}", r.id);
                }
            }
            Incoming::Agent(other) => log::debug!("ignoring {other:?}"),
            Incoming::AgentGone(why) => bail!(
                "the guest agent's control connection ended ({why}) before the container exited{}",
                vm.describe()
            ),
        }
    }
}

/// A stdio stream connection of the init, accepted by the agent.
fn open_stream(uds: &Path, kind: StreamKind) -> anyhow::Result<UnixStream> {
    let mut conn = hybrid::connect(uds, STDIO_PORT, Some(CONNECT_TIMEOUT))
        .with_context(|| format!("cannot open the container's {kind} stream"))?;
    conn.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    attach_stream(&mut conn, &ProcessRef::Init, kind)?;
    conn.set_read_timeout(None)?;
    Ok(conn)
}

/// Copies our stdin to the container's until end of file, then closes the connection (the
/// container's end of file). A stdin we cannot read counts as empty.
fn relay_stdin(mut conn: UnixStream) {
    let input = io::stdin().as_fd().try_clone_to_owned();
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            if let Ok(fd) = input {
                let mut input = File::from(fd);
                if let Err(err) = io::copy(&mut input, &mut conn) {
                    log::debug!("stdin relay ended: {err}");
                }
            }
            drop(conn);
        });
    if let Err(err) = spawned {
        log::warn!("cannot start the stdin relay: {err}");
    }
}

/// Copies a container output stream to one of our descriptors, byte for byte, until the
/// agent closes it; then reports on `done`. If our side cannot be written (a closed pipe), it
/// stops and closes the stream, so the container's writes fail as they would under runc.
fn relay_output(
    mut conn: UnixStream,
    out: std::os::fd::BorrowedFd<'_>,
    name: &'static str,
    done: Sender<()>,
) {
    let out: io::Result<OwnedFd> = out.try_clone_to_owned();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match out {
                Ok(fd) => {
                    let mut out = File::from(fd);
                    if let Err(err) = io::copy(&mut conn, &mut out) {
                        log::debug!("{name} relay ended: {err}");
                    }
                }
                Err(err) => {
                    log::debug!("no {name} to relay to ({err}); discarding");
                    let _ = io::copy(&mut conn, &mut io::sink());
                }
            }
            drop(conn);
            let _ = done.send(());
        });
    if let Err(err) = spawned {
        log::warn!("cannot start the {name} relay: {err}");
    }
}
