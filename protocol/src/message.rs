//! The messages of the control connection, after the handshake.
//!
//! The host sends [`HostMessage::Request`]s, each with an id of its choosing; the agent answers
//! each with one [`AgentMessage::Response`] carrying the same id, in any order (a [`Wait`] is
//! answered only when its process ends, and other requests are answered meanwhile). The agent
//! also sends [`AgentMessage::Event`]s on its own, e.g. when a process exits.
//!
//! JSON layout: enums are externally tagged with snake_case names (`"start_container"`,
//! `{"exec": {...}}`); [`Response::result`] is serde's `{"Ok": ...}` / `{"Err": ...}`.
//! Unknown fields are ignored, so a field an older peer may safely ignore can be added without a
//! version change (docs/protocol.md, "Versioning").
//!
//! The container's spec and an exec's process travel in the protocol's own types
//! ([`crate::spec`]): the host has read and checked the whole `config.json`, and the agent gets
//! only what it acts on, with every name it could not apply already refused.
//!
//! [`Wait`]: RequestBody::Wait

use serde::{Deserialize, Serialize};

use crate::hello::{AgentHello, HelloRejected, HostHello};
use crate::spec::{ContainerSpec, Process};

/// Everything the host sends on the control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMessage {
    /// The first frame, and only the first.
    Hello(HostHello),
    Request(Request),
}

/// Everything the agent sends on the control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMessage {
    /// The answer to a compatible [`HostMessage::Hello`].
    Hello(AgentHello),
    /// The answer to an incompatible (or missing) hello; the agent then closes the connection.
    HelloRejected(HelloRejected),
    Response(Response),
    Event(Event),
}

/// A request and the id its response will carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the host, unique among its requests not yet answered.
    pub id: u64,
    pub body: RequestBody,
}

/// Which process of the container a request or stream is about.
///
/// JSON: `"init"` or `{"exec": "<exec_id>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRef {
    /// The container's own process (the spec's `process`), started by `start_container`.
    Init,
    /// A process added by [`Exec`], by the id the host gave it.
    Exec(String),
    /// In a pod VM ([`CreateContainer::pod`]), the init of the container with this id.
    Container(String),
}

impl std::fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessRef::Init => f.write_str("the init process"),
            ProcessRef::Exec(exec_id) => write!(f, "exec {exec_id:?}"),
            ProcessRef::Container(id) => write!(f, "the init process of container {id:?}"),
        }
    }
}

/// How a process's standard streams are connected. The host opens one stream connection per
/// stream named here before sending the request (see [`crate::stdio`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stdio {
    /// No terminal: each stream that is `true` is a stream connection; one that is `false` is
    /// `/dev/null` in the guest.
    Pipes {
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
    /// A pseudo-terminal in the guest: its master is relayed over one stream connection
    /// ([`StreamKind::Terminal`]) in both directions; stdin, stdout and stderr are its slave.
    /// Must agree with the process's `terminal` field.
    Terminal {
        /// Initial window size; [`RequestBody::ResizeTerminal`] changes it.
        rows: u16,
        cols: u16,
    },
}

impl Stdio {
    /// No streams at all: every standard stream is `/dev/null`.
    pub const NULL: Stdio = Stdio::Pipes {
        stdin: false,
        stdout: false,
        stderr: false,
    };

    /// The stream connections this setting needs, in the order the host should open them.
    pub fn streams(&self) -> Vec<StreamKind> {
        match *self {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => [
                (stdin, StreamKind::Stdin),
                (stdout, StreamKind::Stdout),
                (stderr, StreamKind::Stderr),
            ]
            .into_iter()
            .filter_map(|(wanted, kind)| wanted.then_some(kind))
            .collect(),
            Stdio::Terminal { .. } => vec![StreamKind::Terminal],
        }
    }
}

