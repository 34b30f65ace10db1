//! A container's life on the host: `create` starts its `hull-vmm` and waits for the container
//! to be created in the guest; the other commands find it by its state (`state.json`) and talk
//! to its `hull-vmm` over the control socket (`vmm::container::control`).
//!
//! `state.json` records what `hull` needs later: the VMM's pid and start time (so a reused pid
//! is never mistaken for the container), the bundle, whether `start` has run, and the spec's
//! hooks (poststop runs at `delete`). The status is derived: `stopped` once the VMM is gone
//! (or a zombie), else `created` or `running` as recorded.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use hull_protocol::{CreateContainer, ProcessRef, RequestBody, ResponseBody, Rootfs};
use serde::{Deserialize, Serialize};
use vmm::container::control::Client;
use vmm::container::{ContainerConfig, CreateReport};

use crate::spec::{BundleSpec, VmPaths, ROOTFS_TAG};
use crate::state::StateDir;

/// The OCI runtime spec version hull's state documents follow.
pub const OCI_VERSION: &str = "1.0.2";
/// For `start_container` and other requests to be answered.
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
/// For a killed hull-vmm to be gone.
const KILL_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes of hull-vmm's log quoted in an error.
const TAIL_BYTES: u64 = 2048;

/// What `state.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub id: String,
    /// hull-vmm's pid: the container's init as the host sees it.
    pub pid: i32,
    /// Its start time (`/proc/PID/stat` field 22), to tell a reused pid apart.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, UTC.
    pub created: String,
    /// Whether `start` has succeeded.
    pub started: bool,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The spec's `hooks` object (poststop runs at `delete`).
    #[serde(default)]
    pub hooks: serde_json::Value,
}

/// A container's status, as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

/// A container found under `--root`.
#[derive(Debug)]
pub struct Container {
    pub dir: PathBuf,
    pub saved: Saved,
}

impl Container {
    /// Loads `<root>/<id>/state.json`.
    pub fn load(root: &Path, id: &str) -> anyhow::Result<Self> {
        crate::state::validate_id(id)?;
        let dir = root.join(id);
        let path = dir.join("state.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {id} does not exist (no {})", path.display())
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let saved = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed state", path.display()))?;
        Ok(Self { dir, saved })
    }

