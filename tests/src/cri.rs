//! A CRI node for end-to-end tests: a private containerd 1.6 with its CRI plugin on, CNI
//! networking of the test's own, images made here, and a CRI client ([`Cri`]) that plays the
//! kubelet ([`kubelet::Pod`] says what a kubelet sends).
//!
//! [`CriNode::start`] makes, in temporary directories:
//! - two busybox images (no registry is reachable): the pod sandbox's "pause" image
//!   ([`PAUSE_IMAGE`], whose entrypoint sleeps forever), imported with `ctr -n k8s.io images
//!   import` as on an air-gapped node; and the containers' image, served by a registry on
//!   127.0.0.1 ([`crate::registry`]) so that `PullImage` pulls for real (CRI's PullImage
//!   always asks the registry, even for an image it has);
//! - the CNI network ([`cni::CniNetwork`]);
//! - containerd's config: its own root, state, socket; the CRI plugin with the sandbox image,
//!   `restrict_oom_score_adj` (this host's bounding set has no CAP_SYS_RESOURCE to lower
//!   the sandbox's score with), no AppArmor, network namespaces under its state directory,
//!   two runtime handlers: `runc` (`io.containerd.runc.v2`, runc's state in the test's
//!   directory) and `hull` (`io.containerd.hull.v2`, which containerd runs as
//!   `containerd-shim-hull-v2` from its `PATH`: the directory of the shim given to `start`
//!   comes first there), the CNI directories, and the registry's `hosts.toml` (plain HTTP).
//!
//! It checks what a pod left behind ([`CriNode::leftovers`]): shims, `hull-vmm`s, mounts,
//! network namespaces, CNI state, veths and TAPs, runc state, shim sockets, cgroups. On drop
//! it removes every pod still there and whatever containerd could not.

mod client;
pub mod cni;
pub mod kubelet;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use client::{image_spec, Cri, CriError};
pub use k8s_cri::v1 as api;

use crate::containerd::{mounts_below, signal, unmount_all, which, Containerd};
use crate::harness::{guest_artifacts, processes, workspace_bin, TempDir};
use crate::image::{write_busybox_layout, write_layout_tarball};
use crate::registry::Registry;
use cni::{CniNetwork, CNI_BIN_DIR};

/// The runtime handler of runc (containerd's runc v2 shim).
pub const RUNC_HANDLER: &str = "runc";
/// The runtime handler of hull: containerd's runtime type `io.containerd.hull.v2`.
pub const HULL_HANDLER: &str = "hull";
/// The hull shim's binary, which containerd derives from the runtime type.
pub const HULL_SHIM: &str = "containerd-shim-hull-v2";
/// The sandbox ("pause") image, imported into containerd's `k8s.io` namespace.
pub const PAUSE_IMAGE: &str = "localhost/hull-pause:test";
/// The containers' image's repository and tag in the test's registry.
pub const APP_REPOSITORY: &str = "hull/busybox:test";
/// The containerd namespace of the CRI plugin.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// For a CRI call (one that boots a micro-VM takes about a minute on a PVM host).
pub const CRI_DEADLINE: Duration = Duration::from_secs(300);
/// For what a pod leaves to go away once it is removed (shims exit, VMs power off).
pub const CLEANUP_DEADLINE: Duration = Duration::from_secs(30);
/// Where containerd 1.6 has its shims make their sockets.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// Where hull's shim keeps a pod's directory (its share and state) for the `k8s.io` namespace.
pub const HULL_POD_DIRS: &str = "/run/hull/cri/k8s.io";
/// Bytes of a log quoted when a step fails.
const TAIL_BYTES: usize = 8192;

/// Why a CRI node cannot run here, if it cannot: not root, containerd, runc or the CNI
/// plugins missing (the CNI plugins are installed with apt-get if they can be).
pub fn unavailable() -> Option<String> {
    crate::containerd::unavailable()
        .or_else(|| {
            which("runc")
                .is_none()
                .then(|| "runc not found on PATH (make deps installs it)".to_owned())
        })
        .or_else(cni::unavailable)
}