/// One stream connection's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Host to guest; the host closes the connection at the end of its input.
    Stdin,
    /// Guest to host; the agent closes the connection at the end of the process's output.
    Stdout,
    /// Guest to host, like stdout.
    Stderr,
    /// Both ways: the pty master. The agent closes it once the process has ended and the
    /// output is drained.
    Terminal,
}

impl std::fmt::Display for StreamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Terminal => "terminal",
        })
    }
}

/// The container's root file system: a virtio-fs share the VMM serves from the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    /// The virtio-fs tag to mount.
    pub fs_tag: String,
    /// Mount it read-only (the agent also does so when the spec's `root.readonly` is set).
    pub readonly: bool,
    /// In a pod VM: the share holds every container's rootfs, and this one's is this relative
    /// directory of it. The agent mounts the share on [`POD_DIR`] and the rootfs from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdir: Option<String>,
}

/// The virtio-fs tag of a pod VM's one share: `<container id>/rootfs` and
/// `<container id>/binds/<index>` for each container, attached by the host while the VM runs.
pub const POD_FS_TAG: &str = "hull-pod";
/// Where the agent mounts the pod's share; the host points a pod container's bind sources at
/// `POD_DIR/<container id>/binds/<index>`.
pub const POD_DIR: &str = "/run/hull/pod";

/// The virtio-fs tag of the share that carries the container's bind mounts from the host: one
/// entry per bind mount, named by its index in `mounts`.
pub const BINDS_FS_TAG: &str = "hull-binds";
/// Where the agent mounts that share; the host points each bind mount's source at
/// `BINDS_DIR/<index>`.
pub const BINDS_DIR: &str = "/run/hull/binds";

/// Sets a container up without starting its process (`hull create`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateContainer {
    pub container_id: String,
    /// What the agent needs of the bundle's `config.json`. Where the root file system is, is
    /// [`CreateContainer::rootfs`].
    pub spec: ContainerSpec,
    pub rootfs: Rootfs,
    /// The init process's streams.
    pub stdio: Stdio,
    /// The virtio-fs tag ([`BINDS_FS_TAG`]) to mount on [`BINDS_DIR`] before the spec's
    /// mounts, when the spec has bind mounts of host paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binds_fs_tag: Option<String>,
    /// A container of a pod VM: one of several, its init is [`ProcessRef::Container`], it has
    /// a cgroup of its own, and the namespaces its spec does not make new are the VM's (the
    /// pod's network, IPC and UTS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pod: bool,
}

/// Starts another process in the running container (`hull exec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    /// Chosen by the host, unique for the life of the container (an id is never reused).
    pub exec_id: String,
    /// The process, checked by the host as the spec's own.
    pub process: Process,
    pub stdio: Stdio,
    /// In a pod VM, the container the process joins; none means the VM's one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// A pod container's limits, changed while it runs (`update`). `None` leaves one as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// `memory.max` in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// `pids.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
}

/// What a pod container's cgroup has used (answers `stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// `cpu.stat` `usage_usec`, `user_usec`, `system_usec`.
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    /// `memory.current` and `memory.max` (`u64::MAX` for `max`).
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    /// `memory.stat` `anon`, `file` and `inactive_file`: the working set is usage less
    /// inactive file pages, as the kubelet counts it.
    pub memory_anon_bytes: u64,
    pub memory_file_bytes: u64,
    pub memory_inactive_file_bytes: u64,
    /// `pids.current` and `pids.max` (`u64::MAX` for `max`).
    pub pids_current: u64,
    pub pids_limit: u64,
    /// `memory.events` `oom_kill`.
    pub oom_kills: u64,
}

/// The guest's network: the container's interfaces, mirrored from its network namespace on
/// the host onto NICs, with their addresses, and the routes through them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub interfaces: Vec<NetInterface>,
    /// Added once every interface is up, in order.
    pub routes: Vec<NetRoute>,
}

