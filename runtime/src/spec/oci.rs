//! The whole spec, read with `oci-spec` and turned into what the agent acts on.
//!
//! [`read`] deserializes a JSON value into an `oci-spec` type, with errors that name the file,
//! the field (the path inside the JSON, e.g. `process.capabilities.bounding[2]`) and the value.
//! [`container_spec`] and [`process`] then check what `oci-spec`'s types let through but the
//! guest cannot honour (a user namespace, a seccomp notify action, a capability the agent has no
//! number for, a relative `cwd`, ...) and give the protocol's types ([`hull_protocol::spec`]),
//! so that every refusal happens before a VM starts.
//!
//! Fields that hull does not implement and that weaken nothing when ignored (`apparmorProfile`,
//! `linux.resources` beyond what sizes the VM, `annotations`, ...) are ignored, as runc ignores
//! what its host lacks.

use std::collections::HashSet;
use std::path::Path;

use hull_protocol::spec::{
    is_mapped, Capabilities, ContainerSpec, Device, DeviceKind, IdMapping, Mount, Namespace,
    NamespaceKind, Personality, Process, Propagation, Rlimit, RlimitKind, Seccomp, SeccompAction,
    SeccompArg, SeccompOp, SeccompRule, User,
};
use oci_spec::runtime as oci;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::SpecError;

/// What `SCMP_ACT_ERRNO` returns without an `errnoRet`: `EPERM`, as in runc.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;
/// The largest errno the C library takes for one.
const MAX_ERRNO: u32 = 4095;
/// A system call has arguments 0 to 5.
const SYSCALL_ARGS: usize = 6;
/// The range of `/proc/<pid>/oom_score_adj`.
const OOM_SCORE_ADJ_MIN: i32 = -1000;
const OOM_SCORE_ADJ_MAX: i32 = 1000;
/// Why a runtime-spec 1.2 field is refused.
const NEWER_THAN_1_1: &str = "a runtime-spec 1.2 field, newer than the 1.1.0 hull implements \
     (see `hull features`); not applied, so refused";
/// Why an SELinux label is refused.
const NO_SELINUX: &str = "the guest kernel has no SELinux, so hull cannot label the container \
     (runc refuses a label on a host without SELinux too); leave it out (Docker and Podman: \
     --security-opt label=disable)";
/// Above this many bytes, serde's list of the names it expected is left out of an error.
const MAX_EXPECTED_LIST: usize = 160;

/// Where the JSON being read came from: a file, and the path of the value inside it (`""` for
/// the whole file, `"process"` for a spec's process).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub file: &'a Path,
    pub prefix: &'a str,
}

impl Origin<'_> {
    fn field(&self, inner: &str) -> String {
        match (self.prefix.is_empty(), inner.is_empty()) {
            (true, _) => inner.to_owned(),
            (false, true) => self.prefix.to_owned(),
            (false, false) if inner.starts_with('[') => format!("{}{inner}", self.prefix),
            (false, false) => format!("{}.{inner}", self.prefix),
        }
    }

    fn invalid(&self, field: &str, value: &impl Serialize, reason: impl Into<String>) -> SpecError {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        SpecError::invalid(self.file, self.field(field), &value, reason)
    }
}

/// Reads a whole spec. Fields OCI makes required but runc does not insist on keep runc's
/// defaults: a process without `user` runs as 0:0, without `cwd` in `/`.
pub fn read_spec(file: &Path, value: &Value) -> Result<oci::Spec, SpecError> {
    let mut value = value.clone();
    if let Some(process) = value.get_mut("process") {
        fill_process_defaults(process);
    }
    read(Origin { file, prefix: "" }, &value)
}

/// Reads a process (an exec's, or a spec's with `origin.prefix` "process"), with the defaults
/// of [`read_spec`].
pub fn read_process(origin: Origin<'_>, value: &Value) -> Result<oci::Process, SpecError> {
    let mut value = value.clone();
    fill_process_defaults(&mut value);
    read(origin, &value)
}

fn fill_process_defaults(process: &mut Value) {
    if let Value::Object(process) = process {
        process
            .entry("user")
            .or_insert_with(|| serde_json::json!({"uid": 0, "gid": 0}));
        process
            .entry("cwd")
            .or_insert_with(|| Value::String("/".into()));
    }
}

/// Deserializes `value` (from `origin`) as `T`.
fn read<T: DeserializeOwned>(origin: Origin<'_>, value: &Value) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = err.inner().to_string();
        if let Some(field) = missing_field(&message) {
            let field = if path.is_empty() {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            return SpecError::missing(origin.file, origin.field(&field));
        }
        let found = lookup(value, err.path()).unwrap_or(&Value::Null);
        SpecError::invalid(origin.file, origin.field(&path), found, shorten(&message))
    })
}

/// `missing field `x`` → `x`.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// serde's message without a long list of the names it expected.
fn shorten(message: &str) -> String {
    // oci-spec's own capability parser.
    if message.starts_with("no variant for ") {
        return "unknown capability; see `hull features` for what hull knows".to_owned();
    }
    match message.split_once(", expected one of ") {
        Some((head, list)) if list.len() > MAX_EXPECTED_LIST => {
            format!("{head}; see `hull features` for what hull knows")
        }
        _ => message.to_owned(),
    }
}