/// The hull shim: `$HULL_CONTAINERD_SHIM_HULL_V2`, else beside the test's profile directory
/// (`target/release/containerd-shim-hull-v2`), else beside the `hull` binary in use (the
/// nested lane puts both in `/hull/bin`). Panics if none exists: `make build` builds it.
pub fn hull_shim() -> PathBuf {
    let beside_tests = workspace_bin(HULL_SHIM);
    if beside_tests.is_file() {
        return beside_tests;
    }
    let hull = workspace_bin("hull");
    let beside_hull = hull.with_file_name(HULL_SHIM);
    if beside_hull.is_file() {
        return beside_hull;
    }
    panic!(
        "the hull shim is missing: no {} (nor {}): `make build` (cargo build --release --bins) \
         builds it",
        beside_tests.display(),
        beside_hull.display()
    );
}

/// What is known of a pod, to look for what it left behind once it is gone.
#[derive(Debug, Clone, Default)]
pub struct PodTrace {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// Its containers' ids.
    pub container_ids: Vec<String>,
    /// Its network namespace (from the sandbox's OCI spec).
    pub netns: Option<PathBuf>,
    /// The pod's cgroup (`Pod::cgroup_parent`).
    pub cgroup_parent: String,
    /// The `hull-vmm` processes seen running the pod.
    pub vmm_pids: Vec<i32>,
}

/// A private containerd with CRI, its network, images and client.
pub struct CriNode {
    cri: Cri,
    containerd: Containerd,
    cni: CniNetwork,
    registry: Registry,
    app_image: String,
    cgroup_root: String,
    work: TempDir,
}

