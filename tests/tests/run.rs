//! End to end: `hull run` of a busybox bundle in a real micro-VM, checked the way a user would:
//! output byte for byte, exit statuses (codes and death by signal), stdin piped through, files
//! written into the rootfs, a read-only rootfs, the process's user, a symlink that must not
//! lead out of the rootfs, SIGTERM to `hull` forwarded to the container, a spec the agent
//! refuses; and bad input refused before any VM starts. After every run: no `hull-vmm` left
//! and no state directory left (each run has its own `--root`). Each VM test takes about a
//! minute on a PVM host.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_tests::bundle::{Bundle, BundleBuilder, ROOT_ESCAPE};
use hull_tests::harness::{
    assert_container_gone, footprint, processes_mentioning, require_guest_artifacts, workspace_bin,
    TempDir,
};

const DEADLINE: Duration = Duration::from_secs(300);
const ID: &str = "test-ctr";

/// How a `hull run` ended.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
}

impl Outcome {
    fn context(&self) -> String {
        format!(
            "status {:?} after {:?}\n--- stdout ({} bytes) ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.elapsed,
            self.stdout.len(),
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(4096)]),
            self.stderr
        )
    }
}

/// A `hull` child, killed on drop (its `hull-vmm` dies with it).
struct Hull(Child);

impl Drop for Hull {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn check_artifacts() {
    require_guest_artifacts();
}

fn assert_no_leftovers(root: &Path) {
    assert_container_gone(root, ID);
}

/// A `hull --root <tmp> run --bundle <bundle> test-ctr` in progress.
struct HullRun {
    root: TempDir,
    hull: Hull,
    started: Instant,
    writer: Option<std::thread::JoinHandle<()>>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stdout_reader: std::thread::JoinHandle<()>,
    stderr: std::thread::JoinHandle<String>,
}

impl HullRun {
    /// Starts `hull run` with `stdin` fed to it (or none).
    fn start(bundle: &Path, stdin: Option<Vec<u8>>) -> Self {
        Self::spawn(bundle, stdin, None, None)
    }

    /// Starts `hull run` without stdin, and reads nothing of its stdout until `gate` says so
    /// (or its sender is dropped): output that arrives meanwhile waits in the pipe.
    fn start_reading_stdout_later(bundle: &Path, gate: Receiver<()>) -> Self {
        Self::spawn(bundle, None, Some(gate), None)
    }

    /// Starts `hull run` with a descriptor limit of `nofile` (hard and soft), which its
    /// hull-vmm inherits (and may raise only with `CAP_SYS_RESOURCE`).
    fn start_with_nofile(bundle: &Path, nofile: u64) -> Self {
        Self::spawn(bundle, None, None, Some(nofile))
    }