/// One NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetInterface {
    /// Its name in the guest: the mirrored interface's (`eth0`).
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`, the mirrored interface's.
    pub mac: String,
    pub mtu: u16,
    /// `ADDRESS/PREFIX`, IPv4 or IPv6.
    pub addresses: Vec<String>,
    /// The TAP on the host, in hull-vmm's network namespace, that hull-vmm puts in a NIC slot
    /// (the host's part; the agent ignores it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
    /// The guest's platform device of that slot (`virtio-mmio.N`), which the agent binds the
    /// virtio-mmio driver to; set by hull-vmm.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
}

/// The six bytes of a MAC written `aa:bb:cc:dd:ee:ff`, if it is one a NIC can take: unicast,
/// not all zeros.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    let mac: [u8; 6] = bytes.try_into().ok()?;
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One route of the main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRoute {
    /// `ADDRESS/PREFIX`; `None` is the default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The name of the interface it goes out of (one of [`NetworkConfig::interfaces`], or one
    /// the guest has already).
    pub interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestBody {
    /// Brings up NICs and adds routes; answered with [`ResponseBody::Ok`].
    ConfigureNetwork(Box<NetworkConfig>),
    /// Answered with [`ResponseBody::Ok`] once the container is ready to start.
    CreateContainer(Box<CreateContainer>),
    /// Starts the init process; answered with [`ResponseBody::Started`].
    StartContainer,
    /// Starts a process; answered with [`ResponseBody::Started`].
    Exec(Box<Exec>),
    /// Sends `signal` to a process; with `all`, to every process of the container (`kill
    /// --all`), and `process` must be [`ProcessRef::Init`]. Answered with [`ResponseBody::Ok`].
    Signal {
        process: ProcessRef,
        /// The signal number, as in the guest's (Linux's) `<signal.h>`.
        signal: i32,
        all: bool,
    },
    /// Sets a terminal's window size; answered with [`ResponseBody::Ok`].
    ResizeTerminal {
        process: ProcessRef,
        rows: u16,
        cols: u16,
    },
    /// Answered with [`ResponseBody::Exited`] when the process has ended (at once if it has).
    Wait { process: ProcessRef },
    /// Every process in the container (`hull ps`); answered with [`ResponseBody::Processes`].
    ListProcesses,
    /// Answered with [`ResponseBody::Ok`]; then the agent kills what is left, syncs and powers
    /// the VM off.
    Shutdown,
    /// Starts the init of a created container: [`ProcessRef::Init`] (as `start_container`) or
    /// a pod's [`ProcessRef::Container`]; answered with [`ResponseBody::Started`].
    Start { process: ProcessRef },
    /// The processes of a pod's container; answered with [`ResponseBody::Processes`].
    ContainerProcesses { container_id: String },
    /// What a pod's container has used; answered with [`ResponseBody::Stats`].
    Stats { container_id: String },
    /// Changes a pod container's limits; answered with [`ResponseBody::Ok`].
    Update {
        container_id: String,
        resources: Resources,
    },
    /// Forgets a pod's container once its init has ended, killing what is left of it and
    /// removing its cgroup; answered with [`ResponseBody::Ok`]. Its id may then be used again.
    RemoveContainer { container_id: String },
    /// Sets the VM's host name: a pod's, which its containers share (they make no UTS
    /// namespace of their own); answered with [`ResponseBody::Ok`].
    SetHostname { hostname: String },
}

/// An answer to the request with the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub result: Result<ResponseBody, ErrorResponse>,
}

/// What a request succeeded with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    /// Done; nothing to report. JSON: `"ok"`.
    Ok,
    /// The process is running with this pid (in the agent's PID namespace).
    Started { pid: i32 },
    /// The process has ended (answers `wait`).
    Exited { status: ExitStatus },
    /// The container's processes. JSON: `{"processes": [...]}`.
    Processes(Vec<ProcessInfo>),
    /// A pod container's use (answers `stats`).
    Stats(ContainerStats),
}