/// The value at a serde path in `value`.
fn lookup<'v>(value: &'v Value, path: &serde_path_to_error::Path) -> Option<&'v Value> {
    use serde_path_to_error::Segment;
    path.iter().try_fold(value, |v, segment| match segment {
        Segment::Seq { index } => v.get(index),
        Segment::Map { key } => v.get(key.as_str()),
        Segment::Enum { .. } | Segment::Unknown => Some(v),
    })
}

/// The OCI name of an `oci-spec` enum value (`CAP_KILL`, `RLIMIT_NOFILE`, ...).
fn oci_name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn utf8<'p>(origin: Origin<'_>, field: &str, path: &'p Path) -> Result<&'p str, SpecError> {
    path.to_str().ok_or_else(|| {
        origin.invalid(
            field,
            &path.to_string_lossy(),
            "must be valid UTF-8 in the guest",
        )
    })
}

/// Checks the spec's `process` (or an exec's, with `origin.prefix` "process") and gives the
/// agent's view of it.
pub fn process(origin: Origin<'_>, p: &oci::Process) -> Result<Process, SpecError> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(origin.invalid("args", &args, "must name a program"));
    }
    let cwd = utf8(origin, "cwd", p.cwd())?;
    if !cwd.starts_with('/') {
        return Err(origin.invalid("cwd", &cwd, "must be an absolute path"));
    }
    let user = p.user();
    let capabilities = p
        .capabilities()
        .as_ref()
        .map(|caps| capabilities(origin, caps))
        .transpose()?;
    let mut rlimits = Vec::new();
    let mut seen = HashSet::new();
    for (i, limit) in p.rlimits().iter().flatten().enumerate() {
        let name = oci_name(&limit.typ());
        let field = format!("rlimits[{i}].type");
        let kind = RlimitKind::from_oci(&name)
            .ok_or_else(|| origin.invalid(&field, &name, "not a resource the guest knows"))?;
        if !seen.insert(kind) {
            return Err(origin.invalid(&field, &name, "is given twice"));
        }
        if limit.soft() > limit.hard() {
            return Err(origin.invalid(
                &format!("rlimits[{i}]"),
                &serde_json::json!({"type": name, "soft": limit.soft(), "hard": limit.hard()}),
                "the soft limit is above the hard limit",
            ));
        }
        rlimits.push(Rlimit {
            kind,
            hard: limit.hard(),
            soft: limit.soft(),
        });
    }
    let oom_score_adj = p.oom_score_adj();
    if let Some(adj) =
        oom_score_adj.filter(|adj| !(OOM_SCORE_ADJ_MIN..=OOM_SCORE_ADJ_MAX).contains(adj))
    {
        return Err(origin.invalid(
            "oomScoreAdj",
            &adj,
            format!("must be from {OOM_SCORE_ADJ_MIN} to {OOM_SCORE_ADJ_MAX}"),
        ));
    }
    if let Some(profile) = p.apparmor_profile().as_deref().filter(|p| !p.is_empty()) {
        if profile != "unconfined" {
            return Err(origin.invalid(
                "apparmorProfile",
                &profile,
                "the guest kernel has no AppArmor, so hull cannot confine the process with a \
                 profile (runc refuses a profile on a host without AppArmor too); leave it out \
                 or ask for \"unconfined\" (Docker and Podman: --security-opt \
                 apparmor=unconfined)",
            ));
        }
    }
    // Runtime-spec 1.2 fields, newer than the 1.1.0 hull implements (`hull features`).
    if let Some(value) = p.scheduler() {
        return Err(origin.invalid("scheduler", value, NEWER_THAN_1_1));
    }
    if let Some(value) = p.io_priority() {
        return Err(origin.invalid("ioPriority", value, NEWER_THAN_1_1));
    }
    if let Some(value) = p.exec_cpu_affinity() {
        return Err(origin.invalid("execCPUAffinity", value, NEWER_THAN_1_1));
    }
    if let Some(label) = p.selinux_label().as_deref().filter(|l| !l.is_empty()) {
        return Err(origin.invalid("selinuxLabel", &label, NO_SELINUX));
    }
    Ok(Process {
        terminal: p.terminal().unwrap_or(false),
        user: User {
            uid: user.uid(),
            gid: user.gid(),
            umask: user.umask(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
        },
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: cwd.to_owned(),
        capabilities,
        rlimits,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        oom_score_adj,
    })
}

fn capabilities(
    origin: Origin<'_>,
    caps: &oci::LinuxCapabilities,
) -> Result<Capabilities, SpecError> {
    let mask = |set: &str, names: &Option<oci_spec::runtime::Capabilities>| {
        let mut names: Vec<String> = names.iter().flatten().map(oci_name).collect();
        names.sort();
        Capabilities::mask(names.iter().map(String::as_str)).map_err(|unknown| {
            origin.invalid(
                &format!("capabilities.{set}"),
                &unknown,
                "a capability the guest kernel does not have",
            )
        })
    };
    Ok(Capabilities {
        bounding: mask("bounding", caps.bounding())?,
        effective: mask("effective", caps.effective())?,
        inheritable: mask("inheritable", caps.inheritable())?,
        permitted: mask("permitted", caps.permitted())?,
        ambient: mask("ambient", caps.ambient())?,
    })
}

/// The most lines a `uid_map` or `gid_map` takes (Linux 4.15 on).
const MAX_ID_MAPPINGS: usize = 340;

