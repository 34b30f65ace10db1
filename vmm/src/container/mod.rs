//! Container mode (`hull-vmm --container FILE`): hull-vmm is the container's init as the host
//! sees it. Besides running the VM it
//! 1. waits for the guest agent's readiness line on the console, connects to it (the one
//!    control connection), attaches the init's stdio streams and has it create the container;
//! 2. says so on its sync descriptor (one [`CreateReport`] line), which `hull create` waits on;
//! 3. relays its own standard streams to the container's (or a host pty, whose master goes to
//!    `--console-socket`, to the guest's pty), serves `hull` commands on the control socket
//!    (`control`), and forwards the signals it receives to the container's init;
//! 4. when the init exits, drains its output, has the agent power the VM off and exits with the
//!    init's status (code, or 128 + signal).
//!
//! A signal that would end a process, received before the container exists, ends the VM.
//!
//! A pod VM (`create` absent from the container file) starts with no container: once the agent
//! is connected it reports `created` and serves the control socket, where the pod's shim creates
//! the pod's containers (`CreateContainer::pod`) and waits for their processes. A signal that
//! would end a process powers the VM off (the pod is stopped), and hull-vmm exits with 128 + N.

pub use hull_contract::console;
pub mod control;
pub mod ready;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hull_protocol::{
    attach_stream, host_handshake, hybrid, read_frame, write_frame, AgentMessage, Event,
    FrameError, HostMessage, ProcessRef, Request, RequestBody, Stdio, StreamKind, CONTROL_PORT,
    STDIO_PORT,
};
use nix::sys::signal::{SigSet, Signal};

pub use hull_contract::relay::pump;
use hull_contract::relay::relay_body;
use hull_contract::signals::terminates;
pub use hull_contract::signals::{block_forwarded_signals, FORWARDED};
pub use hull_contract::{ContainerConfig, CreateReport};

use crate::builder::Stopper;
use crate::thread::{Spawner, ThreadKind};
use control::{ClientRequest, ClientWriter};

/// From hull-vmm's start to the agent's readiness line (a PVM boot takes most of a minute).
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// For a vsock connection to be accepted, the handshake, and `create_container`'s answer.
const AGENT_DEADLINE: Duration = Duration::from_secs(120);
/// After the init's exit, for its output to drain (descendants may hold it open).
const OUTPUT_GRACE: Duration = Duration::from_secs(10);
/// After `shutdown`, for the VM to power off.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);
/// Bytes of the console quoted in an error.
const TAIL_BYTES: u64 = 2048;
/// Messages waiting for the supervisor. When it is full, the agent's reader stops reading, so
/// a guest that floods the control connection fills its own vsock credit, not hull-vmm's heap.
const INBOX_CAPACITY: usize = 64;
/// For one frame to the agent to be written: a guest that stops reading its control
/// connection (withholding vsock credit) ends the VM instead of blocking the supervisor.
const AGENT_WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// What the supervisor's loop waits for.
enum Incoming {
    Signal(i32),
    /// The host terminal's window size changed.
    Resize,
    Agent(AgentMessage),
    AgentGone(String),
    Client(ClientRequest),
    /// The init's output has drained (or the grace period ran out).
    Drained,
}

impl From<ClientRequest> for Incoming {
    fn from(request: ClientRequest) -> Self {
        Incoming::Client(request)
    }
}

/// The exit status hull-vmm reports: the init's, once known.
pub type ExitCell = Arc<Mutex<Option<i32>>>;

/// For a container with a terminal: opens a host pty of the spec's size, makes it hull-vmm's
/// controlling terminal, and sends its master to the console socket (the way runc does);
/// returns the slave, for [`start`]. Done before hull-vmm jails itself: the jail holds neither
/// `/dev/ptmx` nor the console socket.
pub fn open_host_pty(config: &ContainerConfig) -> anyhow::Result<Option<OwnedFd>> {
    let Some(Stdio::Terminal { rows, cols }) = config.create.as_ref().map(|c| c.stdio) else {
        return Ok(None);
    };
    let socket = config
        .console_socket
        .as_deref()
        .context("a terminal needs a console socket")?;
    let pty = console::HostPty::open(rows, cols).context("cannot open a host pty")?;
    // As the controlling terminal, a resize of the master sends hull-vmm SIGWINCH, and the
    // master's close SIGHUP (forwarded to the init, as a hang-up). Only possible when hull-vmm
    // leads its session, which `hull create` arranges.
    if let Err(err) = console::make_controlling(pty.slave.as_fd()) {
        log::info!("the host pty is not hull-vmm's controlling terminal ({err}): no resizes");
    }
    console::send_master(socket, pty.master.as_fd())?;
    Ok(Some(pty.slave))
}