/// One process for `hull ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    /// The command line (`/proc/PID/cmdline`); empty for kernel threads and zombies.
    pub args: Vec<String>,
    /// The short name (`/proc/PID/comm`).
    pub comm: String,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ErrorResponse {
    pub kind: ErrorKind,
    /// Lowercase, naming the thing at fault, e.g. `no process with exec id "e1"`.
    pub message: String,
}

impl ErrorResponse {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The class of an error, for the host to act on (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame could not be parsed as a request, or a field is out of range.
    InvalidRequest,
    /// The spec or process is not valid OCI, or asks for something the guest cannot do.
    InvalidSpec,
    /// No such container, process or exec id.
    NotFound,
    /// The container or exec id is taken, or the stream is already attached.
    AlreadyExists,
    /// Not now: e.g. start before create, exec before start, a second create.
    InvalidState,
    /// A known request the agent does not implement.
    Unsupported,
    /// A system call in the guest failed.
    Io,
    /// A bug in the agent.
    Internal,
    /// A kind this side does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidRequest => "invalid request",
            ErrorKind::InvalidSpec => "invalid spec",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidState => "invalid state",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Io => "i/o error",
            ErrorKind::Internal => "internal error",
            ErrorKind::Unknown => "unknown error",
        })
    }
}

/// How a process ended. JSON: `{"code": N}` or `{"signal": N}`, as in the agent's
/// `HULL_AGENT_EXEC_EXIT` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this status.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal number. `hull-vmm` exits
    /// with this. The numbers come from the guest: a signal that is no signal (outside 1-127)
    /// gives 255 rather than an overflow or a status that names another signal.
    pub fn shell_status(&self) -> i32 {
        match *self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal @ 1..=127) => 128 + signal,
            ExitStatus::Signal(_) => 255,
        }
    }
}

/// What the agent reports on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A process started by `start_container` or `exec` has ended and been reaped. Sent once
    /// per process. Its output may still be in flight on its stream connections: the host
    /// relays them to their end (with a grace period for descendants that keep them open).
    Exited {
        process: ProcessRef,
        pid: i32,
        status: ExitStatus,
    },
}

