//! The bundle's `config.json`, read and checked on the host, whole, before any VM starts: what
//! the host itself needs (the rootfs, whether it is read-only, the resources that size the VM,
//! the stdio mode) here, and the rest with `oci-spec` in [`oci`], which also gives the agent its
//! part in the protocol's types. Errors name the file, the field and the value.

use std::path::{Path, PathBuf};

use hull_contract::vm::{
    HostBind, NetNamespace, SharedDirConfig, VmConfig, VsockConfig, MAX_MEM_SIZE_MIB,
};
use hull_protocol::spec::{ContainerSpec, NamespaceKind};
use hull_protocol::Stdio;
use serde_json::Value;

pub mod oci;

/// Guest memory when the spec sets no memory limit.
pub const DEFAULT_MEM_SIZE_MIB: u32 = 256;
/// Smallest guest memory hull gives a container's VM.
pub const MIN_MEM_SIZE_MIB: u32 = 128;
/// Added to the spec's memory limit for the guest kernel and the agent.
pub const MEM_HEADROOM_MIB: u32 = 64;
/// The CFS period the OCI spec implies when it gives a quota alone.
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;
/// The virtio-fs tag of the container's root file system.
pub const ROOTFS_TAG: &str = "rootfs";
/// The kernel command line that makes the agent serve the host.
pub const AGENT_CMDLINE: &str = "hull.serve";

/// Errors in a bundle's `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: malformed JSON: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: field `{field}` is missing", path.display())]
    Missing { path: PathBuf, field: String },
    #[error("{}: field `{field}` = {value}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
}

/// What the host reads from a bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleSpec {
    /// `<bundle>/config.json`.
    pub config_path: PathBuf,
    /// The whole spec as JSON, for what only the host reads (hooks, annotations, mounts'
    /// targets).
    pub spec: Value,
    /// What the agent needs to create the container, checked.
    pub container: ContainerSpec,
    /// `<bundle>/<root.path>`, canonical.
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
    /// vCPUs the spec asks for (`linux.resources.cpu`), before the host's limit.
    pub vcpus: u32,
    /// `linux.resources.memory.limit` in bytes, if positive.
    pub memory_limit: Option<u64>,
    /// `process.terminal`.
    pub terminal: bool,
    /// `process.consoleSize`: rows, columns.
    pub console_size: Option<(u16, u16)>,
    /// The bind mounts of host paths, which hull-vmm binds into the binds share; their sources
    /// in [`BundleSpec::container`] point at the share in the guest.
    pub binds: Vec<HostBind>,
    /// The container's network namespace on the host, where hull-vmm lives and whose
    /// interfaces are mirrored into the VM. In the guest the container gets a new one (the
    /// agent moves the mirrored NICs into it): [`BundleSpec::container`] has no path for it.
    pub netns: NetNamespace,
}

/// Where the VM's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub console: PathBuf,
    pub vsock_uds: PathBuf,
    /// The binds share: an empty file or directory per entry of [`BundleSpec::binds`].
    pub binds_dir: PathBuf,
}

