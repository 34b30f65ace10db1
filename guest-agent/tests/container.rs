//! The agent serving the host protocol, on the host at native speed: the agent runs as PID 1
//! of a throwaway PID and mount namespace (as in `pid1.rs`) with `hull.serve`, listening on Unix
//! sockets instead of vsock, and a busybox directory as the container's rootfs instead of the
//! virtio-fs share. The test plays the host: handshake, stream connections, requests, events.
//!
//! Every test has a deadline, ends the namespace (shutdown, or `--kill-child` on failure) and
//! checks that nothing stays mounted. Needs root and Debian's busybox-static (`/bin/busybox`);
//! without them the tests say so and pass.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hull_protocol::spec::{
    Capabilities, ContainerSpec, IdMapping, Mount, Namespace, NamespaceKind, Process, Propagation,
    Rlimit, RlimitKind, Seccomp, SeccompAction, SeccompArg, SeccompOp, SeccompRule, User,
};
use hull_protocol::{
    attach_stream, host_handshake, read_frame, write_frame, AgentMessage, CreateContainer,
    ErrorKind, ErrorResponse, Event, Exec, ExitStatus, HostMessage, ProcessRef, Request,
    RequestBody, ResponseBody, Rootfs, Stdio as StdioSpec, StreamKind,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "id", "hostname", "pwd", "env", "sleep", "true", "false", "head", "touch",
    "kill", "ls", "yes", "grep", "printf", "readlink", "stty", "tty", "test", "stat", "nc", "ip",
    "awk",
];

fn agent() -> String {
    std::env::var("HULL_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hull-agent").to_owned())
}

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: container tests need root");
        return false;
    }
    if !Path::new(BUSYBOX).exists() {
        eprintln!("skipping: {BUSYBOX} missing (apt-get install busybox-static)");
        return false;
    }
    true
}

/// A temporary directory: `root/` for the agent, `rootfs/` with busybox, the sockets.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hull-container-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(path.join("root")).expect("create root");
        let bin = path.join("rootfs/bin");
        std::fs::create_dir_all(&bin).expect("create rootfs");
        std::fs::create_dir_all(path.join("rootfs/tmp")).expect("create tmp");
        std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
        }
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if mounts_under(&self.0).is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let dir = dir.to_str().expect("utf-8 temp dir");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// The agent in its namespace, plus the host's side of the protocol.
struct Vm {
    unshare: Child,
    console: Receiver<String>,
    control: UnixStream,
    next_id: u64,
    events: Vec<Event>,
    dir: TempDir,
}

