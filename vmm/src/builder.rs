//! The one place that wires a VM together from a `VmConfig`: memory, kernel, devices, command
//! line, vCPUs, and the event loop that waits for the VM to end.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::fs::{Fs, FsConfig};
use devices::virtio::net::{Net, NetSlot, Tap};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, BootError};
use crate::config::{ConfigError, ConsoleConfig, VmConfig};
use crate::container::ready::{AgentReport, Ready, ReadyScanner};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::host::KvmKind;
use crate::snapshot::state::{self as snapshot_state, VcpuState, VmState};
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::thread::Spawner;
use crate::vstate::run_state::{
    install_kick_handler, RunState, RunStateError, VcpuControl, VcpuHandle,
};
use crate::vstate::vcpu::{AssistStats, Vcpu, VcpuError, VmExit};
use crate::vstate::vm::{Vm, VmError};

/// hull's own kernel command line:
/// - the console on COM1, and only COM1 probed;
/// - `reboot=k`: the guest resets through the i8042, which ends the VMM cleanly;
/// - `panic=1`: a panicking guest resets after a second instead of hanging.
const BASE_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 reboot=k panic=1";

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A device could not be attached.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A shared directory's virtio-fs device could not be created.
    #[error("shared directory `{tag}`")]
    SharedDir {
        tag: String,
        #[source]
        source: devices::virtio::fs::FsError,
    },
    /// A net device could not be set up on its TAP.
    #[error("net device on TAP {tap}")]
    Net {
        tap: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The virtio-vsock device could not be created.
    #[error("vsock device on {path}")]
    Vsock {
        path: std::path::PathBuf,
        #[source]
        source: devices::virtio::vsock::VsockError,
    },
    /// A vCPU could not be created, configured or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A vCPU did not pause, resume or stop as asked.
    #[error(transparent)]
    RunState(#[from] RunStateError),
    /// The console file cannot be opened.
    #[error("cannot open console file {path}")]
    Console {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// An eventfd or signal handler could not be set up.
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Builds the kernel command line: hull's base, `quiet` unless boot messages are wanted, the
/// host's needs, the devices, then the user's additions (which may override earlier ones).
pub fn kernel_cmdline(
    config: &VmConfig,
    kind: KvmKind,
    device_args: &[String],
) -> Result<Cmdline, VmmError> {
    let mut cmdline = boot::new_cmdline();
    let mut push = |arg: &str| -> Result<(), VmmError> {
        if arg.trim().is_empty() {
            return Ok(());
        }
        cmdline
            .insert_str(arg)
            .map_err(|source| VmmError::Boot(BootError::Cmdline(source)))
    };
    push(BASE_CMDLINE)?;
    if !config.boot_messages {
        push("quiet")?;
    }
    if let Some(extra) = kind.extra_cmdline() {
        push(extra)?;
    }
    for arg in device_args {
        push(arg)?;
    }
    push(&config.cmdline)?;
    Ok(cmdline)
}

fn open_console(console: &ConsoleConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match console {
        // Unbuffered: a console shows each byte as the guest sends it.
        ConsoleConfig::Stdout => Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| VmmError::Setup {
                    what: "the console on standard output",
                    source,
                })?,
        )),
        ConsoleConfig::Null => Box::new(std::io::sink()),
        ConsoleConfig::File(path) => Box::new(LineBuffered(std::io::LineWriter::with_capacity(
            4096,
            hull_contract::Capped::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmmError::Console {
                        path: path.clone(),
                        source,
                    })?,
                MAX_CONSOLE_FILE,
                "\n[hull-vmm: console file full; the rest is dropped]\n",
            ),
        ))),
    })
}

/// A console file, written a line at a time (or 4 KiB of one), and what is left when the VM
/// ends. The serial port writes and flushes every byte the guest sends; a system call for each
/// made a flood of output cost the host one per byte.
struct LineBuffered<W: Write>(std::io::LineWriter<W>);

impl<W: Write> Write for LineBuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    /// The line's end flushes, not the serial port.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The most a console file receives: the guest writes it, and must not fill the host's disk.
const MAX_CONSOLE_FILE: u64 = 16 << 20;

/// Waits for the end of the VM: a reset from the i8042 or an exit reported by a vCPU.
struct ExitHandler {
    reset_evt: EventFd,
    exit_evt: EventFd,
    exits: Receiver<VmExit>,
    result: Option<VmExit>,
}