    /// Every container under `root`, by id.
    pub fn list(root: &Path) -> anyhow::Result<Vec<Self>> {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", root.display())),
        };
        let mut containers = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("state.json").is_file() {
                match Self::load(root, &name) {
                    Ok(c) => containers.push(c),
                    Err(err) => log::warn!("{err:#}"),
                }
            }
        }
        containers.sort_by(|a, b| a.saved.id.cmp(&b.saved.id));
        Ok(containers)
    }

    pub fn status(&self) -> Status {
        if !process_alive(self.saved.pid, self.saved.pid_start) {
            Status::Stopped
        } else if self.saved.started {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// runc's state document.
    pub fn state_json(&self) -> serde_json::Value {
        let status = self.status();
        serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.saved.id,
            "pid": if status == Status::Stopped { 0 } else { self.saved.pid },
            "status": status.as_str(),
            "bundle": self.saved.bundle,
            "rootfs": self.saved.rootfs,
            "created": self.saved.created,
            "owner": "",
            "annotations": self.saved.annotations,
        })
    }

    /// The state the hooks get on standard input (the OCI runtime spec's `state`).
    pub fn hook_state(&self, status: Status) -> Vec<u8> {
        let mut state = serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.saved.id,
            "status": status.as_str(),
            "bundle": self.saved.bundle,
            "annotations": self.saved.annotations,
        });
        if status != Status::Stopped {
            state["pid"] = self.saved.pid.into();
        }
        serde_json::to_vec(&state).expect("a state serializes")
    }

    /// The spec's hooks, as recorded at `create`.
    fn hooks(&self) -> anyhow::Result<crate::hooks::Hooks> {
        let spec = serde_json::json!({ "hooks": self.saved.hooks });
        Ok(crate::hooks::parse_hooks(
            &spec,
            &self.dir.join("state.json"),
        )?)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// A connection to the container's hull-vmm.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::connect(&self.control_socket())
            .with_context(|| format!("cannot reach container {}", self.saved.id))
    }

    /// Rewrites `state.json` (atomically: a new file renamed over the old one).
    pub fn save(&self) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(&self.saved).expect("a state serializes"),
        )
    }

    /// `hull start`.
    pub fn start(&mut self) -> anyhow::Result<()> {
        match self.status() {
            Status::Created => {}
            Status::Running => bail!(
                "cannot start an already running container {}",
                self.saved.id
            ),
            Status::Stopped => bail!(
                "cannot start a container that has stopped: {}",
                self.saved.id
            ),
        }
        let answer = self
            .client()?
            .request(RequestBody::StartContainer, Some(REQUEST_DEADLINE))
            .with_context(|| format!("cannot start container {}", self.saved.id))?;
        if let ResponseBody::Started { pid } = answer {
            log::debug!(
                "container {} started: pid {pid} in the guest",
                self.saved.id
            );
        }
        self.saved.started = true;
        self.save()?;
        let hooks = self.hooks()?;
        if let Err(err) = crate::hooks::run_hooks(
            "poststart",
            &hooks.poststart,
            &self.hook_state(Status::Running),
        ) {
            log::warn!("{err:#}");
        }
        Ok(())
    }

    /// `hull kill`: `SIGKILL` to the init ends the VM (hull-vmm itself is killed); other
    /// signals, and `--all`, go to the guest.
    pub fn kill(&self, signal: i32, all: bool) -> anyhow::Result<()> {
        if self.status() == Status::Stopped {
            bail!("container {} is not running", self.saved.id);
        }
        if signal == libc::SIGKILL && !all {
            return self.kill_vmm();
        }
        self.client()?
            .request(
                RequestBody::Signal {
                    process: ProcessRef::Init,
                    signal,
                    all,
                },
                Some(REQUEST_DEADLINE),
            )
            .with_context(|| format!("cannot signal container {}", self.saved.id))?;
        Ok(())
    }

    /// Kills hull-vmm (if it is still the process recorded) and waits until it is gone.
    fn kill_vmm(&self) -> anyhow::Result<()> {
        let (pid, start) = (self.saved.pid, self.saved.pid_start);
        if !process_alive(pid, start) {
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            .with_context(|| format!("cannot kill hull-vmm (pid {pid})"))?;
        let end = Instant::now() + KILL_DEADLINE;
        while process_alive(pid, start) {
            if Instant::now() >= end {
                bail!(
                    "hull-vmm (pid {pid}) is still alive {} s after SIGKILL",
                    KILL_DEADLINE.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// `hull delete`: a stopped container, or any with `force` (its VM is killed). Runs the
    /// poststop hooks, then removes the state.
    pub fn delete(&self, force: bool) -> anyhow::Result<()> {
        let status = self.status();
        if status != Status::Stopped {
            if !force {
                bail!(
                    "cannot delete container {} that is not stopped: {}",
                    self.saved.id,
                    status.as_str()
                );
            }
            self.kill_vmm()?;
        }
        let poststop = self.hooks().map(|h| h.poststop).unwrap_or_default();
        if let Err(err) =
            crate::hooks::run_hooks("poststop", &poststop, &self.hook_state(Status::Stopped))
        {
            log::warn!("{err:#}");
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("cannot remove {}", self.dir.display()))
    }
}

/// Whether `pid` is alive (not a zombie) and is the process that started at `start`.
pub fn process_alive(pid: i32, start: u64) -> bool {
    match proc_stat(pid) {
        Some((state, started)) => state != 'Z' && state != 'X' && started == start,
        None => false,
    }
}

/// A process's state letter and start time, from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the whole line is the 20th after the name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The hull-vmm this command started, for signal forwarding (0: none yet).
static VMM_PID: AtomicI32 = AtomicI32::new(0);
/// A signal that arrived before hull-vmm existed (0: none), delivered once it does.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Passes a signal hull received to the hull-vmm this command started; one that arrives
/// before hull-vmm exists is delivered right after it is started (so that it ends the VM and
/// `create` cleans up, rather than hull dying with the state half made).
pub fn forward_signal(signal: i32) {
    let kill = |pid: i32, signal: i32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::try_from(signal).ok(),
        );
    };
    let pid = VMM_PID.load(Ordering::Acquire);
    if pid > 0 {
        return kill(pid, signal);
    }
    PENDING_SIGNAL.store(signal, Ordering::Release);
    // hull-vmm may have started meanwhile: whoever takes the pending signal delivers it.
    let pid = VMM_PID.load(Ordering::Acquire);
    if pid > 0 && PENDING_SIGNAL.swap(0, Ordering::AcqRel) == signal {
        kill(pid, signal);
    }
}

/// Records the hull-vmm just started and delivers a signal that came before it.
fn vmm_started(pid: i32) {
    VMM_PID.store(pid, Ordering::Release);
    let pending = PENDING_SIGNAL.swap(0, Ordering::AcqRel);
    if pending > 0 {
        log::debug!("signal {pending} arrived before hull-vmm started; passing it on");
        forward_signal(pending);
    }
}

/// Whether a signal arrived before any hull-vmm was started.
fn interrupted() -> Option<i32> {
    match PENDING_SIGNAL.load(Ordering::Acquire) {
        0 => None,
        signal => Some(signal),
    }
}

/// What `create` (and `run`) are asked.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub id: String,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub preserve_fds: u32,
    pub debug: bool,
    /// `hull run` in the foreground: hull-vmm dies with hull.
    pub attached: bool,
}

/// A created container whose hull-vmm is hull's child.
pub struct Created {
    pub container: Container,
    pub vmm: Child,
    /// Removes the state if dropped before [`Created::keep`].
    state: Option<StateDir>,
}

impl Created {
    /// Keeps the container (and leaves hull-vmm running) when hull exits.
    pub fn keep(mut self) {
        if let Some(state) = self.state.take() {
            state.keep();
        }
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.state.is_some() {
            // Not kept: the container must not outlive the failure.
            let _ = self.vmm.kill();
            let _ = self.vmm.wait();
        }
    }
}

/// `hull create`: starts hull-vmm, waits until the agent has created the container, runs the
/// createRuntime and prestart hooks, writes `state.json` and the pid file.
pub fn create(opts: &CreateOptions) -> anyhow::Result<Created> {
    crate::state::validate_id(&opts.id)?;
    if opts.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: passing file descriptors into a micro-VM is not supported",
            opts.preserve_fds
        );
    }
    let bundle = opts
        .bundle
        .canonicalize()
        .with_context(|| format!("bundle {}", opts.bundle.display()))?;
    let spec = BundleSpec::load(&bundle)?;
    let hooks = crate::hooks::parse_hooks(&spec.spec, &spec.config_path)?;
    for (kind, list) in [
        ("createContainer", &hooks.create_container),
        ("startContainer", &hooks.start_container),
    ] {
        if !list.is_empty() {
            bail!(
                "{}: field `hooks.{kind}`: hooks in the container's namespaces would run inside \
                 the micro-VM, which hull does not support",
                spec.config_path.display()
            );
        }
    }
    let console_socket = match (spec.terminal, &opts.console_socket) {
        (true, None) => bail!(
            "{}: field `process.terminal` = true needs --console-socket",
            spec.config_path.display()
        ),
        (true, Some(path)) => Some(path.clone()),
        (false, Some(_)) => {
            log::warn!("--console-socket ignored: the container has no terminal");
            None
        }
        (false, None) => None,
    };
    let (kernel, initramfs) = crate::paths::guest_files()?;
    let vmm_bin = crate::paths::vmm_binary()?;

    if let Some(signal) = interrupted() {
        bail!("interrupted by signal {signal} before the container was created");
    }
    let state = StateDir::create(&opts.root, &opts.id)?;
    if spec.readonly {
        // The guest cannot make mount points in a read-only share: make them here, as runc
        // does before it remounts the root read-only.
        let mounts = crate::mountpoints::spec_mounts(&spec.spec, &spec.config_path)?;
        let points = crate::mountpoints::plan(&mounts, |source| bundle.join(source).is_file());
        let made = crate::mountpoints::prepare(&spec.rootfs, &points)?;
        if !made.is_empty() {
            log::debug!("made mount points in the read-only rootfs: {made:?}");
        }
    }
    let paths = VmPaths {
        kernel,
        initramfs,
        console: state.console(),
        vsock_uds: state.vsock(),
    };
    let max_vcpus = host_max_vcpus();
    let config = spec.vm_config(&paths, max_vcpus);
    config
        .validate(usize::from(max_vcpus))
        .with_context(|| format!("VM configuration for {}", spec.config_path.display()))?;
    write_atomic(
        &state.vm_config(),
        &serde_json::to_vec_pretty(&config).expect("a VmConfig serializes"),
    )?;
    let container_config = ContainerConfig {
        create: CreateContainer {
            container_id: opts.id.clone(),
            spec: spec.spec.clone(),
            rootfs: Rootfs {
                fs_tag: ROOTFS_TAG.to_owned(),
                readonly: spec.readonly,
            },
            stdio: spec.stdio(),
        },
        control_socket: state.path().join("control.sock"),
        console_socket,
    };
    let container_path = state.path().join("container.json");
    write_atomic(
        &container_path,
        &serde_json::to_vec_pretty(&container_config).expect("a ContainerConfig serializes"),
    )?;
    log::debug!(
        "container {}: {} vCPUs, {} MiB, rootfs {}{}",
        opts.id,
        config.vcpus,
        config.mem_size_mib,
        spec.rootfs.display(),
        if spec.readonly { " (read-only)" } else { "" }
    );

    let t_spawn = Instant::now();
    let (sync_read, sync_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot make the sync pipe")?;
    let mut vmm = spawn_vmm(
        &vmm_bin,
        &state,
        &container_path,
        sync_write,
        opts.debug,
        opts.attached,
    )?;
    let pid = vmm.id() as i32;
    vmm_started(pid);
    log::debug!("started {} (pid {pid})", vmm_bin.display());
    let report = read_report(sync_read);
    let t_created = Instant::now();
    let vmm_log = state.vmm_log();
    let describe = |vmm: &mut Child| {
        let mut text = String::new();
        if let Ok(Some(status)) = vmm.try_wait() {
            text.push_str(&format!("\nhull-vmm: {status}"));
        }
        let tail = vmm::container::ready::tail(&vmm_log, TAIL_BYTES);
        if !tail.trim().is_empty() {
            text.push_str(&format!(
                "\n--- hull-vmm log ({}) ---\n{}",
                vmm_log.display(),
                tail.trim_end()
            ));
        }
        text
    };
    match report {
        Some(CreateReport::Created) => {}
        Some(CreateReport::Failed(why)) => {
            let _ = vmm.kill();
            let _ = vmm.wait();
            bail!("cannot create container {}: {why}", opts.id);
        }
        None => {
            let _ = vmm.kill();
            let _ = vmm.wait();
            bail!(
                "cannot create container {}: hull-vmm ended without a report{}",
                opts.id,
                describe(&mut vmm)
            );
        }
    }
    log::debug!(
        "timings (ms): hull-vmm start to container created {}",
        t_created.duration_since(t_spawn).as_millis()
    );

    let pid_start = proc_stat(pid).map(|(_, s)| s).unwrap_or(0);
    let annotations = spec
        .spec
        .get("annotations")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    let container = Container {
        dir: state.path().to_owned(),
        saved: Saved {
            id: opts.id.clone(),
            pid,
            pid_start,
            bundle: bundle.clone(),
            rootfs: spec.rootfs.clone(),
            created: crate::logger::rfc3339(SystemTime::now()),
            started: false,
            annotations,
            hooks: spec.spec.get("hooks").cloned().unwrap_or_default(),
        },
    };
    let created = Created {
        container,
        vmm,
        state: Some(state),
    };
    let state_doc = created.container.hook_state(Status::Created);
    crate::hooks::run_hooks("createRuntime", &hooks.create_runtime, &state_doc)?;
    crate::hooks::run_hooks("prestart", &hooks.prestart, &state_doc)?;
    created.container.save()?;
    if let Some(path) = &opts.pid_file {
        write_atomic(path, pid.to_string().as_bytes())
            .with_context(|| format!("--pid-file {}", path.display()))?;
    }
    Ok(created)
}