/// `linux.uidMappings` and `gidMappings`: given exactly when the container has a user namespace
/// of its own, each line of a positive size within 32 bits, at most [`MAX_ID_MAPPINGS`], and
/// mapping the process's user and groups (which it could not take otherwise).
fn id_mappings(
    top: Origin<'_>,
    linux: Option<&oci::Linux>,
    namespaces: &[Namespace],
    process: &Process,
) -> Result<(Vec<IdMapping>, Vec<IdMapping>), SpecError> {
    let userns = namespaces.iter().any(|ns| ns.kind == NamespaceKind::User);
    let read = |name: &str, list: Option<&Vec<oci::LinuxIdMapping>>| {
        let field = format!("linux.{name}");
        let list = list.cloned().unwrap_or_default();
        if !userns {
            if !list.is_empty() {
                return Err(top.invalid(
                    &field,
                    &list,
                    "given without a \"user\" namespace in linux.namespaces",
                ));
            }
            return Ok(Vec::new());
        }
        if list.is_empty() {
            return Err(top.invalid(
                &field,
                &list,
                "a new user namespace needs uidMappings and gidMappings",
            ));
        }
        if list.len() > MAX_ID_MAPPINGS {
            return Err(top.invalid(
                &field,
                &list.len(),
                format!("at most {MAX_ID_MAPPINGS} lines"),
            ));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let line = IdMapping {
                container_id: m.container_id(),
                host_id: m.host_id(),
                size: m.size(),
            };
            let fits = |start: u32| u64::from(start) + u64::from(line.size) <= 1 << 32;
            if line.size == 0 || !fits(line.container_id) || !fits(line.host_id) {
                return Err(top.invalid(
                    &format!("{field}[{i}]"),
                    m,
                    "the size must be positive and the ids must stay below 2^32",
                ));
            }
            out.push(line);
        }
        Ok(out)
    };
    let uids = read("uidMappings", linux.and_then(|l| l.uid_mappings().as_ref()))?;
    let gids = read("gidMappings", linux.and_then(|l| l.gid_mappings().as_ref()))?;
    if userns {
        let user = &process.user;
        let unmapped = |field: &str, id: u32, list: &[IdMapping], by: &str| {
            if is_mapped(list, id) {
                Ok(())
            } else {
                Err(top.invalid(
                    field,
                    &id,
                    format!("not mapped by linux.{by} in the container's user namespace"),
                ))
            }
        };
        unmapped("process.user.uid", user.uid, &uids, "uidMappings")?;
        unmapped("process.user.gid", user.gid, &gids, "gidMappings")?;
        for (i, gid) in user.additional_gids.iter().enumerate() {
            let field = format!("process.user.additionalGids[{i}]");
            unmapped(&field, *gid, &gids, "gidMappings")?;
        }
    }
    Ok((uids, gids))
}

