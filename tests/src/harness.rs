//! Finding hull's binaries and guest artifacts, and running a VMM with a deadline.
//!
//! Every VM a test starts is a child process that is killed if the deadline passes or the
//! test panics, so a failing test never leaves a VMM behind.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// A binary built from this workspace: `$HULL_<NAME>` if set, else next to the running
/// test's `deps/` directory (the profile directory cargo builds binaries into).
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("HULL_{}", name.replace('-', "_").to_uppercase());
    if let Some(path) = std::env::var_os(var) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the running test has a path");
    let mut dir = exe
        .parent()
        .expect("a binary lives in a directory")
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The guest kernel and initramfs `make` builds: `$HULL_KERNEL` / `$HULL_INITRAMFS`, or
/// `build/guest/` in the workspace.
pub fn guest_artifacts() -> (PathBuf, PathBuf) {
    let dir = workspace_root().join("build/guest");
    let kernel = std::env::var_os("HULL_KERNEL").map_or_else(|| dir.join("vmlinux"), PathBuf::from);
    let initramfs = std::env::var_os("HULL_INITRAMFS")
        .map_or_else(|| dir.join("initramfs.cpio"), PathBuf::from);
    (kernel, initramfs)
}

/// Panics, naming them, unless the guest kernel and initramfs of [`guest_artifacts`] exist.
pub fn require_guest_artifacts() {
    let (kernel, initramfs) = guest_artifacts();
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest artifacts missing ({} and {}): run `make kernel agent` first",
        kernel.display(),
        initramfs.display()
    );
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `hull-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "hull-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("the temp dir is writable");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished process printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on standard output.
    pub stdout: String,
    /// Everything on standard error.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

/// A child process whose output lines arrive on channels; killed on drop.
pub struct Running {
    child: Child,
    started: Instant,
    stdout_lines: Receiver<(Instant, String)>,
    stderr: Receiver<String>,
    stdout_seen: String,
}

impl Running {
    /// Spawns `cmd` with piped standard output and error.
    pub fn spawn(mut cmd: Command) -> Self {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let (tx, stdout_lines) = channel();
        let out = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut line = Vec::new();
            // Lines as they come, the last one even without a newline.
            while reader
                .read_until(b'\n', &mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let text = String::from_utf8_lossy(&line).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    break;
                }
                line.clear();
            }
        });
        let (tx, stderr) = channel();
        let mut err = child.stderr.take().expect("stderr is piped");
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        Self {
            child,
            started,
            stdout_lines,
            stderr,
            stdout_seen: String::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits until a line of standard output satisfies `pred`; returns it and when it came.
    /// Panics with everything printed so far if `deadline` passes or output ends first.
    pub fn wait_for_line(
        &mut self,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (String, Instant) {
        let end = self.started + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.stdout_seen.push_str(&line);
                    if pred(&line) {
                        return (line, at);
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let finished = self.finish_now();
                    panic!(
                        "no matching output line within {deadline:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        finished.stdout, finished.stderr
                    );
                }
            }
        }
    }

    fn finish_now(&mut self) -> Finished {
        let status = self.child.wait().expect("waiting for a child cannot fail");
        let elapsed = self.started.elapsed();
        while let Ok((_, line)) = self.stdout_lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout_seen.push_str(&line);
        }
        Finished {
            status,
            stdout: std::mem::take(&mut self.stdout_seen),
            stderr: self
                .stderr
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_default(),
            elapsed,
        }
    }

    /// Waits for the process to exit; kills it and panics with its output after `deadline`
    /// (counted from its start).
    pub fn wait(mut self, deadline: Duration) -> Finished {
        let end = self.started + deadline;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return self.finish_now(),
                Ok(None) if Instant::now() >= end => {
                    let _ = self.child.kill();
                    let finished = self.finish_now();
                    panic!(
                        "process still running after {deadline:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        finished.stdout, finished.stderr
                    );
                }
                Ok(None) => {
                    // Drain output as it comes so the pipes never fill up.
                    if let Ok((_, line)) = self.stdout_lines.recv_timeout(Duration::from_millis(5))
                    {
                        self.stdout_seen.push_str(&line);
                    }
                }
                Err(e) => panic!("cannot wait for the child: {e}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion within `deadline`.
pub fn run(cmd: Command, deadline: Duration) -> Finished {
    Running::spawn(cmd).wait(deadline)
}

/// Every other process and its command line (arguments joined by spaces).
pub fn processes() -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Other processes whose command line mentions `needle`, as `PID: COMMAND LINE`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(needle))
        .map(|(pid, cmdline)| format!("{pid}: {cmdline}"))
        .collect()
}

/// A field of the first processor in `/proc/cpuinfo` (`vendor_id`, `flags`, ...).
fn cpuinfo_field(name: &str) -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    info.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
        .unwrap_or_default()
}

/// The CPU's vendor string: `AuthenticAMD`, `GenuineIntel`, ...
pub fn cpu_vendor() -> String {
    cpuinfo_field("vendor_id")
}

/// Whether the CPU (as this kernel sees it) has `flag` (`xsave`, `avx`, ...).
pub fn cpu_has_flag(flag: &str) -> bool {
    cpuinfo_field("flags").split_whitespace().any(|f| f == flag)
}

/// The cgroup directories process `pid` is in: the unified one on cgroup v2; on a v1 (or
/// hybrid) host, those of the memory, pids and cpu hierarchies.
pub fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let root = Path::new("/sys/fs/cgroup");
    let v2 = root.join("cgroup.controllers").is_file();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if v2 && controllers.is_empty() {
            dirs.push(root.join(relative));
        } else if !v2
            && controllers
                .split(',')
                .any(|c| ["memory", "pids", "cpu"].contains(&c))
        {
            dirs.push(root.join(controllers).join(relative));
        }
    }
    dirs
}

/// Checks that the hull-vmm `pid` runs jailed (`vmm::jail`): namespaces of its own, a root
/// that holds none of the host's files, only the file server's capabilities, no_new_privs, a
/// seccomp filter, and its jail directory empty on the host. `kept` is the mask of
/// `vmm::jail::KEPT_CAPABILITIES`.
pub fn assert_jailed(pid: i32, kept: u64) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let jail = args
        .iter()
        .position(|a| a == "--jail")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("hull-vmm {pid} has no --jail: {args:?}"));
    for ns in ["mnt", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(
            theirs, ours,
            "hull-vmm {pid} shares the host's {ns} namespace"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_owned()
    };
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let mask = u64::from_str_radix(&field(set), 16).unwrap();
        assert_eq!(
            mask, kept,
            "hull-vmm {pid}'s {set} {mask:#x}, not {kept:#x}"
        );
    }
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("CapAmb:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(
        field("Seccomp:"),
        "2",
        "hull-vmm {pid} has no seccomp filter"
    );
    // Its root: only what it was given.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for host_file in ["etc/passwd", "usr/bin", "bin/sh", "root", "home", "sys"] {
        assert!(
            !root.join(host_file).exists(),
            "/{host_file} is in hull-vmm {pid}'s jail"
        );
    }
    assert!(root.join("dev/kvm").exists());
    // Its mounts: the jail's own, each bind, a procfs that shows only what it may trace.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    assert!(points.len() <= 16, "hull-vmm {pid}'s mounts: {points:?}");
    for host_mount in ["/sys", "/etc", "/usr", "/dev/pts", "/dev/shm"] {
        assert!(!points.contains(&host_mount), "{host_mount} in {points:?}");
    }
    let proc_line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/proc"))
        .unwrap_or_else(|| panic!("no /proc in hull-vmm {pid}'s jail: {mountinfo}"));
    assert!(
        proc_line.contains("hidepid=ptraceable") || proc_line.contains("hidepid=4"),
        "{proc_line}"
    );
    let jail = Path::new(jail.as_str());
    let state = jail.parent().unwrap();
    assert!(
        root.join(state.strip_prefix("/").unwrap())
            .join("vm.json")
            .exists(),
        "the state directory {} is not in the jail",
        state.display()
    );
    assert_eq!(
        std::fs::read_dir(jail).unwrap().count(),
        0,
        "the jail's directory {} is not empty on the host",
        jail.display()
    );
}

/// What the host sees of a process (a hull-vmm): its open descriptors and its resident memory
/// in KiB; zeros once it is gone.
pub fn footprint(pid: i32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// Unmounts (lazily, innermost first) every mount below `dir`: what a client under test (dockerd,
/// Podman) left there when the test failed.
pub fn unmount_below(dir: &Path) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
            dir.display()
        ))
        .status();
}

/// What a container runs for [`check_terminal_session`]: its terminal's size, then the line
/// typed. (Quoted for the shell line that `script` runs.)
pub const TERMINAL_SCRIPT: &str = "'stty size; read line; echo got-\\$line'";

/// Runs the client command line `command` (whose container runs [`TERMINAL_SCRIPT`]) as a user
/// at a terminal would: under script(1), on a pty of 33 rows and 101 columns, typing "typed"
/// 20 s in; checks that the container saw that size and that line.
pub fn check_terminal_session(command: &str, env: &[(&str, String)], deadline: Duration) {
    let mut script = Command::new("sh");
    script
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .arg("-c")
        .arg(format!(
            "(sleep 20; echo typed) | script -qec \"stty rows 33 cols 101; {command}\" /dev/null"
        ));
    let tty = run(script, deadline);
    assert!(tty.status.success(), "{command}: {tty:?}");
    let lines: Vec<&str> = tty.stdout.lines().map(str::trim_end).collect();
    assert!(
        lines.contains(&"33 101") && lines.contains(&"got-typed"),
        "{command}: {tty:?}"
    );
}

/// Waits (up to `deadline`) until the file at `path` contains `needle`; gives its text.
pub fn wait_for_text(path: &Path, needle: &str, deadline: Duration) -> String {
    let end = Instant::now() + deadline;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "no {needle:?} in {}: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that container `id` under the runtime root `root` left nothing: no state directory,
/// and (within 10 s) no process whose command line names `root`.
pub fn assert_container_gone(root: &Path, id: &str) {
    let state = root.join(id);
    assert!(
        !state.exists(),
        "state directory {} left behind",
        state.display()
    );
    let needle = root.display().to_string();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "processes left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /` from `addr` over HTTP/1.0, retried until it answers: the whole response.
pub fn http_get(addr: &str, deadline: Duration) -> String {
    use std::io::{Read, Write};
    let end = Instant::now() + deadline;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut conn = std::net::TcpStream::connect(addr)?;
            conn.set_read_timeout(Some(Duration::from_secs(30)))?;
            conn.write_all(b"GET / HTTP/1.0\r\nHost: hull\r\n\r\n")?;
            let mut text = String::new();
            conn.read_to_string(&mut text)?;
            Ok(text)
        })();
        match attempt {
            Ok(text) if text.starts_with("HTTP/") => return text,
            other => {
                assert!(Instant::now() < end, "no page from {addr}: {other:?}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
