//! `hull-vmm`: boots one micro-VM and exits with its status.
//!
//! Exit status: 0 when the guest powers off or resets, 1 when the VM fails (triple fault, an
//! instruction nobody can emulate), 2 when it cannot be started (bad configuration, no KVM).
//!
//! With `--container FILE` hull-vmm is a container's init as the host sees it (see
//! `vmm::container`): it exits with the container's status, and 255 if the VM ended before
//! the container's process did. A panic in any of its threads ends the VM and hull-vmm with 1.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};

use clap::Parser;
use vmm::config::{ConsoleConfig, VmConfig, DEFAULT_MEM_SIZE_MIB, DEFAULT_VCPUS};
use vmm::KvmKind;

#[derive(Parser, Debug)]
#[command(name = "hull-vmm", version, about = "Boot one hull micro-VM")]
struct Args {
    /// VM configuration as a JSON file (exclusive with the flags below).
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline", "vcpus", "mem_size_mib", "console", "boot_messages", "shared_dir", "net", "vsock_uds", "vsock_cid"])]
    config: Option<PathBuf>,
    /// Uncompressed ELF vmlinux.
    #[arg(long, required_unless_present_any = ["config", "check_host"])]
    kernel: Option<PathBuf>,
    /// Uncompressed newc initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line appended to hull's own.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long = "mem-size-mib")]
    mem_size_mib: Option<u32>,
    /// Console: stdout, null or file:PATH.
    #[arg(long)]
    console: Option<ConsoleConfig>,
    /// Show the guest kernel's boot messages.
    #[arg(long)]
    boot_messages: bool,
    /// Share a host directory over virtio-fs: TAG=PATH or TAG=PATH:ro (repeatable).
    #[arg(long = "shared-dir")]
    shared_dir: Vec<vmm::config::SharedDirConfig>,
    /// Give the guest a virtio-net device on a TAP of hull-vmm's network namespace (made if
    /// missing): TAP=MAC or TAP=MAC/MTU (repeatable).
    #[arg(long = "net")]
    net: Vec<vmm::config::NetConfig>,
    /// Give the guest a virtio-vsock device backed by this Unix socket.
    #[arg(long = "vsock-uds")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long = "vsock-cid", default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,
    /// Log level: error, warn, info, debug.
    #[arg(long, default_value = "warn", value_parser = parse_level)]
    log_level: log::LevelFilter,
    /// Append log messages to this file instead of standard error.
    #[arg(long = "log-file")]
    log_file: Option<PathBuf>,
    /// Run a container (JSON: `vmm::container::ContainerConfig`); needs --config.
    #[arg(long, requires = "config")]
    container: Option<PathBuf>,
    /// With --container: the descriptor to write the creation report on, then close.
    #[arg(long = "sync-fd", requires = "container")]
    sync_fd: Option<RawFd>,
    /// Boot, wait until the guest agent is ready, write a snapshot of the VM to this
    /// directory, print what was written as JSON, and exit 0.
    #[arg(long = "snapshot-when-ready", value_name = "DIR", conflicts_with_all = ["container", "restore"])]
    snapshot_when_ready: Option<PathBuf>,
    /// Restore the VM from a snapshot directory instead of booting it; the configuration gives
    /// the console and devices and must describe the same VM (vCPUs, memory, device kinds).
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Print what this host's KVM offers hull-vmm and exit: 0 when micro-VMs can run here
    /// (`hull doctor` shows this).
    #[arg(long = "check-host", exclusive = true)]
    check_host: bool,
    /// Make a VM of the default memory size now, then wait for one line on descriptor FD, a
    /// JSON object: `{"restore": DIR}` restores from DIR into that VM (if its memory size is
    /// the configuration's), `{"restore": null}` boots cold. Nothing else is read or written
    /// before that line; FD's end without one ends hull-vmm quietly with 0. `hull create`
    /// starts hull-vmm this way before it reads the bundle, FD being its `--sync-fd`.
    #[arg(long, value_name = "FD", conflicts_with_all = ["restore", "snapshot_when_ready"])]
    standby: Option<RawFd>,
    /// Jail hull-vmm in this directory before it builds the VM (`vmm::jail`): a mount
    /// namespace holding only the files the VM uses, and only the capabilities its file server
    /// needs. The directory is made if missing and stays empty on the host.
    /// `HULL_VMM_JAIL=off` leaves it out (for measuring what it costs).
    #[arg(long, value_name = "DIR", conflicts_with = "snapshot_when_ready")]
    jail: Option<PathBuf>,
}