/// Starts the supervisor threads. `agent_reports` brings the agent's readiness line from the
/// console (`Vmm::agent_reports`); `console` is the console file (quoted in errors); `signals`
/// were blocked by [`block_forwarded_signals`]; `sync` receives the [`CreateReport`];
/// `stopper` ends the VM; `host_tty` is [`open_host_pty`]'s. Returns where the exit status
/// will be.
#[allow(clippy::too_many_arguments)]
pub fn start(
    config: ContainerConfig,
    host_tty: Option<OwnedFd>,
    agent_reports: Receiver<ready::AgentReport>,
    console: PathBuf,
    vsock: PathBuf,
    signals: SigSet,
    sync: Option<File>,
    stopper: Stopper,
    nic_slots: crate::nic::NicSlots,
) -> io::Result<ExitCell> {
    let status: ExitCell = Arc::new(Mutex::new(None));
    let created = Arc::new(AtomicBool::new(false));
    let terminal = config
        .create
        .as_ref()
        .is_some_and(|c| matches!(c.stdio, Stdio::Terminal { .. }));
    let (tx, rx) = sync_channel(INBOX_CAPACITY);
    let threads = Spawner::new(stopper.clone());
    let supervisor = Supervisor {
        threads: threads.clone(),
        since: Instant::now(),
        config,
        agent_reports,
        console,
        vsock,
        status: status.clone(),
        created: created.clone(),
        stopper,
        tx: tx.clone(),
        pending: HashMap::new(),
        next_id: 1,
        host_tty,
        nic_slots,
    };
    let early_stop = supervisor.stopper.clone();
    let early_status = status.clone();
    threads.spawn(ThreadKind::Signals, move || loop {
        let Ok(signal) = signals.wait() else { return };
        log::info!("received {signal}");
        if terminal && signal == Signal::SIGWINCH {
            let _ = tx.send(Incoming::Resize);
        } else if created.load(Ordering::Acquire) {
            if tx.send(Incoming::Signal(signal as i32)).is_err() {
                return;
            }
        } else if terminates(signal) {
            *early_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(128 + signal as i32);
            early_stop.stop(format!("{signal} before the container was created"));
        }
    })?;
    threads.spawn(ThreadKind::Supervisor, move || supervisor.run(rx, sync))?;
    Ok(status)
}

struct Supervisor {
    /// The VM's NIC slots, filled by `configure_network` requests before they go to the agent.
    nic_slots: crate::nic::NicSlots,
    /// Starts the supervisor's helper threads.
    threads: Spawner,
    /// When the supervisor started (with the VM), for the timings it logs.
    since: Instant,
    config: ContainerConfig,
    /// The agent's readiness line, from the console as the guest writes it.
    agent_reports: Receiver<ready::AgentReport>,
    /// The console file, quoted in errors.
    console: PathBuf,
    vsock: PathBuf,
    status: ExitCell,
    created: Arc<AtomicBool>,
    stopper: Stopper,
    tx: SyncSender<Incoming>,
    /// Requests sent to the agent and not answered yet: who gets the answer.
    pending: HashMap<u64, Route>,
    next_id: u64,
    /// With a terminal: the slave of the host pty (for its window size).
    host_tty: Option<OwnedFd>,
}

enum Route {
    Client { writer: ClientWriter, id: u64 },
    Own(&'static str),
}

/// What the setup hands the serving loop.
struct Running {
    control: UnixStream,
    /// How many output relays will report their end.
    outputs: usize,
    done: Receiver<()>,
}

impl Supervisor {
    fn run(mut self, rx: Receiver<Incoming>, sync: Option<File>) {
        let setup = self.setup(&rx);
        let report = match &setup {
            Ok(_) => CreateReport::Created,
            Err(err) => CreateReport::Failed(format!("{err:#}")),
        };
        if let Some(mut sync) = sync {
            let mut line = serde_json::to_vec(&report).expect("a CreateReport serializes");
            line.push(b'\n');
            if let Err(err) = sync.write_all(&line) {
                log::warn!("cannot report on the sync descriptor: {err}");
            }
        }
        match setup {
            Ok(running) => {
                log::info!(
                    "container created ({} ms)",
                    self.since.elapsed().as_millis()
                );
                self.created.store(true, Ordering::Release);
                self.serve(running, &rx);
            }
            Err(err) => {
                log::error!("{err:#}");
                self.set_status(1);
                self.stopper.stop("the container could not be created");
            }
        }
    }

