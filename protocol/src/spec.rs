//! What the agent needs of a container's OCI spec, in the protocol's own types.
//!
//! The host reads the bundle's whole `config.json` (with `oci-spec`), refuses what hull cannot
//! honour with the file, field and value, and sends the agent this: only the fields the guest
//! acts on, with every closed set of names (namespaces, resource limits, capabilities, seccomp
//! actions and operators, device kinds, mount propagation) already resolved into enums or bit
//! sets. The agent therefore has no OCI parser of its own, and a name it could not apply cannot
//! reach it. Open-ended strings stay strings: mount types and options, paths, sysctl keys and
//! system call names (which, as in runc, are skipped when the guest's table lacks them).
//!
//! JSON layout follows the OCI spec's camelCase where the field is the spec's; enums are
//! snake_case (`"network"`, `"rlimit_nofile"`, `{"errno": 1}`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The container, as the agent sets it up (`create_container`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// The init process.
    pub process: Process,
    /// `root.readonly`.
    #[serde(default)]
    pub readonly_root: bool,
    /// `hostname`; the host has checked that the spec has a UTS namespace if it is set.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `domainname`; like `hostname`, only with a UTS namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domainname: Option<String>,
    /// `linux.personality`'s domain, set for the init before `execve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personality: Option<Personality>,
    /// `mounts`, in order.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// `linux.namespaces`, at most one of each type.
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// `linux.maskedPaths`.
    #[serde(default)]
    pub masked_paths: Vec<String>,
    /// `linux.readonlyPaths`.
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    /// `linux.rootfsPropagation` (`private` when the spec gives none).
    #[serde(default)]
    pub rootfs_propagation: Propagation,
    /// `linux.sysctl`.
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    /// `linux.seccomp`.
    #[serde(default)]
    pub seccomp: Option<Seccomp>,
    /// `linux.devices`.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// `linux.uidMappings`, when the container has a user namespace of its own (checked by the
    /// host: given exactly then, sizes positive, no overflow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uid_mappings: Vec<IdMapping>,
    /// `linux.gidMappings`, likewise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gid_mappings: Vec<IdMapping>,
    /// `linux.resources.pids.limit`, if positive: the most tasks the container's cgroup in the
    /// guest may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
    /// `linux.resources.memory.limit` in bytes, if positive: the container's cgroup's
    /// `memory.max` in the guest (the VM has this plus headroom for the kernel and agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
}

impl ContainerSpec {
    /// Whether the container gets a new namespace of this kind (one without a `path`: a path
    /// names a namespace on the host, which the VMM handles; in the guest the container then
    /// shares the agent's).
    pub fn unshares(&self, kind: NamespaceKind) -> bool {
        self.namespaces
            .iter()
            .any(|ns| ns.kind == kind && ns.path.is_none())
    }
}

/// An OCI `process` (the spec's, or an exec's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub user: User,
    /// Never empty.
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Absolute.
    pub cwd: String,
    /// `None`: the process keeps the agent's capabilities, as the spec gave none.
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    /// `process.oomScoreAdj` (-1000 to 1000), written to `/proc/self/oom_score_adj` before
    /// the process drops its capabilities; `None`: the process keeps what it inherits (an
    /// exec'd process: the container's init's value, see the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub umask: Option<u32>,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// `process.capabilities`: each set as a mask, bit N for capability number N
/// ([`crate::CAPABILITY_NAMES`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: u64,
    #[serde(default)]
    pub effective: u64,
    #[serde(default)]
    pub inheritable: u64,
    #[serde(default)]
    pub permitted: u64,
    #[serde(default)]
    pub ambient: u64,
}

impl Capabilities {
    /// The mask of a list of capability names; the first unknown name is the error.
    pub fn mask<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<u64, &'a str> {
        names.into_iter().try_fold(0u64, |bits, name| {
            crate::CAPABILITY_NAMES
                .iter()
                .position(|n| *n == name)
                .map(|index| bits | 1 << index)
                .ok_or(name)
        })
    }
}

/// `process.rlimits[]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub kind: RlimitKind,
    pub hard: u64,
    pub soft: u64,
}

/// The resource of an rlimit (`RLIMIT_NOFILE` is [`RlimitKind::Nofile`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RlimitKind {
    As,
    Core,
    Cpu,
    Data,
    Fsize,
    Locks,
    Memlock,
    Msgqueue,
    Nice,
    Nofile,
    Nproc,
    Rss,
    Rtprio,
    Rttime,
    Sigpending,
    Stack,
}