/// What `--standby` waits for.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StandbyGo {
    restore: Option<PathBuf>,
}

/// `--standby`: makes a VM, then reads the line that says what to do with it from `fd`.
/// `None`: the descriptor ended first. The VM is `None` if it could not be made (the restore
/// then makes its own, and reports why if it cannot either).
fn standby(
    fd: RawFd,
) -> Result<Option<(StandbyGo, Option<vmm::PreparedVm>, std::time::Duration)>, String> {
    let started = std::time::Instant::now();
    let prepared = vmm::PreparedVm::new(DEFAULT_MEM_SIZE_MIB).ok();
    let prepared_in = started.elapsed();
    // SAFETY: F_GETFD only reads the descriptor's flags; any integer is a valid argument.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--standby {fd}: not an open descriptor above 2"));
    }
    // SAFETY: the descriptor is open (checked above) and is the parent's channel to this
    // process; `ManuallyDrop` leaves it open (for `--sync-fd`, which may take it after).
    let channel = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match std::io::Read::read(&mut &*channel, &mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err("--standby: the line has no end".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("--standby: reading the line: {e}")),
        }
        if line.len() > 64 * 1024 {
            return Err("--standby: the line is longer than 64 KiB".into());
        }
    }
    let go = serde_json::from_slice(&line).map_err(|e| {
        format!(
            "--standby: {:?} is not {{\"restore\": DIR or null}}: {e}",
            String::from_utf8_lossy(&line)
        )
    })?;
    Ok(Some((go, prepared, prepared_in)))
}

/// `--check-host`: the KVM lines of `hull doctor`.
fn check_host() -> ExitCode {
    use kvm_ioctls::{Cap, Kvm};
    let mut out = std::io::stdout().lock();
    let kind = KvmKind::detect();
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(err) => {
            let _ = writeln!(out, "kvm: cannot open /dev/kvm: {err}");
            return ExitCode::FAILURE;
        }
    };
    let _ = writeln!(
        out,
        "kvm: /dev/kvm usable, API version {}",
        kvm.get_api_version()
    );
    let _ = writeln!(out, "kvm kind: {kind}");
    if let Some(warning) = kind.warning() {
        let _ = writeln!(out, "warning: {warning}");
    }
    let _ = writeln!(out, "max vCPUs per VM: {}", kvm.get_max_vcpus());
    let mut ok = true;
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Pit2, "PIT2"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
    ] {
        let present = kvm.check_extension(cap);
        ok &= present;
        let _ = writeln!(
            out,
            "capability {name}: {}",
            if present { "yes" } else { "MISSING" }
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

impl Args {
    fn into_config(self) -> Result<VmConfig, vmm::config::ConfigError> {
        if let Some(path) = &self.config {
            return VmConfig::from_file(path);
        }
        let mut config = VmConfig::new(
            self.kernel
                .expect("clap requires --kernel without --config"),
        );
        config.initramfs = self.initramfs;
        config.cmdline = self.cmdline.unwrap_or_default();
        config.vcpus = self.vcpus.unwrap_or(DEFAULT_VCPUS);
        config.mem_size_mib = self.mem_size_mib.unwrap_or(DEFAULT_MEM_SIZE_MIB);
        config.console = self.console.unwrap_or_default();
        config.boot_messages = self.boot_messages;
        config.shared_dirs = self.shared_dir;
        config.net = self.net;
        config.vsock = self.vsock_uds.map(|uds_path| vmm::config::VsockConfig {
            guest_cid: self.vsock_cid,
            uds_path,
        });
        Ok(config)
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("log level {s:?} is not one of off, error, warn, info, debug, trace"))
}

/// Where log messages go when `--log-file` is given.
static LOG_FILE: OnceLock<Mutex<hull_contract::Capped<File>>> = OnceLock::new();

/// The most `--log-file` receives from one hull-vmm: messages quote the guest (and
/// fuse-backend-rs logs guest errors at debug level), which must not fill the host's disk.
const MAX_LOG_FILE: u64 = 8 << 20;

/// Logs to standard error, or to the `--log-file`.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // fuse-backend-rs logs errors on bad guest input without any rate limit: a guest could
        // flood the VMM's log. Its messages show only when debugging.
        if metadata.target().starts_with("fuse_backend_rs")
            && log::max_level() < log::LevelFilter::Debug
        {
            return false;
        }
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // Messages quote the guest (its console, its agent's errors): printable only.
            let message = record.args().to_string();
            let line = format!(
                "hull-vmm: {}: {}\n",
                record.level().as_str().to_lowercase(),
                hull_contract::printable(&message)
            );
            match LOG_FILE.get() {
                Some(file) => {
                    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = file.write_all(line.as_bytes());
                }
                None => eprint!("{line}"),
            }
        }
    }
    fn flush(&self) {}
}