impl Vm {
    fn boot(env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new();
        let pidns = nix::sys::stat::stat("/proc/self/ns/pid")
            .expect("own pidns")
            .st_ino;
        let mut command = Command::new("unshare");
        command
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
                "--kill-child",
            ])
            .arg("--")
            .arg(agent())
            .env("HULL_AGENT_TEST_ROOT", dir.0.join("root"))
            .env("HULL_AGENT_TEST_PARENT_PIDNS", pidns.to_string())
            .env("HULL_AGENT_TEST_CMDLINE", "console=ttyS0 hull.serve")
            .env("HULL_AGENT_TEST_CONTROL_SOCKET", dir.0.join("control.sock"))
            .env("HULL_AGENT_TEST_STDIO_SOCKET", dir.0.join("stdio.sock"))
            .env("HULL_AGENT_TEST_ROOTFS", dir.0.join("rootfs"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut unshare = command.spawn().expect("spawn unshare");
        let (tx, console) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(unshare.stdout.take().expect("stdout"));
        let err: Box<dyn Read + Send> = Box::new(unshare.stderr.take().expect("stderr"));
        for stream in [out, err] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("console: {line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = console
                .recv_timeout(left)
                .expect("readiness line before the deadline");
            if line.starts_with("HULL_AGENT_READY ") {
                break;
            }
        }
        let mut control = UnixStream::connect(dir.0.join("control.sock")).expect("connect");
        control.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let hello = host_handshake(&mut control, "test").expect("handshake");
        assert_eq!(hello.protocol_version, hull_protocol::PROTOCOL_VERSION);
        Self {
            unshare,
            console,
            control,
            next_id: 1,
            events: Vec::new(),
            dir,
        }
    }

    /// A new control connection in place of the old one.
    fn reconnect(&mut self) {
        let mut control =
            UnixStream::connect(self.dir.0.join("control.sock")).expect("connect again");
        control.set_read_timeout(Some(DEADLINE)).expect("timeout");
        host_handshake(&mut control, "test").expect("handshake again");
        self.control = control;
    }

    fn attach(&self, kind: StreamKind) -> UnixStream {
        self.attach_to(&ProcessRef::Init, kind)
    }

    fn try_attach(
        &self,
        process: &ProcessRef,
        kind: StreamKind,
    ) -> Result<UnixStream, hull_protocol::stdio::StreamError> {
        let mut conn = UnixStream::connect(self.dir.0.join("stdio.sock")).expect("connect stdio");
        conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
        attach_stream(&mut conn, process, kind).map(|()| conn)
    }

    fn attach_to(&self, process: &ProcessRef, kind: StreamKind) -> UnixStream {
        self.try_attach(process, kind).expect("attach stream")
    }

    /// Runs `exec` (its streams must be attached); the pid on success.
    fn exec(
        &mut self,
        exec_id: &str,
        process: Process,
        stdio: StdioSpec,
    ) -> Result<i32, ErrorResponse> {
        let body = RequestBody::Exec(Box::new(Exec {
            exec_id: exec_id.into(),
            process,
            stdio,
            container_id: None,
        }));
        self.request(body).map(|r| match r {
            ResponseBody::Started { pid } => pid,
            other => panic!("exec answered {other:?}"),
        })
    }

    /// Waits for the `exited` event of `process`, keeping the others for later.
    fn exit_of(&mut self, process: &ProcessRef) -> (i32, ExitStatus) {
        let deadline = Instant::now() + DEADLINE;
        let mut i = 0;
        loop {
            while i < self.events.len() {
                let Event::Exited {
                    process: p,
                    pid,
                    status,
                } = &self.events[i];
                if p == process {
                    let found = (*pid, *status);
                    self.events.remove(i);
                    return found;
                }
                i += 1;
            }
            assert!(Instant::now() < deadline, "no exit of {process} in time");
            match read_frame::<_, AgentMessage>(&mut self.control)
                .expect("read an event before the deadline")
                .expect("agent closed the control connection")
            {
                AgentMessage::Event(e) => self.events.push(e),
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// Waits until the container's processes include one with these arguments.
    fn wait_for_process(&mut self, args: &[&str]) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let Ok(ResponseBody::Processes(list)) = self.request(RequestBody::ListProcesses) else {
                panic!("list_processes failed");
            };
            if list.iter().any(|p| p.args == args) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{args:?} never showed up: {list:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn request(&mut self, body: RequestBody) -> Result<ResponseBody, ErrorResponse> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(
            &mut self.control,
            &HostMessage::Request(Request { id, body }),
        )
        .expect("send request");
        loop {
            match read_frame::<_, AgentMessage>(&mut self.control)
                .expect("read from the agent")
                .expect("agent closed the control connection")
            {
                AgentMessage::Response(r) if r.id == id => return r.result,
                AgentMessage::Event(e) => self.events.push(e),
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    fn next_event(&mut self) -> Event {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        match read_frame::<_, AgentMessage>(&mut self.control)
            .expect("read an event before the deadline")
            .expect("agent closed the control connection")
        {
            AgentMessage::Event(e) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn create(
        &mut self,
        spec: ContainerSpec,
        stdin: bool,
        readonly: bool,
    ) -> Result<(), ErrorResponse> {
        let stdio = StdioSpec::Pipes {
            stdin,
            stdout: true,
            stderr: true,
        };
        self.create_with(spec, stdio, readonly)
    }

    fn create_with(
        &mut self,
        spec: ContainerSpec,
        stdio: StdioSpec,
        readonly: bool,
    ) -> Result<(), ErrorResponse> {
        let body = RequestBody::CreateContainer(Box::new(CreateContainer {
            container_id: "c1".into(),
            spec,
            rootfs: Rootfs {
                fs_tag: "rootfs".into(),
                readonly,
                subdir: None,
            },
            stdio,
            binds_fs_tag: None,
            pod: false,
        }));
        self.request(body).map(|r| assert_eq!(r, ResponseBody::Ok))
    }

    /// Shuts the VM down and checks that the namespace ended by "power off" with nothing left.
    fn shutdown(mut self) {
        let before = descendants(self.unshare.id() as i32);
        assert!(!before.is_empty(), "no agent under unshare");
        assert_eq!(self.request(RequestBody::Shutdown), Ok(ResponseBody::Ok));
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.unshare.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "namespace still running");
            thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.signal() == Some(1) || status.code() == Some(129),
            "namespace did not end by reboot: {status:?}"
        );
        while self.console.try_recv().is_ok() {}
        assert_eq!(mounts_under(&self.dir.0), Vec::<String>::new());
        let left: Vec<_> = before
            .iter()
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Every process below `pid` (host pids), from `/proc/*/stat`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<i32>().ok())
        {
            parents.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The capabilities `runc spec` gives, as the host sends them.
fn runc_capabilities() -> Capabilities {
    let set = Capabilities::mask(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"])
        .expect("known capability names");
    Capabilities {
        bounding: set,
        effective: set,
        permitted: set,
        inheritable: set,
        ambient: set,
    }
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.into(),
        kind: Some(kind.into()),
        source: Some(source.into()),
        options: strings(options),
    }
}

/// What the host sends for a spec like `runc spec` writes, running `args`.
fn spec(args: &[&str]) -> ContainerSpec {
    let ns = |kind| Namespace { kind, path: None };
    ContainerSpec {
        process: Process {
            terminal: false,
            user: User::default(),
            args: strings(args),
            env: strings(&[
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
            ]),
            cwd: "/".into(),
            capabilities: Some(runc_capabilities()),
            rlimits: vec![Rlimit {
                kind: RlimitKind::Nofile,
                hard: 1024,
                soft: 1024,
            }],
            no_new_privileges: true,
            oom_score_adj: None,
        },
        readonly_root: false,
        hostname: Some("runc".into()),
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
        namespaces: vec![
            ns(NamespaceKind::Pid),
            ns(NamespaceKind::Network),
            ns(NamespaceKind::Ipc),
            ns(NamespaceKind::Uts),
            ns(NamespaceKind::Mount),
            ns(NamespaceKind::Cgroup),
        ],
        masked_paths: strings(&[
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
        ]),
        readonly_paths: strings(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]),
        ..ContainerSpec::default()
    }
}

/// What a container run gave: its output and how it ended.
#[derive(Debug)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
}

impl Outcome {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

fn reader(mut conn: UnixStream) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        conn.read_to_end(&mut out)
            .expect("read a stream before the deadline");
        out
    })
}

/// Boots, creates and starts a container with `spec`, feeds `stdin` (if any), waits for its
/// exit and shuts down.
fn run_with(
    spec: ContainerSpec,
    stdin: Option<Vec<u8>>,
    readonly: bool,
    env: &[(&str, &str)],
) -> Outcome {
    let mut vm = Vm::boot(env);
    let outcome = run_on(&mut vm, spec, stdin, readonly);
    vm.shutdown();
    outcome
}

/// Creates and starts a container with `spec` in `vm`, feeds `stdin` (if any) and waits for
/// its exit.
fn run_on(vm: &mut Vm, spec: ContainerSpec, stdin: Option<Vec<u8>>, readonly: bool) -> Outcome {
    let stdin_conn = stdin.as_ref().map(|_| vm.attach(StreamKind::Stdin));
    let stdout = reader(vm.attach(StreamKind::Stdout));
    let stderr = reader(vm.attach(StreamKind::Stderr));
    vm.create(spec, stdin.is_some(), readonly).expect("create");
    let started = vm.request(RequestBody::StartContainer).expect("start");
    let ResponseBody::Started { pid } = started else {
        panic!("start answered {started:?}");
    };
    let writer = stdin_conn.map(|mut conn| {
        let data = stdin.expect("stdin given");
        thread::spawn(move || {
            conn.write_all(&data).expect("write stdin");
            // Dropping the connection is the end of the process's stdin.
        })
    });
    let Event::Exited {
        process,
        pid: exited,
        status,
    } = vm.next_event();
    assert_eq!((process, exited), (ProcessRef::Init, pid));
    if let Some(writer) = writer {
        writer.join().expect("stdin writer");
    }
    let outcome = Outcome {
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        status,
    };
    assert_eq!(
        vm.request(RequestBody::Wait {
            process: ProcessRef::Init
        }),
        Ok(ResponseBody::Exited { status })
    );
    outcome
}

fn run(args: &[&str]) -> Outcome {
    run_with(spec(args), None, false, &[])
}

#[test]
fn stdout_stderr_and_exit_codes() {
    if !can_run() {
        return;
    }
    for code in [0, 1, 42] {
        let out = run(&[
            "sh",
            "-c",
            &format!("echo out {code}; echo err >&2; exit {code}"),
        ]);
        assert_eq!(out.stdout(), format!("out {code}\n"));
        assert_eq!(out.stderr(), "err\n");
        assert_eq!(out.status, ExitStatus::Code(code));
    }
}

/// A host that sends requests and never reads the answers is cut off once the agent holds a
/// mebibyte of them (docs/agent.md, "Threads"); the agent goes on serving and reaping.
#[test]
fn a_host_that_stops_reading_is_cut_off_and_the_agent_goes_on() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let mut flood = vm.control.try_clone().expect("clone");
    flood.set_write_timeout(Some(DEADLINE)).expect("timeout");
    let request = HostMessage::Request(Request {
        id: 1,
        body: RequestBody::ListProcesses,
    });
    let mut sent = 0u64;
    let err = loop {
        match write_frame(&mut flood, &request) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000_000, "the agent never gave up on the host");
    };
    let hull_protocol::FrameError::Write(io) = &err else {
        panic!("{err:?}");
    };
    assert!(
        matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "the agent shuts the connection down, it does not stop reading: {io:?} after {sent}"
    );
    vm.reconnect();
    vm.create_with(spec(&["sh", "-c", "exit 3"]), StdioSpec::NULL, false)
        .expect("create");
    let Ok(ResponseBody::Started { pid }) = vm.request(RequestBody::StartContainer) else {
        panic!("start failed");
    };
    assert_eq!(vm.exit_of(&ProcessRef::Init), (pid, ExitStatus::Code(3)));
    vm.shutdown();
}

#[test]
fn the_container_sees_its_own_namespaces_and_mounts() {
    if !can_run() {
        return;
    }
    let script = "echo pid=$$; hostname; echo x > /dev/null && echo devnull; \
                  ls /dev/pts/ptmx /dev/shm /dev/mqueue /sys/fs/cgroup/cgroup.procs >/dev/null && echo mounts; \
                  head -c 1 /proc/kcore | grep -c . ; echo kcore; \
                  echo 1 > /proc/sys/kernel/ns_last_pid || echo sys-ro; \
                  grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; \
                  ls /proc/1/root/bin/busybox";
    let out = run(&["sh", "-c", script]);
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    let stdout = out.stdout();
    let expected_caps = format!("{:016x}", (1u64 << 29) | (1 << 5) | (1 << 10));
    for want in [
        "pid=1\n".to_owned(),
        "runc\n".into(),
        "devnull\n".into(),
        "mounts\n".into(),
        "0\nkcore\n".into(),
        "sys-ro\n".into(),
        format!("CapEff:\t{expected_caps}\n"),
        format!("CapBnd:\t{expected_caps}\n"),
        format!("CapAmb:\t{expected_caps}\n"),
        "NoNewPrivs:\t1\n".into(),
    ] {
        assert!(
            stdout.contains(&want),
            "no {want:?} in {stdout:?}; stderr {}",
            out.stderr()
        );
    }
}

/// The agent makes the container's init ahead in new namespaces of every kind
/// (`container/zygote.rs`). Those a spec shares with the agent (absent, or joined by a host
/// `path`) are the agent's in the container, the others are new; a spec without a PID
/// namespace of its own is set up the usual way, in the agent's.
#[test]
fn namespaces_a_spec_shares_with_the_agent_are_the_agent_s() {
    if !can_run() {
        return;
    }
    const KINDS: [(&str, Option<NamespaceKind>); 6] = [
        ("net", Some(NamespaceKind::Network)),
        ("uts", Some(NamespaceKind::Uts)),
        ("ipc", Some(NamespaceKind::Ipc)),
        ("cgroup", Some(NamespaceKind::Cgroup)),
        ("pid", Some(NamespaceKind::Pid)),
        ("mnt", None),
    ];
    let script = KINDS
        .iter()
        .map(|(name, _)| format!("echo {name}=$(readlink /proc/self/ns/{name});"))
        .collect::<String>()
        + "echo self=$$";
    let cases: [(&str, &[NamespaceKind], &[NamespaceKind]); 3] = [
        ("every namespace its own", &[], &[]),
        (
            "network by path, no UTS",
            &[NamespaceKind::Network],
            &[NamespaceKind::Uts],
        ),
        (
            "no PID namespace, IPC by path",
            &[NamespaceKind::Ipc],
            &[NamespaceKind::Pid],
        ),
    ];
    for (case, by_path, absent) in cases {
        let mut spec = spec(&["sh", "-c", &script]);
        spec.hostname = None;
        spec.namespaces.retain(|ns| !absent.contains(&ns.kind));
        for ns in &mut spec.namespaces {
            if by_path.contains(&ns.kind) {
                ns.path = Some("/proc/1/ns/whatever-the-host-joined".into());
            }
        }
        let mut vm = Vm::boot(&[]);
        let agent = descendants(vm.unshare.id() as i32)[0];
        let agent_ns: Vec<String> = KINDS
            .iter()
            .map(|(name, _)| {
                std::fs::read_link(format!("/proc/{agent}/ns/{name}"))
                    .expect("the agent's namespace")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let out = run_on(&mut vm, spec.clone(), None, false);
        vm.shutdown();
        assert_eq!(out.status, ExitStatus::Code(0), "{case}: {out:?}");
        let stdout = out.stdout();
        for ((name, kind), agent_ns) in KINDS.into_iter().zip(agent_ns) {
            let line = stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{case}: no {name} in {stdout:?}"));
            let shared = kind.is_some_and(|kind| !spec.unshares(kind));
            assert_eq!(
                line == agent_ns,
                shared,
                "{case}: {name} is {line}, the agent's {agent_ns}"
            );
        }
        let own_pidns = spec.unshares(NamespaceKind::Pid);
        assert_eq!(
            stdout.contains("self=1\n"),
            own_pidns,
            "{case}: the init is PID 1 exactly when it has a PID namespace: {stdout:?}"
        );
    }
}

/// A pre-made init that is gone before its container comes (killed here) is not waited for:
/// the agent says so and sets the container up the usual way.
#[test]
fn a_pre_made_init_that_died_is_replaced() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let agent = descendants(vm.unshare.id() as i32)[0];
    let waiting = descendants(agent);
    assert_eq!(waiting.len(), 1, "one pre-made init: {waiting:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(waiting[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the pre-made init");
    let deadline = Instant::now() + DEADLINE;
    while !descendants(agent).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pre-made init was not reaped"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let out = run_on(&mut vm, spec(&["sh", "-c", "echo pid=$$"]), None, false);
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    assert_eq!(out.stdout(), "pid=1\n");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let line = vm
            .console
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the agent says why it did not use the pre-made init");
        if line.contains("could not take the container") {
            break;
        }
    }
    vm.shutdown();
}

/// A descriptor the agent holds without close-on-exec (here one it inherited) never reaches
/// the container's process: it has its stdio and nothing else.
#[test]
fn the_container_inherits_no_descriptor_but_its_stdio() {
    if !can_run() {
        return;
    }
    // Not close-on-exec: the agent inherits it through `unshare`.
    let (leaked_r, leaked_w) = nix::unistd::pipe().expect("pipe");
    let out = run(&["sh", "-c", "ls /proc/self/fd"]);
    drop((leaked_r, leaked_w));
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    // 3 is `ls`'s own directory descriptor.
    assert_eq!(out.stdout(), "0\n1\n2\n3\n", "{out:?}");
}

#[test]
fn killed_by_a_signal() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let stdout = reader(vm.attach(StreamKind::Stdout));
    let stderr = reader(vm.attach(StreamKind::Stderr));
    vm.create(spec(&["sh", "-c", "echo up; exec sleep 100"]), false, false)
        .expect("create");
    vm.request(RequestBody::StartContainer).expect("start");
    // `ps` lists the container's processes; wait until sleep has replaced the shell.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let Ok(ResponseBody::Processes(list)) = vm.request(RequestBody::ListProcesses) else {
            panic!("list_processes failed");
        };
        if list
            .iter()
            .any(|p| p.args == ["sleep", "100"] && p.comm == "sleep")
        {
            assert_eq!(list.len(), 1, "{list:?}");
            break;
        }
        assert!(Instant::now() < deadline, "sleep never showed up: {list:?}");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        vm.request(RequestBody::Signal {
            process: ProcessRef::Init,
            signal: 9,
            all: false
        }),
        Ok(ResponseBody::Ok)
    );
    let Event::Exited { status, .. } = vm.next_event();
    assert_eq!(status, ExitStatus::Signal(9));
    assert_eq!(serde_json::to_value(status).unwrap(), json!({"signal": 9}));
    assert_eq!(stdout.join().unwrap(), b"up\n");
    assert_eq!(stderr.join().unwrap(), b"");
    vm.shutdown();
}

