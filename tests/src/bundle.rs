//! OCI bundles for end-to-end tests: a busybox rootfs (Debian's `busybox-static`, installed
//! with apt-get if missing) with applet links, and a `config.json` like the one `runc spec`
//! writes (namespaces, default mounts, capabilities, rlimits, masked and read-only paths),
//! with knobs for what tests change: args, user, env, read-only root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::TempDir;

/// Debian's static busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets linked in the rootfs's `/bin`.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "true", "false", "kill", "head", "ls", "touch", "wc", "readlink",
    "tee", "sleep",
];

/// Makes sure [`BUSYBOX`] exists, installing `busybox-static` if it does not.
pub fn ensure_busybox() -> PathBuf {
    if !Path::new(BUSYBOX).is_file() {
        let status = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "busybox-static",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("run apt-get");
        assert!(
            status.success() && Path::new(BUSYBOX).is_file(),
            "cannot install busybox-static (apt-get: {status})"
        );
    }
    PathBuf::from(BUSYBOX)
}

/// `tests/guest/root_escape.c`, built static by `tests/build.rs`: put into a rootfs, it tries to
/// leave the container's root (`root-escape chroot|setns`) and lists the directory it reached.
pub const ROOT_ESCAPE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/root-escape"));

/// What a test chooses about its container.
#[derive(Debug, Clone)]
pub struct BundleBuilder {
    args: Vec<String>,
    env: Vec<String>,
    uid: u32,
    gid: u32,
    readonly: bool,
    pid_namespace: bool,
    terminal: bool,
    hooks: Option<String>,
}

impl Default for BundleBuilder {
    fn default() -> Self {
        Self {
            args: vec!["sh".into()],
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                "TERM=xterm".into(),
            ],
            uid: 0,
            gid: 0,
            readonly: false,
            pid_namespace: true,
            terminal: false,
            hooks: None,
        }
    }
}

impl BundleBuilder {
    /// The process's arguments (`process.args`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// `sh -c SCRIPT`.
    pub fn script(self, script: &str) -> Self {
        self.args(&["sh", "-c", script])
    }

    /// Adds `KEY=VALUE` to `process.env`.
    pub fn env(mut self, var: &str) -> Self {
        self.env.push(var.to_owned());
        self
    }

    /// `process.user`.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// `root.readonly`.
    pub fn readonly(mut self, readonly: bool) -> Self {
        self.readonly = readonly;
        self
    }

    /// Whether the container gets its own PID namespace (runc's default). Without one its
    /// process is not a namespace's init, so it can die of a signal it sends itself.
    pub fn pid_namespace(mut self, pid_namespace: bool) -> Self {
        self.pid_namespace = pid_namespace;
        self
    }

    /// `process.terminal`.
    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    /// The spec's `hooks` object, as JSON text.
    pub fn hooks(mut self, hooks: &str) -> Self {
        self.hooks = Some(hooks.to_owned());
        self
    }

    /// The `config.json` text.
    pub fn config_json(&self) -> String {
        let strings = |list: &[String]| {
            let quoted: Vec<String> = list.iter().map(|s| json_string(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let caps = r#"["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]"#;
        format!(
            r#"{{
  "ociVersion": "1.0.2-dev",
  "process": {{
    "terminal": {terminal},
    "user": {{"uid": {uid}, "gid": {gid}}},
    "args": {args},
    "env": {env},
    "cwd": "/",
    "capabilities": {{
      "bounding": {caps},
      "effective": {caps},
      "inheritable": {caps},
      "permitted": {caps},
      "ambient": {caps}
    }},
    "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}}],
    "noNewPrivileges": true
  }},
  {hooks}"root": {{"path": "rootfs", "readonly": {readonly}}},
  "hostname": "runc",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}},
    {{"destination": "/dev/pts", "type": "devpts", "source": "devpts",
      "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}},
    {{"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
      "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}},
    {{"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
      "options": ["nosuid", "noexec", "nodev"]}},
    {{"destination": "/sys", "type": "sysfs", "source": "sysfs",
      "options": ["nosuid", "noexec", "nodev", "ro"]}},
    {{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
      "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}}
  ],
  "linux": {{
    "resources": {{"devices": [{{"allow": false, "access": "rwm"}}]}},
    "namespaces": [
      {pid}{{"type": "network"}}, {{"type": "ipc"}}, {{"type": "uts"}},
      {{"type": "mount"}}, {{"type": "cgroup"}}
    ],
    "maskedPaths": [
      "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
      "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
      "/proc/scsi"
    ],
    "readonlyPaths": [
      "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
    ]
  }}
}}
"#,
            uid = self.uid,
            gid = self.gid,
            args = strings(&self.args),
            env = strings(&self.env),
            readonly = self.readonly,
            terminal = self.terminal,
            hooks = self
                .hooks
                .as_ref()
                .map_or_else(String::new, |h| format!("\"hooks\": {h},\n  ")),
            pid = if self.pid_namespace {
                r#"{"type": "pid"}, "#
            } else {
                ""
            },
        )
    }

    /// Writes the bundle into a fresh temporary directory.
    pub fn build(&self) -> Bundle {
        let dir = TempDir::new("bundle");
        self.write_to(dir.path());
        Bundle { dir }
    }

    /// Writes the bundle (`config.json`, `rootfs/`) into `dir`, which must not hold one yet.
    pub fn write_to(&self, dir: &Path) {
        let busybox = ensure_busybox();
        let rootfs = dir.join("rootfs");
        // Mount points must exist: a read-only rootfs cannot get them later.
        for sub in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            std::fs::create_dir_all(rootfs.join(sub)).expect("create rootfs directories");
        }
        std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet link");
        }
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n",
        )
        .expect("write /etc/passwd");
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\nuser:x:1000:\n")
            .expect("write /etc/group");
        std::fs::write(dir.join("config.json"), self.config_json()).expect("write config.json");
    }
}

/// A bundle directory (`config.json`, `rootfs/`), removed when dropped.
pub struct Bundle {
    dir: TempDir,
}

impl Bundle {
    /// A builder with runc's defaults and `sh` as the process.
    pub fn builder() -> BundleBuilder {
        BundleBuilder::default()
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The rootfs directory.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
