//! End to end: runc's verbs on real micro-VMs, the way containerd's shim drives them: `create`
//! (pid file, stdio inherited by hull-vmm), `state`, `list`, `start`, `ps`, `exec`, `kill`,
//! `delete`, hooks on the host, a terminal sent over `--console-socket` (input, output, window
//! size), `exec -t`, and the errors for wrong transitions and bad input; `spec` and `features`.
//! Two containers run at once:
//! `kill -9` of one hull-vmm must leave the other running, and `delete` must clean up after it.
//! The test is its processes' subreaper, as the shim is, so it reaps each hull-vmm and checks
//! that it exits with its container's status. One test (two VMs at once) of about two minutes
//! on a PVM host.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_tests::bundle::Bundle;
use hull_tests::harness::{
    self, processes_mentioning, require_guest_artifacts, workspace_bin, TempDir,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(300);

struct Hull<'a> {
    root: &'a Path,
}

impl Hull<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_bin("hull"));
        cmd.arg("--root").arg(self.root).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `hull ARGS` to its end (under a deadline).
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg(DEADLINE.as_secs().to_string())
            .arg(workspace_bin("hull"))
            .arg("--root")
            .arg(self.root)
            .args(args)
            .stdin(Stdio::null());
        cmd.output().expect("run hull")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hull {args:?} failed: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `hull ARGS` must fail with a message containing `needle`.
    fn fails(&self, args: &[&str], needle: &str) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "hull {args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "hull {args:?}: expected {needle:?} in: {stderr}"
        );
    }

    fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state is JSON")
    }
}

