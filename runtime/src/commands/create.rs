//! `hull create`: starts the container's `hull-vmm`, waits until the agent has created the
//! container in the guest, runs the createRuntime and prestart hooks, and records the state.
//!
//! In named steps, each of which undoes its own work if a later one fails: [`check`] reads
//! and checks the bundle (nothing to undo), [`make_state_dir`] makes the state directory
//! (removed unless kept), [`write_vm_files`] writes `vm.json` and `container.json` into it,
//! [`spawn_and_wait`] starts hull-vmm and reads its report (killed unless kept), [`record`]
//! runs the hooks and writes `state.json` and the pid file. The caller keeps the result with
//! [`Created::keep`]; dropped before, everything is undone.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context};
use hull_contract::vm::{NetNamespace, VmConfig};
use hull_contract::{ContainerConfig, CreateReport};
use hull_protocol::{CreateContainer, Rootfs};

use super::Global;
use crate::cgroup::{Limits, VmCgroup};
use crate::container::{proc_stat, write_atomic, Container, Saved, Status};
use crate::forward::{Forwarder, Target};
use crate::hooks::Hooks;
use crate::spec::{BundleSpec, VmPaths, ROOTFS_TAG};
use crate::state::StateDir;

/// Bytes of hull-vmm's log quoted in an error.
const TAIL_BYTES: u64 = 2048;

/// The flags `create` and `run` share.
#[derive(clap::Args, Clone)]
pub struct CreateArgs {
    /// The bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write hull-vmm's pid (the container's init on the host) to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// With `process.terminal`: a Unix socket to send the pty master to.
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Pass this many extra descriptors (refused when not 0: they cannot enter a VM).
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    /// Accepted for runc compatibility (the guest has no pivot_root to skip).
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
    /// Boot the guest kernel instead of restoring the VM from its template (also with
    /// HULL_COLD_BOOT=1).
    #[arg(long = "cold-boot")]
    cold_boot: bool,
    /// Make a pod VM: the sandbox of a Kubernetes pod, whose containers
    /// containerd-shim-hull-v2 then makes in it (the spec's process is not run).
    #[arg(long)]
    pod: bool,
    /// The container id, unique under --root.
    id: String,
}

impl CreateArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        let forwarder = Forwarder::start().context("cannot set up signal forwarding")?;
        create(&self.options(global, false), &forwarder)?.keep();
        Ok(0)
    }

    /// What `create` (and `run`, `attached` in the foreground) are asked.
    pub fn options(&self, global: &Global, attached: bool) -> CreateOptions {
        let _ = (self.no_pivot, self.no_new_keyring);
        CreateOptions {
            root: global.root.clone(),
            bundle: self.bundle.clone(),
            id: self.id.clone(),
            pid_file: self.pid_file.clone(),
            console_socket: self.console_socket.clone(),
            preserve_fds: self.preserve_fds,
            debug: global.debug,
            systemd_cgroup: global.systemd_cgroup,
            attached,
            cold_boot: self.cold_boot || crate::template::cold_by_environment(),
            pod: self.pod,
        }
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
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    /// `hull run` in the foreground: hull-vmm dies with hull.
    pub attached: bool,
    /// Boot the kernel rather than restore the VM from its template.
    pub cold_boot: bool,
    /// A pod VM (`--pod`).
    pub pod: bool,
}

/// A created container whose hull-vmm is hull's child.
pub struct Created {
    pub container: Container,
    pub vmm: Child,
    /// Removes the state if dropped before [`Created::keep`].
    state: Option<StateDir>,
    /// Removes hull-vmm's cgroup if dropped before [`Created::keep`].
    cgroup: CgroupGuard,
}

/// A VM's host cgroup, removed when dropped unless kept (a failed `create` leaves none).
struct CgroupGuard(Option<VmCgroup>);

impl CgroupGuard {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cgroup) = self.0.take() {
            cgroup.remove();
        }
    }
}

impl Created {
    /// Keeps the container (and leaves hull-vmm running) when hull exits.
    pub fn keep(mut self) {
        if let Some(state) = self.state.take() {
            state.keep();
        }
        std::mem::replace(&mut self.cgroup, CgroupGuard(None)).keep();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.state.is_some() {
            // A namespace of the spec's outlives the container: the mirroring goes first.
            if let Some(crate::network::Namespace::Path(path)) = &self.container.saved.network {
                if let Ok(netns) = File::open(path) {
                    if let Err(err) =
                        crate::network::unmirror(&netns, &self.container.saved.mirrored)
                    {
                        log::warn!("{err:#}");
                    }
                }
            }
            // Not kept: the container must not outlive the failure (its cgroup goes after it).
            let _ = self.vmm.kill();
            let _ = self.vmm.wait();
            if let Some(cgroup) = self.cgroup.0.take() {
                cgroup.remove();
            }
        }
    }
}