impl MutEventSubscriber for ExitHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::fd::AsRawFd::as_raw_fd(&self.reset_evt) {
            let _ = self.reset_evt.read();
            self.result.get_or_insert(VmExit::Reset);
        } else if fd == std::os::fd::AsRawFd::as_raw_fd(&self.exit_evt) {
            let _ = self.exit_evt.read();
            if let Ok(exit) = self.exits.try_recv() {
                self.result.get_or_insert(exit);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.reset_evt, &self.exit_evt] {
            if let Err(err) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("cannot watch the VM's end events: {err:?}");
            }
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a vCPU may take to acknowledge a pause, resume or stop, or to run a job while
/// paused. Only a vCPU stuck in a device call (a console write to a full pipe) comes near it.
const VCPU_DEADLINE: Duration = Duration::from_secs(5);
/// How long a snapshot waits for the virtio devices to finish what the guest asked of them
/// before the pause.
const DEVICE_QUIET_DEADLINE: Duration = Duration::from_secs(1);

/// A built VM: ready to run ([`Vmm::run`]), or started ([`Vmm::start`]) and then paused,
/// inspected and resumed by its owner.
pub struct Vmm {
    /// Keeps the VM (and its memory) alive while the vCPUs run.
    vm: Vm,
    /// The vCPUs before they start.
    vcpus: Vec<Vcpu>,
    /// The vCPUs once started.
    running: Vec<VcpuHandle>,
    /// Owns the devices (through the buses the vCPUs share) for the VM's lifetime.
    device_manager: DeviceManager,
    /// The VM's shape, for a snapshot.
    vcpu_count: u8,
    mem_size_mib: u32,
    /// Restored from a snapshot: its memory is a private mapping of the snapshot's file.
    restored: bool,
    event_manager: EventManager<Subscriber>,
    exit_handler: Arc<Mutex<ExitHandler>>,
    stopper: Stopper,
    threads: Spawner,
    /// The agent's readiness (or fatal) line, from the console, until taken.
    agent_reports: Option<Receiver<AgentReport>>,
    cmdline: String,
    nic_slots: crate::nic::NicSlots,
}

/// Ends a running VM from another thread: [`Vmm::run`] returns [`VmExit::Stopped`] unless
/// the VM had already ended otherwise. Clones end the same VM.
#[derive(Clone)]
pub struct Stopper(Arc<EndSignal>);

/// Where the reason for the VM's end goes, and the eventfd that wakes the vmm thread for it.
struct EndSignal {
    exits: Sender<VmExit>,
    evt: EventFd,
}

impl Stopper {
    /// A stopper sending to `exits` and signalling `evt`, which the VM's event loop watches.
    pub(crate) fn new(exits: Sender<VmExit>, evt: EventFd) -> Self {
        Self(Arc::new(EndSignal { exits, evt }))
    }

    /// Asks the VM to end; `why` goes into the exit reason.
    pub fn stop(&self, why: impl Into<String>) {
        self.end(VmExit::Stopped(why.into()));
    }

    /// Ends the VM with `exit` (the first reason the vmm thread receives wins).
    pub(crate) fn end(&self, exit: VmExit) {
        // The vmm thread may be gone already if the VM ended otherwise.
        let _ = self.0.exits.send(exit);
        if let Err(err) = self.0.evt.write(1) {
            log::error!("cannot signal the VM's exit event: {err}");
        }
    }
}

/// How a VM run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM ended.
    pub exit: VmExit,
    /// Instructions the emulation assist completed, summed over vCPUs.
    pub assists: AssistStats,
}

fn setup_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Setup { what, source }
}

/// Builds a VM from `config` on a host whose KVM is `kind`.
pub fn build(config: &VmConfig, kind: KvmKind) -> Result<Vmm, VmmError> {
    build_with_devices(config, kind, Vec::new())
}