impl RlimitKind {
    /// Every kind, with its OCI name.
    pub const ALL: [(RlimitKind, &'static str); 16] = [
        (RlimitKind::As, "RLIMIT_AS"),
        (RlimitKind::Core, "RLIMIT_CORE"),
        (RlimitKind::Cpu, "RLIMIT_CPU"),
        (RlimitKind::Data, "RLIMIT_DATA"),
        (RlimitKind::Fsize, "RLIMIT_FSIZE"),
        (RlimitKind::Locks, "RLIMIT_LOCKS"),
        (RlimitKind::Memlock, "RLIMIT_MEMLOCK"),
        (RlimitKind::Msgqueue, "RLIMIT_MSGQUEUE"),
        (RlimitKind::Nice, "RLIMIT_NICE"),
        (RlimitKind::Nofile, "RLIMIT_NOFILE"),
        (RlimitKind::Nproc, "RLIMIT_NPROC"),
        (RlimitKind::Rss, "RLIMIT_RSS"),
        (RlimitKind::Rtprio, "RLIMIT_RTPRIO"),
        (RlimitKind::Rttime, "RLIMIT_RTTIME"),
        (RlimitKind::Sigpending, "RLIMIT_SIGPENDING"),
        (RlimitKind::Stack, "RLIMIT_STACK"),
    ];

    /// The kind of an OCI name such as `RLIMIT_NOFILE`.
    pub fn from_oci(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
    }

    /// The OCI name.
    pub fn oci_name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("RLIMIT_?", |(_, n)| n)
    }
}

/// `mounts[]`, as in the spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

impl Mount {
    /// A bind mount: type `bind`, or a `bind`/`rbind` option.
    pub fn is_bind(&self) -> bool {
        self.kind.as_deref() == Some("bind")
            || self.options.iter().any(|o| o == "bind" || o == "rbind")
    }
}

/// `linux.namespaces[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub kind: NamespaceKind,
    /// A namespace to join instead of a new one: on the host (see [`ContainerSpec::unshares`]).
    #[serde(default)]
    pub path: Option<String>,
}

/// The namespace types the guest can give a container. A user or time namespace is refused by
/// the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceKind {
    Pid,
    Network,
    Mount,
    Ipc,
    Uts,
    Cgroup,
    /// Made in the guest, with [`ContainerSpec::uid_mappings`] and `gid_mappings`: the host
    /// refuses a `path` for it (a VM cannot join a namespace of the host).
    User,
}

/// One line of `linux.uidMappings` or `gidMappings`: the `size` ids from `container_id` of
/// the container's user namespace are the ids from `host_id` of the guest's (whose ids are the
/// host's: the file server acts with them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdMapping {
    #[serde(rename = "containerID")]
    pub container_id: u32,
    #[serde(rename = "hostID")]
    pub host_id: u32,
    pub size: u32,
}

impl IdMapping {
    /// The id in the parent namespace of `id` in the container's, if this line maps it.
    pub fn map(&self, id: u32) -> Option<u32> {
        let offset = id.checked_sub(self.container_id)?;
        (offset < self.size).then(|| self.host_id + offset)
    }
}

/// Whether `mappings` map `id` of the container's user namespace.
pub fn is_mapped(mappings: &[IdMapping], id: u32) -> bool {
    mappings.iter().any(|m| m.map(id).is_some())
}

/// `linux.personality.domain` (the host refuses `flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Personality {
    /// `PER_LINUX`.
    Linux,
    /// `PER_LINUX32`: `uname` says i686.
    Linux32,
}

/// `linux.rootfsPropagation`; `rshared` and friends are the same as `shared`, since the
/// propagation is always set recursively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    #[default]
    Private,
    Slave,
    Shared,
    Unbindable,
}

impl Propagation {
    /// The propagation of an OCI value (`private`, `rprivate`, `slave`, ...).
    pub fn from_oci(value: &str) -> Option<Self> {
        Some(match value {
            "private" | "rprivate" => Self::Private,
            "slave" | "rslave" => Self::Slave,
            "shared" | "rshared" => Self::Shared,
            "unbindable" | "runbindable" => Self::Unbindable,
            _ => return None,
        })
    }
}

/// `linux.seccomp`, its action names resolved. `architectures` is not carried: the guest is
/// x86_64 and the agent's filter checks for that architecture whatever the list says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seccomp {
    pub default_action: SeccompAction,
    /// `SECCOMP_FILTER_FLAG_LOG`.
    #[serde(default)]
    pub log: bool,
    /// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`.
    #[serde(default)]
    pub spec_allow: bool,
    #[serde(default)]
    pub syscalls: Vec<SeccompRule>,
}

/// What a seccomp rule does. `SCMP_ACT_KILL` is [`SeccompAction::KillThread`], as in libseccomp;
/// an `SCMP_ACT_ERRNO` without `errnoRet` is `EPERM`, as in runc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    Allow,
    /// At most 4095.
    Errno(u32),
    KillThread,
    KillProcess,
    Trap,
    Log,
}

