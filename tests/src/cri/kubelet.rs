//! What a kubelet (1.2x, cgroupfs driver, no feature gates) sends a CRI runtime for a pod
//! whose spec sets nothing special: a BestEffort pod, no security context of its own, default
//! service links. The pod's kubelet directory (volumes, `etc-hosts`, termination-log files)
//! is a directory of the test's; the values are those of
//! `pkg/kubelet/kuberuntime`: labels and annotations, the DNS config of a cluster, the
//! default masked and read-only paths, seccomp `Unconfined` (the kubelet's default while its
//! `seccompDefault` is off), PID namespace per container, network and IPC per pod.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as api;

/// `/proc` and `/sys` paths the kubelet masks by default (`securitycontext` package).
pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// `/proc` paths the kubelet makes read-only by default.
pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
/// A cluster's DNS service, as the kubelet's `clusterDNS` names it (nothing answers there).
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The grace period of a pod that does not set one, in seconds.
pub const TERMINATION_GRACE_PERIOD_S: u64 = 30;

/// A pod as the kubelet describes it to the runtime.
#[derive(Debug, Clone)]
pub struct Pod {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// The pod's hostname (its name, as the kubelet sets it).
    pub hostname: String,
    /// The pod's cgroup, as the kubelet's cgroupfs driver names it.
    pub cgroup_parent: String,
    /// Host ports (`containers[].ports[].hostPort`).
    pub port_mappings: Vec<api::PortMapping>,
    dir: PathBuf,
    log_directory: PathBuf,
}

impl Pod {
    /// A pod `namespace/name` whose kubelet directories are under `root`
    /// (`root/pods/UID` like `/var/lib/kubelet/pods/UID`, `root/logs/NS_NAME_UID` like
    /// `/var/log/pods/...`), in the cgroup `cgroup_root/podUID`.
    pub fn new(root: &Path, namespace: &str, name: &str, cgroup_root: &str) -> Self {
        let uid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .expect("the kernel makes UUIDs")
            .trim()
            .to_owned();
        let dir = root.join("pods").join(&uid);
        let log_directory = root.join("logs").join(format!("{namespace}_{name}_{uid}"));
        // The kubelet makes the pod's directories before it asks for the sandbox.
        for sub in [
            dir.join("volumes"),
            dir.join("containers"),
            log_directory.clone(),
        ] {
            std::fs::create_dir_all(sub).expect("create the pod's kubelet directories");
        }
        Self {
            name: name.into(),
            namespace: namespace.into(),
            hostname: name.into(),
            cgroup_parent: format!("{cgroup_root}/pod{uid}"),
            uid,
            port_mappings: Vec::new(),
            dir,
            log_directory,
        }
    }

    /// The directory the runtime writes the containers' logs under.
    pub fn log_directory(&self) -> &Path {
        &self.log_directory
    }

    /// Where the runtime writes container `name`'s log (its first attempt).
    pub fn log_file(&self, container: &str) -> PathBuf {
        self.log_directory.join(container_log_path(container))
    }

    /// The pod's emptyDir volume `volume` on the host (made if missing), as the kubelet
    /// keeps it: `pods/UID/volumes/kubernetes.io~empty-dir/VOLUME`.
    pub fn empty_dir(&self, volume: &str) -> PathBuf {
        let path = self
            .dir
            .join("volumes/kubernetes.io~empty-dir")
            .join(volume);
        std::fs::create_dir_all(&path).expect("create an emptyDir volume");
        path
    }

    /// The pod's `/etc/hosts` on the host, `pods/UID/etc-hosts`.
    pub fn etc_hosts(&self) -> PathBuf {
        self.dir.join("etc-hosts")
    }

    /// Writes the hosts file the kubelet makes once the pod has its address `ip`.
    pub fn write_etc_hosts(&self, ip: &str) {
        let text = format!(
            "# Kubernetes-managed hosts file.\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             fe00::0\tip6-mcastprefix\n\
             fe00::1\tip6-allnodes\n\
             fe00::2\tip6-allrouters\n\
             {ip}\t{}\n",
            self.hostname
        );
        std::fs::write(self.etc_hosts(), text).expect("write the pod's etc-hosts");
    }