/// The net devices of `config`'s TAPs, opened in the calling thread's network namespace: before
/// the jail, which takes hull-vmm into a new, empty one (the TAPs' descriptors keep theirs).
pub fn open_net_devices(config: &VmConfig) -> Result<Vec<Arc<Mutex<Net>>>, VmmError> {
    config
        .net
        .iter()
        .map(|net| {
            let fail = |source: Box<dyn std::error::Error + Send + Sync>| VmmError::Net {
                tap: net.tap.clone(),
                source,
            };
            let mac = net
                .mac_bytes()
                .ok_or_else(|| fail(format!("MAC {:?} is not one a NIC takes", net.mac).into()))?;
            let tap = Tap::open(&net.tap).map_err(|e| fail(Box::new(e)))?;
            let device = Net::new(Box::new(tap), mac, net.mtu).map_err(|e| fail(Box::new(e)))?;
            Ok(Arc::new(Mutex::new(device)))
        })
        .collect()
}

/// Builds a VM from `config` with extra virtio devices, announced to the guest in order.
pub fn build_with_devices(
    config: &VmConfig,
    kind: KvmKind,
    virtio_devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
) -> Result<Vmm, VmmError> {
    build_with_net(config, kind, Vec::new(), virtio_devices)
}

/// Builds a VM from `config` with the net devices of its TAPs ([`open_net_devices`], one per
/// `config.net` entry, in order) and extra virtio devices.
pub fn build_with_net(
    config: &VmConfig,
    kind: KvmKind,
    nets: Vec<Arc<Mutex<Net>>>,
    virtio_devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
) -> Result<Vmm, VmmError> {
    if nets.len() != config.net.len() {
        return Err(VmmError::Net {
            tap: config
                .net
                .iter()
                .map(|n| n.tap.as_str())
                .collect::<Vec<_>>()
                .join(","),
            source: format!(
                "{} net devices opened for {} configured",
                nets.len(),
                config.net.len()
            )
            .into(),
        });
    }
    let kvm = Kvm::new().map_err(VmmError::Kvm)?;
    config.validate(kvm.get_max_vcpus())?;

    let memory = boot::create_memory(u64::from(config.mem_size_mib))?;
    let vm = Vm::new(&kvm, memory)?;
    let kernel = boot::load_kernel(vm.memory(), &config.kernel)?;
    let initramfs = config
        .initramfs
        .as_deref()
        .map(|path| boot::load_initramfs(vm.memory(), path, kernel.end))
        .transpose()?;

    let mut parts = Parts::new(&vm, config, None)?;
    parts.attach_virtio(&vm, config, nets, virtio_devices)?;
    let device_manager = &parts.device_manager;
    let cmdline = kernel_cmdline(config, kind, &device_manager.cmdline_args())?;
    boot::configure_system(vm.memory(), &cmdline, initramfs)?;

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let mut vcpu = Vcpu::new(&vm, index, device_manager.buses().clone())?;
        vcpu.configure(&kvm, config.vcpus, kernel.entry)?;
        vcpus.push(vcpu);
    }
    let cmdline = cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(parts.assemble(vm, vcpus, config, cmdline, false))
}