/// `linux.seccomp.syscalls[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompRule {
    pub names: Vec<String>,
    pub action: SeccompAction,
    #[serde(default)]
    pub args: Vec<SeccompArg>,
}

/// A condition on one argument of a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompArg {
    /// 0 to 5.
    pub index: u8,
    pub op: SeccompOp,
}

/// How the argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompOp {
    Eq(u64),
    Ne(u64),
    Lt(u64),
    Le(u64),
    Gt(u64),
    Ge(u64),
    /// `(arg & mask) == value`.
    MaskedEq {
        mask: u64,
        value: u64,
    },
}

/// `linux.devices[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub path: String,
    pub kind: DeviceKind,
    #[serde(default)]
    pub major: i64,
    #[serde(default)]
    pub minor: i64,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

/// A device node's type: OCI's `c` (or `u`), `b` and `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Char,
    Block,
    Fifo,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn capability_masks_take_known_names_and_name_the_first_unknown_one() {
        assert_eq!(
            Capabilities::mask(["CAP_CHOWN", "CAP_KILL"]),
            Ok(1 | 1 << 5)
        );
        assert_eq!(Capabilities::mask([]), Ok(0));
        assert_eq!(
            Capabilities::mask(["CAP_KILL", "CAP_NOPE", "CAP_ALSO_NOPE"]),
            Err("CAP_NOPE")
        );
    }

    #[test]
    fn rlimit_and_propagation_names_map_both_ways() {
        for (kind, name) in RlimitKind::ALL {
            assert_eq!(RlimitKind::from_oci(name), Some(kind));
            assert_eq!(kind.oci_name(), name);
        }
        assert_eq!(RlimitKind::from_oci("RLIMIT_NOPE"), None);
        assert_eq!(Propagation::from_oci("rshared"), Some(Propagation::Shared));
        assert_eq!(Propagation::from_oci("private"), Some(Propagation::Private));
        assert_eq!(Propagation::from_oci("sideways"), None);
    }

    #[test]
    fn the_wire_layout_is_stable() {
        let spec = ContainerSpec {
            process: Process {
                args: vec!["sh".into()],
                cwd: "/".into(),
                capabilities: Some(Capabilities {
                    bounding: 32,
                    ..Capabilities::default()
                }),
                rlimits: vec![Rlimit {
                    kind: RlimitKind::Nofile,
                    hard: 1024,
                    soft: 512,
                }],
                ..Process::default()
            },
            namespaces: vec![Namespace {
                kind: NamespaceKind::Network,
                path: Some("/var/run/netns/x".into()),
            }],
            seccomp: Some(Seccomp {
                default_action: SeccompAction::Errno(1),
                log: false,
                spec_allow: false,
                syscalls: vec![SeccompRule {
                    names: vec!["personality".into()],
                    action: SeccompAction::Allow,
                    args: vec![SeccompArg {
                        index: 0,
                        op: SeccompOp::MaskedEq {
                            mask: 255,
                            value: 8,
                        },
                    }],
                }],
            }),
            devices: vec![Device {
                path: "/dev/fuse".into(),
                kind: DeviceKind::Char,
                major: 10,
                minor: 229,
                file_mode: None,
                uid: None,
                gid: None,
            }],
            ..ContainerSpec::default()
        };
        let value = serde_json::to_value(&spec).unwrap();
        assert_eq!(value["process"]["capabilities"]["bounding"], json!(32));
        assert_eq!(
            value["process"]["rlimits"][0],
            json!({"kind": "nofile", "hard": 1024, "soft": 512})
        );
        assert_eq!(
            value["namespaces"][0],
            json!({"kind": "network", "path": "/var/run/netns/x"})
        );
        assert_eq!(value["rootfsPropagation"], json!("private"));
        assert_eq!(value["seccomp"]["defaultAction"], json!({"errno": 1}));
        assert_eq!(
            value["seccomp"]["syscalls"][0]["args"][0],
            json!({"index": 0, "op": {"masked_eq": {"mask": 255, "value": 8}}})
        );
        assert_eq!(value["devices"][0]["kind"], json!("char"));
        let back: ContainerSpec = serde_json::from_value(value).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn unshares_ignores_namespaces_joined_by_path() {
        let spec = ContainerSpec {
            namespaces: vec![
                Namespace {
                    kind: NamespaceKind::Pid,
                    path: None,
                },
                Namespace {
                    kind: NamespaceKind::Network,
                    path: Some("/proc/1/ns/net".into()),
                },
            ],
            ..ContainerSpec::default()
        };
        assert!(spec.unshares(NamespaceKind::Pid));
        assert!(!spec.unshares(NamespaceKind::Network));
        assert!(!spec.unshares(NamespaceKind::Uts));
    }
}