    fn spawn(
        bundle: &Path,
        stdin: Option<Vec<u8>>,
        stdout_gate: Option<Receiver<()>>,
        nofile: Option<u64>,
    ) -> Self {
        let root = TempDir::new("run-root");
        let mut cmd = Command::new(workspace_bin("hull"));
        cmd.arg("--root")
            .arg(root.path())
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(ID)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit(2) is async-signal-safe and touches only this child's limits.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let started = Instant::now();
        let mut hull = Hull(cmd.spawn().expect("start hull"));
        let writer = stdin.map(|data| {
            let mut pipe = hull.0.stdin.take().expect("stdin is piped");
            std::thread::spawn(move || {
                // The container may exit before it reads everything; that is its business.
                let _ = pipe.write_all(&data);
            })
        });
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let mut out = hull.0.stdout.take().expect("stdout is piped");
        let sink = Arc::clone(&stdout);
        let stdout_reader = std::thread::spawn(move || {
            if let Some(gate) = stdout_gate {
                let _ = gate.recv();
            }
            let mut buf = [0; 64 * 1024];
            loop {
                match out.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("read hull's stdout: {e}"),
                }
            }
        });
        let mut err = hull.0.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            err.read_to_end(&mut bytes).expect("read hull's stderr");
            String::from_utf8_lossy(&bytes).into_owned()
        });
        Self {
            root,
            hull,
            started,
            writer,
            stdout,
            stdout_reader,
            stderr,
        }
    }

    /// Waits until `path` exists (panics after the deadline or if hull exits first).
    fn wait_for_file(&self, path: &Path) {
        loop {
            if path.exists() {
                return;
            }
            assert!(
                self.started.elapsed() < DEADLINE,
                "no {} within {DEADLINE:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM to `hull run` (which forwards it to the container), then [`Self::finish`].
    fn terminate(self) -> Outcome {
        let kill = Command::new("kill")
            .args(["-TERM", &self.hull.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success());
        self.finish()
    }

    /// Waits until hull's stdout so far is `expected` (panics with `why` after `deadline`).
    fn wait_for_stdout(&self, expected: &str, deadline: Duration, why: &str) {
        self.wait_for_stdout_to(|so_far| so_far == expected, expected, deadline, why);
    }

    /// Waits until hull's stdout so far passes `done` (`expected` says how, for the message).
    fn wait_for_stdout_to(
        &self,
        done: impl Fn(&str) -> bool,
        expected: &str,
        deadline: Duration,
        why: &str,
    ) {
        let end = Instant::now() + deadline;
        loop {
            let so_far = String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned();
            if done(&so_far) {
                return;
            }
            assert!(
                Instant::now() < end,
                "hull's stdout is {so_far:?}, not {expected:?}, after {deadline:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for hull to exit (kills it after the deadline) and checks it left nothing.
    fn finish(mut self) -> Outcome {
        let status = loop {
            if let Some(status) = self.hull.0.try_wait().expect("wait for hull") {
                break status;
            }
            if self.started.elapsed() > DEADLINE {
                drop(self.hull);
                let stderr = self.stderr.join().unwrap_or_default();
                assert_no_leftovers(self.root.path());
                panic!("hull run still running after {DEADLINE:?}; killed\nstderr:\n{stderr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        if let Some(writer) = self.writer {
            writer.join().expect("stdin writer");
        }
        self.stdout_reader.join().expect("stdout reader");
        let outcome = Outcome {
            status,
            stdout: std::mem::take(&mut *self.stdout.lock().unwrap()),
            stderr: self.stderr.join().expect("stderr reader"),
            elapsed,
        };
        eprintln!("hull run took {:?}", outcome.elapsed);
        assert_no_leftovers(self.root.path());
        outcome
    }
}

/// Runs `hull run` to its end.
fn hull_run(bundle: &Path, stdin: Option<Vec<u8>>) -> Outcome {
    HullRun::start(bundle, stdin).finish()
}

fn run_in_vm(builder: BundleBuilder, stdin: Option<Vec<u8>>) -> (Bundle, Outcome) {
    check_artifacts();
    let bundle = builder.build();
    let outcome = hull_run(bundle.path(), stdin);
    (bundle, outcome)
}

#[test]
fn echo_hello_exits_zero_with_exact_output() {
    let (_bundle, out) = run_in_vm(Bundle::builder().script("echo hello; echo oops >&2"), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(out.stdout, b"hello\n", "{context}");
    assert_eq!(out.stderr, "oops\n", "{context}");
}

#[test]
fn stdin_is_piped_through_byte_exact() {
    let input: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let (_bundle, out) = run_in_vm(Bundle::builder().args(&["cat"]), Some(input.clone()));
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(
        out.stdout == input,
        "cat gave {} bytes back of {}, not the same: {context}",
        out.stdout.len(),
        input.len()
    );
}

#[test]
fn binary_output_is_byte_exact_and_written_files_reach_the_host() {
    let (bundle, out) = run_in_vm(
        Bundle::builder().script("head -c 1048576 /dev/urandom | tee /out.bin"),
        None,
    );
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    let on_host = std::fs::read(bundle.rootfs().join("out.bin")).expect("the file is on the host");
    assert_eq!(on_host.len(), 1 << 20, "{context}");
    assert_eq!(out.stdout.len(), 1 << 20, "{context}");
    assert!(out.stdout == on_host, "stdout differs from /out.bin");
}

#[test]
fn a_readonly_rootfs_refuses_writes_and_exit_1_comes_back() {
    // The rootfs lacks the mount points /proc, /dev and /sys: the guest cannot make them in a
    // read-only share, so hull makes them on the host first, as runc does.
    check_artifacts();
    let bundle = Bundle::builder()
        .readonly(true)
        .script("test -e /proc/self/status && test -c /dev/null && touch /nope")
        .build();
    for dir in ["proc", "dev", "sys"] {
        std::fs::remove_dir(bundle.rootfs().join(dir)).unwrap();
    }
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(1), "{context}");
    assert!(out.stderr.contains("Read-only file system"), "{context}");
    assert!(!bundle.rootfs().join("nope").exists());
    for dir in ["proc", "dev", "sys"] {
        assert!(bundle.rootfs().join(dir).is_dir(), "no mount point /{dir}");
    }
}

#[test]
fn the_process_runs_as_its_user_and_exit_42_comes_back() {
    let (_bundle, out) = run_in_vm(
        Bundle::builder()
            .user(1000, 1000)
            .script("id -u; id -g; exit 42"),
        None,
    );
    let context = out.context();
    assert_eq!(out.status.code(), Some(42), "{context}");
    assert_eq!(out.stdout, b"1000\n1000\n", "{context}");
}

#[test]
fn a_symlink_out_of_the_rootfs_stays_inside_and_kill_9_gives_137() {
    check_artifacts();
    let secret_dir = TempDir::new("run-secret");
    let secret = secret_dir.path().join("hostname");
    let content = format!("HOST-SECRET-{}", std::process::id());
    std::fs::write(&secret, &content).unwrap();
    // Without a PID namespace of its own the shell is no namespace init, which ignores
    // signals it has no handler for, SIGKILL included, even from itself.
    let bundle = Bundle::builder()
        .pid_namespace(false)
        .script("readlink /secret-link; cat /secret-link; kill -9 $$")
        .build();
    std::os::unix::fs::symlink(&secret, bundle.rootfs().join("secret-link")).unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(137), "{context}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The container sees the link's text, but the path leads nowhere in its own root.
    assert_eq!(stdout, format!("{}\n", secret.display()), "{context}");
    assert!(!out.stderr.contains(&content), "{context}");
    assert!(out.stderr.contains("No such file"), "{context}");
}

#[test]
fn output_can_be_read_while_the_process_runs_and_sigterm_reaches_it() {
    check_artifacts();
    // Output: the shell prints a line, spins for a few seconds without a system call, then
    // says the spin is over with a file in the rootfs (virtio-fs writes are synchronous) and
    // sleeps. Only then do we start reading hull's stdout, as a consumer busy elsewhere when the
    // line came would: the line must be there to read although the process writes nothing
    // more. (hull's relay once used `io::copy`, which splices from the stream socket into a
    // stdout pipe; Linux's splice waits for more socket data holding the pipe's lock, so the
    // line could not be read until the container wrote again or exited. A reader already
    // waiting when the line comes only usually loses the race for that lock; a later one
    // always does.)
    // SIGTERM: the shell is its PID namespace's init: a signal reaches it only through a
    // handler. The shell runs a trap after the foreground command in progress, so there is no
    // window in which the signal is taken but the trap never runs (as with `wait`).
    let spin = "j=0; while [ $j -lt 1000000 ]; do j=$((j+1)); done";
    let bundle = Bundle::builder()
        .script(&format!(
            "trap 'echo got-term; exit 7' TERM; echo ready; {spin}; touch /ready; \
             while :; do sleep 1; done"
        ))
        .build();
    let (read_stdout, gate) = channel();
    let run = HullRun::start_reading_stdout_later(bundle.path(), gate);
    run.wait_for_file(&bundle.rootfs().join("ready"));
    read_stdout.send(()).expect("the stdout reader waits");
    // The line is in the pipe or on its way; without the bug it is read at once.
    run.wait_for_stdout(
        "ready\n",
        Duration::from_secs(30),
        "a line the container printed before a long spin cannot be read while it runs on",
    );
    let out = run.terminate();
    let context = out.context();
    assert_eq!(out.status.code(), Some(7), "{context}");
    assert_eq!(out.stdout, b"ready\ngot-term\n", "{context}");
    assert_eq!(out.stderr, "", "{context}");
}

#[test]
fn the_seccomp_profile_is_enforced_in_the_guest() {
    check_artifacts();
    // `busybox mkdir`: the bundle's rootfs has no `mkdir` applet link.
    let builder = Bundle::builder().script(
        "echo ok; busybox mkdir /tmp/x; status=$?; touch /tmp/y; ls /tmp; exit $((status + 40))",
    );
    let bundle = builder.build();
    let config = builder.config_json().replacen(
        "\"linux\": {",
        r#""linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"],
                          "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]},"#,
        1,
    );
    std::fs::write(bundle.config(), config).unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    // mkdir failed (status 1) and created nothing; everything else ran.
    assert_eq!(out.status.code(), Some(41), "{context}");
    assert_eq!(out.stdout, b"ok\ny\n", "{context}");
    assert!(out.stderr.contains("Operation not permitted"), "{context}");
}

/// What the guest cannot honour is refused by the host, from the whole spec read with
/// oci-spec, before any VM starts: in well under a boot's time, naming the file, the field and
/// the value, and leaving nothing behind (`finish` checks).
#[test]
fn the_container_runs_in_a_cgroup_of_its_own_with_the_spec_s_limits() {
    check_artifacts();
    // The guest's cgroup v2 root is the container's cgroup namespace's root (the namespace
    // is made before the init moves in), so its own cgroup shows as /container.
    let builder = Bundle::builder().script(
        "cat /proc/self/cgroup; cat /sys/fs/cgroup/container/pids.max; \
         cat /sys/fs/cgroup/container/memory.max",
    );
    let bundle = builder.build();
    let mut config: serde_json::Value = serde_json::from_str(&builder.config_json()).unwrap();
    config["linux"]["resources"]["pids"] = serde_json::json!({"limit": 40});
    config["linux"]["resources"]["memory"] = serde_json::json!({"limit": 100663296});
    std::fs::write(bundle.config(), config.to_string()).unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(out.stdout, b"0::/container\n40\n100663296\n", "{context}");
}

#[test]
fn a_file_the_container_makes_set_id_is_not_set_id_on_the_host() {
    use std::os::unix::fs::PermissionsExt;
    check_artifacts();
    // The container's root is the host's root in the shared rootfs: a set-user-ID file it
    // made would run as root for anyone on the host who can reach the bundle.
    let builder = Bundle::builder().script("touch /made && chmod 6755 /made && echo done");
    let bundle = builder.build();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(out.stdout, b"done\n", "{context}");
    let mode = std::fs::metadata(bundle.rootfs().join("made"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "{context}");
}

#[test]
fn a_container_that_leaves_its_root_reaches_nothing_of_the_agent() {
    use std::os::unix::fs::PermissionsExt;
    check_artifacts();
    // A privileged container (CAP_SYS_ADMIN, CAP_SYS_CHROOT) tries both ways out of its root.
    // When its root was the initramfs's, moved over and chrooted into, the second way reached
    // the initramfs: the agent as /init and the agent's own mounts. Now the agent leaves the
    // initramfs at boot (emptied but for the mount point it left by) and the container's init
    // pivots into its root and detaches the agent's.
    let builder =
        Bundle::builder().script("/escape chroot && echo -- && /escape setns && echo end");
    let bundle = builder.build();
    let escape = bundle.rootfs().join("escape");
    std::fs::write(&escape, ROOT_ESCAPE).unwrap();
    std::fs::set_permissions(&escape, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&builder.config_json()).unwrap();
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        config["process"]["capabilities"][set] =
            serde_json::json!(["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"]);
    }
    std::fs::write(bundle.config(), config.to_string()).unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (by_chroot, by_setns) = stdout.split_once("--\n").expect(&context);
    let sorted = |text: &str| {
        let mut names: Vec<String> = text.lines().map(str::to_string).collect();
        names.sort();
        names
    };
    // By chroot and "..": the container's own root, no further.
    let mut own: Vec<String> = std::fs::read_dir(bundle.rootfs())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    own.sort();
    assert_eq!(sorted(by_chroot), own, "{context}");
    // By setns: the guest's first root, empty but for the agent's old mount point.
    assert_eq!(sorted(by_setns), [".hull-root", "end"], "{context}");
}

#[test]
fn a_container_that_fills_its_disk_gets_enospc_and_goes_on() {
    check_artifacts();
    // The rootfs is a host directory, so its file system's space is the bound (as with runc):
    // here an 8 MiB tmpfs on the host under the container's /data. The container writes 32 MiB
    // into it, is told the disk is full, frees the space and goes on.
    let bundle = Bundle::builder()
        .script(
            "dd if=/dev/zero of=/data/fill bs=1M count=32 2>/dev/null; echo dd=$?; \
             cat /data/fill > /data/fill2 || echo cat=$?; \
             rm /data/fill /data/fill2 && echo after > /data/after && cat /data/after",
        )
        .build();
    let data = bundle.rootfs().join("data");
    std::fs::create_dir(&data).unwrap();
    let _mount = TmpfsMount::new(&data, "size=8m,nr_inodes=64");
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(out.stdout, b"dd=1\ncat=1\nafter\n", "{context}");
    assert!(out.stderr.contains("No space left on device"), "{context}");
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(left, ["after"], "{context}");
}

/// A tmpfs mounted on the host for one test, unmounted when dropped.
struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    fn new(target: &Path, options: &str) -> Self {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "hull-test"])
            .arg(target)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount tmpfs on {}: {status}",
            target.display()
        );
        Self(target.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn host_directories_and_files_bind_mounted_into_the_container() {
    use std::os::unix::fs::MetadataExt;
    check_artifacts();
    // A volume (read-write, a file of uid 1000 in it, and a link to a host secret), a
    // read-only volume, and a single host file beside another that must stay out of reach.
    let host = TempDir::new("run-binds");
    let vol = host.path().join("vol");
    let ro = host.path().join("ro");
    let files = host.path().join("files");
    for dir in [&vol, &ro, &files] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::write(vol.join("in"), "from the host\n").unwrap();
    std::os::unix::fs::chown(vol.join("in"), Some(1000), Some(1000)).unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, "HOST SECRET\n").unwrap();
    std::os::unix::fs::symlink(&secret, vol.join("escape")).unwrap();
    std::fs::write(ro.join("keep"), "read only\n").unwrap();
    std::fs::write(files.join("hosts"), "127.0.0.1 from-the-host\n").unwrap();
    std::fs::write(files.join("beside"), "HOST SECRET\n").unwrap();
    let builder = Bundle::builder().script(
        "cat /data/in; busybox stat -c %u:%g /data/in; echo written > /data/out; \
         cat /data/escape 2>/dev/null || echo no-escape; \
         echo x > /ro/new 2>/dev/null || echo ro-refused; cat /ro/keep; cat /etc/hosts-test; \
         echo x >> /etc/hosts-test 2>/dev/null || echo file-ro-refused; \
         ls /run/hull 2>/dev/null; echo waiting; \
         while [ \"$(cat /data/in)\" != changed ]; do sleep 0.2; done; echo saw-rename; \
         while ! grep -q changed /etc/hosts-test; do sleep 0.2; done; echo saw-rewrite",
    );
    let bundle = builder.build();
    let mut config: serde_json::Value = serde_json::from_str(&builder.config_json()).unwrap();
    let mounts = config["mounts"].as_array_mut().unwrap();
    mounts.push(serde_json::json!({"destination": "/data", "type": "bind",
        "source": vol, "options": ["rbind", "rw"]}));
    mounts.push(serde_json::json!({"destination": "/ro", "type": "bind",
        "source": ro, "options": ["rbind", "ro", "nosuid", "nodev", "rprivate"]}));
    mounts.push(
        serde_json::json!({"destination": "/etc/hosts-test", "type": "bind",
        "source": files.join("hosts"), "options": ["bind", "ro"]}),
    );
    std::fs::write(bundle.config(), config.to_string()).unwrap();
    let run = HullRun::start(bundle.path(), None);
    run.wait_for_stdout_to(
        |so_far| so_far.ends_with("waiting\n"),
        "... waiting",
        DEADLINE,
        "the container never got to its binds",
    );
    // Changes on the host after the start: a file replaced by a rename (as Kubernetes swaps
    // its config maps), a bound file rewritten in place (as Docker rewrites resolv.conf).
    std::fs::write(vol.join("in.new"), "changed\n").unwrap();
    std::fs::rename(vol.join("in.new"), vol.join("in")).unwrap();
    std::fs::write(files.join("hosts"), "127.0.0.1 changed\n").unwrap();
    let out = run.finish();
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from the host\n1000:1000\nno-escape\nro-refused\nread only\n127.0.0.1 from-the-host\n\
         file-ro-refused\nwaiting\nsaw-rename\nsaw-rewrite\n",
        "{context}"
    );
    // The container's write reached the host, as root's; the read-only volume is unchanged.
    let out_file = vol.join("out");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "written\n");
    assert_eq!(std::fs::metadata(&out_file).unwrap().uid(), 0);
    assert!(!ro.join("new").exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST SECRET\n");
}

#[test]
fn a_bind_mount_of_a_missing_host_path_is_refused_naming_it() {
    check_artifacts();
    let builder = Bundle::builder().script("true");
    let bundle = builder.build();
    let mut config: serde_json::Value = serde_json::from_str(&builder.config_json()).unwrap();
    let missing = "/nonexistent-hull/volume";
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
        {"destination": "/data", "type": "bind", "source": missing, "options": ["rbind"]}));
    let index = config["mounts"].as_array().unwrap().len() - 1;
    std::fs::write(bundle.config(), config.to_string()).unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_ne!(out.status.code(), Some(0), "{context}");
    assert!(
        out.stderr.contains(&format!("mounts[{index}].source")) && out.stderr.contains(missing),
        "{context}"
    );
    assert!(processes_mentioning(missing).is_empty());
}

#[test]
fn the_spec_s_devices_are_made_with_their_owner() {
    check_artifacts();
    // (Their parent directories are resolved inside the rootfs like mount points; the agent's
    // unit test `mount_points_are_made_with_the_image_s_symlinks_resolved_inside_the_rootfs`
    // covers the links.)
    let builder = Bundle::builder().script(
        "echo x > /dev/hull-null && test -c /dev/hull-null && test -p /dev/sub/hull-fifo && \
         busybox stat -c '%u %g %a' /dev/sub/hull-fifo",
    );
    let bundle = builder.build();
    let mut config: serde_json::Value = serde_json::from_str(&builder.config_json()).unwrap();
    config["linux"]["devices"] = serde_json::json!([
        {"path": "/dev/hull-null", "type": "c", "major": 1, "minor": 3, "fileMode": 438},
        {"path": "/dev/sub/hull-fifo", "type": "p", "major": 0, "minor": 0,
         "fileMode": 416, "uid": 1000, "gid": 1001}
    ]);
    std::fs::write(bundle.config(), config.to_string()).unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert_eq!(out.stdout, b"1000 1001 640\n", "{context}");
}

#[test]
fn a_spec_hull_cannot_honour_is_refused_before_a_vm_starts() {
    let bundle = Bundle::builder().pid_namespace(true).build();
    let config = bundle.config();
    let spec: serde_json::Value =
        serde_json::from_str(&Bundle::builder().pid_namespace(true).config_json()).unwrap();
    let cases: [(&[&str], serde_json::Value, &str); 4] = [
        (
            &["linux", "namespaces"],
            serde_json::json!([{"type": "pid"}, {"type": "user", "path": "/proc/self/ns/user"}]),
            "field `linux.namespaces[1].path` = \"/proc/self/ns/user\": a user namespace of the \
             host cannot be joined from a VM",
        ),
        (
            &["process", "capabilities"],
            serde_json::json!({"bounding": ["CAP_NOT_A_CAP"]}),
            "field `process.capabilities.bounding[0]` = \"CAP_NOT_A_CAP\": unknown capability",
        ),
        (
            &["linux", "seccomp"],
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                               "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
            "field `linux.seccomp.syscalls[0].action` = \"SCMP_ACT_NOTIFY\": not implemented",
        ),
        (
            &["process", "cwd"],
            serde_json::json!("relative/dir"),
            "field `process.cwd` = \"relative/dir\": must be an absolute path",
        ),
    ];
    for (path, value, want) in cases {
        let mut changed = spec.clone();
        let (last, parents) = path.split_last().unwrap();
        let mut slot = &mut changed;
        for key in parents {
            slot = &mut slot[*key];
        }
        slot[*last] = value;
        std::fs::write(&config, changed.to_string()).unwrap();
        let out = hull_run(bundle.path(), None);
        let context = out.context();
        assert_eq!(out.status.code(), Some(1), "{context}");
        assert!(
            out.stderr
                .contains(&format!("{}: {want}", config.display())),
            "wanted {want:?}\n{context}"
        );
        assert!(out.elapsed < Duration::from_secs(5), "{context}");
    }
}

#[test]
fn bad_input_is_refused_before_a_vm_starts() {
    let bundle = Bundle::builder().build();
    let config = bundle.config();

    std::fs::write(&config, "{\n  \"process\": {\"args\": [\"sh\"],\n").unwrap();
    let out = hull_run(bundle.path(), None);
    let context = out.context();
    assert_eq!(out.status.code(), Some(1), "{context}");
    assert!(
        out.stderr
            .contains(&format!("{}: malformed JSON", config.display())),
        "{context}"
    );
    assert!(out.stderr.contains("line 3"), "{context}");
    assert!(out.elapsed < Duration::from_secs(5), "{context}");

    std::fs::write(
        &config,
        r#"{"process": {"cwd": "/"}, "root": {"path": "rootfs"}}"#,
    )
    .unwrap();
    let out = hull_run(bundle.path(), None);
    assert_eq!(out.status.code(), Some(1), "{}", out.context());
    assert!(
        out.stderr.contains("field `process.args` is missing"),
        "{}",
        out.context()
    );

    std::fs::write(
        &config,
        r#"{"process": {"args": ["sh"]}, "root": {"path": "gone"}}"#,
    )
    .unwrap();
    let out = hull_run(bundle.path(), None);
    assert_eq!(out.status.code(), Some(1), "{}", out.context());
    assert!(
        out.stderr
            .contains("field `root.path` = \"gone\": rootfs directory"),
        "{}",
        out.context()
    );

    // A taken id: the existing state directory is someone else's and stays.
    let root = TempDir::new("run-root-taken");
    std::fs::create_dir_all(root.path().join(ID)).unwrap();
    std::fs::write(&config, Bundle::builder().config_json()).unwrap();
    let out = Command::new(workspace_bin("hull"))
        .arg("--root")
        .arg(root.path())
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(ID)
        .stdin(Stdio::null())
        .output()
        .expect("run hull");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("container {ID} already exists")),
        "{stderr}"
    );
    assert!(root.path().join(ID).is_dir());
    assert!(processes_mentioning(&root.path().display().to_string()).is_empty());
}

/// The hull-vmm of the container `hull run` started under `root`: its pid, from `hull state`.
fn vmm_pid(root: &Path) -> i32 {
    let out = Command::new(workspace_bin("hull"))
        .arg("--root")
        .arg(root)
        .args(["state", ID])
        .output()
        .expect("run hull state");
    let state: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("hull state: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    state["pid"].as_i64().expect("a pid in the state") as i32
}

/// The hostile-guest suite from the container's side (the machine-code attacks are in
/// `hostile.rs`): a fork bomb and a memory bomb in the container. The agent outlives them in
/// its own cgroup: the container's output still comes, and SIGTERM still reaches its init,
/// whose exit status comes back; hull-vmm stays bounded and nothing is left.
#[test]
fn fork_and_memory_bombs_leave_the_agent_serving() {
    check_artifacts();
    // Each bomb makes itself the OOM killer's first choice, so that the init (the shell that
    // must answer SIGTERM) is not. The init then waits without forking (a `read` with a
    // timeout on a FIFO of its own): once the fork bomb holds every pid, a shell that forks a
    // `sleep` fails with "can't fork" and exits 2 (seen in the nested lane).
    let builder = Bundle::builder().script(
        "trap 'echo got-term; exit 7' TERM; mkfifo /tmp/tick; exec 3<>/tmp/tick; \
         ( echo 1000 > /proc/self/oom_score_adj; b() { b | b & }; b ) 2>/dev/null & \
         ( echo 1000 > /proc/self/oom_score_adj; exec tail /dev/zero ) 2>/dev/null & \
         echo bombs; while :; do read -t 1 x <&3; done",
    );
    let bundle = builder.build();
    let mut config: serde_json::Value = serde_json::from_str(&builder.config_json()).unwrap();
    config["linux"]["resources"]["pids"] = serde_json::json!({"limit": 64});
    config["linux"]["resources"]["memory"] = serde_json::json!({"limit": 64 << 20});
    std::fs::write(bundle.config(), config.to_string()).unwrap();
    let run = HullRun::start(bundle.path(), None);
    run.wait_for_stdout("bombs\n", DEADLINE, "the container never started its bombs");
    let pid = vmm_pid(run.root.path());
    // Let them go off: the pids limit is reached at once, the memory one within seconds.
    std::thread::sleep(Duration::from_secs(10));
    let (fds, rss_kib) = footprint(pid);
    eprintln!("under the bombs, hull-vmm has {fds} descriptors and {rss_kib} KiB resident");
    assert!(fds < 256, "{fds} descriptors");
    // Guest RAM (512 MiB at most here) and hull-vmm's own.
    assert!(rss_kib < 640 << 10, "{rss_kib} KiB");
    let out = run.terminate();
    let context = out.context();
    assert_eq!(out.status.code(), Some(7), "{context}");
    assert!(out.stdout.ends_with(b"got-term\n"), "{context}");
}

/// The hostile-guest suite: a container that keeps making directories, and so keeps the
/// guest's kernel holding an inode of each (no FORGET comes while it holds them), past the file
/// server's cap: the guest gets "too many open files in system", hull-vmm's descriptors stay
/// under its limit, and the container goes on. (hull runs with a descriptor limit of 4096, which
/// hull-vmm keeps, for a cap of 3072 inodes.)
#[test]
fn a_guest_holding_ever_more_inodes_gets_enfile_and_hull_vmm_stays_bounded() {
    check_artifacts();
    let builder = Bundle::builder().script(
        "trap 'echo got-term; exit 7' TERM; echo waiting; \
         while [ ! -s /go ]; do sleep 1; done; mkdir /many; cd /many; \
         seq 1 $(cat /go) | xargs mkdir 2>/errors; \
         grep -q 'Too many open files in system' /errors && echo enfile; \
         ls | wc -l; echo made; while :; do sleep 1; done",
    );
    let bundle = builder.build();
    let run = HullRun::start_with_nofile(bundle.path(), 4096);
    run.wait_for_stdout("waiting\n", DEADLINE, "the container never started");
    let pid = vmm_pid(run.root.path());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .expect("hull-vmm's descriptor limit");
    // The file server's cap (`devices::virtio::fs::confine`).
    let cap = (nofile / 4 * 3).min(devices::virtio::fs::confine::MAX_INODES);
    assert!(
        cap <= 3072,
        "hull-vmm's descriptor limit is {nofile}, not its parent's 4096"
    );
    let files = cap + 2_000;
    std::fs::write(bundle.rootfs().join("go"), format!("{files}\n")).unwrap();
    // A guard against a hang only: on a PVM host each mkdir is several guest system calls
    // at 0.4 ms, and more than 200 s in all.
    run.wait_for_stdout_to(
        |so_far| so_far.ends_with("made\n"),
        "... made",
        DEADLINE * 2,
        "the container never finished making them",
    );
    let (fds, rss_kib) = footprint(pid);
    eprintln!(
        "{files} directories against a cap of {cap}: hull-vmm has {fds} descriptors (limit \
         {nofile}), {rss_kib} KiB resident"
    );
    assert!(fds < nofile, "{fds} descriptors, limit {nofile}");
    let out = run.terminate();
    let context = out.context();
    assert_eq!(out.status.code(), Some(7), "{context}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("waiting\nenfile\n"), "{context}");
    // Directories up to about the cap were made, not all of them.
    let made: usize = stdout
        .lines()
        .nth(2)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        made > cap / 2 && made < files,
        "{made} directories\n{context}"
    );
}