/// Restores the VM snapshotted in `dir` ([`Vmm::snapshot`]): `config` gives its console and
/// must describe the same VM (vCPUs, memory; no virtio devices yet). The VM is ready to
/// [`Vmm::start`] or [`Vmm::run`], and continues exactly where the snapshot was taken.
///
/// `prepared`, if it has `config`'s memory size, is the VM the restore uses: the snapshot's
/// memory is mapped over its RAM, and what it took to make it is off the restore's path.
pub fn restore(
    config: &VmConfig,
    dir: &std::path::Path,
    prepared: Option<PreparedVm>,
) -> Result<Vmm, VmmError> {
    let mut timeline = Timeline::new();
    let prepared = prepared.filter(|p| p.mem_size_mib == config.mem_size_mib);
    let (kvm, prepared_vm) = match prepared {
        Some(PreparedVm { kvm, vm, .. }) => (kvm, Some(vm)),
        None => (Kvm::new().map_err(VmmError::Kvm)?, None),
    };
    config.validate(kvm.get_max_vcpus())?;
    if let Some(net) = config.net.first() {
        return Err(VmmError::Net {
            tap: net.tap.clone(),
            source: "a VM with network devices cannot be restored from a snapshot yet".into(),
        });
    }
    timeline.mark("open KVM");
    let (state_path, memory_path) = snapshot::paths(dir);
    let snap: Snapshot = snapshot::file::read(&state_path).map_err(SnapshotError::from)?;
    snap.check(&state_path, config.vcpus, config.mem_size_mib)?;
    timeline.mark("read state");
    let vm = match prepared_vm {
        Some(vm) => {
            snapshot::memory::map_over(&memory_path, &snap.id, vm.memory())
                .map_err(SnapshotError::from)?;
            timeline.mark("map memory over the prepared VM's");
            vm
        }
        None => {
            let memory = snapshot::memory::map(
                &memory_path,
                &snap.id,
                &boot::memory_ranges(u64::from(config.mem_size_mib) << 20),
            )
            .map_err(SnapshotError::from)?;
            timeline.mark("map memory");
            let vm = Vm::new(&kvm, memory)?;
            timeline.mark("create VM");
            vm
        }
    };
    snapshot_state::check_xsave_size(vm.fd()).map_err(SnapshotError::from)?;
    let mut parts = Parts::new(&vm, config, Some(&snap.serial))?;
    parts.attach_virtio(&vm, config, Vec::new(), Vec::new())?;
    parts.device_manager.restore_virtio(&snap.virtio)?;
    timeline.mark("devices");
    // The agent said it was ready before the snapshot; it is ready again at once.
    let _ = parts.reports_tx.send(AgentReport::Ready(Ready {
        at: Instant::now(),
        guest_uptime_ms: None,
    }));
    let mut vcpus = Vec::with_capacity(snap.vcpus.len());
    for state in &snap.vcpus {
        let vcpu = Vcpu::new(&vm, state.index, parts.device_manager.buses().clone())?;
        vcpu.restore_state(state).map_err(SnapshotError::from)?;
        vcpus.push(vcpu);
    }
    timeline.mark("vCPUs");
    snap.vm.restore(vm.fd()).map_err(SnapshotError::from)?;
    timeline.mark("VM state");
    log::info!("restore timeline (us): {timeline}");
    Ok(parts.assemble(vm, vcpus, config, snap.cmdline.clone(), true))
}

/// A VM made before the snapshot it will run is known: KVM opened, the VM with its TSS,
/// interrupt controllers and PIT, and anonymous RAM registered as its memory slots. Making it
/// is most of a restore's time on a PVM host (the first memory slot alone is 6-11 ms), so
/// `hull` starts hull-vmm to make it while it reads the bundle (`hull-vmm --standby`), and
/// [`restore`] maps the snapshot's memory over its RAM.
pub struct PreparedVm {
    kvm: Kvm,
    vm: Vm,
    mem_size_mib: u32,
}

impl PreparedVm {
    /// Makes a VM with `mem_size_mib` of RAM.
    pub fn new(mem_size_mib: u32) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let memory = boot::create_memory(u64::from(mem_size_mib))?;
        let vm = Vm::new(&kvm, memory)?;
        Ok(Self {
            kvm,
            vm,
            mem_size_mib,
        })
    }
}

/// Steps and how long each took, for a log line.
struct Timeline {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Timeline {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push((step, now.duration_since(self.last)));
        self.last = now;
    }
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, took)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {}", took.as_micros())?;
        }
        Ok(())
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Guest RAM, and the bytes of it written (touched, not zero).
    pub memory: snapshot::DumpStats,
    /// From the pause to both files written.
    pub elapsed: Duration,
}

/// What every VM has besides its vCPUs and virtio devices: the legacy devices, the event loop
/// and the end of the VM.
struct Parts {
    device_manager: DeviceManager,
    event_manager: EventManager<Subscriber>,
    reset_evt: EventFd,
    exit_evt: EventFd,
    exit_rx: Receiver<VmExit>,
    stopper: Stopper,
    threads: Spawner,
    agent_reports: Receiver<AgentReport>,
    /// Where the agent's reports come from (the console's scanner has a clone).
    reports_tx: Sender<AgentReport>,
    /// The empty NIC slots (`VmConfig::nic_slots`).
    nic_slots: crate::nic::NicSlots,
}

