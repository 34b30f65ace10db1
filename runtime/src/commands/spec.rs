//! `hull spec`: the example `config.json` that `runc spec` (runc 1.1) writes, with hull's
//! hostname, so that tools and people used to runc's starting point get the same one.
//!
//! The document is built from typed structs whose field order is that of the runtime-spec's Go
//! bindings, so the file reads like runc's (`ociVersion`, `process`, `root`, ...) and is
//! indented with tabs as runc's is. Two defaults hull itself does not run yet, as in runc's
//! example: `process.terminal: true` and, with `--rootless`, a user namespace (docs/agent.md);
//! the user edits the example either way.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

/// The `ociVersion` runc 1.1 writes (the runtime-spec version it was built against).
pub const OCI_VERSION: &str = "1.0.2-dev";
/// `hostname` of the example (runc writes "runc").
pub const HOSTNAME: &str = "hull";

/// runc's default capabilities, in each of the bounding, effective and permitted sets.
const CAPABILITIES: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    oci_version: String,
    process: Process,
    root: Root,
    hostname: String,
    mounts: Vec<Mount>,
    linux: Linux,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Process {
    terminal: bool,
    user: User,
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    capabilities: Capabilities,
    rlimits: Vec<Rlimit>,
    no_new_privileges: bool,
}