use vmm::error_chain;

/// Takes the `--sync-fd` descriptor (checking that it is open) so that it closes on exec and
/// when dropped.
fn take_sync_fd(fd: RawFd) -> Result<File, String> {
    // SAFETY: F_GETFD only reads the descriptor's flags; any integer is a valid argument.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--sync-fd {fd}: not an open descriptor above 2"));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process for it
    // alone by its parent; nothing else in hull-vmm uses it.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: F_SETFD with FD_CLOEXEC on an open descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(file)
}

/// An error before the VM runs: logged, and reported on the sync descriptor in container mode.
fn fail(sync: &mut Option<File>, message: String) -> ExitCode {
    log::error!("{message}");
    if let Some(sync) = sync {
        let report = vmm::container::CreateReport::Failed(message);
        let mut line = serde_json::to_vec(&report).expect("a CreateReport serializes");
        line.push(b'\n');
        let _ = sync.write_all(&line);
    }
    ExitCode::from(2)
}

/// How long `--snapshot-when-ready` waits for the agent (a cold boot on a PVM host takes about
/// 40 s, more when the host is busy).
const SNAPSHOT_READY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// `--snapshot-when-ready`: boots, waits for the agent's readiness line, snapshots, exits.
fn snapshot_when_ready(mut vmm: vmm::Vmm, dir: &std::path::Path) -> ExitCode {
    let started = std::time::Instant::now();
    let Some(reports) = vmm.agent_reports() else {
        log::error!("the console's agent reports are taken");
        return ExitCode::from(2);
    };
    if let Err(err) = vmm.start() {
        log::error!("{}", error_chain(&err));
        return ExitCode::from(1);
    }
    let ready = match vmm::container::ready::wait_ready(&reports, started, SNAPSHOT_READY_DEADLINE)
    {
        Ok(ready) => ready,
        Err(err) => {
            log::error!("no snapshot: {err}");
            return ExitCode::from(1);
        }
    };
    match vmm.snapshot(dir) {
        Ok(report) => {
            let line = serde_json::json!({
                "snapshot": dir,
                "boot_ms": ready.at.duration_since(started).as_millis() as u64,
                "guest_uptime_ms": ready.guest_uptime_ms,
                "state_bytes": report.state_bytes,
                "memory_bytes": report.memory.ram,
                "memory_written_bytes": report.memory.written,
                "snapshot_us": report.elapsed.as_micros() as u64,
            });
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            log::error!("{}", error_chain(&err));
            ExitCode::from(1)
        }
    }
}

/// The host paths a container's hull-vmm uses after it has jailed itself, each at the same
/// path in the jail: the directories of its files and sockets, the guest's kernel and
/// initramfs, the shared directories, the snapshot it restores, `/dev/kvm` and `/dev/urandom`.
fn jail_binds(
    config: &VmConfig,
    files: &[&std::path::Path],
    restore: Option<&std::path::Path>,
) -> std::io::Result<Vec<vmm::jail::Bind>> {
    use vmm::jail::Bind;
    // `/dev/urandom`: the seed the agent's handshake gives the guest.
    let mut binds = vec![Bind::device("/dev/kvm"), Bind::device("/dev/urandom")];
    if config.nic_slots > 0 {
        // The TAPs `hull` makes for the slots, attached by name.
        binds.push(Bind::device("/dev/net/tun"));
    }
    let mut dirs: Vec<&std::path::Path> = files.to_vec();
    if let ConsoleConfig::File(console) = &config.console {
        dirs.push(console);
    }
    if let Some(vsock) = &config.vsock {
        dirs.push(&vsock.uds_path);
    }
    for file in dirs {
        let file = std::path::absolute(file)?;
        if let Some(dir) = file.parent() {
            binds.push(Bind::writable(dir));
        }
    }
    binds.push(Bind::read_only(std::path::absolute(&config.kernel)?));
    if let Some(initramfs) = &config.initramfs {
        binds.push(Bind::read_only(std::path::absolute(initramfs)?));
    }
    for dir in &config.shared_dirs {
        let path = std::path::absolute(&dir.path)?;
        binds.push(Bind::tree(path, !dir.read_only));
    }
    if let Some(dir) = restore {
        binds.push(Bind::read_only(std::path::absolute(dir)?));
    }
    binds.extend(container_binds(config)?);
    Ok(binds)
}

