//! End to end: hull as a drop-in runc under containerd's runc v2 shim. The test starts Debian's
//! containerd privately (its own root, state and socket in a temporary directory, CRI off),
//! imports a busybox image built here (no registry is reachable) and runs it with
//! `ctr run --runc-binary <hull>`, so that every task is a micro-VM whose `hull-vmm` is the
//! task's process on the host. Checked the way a user of containerd would: a foreground
//! `ctr run --rm` prints what the guest kernel says and exits with the container's status; a
//! detached task is listed by `ctr task ls` and `ctr task ps`, runs `ctr task exec`, takes
//! SIGTERM from `ctr task kill`, and containerd sees it stop with its exit status.
//!
//! containerd still keeps shim sockets and runc state under `/run/containerd`, so the test
//! works in a containerd namespace of its own and at the end checks that nothing is left: no
//! task, container, image or namespace in containerd, no shim or `hull-vmm`, no hull state
//! directory, no mount. Two VMs, one after the other: about two minutes on a PVM host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hull_tests::containerd::{signal, tail_of, Containerd as Daemon};
use hull_tests::harness::{
    processes, require_guest_artifacts, run, workspace_bin, Finished, TempDir,
};
use hull_tests::image::write_busybox_image;

/// The image the test builds and imports.
const IMAGE: &str = "docker.io/library/hull-busybox:test";
/// For a `ctr` command that boots a micro-VM (about a minute on a PVM host).
const VM_DEADLINE: Duration = Duration::from_secs(300);
/// For any other `ctr` command.
const CTR_DEADLINE: Duration = Duration::from_secs(120);
/// For a task to be seen stopped, and for its output to arrive.
const TASK_DEADLINE: Duration = Duration::from_secs(120);
/// Bytes of each log quoted when a step fails.
const TAIL_BYTES: usize = 4096;
/// The containers the test makes.
const IDS: [&str; 2] = ["c1", "c2"];

/// The foreground container's script: the guest kernel's release and a status of its own.
const FOREGROUND_SCRIPT: &str = "echo hi from $(uname -r); exit 7";
/// The detached container's script. It is its PID namespace's init, which a signal reaches
/// only through a handler; it says it is ready (after the trap is set) in its log, leaves a
/// mark in its rootfs for the exec to find, and sleeps in a loop (a trap runs after the
/// foreground command in progress).
const DETACHED_SCRIPT: &str = "trap 'echo got TERM; exit 143' TERM; echo init-was-here > /mark; \
                               echo started on $(hostname); while :; do sleep 1; done";
/// What the exec runs in the detached container.
const EXEC_SCRIPT: &str = "echo exec in $(hostname) sees $(cat /mark); exit 5";

/// The test's private containerd (CRI off) and its namespace; what the test made in it is
/// removed on drop.
struct Containerd {
    daemon: Daemon,
    namespace: String,
}

impl Containerd {
    fn start() -> Self {
        let daemon = Daemon::start(
            "containerd",
            |_| "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".into(),
            &[],
        );
        Self {
            daemon,
            namespace: format!("hull-test-{}", std::process::id()),
        }
    }