#[derive(Debug, Clone, Serialize)]
struct User {
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, Serialize)]
struct Capabilities {
    bounding: Vec<String>,
    effective: Vec<String>,
    permitted: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Rlimit {
    #[serde(rename = "type")]
    kind: String,
    hard: u64,
    soft: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Root {
    path: String,
    readonly: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Mount {
    destination: String,
    #[serde(rename = "type")]
    kind: String,
    source: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    options: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Linux {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    uid_mappings: Vec<IdMapping>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    gid_mappings: Vec<IdMapping>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<Resources>,
    namespaces: Vec<Namespace>,
    masked_paths: Vec<String>,
    readonly_paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct IdMapping {
    #[serde(rename = "containerID")]
    container_id: u32,
    #[serde(rename = "hostID")]
    host_id: u32,
    size: u32,
}

#[derive(Debug, Clone, Serialize)]
struct Resources {
    devices: Vec<DeviceRule>,
}

#[derive(Debug, Clone, Serialize)]
struct DeviceRule {
    allow: bool,
    access: String,
}

#[derive(Debug, Clone, Serialize)]
struct Namespace {
    #[serde(rename = "type")]
    kind: String,
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.to_owned(),
        kind: kind.to_owned(),
        source: source.to_owned(),
        options: strings(options),
    }
}

impl Spec {
    /// runc's `specconv.Example()`. The cgroup namespace is always there: runc adds it on
    /// cgroup v2 hosts, and the guest has cgroup v2 only.
    fn example() -> Self {
        let caps = strings(&CAPABILITIES);
        Self {
            oci_version: OCI_VERSION.to_owned(),
            process: Process {
                terminal: true,
                user: User { uid: 0, gid: 0 },
                args: strings(&["sh"]),
                env: strings(&[
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm",
                ]),
                cwd: "/".to_owned(),
                capabilities: Capabilities {
                    bounding: caps.clone(),
                    effective: caps.clone(),
                    permitted: caps,
                },
                rlimits: vec![Rlimit {
                    kind: "RLIMIT_NOFILE".to_owned(),
                    hard: 1024,
                    soft: 1024,
                }],
                no_new_privileges: true,
            },
            root: Root {
                path: "rootfs".to_owned(),
                readonly: true,
            },
            hostname: HOSTNAME.to_owned(),
            mounts: vec![
                mount("/proc", "proc", "proc", &[]),
                mount(
                    "/dev",
                    "tmpfs",
                    "tmpfs",
                    &["nosuid", "strictatime", "mode=755", "size=65536k"],
                ),
                mount(
                    "/dev/pts",
                    "devpts",
                    "devpts",
                    &[
                        "nosuid",
                        "noexec",
                        "newinstance",
                        "ptmxmode=0666",
                        "mode=0620",
                        "gid=5",
                    ],
                ),
                mount(
                    "/dev/shm",
                    "tmpfs",
                    "shm",
                    &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
                ),
                mount(
                    "/dev/mqueue",
                    "mqueue",
                    "mqueue",
                    &["nosuid", "noexec", "nodev"],
                ),
                mount(
                    "/sys",
                    "sysfs",
                    "sysfs",
                    &["nosuid", "noexec", "nodev", "ro"],
                ),
                mount(
                    "/sys/fs/cgroup",
                    "cgroup",
                    "cgroup",
                    &["nosuid", "noexec", "nodev", "relatime", "ro"],
                ),
            ],
            linux: Linux {
                uid_mappings: Vec::new(),
                gid_mappings: Vec::new(),
                resources: Some(Resources {
                    devices: vec![DeviceRule {
                        allow: false,
                        access: "rwm".to_owned(),
                    }],
                }),
                namespaces: ["pid", "network", "ipc", "uts", "mount", "cgroup"]
                    .iter()
                    .map(|kind| Namespace {
                        kind: (*kind).to_owned(),
                    })
                    .collect(),
                masked_paths: strings(&MASKED_PATHS),
                readonly_paths: strings(&READONLY_PATHS),
            },
        }
    }

    /// runc's `specconv.ToRootless`: a user namespace mapping root to `uid`/`gid` instead of a
    /// network namespace, `/sys` bound from the host's (a new sysfs needs a network namespace
    /// owned by the user namespace), no `uid=`/`gid=` mount options, no cgroup settings.
    fn into_rootless(mut self, uid: u32, gid: u32) -> Self {
        self.linux
            .namespaces
            .retain(|ns| ns.kind != "network" && ns.kind != "user");
        self.linux.namespaces.push(Namespace {
            kind: "user".to_owned(),
        });
        let mapping = |host_id| IdMapping {
            container_id: 0,
            host_id,
            size: 1,
        };
        self.linux.uid_mappings = vec![mapping(uid)];
        self.linux.gid_mappings = vec![mapping(gid)];
        for m in &mut self.mounts {
            if m.destination.trim_end_matches('/') == "/sys" {
                *m = mount(
                    "/sys",
                    "none",
                    "/sys",
                    &["rbind", "nosuid", "noexec", "nodev", "ro"],
                );
            } else {
                m.options
                    .retain(|o| !o.starts_with("gid=") && !o.starts_with("uid="));
            }
        }
        self.linux.resources = None;
        self
    }

    fn build(rootless: bool) -> Self {
        let spec = Self::example();
        if rootless {
            let uid = nix::unistd::geteuid().as_raw();
            let gid = nix::unistd::getegid().as_raw();
            spec.into_rootless(uid, gid)
        } else {
            spec
        }
    }

    /// Pretty-printed with tabs, as `runc spec` writes it.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        self.serialize(&mut serializer)
            .expect("plain structs of strings, numbers and booleans always serialize");
        out.push(b'\n');
        out
    }
}

/// The example spec `runc spec` writes; with `rootless`, the `runc spec --rootless` one for
/// the current effective user and group (what [`write_spec`] writes, as a JSON value).
#[cfg(test)]
pub fn default_spec(rootless: bool) -> serde_json::Value {
    serde_json::to_value(Spec::build(rootless))
        .expect("plain structs of strings, numbers and booleans always serialize")
}

/// Writes [`default_spec`] to `<bundle>/config.json`, refusing to replace an existing file.
#[derive(clap::Args)]
pub struct SpecArgs {
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
}

impl SpecArgs {
    pub fn run(&self, global: &super::Global) -> anyhow::Result<i32> {
        // `--rootless` (global, as in runc): a spec for a rootless container.
        write_spec(&self.bundle, global.rootless.as_deref() == Some("true"))?;
        Ok(0)
    }
}

pub fn write_spec(bundle: &Path, rootless: bool) -> anyhow::Result<()> {
    let path = bundle.join("config.json");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path);
    let mut file = match file {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "File {} exists. Remove it first or use a different bundle directory",
            path.display()
        ),
        Err(err) => {
            return Err(err).with_context(|| format!("cannot create {}", path.display()));
        }
    };
    file.write_all(&Spec::build(rootless).to_json())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn temp_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hull-specgen-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn default_spec_is_runcs_example() {
        let spec = default_spec(false);
        let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        assert_eq!(spec["ociVersion"], "1.0.2-dev");
        assert_eq!(
            spec["process"],
            json!({
                "terminal": true,
                "user": {"uid": 0, "gid": 0},
                "args": ["sh"],
                "env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"
                ],
                "cwd": "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true
            })
        );
        assert_eq!(spec["root"], json!({"path": "rootfs", "readonly": true}));
        assert_eq!(spec["hostname"], "hull");
        let mounts = spec["mounts"].as_array().unwrap();
        let summary: Vec<(&str, &str, &str)> = mounts
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap(),
                    m["type"].as_str().unwrap(),
                    m["source"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("/proc", "proc", "proc"),
                ("/dev", "tmpfs", "tmpfs"),
                ("/dev/pts", "devpts", "devpts"),
                ("/dev/shm", "tmpfs", "shm"),
                ("/dev/mqueue", "mqueue", "mqueue"),
                ("/sys", "sysfs", "sysfs"),
                ("/sys/fs/cgroup", "cgroup", "cgroup"),
            ]
        );
        // runc leaves out the options of /proc.
        assert!(mounts[0].get("options").is_none());
        assert_eq!(
            mounts[2]["options"],
            json!([
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5"
            ])
        );
        assert_eq!(
            mounts[6]["options"],
            json!(["nosuid", "noexec", "nodev", "relatime", "ro"])
        );
        let linux = &spec["linux"];
        assert_eq!(
            linux["resources"],
            json!({"devices": [{"allow": false, "access": "rwm"}]})
        );
        assert_eq!(
            linux["namespaces"],
            json!([{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                   {"type": "mount"}, {"type": "cgroup"}])
        );
        assert_eq!(linux["maskedPaths"].as_array().unwrap().len(), 10);
        assert_eq!(linux["maskedPaths"][9], "/proc/scsi");
        assert_eq!(linux["readonlyPaths"][4], "/proc/sysrq-trigger");
        assert!(linux.get("uidMappings").is_none());
    }