/// Creates the container (see the module comment for the steps).
pub fn create(opts: &CreateOptions, forwarder: &Forwarder) -> anyhow::Result<Created> {
    // Makes its VM while the bundle is read (killed if anything below fails).
    let mut standby = match opts.cold_boot {
        true => None,
        false => Standby::start(&opts.root.join(&opts.id), opts.debug, opts.attached),
    };
    let checked = check(opts)?;
    if let Some(signal) = forwarder.interrupted() {
        bail!("interrupted by signal {signal} before the container was created");
    }
    let state = make_state_dir(opts, &checked)?;
    let config = write_vm_files(opts, &checked, &state)?;
    let limits = Limits::for_vm(
        &checked.spec.spec,
        &checked.spec.config_path,
        u64::from(config.mem_size_mib),
        u64::from(config.vcpus),
    )?;
    let cgroup = CgroupGuard(VmCgroup::create(&checked.cgroup_path, &limits)?);
    let chosen_at = SystemTime::now();
    let template = match opts.cold_boot {
        true => None,
        false => find_template(&config, &checked, None),
    };
    let mut spawn = |template: Option<&Path>| {
        spawn_and_wait(
            opts,
            &checked,
            &state,
            cgroup.0.as_ref(),
            forwarder,
            template,
            standby.take(),
        )
    };
    let vmm = match spawn(template.as_deref())? {
        Ok(vmm) => vmm,
        // hull-vmm refused the template: rebuilt once; if it refuses that one too, the fault
        // is not the template's, and the VM boots cold.
        Err(why) => {
            let stale = crate::template::Stale {
                why: &why,
                chosen_at,
            };
            let rebuilt = find_template(&config, &checked, Some(stale));
            match spawn(rebuilt.as_deref())? {
                Ok(vmm) => vmm,
                Err(again) => {
                    eprintln!(
                        "hull: warning: booting cold: the rebuilt VM template cannot be \
                         restored either: {again}"
                    );
                    spawn(None)?.map_err(|why| {
                        anyhow::anyhow!("cannot create container {}: {why}", opts.id)
                    })?
                }
            }
        }
    };
    record(opts, &checked, state, cgroup, vmm)
}

/// The template to restore a VM like `config` from, built on first use; `stale` is why
/// hull-vmm refused the one there. If it cannot be had, the VM boots cold and a warning says
/// why (a cache that is not writable, a full disk).
fn find_template(
    config: &VmConfig,
    checked: &Checked,
    stale: Option<crate::template::Stale<'_>>,
) -> Option<PathBuf> {
    let cache = crate::template::cache_dir();
    match crate::template::ensure(config, &checked.vmm_bin, &cache, stale) {
        Ok(template) => {
            log::debug!(
                "restoring from VM template {}{}",
                template.dir.display(),
                if template.built { " (built now)" } else { "" }
            );
            Some(template.dir)
        }
        Err(err) => {
            eprintln!("hull: warning: booting cold, no VM template: {err:#}");
            None
        }
    }
}

/// What the bundle asks, checked, and where hull's own files are.
struct Checked {
    bundle: PathBuf,
    spec: BundleSpec,
    hooks: Hooks,
    console_socket: Option<PathBuf>,
    kernel: PathBuf,
    initramfs: PathBuf,
    vmm_bin: PathBuf,
    /// hull-vmm's cgroup, below the cgroup root.
    cgroup_path: PathBuf,
}

/// Step 1: reads and checks the bundle and the flags; finds the guest and hull-vmm.
fn check(opts: &CreateOptions) -> anyhow::Result<Checked> {
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
    let cgroup_path =
        crate::cgroup::relative_path(&spec.spec, &spec.config_path, &opts.id, opts.systemd_cgroup)?;
    let (kernel, initramfs) = crate::paths::guest_files()?;
    let vmm_bin = crate::paths::vmm_binary()?;
    Ok(Checked {
        cgroup_path,
        bundle,
        spec,
        hooks,
        console_socket,
        kernel,
        initramfs,
        vmm_bin,
    })
}