/// A namespace `path` of `linux.namespaces` must open and be a namespace of the entry's type,
/// as runc insists (`ioctl(NS_GET_NSTYPE)` on it).
fn check_namespace_path(
    top: Origin<'_>,
    field: &str,
    kind: NamespaceKind,
    path: &str,
) -> Result<(), SpecError> {
    use std::os::fd::AsRawFd;
    // `ioctl(fd, NS_GET_NSTYPE)`: `_IO(0xb7, 0x3)`.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    use std::os::unix::fs::OpenOptionsExt;
    let on_host = |err: std::io::Error| top.invalid(field, &path, format!("on the host: {err}"));
    // A namespace file is a regular (nsfs) file. Anything else is refused before it is opened:
    // opening a FIFO would block `create`, and opening a device may do something.
    let meta = std::fs::metadata(path).map_err(on_host)?;
    if !meta.is_file() {
        return Err(top.invalid(
            field,
            &path,
            "not a namespace file (not even a regular file)",
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(on_host)?;
    // SAFETY: the ioctl takes no argument and reads nothing from this process.
    let found = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if found < 0 {
        let err = std::io::Error::last_os_error();
        return Err(top.invalid(
            field,
            &path,
            format!("not a namespace file (ioctl NS_GET_NSTYPE: {err})"),
        ));
    }
    let name = |flag: i32| match flag {
        libc::CLONE_NEWNET => "network",
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWUSER => "user",
        0x80 => "time",
        _ => "unknown",
    };
    let wanted = match kind {
        NamespaceKind::Network => libc::CLONE_NEWNET,
        NamespaceKind::Mount => libc::CLONE_NEWNS,
        NamespaceKind::Ipc => libc::CLONE_NEWIPC,
        NamespaceKind::Uts => libc::CLONE_NEWUTS,
        NamespaceKind::Pid => libc::CLONE_NEWPID,
        NamespaceKind::Cgroup => libc::CLONE_NEWCGROUP,
        NamespaceKind::User => libc::CLONE_NEWUSER,
    };
    if found != wanted {
        return Err(top.invalid(
            field,
            &path,
            format!(
                "is a namespace of type {}, not {}",
                name(found),
                name(wanted)
            ),
        ));
    }
    Ok(())
}

/// Checks the whole spec and gives what the agent needs to create the container.
pub fn container_spec(file: &Path, spec: &oci::Spec) -> Result<ContainerSpec, SpecError> {
    let top = Origin { file, prefix: "" };
    let Some(p) = spec.process() else {
        return Err(SpecError::missing(file, "process"));
    };
    let process = process(
        Origin {
            file,
            prefix: "process",
        },
        p,
    )?;

    let mut mounts = Vec::new();
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let field = |name: &str| format!("mounts[{i}].{name}");
        let destination = utf8(top, &field("destination"), m.destination())?;
        let source = m
            .source()
            .as_deref()
            .map(|s| utf8(top, &field("source"), s).map(str::to_owned))
            .transpose()?;
        for (name, list) in [
            ("uidMappings", m.uid_mappings()),
            ("gidMappings", m.gid_mappings()),
        ] {
            if let Some(list) = list.as_ref().filter(|l| !l.is_empty()) {
                return Err(top.invalid(
                    &field(name),
                    list,
                    "idmapped mounts are not implemented (a user namespace's mappings apply to \
                     the whole container: linux.uidMappings)",
                ));
            }
        }
        mounts.push(Mount {
            destination: destination.to_owned(),
            kind: m.typ().clone(),
            source,
            options: m.options().clone().unwrap_or_default(),
        });
    }

    // Not `unwrap_or_default`: oci-spec's default `Linux` has runc's default namespaces and
    // masked paths, which a spec without `linux` does not ask for.
    let linux = spec.linux().as_ref();
    let mut namespaces: Vec<Namespace> = Vec::new();
    for (i, ns) in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("linux.namespaces[{i}].type");
        let name = oci_name(&ns.typ());
        let kind = match ns.typ() {
            oci::LinuxNamespaceType::Pid => NamespaceKind::Pid,
            oci::LinuxNamespaceType::Network => NamespaceKind::Network,
            oci::LinuxNamespaceType::Mount => NamespaceKind::Mount,
            oci::LinuxNamespaceType::Ipc => NamespaceKind::Ipc,
            oci::LinuxNamespaceType::Uts => NamespaceKind::Uts,
            oci::LinuxNamespaceType::Cgroup => NamespaceKind::Cgroup,
            oci::LinuxNamespaceType::User => {
                if let Some(path) = ns.path() {
                    return Err(top.invalid(
                        &format!("linux.namespaces[{i}].path"),
                        &path.to_string_lossy(),
                        "a user namespace of the host cannot be joined from a VM; leave the \
                         path out for a new user namespace in the guest",
                    ));
                }
                NamespaceKind::User
            }
            oci::LinuxNamespaceType::Time => {
                return Err(top.invalid(&field, &name, "time namespaces are not implemented"))
            }
        };
        if namespaces.iter().any(|n| n.kind == kind) {
            return Err(top.invalid(&field, &name, "is given twice"));
        }
        let path = ns
            .path()
            .as_deref()
            .map(|p| utf8(top, &format!("linux.namespaces[{i}].path"), p).map(str::to_owned))
            .transpose()?;
        if let Some(path) = &path {
            check_namespace_path(top, &format!("linux.namespaces[{i}].path"), kind, path)?;
        }
        namespaces.push(Namespace { kind, path });
    }
    let (uid_mappings, gid_mappings) = id_mappings(top, linux, &namespaces, &process)?;
    for (field, value) in [
        ("hostname", spec.hostname()),
        ("domainname", spec.domainname()),
    ] {
        if let Some(value) = value {
            if !namespaces.iter().any(|n| n.kind == NamespaceKind::Uts) {
                return Err(top.invalid(
                    field,
                    value,
                    "setting it needs a \"uts\" namespace in linux.namespaces",
                ));
            }
        }
    }
    let personality = match linux.and_then(|l| l.personality().as_ref()) {
        None => None,
        Some(p) if p.flags().as_ref().is_some_and(|f| !f.is_empty()) => {
            return Err(top.invalid(
                "linux.personality.flags",
                p.flags(),
                "hull applies the personality's domain only (runc too)",
            ))
        }
        Some(p) => Some(match p.domain() {
            oci::LinuxPersonalityDomain::PerLinux => Personality::Linux,
            oci::LinuxPersonalityDomain::PerLinux32 => Personality::Linux32,
        }),
    };
    if let Some(rdt) = linux.and_then(|l| l.intel_rdt().as_ref()) {
        return Err(top.invalid(
            "linux.intelRdt",
            rdt,
            "a VM has no Intel RDT (resctrl) of the host's; leave it out",
        ));
    }
    if let Some(offsets) = linux.and_then(|l| l.time_offsets().as_ref()) {
        return Err(top.invalid(
            "linux.timeOffsets",
            offsets,
            "time namespaces are not implemented (a VM's clocks are its own)",
        ));
    }

    if let Some(label) = linux
        .and_then(|l| l.mount_label().as_deref())
        .filter(|l| !l.is_empty())
    {
        return Err(top.invalid("linux.mountLabel", &label, NO_SELINUX));
    }

    let rootfs_propagation = match linux.and_then(|l| l.rootfs_propagation().as_ref()) {
        None => Propagation::Private,
        Some(value) => Propagation::from_oci(value).ok_or_else(|| {
            top.invalid(
                "linux.rootfsPropagation",
                value,
                "must be private, slave, shared or unbindable (or their r- forms)",
            )
        })?,
    };

    let mut devices = Vec::new();
    for (i, d) in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let path = utf8(top, &format!("linux.devices[{i}].path"), d.path())?;
        if !path.starts_with("/dev/") {
            return Err(top.invalid(
                &format!("linux.devices[{i}].path"),
                &path,
                "must be under /dev",
            ));
        }
        let kind = match d.typ() {
            oci::LinuxDeviceType::C | oci::LinuxDeviceType::U => DeviceKind::Char,
            oci::LinuxDeviceType::B => DeviceKind::Block,
            oci::LinuxDeviceType::P => DeviceKind::Fifo,
            oci::LinuxDeviceType::A => {
                return Err(top.invalid(
                    &format!("linux.devices[{i}].type"),
                    &"a",
                    "a device node must be c, u, b or p",
                ))
            }
        };
        devices.push(Device {
            path: path.to_owned(),
            kind,
            major: d.major(),
            minor: d.minor(),
            file_mode: d.file_mode(),
            uid: d.uid(),
            gid: d.gid(),
        });
    }

    let seccomp = linux
        .and_then(|l| l.seccomp().as_ref())
        .map(|s| seccomp(top, s))
        .transpose()?;

    Ok(ContainerSpec {
        process,
        readonly_root: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        hostname: spec.hostname().clone(),
        domainname: spec.domainname().clone(),
        personality,
        mounts,
        namespaces,
        masked_paths: linux
            .and_then(|l| l.masked_paths().clone())
            .unwrap_or_default(),
        readonly_paths: linux
            .and_then(|l| l.readonly_paths().clone())
            .unwrap_or_default(),
        rootfs_propagation,
        sysctl: linux
            .and_then(|l| l.sysctl().clone())
            .unwrap_or_default()
            .into_iter()
            .collect(),
        seccomp,
        devices,
        uid_mappings,
        gid_mappings,
        pids_limit: linux
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.pids().as_ref())
            .and_then(|p| u64::try_from(p.limit()).ok())
            .filter(|limit| *limit > 0),
        memory_limit: linux
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .and_then(|limit| u64::try_from(limit).ok())
            .filter(|limit| *limit > 0),
    })
}