    /// Where the runc shim tells hull to keep its state (`--root`).
    fn runc_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }

    /// The task's bundle, where the shim keeps hull's `log.json`.
    fn bundle(&self, id: &str) -> PathBuf {
        self.daemon
            .state()
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    /// `ctr` against this containerd in the test's namespace, killed after `deadline`.
    fn ctr(&self, args: &[&str], deadline: Duration) -> Finished {
        self.daemon.ctr(&self.namespace, args, deadline)
    }

    /// `ctr` that must succeed; returns its standard output.
    fn ctr_ok(&self, args: &[&str], deadline: Duration) -> String {
        let out = self.ctr(args, deadline);
        if !out.status.success() {
            self.fail(&format!("ctr {}: {}", args.join(" "), describe(&out)));
        }
        out.stdout
    }

    /// The task's host pid and status, as `ctr task ls` shows them.
    fn task(&self, id: &str) -> Option<(u32, String)> {
        let list = self.ctr_ok(&["tasks", "ls"], CTR_DEADLINE);
        list.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [task, pid, ref status] if task == id => {
                    Some((pid.parse().ok()?, status.to_string()))
                }
                _ => None,
            }
        })
    }

    /// Waits until `ctr task ls` shows the task with `status`; returns its pid.
    fn wait_for_task(&self, id: &str, status: &str, deadline: Duration) -> u32 {
        let start = Instant::now();
        loop {
            let task = self.task(id);
            if let Some((pid, seen)) = &task {
                if seen == status {
                    return *pid;
                }
            }
            if start.elapsed() > deadline {
                self.fail(&format!(
                    "task {id} not {status} within {deadline:?}: ctr task ls shows {task:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Container ids in the namespace.
    fn containers(&self) -> Vec<String> {
        let list = self.ctr_ok(&["containers", "ls", "-q"], CTR_DEADLINE);
        list.lines().map(str::to_owned).collect()
    }

    /// The daemon's log, the tails of hull's logs for each container (the shim's `log.json`,
    /// hull-vmm's `vmm.log`, the guest's `console.log`), whichever still exist.
    fn diagnostics(&self) -> String {
        let mut text = self.daemon.log_tail(TAIL_BYTES);
        let mut quote = |path: PathBuf| text.push_str(&tail_of(&path, TAIL_BYTES));
        for id in IDS {
            quote(self.bundle(id).join("log.json"));
            quote(self.runc_root().join(id).join("vmm.log"));
            quote(self.runc_root().join(id).join("console.log"));
        }
        text
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.diagnostics());
    }

    /// Fails with `what` (and the logs) unless `ok`.
    fn ensure(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(&what());
        }
    }

    /// Needles that name what this test started outside containerd itself: the shims (started
    /// with `-namespace NS`) and the hull-vmm processes (whose config is under the runc root).
    fn needles(&self) -> [String; 2] {
        [
            format!("-namespace {} ", self.namespace),
            format!("{}/", self.runc_root().display()),
        ]
    }

    /// Processes of this test that are still alive.
    fn leftover_processes(&self) -> Vec<(i32, String)> {
        let needles = self.needles();
        processes()
            .into_iter()
            .filter(|(_, cmdline)| needles.iter().any(|n| cmdline.contains(n.as_str())))
            .collect()
    }

    /// Removes everything the test made in containerd and checks that nothing of it is left
    /// anywhere; then stops the daemon.
    fn shut_down(mut self) {
        let containers = self.containers();
        self.ensure(containers.is_empty(), || {
            format!("containers left in containerd: {containers:?}")
        });
        self.ctr_ok(&["images", "rm", "--sync", IMAGE], CTR_DEADLINE);
        // Refused unless the namespace holds nothing: no container, image, content, snapshot.
        self.ctr_ok(&["namespaces", "rm", &self.namespace], CTR_DEADLINE);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.leftover_processes();
            if left.is_empty() {
                break;
            }
            if Instant::now() > end {
                self.fail(&format!("processes left behind: {left:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let runc_root = self.runc_root();
        let states: Vec<_> = std::fs::read_dir(&runc_root)
            .map(|dir| dir.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if !states.is_empty() {
            self.fail(&format!("hull state left behind: {states:?}"));
        }
        // The shim makes the namespace's runc root and leaves it, as it does with runc.
        let _ = std::fs::remove_dir(&runc_root);
        self.daemon.stop();
        let mounts = self.daemon.leftover_mounts();
        if !mounts.is_empty() {
            self.fail(&format!("mounts left behind: {mounts:?}"));
        }
    }
}

impl Drop for Containerd {
    /// After a failure: kill the tasks, remove containers, image and namespace as far as
    /// containerd still can, then whatever it could not (hull's VMs and state, shims, mounts).
    fn drop(&mut self) {
        if self.daemon.pid().is_none() {
            return;
        }
        if self.daemon.exited().is_none() {
            let quick = Duration::from_secs(30);
            for id in IDS {
                let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", id], quick);
                let _ = self.ctr(&["tasks", "rm", "--force", id], quick);
                let _ = self.ctr(&["containers", "rm", id], quick);
            }
            let _ = self.ctr(&["images", "rm", "--sync", IMAGE], quick);
            let _ = self.ctr(&["namespaces", "rm", &self.namespace], quick);
        }
        self.daemon.stop();
        let root = self.runc_root();
        for id in IDS {
            if root.join(id).exists() {
                let _ = Command::new("timeout")
                    .arg("30")
                    .arg(workspace_bin("hull"))
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .status();
            }
        }
        for (pid, _) in self.leftover_processes() {
            signal(pid, libc::SIGKILL);
        }
        self.daemon.force_clean();
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// A finished `ctr`, for a failure message.
fn describe(out: &Finished) -> String {
    format!(
        "{} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status, out.elapsed, out.stdout, out.stderr
    )
}

fn check_prerequisites() {
    require_guest_artifacts();
    for bin in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{bin} not found: run `make deps` (Debian's containerd)"
        );
    }
}

/// Waits until the file at `path` holds a line starting with `prefix`; returns that line.
fn wait_for_line(ctd: &Containerd, path: &Path, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
            return line.to_owned();
        }
        if start.elapsed() > TASK_DEADLINE {
            ctd.fail(&format!(
                "no line starting with {prefix:?} in {} within {TASK_DEADLINE:?}; it holds:\n{text}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ctr run --rm` in the foreground: the guest kernel's greeting, the container's status, and
/// nothing left of the task afterwards.
fn foreground_run(ctd: &Containerd, hull: &str) {
    let out = ctd.ctr(
        &[
            "run",
            "--runc-binary",
            hull,
            "--rm",
            IMAGE,
            "c1",
            "sh",
            "-c",
            FOREGROUND_SCRIPT,
        ],
        VM_DEADLINE,
    );
    eprintln!("ctr run --rm took {:?}", out.elapsed);
    let context = describe(&out);
    if out.status.code() != Some(7) {
        ctd.fail(&format!("ctr run --rm: want status 7: {context}"));
    }
    let release = out
        .stdout
        .strip_prefix("hi from ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| ctd.fail(&format!("ctr run --rm: want one greeting: {context}")));
    // The guest kernel's release: the container ran in the VM, not on the host.
    ctd.ensure(release.ends_with("-hull"), || {
        format!("not the guest kernel: {context}")
    });
    ctd.ensure(ctd.task("c1").is_none(), || {
        "task c1 left after ctr run --rm".into()
    });
    ctd.ensure(!ctd.containers().iter().any(|c| c == "c1"), || {
        "container c1 left after ctr run --rm".into()
    });
    let state = ctd.runc_root().join("c1");
    ctd.ensure(!state.exists(), || {
        format!("{} left behind", state.display())
    });
}

/// `ctr run -d`, then `ctr task ls`, `ps`, `exec` and `kill`; containerd sees the task stop
/// with the status its trap exits with.
fn detached_task(ctd: &Containerd, hull: &str, dir: &Path) {
    let log = dir.join("c2.log");
    let log_uri = format!("file://{}", log.display());
    let out = ctd.ctr(
        &[
            "run",
            "--detach",
            "--runc-binary",
            hull,
            "--log-uri",
            &log_uri,
            IMAGE,
            "c2",
            "sh",
            "-c",
            DETACHED_SCRIPT,
        ],
        VM_DEADLINE,
    );
    eprintln!("ctr run --detach took {:?}", out.elapsed);
    if !out.status.success() {
        ctd.fail(&format!("ctr run --detach: {}", describe(&out)));
    }
    let started = wait_for_line(ctd, &log, "started on ");
    let hostname = started.trim_start_matches("started on ").to_owned();

    // The task's process on the host is the container's hull-vmm.
    let pid = ctd.wait_for_task("c2", "RUNNING", TASK_DEADLINE);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    let vm_config = ctd.runc_root().join("c2/vm.json");
    ctd.ensure(
        cmdline.contains("hull-vmm") && cmdline.contains(&vm_config.display().to_string()),
        || format!("task c2's pid {pid} is not its hull-vmm: {cmdline:?}"),
    );

    // `ctr task ps` lists host pids (the shim takes `hull ps --format json`'s): the one host
    // process standing for the container, its hull-vmm; `hull ps` shows the guest's.
    let listed = ctd.ctr_ok(&["tasks", "ps", "c2"], CTR_DEADLINE);
    let pids: Vec<u32> = listed
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    ctd.ensure(pids == [pid], || {
        format!("ctr task ps lists {pids:?}, not hull-vmm's pid {pid}:\n{listed}")
    });
    let mut hull_ps = Command::new(hull);
    hull_ps
        .arg("--root")
        .arg(ctd.runc_root())
        .args(["ps", "c2"]);
    let table = run(hull_ps, CTR_DEADLINE);
    ctd.ensure(
        table
            .stdout
            .lines()
            .skip(1)
            .any(|line| line.contains(" sh -c ")),
        || {
            format!(
                "hull ps does not list the container's shell:\n{}",
                describe(&table)
            )
        },
    );

    // `ctr task exec` runs in the same container: its hostname, its rootfs.
    let exec = ctd.ctr(
        &[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "c2",
            "sh",
            "-c",
            EXEC_SCRIPT,
        ],
        CTR_DEADLINE,
    );
    eprintln!("ctr task exec took {:?}", exec.elapsed);
    let want = format!("exec in {hostname} sees init-was-here\n");
    ctd.ensure(exec.status.code() == Some(5) && exec.stdout == want, || {
        format!(
            "ctr task exec: want status 5 and {want:?}: {}",
            describe(&exec)
        )
    });

    // SIGTERM reaches the shell's trap; containerd sees the task stop with its status.
    ctd.ctr_ok(&["tasks", "kill", "c2"], CTR_DEADLINE);
    wait_for_line(ctd, &log, "got TERM");
    ctd.wait_for_task("c2", "STOPPED", TASK_DEADLINE);
    // `ctr task delete` reports the status containerd recorded (as a warning, not in its own
    // exit status).
    let deleted = ctd.ctr(&["tasks", "delete", "c2"], CTR_DEADLINE);
    ctd.ensure(
        deleted.status.success() && deleted.stderr.contains("non-zero exit code 143"),
        || {
            format!(
                "ctr task delete: want the task's status 143: {}",
                describe(&deleted)
            )
        },
    );
    ctd.ctr_ok(&["containers", "rm", "c2"], CTR_DEADLINE);
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    ctd.ensure(output == format!("{started}\ngot TERM\n"), || {
        format!("c2's output: {output:?}")
    });
}

#[test]
fn ctr_runs_busybox_in_micro_vms_through_the_runc_shim() {
    check_prerequisites();
    let hull = workspace_bin("hull");
    let hull = hull.to_str().expect("the hull path is UTF-8");
    let work = TempDir::new("ctr-work");
    let image = write_busybox_image(work.path(), IMAGE);
    let ctd = Containerd::start();
    let image = image.to_str().expect("the image path is UTF-8");
    ctd.ctr_ok(&["images", "import", image], CTR_DEADLINE);
    let images = ctd.ctr_ok(&["images", "ls", "-q"], CTR_DEADLINE);
    ctd.ensure(images.lines().any(|l| l == IMAGE), || {
        format!("{IMAGE} not imported: {images}")
    });

    let start = Instant::now();
    foreground_run(&ctd, hull);
    detached_task(&ctd, hull, work.path());
    ctd.shut_down();
    eprintln!("two tasks in micro-VMs took {:?}", start.elapsed());
}