/// Step 2: the state directory (removed when dropped unkept), and, for a read-only rootfs,
/// the mount points the guest could not make in it.
fn make_state_dir(opts: &CreateOptions, checked: &Checked) -> anyhow::Result<StateDir> {
    let state = StateDir::create(&opts.root, &opts.id)?;
    let spec = &checked.spec;
    // The binds share, with the mount point of each bind: what hull-vmm binds there in its own
    // mount namespace is all the guest can reach of it. Searchable by anyone, so that a
    // container whose root is a mapped id (a user namespace) reaches its binds: each keeps its
    // own owner and mode.
    if opts.pod {
        crate::state::share_pod(state.path())?;
    }
    let binds = state.binds();
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&binds)
        .with_context(|| format!("cannot make {}", binds.display()))?;
    for bind in &spec.binds {
        let point = binds.join(&bind.name);
        let made = if bind.source.is_dir() {
            std::fs::DirBuilder::new().mode(0o700).create(&point)
        } else {
            std::fs::File::create(&point).map(drop)
        };
        made.with_context(|| format!("cannot make the mount point {}", point.display()))?;
    }
    if spec.readonly && !opts.pod {
        // The guest cannot make mount points in a read-only share: make them here, as runc
        // does before it remounts the root read-only. (A pod VM runs nothing of its bundle:
        // its sandbox's rootfs is left as it is.)
        let mounts = crate::mountpoints::spec_mounts(&spec.spec, &spec.config_path)?;
        let points =
            crate::mountpoints::plan(&mounts, |source| checked.bundle.join(source).is_file());
        let made = crate::mountpoints::prepare(&spec.rootfs, &points)?;
        if !made.is_empty() {
            log::debug!("made mount points in the read-only rootfs: {made:?}");
        }
    }
    Ok(state)
}

/// Step 3: `vm.json` and `container.json` in the state directory; returns the VM's
/// configuration.
fn write_vm_files(
    opts: &CreateOptions,
    checked: &Checked,
    state: &StateDir,
) -> anyhow::Result<VmConfig> {
    let spec = &checked.spec;
    let paths = VmPaths {
        kernel: checked.kernel.clone(),
        initramfs: checked.initramfs.clone(),
        console: state.console(),
        vsock_uds: state.vsock(),
        binds_dir: state.binds(),
    };
    let max_vcpus = host_max_vcpus();
    let mut config = spec.vm_config(&paths, max_vcpus);
    if opts.pod {
        let size = crate::spec::pod_size(&spec.spec, &spec.config_path)?;
        config.vcpus = size.vcpus.clamp(1, max_vcpus.max(1));
        config.mem_size_mib = size.mem_size_mib;
        config.shared_dirs = vec![hull_contract::vm::SharedDirConfig {
            tag: hull_protocol::POD_FS_TAG.to_owned(),
            path: state.path().join(crate::state::POD_SHARE),
            read_only: false,
            binds: Vec::new(),
        }];
    }
    config
        .validate(usize::from(max_vcpus))
        .with_context(|| format!("VM configuration for {}", spec.config_path.display()))?;
    write_atomic(
        &state.vm_config(),
        &serde_json::to_vec_pretty(&config).expect("a VmConfig serializes"),
    )?;
    let container_config = ContainerConfig {
        create: (!opts.pod).then(|| CreateContainer {
            container_id: opts.id.clone(),
            spec: spec.container.clone(),
            rootfs: Rootfs {
                fs_tag: ROOTFS_TAG.to_owned(),
                readonly: spec.readonly,
                subdir: None,
            },
            stdio: spec.stdio(),
            binds_fs_tag: (!spec.binds.is_empty()).then(|| hull_protocol::BINDS_FS_TAG.to_owned()),
            pod: false,
        }),
        control_socket: state.path().join("control.sock"),
        console_socket: checked.console_socket.clone(),
    };
    let container_path = state.path().join(crate::state::CONTAINER_CONFIG);
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
    Ok(config)
}