fn seccomp(top: Origin<'_>, s: &oci::LinuxSeccomp) -> Result<Seccomp, SpecError> {
    if let Some(path) = s.listener_path() {
        return Err(top.invalid(
            "linux.seccomp.listenerPath",
            &path.to_string_lossy(),
            "seccomp notification is not implemented",
        ));
    }
    let default_action = action(
        top,
        "linux.seccomp.defaultAction",
        s.default_action(),
        s.default_errno_ret(),
    )?;
    let (mut log, mut spec_allow) = (false, false);
    for (i, flag) in s.flags().iter().flatten().enumerate() {
        match flag {
            // The container's init is single-threaded when its filter goes on.
            oci::LinuxSeccompFilterFlag::SeccompFilterFlagTsync => {}
            oci::LinuxSeccompFilterFlag::SeccompFilterFlagLog => log = true,
            oci::LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => spec_allow = true,
            other => {
                return Err(top.invalid(
                    &format!("linux.seccomp.flags[{i}]"),
                    &oci_name(other),
                    "not implemented in the guest",
                ))
            }
        }
    }
    let mut syscalls = Vec::new();
    for (i, rule) in s.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let action = action(
            top,
            &format!("{field}.action"),
            rule.action(),
            rule.errno_ret(),
        )?;
        let mut args = Vec::new();
        for (j, arg) in rule.args().iter().flatten().enumerate() {
            let index = u8::try_from(arg.index())
                .ok()
                .filter(|&n| usize::from(n) < SYSCALL_ARGS)
                .ok_or_else(|| {
                    top.invalid(
                        &format!("{field}.args[{j}].index"),
                        &arg.index(),
                        "system call arguments are 0 to 5",
                    )
                })?;
            let value = arg.value();
            let op = match arg.op() {
                oci::LinuxSeccompOperator::ScmpCmpEq => SeccompOp::Eq(value),
                oci::LinuxSeccompOperator::ScmpCmpNe => SeccompOp::Ne(value),
                oci::LinuxSeccompOperator::ScmpCmpLt => SeccompOp::Lt(value),
                oci::LinuxSeccompOperator::ScmpCmpLe => SeccompOp::Le(value),
                oci::LinuxSeccompOperator::ScmpCmpGt => SeccompOp::Gt(value),
                oci::LinuxSeccompOperator::ScmpCmpGe => SeccompOp::Ge(value),
                // (arg & value) == valueTwo
                oci::LinuxSeccompOperator::ScmpCmpMaskedEq => SeccompOp::MaskedEq {
                    mask: value,
                    value: arg.value_two().unwrap_or(0),
                },
            };
            args.push(SeccompArg { index, op });
        }
        syscalls.push(SeccompRule {
            names: rule.names().clone(),
            action,
            args,
        });
    }
    Ok(Seccomp {
        default_action,
        log,
        spec_allow,
        syscalls,
    })
}