impl Parts {
    /// The VM's virtio devices: `config`'s vsock and shared directories, its net devices
    /// (opened by [`open_net_devices`]), then `extra`, in that order (a snapshot's devices are
    /// restored in it).
    fn attach_virtio(
        &mut self,
        vm: &Vm,
        config: &VmConfig,
        nets: Vec<Arc<Mutex<Net>>>,
        extra: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    ) -> Result<(), VmmError> {
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(vsock.guest_cid, vsock.uds_path.clone()).map_err(|source| {
                VmmError::Vsock {
                    path: vsock.uds_path.clone(),
                    source,
                }
            })?;
            let device = Arc::new(Mutex::new(device));
            // The device serves its queues and host sockets on the VMM's event loop.
            self.event_manager.add_subscriber(device.clone());
            self.device_manager
                .attach_virtio(vm.fd(), vm.memory(), device)?;
        }
        for dir in &config.shared_dirs {
            let fs = Fs::new(
                &FsConfig {
                    shared_dir: dir.path.clone(),
                    tag: dir.tag.clone(),
                    read_only: dir.read_only,
                },
                self.threads.for_devices(),
            )
            .map_err(|source| VmmError::SharedDir {
                tag: dir.tag.clone(),
                source,
            })?;
            self.device_manager
                .attach_virtio(vm.fd(), vm.memory(), Arc::new(Mutex::new(fs)))?;
        }
        for net in nets {
            // The device serves its queues and its TAP on the VMM's event loop.
            self.event_manager.add_subscriber(net.clone());
            self.device_manager
                .attach_virtio(vm.fd(), vm.memory(), net)?;
        }
        let mut slots = Vec::with_capacity(usize::from(config.nic_slots));
        for _ in 0..config.nic_slots {
            let slot = NetSlot::new().map_err(setup_err("a NIC slot's eventfd"))?;
            let slot = Arc::new(Mutex::new(slot));
            // The platform device the guest makes of the next command-line entry.
            let guest_device = format!("virtio-mmio.{}", self.device_manager.cmdline_args().len());
            self.event_manager.add_subscriber(slot.clone());
            self.device_manager
                .attach_virtio(vm.fd(), vm.memory(), slot.clone())?;
            slots.push((slot, guest_device));
        }
        self.nic_slots = crate::nic::NicSlots::new(slots);
        for device in extra {
            self.device_manager
                .attach_virtio(vm.fd(), vm.memory(), device)?;
        }
        Ok(())
    }

    /// The legacy devices (COM1 in `serial` state when restoring), the event loop and the
    /// VM's end events.
    fn new(
        vm: &Vm,
        config: &VmConfig,
        serial: Option<&vm_superio::serial::SerialState>,
    ) -> Result<Self, VmmError> {
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("the reset eventfd"))?;
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("the exit eventfd"))?;
        let (exit_tx, exit_rx) = channel();
        let stopper = Stopper::new(
            exit_tx,
            exit_evt
                .try_clone()
                .map_err(setup_err("the exit eventfd"))?,
        );
        let threads = Spawner::new(stopper.clone());
        let mut device_manager = DeviceManager::new();
        // The agent's readiness line is picked out of the console as the guest writes it.
        let (reports_tx, agent_reports) = channel();
        device_manager.attach_legacy(
            vm.fd(),
            Box::new(ReadyScanner::new(
                open_console(&config.console)?,
                reports_tx.clone(),
            )),
            reset_evt
                .try_clone()
                .map_err(setup_err("the reset eventfd"))?,
            serial,
        )?;
        let event_manager = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        Ok(Self {
            device_manager,
            event_manager,
            reset_evt,
            exit_evt,
            exit_rx,
            stopper,
            threads,
            agent_reports,
            reports_tx,
            nic_slots: crate::nic::NicSlots::default(),
        })
    }

    fn assemble(
        mut self,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        config: &VmConfig,
        cmdline: String,
        restored: bool,
    ) -> Vmm {
        let exit_handler = Arc::new(Mutex::new(ExitHandler {
            reset_evt: self.reset_evt,
            exit_evt: self.exit_evt,
            exits: self.exit_rx,
            result: None,
        }));
        self.event_manager.add_subscriber(exit_handler.clone());
        Vmm {
            vm,
            vcpus,
            running: Vec::new(),
            device_manager: self.device_manager,
            vcpu_count: config.vcpus,
            mem_size_mib: config.mem_size_mib,
            restored,
            event_manager: self.event_manager,
            exit_handler,
            stopper: self.stopper,
            threads: self.threads,
            agent_reports: Some(self.agent_reports),
            cmdline,
            nic_slots: self.nic_slots,
        }
    }
}