/// Deterministic bytes covering every value.
fn binary(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn stdin_is_piped_through_and_a_mebibyte_comes_back_byte_exact() {
    if !can_run() {
        return;
    }
    let data = binary(1 << 20);
    let out = run_with(spec(&["cat"]), Some(data.clone()), false, &[]);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "output differs from input");

    let out = run(&["sh", "-c", "yes 0123456789abcde | head -c 1048576"]);
    assert_eq!(out.stdout, b"0123456789abcde\n".repeat(1 << 16));
}

#[test]
fn user_env_cwd_and_umask() {
    if !can_run() {
        return;
    }
    let mut s = spec(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; echo $FOO; pwd; umask; touch f 2>&1 || echo denied",
    ]);
    s.process.user = other_user();
    s.process.env = strings(&["PATH=/bin", "FOO=bar baz"]);
    s.process.cwd = "/tmp".into();
    let out = run_with(s, None, false, &[]);
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    let lines: Vec<_> = out.stdout().lines().map(str::to_owned).collect();
    assert_eq!(
        lines[..6],
        ["1000", "1001", "1001 1002", "bar baz", "/tmp", "0077"]
    );
}

#[test]
fn a_readonly_rootfs_refuses_writes() {
    if !can_run() {
        return;
    }
    let out = run_with(
        spec(&[
            "sh",
            "-c",
            "touch /tmp/x && echo wrote; echo tmpfs > /dev/shm/x && echo shm",
        ]),
        None,
        true,
        &[],
    );
    assert_eq!(out.stdout(), "shm\n");
    assert!(
        out.stderr().contains("Read-only file system"),
        "{}",
        out.stderr()
    );
    let mut s = spec(&["sh", "-c", "touch /x"]);
    s.readonly_root = true;
    let out = run_with(s, None, false, &[]);
    assert_eq!(out.status, ExitStatus::Code(1));
}