/// Joins the network namespace at a path, or makes a new one: the container's. hull-vmm is
/// then the process whose `/proc/PID/ns/net` it is, as a container's init is under runc.
fn enter_netns(netns: &vmm::config::NetNamespace) -> Result<(), String> {
    use nix::sched::CloneFlags;
    match netns {
        vmm::config::NetNamespace::New => nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot make a network namespace: {e}")),
        vmm::config::NetNamespace::Path(path) => {
            let file = std::fs::File::open(path).map_err(|e| {
                format!("field `netns.path` = {:?}: {e}", path.display().to_string())
            })?;
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                format!(
                    "field `netns.path` = {:?}: cannot join it as a network namespace: {e}",
                    path.display().to_string()
                )
            })
        }
    }
}

/// Points standard input, output and error at `/dev/null`.
fn detach_stdio() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

/// The container's bind mounts: each host source onto its entry of its shared directory.
fn container_binds(config: &VmConfig) -> std::io::Result<Vec<vmm::jail::Bind>> {
    let mut binds = Vec::new();
    for dir in &config.shared_dirs {
        let path = std::path::absolute(&dir.path)?;
        for bind in &dir.binds {
            binds.push(vmm::jail::Bind::onto(
                &bind.source,
                path.join(&bind.name),
                !bind.read_only,
                bind.recursive,
            ));
        }
    }
    Ok(binds)
}