fn action(
    top: Origin<'_>,
    field: &str,
    action: oci::LinuxSeccompAction,
    errno: Option<u32>,
) -> Result<SeccompAction, SpecError> {
    use oci::LinuxSeccompAction as A;
    Ok(match action {
        A::ScmpActAllow => SeccompAction::Allow,
        A::ScmpActErrno => {
            let errno = errno.unwrap_or(DEFAULT_ERRNO);
            if errno > MAX_ERRNO {
                return Err(top.invalid(
                    field,
                    &oci_name(&action),
                    format!("errnoRet {errno} is not an errno (they end at {MAX_ERRNO})"),
                ));
            }
            SeccompAction::Errno(errno)
        }
        A::ScmpActKill | A::ScmpActKillThread => SeccompAction::KillThread,
        A::ScmpActKillProcess => SeccompAction::KillProcess,
        A::ScmpActTrap => SeccompAction::Trap,
        A::ScmpActLog => SeccompAction::Log,
        A::ScmpActNotify | A::ScmpActTrace => {
            return Err(top.invalid(
                field,
                &oci_name(&action),
                "not implemented in the guest (nothing there could answer it)",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    fn file() -> PathBuf {
        PathBuf::from("/b/config.json")
    }

    fn check(spec: Value) -> Result<ContainerSpec, String> {
        let file = file();
        read_spec(&file, &spec)
            .and_then(|s| container_spec(&file, &s))
            .map_err(|e| e.to_string())
    }

    fn base() -> Value {
        json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "rootfs"}})
    }

    fn with(path: &[&str], value: Value) -> Value {
        let mut spec = base();
        let mut slot = &mut spec;
        for key in path {
            slot = slot
                .as_object_mut()
                .expect("an object")
                .entry(key.to_string())
                .or_insert_with(|| json!({}));
        }
        *slot = value;
        spec
    }

    #[test]
    fn a_runc_default_spec_turns_into_the_agents_view() {
        let spec = check(json!({
            "ociVersion": "1.0.2-dev",
            "process": {
                "terminal": true,
                "user": {"uid": 1000, "gid": 100, "additionalGids": [5], "umask": 18},
                "args": ["sh"], "env": ["PATH=/bin"], "cwd": "/tmp",
                "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true,
                "apparmorProfile": "unconfined",
                "oomScoreAdj": 500
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "box",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                               {"type": "network", "path": "/proc/self/ns/net"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "rootfsPropagation": "rslave",
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "seccomp": {
                    "defaultAction": "SCMP_ACT_ERRNO",
                    "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG"],
                    "syscalls": [
                        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": 0, "value": 255, "valueTwo": 8,
                                   "op": "SCMP_CMP_MASKED_EQ"}]},
                        {"names": ["kill"], "action": "SCMP_ACT_KILL"}
                    ]
                }
            }
        }))
        .unwrap();
        let p = &spec.process;
        assert!(p.terminal && p.no_new_privileges);
        assert_eq!(p.oom_score_adj, Some(500));
        assert_eq!(
            (p.user.uid, p.user.gid, p.user.umask),
            (1000, 100, Some(18))
        );
        assert_eq!(p.user.additional_gids, [5]);
        assert_eq!(
            (p.args.as_slice(), p.cwd.as_str()),
            (&["sh".to_owned()][..], "/tmp")
        );
        let caps = p.capabilities.unwrap();
        assert_eq!(caps.bounding, 1 << 5 | 1);
        assert_eq!((caps.effective, caps.ambient), (1 << 5, 0));
        assert_eq!(p.rlimits[0].kind, RlimitKind::Nofile);
        assert!(spec.readonly_root);
        assert_eq!(spec.hostname.as_deref(), Some("box"));
        assert_eq!(spec.mounts[0].kind.as_deref(), Some("proc"));
        assert!(spec.unshares(NamespaceKind::Pid));
        assert!(!spec.unshares(NamespaceKind::Network));
        assert_eq!(spec.rootfs_propagation, Propagation::Slave);
        assert_eq!(spec.masked_paths, ["/proc/kcore"]);
        assert_eq!(spec.sysctl["net.ipv4.ip_forward"], "1");
        assert_eq!(spec.devices[0].kind, DeviceKind::Char);
        let s = spec.seccomp.unwrap();
        assert_eq!(s.default_action, SeccompAction::Errno(1));
        assert!(s.log && !s.spec_allow);
        assert_eq!(
            s.syscalls[1].args[0].op,
            SeccompOp::MaskedEq {
                mask: 255,
                value: 8
            }
        );
        assert_eq!(s.syscalls[2].action, SeccompAction::KillThread);
    }

    #[test]
    fn the_pids_and_memory_limits_reach_the_agent() {
        let mut spec = base();
        spec["linux"] =
            json!({"resources": {"pids": {"limit": 40}, "memory": {"limit": 100663296}}});
        let spec = check(spec).unwrap();
        assert_eq!(
            (spec.pids_limit, spec.memory_limit),
            (Some(40), Some(100663296))
        );
        let spec = check(base()).unwrap();
        assert_eq!((spec.pids_limit, spec.memory_limit), (None, None));
    }

    #[test]
    fn a_process_without_user_or_cwd_runs_as_root_in_slash() {
        let spec = check(base()).unwrap();
        assert_eq!((spec.process.user.uid, spec.process.cwd.as_str()), (0, "/"));
        // No `linux`: no namespaces, no masked paths (not oci-spec's defaults).
        assert_eq!(spec.namespaces, []);
        assert!(spec.masked_paths.is_empty() && spec.readonly_paths.is_empty());
        assert_eq!(spec.process.capabilities, None);
        assert_eq!(spec.rootfs_propagation, Propagation::Private);
    }

    /// Each refusal names the file, the field and the value.
    #[test]
    fn what_the_guest_cannot_honour_is_refused_with_field_and_value() {
        let cases = [
            (
                with(&["linux", "namespaces"], json!([{"type": "user"}])),
                "field `linux.uidMappings` = []: a new user namespace needs uidMappings and \
                 gidMappings",
            ),
            (
                with(
                    &["linux"],
                    json!({"namespaces": [{"type": "user", "path": "/proc/self/ns/user"}]}),
                ),
                "field `linux.namespaces[0].path` = \"/proc/self/ns/user\": a user namespace of \
                 the host cannot be joined from a VM",
            ),
            (
                with(
                    &["linux"],
                    json!({"uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}),
                ),
                "field `linux.uidMappings` = [{\"containerID\":0,\"hostID\":1,\"size\":1}]: given \
                 without a \"user\" namespace",
            ),
            (
                with(
                    &["linux"],
                    json!({"namespaces": [{"type": "user"}],
                           "uidMappings": [{"containerID": 0, "hostID": 4294967295u64, "size": 2}],
                           "gidMappings": [{"containerID": 0, "hostID": 0, "size": 1}]}),
                ),
                "field `linux.uidMappings[0]` = {\"containerID\":0,\"hostID\":4294967295,\
                 \"size\":2}: the size must be positive and the ids must stay below 2^32",
            ),
            (
                {
                    let mut spec = with(
                        &["linux"],
                        json!({"namespaces": [{"type": "user"}],
                               "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 1}],
                               "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 1}]}),
                    );
                    spec["process"]["user"] = json!({"uid": 1000, "gid": 0});
                    spec
                },
                "field `process.user.uid` = 1000: not mapped by linux.uidMappings",
            ),
            (
                with(
                    &["linux", "namespaces"],
                    json!([{"type": "pid"}, {"type": "pid"}]),
                ),
                "field `linux.namespaces[1].type` = \"pid\": is given twice",
            ),
            (
                with(&["linux", "namespaces"], json!([{"type": "nope"}])),
                "field `linux.namespaces[0].type` = \"nope\": unknown variant `nope`",
            ),
            (
                with(&["hostname"], json!("box")),
                "field `hostname` = \"box\": setting it needs a \"uts\" namespace",
            ),
            (
                with(
                    &["process", "capabilities"],
                    json!({"bounding": ["CAP_KILL", "CAP_FLY"]}),
                ),
                "field `process.capabilities.bounding[1]` = \"CAP_FLY\": unknown capability; see \
                 `hull features`",
            ),
            (
                with(
                    &["process", "rlimits"],
                    json!([{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]),
                ),
                "field `process.rlimits[0]` = {\"hard\":1,\"soft\":2,\"type\":\"RLIMIT_NOFILE\"}: \
                 the soft limit is above the hard limit",
            ),
            (
                with(&["process", "cwd"], json!("tmp")),
                "field `process.cwd` = \"tmp\": must be an absolute path",
            ),
            (
                with(&["process", "user"], json!({"uid": -1})),
                "field `process.user.uid` = -1: invalid value: integer `-1`",
            ),
            (
                with(
                    &["linux", "seccomp"],
                    json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
                ),
                "field `linux.seccomp.defaultAction` = \"SCMP_ACT_NOTIFY\": not implemented",
            ),
            (
                with(
                    &["linux", "seccomp"],
                    json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["kill"],
                           "action": "SCMP_ACT_ERRNO", "errnoRet": 5000}]}),
                ),
                "field `linux.seccomp.syscalls[0].action` = \"SCMP_ACT_ERRNO\": errnoRet 5000",
            ),
            (
                with(
                    &["linux", "seccomp"],
                    json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["kill"],
                           "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 0,
                           "op": "SCMP_CMP_EQ"}]}]}),
                ),
                "field `linux.seccomp.syscalls[0].args[0].index` = 6: system call arguments",
            ),
            (
                with(
                    &["linux", "seccomp"],
                    json!({"defaultAction": "SCMP_ACT_ALLOW",
                           "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}),
                ),
                "field `linux.seccomp.flags[0]` = \"SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV\"",
            ),
            (
                with(&["linux", "rootfsPropagation"], json!("sideways")),
                "field `linux.rootfsPropagation` = \"sideways\": must be private",
            ),
            (
                with(
                    &["linux", "devices"],
                    json!([{"path": "/dev/x", "type": "a"}]),
                ),
                "field `linux.devices[0].type` = \"a\": a device node must be",
            ),
            (
                with(
                    &["linux", "devices"],
                    json!([{"path": "/etc/x", "type": "c"}]),
                ),
                "field `linux.devices[0].path` = \"/etc/x\": must be under /dev",
            ),
            (
                with(&["mounts"], json!([{"type": "tmpfs"}])),
                "field `mounts[0].destination` is missing",
            ),
            (
                with(
                    &["mounts"],
                    json!([{"destination": "/data", "type": "bind", "source": "/srv",
                            "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}]),
                ),
                "field `mounts[0].uidMappings` = [{\"containerID\":0,\"hostID\":1000,\"size\":1}]: \
                 idmapped mounts are not implemented",
            ),
            (
                with(&["domainname"], json!("example.org")),
                "field `domainname` = \"example.org\": setting it needs a \"uts\" namespace",
            ),
            (
                with(
                    &["linux", "personality"],
                    json!({"domain": "LINUX32", "flags": ["ADDR_NO_RANDOMIZE"]}),
                ),
                "field `linux.personality.flags` = [\"ADDR_NO_RANDOMIZE\"]: hull applies the \
                 personality's domain only",
            ),
            (
                with(
                    &["linux", "intelRdt"],
                    json!({"closID": "guaranteed_group"}),
                ),
                "field `linux.intelRdt` = {\"closID\":\"guaranteed_group\"}: a VM has no Intel RDT",
            ),
            (
                with(
                    &["linux", "timeOffsets"],
                    json!({"monotonic": {"secs": 1, "nanosecs": 0}}),
                ),
                "field `linux.timeOffsets` = {\"monotonic\":{\"nanosecs\":0,\"secs\":1}}: time \
                 namespaces are not implemented",
            ),
            (
                with(
                    &["process", "ioPriority"],
                    json!({"class": "IOPRIO_CLASS_IDLE", "priority": 0}),
                ),
                "field `process.ioPriority` = {\"class\":\"IOPRIO_CLASS_IDLE\",\"priority\":0}: a \
                 runtime-spec 1.2 field",
            ),
            (
                with(&["process", "oomScoreAdj"], json!(1001)),
                "field `process.oomScoreAdj` = 1001: must be from -1000 to 1000",
            ),
            (
                with(&["process", "apparmorProfile"], json!("docker-default")),
                "field `process.apparmorProfile` = \"docker-default\": the guest kernel has no \
                 AppArmor, so hull cannot confine the process with a profile",
            ),
            (
                with(
                    &["process", "selinuxLabel"],
                    json!("system_u:system_r:container_t:s0"),
                ),
                "field `process.selinuxLabel` = \"system_u:system_r:container_t:s0\": the guest \
                 kernel has no SELinux",
            ),
            (
                with(
                    &["linux", "mountLabel"],
                    json!("system_u:object_r:container_file_t:s0"),
                ),
                "field `linux.mountLabel` = \"system_u:object_r:container_file_t:s0\": the guest \
                 kernel has no SELinux",
            ),
            (
                with(
                    &["linux", "namespaces"],
                    json!([{"type": "network", "path": "/run/netns/hull-no-such-namespace"}]),
                ),
                "field `linux.namespaces[0].path` = \"/run/netns/hull-no-such-namespace\": on the \
                 host: No such file or directory",
            ),
            (
                with(
                    &["linux", "namespaces"],
                    json!([{"type": "cgroup", "path": "/proc/self/ns/ipc"}]),
                ),
                "field `linux.namespaces[0].path` = \"/proc/self/ns/ipc\": is a namespace of type \
                 ipc, not cgroup",
            ),
            (
                with(
                    &["linux", "namespaces"],
                    json!([{"type": "ipc", "path": "/dev/null"}]),
                ),
                "field `linux.namespaces[0].path` = \"/dev/null\": not a namespace file (not even a \
                 regular file)",
            ),
            (
                with(
                    &["linux", "namespaces"],
                    json!([{"type": "uts", "path": "/proc/self/status"}]),
                ),
                "field `linux.namespaces[0].path` = \"/proc/self/status\": not a namespace file",
            ),
        ];
        for (spec, want) in cases {
            let err = check(spec.clone()).expect_err(&spec.to_string());
            assert!(err.starts_with("/b/config.json: field `"), "{err}");
            assert!(err.contains(want), "{err}\nwanted: {want}");
        }
    }

    #[test]
    fn a_fifo_as_a_namespace_path_is_refused_without_blocking() {
        let fifo = std::env::temp_dir().join(format!("hull-ns-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = fifo.to_str().unwrap().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let spec = with(
                &["linux", "namespaces"],
                json!([{"type": "network", "path": path}]),
            );
            let _ = tx.send(check(spec));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("checking a FIFO path blocked");
        std::fs::remove_file(&fifo).unwrap();
        let err = result.unwrap_err();
        assert!(err.contains("not a namespace file"), "{err}");
    }

    #[test]
    fn what_asks_for_no_confinement_or_names_a_real_namespace_is_taken() {
        let spec = check(with(&["process", "apparmorProfile"], json!("unconfined"))).unwrap();
        assert_eq!(spec.process.oom_score_adj, None);
        check(with(&["process", "selinuxLabel"], json!(""))).unwrap();
        let spec = check(with(&["process", "oomScoreAdj"], json!(-1000))).unwrap();
        assert_eq!(spec.process.oom_score_adj, Some(-1000));
        let spec = check(with(
            &["linux", "namespaces"],
            json!([{"type": "network", "path": "/proc/self/ns/net"},
                   {"type": "ipc", "path": "/proc/self/ns/ipc"}]),
        ))
        .unwrap();
        assert_eq!(spec.namespaces.len(), 2);
    }

    #[test]
    fn an_exec_process_is_checked_like_the_specs() {
        let file = PathBuf::from("/tmp/p.json");
        let origin = Origin {
            file: &file,
            prefix: "",
        };
        let read_process = |value: Value| {
            read_process(origin, &value)
                .and_then(|p| process(origin, &p))
                .map_err(|e| e.to_string())
        };
        let p = read_process(json!({"args": ["ps"], "cwd": "/", "user": {"uid": 1}})).unwrap();
        assert_eq!((p.args[0].as_str(), p.user.uid), ("ps", 1));
        let err = read_process(json!({"args": ["ps"], "cwd": "/", "terminal": "yes"})).unwrap_err();
        assert!(
            err.starts_with("/tmp/p.json: field `terminal` = \"yes\": invalid type"),
            "{err}"
        );
        let err = read_process(json!({"args": [], "cwd": "/"})).unwrap_err();
        assert!(
            err.contains("field `args` = []: must name a program"),
            "{err}"
        );
    }
}