impl CriNode {
    /// Makes the images, the network and containerd's config, starts containerd with
    /// `hull_shim`'s directory first on its `PATH` (if given), imports the pause image and
    /// connects once the CRI plugin says its network is ready.
    pub fn start(hull_shim: Option<&Path>) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let started = Instant::now();
        let work = TempDir::new("cri-node");
        let pause = write_busybox_layout(
            &work.path().join("pause"),
            PAUSE_IMAGE,
            &["/bin/sleep", "infinity"],
        );
        let pause_tar = work.path().join("pause.tar");
        write_layout_tarball(&pause, &pause_tar);
        let app = write_busybox_layout(&work.path().join("app"), APP_REPOSITORY, &[]);
        let registry = Registry::serve(&app);
        let app_image = format!("{}/{APP_REPOSITORY}", registry.host());
        let hosts_dir = work.path().join("certs.d");
        let host_dir = hosts_dir.join(registry.host());
        std::fs::create_dir_all(&host_dir).expect("create the registry's hosts dir");
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"http://{0}\"\n\
                 [host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                registry.host()
            ),
        )
        .expect("write hosts.toml");
        let cni = CniNetwork::write(&work.path().join("cni"));
        let cgroup_root = format!(
            "/hull-cri-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );

        let containerd = Containerd::start(
            "cri-containerd",
            |dir| cri_config(dir, cni.conf_dir(), &hosts_dir),
            &containerd_env(hull_shim),
        );
        let pause_tar = pause_tar.to_str().expect("temporary paths are UTF-8");
        let import = containerd.ctr(
            K8S_NAMESPACE,
            &["images", "import", pause_tar],
            Duration::from_secs(120),
        );
        assert!(
            import.status.success(),
            "ctr -n k8s.io images import: {import:?}{}",
            containerd.log_tail(TAIL_BYTES)
        );
        let cri = Cri::connect(&containerd.socket(), CRI_DEADLINE)
            .unwrap_or_else(|e| panic!("{e}{}", containerd.log_tail(TAIL_BYTES)));
        let node = Self {
            cri,
            containerd,
            cni,
            registry,
            app_image,
            cgroup_root,
            work,
        };
        node.wait_for_network();
        eprintln!(
            "CRI node ready after {:?}: network {} ({}, bridge {}, portmap {}), image {}",
            started.elapsed(),
            node.cni.name(),
            node.cni.subnet(),
            node.cni.bridge(),
            if node.cni.has_portmap() {
                "on"
            } else {
                "off: no netfilter NAT here"
            },
            node.app_image
        );
        node
    }

    /// Waits until the CRI plugin reports `NetworkReady` (it has read the CNI config).
    fn wait_for_network(&self) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.cri.status();
            let ready = status.as_ref().is_ok_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "NetworkReady" && c.status)
            });
            if ready {
                return;
            }
            if Instant::now() > end {
                self.fail(&format!("the CRI network is not ready: {status:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Restarts containerd as `systemctl restart containerd` does: SIGTERM
    /// ([`Containerd::stop`]), then, once `while_down` has returned, the same daemon again
    /// ([`Containerd::start_again`]), which finds the pods' shims; connects a new client and
    /// waits for the CRI plugin's network to be ready. Returns how long containerd was down.
    pub fn restart_containerd(&mut self, while_down: impl FnOnce()) -> Duration {
        let stopping = Instant::now();
        self.containerd.stop();
        while_down();
        self.containerd.start_again();
        let down = stopping.elapsed();
        self.cri = Cri::connect(&self.containerd.socket(), CRI_DEADLINE)
            .unwrap_or_else(|e| self.fail(&e.to_string()));
        self.wait_for_network();
        down
    }

    /// The CRI client.
    pub fn cri(&self) -> &Cri {
        &self.cri
    }

    /// The containerd daemon.
    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// The pod network.
    pub fn cni(&self) -> &CniNetwork {
        &self.cni
    }

    /// The containers' image, `127.0.0.1:PORT/hull/busybox:test`.
    pub fn app_image(&self) -> &str {
        &self.app_image
    }

    /// The requests the registry answered since the last call, as `METHOD PATH STATUS`.
    pub fn registry_requests(&self) -> Vec<String> {
        self.registry.requests()
    }

    /// A pod `namespace/name` of this node (its kubelet directories under the node's
    /// temporary directory, its cgroup under the node's cgroup root).
    pub fn pod(&self, namespace: &str, name: &str) -> kubelet::Pod {
        kubelet::Pod::new(
            &self.work.path().join("kubelet"),
            namespace,
            name,
            &self.cgroup_root,
        )
    }

    /// containerd's log, for a failure message.
    pub fn diagnostics(&self) -> String {
        self.containerd.log_tail(TAIL_BYTES)
    }

    /// Panics with `what` and containerd's log.
    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.diagnostics());
    }

    /// The `hull-vmm` processes of the pod `sandbox_id`: those below a shim of this
    /// containerd, and those whose command line names the sandbox.
    pub fn hull_vmms(&self, sandbox_id: &str) -> Vec<(i32, String)> {
        let shims: Vec<i32> = self.containerd.shims().iter().map(|(p, _)| *p).collect();
        hull_vmm_processes()
            .into_iter()
            .filter(|(pid, cmdline)| {
                cmdline.contains(sandbox_id) || ancestors(*pid).iter().any(|a| shims.contains(a))
            })
            .collect()
    }

    /// What the pod `trace` describes left behind, once it has been removed: processes
    /// (shims of this containerd, its `hull-vmm`s), mounts below the node's directories, its
    /// network namespace, CNI state, TAPs, runc state, shim sockets, cgroups below the pod's.
    pub fn leftovers(&self, trace: &PodTrace) -> Vec<String> {
        let mut left = Vec::new();
        for (pid, cmdline) in self.containerd.shims() {
            left.push(format!("shim {pid}: {cmdline}"));
        }
        for (pid, cmdline) in hull_vmm_processes() {
            if trace.vmm_pids.contains(&pid) || cmdline.contains(&trace.sandbox_id) {
                left.push(format!("hull-vmm {pid}: {cmdline}"));
            }
        }
        let ids: Vec<&str> = std::iter::once(trace.sandbox_id.as_str())
            .chain(trace.container_ids.iter().map(String::as_str))
            .collect();
        // Below the node's directories, and anywhere else a runtime keeps a task's mounts
        // (hull's shim: /run/hull/cri/k8s.io/SANDBOX), which name the task.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let named = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| ids.iter().any(|id| point.contains(id)))
            .map(str::to_owned);
        for point in mounts_below(self.containerd.dir())
            .into_iter()
            .chain(mounts_below(self.work.path()))
            .chain(named)
        {
            left.push(format!("mount {point}"));
        }
        let pod_dir = Path::new(HULL_POD_DIRS).join(&trace.sandbox_id);
        if pod_dir.exists() {
            left.push(format!("hull's pod directory {}", pod_dir.display()));
        }
        if let Some(netns) = trace.netns.as_ref().filter(|n| n.exists()) {
            left.push(format!("network namespace {}", netns.display()));
        }
        left.extend(self.cni.leftovers());
        left.extend(CniNetwork::cached_results_of(&ids));
        left.extend(hull_taps().into_iter().map(|t| format!("TAP {t}")));
        for id in &ids {
            let state = self.runc_root().join(id);
            if state.exists() {
                left.push(format!("runc state {}", state.display()));
            }
            let bundle = self.task_bundle(id);
            if bundle.exists() {
                left.push(format!("task bundle {}", bundle.display()));
            }
            let socket = shim_socket(&self.containerd.socket(), id);
            if socket.exists() {
                left.push(format!("shim socket {} (of {id})", socket.display()));
            }
        }
        if !trace.cgroup_parent.is_empty() {
            for dir in cgroup_dirs(&trace.cgroup_parent) {
                for sub in subdirectories(&dir) {
                    left.push(format!("cgroup {}", sub.display()));
                }
            }
        }
        // The network's cached results are found by its name and by the sandbox's id.
        let mut seen = std::collections::HashSet::new();
        left.retain(|l| seen.insert(l.clone()));
        left
    }

    /// Waits up to [`CLEANUP_DEADLINE`] for [`Self::leftovers`] to be empty; fails with what
    /// is left.
    pub fn assert_nothing_left(&self, trace: &PodTrace) {
        let end = Instant::now() + CLEANUP_DEADLINE;
        loop {
            let left = self.leftovers(trace);
            if left.is_empty() {
                return;
            }
            if Instant::now() > end {
                self.fail(&format!(
                    "left behind by the pod {} after {CLEANUP_DEADLINE:?}:\n  {}",
                    trace.sandbox_id,
                    left.join("\n  ")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where the runc shim keeps runc's state (the `Root` option).
    fn runc_root(&self) -> PathBuf {
        self.containerd.dir().join("runc").join(K8S_NAMESPACE)
    }

    /// A task's bundle in containerd's state.
    fn task_bundle(&self, id: &str) -> PathBuf {
        self.containerd
            .state()
            .join("io.containerd.runtime.v2.task")
            .join(K8S_NAMESPACE)
            .join(id)
    }

    /// Removes the images, stops containerd and checks that it left no mount and no shim;
    /// removes the pods' cgroups (the kubelet's job).
    pub fn shut_down(mut self) {
        for image in [self.app_image.clone(), PAUSE_IMAGE.to_owned()] {
            if let Err(e) = self.cri.remove_image(&image) {
                self.fail(&format!("RemoveImage {image}: {e}"));
            }
        }
        self.containerd.stop();
        let mut left: Vec<String> = self
            .containerd
            .shims()
            .into_iter()
            .map(|(pid, cmdline)| format!("shim {pid}: {cmdline}"))
            .collect();
        left.extend(
            self.containerd
                .leftover_mounts()
                .into_iter()
                .map(|m| format!("mount {m}")),
        );
        let cgroups = remove_cgroup_tree(&self.cgroup_root);
        left.extend(cgroups.into_iter().map(|c| format!("cgroup {c} (busy)")));
        if !left.is_empty() {
            self.fail(&format!(
                "left behind once containerd stopped:\n  {}",
                left.join("\n  ")
            ));
        }
    }

    /// After a failure: every pod containerd still has, stopped and removed; then what it
    /// could not remove.
    fn force_clean(&mut self) {
        if self.containerd.pid().is_some() && self.containerd.exited().is_none() {
            if let Ok(quick) = Cri::connect(&self.containerd.socket(), Duration::from_secs(60)) {
                for pod in quick.list_pod_sandbox(None).unwrap_or_default() {
                    let _ = quick.stop_pod_sandbox(&pod.id);
                    let _ = quick.remove_pod_sandbox(&pod.id);
                }
            }
        }
        // The tasks containerd had: each has a bundle, whatever its runtime.
        let ids: Vec<String> = std::fs::read_dir(self.task_bundle(""))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let shims: Vec<i32> = self.containerd.shims().iter().map(|(p, _)| *p).collect();
        let vmms: Vec<i32> = hull_vmm_processes()
            .into_iter()
            .filter(|(pid, cmdline)| {
                ids.iter().any(|id| cmdline.contains(id.as_str()))
                    || ancestors(*pid).iter().any(|a| shims.contains(a))
            })
            .map(|(pid, _)| pid)
            .collect();
        self.containerd.force_clean();
        for pid in vmms {
            signal(pid, libc::SIGKILL);
        }
        let runc_root = self.runc_root();
        if let Ok(entries) = std::fs::read_dir(&runc_root) {
            for entry in entries.flatten() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force"])
                    .arg(entry.file_name())
                    .output();
            }
        }
        unmount_all(&mounts_below(self.work.path()));
        remove_portmap_rules(self.cni.name());
        self.cni.forget_results(&ids);
        remove_stale_shim_sockets(self.containerd.started());
        for id in &ids {
            // A shim killed before it could remove its socket, or its pod's directory.
            let _ = std::fs::remove_file(shim_socket(&self.containerd.socket(), id));
            let pod_dir = Path::new(HULL_POD_DIRS).join(id);
            unmount_all(&mounts_below(&pod_dir));
            // Only once nothing is mounted there: a bind's source must not be emptied.
            if mounts_below(&pod_dir).is_empty() {
                let _ = std::fs::remove_dir_all(&pod_dir);
            }
        }
        // Processes may take a moment to leave their cgroups after SIGKILL.
        let end = Instant::now() + Duration::from_secs(10);
        while !remove_cgroup_tree(&self.cgroup_root).is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for CriNode {
    fn drop(&mut self) {
        self.force_clean();
    }
}

/// containerd's config for the CRI node in `dir` (see the module's description).
fn cri_config(dir: &Path, cni_conf_dir: &Path, hosts_dir: &Path) -> String {
    let runc = which("runc").unwrap_or_else(|| PathBuf::from("runc"));
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "{RUNC_HANDLER}"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC_HANDLER}]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC_HANDLER}.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HULL_HANDLER}]
      runtime_type = "io.containerd.hull.v2"
      pod_annotations = ["io.hull.pod.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts_dir}"
"#,
        runc = runc.display(),
        runc_root = dir.join("runc").display(),
        conf_dir = cni_conf_dir.display(),
        hosts_dir = hosts_dir.display(),
    )
}

/// What containerd gets in its environment besides the test's (which it passes on to its
/// shims): `PATH` with the hull shim's directory first, and `HULL_GUEST_DIR` naming the guest
/// kernel's directory when the test's environment does not.
fn containerd_env(hull_shim: Option<&Path>) -> Vec<(&'static str, OsString)> {
    let mut env = Vec::new();
    if let Some(dir) = hull_shim.and_then(Path::parent) {
        let mut path = vec![dir.to_owned()];
        if let Some(old) = std::env::var_os("PATH") {
            path.extend(std::env::split_paths(&old));
        }
        env.push((
            "PATH",
            std::env::join_paths(path).expect("PATH entries hold no ':'"),
        ));
    }
    let installed = hull_shim
        .and_then(Path::parent)
        .map(|bin| bin.join("../share/hull/guest/vmlinux"))
        .is_some_and(|kernel| kernel.is_file());
    if installed {
        // An installed layout (`make install`): hull finds its guest beside itself, which an
        // empty HULL_GUEST_DIR leaves it to do.
        env.push(("HULL_GUEST_DIR", OsString::new()));
    } else if std::env::var_os("HULL_GUEST_DIR").is_none() {
        let (kernel, initramfs) = guest_artifacts();
        if let Some(dir) = kernel.parent().filter(|d| {
            kernel.file_name() == Some("vmlinux".as_ref())
                && initramfs == d.join("initramfs.cpio")
                && kernel.is_file()
        }) {
            env.push(("HULL_GUEST_DIR", dir.as_os_str().to_owned()));
        }
    }
    env
}

/// Every `hull-vmm` process on the host, with its command line.
pub fn hull_vmm_processes() -> Vec<(i32, String)> {
    processes()
        .into_iter()
        .filter(|(_, cmdline)| {
            cmdline
                .split(' ')
                .next()
                .is_some_and(|argv0| argv0.rsplit('/').next() == Some("hull-vmm"))
        })
        .collect()
}

/// The parent, grandparent, ... of `pid`, up to init.
fn ancestors(pid: i32) -> Vec<i32> {
    let mut chain = Vec::new();
    let mut at = pid;
    while let Some(parent) = parent_of(at).filter(|p| *p > 1 && !chain.contains(p)) {
        chain.push(parent);
        at = parent;
    }
    chain
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Links of the host's network namespace named like hull's TAPs (`tap*_hull`).
pub fn hull_taps() -> Vec<String> {
    let out = Command::new("/usr/sbin/ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with("tap") && name.ends_with("_hull"))
        .collect()
}

/// The socket containerd 1.6 gives the shim of task `id` in the `k8s.io` namespace:
/// `/run/containerd/s/<sha256 of ADDRESS/k8s.io/ID>`.
fn shim_socket(address: &Path, id: &str) -> PathBuf {
    let key = format!("{}/{K8S_NAMESPACE}/{id}", address.display());
    let out = Command::new("sh")
        .args(["-c", "printf %s \"$1\" | sha256sum", "sh", &key])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let hex = out.split_whitespace().next().unwrap_or_default();
    Path::new(SHIM_SOCKET_DIR).join(hex)
}

/// Removes the shim sockets made since `since` that no process listens on any more (a shim
/// that failed, or was killed, before it removed its own): dead files, whoever made them.
fn remove_stale_shim_sockets(since: Instant) {
    let age = since.elapsed();
    let live = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(SHIM_SOCKET_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let recent = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|made| made <= age);
        let listened = live
            .lines()
            .any(|l| l.split_whitespace().nth(7) == path.to_str());
        if recent && !listened {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The directories of cgroup `path` (`/a/b`) in every cgroup hierarchy mounted here.
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| left.split(' ').nth(4))?
        })
        .map(|point| Path::new(point).join(path.trim_start_matches('/')))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// Every directory below `dir`, deepest first.
fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                found.extend(subdirectories(&entry.path()));
                found.push(entry.path());
            }
        }
    }
    found
}