/// Denies `mkdir` (and `mkdirat`) with `errno`, allows the rest; names unknown to x86_64 and
/// other architectures are in the profile too, as in Docker's (the host passes them on).
fn deny_mkdir(args: &[&str], no_new_privileges: bool, errno: u32) -> ContainerSpec {
    let mut s = spec(args);
    s.process.no_new_privileges = no_new_privileges;
    s.seccomp = Some(Seccomp {
        default_action: SeccompAction::Allow,
        log: false,
        spec_allow: false,
        syscalls: vec![
            SeccompRule {
                names: strings(&["socketcall", "only_on_some_other_arch"]),
                action: SeccompAction::KillThread,
                args: Vec::new(),
            },
            SeccompRule {
                names: strings(&["mkdir", "no_such_syscall", "mkdirat"]),
                action: SeccompAction::Errno(errno),
                args: Vec::new(),
            },
        ],
    });
    s
}

#[test]
fn seccomp_denies_mkdir_with_eperm() {
    if !can_run() {
        return;
    }
    let script = "echo ok; mkdir /tmp/x; echo mkdir=$?; touch /tmp/y && ls /tmp";
    for no_new_privileges in [true, false] {
        let out = run_with(
            deny_mkdir(&["sh", "-c", script], no_new_privileges, EPERM),
            None,
            false,
            &[],
        );
        assert_eq!(
            out.stdout(),
            "ok\nmkdir=1\ny\n",
            "noNewPrivileges {no_new_privileges}: {}",
            out.stderr()
        );
        assert!(
            out.stderr().contains("Operation not permitted"),
            "{}",
            out.stderr()
        );
        assert_eq!(out.status, ExitStatus::Code(0));
    }
}

#[test]
fn seccomp_errno_ret_and_a_non_root_user() {
    if !can_run() {
        return;
    }
    // Without noNewPrivileges the filter goes in while the init can still install one.
    let mut s = deny_mkdir(&["sh", "-c", "id -u; mkdir /tmp/x"], false, 13);
    s.process.user = user(1000);
    let out = run_with(s, None, false, &[]);
    assert_eq!(out.stdout(), "1000\n", "{}", out.stderr());
    assert!(
        out.stderr().contains("Permission denied"),
        "{}",
        out.stderr()
    );
    assert_eq!(out.status, ExitStatus::Code(1));
}

#[test]
fn seccomp_default_deny_with_an_allow_list() {
    if !can_run() {
        return;
    }
    let mut s = spec(&["sh", "-c", "echo ok; mkdir /tmp/x"]);
    let names = strings(&[
        "execve",
        "brk",
        "arch_prctl",
        "set_tid_address",
        "set_robust_list",
        "rseq",
        "mmap",
        "munmap",
        "mprotect",
        "read",
        "write",
        "writev",
        "close",
        "exit",
        "exit_group",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "getpid",
        "getppid",
        "gettid",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "ioctl",
        "fcntl",
        "dup2",
        "dup3",
        "wait4",
        "vfork",
        "fork",
        "clone",
        "clone3",
        "stat",
        "fstat",
        "lstat",
        "newfstatat",
        "statx",
        "open",
        "openat",
        "access",
        "faccessat",
        "faccessat2",
        "getcwd",
        "uname",
        "prlimit64",
        "futex",
        "getrandom",
        "readlink",
        "lseek",
        "poll",
        "sigaltstack",
    ]);
    s.seccomp = Some(Seccomp {
        default_action: SeccompAction::Errno(EPERM),
        log: false,
        spec_allow: false,
        syscalls: vec![SeccompRule {
            names,
            action: SeccompAction::Allow,
            args: Vec::new(),
        }],
    });
    let out = run_with(s, None, false, &[]);
    assert_eq!(out.stdout(), "ok\n", "{}", out.stderr());
    assert!(
        out.stderr().contains("Operation not permitted"),
        "{}",
        out.stderr()
    );
    assert_eq!(out.status, ExitStatus::Code(1));
}

#[test]
fn bad_specs_give_clear_errors() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    // What the host refuses (unknown capability names, SCMP_ACT_NOTIFY, ...) cannot reach the
    // agent; these are what it still checks, and what only the guest can find out.
    let cases: Vec<(ContainerSpec, ErrorKind, &str)> = vec![
        (
            {
                let mut s = spec(&["true"]);
                s.seccomp = Some(Seccomp {
                    default_action: SeccompAction::Allow,
                    log: false,
                    spec_allow: false,
                    syscalls: vec![SeccompRule {
                        names: strings(&["kill"]),
                        action: SeccompAction::Errno(EPERM),
                        args: vec![SeccompArg {
                            index: 6,
                            op: SeccompOp::Eq(1),
                        }],
                    }],
                });
                s
            },
            ErrorKind::InvalidSpec,
            "linux.seccomp.syscalls[0].args[0].index 6: system call arguments are 0 to 5",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s.mounts.push(mount(
                    "/data",
                    "bind",
                    "/bundle/nonexistent-data",
                    &["rbind"],
                ));
                s
            },
            ErrorKind::InvalidSpec,
            "mounts[7] (bind on /data): bind source \"/bundle/nonexistent-data\" does not exist in the guest",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s.process.capabilities = Some(Capabilities {
                    bounding: 1 << 50,
                    ..runc_capabilities()
                });
                s
            },
            ErrorKind::InvalidSpec,
            "process.capabilities.bounding: unknown capability number 50",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s.namespaces.retain(|ns| ns.kind != NamespaceKind::Uts);
                s
            },
            ErrorKind::InvalidSpec,
            "hostname is set but linux.namespaces has no \"uts\" namespace",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s.mounts[0].kind = Some("nosuchfs".into());
                s
            },
            ErrorKind::Io,
            "mounts[0] (nosuchfs on /proc): mount",
        ),
    ];
    for (spec, kind, text) in cases {
        let attached = [vm.attach(StreamKind::Stdout), vm.attach(StreamKind::Stderr)];
        let err = vm.create(spec, false, false).expect_err("create must fail");
        assert_eq!(err.kind, kind, "{err:?}");
        assert!(
            err.message.contains(text),
            "{:?} does not contain {text:?}",
            err.message
        );
        drop(attached);
    }
    // A program that is not there fails the start, naming it.
    let _streams = [vm.attach(StreamKind::Stdout), vm.attach(StreamKind::Stderr)];
    vm.create(spec(&["no-such-program"]), false, false)
        .expect("create");
    let err = vm
        .request(RequestBody::StartContainer)
        .expect_err("start must fail");
    assert!(
        err.message.contains("process.args[0] \"no-such-program\""),
        "{err:?}"
    );
    vm.shutdown();
}