/// Step 4: starts hull-vmm (restoring from `template` if given), points signal forwarding at
/// it, and waits for its report that the container exists in the guest; kills it if the report
/// says otherwise or never comes. `Ok(Err(why))`: hull-vmm could not use the template.
fn spawn_and_wait(
    opts: &CreateOptions,
    checked: &Checked,
    state: &StateDir,
    cgroup: Option<&VmCgroup>,
    forwarder: &Forwarder,
    template: Option<&Path>,
    standby: Option<Standby>,
) -> anyhow::Result<Result<Child, String>> {
    let t_spawn = Instant::now();
    let args = vmm_args(state.path(), opts.debug);
    let taken = standby.and_then(|standby| standby.go(&checked.vmm_bin, &args, template));
    let (mut vmm, sync_read) = match taken {
        Some(taken) => taken,
        None => {
            let (sync_read, sync_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .context("cannot make the sync pipe")?;
            let mut all = Vec::new();
            if let Some(dir) = template {
                all.extend(["--restore".into(), dir.into()]);
            }
            all.extend(args);
            let vmm = spawn_vmm(&checked.vmm_bin, &all, sync_write, opts.attached)?;
            (vmm, sync_read)
        }
    };
    let pid = vmm.id() as i32;
    forwarder.set_target(Target::Vmm(pid));
    log::debug!("started {} (pid {pid})", checked.vmm_bin.display());
    if let Some(cgroup) = cgroup {
        if let Err(err) = cgroup.add(pid) {
            let _ = vmm.kill();
            let _ = vmm.wait();
            return Err(err.context(format!("cannot create container {}", opts.id)));
        }
    }
    let report = read_report(sync_read);
    let t_created = Instant::now();
    match report {
        Some(CreateReport::Created) => {}
        Some(CreateReport::BadSnapshot(why)) => {
            let _ = vmm.kill();
            let _ = vmm.wait();
            return Ok(Err(why));
        }
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
                describe_end(&mut vmm, &state.vmm_log())
            );
        }
    }
    log::debug!(
        "timings (ms): hull-vmm start to container created {}{}",
        t_created.duration_since(t_spawn).as_millis(),
        if template.is_some() {
            " (restored from the VM template)"
        } else {
            " (cold boot)"
        }
    );
    Ok(Ok(vmm))
}

/// How a hull-vmm that gave no report ended, with the end of its log.
fn describe_end(vmm: &mut Child, vmm_log: &Path) -> String {
    let mut text = String::new();
    if let Ok(Some(status)) = vmm.try_wait() {
        text.push_str(&format!("\nhull-vmm: {status}"));
    }
    let tail = hull_contract::tail(vmm_log, TAIL_BYTES);
    if !tail.trim().is_empty() {
        text.push_str(&format!(
            "\n--- hull-vmm log ({}) ---\n{}",
            vmm_log.display(),
            tail.trim_end()
        ));
    }
    text
}

/// Step 5: the createRuntime and prestart hooks, `state.json` and the pid file.
fn record(
    opts: &CreateOptions,
    checked: &Checked,
    state: StateDir,
    cgroup: CgroupGuard,
    vmm: Child,
) -> anyhow::Result<Created> {
    let spec = &checked.spec;
    let pid = vmm.id() as i32;
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
            bundle: checked.bundle.clone(),
            rootfs: spec.rootfs.clone(),
            created: crate::logger::rfc3339(SystemTime::now()),
            started: false,
            annotations,
            hooks: spec.spec.get("hooks").cloned().unwrap_or_default(),
            cgroup: cgroup.0.clone(),
            network: Some(crate::network::namespace_of(match &spec.netns {
                NetNamespace::Path(path) => Some(path),
                NetNamespace::New => None,
            })),
            mirrored: Vec::new(),
            pod: opts.pod,
        },
    };
    let mut created = Created {
        container,
        vmm,
        state: Some(state),
        cgroup,
    };
    let state_doc = created.container.hook_state(Status::Created);
    crate::hooks::run_hooks("createRuntime", &checked.hooks.create_runtime, &state_doc)?;
    crate::hooks::run_hooks("prestart", &checked.hooks.prestart, &state_doc)?;
    // After the hooks, which may have added interfaces (Docker's does).
    created.container.sync_network()?;
    if let (true, Some(hostname)) = (opts.pod, &spec.container.hostname) {
        created
            .container
            .client()?
            .request(
                hull_protocol::RequestBody::SetHostname {
                    hostname: hostname.clone(),
                },
                Some(crate::container::REQUEST_DEADLINE),
            )
            .with_context(|| format!("cannot set the pod's host name {hostname:?}"))?;
    }
    created.container.save()?;
    if let Some(path) = &opts.pid_file {
        write_atomic(path, pid.to_string().as_bytes())
            .with_context(|| format!("--pid-file {}", path.display()))?;
    }
    Ok(created)
}