/// Removes cgroup `path` and everything below it from every hierarchy; returns the
/// directories that could not be removed (processes still in them).
fn remove_cgroup_tree(path: &str) -> Vec<String> {
    let mut busy = Vec::new();
    for dir in cgroup_dirs(path) {
        for sub in subdirectories(&dir).into_iter().chain([dir]) {
            if std::fs::remove_dir(&sub).is_err() && sub.exists() {
                busy.push(sub.display().to_string());
            }
        }
    }
    busy
}

/// Deletes the iptables NAT rules portmap made for `network` (after a failure, when no CNI
/// DEL ran), and the per-pod chains they jump to.
fn remove_portmap_rules(network: &str) {
    let Ok(out) = Command::new("iptables-save").args(["-t", "nat"]).output() else {
        return;
    };
    let rules = String::from_utf8_lossy(&out.stdout).into_owned();
    for rule in rules
        .lines()
        .filter(|r| cni::rule_names_network(r, network))
    {
        let Some(spec) = rule.strip_prefix("-A ") else {
            continue;
        };
        // iptables-save quotes its output for a shell.
        let _ = Command::new("sh")
            .args(["-c", &format!("iptables -t nat -D {spec}")])
            .output();
        let target = spec.split(" -j ").nth(1).and_then(|t| t.split(' ').next());
        if let Some(chain) = target.filter(|c| c.starts_with("CNI-DN-")) {
            let _ = Command::new("iptables")
                .args(["-t", "nat", "-F", chain])
                .output();
            let _ = Command::new("iptables")
                .args(["-t", "nat", "-X", chain])
                .output();
        }
    }
}

