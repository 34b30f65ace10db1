//! End to end: runc's verbs on real micro-VMs, the way containerd's shim drives them: `create`
//! (pid file, stdio inherited by hull-vmm), `state`, `list`, `start`, `ps`, `exec`, `kill`,
//! `delete`, and the errors for wrong transitions and bad input. Two containers run at once:
//! `kill -9` of one hull-vmm must leave the other running, and `delete` must clean up after it.
//! The test is its processes' subreaper, as the shim is, so it reaps each hull-vmm and checks
//! that it exits with its container's status. One test (two VMs at once) of about two minutes
//! on a PVM host.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hull_tests::bundle::Bundle;
use hull_tests::harness::{guest_artifacts, processes_mentioning, workspace_bin, TempDir};
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
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < end,
            "no {needle:?} in {}: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runc_verbs_on_two_containers_and_a_killed_vmm() {
    let (kernel, initramfs) = guest_artifacts();
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "run `make kernel agent` first"
    );
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

    // A traps SIGTERM and exits 9; B just sleeps.
    let a = Bundle::builder()
        .script("trap 'echo got-term; exit 9' TERM; echo started-a; while :; do sleep 1; done")
        .build();
    let b = Bundle::builder()
        .script("echo started-b; while :; do sleep 1; done")
        .build();
    let out_a = work.path().join("a.out");
    let out_b = work.path().join("b.out");
    let pid_file = work.path().join("a.pid");
    // hull-vmm inherits create's stdout and stderr (as runc's init does), so they are files:
    // a pipe would stay open for as long as the container runs.
    let create = |bundle: &Bundle, id: &str, out: &Path, pid_file: Option<&Path>| {
        let mut cmd = hull.command(&["create", "--bundle", bundle.path().to_str().unwrap()]);
        if let Some(p) = pid_file {
            cmd.arg("--pid-file").arg(p);
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

    let state_a = hull.state("a");
    assert_eq!(state_a["status"], "created");
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
    let list: Value = serde_json::from_str(&hull.ok(&["list", "--format", "json"])).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    hull.fails(
        &["create", "--bundle", a.path().to_str().unwrap(), "a"],
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
    hull.fails(&["start", "a"], "already running");
    hull.fails(&["delete", "a"], "that is not stopped: running");
    wait_for_text(&out_a, "started-a");
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
    let pids: Value = serde_json::from_str(&hull.ok(&["ps", "--format", "json", "a"])).unwrap();
    assert!(!pids.as_array().unwrap().is_empty(), "{pids}");
    let table = hull.ok(&["ps", "a"]);
    assert!(table.contains("while :"), "{table}");
    let exec = hull.run(&[
        "exec",
        "--env",
        "X=42",
        "a",
        "sh",
        "-c",
        "echo exec-$X; exit 4",
    ]);
    assert_eq!(
        exec.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "exec-42\n");

    // SIGTERM by name reaches a's trap; hull-vmm exits with the container's status.
    hull.ok(&["kill", "a", "TERM"]);
    assert_eq!(reap(pid_a), 9);
    wait_for_text(&out_a, "got-term");
    wait_for_status(&hull, "a", "stopped");
    hull.fails(&["kill", "a", "KILL"], "not running");
    hull.fails(&["start", "a"], "has stopped");
    hull.ok(&["delete", "a"]);
    hull.fails(&["state", "a"], "does not exist");
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "state left"
    );
    assert!(processes_mentioning(&root.path().display().to_string()).is_empty());
}