/// A container whose init has written `/tmp/from-init` and sleeps; its stdout and stderr are
/// not read.
fn running_container(env: &[(&str, &str)]) -> (Vm, [UnixStream; 2]) {
    let mut vm = Vm::boot(env);
    let streams = [vm.attach(StreamKind::Stdout), vm.attach(StreamKind::Stderr)];
    vm.create(
        spec(&[
            "sh",
            "-c",
            "echo written by init > /tmp/from-init; exec sleep 100",
        ]),
        false,
        false,
    )
    .expect("create");
    vm.request(RequestBody::StartContainer).expect("start");
    vm.wait_for_process(&["sleep", "100"]);
    (vm, streams)
}

/// An exec's `process`: the spec's, running `args`.
fn exec_process(args: &[&str]) -> Process {
    spec(args).process
}

/// `EPERM`, what the host sends for an `SCMP_ACT_ERRNO` without `errnoRet`.
const EPERM: u32 = 1;

/// A user with its own group and nothing else.
fn user(id: u32) -> User {
    User {
        uid: id,
        gid: id,
        ..User::default()
    }
}

/// A user with another group, a supplementary group and a umask.
fn other_user() -> User {
    User {
        uid: 1000,
        gid: 1001,
        umask: Some(0o077),
        additional_gids: vec![1002],
    }
}

const ALL_PIPES: StdioSpec = StdioSpec::Pipes {
    stdin: false,
    stdout: true,
    stderr: true,
};

#[test]
fn exec_runs_in_the_init_s_namespaces_and_root() {
    if !can_run() {
        return;
    }
    let script = "echo pid=$$; hostname; cat /tmp/from-init; cat /proc/1/cmdline; echo; \
                  for ns in ipc uts net pid mnt cgroup; do \
                    [ \"$(readlink /proc/self/ns/$ns)\" = \"$(readlink /proc/1/ns/$ns)\" ] && echo same-$ns; \
                  done; \
                  grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; echo oops >&2; exit 7";
    let (mut vm, _init_streams) = running_container(&[]);
    let e1 = ProcessRef::Exec("e1".into());
    let stdout = reader(vm.attach_to(&e1, StreamKind::Stdout));
    let stderr = reader(vm.attach_to(&e1, StreamKind::Stderr));
    let pid = vm
        .exec("e1", exec_process(&["sh", "-c", script]), ALL_PIPES)
        .expect("exec");
    assert_eq!(vm.exit_of(&e1), (pid, ExitStatus::Code(7)));
    assert_eq!(
        vm.request(RequestBody::Wait { process: e1 }),
        Ok(ResponseBody::Exited {
            status: ExitStatus::Code(7)
        })
    );
    let out = String::from_utf8(stdout.join().unwrap()).unwrap();
    let expected_caps = format!("{:016x}", (1u64 << 29) | (1 << 5) | (1 << 10));
    let lines: Vec<_> = out.lines().collect();
    assert!(lines[0].starts_with("pid=") && lines[0] != "pid=1", "{out}");
    assert_eq!(
        lines[1..],
        [
            "runc",
            "written by init",
            "sleep\x00100\x00",
            "same-ipc",
            "same-uts",
            "same-net",
            "same-pid",
            "same-mnt",
            "same-cgroup",
            &format!("CapEff:\t{expected_caps}"),
            "NoNewPrivs:\t1",
        ]
    );
    assert_eq!(stderr.join().unwrap(), b"oops\n");
    // The init runs on.
    vm.wait_for_process(&["sleep", "100"]);
    vm.shutdown();
}

#[test]
fn exec_with_another_user_env_cwd_and_the_container_s_seccomp() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let _streams = [vm.attach(StreamKind::Stdout), vm.attach(StreamKind::Stderr)];
    vm.create(deny_mkdir(&["sleep", "100"], true, EPERM), false, false)
        .expect("create");
    vm.request(RequestBody::StartContainer).expect("start");
    vm.wait_for_process(&["sleep", "100"]);
    let mut process = exec_process(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; echo $FOO; pwd; umask; grep CapEff /proc/self/status; \
         mkdir /tmp/d 2>&1 || echo mkdir-denied",
    ]);
    process.user = other_user();
    process.env = strings(&["PATH=/bin", "FOO=from exec"]);
    process.cwd = "/tmp".into();
    process.capabilities = Some(Capabilities::default());
    let e1 = ProcessRef::Exec("e1".into());
    let stdout = reader(vm.attach_to(&e1, StreamKind::Stdout));
    let _stderr = vm.attach_to(&e1, StreamKind::Stderr);
    vm.exec("e1", process, ALL_PIPES).expect("exec");
    assert_eq!(vm.exit_of(&e1).1, ExitStatus::Code(0));
    let out = String::from_utf8(stdout.join().unwrap()).unwrap();
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(
        lines[..7],
        [
            "1000",
            "1001",
            "1001 1002",
            "from exec",
            "/tmp",
            "0077",
            "CapEff:\t0000000000000000"
        ],
        "{out}"
    );
    assert!(lines[7].contains("Operation not permitted"), "{out}");
    assert_eq!(lines[8], "mkdir-denied", "{out}");
    vm.shutdown();
}

#[test]
fn signals_reach_exec_processes() {
    if !can_run() {
        return;
    }
    let (mut vm, _streams) = running_container(&[]);
    let e1 = ProcessRef::Exec("e1".into());
    let pid = vm
        .exec("e1", exec_process(&["sleep", "50"]), StdioSpec::NULL)
        .expect("exec");
    vm.wait_for_process(&["sleep", "50"]);
    let signal = |vm: &mut Vm, process: &ProcessRef, all: bool| {
        vm.request(RequestBody::Signal {
            process: process.clone(),
            signal: 15,
            all,
        })
    };
    let err = signal(&mut vm, &e1, true).expect_err("all needs the init");
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err:?}");
    let err = signal(&mut vm, &ProcessRef::Exec("nope".into()), false).expect_err("unknown");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err:?}");
    assert_eq!(signal(&mut vm, &e1, false), Ok(ResponseBody::Ok));
    assert_eq!(vm.exit_of(&e1), (pid, ExitStatus::Signal(15)));
    let err = signal(&mut vm, &e1, false).expect_err("ended");
    assert_eq!(err.kind, ErrorKind::InvalidState, "{err:?}");
    // The init was not touched.
    vm.wait_for_process(&["sleep", "100"]);
    vm.shutdown();
}