/// hull-vmm's arguments for the container whose state directory is `dir` (but `--restore`):
/// the VM and container files, the sync descriptor 3, its log, its jail.
fn vmm_args(dir: &Path, debug: bool) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--config".into(),
        dir.join(crate::state::VM_CONFIG).into(),
        "--container".into(),
        dir.join(crate::state::CONTAINER_CONFIG).into(),
        "--sync-fd".into(),
        "3".into(),
        "--log-file".into(),
        dir.join(crate::state::VMM_LOG).into(),
        "--jail".into(),
        dir.join(crate::state::JAIL).into(),
    ];
    if debug {
        args.extend(["--log-level".into(), "info".into()]);
    }
    args
}

/// Starts `hull-vmm` with `args` in a session of its own (so that a terminal's signals reach
/// `hull`, and a host pty can be its controlling terminal) with hull's standard streams and
/// `sync` as descriptor 3.
fn spawn_vmm(
    vmm_bin: &Path,
    args: &[std::ffi::OsString],
    sync: OwnedFd,
    attached: bool,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(vmm_bin);
    cmd.args(args)
        .stdin(Stdio::inherit())
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

/// A hull-vmm started before the bundle is read (`hull-vmm --standby`, with the container's
/// arguments but `--restore`, so that `ps` shows whose it is): it makes its VM (KVM,
/// interrupt controllers, memory slots; 6-11 ms on a PVM host) while hull checks the bundle,
/// then reads on descriptor 3 whether to restore and from where; descriptor 3 then carries its
/// report, as the sync pipe does otherwise. Dropped unused, it is killed and reaped; it has
/// touched nothing by then.
struct Standby {
    vmm: Option<Child>,
    vmm_bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    channel: OwnedFd,
}

impl Standby {
    /// For the container whose state directory will be `dir`. `None` (and the usual start
    /// later) if hull-vmm is not found or cannot be started.
    fn start(dir: &Path, debug: bool, attached: bool) -> Option<Self> {
        let vmm_bin = crate::paths::vmm_binary().ok()?;
        let (channel, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .ok()?;
        let args = vmm_args(dir, debug);
        let mut all = vec!["--standby".into(), "3".into()];
        all.extend(args.iter().cloned());
        let vmm = spawn_vmm(&vmm_bin, &all, theirs, attached)
            .map_err(|e| log::debug!("no standby hull-vmm: {e:#}"))
            .ok()?;
        Some(Self {
            vmm: Some(vmm),
            vmm_bin,
            args,
            channel,
        })
    }

    /// Tells the standby hull-vmm to restore from `template` (or boot cold); returns it and its
    /// sync channel. `None` (and the standby killed) if it is not the hull-vmm or the
    /// arguments hull would start now, if `template` is not UTF-8, or if it is gone.
    fn go(
        mut self,
        vmm_bin: &Path,
        args: &[std::ffi::OsString],
        template: Option<&Path>,
    ) -> Option<(Child, OwnedFd)> {
        if self.vmm_bin != vmm_bin || self.args != args {
            return None;
        }
        let restore = match template {
            Some(dir) => Some(dir.to_str()?),
            None => None,
        };
        let mut line = serde_json::to_vec(&serde_json::json!({ "restore": restore }))
            .expect("a JSON value serializes");
        line.push(b'\n');
        let mut channel = File::from(self.channel.try_clone().ok()?);
        if let Err(e) = std::io::Write::write_all(&mut channel, &line) {
            log::debug!("the standby hull-vmm is gone ({e}); starting another");
            return None;
        }
        let vmm = self.vmm.take()?;
        Some((vmm, OwnedFd::from(channel)))
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if let Some(mut vmm) = self.vmm.take() {
            let _ = vmm.kill();
            let _ = vmm.wait();
        }
    }
}

/// Reads the one report line of hull-vmm (or of `exec --detach`'s background copy); `None` if
/// it ended without one.
pub(super) fn read_report(sync: OwnedFd) -> Option<CreateReport> {
    // hull-vmm has deadlines of its own for every step; a signal to hull kills it.
    let mut line = String::new();
    let mut reader = BufReader::new(File::from(sync));
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => serde_json::from_str(line.trim_end()).ok(),
        _ => None,
    }
}

/// How many vCPUs a VM may have here: the host's CPUs, and a `u8`. KVM's own limit, which is
/// at least the host's CPUs, hull-vmm checks (it is the process that opens `/dev/kvm`).
fn host_max_vcpus() -> u8 {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    cpus.clamp(1, usize::from(u8::MAX)) as u8
}