/// Starts `hull-vmm` in a session of its own (so that a terminal's signals reach `hull`, and
/// a host pty can be its controlling terminal) with hull's standard streams, the sync pipe as
/// descriptor 3, and its log in the state directory.
fn spawn_vmm(
    vmm_bin: &Path,
    state: &StateDir,
    container: &Path,
    sync: OwnedFd,
    debug: bool,
    attached: bool,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(vmm_bin);
    cmd.arg("--config")
        .arg(state.vm_config())
        .arg("--container")
        .arg(container)
        .args(["--sync-fd", "3"])
        .arg("--log-file")
        .arg(state.vmm_log());
    if debug {
        cmd.args(["--log-level", "info"]);
    }
    cmd.stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let sync_fd = sync.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: it makes the setsid, dup2 and prctl system
    // calls and touches no memory shared with the parent. `sync_fd` stays open in the parent
    // until after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::dup2(sync_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if attached {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", vmm_bin.display()))?;
    drop(sync);
    Ok(child)
}

/// Reads hull-vmm's one report line; `None` if it ended without one.
fn read_report(sync: OwnedFd) -> Option<CreateReport> {
    // hull-vmm has deadlines of its own for every step; a signal to hull kills it.
    let mut line = String::new();
    let mut reader = BufReader::new(File::from(sync));
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => serde_json::from_str(line.trim_end()).ok(),
        _ => None,
    }
}