fn main() -> ExitCode {
    let mut entered = std::time::Instant::now();
    let mut args = Args::parse();
    // Nothing hull-vmm's parent left open reaches the guest's devices or the jail.
    let keep: Vec<RawFd> = [args.standby, args.sync_fd].into_iter().flatten().collect();
    if let Err(err) = vmm::jail::close_inherited(&keep) {
        eprintln!("hull-vmm: error: cannot close the descriptors it inherited: {err}");
        return ExitCode::from(2);
    }
    if let Err(err) = vmm::limits::apply() {
        eprintln!("hull-vmm: error: cannot set its resource limits: {err}");
        return ExitCode::from(2);
    }
    let mut prepared = None;
    let mut prepared_in = None;
    if let Some(fd) = args.standby {
        match standby(fd) {
            Ok(Some((go, vm, took))) => {
                args.restore = go.restore;
                prepared_in = vm.is_some().then_some(took);
                prepared = vm;
                // The snapshot is known from here on.
                entered = std::time::Instant::now();
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("hull-vmm: error: {message}");
                return ExitCode::from(2);
            }
        }
    }
    if args.check_host {
        return check_host();
    }
    log::set_max_level(args.log_level);
    let _ = log::set_logger(&Logger);
    // Before any thread starts, so that every thread inherits the mask.
    let signals = match args.container {
        Some(_) => match vmm::container::block_forwarded_signals() {
            Ok(set) => Some(set),
            Err(err) => {
                eprintln!("hull-vmm: error: cannot block the forwarded signals: {err}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if let Some(path) = &args.log_file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => {
                let _ = LOG_FILE.set(Mutex::new(hull_contract::Capped::new(
                    file,
                    MAX_LOG_FILE,
                    "hull-vmm: warn: this log is full; later messages are dropped\n",
                )));
            }
            Err(err) => {
                eprintln!(
                    "hull-vmm: error: cannot open log file {}: {err}",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    let mut sync = match args.sync_fd.map(take_sync_fd).transpose() {
        Ok(sync) => sync,
        Err(message) => return fail(&mut None, message),
    };
    let config_path = args.config.clone();
    let container_path = args.container.clone();
    let log_path = args.log_file.clone();
    let jail_dir = args.jail.clone();
    let snapshot_dir = args.snapshot_when_ready.clone();
    let restore_dir = args.restore.clone();
    let container = match args
        .container
        .as_deref()
        .map(vmm::container::ContainerConfig::from_file)
        .transpose()
    {
        Ok(container) => container,
        Err(err) => return fail(&mut sync, error_chain(&err)),
    };

    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => return fail(&mut sync, error_chain(&err)),
    };
    let kind = KvmKind::detect();
    if let Some(warning) = kind.warning() {
        log::warn!("{warning}");
    }
    let host_tty = match container.as_ref().map(vmm::container::open_host_pty) {
        Some(Ok(tty)) => tty,
        Some(Err(err)) => return fail(&mut sync, format!("{err:#}")),
        None => None,
    };
    if host_tty.is_some() {
        // With a terminal the container's streams are the pty: like runc's init, hull-vmm then
        // keeps none of its caller's. containerd's shim reads `create`'s output to its end, and
        // waited for ever on the pipe hull-vmm held (`docker run -t`).
        if let Err(err) = detach_stdio() {
            return fail(
                &mut sync,
                format!("cannot let go of its standard streams: {err}"),
            );
        }
    }
    // The TAPs are opened in the namespace hull-vmm was started in: the jail's is new and
    // empty, and an open TAP keeps its own.
    let nets = if restore_dir.is_none() {
        match vmm::open_net_devices(&config) {
            Ok(nets) => nets,
            Err(err) => return fail(&mut sync, error_chain(&err)),
        }
    } else {
        Vec::new()
    };
    // The container's network namespace, while hull-vmm has one thread (`setns` and
    // `unshare` move the calling thread alone), before the jail, which keeps it.
    if let Some(netns) = &config.netns {
        if let Err(message) = enter_netns(netns) {
            return fail(&mut sync, message);
        }
    }
    let jail_off = std::env::var_os("HULL_VMM_JAIL").is_some_and(|v| v == "off");
    if jail_dir.is_none() || jail_off {
        if jail_dir.is_some() {
            log::warn!("HULL_VMM_JAIL=off: hull-vmm is not jailed");
        }
        // As in the jail: the file server acts as the guest's users with its capabilities.
        if let Err(err) = vmm::jail::keep_capabilities_across_id_changes() {
            log::warn!("{}", error_chain(&err));
        }
        let placed = container_binds(&config)
            .map_err(|e| format!("cannot name the container's bind mounts: {e}"))
            .and_then(|binds| {
                vmm::jail::bind_in_place(&binds)
                    .map_err(|e| format!("cannot bind the container's mounts: {}", error_chain(&e)))
            });
        if let Err(message) = placed {
            return fail(&mut sync, message);
        }
    }
    if let Some(dir) = jail_dir.filter(|_| !jail_off) {
        // Read before the jail, which has no /proc/sys.
        if restore_dir.is_some() {
            let _ = vmm::snapshot::boot_id();
        }
        let files: Vec<&std::path::Path> = [&config_path, &container_path, &log_path]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
        let jailing = std::time::Instant::now();
        let entered_jail = jail_binds(&config, &files, restore_dir.as_deref())
            .map_err(|e| format!("cannot name the jail's paths: {e}"))
            .and_then(|binds| {
                vmm::jail::enter(&dir, &binds, config.netns.is_none()).map_err(|e| {
                    format!(
                        "cannot jail hull-vmm in {}: {}",
                        dir.display(),
                        error_chain(&e)
                    )
                })
            });
        if let Err(message) = entered_jail {
            return fail(&mut sync, message);
        }
        // `make bench` reads this line.
        log::info!("jailed in {} us", jailing.elapsed().as_micros());
    }
    // From here on threads are started by the spawner thread (and the jail, which needs one
    // thread, is entered).
    if let Err(err) = vmm::seccomp::Mode::from_env().and_then(vmm::seccomp::enable) {
        return fail(&mut sync, err);
    }
    let built = match &restore_dir {
        Some(dir) => vmm::restore(&config, dir, prepared),
        None => {
            drop(prepared);
            vmm::build_with_net(&config, kind, nets, Vec::new())
        }
    };
    let mut vmm = match built {
        Ok(vmm) => vmm,
        Err(err @ vmm::VmmError::Snapshot(_)) if restore_dir.is_some() => {
            let message = error_chain(&err);
            log::error!("{message}");
            if let Some(sync) = &mut sync {
                let report = vmm::container::CreateReport::BadSnapshot(message);
                let mut line = serde_json::to_vec(&report).expect("a CreateReport serializes");
                line.push(b'\n');
                let _ = sync.write_all(&line);
            }
            return ExitCode::from(2);
        }
        Err(err) => {
            let origin = config_path
                .map(|p| format!("config file {}: ", p.display()))
                .unwrap_or_default();
            return fail(&mut sync, format!("{origin}{}", error_chain(&err)));
        }
    };
    log::info!("kernel command line: {}", vmm.cmdline());
    if restore_dir.is_some() {
        if let Err(err) = vmm.start() {
            return fail(&mut sync, error_chain(&err));
        }
        // `make bench` reads this line.
        match prepared_in {
            Some(took) => log::info!(
                "restored: {} us from knowing the snapshot to the vCPUs running (the VM was \
                 made before, in {} us)",
                entered.elapsed().as_micros(),
                took.as_micros()
            ),
            None => log::info!(
                "restored: {} us from main to the vCPUs running",
                entered.elapsed().as_micros()
            ),
        }
    }
    if let Some(dir) = snapshot_dir {
        return snapshot_when_ready(vmm, &dir);
    }
    let container_status = match (container, signals) {
        (Some(container), Some(signals)) => {
            let (ConsoleConfig::File(console), Some(vsock)) = (&config.console, &config.vsock)
            else {
                return fail(
                    &mut sync,
                    "--container needs a console file and a vsock device in the VM config".into(),
                );
            };
            let Some(agent_reports) = vmm.agent_reports() else {
                return fail(&mut sync, "the console's agent reports are taken".into());
            };
            let started = vmm::container::start(
                container,
                host_tty,
                agent_reports,
                console.clone(),
                vsock.uds_path.clone(),
                signals,
                sync.take(),
                vmm.stopper(),
                vmm.nic_slots(),
            )
            .map_err(|e| format!("cannot start the container supervisor: {e}"));
            match started {
                Ok(status) => Some(status),
                Err(message) => return fail(&mut sync, message),
            }
        }
        _ => None,
    };
    // The event loop runs under its own filter. (A template's run above, `--snapshot-when-ready`,
    // runs only hull's own guest, and writes the snapshot files.)
    if let Err(err) = vmm::seccomp::Filter::Vmm.install() {
        log::error!("{err}");
        return ExitCode::from(1);
    }
    // This thread is the vmm thread: a panic in its event loop (a device's bug) ends hull-vmm
    // with the same status as a panic in any other thread (`vmm::thread`), not Rust's 101.
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vmm.run())) {
        Ok(result) => result,
        Err(payload) => {
            log::error!(
                "hull-vmm's thread `vmm` panicked: {}",
                vmm::thread::panic_message(&*payload)
            );
            return ExitCode::from(1);
        }
    };
    if let Some(status) = container_status {
        match &result {
            Ok(outcome) => log::info!("{}", outcome.exit),
            Err(err) => log::error!("{}", error_chain(err)),
        }
        if let Ok(
            outcome @ vmm::RunOutcome {
                exit: vmm::VmExit::ThreadPanicked { .. },
                ..
            },
        ) = &result
        {
            // A bug in hull-vmm, whatever the container did.
            log::error!("{}", outcome.exit);
            return ExitCode::from(1);
        }
        let status = *status.lock().unwrap_or_else(|p| p.into_inner());
        return match status {
            Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
            None => {
                if let Ok(outcome) = &result {
                    log::error!(
                        "the VM ended before the container's process: {}",
                        outcome.exit
                    );
                }
                ExitCode::from(255)
            }
        };
    }
    match result {
        Ok(outcome) => {
            let a = outcome.assists;
            log::info!(
                "{}; emulation assists: {} int3, {} fwait, {} xsave-family ({:.1} us each in the VMM)",
                outcome.exit,
                a.int3,
                a.fwait,
                a.xstate,
                a.xstate_ns as f64 / 1000.0 / a.xstate.max(1) as f64
            );
            let code = outcome.exit.exit_code();
            if code != 0 {
                log::error!("{}", outcome.exit);
            }
            ExitCode::from(code as u8)
        }
        Err(err) => {
            log::error!("{}", error_chain(&err));
            ExitCode::from(1)
        }
    }
}