    fn set_status(&self, status: i32) {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(status);
    }

    fn console_tail(&self) -> String {
        let tail = ready::tail(&self.console, TAIL_BYTES);
        if tail.trim().is_empty() {
            String::new()
        } else {
            format!(
                "\n--- console ({}) ---\n{}",
                self.console.display(),
                tail.trim_end()
            )
        }
    }

    /// Boot wait, agent connection, streams, `create_container`.
    fn setup(&mut self, rx: &Receiver<Incoming>) -> anyhow::Result<Running> {
        let spawned = self.since;
        let ready = ready::wait_ready(&self.agent_reports, spawned, BOOT_DEADLINE)
            .map_err(|e| anyhow!("{e}{}", self.console_tail()))?;
        log::info!(
            "agent ready after {} ms (guest uptime {:?} ms)",
            ready.at.duration_since(spawned).as_millis(),
            ready.guest_uptime_ms
        );
        let mut control = hybrid::connect(&self.vsock, CONTROL_PORT, Some(AGENT_DEADLINE))
            .context("cannot reach the guest agent")?;
        control.set_read_timeout(Some(AGENT_DEADLINE))?;
        let hello = host_handshake(&mut control, env!("CARGO_PKG_VERSION"))
            .context("handshake with the guest agent")?;
        control.set_read_timeout(None)?;
        log::info!(
            "agent {} (protocol {}, kernel {})",
            hello.agent_version,
            hello.protocol_version,
            hello.kernel_release
        );
        control.set_write_timeout(Some(AGENT_WRITE_DEADLINE))?;
        let reader = control.try_clone()?;
        let tx = self.tx.clone();
        self.threads
            .spawn(ThreadKind::AgentReader, move || read_agent(reader, &tx))?;

        let Some(create) = self.config.create.clone() else {
            // A pod VM: its clients make its containers.
            control::serve(
                &self.threads,
                &self.config.control_socket,
                self.tx.clone(),
                hello.kernel_release,
                true,
            )?;
            return Ok(Running {
                control,
                outputs: 0,
                done: channel().1,
            });
        };
        let stdio = create.stdio;
        let mut streams = Vec::new();
        for kind in stdio.streams() {
            let mut conn = hybrid::connect(&self.vsock, STDIO_PORT, Some(AGENT_DEADLINE))
                .with_context(|| format!("cannot open the init's {kind} stream"))?;
            conn.set_read_timeout(Some(AGENT_DEADLINE))?;
            attach_stream(&mut conn, &ProcessRef::Init, kind)?;
            conn.set_read_timeout(None)?;
            streams.push((kind, conn));
        }

        let id = self.send(
            &mut control,
            RequestBody::CreateContainer(Box::new(create)),
            Route::Own("create_container"),
        )?;
        self.await_own(rx, id, "create container")?;

        let (done_tx, done) = channel();
        let outputs = match stdio {
            Stdio::Pipes { .. } => self.relay_pipes(streams, &done_tx)?,
            Stdio::Terminal { .. } => self.relay_terminal(streams, &done_tx)?,
        };
        control::serve(
            &self.threads,
            &self.config.control_socket,
            self.tx.clone(),
            hello.kernel_release,
            false,
        )?;
        Ok(Running {
            control,
            outputs,
            done,
        })
    }

    fn send(
        &mut self,
        control: &mut UnixStream,
        body: RequestBody,
        route: Route,
    ) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        send_to_agent(
            control,
            &HostMessage::Request(Request { id, body }),
            &self.stopper,
        )?;
        self.pending.insert(id, route);
        Ok(id)
    }

