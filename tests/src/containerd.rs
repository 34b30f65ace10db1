//! A private containerd for end-to-end tests: Debian's containerd 1.6 with its config, root,
//! state, socket and log in a temporary directory of its own, so it shares nothing with a
//! containerd the host may run (but what containerd 1.6 keeps at fixed paths: the shims'
//! sockets in `/run/containerd/s`). Each test says which plugins it wants in the config
//! ([`Containerd::start`]); the daemon is stopped (SIGTERM, then SIGKILL) on drop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{processes, run, Finished, TempDir};

/// For containerd to answer on its socket, and to exit when told to.
pub const DAEMON_DEADLINE: Duration = Duration::from_secs(60);

/// The Debian programs a private containerd needs on `PATH`.
pub const PROGRAMS: [&str; 3] = ["containerd", "ctr", "containerd-shim-runc-v2"];

/// A containerd daemon of the test's own.
pub struct Containerd {
    dir: TempDir,
    daemon: Option<Child>,
    /// What `start` added to the daemon's environment, for a restart.
    env: Vec<(String, OsString)>,
    started: Instant,
}

impl Containerd {
    /// Writes `config.toml` (version 2: root, state, socket and the `opt` plugin's directory
    /// in a new temporary directory, then `plugins`, TOML the caller adds) and starts
    /// containerd with it and with `env` added to its environment; returns once `ctr version`
    /// gets an answer. Panics, with containerd's log, if it does not within
    /// [`DAEMON_DEADLINE`].
    pub fn start(
        tag: &str,
        plugins: impl FnOnce(&Path) -> String,
        env: &[(&str, OsString)],
    ) -> Self {
        let dir = TempDir::new(tag);
        let path = dir.path();
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             [grpc]\n  address = \"{socket}\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\
             {plugins}",
            root = path.join("root").display(),
            state = path.join("state").display(),
            socket = path.join("containerd.sock").display(),
            opt = path.join("opt").display(),
            plugins = plugins(path),
        );
        std::fs::write(path.join("config.toml"), config).expect("write config.toml");
        let mut containerd = Self {
            dir,
            daemon: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            started: Instant::now(),
        };
        containerd.spawn_daemon();
        containerd.wait_until_serving(containerd.started);
        containerd
    }

    /// Starts the daemon again once [`Self::stop`] has stopped it (as `systemctl restart`
    /// does): the same config, root, state, socket and environment, its log going on in the
    /// same file. Returns once `ctr version` gets an answer. The shims the daemon had started
    /// ran on meanwhile: the new one finds them by their bundles.
    pub fn start_again(&mut self) {
        assert!(self.daemon.is_none(), "containerd is running already");
        let spawned = Instant::now();
        self.spawn_daemon();
        self.wait_until_serving(spawned);
    }

    /// Starts `containerd --config config.toml`, its output appended to `containerd.log`.
    fn spawn_daemon(&mut self) {
        let path = self.dir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.join("containerd.log"))
            .expect("open containerd.log");
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(path.join("config.toml"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log file"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.daemon = Some(daemon);
    }

    /// The temporary directory holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// containerd's state directory (tasks' bundles, the CRI plugin's sandboxes).
    pub fn state(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// When the daemon was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits for the daemon spawned at `spawned` to answer on its socket.
    fn wait_until_serving(&mut self, spawned: Instant) {
        loop {
            if self.socket().exists()
                && self
                    .ctr("default", &["version"], Duration::from_secs(30))
                    .status
                    .success()
            {
                eprintln!("containerd serving after {:?}", spawned.elapsed());
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "containerd exited at start: {status}\n{}",
                    self.log_tail(8192)
                );
            }
            if spawned.elapsed() > DAEMON_DEADLINE {
                panic!(
                    "containerd not serving within {DAEMON_DEADLINE:?}\n{}",
                    self.log_tail(8192)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How the daemon ended, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.daemon.as_mut()?.try_wait().ok().flatten()
    }

    /// `ctr` against this containerd in `namespace`, killed after `deadline`.
    pub fn ctr(&self, namespace: &str, args: &[&str], deadline: Duration) -> Finished {
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=10")
            .arg(deadline.as_secs().to_string())
            .arg("ctr")
            .arg("--connect-timeout=10s")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", namespace])
            .args(args);
        // `timeout` ends it first; this is for `timeout` itself.
        run(cmd, deadline + Duration::from_secs(30))
    }

    /// The last `bytes` of containerd's log, headed by its path.
    pub fn log_tail(&self, bytes: usize) -> String {
        tail_of(&self.dir().join("containerd.log"), bytes)
    }

    /// Mount points under the temporary directory (containers' rootfs, snapshots, the CRI
    /// plugin's shm and network namespaces).
    pub fn leftover_mounts(&self) -> Vec<String> {
        mounts_below(self.dir())
    }

    /// The shims this containerd started that still run (each is started with `-address`
    /// and this daemon's socket).
    pub fn shims(&self) -> Vec<(i32, String)> {
        let needle = format!("-address {} ", self.socket().display());
        processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains(&needle))
            .collect()
    }

    /// SIGTERM to containerd, SIGKILL if it has not exited within [`DAEMON_DEADLINE`].
    pub fn stop(&mut self) {
        let Some(mut daemon) = self.daemon.take() else {
            return;
        };
        signal(daemon.id() as i32, libc::SIGTERM);
        let end = Instant::now() + DAEMON_DEADLINE;
        while let Ok(None) = daemon.try_wait() {
            if Instant::now() > end {
                let _ = daemon.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = daemon.wait();
    }

    /// After a failure: kills the shims still running and unmounts what is left below the
    /// temporary directory. The daemon must have been stopped.
    pub fn force_clean(&mut self) {
        self.stop();
        for (pid, _) in self.shims() {
            signal(pid, libc::SIGKILL);
        }
        unmount_all(&self.leftover_mounts());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        // Nothing may keep the temporary directory busy when it is removed.
        unmount_all(&self.leftover_mounts());
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; callers pass the
    // positive pid of a process their test started.
    unsafe { libc::kill(pid, sig) };
}

/// Mount points at or below `dir`, in the order of `/proc/self/mountinfo`.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&prefix) || *point == dir.to_string_lossy())
        .map(str::to_owned)
        .collect()
}

/// Unmounts (lazily, the last mounted first) each of `points`.
pub fn unmount_all(points: &[String]) {
    for point in points.iter().rev() {
        if let Ok(point) = std::ffi::CString::new(point.as_str()) {
            // SAFETY: `point` is a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The last `bytes` of the file at `path`, headed by its path; empty if it cannot be read.
pub fn tail_of(path: &Path, bytes: usize) -> String {
    match std::fs::read(path) {
        Ok(text) => {
            let tail = &text[text.len().saturating_sub(bytes)..];
            format!(
                "\n--- {} ---\n{}",
                path.display(),
                String::from_utf8_lossy(tail).trim_end()
            )
        }
        Err(_) => String::new(),
    }
}

/// Why a private containerd cannot run here, if it cannot: not root, or one of [`PROGRAMS`]
/// missing from `PATH`.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root, for containerd".into());
    }
    PROGRAMS
        .iter()
        .find(|bin| which(bin).is_none())
        .map(|bin| format!("{bin} not found on PATH (make deps installs Debian's containerd)"))
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