/// The test's end of `--console-socket`: takes the pty master hull-vmm sends, and collects
/// what the container writes to its terminal.
struct ConsoleReader {
    master: std::sync::mpsc::Receiver<File>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl ConsoleReader {
    fn listen(path: &Path) -> Self {
        let listener = UnixListener::bind(path).expect("bind the console socket");
        let (tx, master) = std::sync::mpsc::channel();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("hull-vmm connects");
            let fd = vmm::container::console::receive_fd(&conn).expect("a pty master arrives");
            let mut reader = File::from(fd);
            tx.send(reader.try_clone().unwrap()).unwrap();
            let mut buf = [0u8; 4096];
            // Ends with EIO once hull-vmm (the slave's holder) is gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self { master, output }
    }

    fn master(&self) -> File {
        self.master
            .recv_timeout(Duration::from_secs(10))
            .expect("no pty master on the console socket")
    }

    fn wait_for(&self, needle: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let text = String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} on the terminal: {text:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Makes this process the subreaper of its descendants, as containerd's shim is.
fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// Waits for the orphaned hull-vmm `pid` (ours to reap as subreaper) and returns its status.
fn reap(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let end = Instant::now() + DEADLINE;
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, signal, _)) => return 128 + signal as i32,
            Ok(_) => {}
            Err(err) => panic!("waitpid {pid}: {err}"),
        }
        assert!(Instant::now() < end, "hull-vmm {pid} still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_status(hull: &Hull, id: &str, status: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    while hull.state(id)["status"] != status {
        assert!(
            Instant::now() < end,
            "{id} never became {status}: {}",
            hull.state(id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_text(path: &Path, needle: &str) {
    harness::wait_for_text(path, needle, Duration::from_secs(60));
}

#[test]
fn runc_verbs_on_two_containers_and_a_killed_vmm() {
    require_guest_artifacts();
    become_subreaper();
    let root = TempDir::new("lifecycle-root");
    let work = TempDir::new("lifecycle");
    let hull = Hull { root: root.path() };

    // Bad input, before any VM: nothing may be left behind.
    for verb in [
        &["state"][..],
        &["start"],
        &["kill"],
        &["delete"],
        &["ps"],
        &["exec"],
    ] {
        let mut args = verb.to_vec();
        args.push("nosuch");
        if verb == ["exec"] {
            args.push("true");
        }
        hull.fails(&args, "container nosuch does not exist");
    }
    hull.fails(&["kill", "nosuch", "SIGFOO"], "unknown signal \"SIGFOO\"");
    hull.fails(
        &["create", "--bundle", "/nonexistent", "bad"],
        "/nonexistent",
    );
    hull.fails(
        &["create", "--bundle", work.path().to_str().unwrap(), "bad"],
        "config.json",
    );
    hull.fails(&["create", "bad/id"], "invalid container id");
    assert!(!root.path().join("bad").exists());

    // spec and features need no VM.
    let spec_dir = work.path().join("spec");
    std::fs::create_dir(&spec_dir).unwrap();
    hull.ok(&["spec", "--bundle", spec_dir.to_str().unwrap()]);
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(spec_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(spec["root"]["path"], "rootfs");
    assert_eq!(spec["process"]["args"], serde_json::json!(["sh"]));
    hull.fails(&["spec", "--bundle", spec_dir.to_str().unwrap()], "exists");
    let features: Value = serde_json::from_str(&hull.ok(&["features"])).unwrap();
    assert!(features["ociVersionMax"]
        .as_str()
        .unwrap()
        .starts_with("1."));
    assert!(features["hooks"]
        .as_array()
        .unwrap()
        .contains(&Value::from("poststop")));

    // A has a terminal and hooks; it reads a line, traps SIGTERM and exits 9. B just sleeps.
    let hook = |kind: &str| {
        let file = work.path().join(format!("{kind}.json"));
        format!(
            r#"[{{"path": "/bin/sh", "args": ["sh", "-c", "cat > {}"], "timeout": 30}}]"#,
            file.display()
        )
    };
    let hooks = format!(
        r#"{{"createRuntime": {}, "prestart": {}, "poststart": {}, "poststop": {}}}"#,
        hook("createRuntime"),
        hook("prestart"),
        hook("poststart"),
        hook("poststop")
    );
    let a = Bundle::builder()
        .terminal(true)
        .hooks(&hooks)
        .script(
            "trap 'echo got-term; exit 9' TERM; echo started-a; read line; echo \"got-$line\"; \
             while :; do sleep 1; done",
        )
        .build();
    let hook_state = |kind: &str| -> Value {
        let path = work.path().join(format!("{kind}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("hook {kind} did not run ({}: {e})", path.display()));
        serde_json::from_str(&text).unwrap()
    };
    let b = Bundle::builder()
        .script("echo started-b; while :; do sleep 1; done")
        .build();
    let out_a = work.path().join("a.out");
    let out_b = work.path().join("b.out");
    let pid_file = work.path().join("a.pid");
    // hull-vmm inherits create's stdout and stderr (as runc's init does), so they are files:
    // a pipe would stay open for as long as the container runs.
    let console_socket = work.path().join("console.sock");
    let console = ConsoleReader::listen(&console_socket);
    let create = |bundle: &Bundle, id: &str, out: &Path, pid_file: Option<&Path>| {
        let mut cmd = hull.command(&["create", "--bundle", bundle.path().to_str().unwrap()]);
        if let Some(p) = pid_file {
            cmd.arg("--pid-file").arg(p);
            cmd.arg("--console-socket").arg(&console_socket);
        }
        let err = out.with_extension("err");
        cmd.arg(id)
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        (cmd.spawn().expect("start hull create"), err)
    };
    // Both VMs boot at once.
    let t0 = Instant::now();
    let ca = create(&a, "a", &out_a, Some(&pid_file));
    let cb = create(&b, "b", &out_b, None);
    for (name, (mut child, err)) in [("a", ca), ("b", cb)] {
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "create {name}: {}",
            std::fs::read_to_string(err).unwrap_or_default()
        );
    }
    eprintln!("two creates took {:?}", t0.elapsed());

    let master = console.master();
    let state_a = hull.state("a");
    assert_eq!(state_a["status"], "created");
    for kind in ["createRuntime", "prestart"] {
        let seen = hook_state(kind);
        assert_eq!(seen["id"], "a", "{kind}: {seen}");
        assert_eq!(seen["status"], "created", "{kind}: {seen}");
        assert_eq!(seen["pid"], state_a["pid"], "{kind}: {seen}");
    }
    assert_eq!(state_a["ociVersion"], "1.0.2");
    assert_eq!(state_a["bundle"], a.path().to_str().unwrap());
    let pid_a = state_a["pid"].as_i64().unwrap() as i32;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        pid_a.to_string()
    );
    assert!(std::fs::read_to_string(format!("/proc/{pid_a}/cmdline"))
        .unwrap()
        .contains("hull-vmm"));
    // hull-vmm bounds itself: no core dumps, a descriptor table sized for its file server.
    let limits = std::fs::read_to_string(format!("/proc/{pid_a}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"], "{limits}");
    let files = limit("Max open files");
    assert_eq!(files[0], files[1], "{limits}");
    let files: u64 = files[0].parse().unwrap();
    assert!(files <= vmm::limits::MAX_DESCRIPTORS, "{limits}");
    // ... runs jailed ...
    let kept = vmm::jail::KEPT_CAPABILITIES
        .iter()
        .fold(0, |mask, c| mask | 1u64 << c.index());
    hull_tests::harness::assert_jailed(pid_a, kept);
    // ... and in a cgroup of its own (hull/<id>), with its memory bounded.
    let cgroups = hull_tests::harness::cgroup_dirs(pid_a);
    assert!(
        !cgroups.is_empty(),
        "hull-vmm is in no cgroup hierarchy hull uses"
    );
    for dir in &cgroups {
        assert!(
            dir.ends_with("hull/a"),
            "{}: {}",
            dir.display(),
            std::fs::read_to_string(format!("/proc/{pid_a}/cgroup")).unwrap_or_default()
        );
        for file in ["memory.max", "memory.limit_in_bytes"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                let bytes: u64 = text.trim().parse().unwrap();
                assert!(bytes > 64 << 20 && bytes < 4 << 30, "{file}: {bytes}");
            }
        }
    }
    let list: Value = serde_json::from_str(&hull.ok(&["list", "--format", "json"])).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    hull.fails(
        &["create", "--bundle", b.path().to_str().unwrap(), "a"],
        "container a already exists",
    );
    assert_eq!(
        hull.state("a")["status"],
        "created",
        "a failed duplicate create touched a"
    );
    hull.fails(&["exec", "a", "true"], "it is created");
    hull.fails(&["delete", "a"], "that is not stopped: created");

    hull.ok(&["start", "a"]);
    hull.ok(&["start", "b"]);
    assert_eq!(hull.state("a")["status"], "running");
    assert_eq!(hook_state("poststart")["status"], "running");
    hull.fails(&["start", "a"], "already running");
    hull.fails(&["delete", "a"], "that is not stopped: running");
    console.wait_for("started-a");
    (&master).write_all(b"hello\r").unwrap();
    console.wait_for("got-hello");
    wait_for_text(&out_b, "started-b");

    // kill -9 of b's hull-vmm: b is stopped, a runs on; delete cleans b up.
    let pid_b = hull.state("b")["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_b), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(reap(pid_b), 137);
    assert_eq!(hull.state("b")["status"], "stopped");
    assert_eq!(hull.state("a")["status"], "running");
    hull.ok(&["delete", "b"]);
    assert!(!root.path().join("b").exists());
    assert!(processes_mentioning(&root.path().join("b").display().to_string()).is_empty());

    // a still answers: ps and exec.
    // For programs, the host pid that stands for the container: its hull-vmm.
    let pids: Value = serde_json::from_str(&hull.ok(&["ps", "--format", "json", "a"])).unwrap();
    assert_eq!(pids, serde_json::json!([hull.state("a")["pid"]]));
    let table = hull.ok(&["ps", "a"]);
    assert!(table.contains("while :"), "{table}");
    let exec = hull.run(&[
        "exec",
        "--env",
        "X=42",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        "a",
        "sh",
        "-c",
        "echo exec-$X-$(pwd)-$(id -u):$(id -g); exit 4",
    ]);
    assert_eq!(
        exec.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout),
        "exec-42-/tmp-1000:1000\n"
    );

    // The terminal: a new window size on the master reaches the guest's pty; exec -t gets a
    // pty of its own.
    vmm::container::console::set_window_size(&master, 40, 100).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let size = hull.ok(&["exec", "a", "sh", "-c", "stty -F /dev/pts/0 size"]);
        if size.trim() == "40 100" {
            break;
        }
        assert!(
            Instant::now() < end,
            "the guest's pty is {size:?}, not 40 100"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let tty = hull.run(&["exec", "-t", "a", "sh", "-c", "tty; exit 3"]);
    assert_eq!(
        tty.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&tty.stderr)
    );
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(
        tty_out.starts_with("/dev/pts/") && !tty_out.starts_with("/dev/pts/0"),
        "{tty_out:?}"
    );

    // SIGTERM by name reaches a's trap; hull-vmm exits with the container's status.
    hull.ok(&["kill", "a", "TERM"]);
    assert_eq!(reap(pid_a), 9);
    console.wait_for("got-term");
    wait_for_status(&hull, "a", "stopped");
    hull.fails(&["kill", "a", "KILL"], "not running");
    hull.fails(&["start", "a"], "has stopped");
    hull.ok(&["delete", "a"]);
    for dir in &cgroups {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert_eq!(hook_state("poststop")["status"], "stopped");
    hull.fails(&["state", "a"], "does not exist");
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "state left"
    );
    assert!(processes_mentioning(&root.path().display().to_string()).is_empty());
}

#[test]
fn a_docker_shaped_state_directory_far_past_sun_len() {
    // Docker runs a runtime as `--root <exec-root>/runtime-<name>/moby` with 64-hex ids, so the
    // container's sockets are well past the 107 bytes a socket address holds; here more so.
    require_guest_artifacts();
    become_subreaper();
    let top = TempDir::new("lifecycle-docker");
    let root = top
        .path()
        .join("var/run/docker/containerd/daemon/io.containerd.runtime.v2.task")
        .join("runtime-hull/moby");
    std::fs::create_dir_all(&root).unwrap();
    let id = "4f1d9a0c7be2e6a3c35d2b8f0e9c1a7d6b5e4f3a2c1b0d9e8f7a6b5c4d3e2f1a";
    assert_eq!(id.len(), 64);
    let socket = root.join(id).join("vsock.sock_1024");
    assert!(socket.as_os_str().len() > 160, "{}", socket.display());
    let hull = Hull { root: &root };
    let bundle = Bundle::builder()
        .script("echo started; while :; do sleep 1; done")
        .build();
    let out = top.path().join("out");
    let err = top.path().join("err");
    let status = hull
        .command(&["create", "--bundle", bundle.path().to_str().unwrap(), id])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "create: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    hull.ok(&["start", id]);
    wait_for_text(&out, "started");
    // exec goes through the vsock socket, state and kill through the control socket.
    assert_eq!(hull.ok(&["exec", id, "echo", "exec-ok"]), "exec-ok\n");
    let pid = hull.state(id)["pid"].as_i64().unwrap() as i32;
    hull.ok(&["kill", id, "KILL"]);
    reap(pid);
    wait_for_status(&hull, id, "stopped");
    hull.ok(&["delete", id]);
    assert!(!root.join(id).exists());
    assert!(processes_mentioning(id).is_empty());
}