impl Vmm {
    /// The kernel command line the guest boots with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// A handle that ends the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Where the guest agent's readiness or fatal line arrives, as the guest writes it on the
    /// console (once; `None` after the first call). See `container::ready`.
    pub fn agent_reports(&mut self) -> Option<Receiver<AgentReport>> {
        self.agent_reports.take()
    }

    /// The VM's NIC slots, for the container supervisor to fill.
    pub fn nic_slots(&self) -> crate::nic::NicSlots {
        self.nic_slots.clone()
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// Starts every vCPU's thread (once; later calls do nothing). The VM then runs, but what
    /// ends it is only acted on by [`Vmm::run`].
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.vcpus.is_empty() {
            return Ok(());
        }
        install_kick_handler()?;
        for vcpu in self.vcpus.drain(..) {
            let control = VcpuControl::new(vcpu.index());
            let thread = vcpu.start(&self.threads, control.clone(), self.stopper.clone())?;
            self.running.push(VcpuHandle::new(control, thread));
        }
        Ok(())
    }

    /// Pauses every vCPU and returns once each has acknowledged: none is in the guest, every
    /// pending I/O exit is complete, and the vCPUs' state can be read
    /// ([`Vmm::on_paused_vcpu`]). Fails if a vCPU has exited (the VM ended).
    pub fn pause(&self) -> Result<(), VmmError> {
        for vcpu in &self.running {
            vcpu.request(RunState::Paused);
        }
        let deadline = Instant::now() + VCPU_DEADLINE;
        for vcpu in &self.running {
            vcpu.wait_paused(deadline)?;
        }
        Ok(())
    }

    /// Resumes every vCPU and returns once each has acknowledged.
    pub fn resume(&self) -> Result<(), VmmError> {
        for vcpu in &self.running {
            vcpu.request(RunState::Running);
        }
        let deadline = Instant::now() + VCPU_DEADLINE;
        for vcpu in &self.running {
            vcpu.wait_running(deadline)?;
        }
        Ok(())
    }