impl BundleSpec {
    /// Reads and checks `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(bundle, path, &text)
    }

    /// Checks the text of `config_path`; `root.path` is relative to `bundle`.
    pub fn parse(bundle: &Path, config_path: PathBuf, text: &str) -> Result<Self, SpecError> {
        let spec: Value = serde_json::from_str(text).map_err(|source| SpecError::Malformed {
            path: config_path.clone(),
            source,
        })?;
        let checker = Checker { path: &config_path };
        if !spec.is_object() {
            return Err(checker.invalid("(top level)", &spec, "must be a JSON object"));
        }

        let process = checker.required(&spec, &["process"], "process")?;
        if !process.is_object() {
            return Err(checker.invalid("process", process, "must be an object"));
        }
        let args = checker.required(&spec, &["process", "args"], "process.args")?;
        match args.as_array() {
            Some(list) if list.is_empty() => {
                return Err(checker.invalid("process.args", args, "must name a program"))
            }
            Some(list) if list.iter().all(Value::is_string) => {}
            _ => return Err(checker.invalid("process.args", args, "must be an array of strings")),
        }
        let terminal = match lookup(&spec, &["process", "terminal"]) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(checker.invalid("process.terminal", other, "must be a boolean"))
            }
        };
        let console_size = match lookup(&spec, &["process", "consoleSize"]) {
            None | Some(Value::Null) => None,
            Some(size) => {
                let dim = |name| {
                    size.get(name)
                        .and_then(Value::as_u64)
                        .and_then(|n| u16::try_from(n).ok())
                };
                match (dim("height"), dim("width")) {
                    (Some(rows), Some(cols)) => Some((rows, cols)),
                    _ => {
                        return Err(checker.invalid(
                            "process.consoleSize",
                            size,
                            "must have `height` and `width` from 0 to 65535",
                        ))
                    }
                }
            }
        };

        let root_path = checker.required(&spec, &["root", "path"], "root.path")?;
        let root_str = match root_path.as_str() {
            Some(s) if !s.is_empty() => s,
            _ => return Err(checker.invalid("root.path", root_path, "must be a non-empty path")),
        };
        let joined = bundle.join(root_str);
        let rootfs = match joined.canonicalize() {
            Ok(dir) if dir.is_dir() => dir,
            Ok(dir) => {
                let reason = format!("{} is not a directory", dir.display());
                return Err(checker.invalid("root.path", root_path, &reason));
            }
            Err(err) => {
                let reason = format!("rootfs directory {}: {err}", joined.display());
                return Err(checker.invalid("root.path", root_path, &reason));
            }
        };
        let readonly = match lookup(&spec, &["root", "readonly"]) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(checker.invalid("root.readonly", other, "must be a boolean"))
            }
        };

        let vcpus = checker.vcpus(&spec)?;
        let memory_limit = match lookup(&spec, &["linux", "resources", "memory", "limit"]) {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_i64() {
                // -1 (and 0) mean no limit.
                Some(limit) if limit <= 0 => None,
                Some(limit) => Some(limit as u64),
                None => {
                    return Err(checker.invalid(
                        "linux.resources.memory.limit",
                        value,
                        "must be an integer number of bytes",
                    ))
                }
            },
        };

        let mut container =
            oci::container_spec(&config_path, &oci::read_spec(&config_path, &spec)?)?;
        let binds = host_binds(bundle, &config_path, &mut container)?;
        let netns = take_network_namespace(&config_path, &spec, &mut container)?;

        Ok(Self {
            config_path,
            spec,
            container,
            rootfs,
            readonly,
            vcpus,
            memory_limit,
            terminal,
            console_size,
            binds,
            netns,
        })
    }

    /// How the init's standard streams are connected: all three relayed, or a terminal of
    /// the spec's `consoleSize` (24x80 without one).
    pub fn stdio(&self) -> Stdio {
        if self.terminal {
            let (rows, cols) = self.console_size.unwrap_or((24, 80));
            Stdio::Terminal { rows, cols }
        } else {
            Stdio::Pipes {
                stdin: true,
                stdout: true,
                stderr: true,
            }
        }
    }

    /// The VM that runs this container: at most `max_vcpus` vCPUs (the host's limit).
    pub fn vm_config(&self, paths: &VmPaths, max_vcpus: u8) -> VmConfig {
        let mut config = VmConfig::new(paths.kernel.clone());
        config.initramfs = Some(paths.initramfs.clone());
        config.cmdline = AGENT_CMDLINE.to_owned();
        config.vcpus = self.vcpus.clamp(1, u32::from(max_vcpus.max(1))) as u8;
        config.mem_size_mib = mem_size_mib(self.memory_limit);
        config.console = hull_contract::vm::ConsoleConfig::File(paths.console.clone());
        config.shared_dirs = vec![
            SharedDirConfig {
                tag: ROOTFS_TAG.to_owned(),
                path: self.rootfs.clone(),
                read_only: self.readonly,
                binds: Vec::new(),
            },
            // Always there, so that every container's VM has the same devices as the template
            // it is restored from; empty without bind mounts.
            SharedDirConfig {
                tag: hull_protocol::BINDS_FS_TAG.to_owned(),
                path: paths.binds_dir.clone(),
                read_only: false,
                binds: self.binds.clone(),
            },
        ];
        config.vsock = Some(VsockConfig {
            guest_cid: u64::from(hull_protocol::GUEST_CID),
            uds_path: paths.vsock_uds.clone(),
        });
        config.nic_slots = crate::network::NIC_SLOTS;
        config.netns = Some(self.netns.clone());
        config
    }
}