#[test]
fn exec_processes_die_with_the_init_and_are_reported() {
    if !can_run() {
        return;
    }
    let (mut vm, _streams) = running_container(&[]);
    let e1 = ProcessRef::Exec("e1".into());
    let stdout = reader(vm.attach_to(&e1, StreamKind::Stdout));
    vm.exec(
        "e1",
        exec_process(&["sh", "-c", "echo up; exec sleep 60"]),
        StdioSpec::Pipes {
            stdin: false,
            stdout: true,
            stderr: false,
        },
    )
    .expect("exec");
    vm.wait_for_process(&["sleep", "60"]);
    // A wait for the exec asked before the end is answered at the end.
    let id = vm.next_id;
    vm.next_id += 1;
    write_frame(
        &mut vm.control,
        &HostMessage::Request(Request {
            id,
            body: RequestBody::Wait {
                process: e1.clone(),
            },
        }),
    )
    .expect("send wait");
    assert_eq!(
        vm.request(RequestBody::Signal {
            process: ProcessRef::Init,
            signal: 9,
            all: false
        }),
        Ok(ResponseBody::Ok)
    );
    // The kernel kills the rest of the PID namespace when its init ends.
    let mut waited = None;
    let mut exits = Vec::new();
    while waited.is_none() || exits.len() < 2 {
        match read_frame::<_, AgentMessage>(&mut vm.control)
            .expect("read before the deadline")
            .expect("agent closed the control connection")
        {
            AgentMessage::Response(r) if r.id == id => waited = Some(r.result),
            AgentMessage::Event(Event::Exited {
                process, status, ..
            }) => exits.push((process, status)),
            other => panic!("unexpected {other:?}"),
        }
    }
    exits.sort_by_key(|(p, _)| p.to_string());
    assert_eq!(
        exits,
        [
            (e1.clone(), ExitStatus::Signal(9)),
            (ProcessRef::Init, ExitStatus::Signal(9))
        ]
    );
    assert_eq!(
        waited,
        Some(Ok(ResponseBody::Exited {
            status: ExitStatus::Signal(9)
        }))
    );
    assert_eq!(stdout.join().unwrap(), b"up\n");
    let err = vm
        .exec("e2", exec_process(&["true"]), StdioSpec::NULL)
        .expect_err("no exec into an ended container");
    assert_eq!(err.kind, ErrorKind::InvalidState, "{err:?}");
    vm.shutdown();
}

#[test]
fn exec_is_refused_before_start_and_with_a_taken_id() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let refused = |vm: &mut Vm, id: &str| {
        vm.exec(id, exec_process(&["true"]), StdioSpec::NULL)
            .expect_err("exec must be refused")
    };
    assert_eq!(refused(&mut vm, "e1").kind, ErrorKind::InvalidState);
    let _streams = [vm.attach(StreamKind::Stdout), vm.attach(StreamKind::Stderr)];
    vm.create(spec(&["sleep", "100"]), false, false)
        .expect("create");
    let err = refused(&mut vm, "e1");
    assert_eq!(err.kind, ErrorKind::InvalidState);
    assert!(err.message.contains("not started"), "{err:?}");
    vm.request(RequestBody::StartContainer).expect("start");
    vm.wait_for_process(&["sleep", "100"]);

    // A process the exec cannot become names the field; nothing ran, so the id stays free.
    let mut bad = exec_process(&["true"]);
    bad.cwd = "/no/such/dir".into();
    let err = vm.exec("e1", bad, StdioSpec::NULL).expect_err("bad cwd");
    assert!(
        err.message.contains("process.cwd \"/no/such/dir\""),
        "{err:?}"
    );
    let err = vm
        .exec("e1", exec_process(&["no-such-program"]), StdioSpec::NULL)
        .expect_err("no program");
    assert!(
        err.message.contains("process.args[0] \"no-such-program\""),
        "{err:?}"
    );
    // stdio must agree with process.terminal, and its streams must be attached.
    let err = vm
        .exec(
            "e1",
            exec_process(&["true"]),
            StdioSpec::Terminal { rows: 1, cols: 1 },
        )
        .expect_err("terminal mismatch");
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err:?}");
    let err = vm
        .exec("e1", exec_process(&["true"]), ALL_PIPES)
        .expect_err("streams not attached");
    assert_eq!(err.kind, ErrorKind::InvalidState, "{err:?}");

    let e1 = ProcessRef::Exec("e1".into());
    let pid = vm
        .exec("e1", exec_process(&["true"]), StdioSpec::NULL)
        .expect("exec");
    assert_eq!(vm.exit_of(&e1), (pid, ExitStatus::Code(0)));
    let err = refused(&mut vm, "e1");
    assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err:?}");
    let err = vm
        .try_attach(&e1, StreamKind::Stdout)
        .expect_err("a stream for a taken id");
    assert!(err.to_string().contains("rejected"), "{err}");
    assert_eq!(
        vm.request(RequestBody::Wait { process: e1 }),
        Ok(ResponseBody::Exited {
            status: ExitStatus::Code(0)
        })
    );
    vm.shutdown();
}

/// Reads `conn` until what came so far contains `needle`; gives all of it.
fn read_until(conn: &mut UnixStream, seen: &mut Vec<u8>, needle: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(seen)
        );
        let n = conn.read(&mut buf).expect("read the terminal");
        assert!(
            n > 0,
            "terminal ended without {needle:?}: {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(seen).into_owned()
}

/// Reads `conn` to its end.
fn read_to_end(mut conn: UnixStream, seen: &mut Vec<u8>) -> String {
    conn.read_to_end(seen)
        .expect("read the terminal to its end");
    String::from_utf8_lossy(seen).into_owned()
}

/// Prints what the terminal is, waits for a line, and prints the size again.
const TERMINAL_SCRIPT: &str = "tty; test -t 0 && test -t 1 && test -t 2 && echo all-tty; \
     echo owner=$(stat -c %u $(tty)); echo size=$(stty size); read line; \
     echo got=$line size=$(stty size); exit 3";

/// Drives [`TERMINAL_SCRIPT`] on `conn` and checks what it printed.
fn check_terminal(vm: &mut Vm, process: &ProcessRef, mut conn: UnixStream, uid: u32) -> String {
    let mut seen = Vec::new();
    let out = read_until(&mut conn, &mut seen, "size=24 80\r\n");
    assert!(out.contains("all-tty\r\n"), "{out:?}");
    let tty = out.lines().next().expect("a tty line").trim_end();
    assert!(tty.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains(&format!("owner={uid}\r\n")), "{out:?}");
    assert_eq!(
        vm.request(RequestBody::ResizeTerminal {
            process: process.clone(),
            rows: 40,
            cols: 123
        }),
        Ok(ResponseBody::Ok)
    );
    conn.write_all(b"hello\n").expect("type a line");
    let out = read_until(&mut conn, &mut seen, "got=hello size=40 123\r\n");
    assert_eq!(vm.exit_of(process).1, ExitStatus::Code(3));
    // The stream ends once the process has ended and its output is read.
    let out = read_to_end(conn, &mut seen).split_off(out.len());
    assert_eq!(out, "", "output after the end");
    let err = vm
        .request(RequestBody::ResizeTerminal {
            process: process.clone(),
            rows: 1,
            cols: 1,
        })
        .expect_err("resize after the end");
    assert_eq!(err.kind, ErrorKind::InvalidState, "{err:?}");
    tty.to_owned()
}