    /// Runs `job` on paused vCPU `index`'s own thread, with its vCPU fd (to read or set its
    /// registers), and returns what it returns. The vCPU stays paused.
    pub fn on_paused_vcpu<T: Send + 'static>(
        &self,
        index: u8,
        job: impl FnOnce(&VcpuFd) -> T + Send + 'static,
    ) -> Result<T, VmmError> {
        let vcpu = self
            .running
            .iter()
            .find(|v| v.index() == index)
            .ok_or(RunStateError::NoSuchVcpu { index })?;
        Ok(vcpu.run_paused(job, Instant::now() + VCPU_DEADLINE)?)
    }

    /// Pauses the VM (every vCPU out of the guest, pending exits completed) and writes a
    /// snapshot of it to `dir` (made if need be): `dir/memory`, then `dir/state`. The VM stays
    /// paused; [`Vmm::resume`] lets it go on. Only a started, cold-booted VM without virtio
    /// devices can be snapshotted for now.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<SnapshotReport, VmmError> {
        if self.restored {
            return Err(SnapshotError::Unsupported(
                "a restored VM's memory is the snapshot file's; snapshot the VM it came from",
            )
            .into());
        }
        if self.running.is_empty() {
            return Err(SnapshotError::Unsupported("the VM has not started").into());
        }
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let indices = Arc::new(snapshot_state::msr_indices(&kvm).map_err(SnapshotError::from)?);
        snapshot_state::check_xsave_size(self.vm.fd()).map_err(SnapshotError::from)?;
        let id = snapshot::new_id()?;
        let boot_id = snapshot::boot_id()?;
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Dir {
            path: dir.to_owned(),
            source,
        })?;

        self.pause()?;
        let started = Instant::now();
        let mut vcpus = Vec::with_capacity(self.running.len());
        for handle in &self.running {
            let index = handle.index();
            let indices = indices.clone();
            let state = self
                .on_paused_vcpu(index, move |fd| VcpuState::save(fd, index, &indices))?
                .map_err(SnapshotError::from)?;
            vcpus.push(state);
        }
        let vm = VmState::save(self.vm.fd()).map_err(SnapshotError::from)?;
        // Device threads may still be finishing what the guest asked before the pause.
        let quiet_by = Instant::now() + DEVICE_QUIET_DEADLINE;
        let virtio = loop {
            match self.device_manager.virtio_states() {
                Ok(states) => break states,
                Err(_) if Instant::now() < quiet_by => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(err) => return Err(SnapshotError::Device(err).into()),
            }
        };
        let serial = self
            .device_manager
            .serial_state()
            .ok_or(SnapshotError::Unsupported("the VM has no serial port"))?;
        let (state_path, memory_path) = snapshot::paths(dir);
        let memory_tmp = memory_path.with_extension("tmp");
        let memory = snapshot::memory::dump(self.vm.memory(), &memory_tmp, &id)
            .and_then(|stats| {
                std::fs::rename(&memory_tmp, &memory_path)
                    .map(|()| stats)
                    .map_err(|source| snapshot::MemoryFileError::Write {
                        path: memory_path.clone(),
                        source,
                    })
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&memory_tmp);
            })
            .map_err(SnapshotError::from)?;
        let snap = Snapshot {
            id,
            hull_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id,
            mem_size_mib: self.mem_size_mib,
            vcpu_count: self.vcpu_count,
            cmdline: self.cmdline.clone(),
            vcpus,
            vm,
            serial,
            virtio,
        };
        snapshot::file::write(&state_path, &snap).map_err(SnapshotError::from)?;
        let state_bytes = std::fs::metadata(&state_path).map_or(0, |m| m.len());
        Ok(SnapshotReport {
            state_bytes,
            memory,
            elapsed: started.elapsed(),
        })
    }

    /// Stops every started vCPU and joins its thread; returns their statistics.
    fn stop_vcpus(&mut self) -> AssistStats {
        for vcpu in &self.running {
            vcpu.request(RunState::Stopped);
        }
        let deadline = Instant::now() + VCPU_DEADLINE;
        let mut assists = AssistStats::default();
        for vcpu in self.running.drain(..) {
            let index = vcpu.index();
            match vcpu.join(deadline) {
                Ok(Some(stats)) => {
                    assists.int3 += stats.int3;
                    assists.fwait += stats.fwait;
                    assists.xstate += stats.xstate;
                    assists.xstate_ns += stats.xstate_ns;
                }
                Ok(None) => {}
                // Stuck in a device call: leave it; its owner is going away.
                Err(err) => log::warn!("vcpu{index}: left running: {err}"),
            }
        }
        assists
    }

    /// Runs the VM (starting it if need be) until it ends, then stops every vCPU.
    pub fn run(mut self) -> Result<RunOutcome, VmmError> {
        self.start()?;
        let exit = loop {
            self.event_manager.run().map_err(VmmError::EventLoop)?;
            let mut handler = self
                .exit_handler
                .lock()
                .expect("the exit handler never panics while locked");
            if let Some(exit) = handler.result.take() {
                break exit;
            }
        };

        let assists = self.stop_vcpus();
        Ok(RunOutcome { exit, assists })
    }
}

impl Drop for Vmm {
    /// A VM dropped while started (its owner gave up, a test failed) stops its vCPUs rather
    /// than leave them running.
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_order_and_host_measures() {
        let mut config = VmConfig::new("/k".into());
        config.cmdline = "hull.poweroff=ready".into();
        let devices = vec!["virtio_mmio.device=4K@0xd0000000:5".to_owned()];
        let line = kernel_cmdline(&config, KvmKind::Pvm, &devices)
            .unwrap()
            .as_cstring()
            .unwrap()
            .into_string()
            .unwrap();
        assert_eq!(
            line,
            "console=ttyS0 8250.nr_uarts=1 reboot=k panic=1 quiet \
             clearcpuid=smap,popcnt,cx16 hull_pvm_syscall \
             virtio_mmio.device=4K@0xd0000000:5 hull.poweroff=ready"
        );
        config.boot_messages = true;
        config.cmdline.clear();
        let line = kernel_cmdline(&config, KvmKind::Hardware, &[])
            .unwrap()
            .as_cstring()
            .unwrap()
            .into_string()
            .unwrap();
        assert_eq!(line, BASE_CMDLINE);
    }

    #[test]
    fn overlong_cmdline_is_an_error() {
        let mut config = VmConfig::new("/k".into());
        config.cmdline = "x".repeat(4096);
        let err = kernel_cmdline(&config, KvmKind::Hardware, &[]).unwrap_err();
        assert!(err.to_string().contains("command line"), "{err}");
    }
}