/// The spec's network namespace on the host, its path taken out of what the guest is asked
/// (see [`BundleSpec::netns`]). A spec without one asks for the host's network, which a VM cannot
/// have.
fn take_network_namespace(
    config_path: &Path,
    spec: &Value,
    container: &mut ContainerSpec,
) -> Result<NetNamespace, SpecError> {
    let Some(at) = container
        .namespaces
        .iter()
        .position(|n| n.kind == NamespaceKind::Network)
    else {
        let value = lookup(spec, &["linux", "namespaces"])
            .cloned()
            .unwrap_or(Value::Null);
        return Err(SpecError::invalid(
            config_path,
            "linux.namespaces",
            &value,
            "has no `network` namespace: the container would share the host's network (host \
             networking), which a micro-VM cannot; ask for {\"type\": \"network\"} (Docker \
             and Podman: leave out --network host)",
        ));
    };
    // The guest makes the container a namespace of its own, into which the agent moves the
    // mirrored NICs; the path is the host's.
    Ok(match container.namespaces[at].path.take() {
        Some(path) => NetNamespace::Path(path.into()),
        None => NetNamespace::New,
    })
}

/// The spec's bind mounts of host paths (every `bind` mount: an OCI spec's sources are the
/// host's): each source resolved on the host (relative to the bundle, symbolic links followed,
/// as `mount(2)` does), checked to exist, and named by its index in `mounts`; the container's
/// mount then takes its source from the binds share in the guest.
fn host_binds(
    bundle: &Path,
    config_path: &Path,
    container: &mut ContainerSpec,
) -> Result<Vec<HostBind>, SpecError> {
    let mut binds = Vec::new();
    for (i, mount) in container.mounts.iter_mut().enumerate() {
        if !mount.is_bind() {
            continue;
        }
        let field = format!("mounts[{i}].source");
        let Some(source) = mount.source.as_deref() else {
            return Err(SpecError::Missing {
                path: config_path.to_owned(),
                field,
            });
        };
        let value = Value::from(source);
        let resolved = bundle.join(source).canonicalize().map_err(|err| {
            SpecError::invalid(config_path, &field, &value, format!("on the host: {err}"))
        })?;
        let kind = std::fs::metadata(&resolved).map_err(|err| {
            SpecError::invalid(config_path, &field, &value, format!("on the host: {err}"))
        })?;
        if !(kind.is_dir() || kind.is_file()) {
            return Err(SpecError::invalid(
                config_path,
                &field,
                &value,
                "a bind mount's source must be a directory or a regular file",
            ));
        }
        // The last of `ro` and `rw` counts, as in the guest's mount.
        let read_only = mount
            .options
            .iter()
            .rev()
            .find(|o| *o == "ro" || *o == "rw")
            .is_some_and(|o| o == "ro");
        binds.push(HostBind {
            source: resolved,
            name: i.to_string(),
            read_only,
            recursive: mount.options.iter().any(|o| o == "rbind"),
        });
        mount.source = Some(format!("{}/{i}", hull_protocol::BINDS_DIR));
    }
    Ok(binds)
}

/// Guest memory for a container limited to `limit` bytes: the limit rounded up to MiB plus
/// headroom for the guest kernel and agent, at least [`MIN_MEM_SIZE_MIB`]; without a limit
/// [`DEFAULT_MEM_SIZE_MIB`].
pub fn mem_size_mib(limit: Option<u64>) -> u32 {
    let Some(limit) = limit else {
        return DEFAULT_MEM_SIZE_MIB;
    };
    let mib = limit.div_ceil(1 << 20) + u64::from(MEM_HEADROOM_MIB);
    mib.clamp(u64::from(MIN_MEM_SIZE_MIB), u64::from(MAX_MEM_SIZE_MIB)) as u32
}