/// A line of a CRI container log: `TIME STREAM TAG CONTENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// RFC 3339 with nanoseconds, as Go's `time.RFC3339Nano` writes it.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `F` (a full line) or `P` (part of a line the runtime split).
    pub tag: String,
    /// The line, without its newline.
    pub content: String,
}

/// Parses a CRI log file's text; an error names the first line that is not in CRI format.
pub fn parse_log(text: &str) -> Result<Vec<LogLine>, String> {
    text.lines()
        .map(|line| {
            let mut fields = line.splitn(4, ' ');
            let (Some(time), Some(stream), Some(tag)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!("not TIME STREAM TAG CONTENT: {line:?}"));
            };
            if !is_rfc3339_nano(time) {
                return Err(format!("not an RFC 3339 time: {time:?} in {line:?}"));
            }
            if stream != "stdout" && stream != "stderr" {
                return Err(format!("not a stream: {stream:?} in {line:?}"));
            }
            if tag != "F" && tag != "P" {
                return Err(format!("not a tag: {tag:?} in {line:?}"));
            }
            Ok(LogLine {
                time: time.into(),
                stream: stream.into(),
                tag: tag.into(),
                content: fields.next().unwrap_or("").into(),
            })
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]` then `Z` or `±HH:MM`.
fn is_rfc3339_nano(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 9 {
            return false;
        }
        rest = &fraction[n..];
    }
    rest == "Z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && rest.as_bytes()[3] == b':'
            && rest[1..3]
                .bytes()
                .chain(rest[4..].bytes())
                .all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_parsed() {
        let text = "2026-12-03T15:44:56.123456789Z stdout F hello world\n\
                    2026-12-03T15:44:57+01:00 stderr P part\n";
        let lines = parse_log(text).unwrap();
        assert_eq!(lines[0].content, "hello world");
        assert_eq!(lines[0].stream, "stdout");
        assert_eq!(lines[1].tag, "P");
        assert!(parse_log("hello world\n").is_err());
        assert!(parse_log("2026-12-03 stdout F x\n").is_err());
        assert!(parse_log("2026-12-03T15:44:56.Z stdout F x\n").is_err());
        assert!(parse_log("2026-12-03T15:44:56Z stdin F x\n").is_err());
    }

    #[test]
    fn the_parent_of_this_process_is_known() {
        let me = std::process::id() as i32;
        assert_eq!(
            parent_of(me),
            Some(std::os::unix::process::parent_id() as i32)
        );
    }
}