#[test]
fn init_with_a_terminal() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let conn = vm.attach(StreamKind::Terminal);
    let mut s = spec(&["sh", "-c", TERMINAL_SCRIPT]);
    s.process.terminal = true;
    s.process.user = user(1000);
    vm.create_with(s, StdioSpec::Terminal { rows: 24, cols: 80 }, false)
        .expect("create");
    vm.request(RequestBody::StartContainer).expect("start");
    let tty = check_terminal(&mut vm, &ProcessRef::Init, conn, 1000);
    assert_eq!(tty, "/dev/pts/0");
    let err = vm
        .request(RequestBody::ResizeTerminal {
            process: ProcessRef::Exec("nope".into()),
            rows: 1,
            cols: 1,
        })
        .expect_err("no such process");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err:?}");
    vm.shutdown();
}

#[test]
fn terminal_must_match_process_terminal() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let conn = vm.attach(StreamKind::Terminal);
    let err = vm
        .create_with(
            spec(&["true"]),
            StdioSpec::Terminal { rows: 24, cols: 80 },
            false,
        )
        .expect_err("mismatch");
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err:?}");
    assert!(
        err.message
            .contains("stdio terminal does not match process.terminal false"),
        "{err:?}"
    );
    drop(conn);
    let _streams = [vm.attach(StreamKind::Stdout), vm.attach(StreamKind::Stderr)];
    let mut s = spec(&["true"]);
    s.process.terminal = true;
    let err = vm.create(s, false, false).expect_err("mismatch");
    assert!(
        err.message
            .contains("stdio pipes does not match process.terminal true"),
        "{err:?}"
    );
    vm.shutdown();
}

#[test]
fn exec_with_a_terminal() {
    if !can_run() {
        return;
    }
    let (mut vm, _streams) = running_container(&[]);
    let e1 = ProcessRef::Exec("e1".into());
    let conn = vm.attach_to(&e1, StreamKind::Terminal);
    let mut process = exec_process(&["sh", "-c", TERMINAL_SCRIPT]);
    process.terminal = true;
    process.user = user(1000);
    vm.exec("e1", process, StdioSpec::Terminal { rows: 24, cols: 80 })
        .expect("exec");
    let tty = check_terminal(&mut vm, &e1, conn, 1000);
    assert!(tty.starts_with("/dev/pts/"), "{tty}");
    // A second one, as root, gets another pty of the same devpts.
    let e2 = ProcessRef::Exec("e2".into());
    let conn = vm.attach_to(&e2, StreamKind::Terminal);
    let mut process = exec_process(&["sh", "-c", "tty; ls /dev/pts"]);
    process.terminal = true;
    vm.exec("e2", process, StdioSpec::Terminal { rows: 5, cols: 6 })
        .expect("exec");
    assert_eq!(vm.exit_of(&e2).1, ExitStatus::Code(0));
    let out = read_to_end(conn, &mut Vec::new());
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("ptmx"), "{out:?}");
    // A descendant that keeps the slave open (and ignores the hangup) does not hold the stream
    // open once the process has ended.
    let e3 = ProcessRef::Exec("e3".into());
    let conn = vm.attach_to(&e3, StreamKind::Terminal);
    let mut process = exec_process(&["sh", "-c", "trap '' HUP; sleep 60 & echo bye"]);
    process.terminal = true;
    vm.exec("e3", process, StdioSpec::Terminal { rows: 5, cols: 6 })
        .expect("exec");
    assert_eq!(vm.exit_of(&e3).1, ExitStatus::Code(0));
    assert_eq!(read_to_end(conn, &mut Vec::new()), "bye\r\n");
    vm.wait_for_process(&["sleep", "60"]);
    vm.shutdown();
}

/// The optional fields of the container's `/` in its `/proc/self/mountinfo` (`shared:N`,
/// `master:N`, `unbindable`; empty for a private mount), with the spec's `rootfsPropagation`.
fn root_propagation_tags(propagation: Propagation) -> String {
    let mut spec = spec(&[
        "awk",
        "$5 == \"/\" { tags = \"\"; for (i = 7; $i != \"-\"; i++) tags = tags $i \" \"; print \"root:\" tags }",
        "/proc/self/mountinfo",
    ]);
    spec.rootfs_propagation = propagation;
    let out = run_with(spec, None, false, &[]);
    assert_eq!(out.status, ExitStatus::Code(0), "{propagation:?}: {out:?}");
    let stdout = out.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{propagation:?}: one mount on /: {stdout:?}"
    );
    lines[0].trim_start_matches("root:").trim().to_owned()
}

/// `linux.rootfsPropagation`, in the spec's words: `shared`, "the rootfs mount belongs to a new
/// peer group"; `unbindable`, "a private mount that cannot be bind-mounted"; `private`, no
/// propagation. `slave` receives from the host's mounts, and in a VM none reach the guest: the
/// root has no master and stays private. `shared` made `create` fail (`pivot_root` refuses a
/// shared mount), and the others were set before the rootfs was mounted, so it carried none.
#[test]
fn the_root_mount_takes_the_spec_s_rootfs_propagation() {
    if !can_run() {
        return;
    }
    let shared = root_propagation_tags(Propagation::Shared);
    assert!(
        shared.starts_with("shared:") && !shared.contains(' '),
        "shared: {shared:?}"
    );
    assert_eq!(root_propagation_tags(Propagation::Unbindable), "unbindable");
    assert_eq!(root_propagation_tags(Propagation::Private), "");
    assert_eq!(root_propagation_tags(Propagation::Slave), "");

    // A mount's own propagation option still wins over the root's.
    let mut spec = spec(&[
        "awk",
        "$5 == \"/dev/shm\" { print $7 }",
        "/proc/self/mountinfo",
    ]);
    spec.rootfs_propagation = Propagation::Shared;
    let shm = spec
        .mounts
        .iter_mut()
        .find(|m| m.destination == "/dev/shm")
        .expect("/dev/shm in the spec");
    shm.options.push("unbindable".into());
    let out = run_with(spec, None, false, &[]);
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    assert_eq!(out.stdout(), "unbindable\n", "{out:?}");
}

/// `process.oomScoreAdj` of the init, and of exec'd processes: their own if they give one,
/// the init's if they do not. It was ignored: 0 where the spec said 500.
#[test]
fn the_oom_score_adj_of_the_init_and_of_exec_processes() {
    if !can_run() {
        return;
    }
    let mut vm = Vm::boot(&[]);
    let init_out = reader(vm.attach(StreamKind::Stdout));
    let _init_err = reader(vm.attach(StreamKind::Stderr));
    let mut init = spec(&["sh", "-c", "cat /proc/self/oom_score_adj; exec sleep 100"]);
    init.process.oom_score_adj = Some(500);
    vm.create(init, false, false).expect("create");
    vm.request(RequestBody::StartContainer).expect("start");
    vm.wait_for_process(&["sleep", "100"]);
    // Raised, not lowered: lowering needs `CAP_SYS_RESOURCE`, which the host running these
    // tests may not give (the end-to-end test lowers it in a real guest).
    for (id, adj, want) in [("inherits", None, "500"), ("own", Some(700), "700")] {
        let exec = ProcessRef::Exec(id.into());
        let stdout = reader(vm.attach_to(&exec, StreamKind::Stdout));
        let _stderr = reader(vm.attach_to(&exec, StreamKind::Stderr));
        let mut process = exec_process(&["cat", "/proc/self/oom_score_adj"]);
        process.oom_score_adj = adj;
        let pid = vm.exec(id, process, ALL_PIPES).expect("exec");
        assert_eq!(vm.exit_of(&exec), (pid, ExitStatus::Code(0)));
        let out = String::from_utf8(stdout.join().unwrap()).unwrap();
        assert_eq!(out, format!("{want}\n"), "exec {id}");
    }
    vm.shutdown();
    assert_eq!(
        String::from_utf8(init_out.join().unwrap()).unwrap(),
        "500\n"
    );
}