    /// Waits for the answer to one of hull-vmm's own requests during setup.
    fn await_own(&mut self, rx: &Receiver<Incoming>, id: u64, what: &str) -> anyhow::Result<()> {
        let end = Instant::now() + AGENT_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Incoming::Agent(AgentMessage::Response(r))) if r.id == id => {
                    self.pending.remove(&id);
                    return r
                        .result
                        .map(drop)
                        .map_err(|e| anyhow!("{what}: the guest agent refused: {e}"));
                }
                Ok(Incoming::AgentGone(why)) => bail!(
                    "{what}: the guest agent's connection ended ({why}){}",
                    self.console_tail()
                ),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{what}: no answer from the guest agent within {} s",
                    AGENT_DEADLINE.as_secs()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!("{what}: internal channel closed"),
            }
        }
    }

    /// hull-vmm's standard streams to the init's.
    fn relay_pipes(
        &self,
        streams: Vec<(StreamKind, UnixStream)>,
        done: &Sender<()>,
    ) -> anyhow::Result<usize> {
        let mut outputs = 0;
        for (kind, stream) in streams {
            match kind {
                StreamKind::Stdin => {
                    let input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
                    relay(&self.threads, "stdin", input, stream, None)?;
                }
                StreamKind::Stdout | StreamKind::Stderr => {
                    let fd = if kind == StreamKind::Stdout {
                        io::stdout().as_fd().try_clone_to_owned()?
                    } else {
                        io::stderr().as_fd().try_clone_to_owned()?
                    };
                    relay(
                        &self.threads,
                        "output",
                        stream,
                        File::from(fd),
                        Some(done.clone()),
                    )?;
                    outputs += 1;
                }
                StreamKind::Terminal => bail!("a terminal stream without a terminal"),
            }
        }
        Ok(outputs)
    }

    /// The host pty's slave (see [`open_host_pty`]) relayed to the guest's terminal.
    fn relay_terminal(
        &mut self,
        streams: Vec<(StreamKind, UnixStream)>,
        done: &Sender<()>,
    ) -> anyhow::Result<usize> {
        let Some((_, stream)) = streams
            .into_iter()
            .find(|(k, _)| *k == StreamKind::Terminal)
        else {
            bail!("no terminal stream");
        };
        let slave = self
            .host_tty
            .as_ref()
            .context("a terminal without a host pty")?;
        let slave_in = File::from(slave.try_clone()?);
        let slave_out = File::from(slave.try_clone()?);
        relay(
            &self.threads,
            "terminal input",
            slave_in,
            stream.try_clone()?,
            None,
        )?;
        relay(
            &self.threads,
            "terminal output",
            stream,
            slave_out,
            Some(done.clone()),
        )?;
        Ok(1)
    }

    /// Puts each interface's TAP in a NIC slot and tells the agent which device that is.
    fn fill_nic_slots(
        &self,
        network: &mut hull_protocol::NetworkConfig,
    ) -> Result<(), hull_protocol::ErrorResponse> {
        for (i, iface) in network.interfaces.iter_mut().enumerate() {
            if iface.tap.is_empty() {
                return Err(hull_protocol::ErrorResponse::new(
                    hull_protocol::ErrorKind::InvalidRequest,
                    format!(
                        "interfaces[{i}] ({}): no TAP to put in a NIC slot",
                        iface.name
                    ),
                ));
            }
            iface.device = self
                .nic_slots
                .fill(&iface.tap, &iface.mac, iface.mtu)
                .map_err(|e| {
                    hull_protocol::ErrorResponse::new(
                        hull_protocol::ErrorKind::InvalidRequest,
                        format!(
                            "interfaces[{i}] ({}): {}",
                            iface.name,
                            crate::error_chain(&e)
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// Serves until the VM is told to power off.
    fn serve(mut self, mut running: Running, rx: &Receiver<Incoming>) {
        let mut deadline: Option<Instant> = None;
        let mut exited = false;
        loop {
            let incoming = match deadline {
                Some(end) => match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                    Ok(incoming) => incoming,
                    Err(_) => {
                        self.stopper
                            .stop("the guest did not power off after shutdown");
                        return;
                    }
                },
                None => match rx.recv() {
                    Ok(incoming) => incoming,
                    Err(_) => return,
                },
            };
            match incoming {
                Incoming::Signal(signal) if self.config.create.is_none() => {
                    // A pod VM stops.
                    if deadline.is_none() {
                        log::info!("stopping the pod VM on signal {signal}");
                        exited = true;
                        self.set_status(128 + signal);
                        self.shut_down(&mut running, &mut deadline);
                    }
                }
                Incoming::Signal(signal) => {
                    let body = RequestBody::Signal {
                        process: ProcessRef::Init,
                        signal,
                        all: false,
                    };
                    self.send_or_warn(&mut running.control, body, Route::Own("signal"));
                }
                Incoming::Resize => {
                    let Some(tty) = &self.host_tty else { continue };
                    match console::window_size(tty) {
                        Ok((rows, cols)) => {
                            let body = RequestBody::ResizeTerminal {
                                process: ProcessRef::Init,
                                rows,
                                cols,
                            };
                            self.send_or_warn(&mut running.control, body, Route::Own("resize"));
                        }
                        Err(err) => log::warn!("cannot read the terminal's size: {err}"),
                    }
                }
                Incoming::Client(ClientRequest { request, writer }) => {
                    if request.body == RequestBody::StartContainer {
                        log::info!("start requested ({} ms)", self.since.elapsed().as_millis());
                    }
                    let route = Route::Client {
                        writer: writer.clone(),
                        id: request.id,
                    };
                    let body = match request.body {
                        RequestBody::ConfigureNetwork(mut network) => {
                            if let Err(err) = self.fill_nic_slots(&mut network) {
                                control::respond(&writer, request.id, Err(err));
                                continue;
                            }
                            RequestBody::ConfigureNetwork(network)
                        }
                        body => body,
                    };
                    if let Err(err) = self.send(&mut running.control, body, route) {
                        control::respond(
                            &writer,
                            request.id,
                            Err(hull_protocol::ErrorResponse::new(
                                hull_protocol::ErrorKind::Io,
                                format!("{err:#}"),
                            )),
                        );
                    }
                }
                Incoming::Agent(AgentMessage::Response(response)) => {
                    match self.pending.remove(&response.id) {
                        Some(Route::Client { writer, id }) => {
                            control::respond(&writer, id, response.result)
                        }
                        Some(Route::Own(what)) => {
                            if let Err(err) = response.result {
                                log::warn!("{what}: the guest agent refused: {err}");
                            }
                        }
                        None => log::debug!("an answer to no request: {}", response.id),
                    }
                }
                Incoming::Agent(AgentMessage::Event(Event::Exited {
                    process: ProcessRef::Init,
                    status,
                    pid,
                })) if !exited => {
                    exited = true;
                    log::info!(
                        "container init (pid {pid}) exited: {status:?} ({} ms)",
                        self.since.elapsed().as_millis()
                    );
                    self.set_status(status.shell_status());
                    let tx = self.tx.clone();
                    let outputs = running.outputs;
                    let done = std::mem::replace(&mut running.done, channel().1);
                    let drain = self.threads.spawn(ThreadKind::OutputDrain, move || {
                        let end = Instant::now() + OUTPUT_GRACE;
                        for _ in 0..outputs {
                            let left = end.saturating_duration_since(Instant::now());
                            if done.recv_timeout(left).is_err() {
                                log::warn!("container output still open {} s after its init exited; leaving it", OUTPUT_GRACE.as_secs());
                                break;
                            }
                        }
                        let _ = tx.send(Incoming::Drained);
                    });
                    if let Err(err) = drain {
                        log::warn!("cannot wait for the container's output ({err}); leaving it");
                        self.shut_down(&mut running, &mut deadline);
                    }
                }
                Incoming::Agent(other) => log::debug!("from the agent: {other:?}"),
                Incoming::Drained => self.shut_down(&mut running, &mut deadline),
                Incoming::AgentGone(why) => {
                    if exited {
                        // The power-off closes the connection; the VM ends by itself.
                        deadline.get_or_insert(Instant::now() + SHUTDOWN_DEADLINE);
                    } else {
                        log::error!(
                            "the guest agent's connection ended ({why}) before the container exited{}",
                            self.console_tail()
                        );
                        self.stopper.stop("the guest agent went away");
                        return;
                    }
                }
            }
        }
    }

    /// The init's output has drained: the VM powers off.
    fn shut_down(&mut self, running: &mut Running, deadline: &mut Option<Instant>) {
        log::info!("output drained ({} ms)", self.since.elapsed().as_millis());
        self.send_or_warn(
            &mut running.control,
            RequestBody::Shutdown,
            Route::Own("shutdown"),
        );
        *deadline = Some(Instant::now() + SHUTDOWN_DEADLINE);
    }

    fn send_or_warn(&mut self, control: &mut UnixStream, body: RequestBody, route: Route) {
        if let Err(err) = self.send(control, body, route) {
            log::warn!("{err:#}");
        }
    }
}

/// The agent reader's loop: every frame from the agent to the supervisor's inbox, waiting
/// while the inbox is full (the guest's writes then wait on its vsock credit), then why the
/// connection ended.
fn read_agent(mut reader: UnixStream, inbox: &SyncSender<Incoming>) {
    let gone = loop {
        match read_frame::<_, AgentMessage>(&mut reader) {
            Ok(Some(msg)) => {
                if inbox.send(Incoming::Agent(msg)).is_err() {
                    return;
                }
            }
            Ok(None) => break "closed".to_owned(),
            Err(err) => break format!("{:#}", anyhow!(err)),
        }
    };
    let _ = inbox.send(Incoming::AgentGone(gone));
}

/// Writes one message on the agent's control connection, whose write timeout is set. If the
/// deadline passes (the guest stopped reading), part of the frame may be written and the
/// connection cannot be used again: the VM ends.
fn send_to_agent(
    control: &mut UnixStream,
    message: &HostMessage,
    stopper: &Stopper,
) -> anyhow::Result<()> {
    let Err(err) = write_frame(control, message) else {
        return Ok(());
    };
    if let FrameError::Write(e) = &err {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            let deadline = control.write_timeout().ok().flatten().unwrap_or_default();
            stopper.stop(format!(
                "the guest agent has not read its control connection for {} s",
                deadline.as_secs_f32()
            ));
        }
    }
    Err(anyhow!(err).context("cannot send a request to the guest agent"))
}

/// Copies `from` to `to` ([`pump`]) on a thread of its own (from `threads`, so that a panic
/// ends the VM) until the end of `from` (or a write error); then closes both and reports on
/// `done`.
pub fn relay<R, W>(
    threads: &Spawner,
    name: &'static str,
    from: R,
    to: W,
    done: Option<Sender<()>>,
) -> io::Result<()>
where
    R: io::Read + Send + 'static,
    W: io::Write + Send + 'static,
{
    threads.spawn(ThreadKind::Relay(name), relay_body(name, from, to, done))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::sync::mpsc::channel;

    use hull_protocol::{encode_frame, ExitStatus};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::vstate::vcpu::VmExit;

    #[test]
    fn an_agent_flooding_its_control_connection_is_held_back() {
        let (mut agent, host) = UnixStream::pair().unwrap();
        let (tx, rx) = sync_channel(INBOX_CAPACITY);
        let reader = std::thread::spawn(move || read_agent(host, &tx));
        let event = AgentMessage::Event(Event::Exited {
            process: ProcessRef::Init,
            pid: 7,
            status: ExitStatus::Code(0),
        });
        let frame = encode_frame(&event).unwrap();
        agent.set_nonblocking(true).unwrap();
        // Nobody takes the supervisor's messages: once the inbox and the socket's buffers are
        // full, the agent's writes must wait (an unbounded inbox would take all 64 MiB).
        let (mut written, mut blocked) = (0usize, false);
        while written < 64 << 20 {
            match agent.write(&frame) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    if agent.write(&frame).map_err(|e| e.kind()) == Err(ErrorKind::WouldBlock) {
                        blocked = true;
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(blocked, "{written} bytes taken without backpressure");
        assert!(written < 8 << 20, "{written} bytes taken");
        // Draining the inbox lets the reader take more of what waits in the socket's buffers
        // (at most both buffers' worth, bounded by the send buffer twice): beyond that and the
        // inbox, nothing may be held.
        let send_buffer =
            nix::sys::socket::getsockopt(&agent, nix::sys::socket::sockopt::SndBuf).unwrap();
        let in_socket = 2 * send_buffer / frame.len() + 1;
        let mut held = 0;
        while let Ok(Incoming::Agent(_)) = rx.try_recv() {
            held += 1;
        }
        assert!(
            held <= INBOX_CAPACITY + 1 + in_socket,
            "{held} messages queued (inbox {INBOX_CAPACITY}, socket {in_socket})"
        );
        drop(rx);
        reader.join().unwrap();
    }

    #[test]
    fn a_request_to_an_agent_that_stopped_reading_ends_the_vm() {
        let (_agent, mut host) = UnixStream::pair().unwrap();
        host.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (exits, exit) = channel();
        let stopper = Stopper::new(exits, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let request = HostMessage::Request(Request {
            id: 1,
            body: RequestBody::Signal {
                process: ProcessRef::Init,
                signal: 15,
                all: false,
            },
        });
        let since = Instant::now();
        let err = loop {
            if let Err(err) = send_to_agent(&mut host, &request, &stopper) {
                break err;
            }
            assert!(since.elapsed() < Duration::from_secs(10), "never stalled");
        };
        assert!(since.elapsed() < Duration::from_secs(10));
        assert!(
            format!("{err:#}").contains("cannot send a request"),
            "{err:#}"
        );
        assert_eq!(
            exit.try_recv().unwrap(),
            VmExit::Stopped("the guest agent has not read its control connection for 0.2 s".into())
        );
    }
}