/// How many vCPUs a VM may have here: KVM's limit, the host's CPUs, and a `u8`.
fn host_max_vcpus() -> u8 {
    let kvm = kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus())
        .unwrap_or(1);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    kvm.min(cpus).clamp(1, usize::from(u8::MAX)) as u8
}

/// `hull ps`: the container's processes, from the guest.
pub fn processes(container: &Container) -> anyhow::Result<Vec<hull_protocol::ProcessInfo>> {
    if container.status() == Status::Stopped {
        bail!("container {} is not running", container.saved.id);
    }
    match container
        .client()?
        .request(RequestBody::ListProcesses, Some(REQUEST_DEADLINE))?
    {
        ResponseBody::Processes(list) => Ok(list),
        other => Err(anyhow!("unexpected answer to list_processes: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let (state, start) = proc_stat(pid).unwrap();
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start + 1));
        assert!(!process_alive(i32::MAX, start));
    }

    #[test]
    fn a_signal_before_hull_vmm_started_reaches_it_once_it_has() {
        use std::os::unix::process::ExitStatusExt;
        // Stands in for hull-vmm.
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(interrupted(), None);
        forward_signal(libc::SIGTERM);
        assert_eq!(interrupted(), Some(libc::SIGTERM));
        vmm_started(child.id() as i32);
        assert_eq!(interrupted(), None);
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
        VMM_PID.store(0, Ordering::Release);
    }

    #[test]
    fn a_reaped_child_is_stopped() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let start = proc_stat(pid).map(|(_, s)| s).unwrap_or(0);
        child.wait().unwrap();
        assert!(!process_alive(pid, start));
    }
}