/// The OCI spec's capability names (`CAP_KILL`, ...), indexed by their numbers in Linux's
/// `include/uapi/linux/capability.h`: what the agent can apply, and what `hull features`
/// lists.
pub const CAPABILITY_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The id of a request in a frame body that does not parse as a [`HostMessage`], so that the
/// agent can still answer it with [`ErrorKind::InvalidRequest`]. `None` if not even that is
/// readable.
pub fn request_id_of(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Probe {
        request: ProbeRequest,
    }
    #[derive(Deserialize)]
    struct ProbeRequest {
        id: u64,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()
        .map(|probe| probe.request.id)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::frame::{decode_body, encode_frame, FrameDecoder, FrameError};
    use crate::hello::{AgentHello, HelloRejected, HostHello};
    use crate::spec::{Namespace, NamespaceKind};

    fn spec() -> ContainerSpec {
        ContainerSpec {
            process: Process {
                args: vec!["sh".into(), "-c".into(), "echo hi".into()],
                cwd: "/".into(),
                ..Process::default()
            },
            readonly_root: true,
            hostname: Some("box".into()),
            namespaces: vec![
                Namespace {
                    kind: NamespaceKind::Pid,
                    path: None,
                },
                Namespace {
                    kind: NamespaceKind::Uts,
                    path: None,
                },
            ],
            ..ContainerSpec::default()
        }
    }

    fn requests() -> Vec<RequestBody> {
        vec![
            RequestBody::CreateContainer(Box::new(CreateContainer {
                container_id: "c1".into(),
                spec: spec(),
                rootfs: Rootfs {
                    fs_tag: "rootfs".into(),
                    readonly: true,
                    subdir: None,
                },
                stdio: Stdio::Pipes {
                    stdin: false,
                    stdout: true,
                    stderr: true,
                },
                binds_fs_tag: Some(BINDS_FS_TAG.into()),
                pod: false,
            })),
            RequestBody::StartContainer,
            RequestBody::Exec(Box::new(Exec {
                exec_id: "e1".into(),
                process: Process {
                    terminal: true,
                    args: vec!["ps".into()],
                    cwd: "/".into(),
                    ..Process::default()
                },
                stdio: Stdio::Terminal { rows: 24, cols: 80 },
                container_id: None,
            })),
            RequestBody::Signal {
                process: ProcessRef::Init,
                signal: 15,
                all: true,
            },
            RequestBody::Signal {
                process: ProcessRef::Exec("e1".into()),
                signal: 9,
                all: false,
            },
            RequestBody::ResizeTerminal {
                process: ProcessRef::Exec("e1".into()),
                rows: 50,
                cols: 132,
            },
            RequestBody::Wait {
                process: ProcessRef::Init,
            },
            RequestBody::ListProcesses,
            RequestBody::Shutdown,
        ]
    }

    fn host_messages() -> Vec<HostMessage> {
        let mut msgs = vec![HostMessage::Hello(HostHello::new("0.1.0"))];
        msgs.extend(requests().into_iter().enumerate().map(|(id, body)| {
            HostMessage::Request(Request {
                id: id as u64,
                body,
            })
        }));
        msgs
    }

    fn agent_messages() -> Vec<AgentMessage> {
        let results = vec![
            Ok(ResponseBody::Ok),
            Ok(ResponseBody::Started { pid: 7 }),
            Ok(ResponseBody::Exited {
                status: ExitStatus::Code(3),
            }),
            Ok(ResponseBody::Exited {
                status: ExitStatus::Signal(9),
            }),
            Ok(ResponseBody::Processes(vec![
                ProcessInfo {
                    pid: 7,
                    ppid: 1,
                    uid: 0,
                    args: vec!["sh".into(), "-c".into(), "sleep 1".into()],
                    comm: "sh".into(),
                },
                ProcessInfo {
                    pid: 8,
                    ppid: 7,
                    uid: 1000,
                    args: vec![],
                    comm: "sleep".into(),
                },
            ])),
            Err(ErrorResponse::new(
                ErrorKind::NotFound,
                "no process with exec id \"e9\"",
            )),
        ];
        let mut msgs = vec![
            AgentMessage::Hello(AgentHello {
                protocol_version: 1,
                agent_version: "0.1.0".into(),
                kernel_release: "6.12.0-hull".into(),
            }),
            AgentMessage::HelloRejected(HelloRejected {
                protocol_version: 1,
                min_protocol_version: 1,
                agent_version: "0.1.0".into(),
                message: "incompatible".into(),
            }),
            AgentMessage::Event(Event::Exited {
                process: ProcessRef::Init,
                pid: 7,
                status: ExitStatus::Signal(15),
            }),
        ];
        msgs.extend(results.into_iter().enumerate().map(|(id, result)| {
            AgentMessage::Response(Response {
                id: id as u64,
                result,
            })
        }));
        msgs
    }

    fn every_error_kind() -> Vec<ErrorKind> {
        vec![
            ErrorKind::InvalidRequest,
            ErrorKind::InvalidSpec,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::InvalidState,
            ErrorKind::Unsupported,
            ErrorKind::Io,
            ErrorKind::Internal,
            ErrorKind::Unknown,
        ]
    }

    #[test]
    fn every_host_message_round_trips() {
        for msg in host_messages() {
            let frame = encode_frame(&msg).unwrap();
            assert_eq!(decode_body::<HostMessage>(&frame[4..]).unwrap(), msg);
        }
    }

    #[test]
    fn every_agent_message_round_trips() {
        for msg in agent_messages() {
            let frame = encode_frame(&msg).unwrap();
            assert_eq!(decode_body::<AgentMessage>(&frame[4..]).unwrap(), msg);
        }
    }

    #[test]
    fn every_error_kind_round_trips() {
        for kind in every_error_kind() {
            let err = ErrorResponse::new(kind, "m");
            let text = serde_json::to_string(&err).unwrap();
            assert_eq!(serde_json::from_str::<ErrorResponse>(&text).unwrap(), err);
        }
    }

    #[test]
    fn all_messages_through_one_decoder() {
        let msgs = host_messages();
        let wire: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(3) {
            decoder.push(chunk).unwrap();
            while let Some(m) = decoder.next_message::<HostMessage>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }

    /// The wire layout is what docs/protocol.md shows; changing it needs a version change.
    #[test]
    fn wire_layout() {
        let mut cases: Vec<(serde_json::Value, serde_json::Value)> = vec![
            (
                serde_json::to_value(HostMessage::Request(Request {
                    id: 1,
                    body: RequestBody::StartContainer,
                }))
                .unwrap(),
                json!({"request": {"id": 1, "body": "start_container"}}),
            ),
            (
                serde_json::to_value(HostMessage::Request(Request {
                    id: 2,
                    body: RequestBody::Signal {
                        process: ProcessRef::Exec("e1".into()),
                        signal: 15,
                        all: false,
                    },
                }))
                .unwrap(),
                json!({"request": {"id": 2, "body": {"signal":
                    {"process": {"exec": "e1"}, "signal": 15, "all": false}}}}),
            ),
            (
                serde_json::to_value(AgentMessage::Response(Response {
                    id: 2,
                    result: Err(ErrorResponse::new(ErrorKind::NotFound, "no exec \"e1\"")),
                }))
                .unwrap(),
                json!({"response": {"id": 2, "result": {"Err":
                    {"kind": "not_found", "message": "no exec \"e1\""}}}}),
            ),
            (
                serde_json::to_value(AgentMessage::Response(Response {
                    id: 3,
                    result: Ok(ResponseBody::Started { pid: 12 }),
                }))
                .unwrap(),
                json!({"response": {"id": 3, "result": {"Ok": {"started": {"pid": 12}}}}}),
            ),
            (
                serde_json::to_value(AgentMessage::Event(Event::Exited {
                    process: ProcessRef::Init,
                    pid: 12,
                    status: ExitStatus::Code(0),
                }))
                .unwrap(),
                json!({"event": {"exited": {"process": "init", "pid": 12, "status": {"code": 0}}}}),
            ),
            (
                serde_json::to_value(Stdio::Pipes {
                    stdin: true,
                    stdout: true,
                    stderr: false,
                })
                .unwrap(),
                json!({"pipes": {"stdin": true, "stdout": true, "stderr": false}}),
            ),
        ];
        cases.push((
            serde_json::to_value(ResponseBody::Processes(vec![ProcessInfo {
                pid: 1,
                ppid: 0,
                uid: 0,
                args: vec!["sh".into()],
                comm: "sh".into(),
            }]))
            .unwrap(),
            json!({"processes": [{"pid": 1, "ppid": 0, "uid": 0, "args": ["sh"], "comm": "sh"}]}),
        ));
        cases.push((
            serde_json::to_value(ResponseBody::Exited {
                status: ExitStatus::Signal(9),
            })
            .unwrap(),
            json!({"exited": {"status": {"signal": 9}}}),
        ));
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text = r#"{"request": {"id": 5, "trace": "x", "body": {"wait":
            {"process": "init", "deadline_ms": 10}}}}"#;
        assert_eq!(
            serde_json::from_str::<HostMessage>(text).unwrap(),
            HostMessage::Request(Request {
                id: 5,
                body: RequestBody::Wait {
                    process: ProcessRef::Init
                }
            })
        );
    }

    #[test]
    fn unknown_error_kind_reads_as_unknown() {
        let err: ErrorResponse =
            serde_json::from_str(r#"{"kind": "quota_exceeded", "message": "too many"}"#).unwrap();
        assert_eq!(err.kind, ErrorKind::Unknown);
        assert_eq!(err.to_string(), "unknown error: too many");
    }

    #[test]
    fn unknown_request_is_a_decode_error_with_its_id() {
        let body = br#"{"request": {"id": 77, "body": "checkpoint"}}"#;
        let err = decode_body::<HostMessage>(body).unwrap_err();
        assert!(matches!(err, FrameError::Decode { .. }), "{err:?}");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("unknown variant `checkpoint`"), "{cause}");
        assert_eq!(request_id_of(body), Some(77));
        assert_eq!(request_id_of(b"{\"request\": {}}"), None);
        assert_eq!(request_id_of(b"\xff\x00"), None);
        assert_eq!(request_id_of(br#"{"hello": {"id": 1}}"#), None);
    }

    #[test]
    fn wrong_types_are_decode_errors() {
        for body in [
            &br#"{"request": {"id": -1, "body": "shutdown"}}"#[..],
            br#"{"request": {"id": 1, "body": {"resize_terminal":
                {"process": "init", "rows": 70000, "cols": 1}}}}"#,
            br#"{"request": {"id": 1, "body": {"signal": {"process": "init", "signal": 9}}}}"#,
            br#"{"request": {"id": 1, "body": {"exec": {"exec_id": "e"}}}}"#,
            br#"{"request": {"id": 1, "body": {"signal":
                {"process": {"pid": 3}, "signal": 9, "all": false}}}}"#,
            br#"[]"#,
            br#"null"#,
            br#"{"request": 1} trailing"#,
            b"",
        ] {
            assert!(
                decode_body::<HostMessage>(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn mutated_frames_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let bodies: Vec<Vec<u8>> = host_messages()
            .iter()
            .map(|m| serde_json::to_vec(m).unwrap())
            .chain(
                agent_messages()
                    .iter()
                    .map(|m| serde_json::to_vec(m).unwrap()),
            )
            .collect();
        for _ in 0..3_000 {
            let mut body = bodies[next() as usize % bodies.len()].clone();
            for _ in 0..1 + next() % 4 {
                let i = next() as usize % body.len();
                match next() % 3 {
                    0 => body[i] = next() as u8,
                    1 => {
                        body.remove(i);
                    }
                    _ => body.truncate(i),
                }
                if body.is_empty() {
                    break;
                }
            }
            let _ = decode_body::<HostMessage>(&body);
            let _ = decode_body::<AgentMessage>(&body);
            let _ = request_id_of(&body);
        }
    }

    #[test]
    fn stdio_streams() {
        assert_eq!(Stdio::NULL.streams(), []);
        assert_eq!(
            Stdio::Pipes {
                stdin: true,
                stdout: false,
                stderr: true
            }
            .streams(),
            [StreamKind::Stdin, StreamKind::Stderr]
        );
        assert_eq!(
            Stdio::Terminal { rows: 1, cols: 1 }.streams(),
            [StreamKind::Terminal]
        );
    }

    #[test]
    fn exit_status_as_a_shell_reports_it() {
        assert_eq!(ExitStatus::Code(0).shell_status(), 0);
        assert_eq!(ExitStatus::Code(3).shell_status(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_status(), 137);
        assert_eq!(ExitStatus::Signal(127).shell_status(), 255);
        // A guest that lies about the signal: no overflow, no other signal's status.
        for lie in [i32::MAX, 128, 0, -1, i32::MIN] {
            assert_eq!(ExitStatus::Signal(lie).shell_status(), 255, "{lie}");
        }
    }

    #[test]
    fn display_names_the_thing() {
        assert_eq!(ProcessRef::Init.to_string(), "the init process");
        assert_eq!(ProcessRef::Exec("e1".into()).to_string(), "exec \"e1\"");
        assert_eq!(
            ErrorResponse::new(ErrorKind::InvalidState, "container \"c1\" is not created")
                .to_string(),
            "invalid state: container \"c1\" is not created"
        );
    }
}