    #[test]
    fn rootless_spec_maps_the_current_user_and_drops_the_network_namespace() {
        let spec = Spec::example().into_rootless(1000, 100);
        let v = serde_json::to_value(&spec).unwrap();
        let linux = &v["linux"];
        assert_eq!(
            linux["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                   {"type": "cgroup"}, {"type": "user"}])
        );
        assert_eq!(
            linux["uidMappings"],
            json!([{"containerID": 0, "hostID": 1000, "size": 1}])
        );
        assert_eq!(
            linux["gidMappings"],
            json!([{"containerID": 0, "hostID": 100, "size": 1}])
        );
        assert!(linux.get("resources").is_none());
        let mounts = v["mounts"].as_array().unwrap();
        assert_eq!(
            mounts[5],
            json!({"destination": "/sys", "type": "none", "source": "/sys",
                   "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
        );
        assert_eq!(
            mounts[2]["options"],
            json!([
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620"
            ])
        );

        let current = default_spec(true);
        assert_eq!(
            current["linux"]["uidMappings"][0]["hostID"],
            nix::unistd::geteuid().as_raw()
        );
        assert_eq!(
            current["linux"]["gidMappings"][0]["hostID"],
            nix::unistd::getegid().as_raw()
        );
    }

    #[test]
    fn write_spec_writes_runcs_layout_and_never_overwrites() {
        let dir = temp_dir();
        write_spec(&dir, false).unwrap();
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        // runc's order and tab indentation.
        assert!(
            text.starts_with(
                "{\n\t\"ociVersion\": \"1.0.2-dev\",\n\t\"process\": {\n\t\t\"terminal\": true,"
            ),
            "{text}"
        );
        let order: Vec<usize> = [
            "\"process\"",
            "\"root\"",
            "\"hostname\"",
            "\"mounts\"",
            "\"linux\"",
        ]
        .iter()
        .map(|key| text.find(key).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, default_spec(false));

        std::fs::write(&path, "keep me").unwrap();
        let err = write_spec(&dir, true).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "File {} exists. Remove it first or use a different bundle directory",
                path.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");

        let missing = dir.join("no-such-bundle");
        let err = format!("{:#}", write_spec(&missing, false).unwrap_err());
        assert!(
            err.starts_with(&format!(
                "cannot create {}: No such file or directory",
                missing.join("config.json").display()
            )),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