/// A pod VM's vCPUs and memory (`hull create --pod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSize {
    pub vcpus: u8,
    pub mem_size_mib: u32,
}

/// vCPUs of a pod VM whose sandbox spec asks for none.
pub const DEFAULT_POD_VCPUS: u8 = 1;
/// Memory of a pod VM whose sandbox spec asks for none: its containers share it, each within
/// its own limit (guest memory the containers never touch costs the host nothing).
pub const DEFAULT_POD_MEM_SIZE_MIB: u32 = 512;
/// The sandbox spec's annotations that size a pod VM (the pod's own annotations, which
/// containerd passes on when the runtime's `pod_annotations` lists them).
pub const POD_VCPUS_ANNOTATION: &str = "io.hull.pod.vcpus";
pub const POD_MEMORY_ANNOTATION: &str = "io.hull.pod.memory-mib";
/// containerd 1.7's annotation of the pod's memory limit in bytes (the sum of its containers').
pub const CRI_SANDBOX_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";

/// A pod VM's size from its sandbox spec: [`POD_VCPUS_ANNOTATION`] and
/// [`POD_MEMORY_ANNOTATION`] if given; else memory for [`CRI_SANDBOX_MEMORY_ANNOTATION`] (the
/// pod's limit plus headroom); else the defaults. A value that is no number in range is an
/// error naming the annotation.
pub fn pod_size(spec: &Value, config_path: &Path) -> Result<PodSize, SpecError> {
    let annotation = |name: &str| lookup(spec, &["annotations", name]);
    let number = |name: &str, min: u64, max: u64| -> Result<Option<u64>, SpecError> {
        let Some(value) = annotation(name) else {
            return Ok(None);
        };
        match value.as_str().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(SpecError::invalid(
                config_path,
                format!("annotations.{name:?}"),
                value,
                format!("must be a whole number from {min} to {max}"),
            )),
        }
    };
    let vcpus = number(POD_VCPUS_ANNOTATION, 1, 255)?.map_or(DEFAULT_POD_VCPUS, |n| n as u8);
    let explicit = number(
        POD_MEMORY_ANNOTATION,
        u64::from(MIN_MEM_SIZE_MIB),
        u64::from(MAX_MEM_SIZE_MIB),
    )?;
    let from_cri = number(CRI_SANDBOX_MEMORY_ANNOTATION, 0, u64::MAX)?
        .filter(|bytes| *bytes > 0)
        .map(|bytes| mem_size_mib(Some(bytes)));
    let mem_size_mib = explicit
        .map(|n| n as u32)
        .or(from_cri)
        .unwrap_or(DEFAULT_POD_MEM_SIZE_MIB);
    Ok(PodSize {
        vcpus,
        mem_size_mib,
    })
}

/// Counts the CPUs of a cpuset list such as `0-3,7`.
fn count_cpus(list: &str) -> Option<u32> {
    let mut count = 0u32;
    for part in list.split(',').map(str::trim) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if last < first {
            return None;
        }
        count = count.checked_add(last - first + 1)?;
    }
    Some(count)
}

fn lookup<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

/// Builds errors that name the config file.
struct Checker<'a> {
    path: &'a Path,
}

impl SpecError {
    /// `field` of `path` has `value`, which is wrong for `reason` (the value quoted as JSON,
    /// cut to 200 bytes).
    pub fn invalid(
        path: &Path,
        field: impl Into<String>,
        value: &Value,
        reason: impl Into<String>,
    ) -> Self {
        let mut value = value.to_string();
        if value.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| value.is_char_boundary(i))
                .unwrap_or(0);
            value.truncate(cut);
            value.push_str("...");
        }
        SpecError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            value,
            reason: reason.into(),
        }
    }

    /// `field` of `path` is missing.
    pub fn missing(path: &Path, field: impl Into<String>) -> Self {
        SpecError::Missing {
            path: path.to_owned(),
            field: field.into(),
        }
    }
}

