//! The agent binary as PID 1 on the host: in a throwaway PID and mount namespace made by
//! util-linux `unshare`, in the agent's test mode (see `src/mode.rs`).
//!
//! Each test owns a temporary root directory, waits for console lines with a deadline, and on
//! any failure kills `unshare`, whose `--kill-child` takes the namespace's init (and with it the
//! whole namespace) down. Each checks afterwards that nothing is left mounted or running.
//! Needs root (mounts, namespaces); without it the namespace tests say so and pass.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{geteuid, Pid};

/// The binary under test: cargo's build of it, or the one `HULL_AGENT_BIN` names (for example
/// the static build from `build.sh`).
fn agent() -> String {
    std::env::var("HULL_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hull-agent").to_owned())
}
const DEADLINE: Duration = Duration::from_secs(30);
const READY_PREFIX: &str = "HULL_AGENT_READY ";
const FATAL_PREFIX: &str = "HULL_AGENT_FATAL ";
const EXEC_EXIT_PREFIX: &str = "HULL_AGENT_EXEC_EXIT ";

/// Whether this host can run the namespace tests; says why not if it cannot.
fn can_sandbox() -> bool {
    if !geteuid().is_root() {
        eprintln!("skipping: namespace tests need root");
        return false;
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipping: util-linux unshare not found");
        return false;
    }
    true
}

/// A temporary directory, removed on drop only if nothing is mounted under it.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new() -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hull-agent-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).expect("create temporary root");
        Self(path)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if mounts_under(&self.0).is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("leaving {} in place: mounts under it", self.0.display());
        }
    }
}

/// Mount points of this (the harness's) mount namespace under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let dir = dir.to_str().expect("utf-8 temp dir");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mount_point| mount_point.starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// The inode of the harness's PID namespace, which the agent must not be in.
fn own_pidns() -> u64 {
    nix::sys::stat::stat("/proc/self/ns/pid")
        .expect("stat /proc/self/ns/pid")
        .st_ino
}

/// `(pid, ppid, state)` of every process on the host.
fn processes() -> Vec<(i32, i32, char)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        all.push((pid, ppid, state));
    }
    all
}

fn children_of(pid: i32) -> Vec<(i32, char)> {
    processes()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == pid)
        .map(|(pid, _, state)| (pid, state))
        .collect()
}

/// The agent as PID 1 of a fresh PID and mount namespace, with its console lines.
struct Sandbox {
    unshare: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    root: TempRoot,
}

impl Sandbox {
    fn start(root: TempRoot, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount", "--propagation", "private"])
            .arg("--kill-child")
            .arg("--")
            .arg(agent())
            .env("HULL_AGENT_TEST_ROOT", &root.0)
            .env("HULL_AGENT_TEST_PARENT_PIDNS", own_pidns().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut unshare = command.spawn().expect("spawn unshare");
        let (tx, lines) = mpsc::channel();
        let stdout = unshare.stdout.take().expect("piped stdout");
        let stderr = unshare.stderr.take().expect("piped stderr");
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            unshare,
            lines,
            seen: Vec::new(),
            root,
        }
    }