/// A new network namespace's `lo` is up, as runc leaves it: a connection to a closed port of
/// `127.0.0.1` is refused, not "Network is unreachable".
#[test]
fn the_loopback_interface_of_a_new_network_namespace_is_up() {
    if !can_run() {
        return;
    }
    let out = run(&[
        "sh",
        "-c",
        "ip -o link show lo; nc 127.0.0.1 1 </dev/null; echo status $?",
    ]);
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    let stdout = out.stdout();
    assert!(stdout.contains("<LOOPBACK,UP,LOWER_UP>"), "{out:?}");
    assert!(stdout.ends_with("status 1\n"), "{out:?}");
    assert!(out.stderr().contains("Connection refused"), "{out:?}");
}

/// The agent with its rootfs shifted to ids from `outside`, as Podman shifts an image for
/// `--userns`: the container's mapped root owns its rootfs and can make its mount points.
fn boot_shifted(outside: u32) -> Vm {
    let vm = Vm::boot(&[]);
    let status = Command::new("chown")
        .args(["-R", "-h", &format!("{outside}:{outside}")])
        .arg(vm.dir.0.join("rootfs"))
        .status()
        .expect("chown");
    assert!(status.success());
    vm
}

/// `spec` with a user namespace mapping 65536 ids from 0 to `outside`.
fn in_user_namespace(mut spec: ContainerSpec, outside: u32) -> ContainerSpec {
    spec.namespaces.push(Namespace {
        kind: NamespaceKind::User,
        path: None,
    });
    let map = vec![IdMapping {
        container_id: 0,
        host_id: outside,
        size: 65536,
    }];
    spec.uid_mappings = map.clone();
    spec.gid_mappings = map;
    spec
}

/// `linux.namespaces` with a `user` namespace and `uidMappings`/`gidMappings`: the container's
/// root is the mapped id outside, with its capabilities only inside; the rest of the setup
/// (mounts of proc, sysfs, devpts, mqueue, cgroup; devices; the switch of root; the hostname)
/// happens inside it, as in runc. An exec'd process joins it first. They were refused.
#[test]
fn a_user_namespace_maps_the_container_s_ids() {
    if !can_run() {
        return;
    }
    const OUTSIDE: u32 = 100_000;
    let mut vm = boot_shifted(OUTSIDE);
    let rootfs = vm.dir.0.join("rootfs");
    let mut spec = spec(&[
        "sh",
        "-c",
        "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; hostname; \
         echo hi > /dev/null && echo dev-ok; touch /tmp/by-root && echo touched; \
         exec sleep 100",
    ]);
    spec = in_user_namespace(spec, OUTSIDE);
    // A read-only bind of a file of the guest's root, as Podman binds its `.containerenv`.
    std::fs::write(vm.dir.0.join("root/containerenv"), "engine=\"podman\"\n").unwrap();
    spec.mounts.push(mount(
        "/run/.containerenv",
        "bind",
        "/containerenv",
        &["bind", "rprivate", "ro"],
    ));
    let stdout = reader(vm.attach(StreamKind::Stdout));
    let stderr = reader(vm.attach(StreamKind::Stderr));
    vm.create(spec, false, false).expect("create");
    vm.request(RequestBody::StartContainer).expect("start");
    vm.wait_for_process(&["sleep", "100"]);

    let e1 = ProcessRef::Exec("e1".into());
    let exec_out = reader(vm.attach_to(&e1, StreamKind::Stdout));
    let _exec_err = reader(vm.attach_to(&e1, StreamKind::Stderr));
    let pid = vm
        .exec(
            "e1",
            exec_process(&[
                "sh",
                "-c",
                "id -u; readlink /proc/self/ns/user; readlink /proc/1/ns/user",
            ]),
            ALL_PIPES,
        )
        .expect("exec");
    assert_eq!(vm.exit_of(&e1), (pid, ExitStatus::Code(0)));
    let exec_out = String::from_utf8(exec_out.join().unwrap()).unwrap();
    let lines: Vec<&str> = exec_out.lines().collect();
    assert_eq!(lines[0], "0", "{exec_out}");
    assert_eq!(
        lines[1], lines[2],
        "the exec'd process is in the init's user namespace"
    );
    let made = std::fs::metadata(rootfs.join("tmp/by-root")).expect("the container's file");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (made.uid(), made.gid()),
        (OUTSIDE, OUTSIDE),
        "the container's root is {OUTSIDE} outside"
    );
    vm.shutdown();

    let out = String::from_utf8(stdout.join().unwrap()).unwrap();
    let err = String::from_utf8(stderr.join().unwrap()).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        words,
        ["0", "0", "0", "100000", "65536", "0", "100000", "65536", "runc", "dev-ok", "touched"],
        "{out}\n{err}"
    );
}

/// `domainname` (with a UTS namespace, like `hostname`) and `linux.personality`'s domain, which
/// the container's init runs under. Both were ignored.
#[test]
fn the_domainname_and_the_personality_of_the_init() {
    if !can_run() {
        return;
    }
    let mut spec = spec(&[
        "sh",
        "-c",
        "hostname; cat /proc/sys/kernel/domainname; busybox uname -m",
    ]);
    spec.domainname = Some("example.org".into());
    spec.personality = Some(hull_protocol::spec::Personality::Linux32);
    let out = run_with(spec, None, false, &[]);
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    assert_eq!(out.stdout(), "runc\nexample.org\ni686\n", "{out:?}");
}

/// A user namespace may mount sysfs only with a network namespace it owns and cgroup2 only
/// with a cgroup namespace it owns (Podman's `--uidmap` shares the host's cgroup namespace on
/// some hosts): without them the guest's are bound, read-only as the spec's options say, as
/// runc does.
#[test]
fn a_user_namespace_sharing_the_network_and_cgroup_namespaces_gets_them_bound() {
    if !can_run() {
        return;
    }
    let mut vm = boot_shifted(200_000);
    let mut spec = spec(&[
        "sh",
        "-c",
        "ls /sys/class >/dev/null && echo sys; ls /sys/fs/cgroup >/dev/null && echo cgroup; \
         touch /sys/fs/cgroup/x 2>/dev/null || echo read-only",
    ]);
    spec.namespaces
        .retain(|ns| !matches!(ns.kind, NamespaceKind::Network | NamespaceKind::Cgroup));
    let out = run_on(&mut vm, in_user_namespace(spec, 200_000), None, false);
    vm.shutdown();
    assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
    assert_eq!(out.stdout(), "sys\ncgroup\nread-only\n", "{out:?}");
}