impl Checker<'_> {
    fn invalid(&self, field: &'static str, value: &Value, reason: &str) -> SpecError {
        SpecError::invalid(self.path, field, value, reason)
    }

    fn required<'v>(
        &self,
        spec: &'v Value,
        keys: &[&str],
        field: &'static str,
    ) -> Result<&'v Value, SpecError> {
        match lookup(spec, keys) {
            None | Some(Value::Null) => Err(SpecError::missing(self.path, field)),
            Some(value) => Ok(value),
        }
    }

    /// vCPUs from `linux.resources.cpu`: quota/period rounded up, else the size of `cpus`,
    /// else 1.
    fn vcpus(&self, spec: &Value) -> Result<u32, SpecError> {
        let Some(cpu) = lookup(spec, &["linux", "resources", "cpu"]) else {
            return Ok(1);
        };
        if let Some(quota) = cpu.get("quota").filter(|q| !q.is_null()) {
            let Some(quota) = quota.as_i64() else {
                return Err(self.invalid("linux.resources.cpu.quota", quota, "must be an integer"));
            };
            if quota > 0 {
                let period = match cpu.get("period").filter(|p| !p.is_null()) {
                    None => DEFAULT_CPU_PERIOD_US,
                    Some(p) => match p.as_u64() {
                        Some(p) if p > 0 => p,
                        _ => {
                            return Err(self.invalid(
                                "linux.resources.cpu.period",
                                p,
                                "must be a positive integer",
                            ))
                        }
                    },
                };
                let n = (quota as u64).div_ceil(period);
                return Ok(u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
        if let Some(cpus) = cpu.get("cpus").filter(|c| !c.is_null()) {
            return match cpus.as_str().map(count_cpus) {
                Some(Some(n)) if n > 0 => Ok(n),
                _ => Err(self.invalid(
                    "linux.resources.cpu.cpus",
                    cpus,
                    "must be a CPU list such as \"0-3,7\"",
                )),
            };
        }
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A bundle directory with a rootfs, removed on drop.
    struct Bundle(PathBuf);

    impl Bundle {
        fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hull-spec-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(dir.join("rootfs")).unwrap();
            Self(dir)
        }

        fn parse(&self, spec: &Value) -> Result<BundleSpec, SpecError> {
            BundleSpec::parse(&self.0, self.0.join("config.json"), &spec.to_string())
        }
    }

    impl Drop for Bundle {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn minimal() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "terminal": false},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "network"}]}
        })
    }

    #[test]
    fn the_network_namespace_is_hull_vmm_s_and_host_networking_is_refused() {
        let bundle = Bundle::new();
        let spec = bundle.parse(&minimal()).unwrap();
        assert_eq!(spec.netns, NetNamespace::New);
        assert_eq!(spec.container.namespaces.len(), 1, "a new one in the guest");
        assert_eq!(spec.container.namespaces[0].path, None);
        let config = spec.vm_config(&paths(), 2);
        assert_eq!(config.netns, Some(NetNamespace::New));
        assert_eq!(config.nic_slots, crate::network::NIC_SLOTS);

        let mut joined = minimal();
        joined["linux"]["namespaces"] =
            json!([{"type": "pid"}, {"type": "network", "path": "/proc/self/ns/net"}]);
        let spec = bundle.parse(&joined).unwrap();
        assert_eq!(spec.netns, NetNamespace::Path("/proc/self/ns/net".into()));
        assert_eq!(spec.container.namespaces.len(), 2);
        assert!(spec.container.namespaces.iter().all(|n| n.path.is_none()));

        let mut host = minimal();
        host["linux"]["namespaces"] = json!([{"type": "pid"}]);
        let err = bundle.parse(&host).unwrap_err().to_string();
        assert!(
            err.contains(
                "field `linux.namespaces` = [{\"type\":\"pid\"}]: has no `network` namespace"
            ) && err.contains("host networking"),
            "{err}"
        );
        let mut none = minimal();
        none.as_object_mut().unwrap().remove("linux");
        let err = bundle.parse(&none).unwrap_err().to_string();
        assert!(
            err.contains("field `linux.namespaces` = null: has no `network`"),
            "{err}"
        );
    }

    fn paths() -> VmPaths {
        VmPaths {
            kernel: "/g/vmlinux".into(),
            initramfs: "/g/initramfs.cpio".into(),
            console: "/run/hull/t/console.log".into(),
            vsock_uds: "/run/hull/t/vsock.sock".into(),
            binds_dir: "/run/hull/t/binds".into(),
        }
    }

    #[test]
    fn bind_mounts_of_host_paths_go_through_the_binds_share() {
        let bundle = Bundle::new();
        std::fs::create_dir(bundle.0.join("vol")).unwrap();
        std::fs::write(bundle.0.join("hosts"), "x").unwrap();
        std::os::unix::fs::symlink("vol", bundle.0.join("link")).unwrap();
        let mut spec = minimal();
        spec["mounts"] = json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "vol", "options": ["rbind", "ro", "rw"]},
            {"destination": "/etc/hosts", "source": bundle.0.join("hosts"), "options": ["bind", "ro"]},
            {"destination": "/l", "type": "none", "source": "link", "options": ["rbind"]}
        ]);
        let parsed = bundle.parse(&spec).unwrap();
        let vol = bundle.0.join("vol").canonicalize().unwrap();
        let bind = |source: PathBuf, name: &str, read_only, recursive| HostBind {
            source,
            name: name.into(),
            read_only,
            recursive,
        };
        assert_eq!(
            parsed.binds,
            [
                bind(vol.clone(), "1", false, true),
                bind(
                    bundle.0.join("hosts").canonicalize().unwrap(),
                    "2",
                    true,
                    false
                ),
                // A link is followed on the host, as mount(2) does.
                bind(vol, "3", false, true),
            ]
        );
        let sources: Vec<_> = parsed
            .container
            .mounts
            .iter()
            .map(|m| m.source.clone().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/run/hull/binds/1",
                "/run/hull/binds/2",
                "/run/hull/binds/3"
            ]
        );
        let vm = parsed.vm_config(&paths(), 2);
        assert_eq!(vm.shared_dirs[1].binds, parsed.binds);

        spec["mounts"][1]["source"] = json!("/nonexistent-hull/vol");
        let err = bundle.parse(&spec).unwrap_err().to_string();
        assert!(
            err.contains("mounts[1].source") && err.contains("/nonexistent-hull/vol"),
            "{err}"
        );
        spec["mounts"][1]["source"] = json!("/dev/null");
        let err = bundle.parse(&spec).unwrap_err().to_string();
        assert!(err.contains("directory or a regular file"), "{err}");
    }

    #[test]
    fn minimal_spec_maps_to_a_default_vm() {
        let bundle = Bundle::new();
        let spec = bundle.parse(&minimal()).unwrap();
        assert_eq!(spec.rootfs, bundle.0.join("rootfs").canonicalize().unwrap());
        assert!(!spec.readonly);
        let vm = spec.vm_config(&paths(), 2);
        assert_eq!(vm.kernel, PathBuf::from("/g/vmlinux"));
        assert_eq!(vm.initramfs, Some("/g/initramfs.cpio".into()));
        assert_eq!(vm.cmdline, "hull.serve");
        assert_eq!((vm.vcpus, vm.mem_size_mib), (1, 256));
        assert_eq!(
            vm.console,
            hull_contract::vm::ConsoleConfig::File("/run/hull/t/console.log".into())
        );
        assert_eq!(
            vm.shared_dirs,
            vec![
                SharedDirConfig {
                    tag: "rootfs".into(),
                    path: spec.rootfs.clone(),
                    read_only: false,
                    binds: vec![],
                },
                SharedDirConfig {
                    tag: "hull-binds".into(),
                    path: "/run/hull/t/binds".into(),
                    read_only: false,
                    binds: vec![],
                }
            ]
        );
        let vsock = vm.vsock.unwrap();
        assert_eq!(vsock.guest_cid, 3);
        assert_eq!(vsock.uds_path, PathBuf::from("/run/hull/t/vsock.sock"));
        // The spec goes to the agent unchanged.
        assert_eq!(spec.spec, minimal());
    }

    #[test]
    fn readonly_root_and_absolute_root_path() {
        let bundle = Bundle::new();
        let mut s = minimal();
        s["root"] = json!({"path": bundle.0.join("rootfs"), "readonly": true});
        let spec = bundle.parse(&s).unwrap();
        assert!(spec.readonly);
        assert!(spec.vm_config(&paths(), 1).shared_dirs[0].read_only);
    }

    #[test]
    fn cpu_resources_map_to_vcpus_capped_by_the_host() {
        let bundle = Bundle::new();
        let cases = [
            (json!({"quota": 150000, "period": 100000}), 2),
            (json!({"quota": 100000, "period": 100000}), 1),
            (json!({"quota": 50000}), 1),
            (json!({"quota": 250000}), 3),
            (json!({"quota": -1, "cpus": "0-3"}), 4),
            (json!({"cpus": "0,2,4-5"}), 4),
            (json!({"shares": 1024}), 1),
        ];
        for (cpu, want) in cases {
            let mut s = minimal();
            s["linux"]["resources"] = json!({"cpu": cpu.clone()});
            let spec = bundle.parse(&s).unwrap();
            assert_eq!(spec.vcpus, want, "{cpu}");
            assert_eq!(u32::from(spec.vm_config(&paths(), 255).vcpus), want);
        }
        let mut s = minimal();
        s["linux"]["resources"] = json!({"cpu": {"cpus": "0-63"}});
        let spec = bundle.parse(&s).unwrap();
        assert_eq!(spec.vm_config(&paths(), 2).vcpus, 2);

        s["linux"]["resources"] = json!({"cpu": {"cpus": "3-1"}});
        let err = bundle.parse(&s).unwrap_err().to_string();
        assert!(
            err.contains("field `linux.resources.cpu.cpus` = \"3-1\""),
            "{err}"
        );
        s["linux"]["resources"] = json!({"cpu": {"quota": 1000, "period": 0}});
        let err = bundle.parse(&s).unwrap_err().to_string();
        assert!(
            err.contains("field `linux.resources.cpu.period` = 0"),
            "{err}"
        );
    }

    #[test]
    fn memory_limit_maps_to_guest_memory() {
        assert_eq!(mem_size_mib(None), 256);
        // Small limits get the minimum.
        assert_eq!(mem_size_mib(Some(4 << 20)), 128);
        // Rounded up to MiB, plus headroom.
        assert_eq!(mem_size_mib(Some(512 << 20)), 512 + 64);
        assert_eq!(mem_size_mib(Some((512 << 20) + 1)), 513 + 64);
        assert_eq!(mem_size_mib(Some(u64::MAX)), MAX_MEM_SIZE_MIB);

        let bundle = Bundle::new();
        let mut s = minimal();
        s["linux"]["resources"] = json!({"memory": {"limit": 268435456}});
        assert_eq!(
            bundle
                .parse(&s)
                .unwrap()
                .vm_config(&paths(), 1)
                .mem_size_mib,
            320
        );
        s["linux"]["resources"] = json!({"memory": {"limit": -1}});
        assert_eq!(
            bundle
                .parse(&s)
                .unwrap()
                .vm_config(&paths(), 1)
                .mem_size_mib,
            256
        );
        s["linux"]["resources"] = json!({"memory": {"limit": "1G"}});
        let err = bundle.parse(&s).unwrap_err().to_string();
        assert!(
            err.contains("field `linux.resources.memory.limit` = \"1G\""),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_names_the_file_and_position() {
        let bundle = Bundle::new();
        let path = bundle.0.join("config.json");
        let err = BundleSpec::parse(&bundle.0, path.clone(), "{\n  \"process\": {,\n}")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("{}: malformed JSON: ", path.display())),
            "{err}"
        );
        assert!(err.contains("line 2 column"), "{err}");

        std::fs::write(&path, "[1, 2").unwrap();
        let err = BundleSpec::load(&bundle.0).unwrap_err().to_string();
        assert!(err.contains("config.json: malformed JSON"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = BundleSpec::load(&bundle.0).unwrap_err().to_string();
        assert_eq!(err, format!("cannot read {}", path.display()));
    }

    #[test]
    fn missing_and_bad_fields_name_field_and_value() {
        let bundle = Bundle::new();
        let file = bundle.0.join("config.json").display().to_string();
        let check = |edit: &dyn Fn(&mut Value), want: &str| {
            let mut s = minimal();
            edit(&mut s);
            let err = bundle.parse(&s).unwrap_err().to_string();
            assert_eq!(err, format!("{file}: {want}"));
        };
        check(
            &|s| s["process"].as_object_mut().unwrap().clear(),
            "field `process.args` is missing",
        );
        check(
            &|s| {
                s.as_object_mut().unwrap().remove("process");
            },
            "field `process` is missing",
        );
        check(
            &|s| s["process"]["args"] = json!([]),
            "field `process.args` = []: must name a program",
        );
        check(
            &|s| s["process"]["args"] = json!("sh"),
            "field `process.args` = \"sh\": must be an array of strings",
        );
        check(
            &|s| s["process"]["terminal"] = json!("yes"),
            "field `process.terminal` = \"yes\": must be a boolean",
        );
        check(
            &|s| {
                s.as_object_mut().unwrap().remove("root");
            },
            "field `root.path` is missing",
        );
        check(
            &|s| s["root"]["readonly"] = json!("yes"),
            "field `root.readonly` = \"yes\": must be a boolean",
        );
        let missing = bundle.0.join("nope");
        check(
            &|s| s["root"]["path"] = json!("nope"),
            &format!(
                "field `root.path` = \"nope\": rootfs directory {}: No such file or directory (os error 2)",
                missing.display()
            ),
        );
        std::fs::write(bundle.0.join("afile"), "").unwrap();
        let err = {
            let mut s = minimal();
            s["root"]["path"] = json!("afile");
            bundle.parse(&s).unwrap_err().to_string()
        };
        assert!(err.ends_with("afile is not a directory"), "{err}");
    }

    #[test]
    fn a_missing_kernel_is_named_by_vm_validation() {
        let bundle = Bundle::new();
        let spec = bundle.parse(&minimal()).unwrap();
        let mut p = paths();
        p.kernel = "/no/such/vmlinux".into();
        p.vsock_uds = bundle.0.join("vsock.sock");
        let err = spec.vm_config(&p, 1).validate(1).unwrap_err().to_string();
        assert!(
            err.starts_with("field `kernel` = /no/such/vmlinux: No such file"),
            "{err}"
        );
    }

    #[test]
    fn a_pod_vm_is_sized_by_its_annotations_or_the_defaults() {
        let path = Path::new("/b/config.json");
        let with = |annotations: Value| json!({"annotations": annotations});
        assert_eq!(
            pod_size(&json!({}), path).unwrap(),
            PodSize {
                vcpus: DEFAULT_POD_VCPUS,
                mem_size_mib: DEFAULT_POD_MEM_SIZE_MIB
            }
        );
        let sized = pod_size(
            &with(json!({POD_VCPUS_ANNOTATION: "2", POD_MEMORY_ANNOTATION: "768"})),
            path,
        )
        .unwrap();
        assert_eq!((sized.vcpus, sized.mem_size_mib), (2, 768));
        let cri = pod_size(
            &with(json!({CRI_SANDBOX_MEMORY_ANNOTATION: "268435456"})),
            path,
        );
        assert_eq!(cri.unwrap().mem_size_mib, 256 + MEM_HEADROOM_MIB);
        for bad in [
            json!({POD_VCPUS_ANNOTATION: "0"}),
            json!({POD_VCPUS_ANNOTATION: "two"}),
            json!({POD_MEMORY_ANNOTATION: "16"}),
            json!({POD_MEMORY_ANNOTATION: 512}),
        ] {
            let err = pod_size(&with(bad.clone()), path).unwrap_err().to_string();
            let name = bad.as_object().unwrap().keys().next().unwrap().clone();
            assert!(err.contains(&name) && err.contains("config.json"), "{err}");
        }
    }
}