    /// Waits for a console line that `matches`, and returns it.
    fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    self.seen.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {DEADLINE:?}; console: {:#?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("console closed without {what}; console: {:#?}", self.seen)
                }
            }
        }
    }

    /// The agent's pid as the host sees it: the child `unshare --fork` made.
    fn agent_pid(&self) -> i32 {
        let unshare = self.unshare.id() as i32;
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some((pid, _)) = children_of(unshare).first() {
                return *pid;
            }
            assert!(Instant::now() < deadline, "unshare started no child");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the namespace to end and returns how `unshare` ended.
    fn wait_end(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.unshare.try_wait().expect("wait for unshare") {
                // Collect what the agent printed last, for the asserts and messages.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "namespace still running after {DEADLINE:?}; console: {:#?}",
                self.seen
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts the namespace ended through `reboot(RESTART)`: the kernel kills the namespace's
    /// init so that it appears to die of SIGHUP, and unshare passes that on. Then asserts that
    /// nothing is left.
    fn assert_rebooted(&mut self, agent_pid: Option<i32>) {
        let status = self.wait_end();
        let sighup = Signal::SIGHUP as i32;
        assert!(
            status.signal() == Some(sighup) || status.code() == Some(128 + sighup),
            "namespace did not end by reboot: {status:?}; console: {:#?}",
            self.seen
        );
        if let Some(pid) = agent_pid {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists()
                    || !processes()
                        .iter()
                        .any(|(p, ppid, _)| *p == pid && *ppid == self.unshare.id() as i32),
                "agent {pid} still running"
            );
        }
        assert_eq!(mounts_under(&self.root.0), Vec::<String>::new());
    }

    fn count(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.seen.iter().filter(|l| matches(l)).count()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Normally already gone; on a failed test this takes the namespace down.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("read osrelease")
        .trim_end()
        .to_owned()
}

/// Parses a readiness line back and checks it against this host.
fn check_ready_line(line: &str) {
    let json = line.strip_prefix(READY_PREFIX).expect("ready prefix");
    let value: serde_json::Value = serde_json::from_str(json).expect("ready line is JSON");
    assert_eq!(value["version"], 1, "{line}");
    assert_eq!(
        value["kernel_release"],
        host_kernel_release().as_str(),
        "{line}"
    );
    assert!(
        value["uptime_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{line}"
    );
}

#[test]
fn ready_reaps_orphans_and_powers_off_on_sigterm() {
    if !can_sandbox() {
        return;
    }
    // The shell exits at once; its background subshell is re-parented to the agent and ends
    // later with status 7, so only the agent can reap it.
    let exec = "(sleep 0.3; exit 7) </dev/null >/dev/null 2>&1 & echo HULL_TEST_ORPHAN=$!";
    let mut sandbox = Sandbox::start(TempRoot::new(), &[("HULL_AGENT_TEST_EXEC", exec)]);

    let ready = sandbox.wait_for("readiness line", |l| l.starts_with(READY_PREFIX));
    check_ready_line(&ready);

    let started = sandbox.wait_for("test command", |l| l.contains("started test command"));
    let shell: i32 = started
        .rsplit_once("pid=")
        .and_then(|(_, pid)| pid.parse().ok())
        .expect("shell pid");
    let orphan = sandbox.wait_for("orphan pid", |l| l.starts_with("HULL_TEST_ORPHAN="));
    let orphan: i32 = orphan["HULL_TEST_ORPHAN=".len()..]
        .parse()
        .expect("orphan pid");
    sandbox.wait_for("shell reaped", |l| {
        l.ends_with(&format!("reaped pid={shell} exit=0"))
    });
    sandbox.wait_for("orphan reaped", |l| {
        l.ends_with(&format!("reaped pid={orphan} exit=7"))
    });

    // Nothing is left under the agent: no zombie, no process at all.
    let agent = sandbox.agent_pid();
    assert_eq!(children_of(agent), [], "agent still has children");

    kill(Pid::from_raw(agent), Signal::SIGTERM).expect("send SIGTERM");
    sandbox.wait_for("power off", |l| l.ends_with("power off: SIGTERM"));
    sandbox.assert_rebooted(Some(agent));
    assert_eq!(sandbox.count(|l| l.starts_with(READY_PREFIX)), 1);
    assert_eq!(sandbox.count(|l| l.starts_with(FATAL_PREFIX)), 0);
    let warnings: HashSet<_> = sandbox
        .seen
        .iter()
        .filter(|l| l.contains("warning"))
        .collect();
    assert!(warnings.is_empty(), "warnings: {warnings:?}");
}

#[test]
fn powers_off_when_ready_if_the_command_line_asks() {
    if !can_sandbox() {
        return;
    }
    let cmdline = "console=ttyS0 reboot=k hull.poweroff=ready";
    let mut sandbox = Sandbox::start(TempRoot::new(), &[("HULL_AGENT_TEST_CMDLINE", cmdline)]);
    let ready = sandbox.wait_for("readiness line", |l| l.starts_with(READY_PREFIX));
    check_ready_line(&ready);
    sandbox.assert_rebooted(None);
    assert!(sandbox.count(|l| l.ends_with("power off: requested on the kernel command line")) == 1);
}

#[test]
fn sigusr2_and_sigint_power_off_too() {
    if !can_sandbox() {
        return;
    }
    for signal in [Signal::SIGUSR2, Signal::SIGINT] {
        let mut sandbox = Sandbox::start(TempRoot::new(), &[]);
        sandbox.wait_for("readiness line", |l| l.starts_with(READY_PREFIX));
        let agent = sandbox.agent_pid();
        kill(Pid::from_raw(agent), signal).expect("send signal");
        sandbox.wait_for("power off", |l| {
            l.ends_with(&format!("power off: {}", signal.as_str()))
        });
        sandbox.assert_rebooted(Some(agent));
    }
}

#[test]
fn a_panic_is_fatal_and_powers_off() {
    if !can_sandbox() {
        return;
    }
    let mut sandbox = Sandbox::start(TempRoot::new(), &[("HULL_AGENT_TEST_PANIC", "1")]);
    sandbox.wait_for("readiness line", |l| l.starts_with(READY_PREFIX));
    let fatal = sandbox.wait_for("fatal line", |l| l.starts_with(FATAL_PREFIX));
    assert!(
        fatal.contains("panic") && fatal.contains("test panic requested"),
        "{fatal}"
    );
    sandbox.assert_rebooted(None);
}

#[test]
fn a_failed_required_mount_is_fatal_and_powers_off() {
    if !can_sandbox() {
        return;
    }
    let root = TempRoot::new();
    // A file where the /proc mount point should be.
    std::fs::write(root.0.join("proc"), b"not a directory").expect("write file");
    let mut sandbox = Sandbox::start(root, &[]);
    let fatal = sandbox.wait_for("fatal line", |l| l.starts_with(FATAL_PREFIX));
    assert!(fatal.contains("cannot create mount point"), "{fatal}");
    assert!(fatal.contains("/proc"), "{fatal}");
    sandbox.assert_rebooted(None);
    assert_eq!(sandbox.count(|l| l.starts_with(READY_PREFIX)), 0);
}

/// Index of the first console line that `matches`.
fn position(seen: &[String], what: &str, matches: impl Fn(&str) -> bool) -> usize {
    seen.iter()
        .position(|l| matches(l))
        .unwrap_or_else(|| panic!("no {what}; console: {seen:#?}"))
}

/// Boots the agent with `hull.exec="<command>"` among other parameters, waits for the exit line
/// and the power-off, and returns the exit record and the console.
fn run_exec(command: &str, extra_params: &str) -> (serde_json::Value, Vec<String>) {
    let cmdline = format!(r#"console=ttyS0 reboot=k hull.exec="{command}" {extra_params}"#);
    let mut sandbox = Sandbox::start(TempRoot::new(), &[("HULL_AGENT_TEST_CMDLINE", &cmdline)]);
    let ready = sandbox.wait_for("readiness line", |l| l.starts_with(READY_PREFIX));
    check_ready_line(&ready);
    let line = sandbox.wait_for("exec exit line", |l| l.starts_with(EXEC_EXIT_PREFIX));
    sandbox.wait_for("power off", |l| {
        l.ends_with("power off: hull.exec command ended")
    });
    sandbox.assert_rebooted(None);
    assert_eq!(
        sandbox.count(|l| l.starts_with(EXEC_EXIT_PREFIX)),
        1,
        "{:#?}",
        sandbox.seen
    );
    assert_eq!(sandbox.count(|l| l.starts_with(FATAL_PREFIX)), 0);
    // Both on stdout, so their order is the agent's: ready first.
    let seen = &sandbox.seen;
    assert!(
        position(seen, "ready", |l| l.starts_with(READY_PREFIX))
            < position(seen, "exit", |l| l.starts_with(EXEC_EXIT_PREFIX))
    );
    let json = &line[EXEC_EXIT_PREFIX.len()..];
    let record = serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"));
    (record, sandbox.seen.clone())
}

#[test]
fn exec_hook_reports_exit_code_0_and_powers_off() {
    if !can_sandbox() {
        return;
    }
    // The command's stdout is the console, and comes before the exit line.
    let (exit, seen) = run_exec("echo HULL_TEST_EXEC_OUT $((40 + 2)) | cat", "");
    assert_eq!(exit, serde_json::json!({"code": 0}));
    let out = position(&seen, "command output", |l| l == "HULL_TEST_EXEC_OUT 42");
    assert!(out < position(&seen, "exit", |l| l.starts_with(EXEC_EXIT_PREFIX)));
}

#[test]
fn exec_hook_reports_exit_code_3() {
    if !can_sandbox() {
        return;
    }
    let (exit, seen) = run_exec("echo HULL_TEST_EXEC_ERR >&2; exit 3", "");
    assert_eq!(exit, serde_json::json!({"code": 3}));
    assert!(seen.iter().any(|l| l == "HULL_TEST_EXEC_ERR"), "{seen:#?}");
}

#[test]
fn exec_hook_reports_a_signal() {
    if !can_sandbox() {
        return;
    }
    let (exit, _) = run_exec("kill -TERM $$; sleep 5", "");
    assert_eq!(exit, serde_json::json!({"signal": 15}));
    let (exit, _) = run_exec("kill -KILL $$; sleep 5", "");
    assert_eq!(exit, serde_json::json!({"signal": 9}));
}

#[test]
fn exec_hook_keeps_reaping_and_waits_despite_poweroff_ready() {
    if !can_sandbox() {
        return;
    }
    // A grandchild is orphaned to the agent and ends (status 9) while the command still runs;
    // the agent reaps it and still reports the command's own ending. hull.poweroff=ready does
    // not cut the command short.
    let (exit, seen) = run_exec(
        "( (exit 9) </dev/null & ); sleep 0.5; exit 4",
        "hull.poweroff=ready",
    );
    assert_eq!(exit, serde_json::json!({"code": 4}));
    assert!(
        seen.iter()
            .any(|l| l.contains("reaped pid=") && l.ends_with(" exit=9")),
        "orphan not reaped: {seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|l| l.ends_with("power off: requested on the kernel command line")),
        "{seen:#?}"
    );
}

#[test]
fn exec_hook_without_a_shell_is_fatal_and_powers_off() {
    if !can_sandbox() {
        return;
    }
    let mut sandbox = Sandbox::start(
        TempRoot::new(),
        &[
            ("HULL_AGENT_TEST_CMDLINE", r#"hull.exec="true""#),
            ("HULL_AGENT_TEST_SHELL", "/nonexistent-hull/bin/sh"),
        ],
    );
    sandbox.wait_for("readiness line", |l| l.starts_with(READY_PREFIX));
    let fatal = sandbox.wait_for("fatal line", |l| l.starts_with(FATAL_PREFIX));
    assert!(
        fatal.contains("hull.exec: shell /nonexistent-hull/bin/sh not found"),
        "{fatal}"
    );
    sandbox.assert_rebooted(None);
    assert_eq!(sandbox.count(|l| l.starts_with(EXEC_EXIT_PREFIX)), 0);
}

#[test]
fn refuses_to_act_as_init_unless_pid1() {
    let refused = |env: &[(&str, &str)]| {
        let out = Command::new(agent())
            .envs(env.iter().copied())
            .output()
            .expect("run agent");
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not PID 1"), "{stderr}");
        assert!(stderr.contains("usage:"), "{stderr}");
        assert!(out.stdout.is_empty());
    };
    refused(&[]);
    // Test mode does not help either: it too needs PID 1 of a namespace of its own.
    let root = TempRoot::new();
    let root_str = root.0.to_str().expect("utf-8 temp dir");
    refused(&[
        ("HULL_AGENT_TEST_ROOT", root_str),
        ("HULL_AGENT_TEST_PARENT_PIDNS", "1"),
    ]);
    assert_eq!(
        std::fs::read_dir(&root.0).expect("read root").count(),
        0,
        "mounted anyway"
    );

    let out = Command::new(agent())
        .arg("--version")
        .output()
        .expect("run agent");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hull-agent "));
}