    /// The file behind container `name`'s `/dev/termination-log` on the host.
    pub fn termination_log(&self, container: &str) -> PathBuf {
        self.dir.join("containers").join(container).join("0")
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            ("io.kubernetes.pod.name".into(), self.name.clone()),
            ("io.kubernetes.pod.namespace".into(), self.namespace.clone()),
            ("io.kubernetes.pod.uid".into(), self.uid.clone()),
        ])
    }

    /// The `PodSandboxConfig` of `RunPodSandbox`.
    pub fn sandbox_config(&self) -> api::PodSandboxConfig {
        let mut annotations = HashMap::from([
            ("kubernetes.io/config.source".into(), "api".into()),
            (
                "kubernetes.io/config.seen".into(),
                "2026-01-01T00:00:00Z".into(),
            ),
        ]);
        annotations.insert(
            "io.kubernetes.pod.terminationGracePeriod".into(),
            TERMINATION_GRACE_PERIOD_S.to_string(),
        );
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.hostname.clone(),
            log_directory: self.log_directory.display().to_string(),
            dns_config: Some(api::DnsConfig {
                servers: vec![CLUSTER_DNS.into()],
                searches: vec![
                    format!("{}.svc.cluster.local", self.namespace),
                    "svc.cluster.local".into(),
                    "cluster.local".into(),
                ],
                options: vec!["ndots:5".into()],
            }),
            port_mappings: self.port_mappings.clone(),
            labels: self.labels(),
            annotations,
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    seccomp: Some(unconfined()),
                    ..Default::default()
                }),
                // A BestEffort pod: no overhead, no limits.
                ..Default::default()
            }),
            windows: None,
        }
    }

    /// The `ContainerConfig` of `CreateContainer` for container `name` of image `image`
    /// running `command`, with the pod's `mounts` (volumes) and what the kubelet adds to
    /// every container: `/etc/hosts`, `/dev/termination-log`, the service environment.
    pub fn container_config(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        mounts: Vec<api::Mount>,
    ) -> api::ContainerConfig {
        let termination_log = self.termination_log(name);
        std::fs::create_dir_all(termination_log.parent().expect("a file has a directory"))
            .expect("create the container's kubelet directory");
        std::fs::write(&termination_log, "").expect("create the termination-log file");
        let mut all_mounts = mounts;
        all_mounts.push(host_mount(&self.etc_hosts(), "/etc/hosts"));
        all_mounts.push(host_mount(&termination_log, "/dev/termination-log"));
        let mut labels = self.labels();
        labels.insert("io.kubernetes.container.name".into(), name.into());
        let annotations = HashMap::from([
            ("io.kubernetes.container.hash".into(), "0".into()),
            ("io.kubernetes.container.restartCount".into(), "0".into()),
            (
                "io.kubernetes.container.terminationMessagePath".into(),
                "/dev/termination-log".into(),
            ),
            (
                "io.kubernetes.container.terminationMessagePolicy".into(),
                "File".into(),
            ),
            (
                "io.kubernetes.pod.terminationGracePeriod".into(),
                TERMINATION_GRACE_PERIOD_S.to_string(),
            ),
        ]);
        // The service links of the `kubernetes` service in the default namespace.
        let envs = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
            ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
        ]
        .into_iter()
        .map(|(key, value)| api::KeyValue {
            key: key.into(),
            value: value.into(),
        })
        .collect();
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(crate::cri::image_spec(image)),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            envs,
            mounts: all_mounts,
            labels,
            annotations,
            log_path: container_log_path(name),
            linux: Some(api::LinuxContainerConfig {
                resources: Some(api::LinuxContainerResources {
                    // BestEffort: the minimum CPU shares, the kubelet's OOM score, no limits.
                    cpu_period: 100_000,
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    // The image names no user: the kubelet asks for uid 0.
                    run_as_user: Some(api::Int64Value { value: 0 }),
                    masked_paths: DEFAULT_MASKED_PATHS.map(String::from).to_vec(),
                    readonly_paths: DEFAULT_READONLY_PATHS.map(String::from).to_vec(),
                    seccomp: Some(unconfined()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }
}

/// A volume of the pod: the host's `host_path` at `container_path`, read-write, private
/// propagation, as the kubelet mounts an emptyDir.
pub fn host_mount(host_path: &Path, container_path: &str) -> api::Mount {
    api::Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly: false,
        selinux_relabel: false,
        propagation: api::MountPropagation::PropagationPrivate as i32,
        ..Default::default()
    }
}

/// `NAME/0.log`: the kubelet's log path for a container's first attempt, under the pod's
/// log directory.
pub fn container_log_path(container: &str) -> String {
    format!("{container}/0.log")
}

/// Network and IPC per pod, PID per container (`shareProcessNamespace` unset).
fn pod_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn unconfined() -> api::SecurityProfile {
    api::SecurityProfile {
        profile_type: api::security_profile::ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    }
}
