//! `hull exec`: another process in a running container. Its stdio streams go straight to the
//! agent through the VMM's vsock socket; the request and the wait for its end go through
//! hull-vmm's control socket. `hull exec` relays and exits with the process's status. With
//! `--detach` a copy of `hull exec` does that in the background, and its pid (the pid file's)
//! stands for the process on the host, as hull-vmm stands for the init: it exits with the
//! process's status, and the signals it receives are forwarded to the process.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as ProcStdio};
use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hull_contract::console;
use hull_contract::relay::relay;
use hull_contract::CreateReport;
use hull_protocol::spec::Process;
use hull_protocol::{
    attach_stream, hybrid, Exec, ProcessRef, RequestBody, ResponseBody, Stdio, StreamKind,
    STDIO_PORT,
};
use serde_json::Value;

use super::create::read_report;
use crate::container::{write_atomic, Container, Status};
use crate::forward::{Forwarder, Target};
use crate::spec::oci::{self, Origin};
use crate::spec::SpecError;

/// For a stream connection and the exec request to be answered.
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
/// After the process's exit, for its output to drain.
const OUTPUT_GRACE: Duration = Duration::from_secs(10);

/// What `hull exec` is asked.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ExecArgs {
    /// The process as an OCI `process` JSON file.
    #[arg(long = "process", short = 'p', value_name = "PROCESS")]
    pub process_file: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Environment variables to add (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// uid[:gid] in the container.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(long = "additional-gids", short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privileges.
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    /// Return once started.
    #[arg(long, short = 'd')]
    pub detach: bool,
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// Internal: the background copy of `exec --detach` reports "started" on this descriptor.
    #[arg(long = "sync-fd", hide = true)]
    pub sync_fd: Option<RawFd>,
    pub id: String,
    /// The command and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub args: Vec<String>,
}

impl ExecArgs {
    pub fn run(&self, global: &super::Global) -> anyhow::Result<i32> {
        exec(self, &global.root)
    }
}

/// The OCI `Process` to run: `--process FILE` as it is, or the container's own process with
/// the command line's arguments, environment, directory, user and terminal (as runc does).
pub fn build_process(opts: &ExecArgs, container: &Container) -> anyhow::Result<Value> {
    if let Some(path) = &opts.process_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--process {}", path.display()))?;
        let process: Value = serde_json::from_str(&text)
            .with_context(|| format!("--process {}: malformed JSON", path.display()))?;
        let args = process.get("args").and_then(Value::as_array);
        if args.is_none_or(Vec::is_empty) {
            bail!(
                "--process {}: field `args` must name a program",
                path.display()
            );
        }
        return Ok(process);
    }
    if opts.args.is_empty() {
        bail!("exec needs a command (or --process FILE)");
    }
    let config = container.saved.bundle.join("config.json");
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(&config)
            .with_context(|| format!("cannot read {}", config.display()))?,
    )
    .with_context(|| format!("{}: malformed JSON", config.display()))?;
    let mut process = spec
        .get("process")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    process["args"] = serde_json::json!(opts.args);
    process["terminal"] = Value::Bool(opts.tty);
    if let Some(obj) = process.as_object_mut() {
        obj.remove("consoleSize");
    }
    if !opts.env.is_empty() {
        let mut env: Vec<Value> = process
            .get("env")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for var in &opts.env {
            let key = var.split('=').next().unwrap_or_default();
            env.retain(|e| e.as_str().and_then(|s| s.split('=').next()) != Some(key));
            env.push(Value::String(var.clone()));
        }
        process["env"] = Value::Array(env);
    }
    if let Some(cwd) = &opts.cwd {
        if !cwd.starts_with('/') {
            bail!("--cwd {cwd}: must be an absolute path");
        }
        process["cwd"] = Value::String(cwd.clone());
    }
    if let Some(user) = &opts.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let uid: u32 = uid
            .parse()
            .with_context(|| format!("--user {user}: the user must be a number (uid[:gid])"))?;
        process["user"]["uid"] = uid.into();
        match gid {
            Some(g) => {
                let gid: u32 = g
                    .parse()
                    .with_context(|| format!("--user {user}: the group must be a number"))?;
                process["user"]["gid"] = gid.into();
            }
            None => process["user"]["gid"] = 0.into(),
        }
    }
    if !opts.additional_gids.is_empty() {
        process["user"]["additionalGids"] = serde_json::json!(opts.additional_gids);
    }
    if opts.no_new_privs {
        process["noNewPrivileges"] = Value::Bool(true);
    }
    Ok(process)
}

/// Reads and checks the process as the spec's own is checked, naming `--process FILE`, or
/// `config.json`'s `process` when it comes from there (with the command line's changes).
fn check_process(
    opts: &ExecArgs,
    container: &Container,
    process: &Value,
) -> Result<Process, SpecError> {
    let config = container.saved.bundle.join("config.json");
    let origin = match &opts.process_file {
        Some(file) => Origin { file, prefix: "" },
        None => Origin {
            file: &config,
            prefix: "process",
        },
    };
    oci::process(origin, &oci::read_process(origin, process)?)
}

/// `hull exec`: returns the status to exit with.
pub fn exec(opts: &ExecArgs, root: &Path) -> anyhow::Result<i32> {
    if opts.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: passing file descriptors into a micro-VM is not supported",
            opts.preserve_fds
        );
    }
    let container = Container::load(root, &opts.id)?;
    if container.status() != Status::Running {
        bail!(
            "cannot exec in container {}: it is {}",
            opts.id,
            container.status().as_str()
        );
    }
    let process = build_process(opts, &container)?;
    let checked = check_process(opts, &container, &process)?;
    let terminal = checked.terminal;
    if terminal && opts.detach && opts.console_socket.is_none() {
        bail!("exec --detach with a terminal needs --console-socket");
    }
    if opts.detach {
        return detach(opts, root, &process);
    }
    let mut sync = opts
        .sync_fd
        // SAFETY: the descriptor was handed to this process by its parent (`detach`) for this
        // use alone; nothing else in the process owns it.
        .map(|fd| unsafe { File::from_raw_fd(fd) });
    let result = run_foreground(opts, &container, checked, &mut sync);
    if let (Err(err), Some(sync)) = (&result, &mut sync) {
        report(sync, CreateReport::Failed(format!("{err:#}")));
    }
    result
}

fn report(sync: &mut File, report: CreateReport) {
    let mut line = serde_json::to_vec(&report).expect("a report serializes");
    line.push(b'\n');
    let _ = sync.write_all(&line);
}

fn run_foreground(
    opts: &ExecArgs,
    container: &Container,
    process: Process,
    sync: &mut Option<File>,
) -> anyhow::Result<i32> {
    let terminal = process.terminal;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let stdio = if terminal {
        let (rows, cols) = host_window_size().unwrap_or((24, 80));
        Stdio::Terminal { rows, cols }
    } else {
        Stdio::Pipes {
            stdin: true,
            stdout: true,
            stderr: true,
        }
    };
    let me = ProcessRef::Exec(exec_id.clone());
    let mut streams = Vec::new();
    for kind in stdio.streams() {
        let mut conn = hybrid::connect(&container.vsock(), STDIO_PORT, Some(REQUEST_DEADLINE))
            .with_context(|| format!("cannot open the {kind} stream"))?;
        conn.set_read_timeout(Some(REQUEST_DEADLINE))?;
        attach_stream(&mut conn, &me, kind)?;
        conn.set_read_timeout(None)?;
        streams.push((kind, conn));
    }
    let mut client = container.client()?;
    let started = client
        .request(
            RequestBody::Exec(Box::new(Exec {
                exec_id: exec_id.clone(),
                process,
                stdio,
                container_id: None,
            })),
            Some(REQUEST_DEADLINE),
        )
        .with_context(|| format!("cannot exec in container {}", opts.id))?;
    if let ResponseBody::Started { pid } = started {
        log::debug!("exec {exec_id}: pid {pid} in the guest");
    }

    // Signals to this process go to the guest process (a second connection: the first one
    // waits below).
    Forwarder::start()
        .context("cannot set up signal forwarding")?
        .set_target(Target::Process {
            control_socket: container.control_socket(),
            process: me.clone(),
        });

    let (done_tx, done) = channel();
    let outputs = relay_streams(streams, opts.console_socket.as_ref(), &done_tx)?;
    if let Some(sync) = sync {
        report(sync, CreateReport::Created);
    }
    *sync = None;

    let status = match client.request(RequestBody::Wait { process: me }, None)? {
        ResponseBody::Exited { status } => status,
        other => bail!("unexpected answer to wait: {other:?}"),
    };
    let end = Instant::now() + OUTPUT_GRACE;
    for _ in 0..outputs {
        if done
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .is_err()
        {
            log::warn!(
                "output still open {} s after the process exited",
                OUTPUT_GRACE.as_secs()
            );
            break;
        }
    }
    Ok(status.shell_status())
}

/// The window size of our own terminal, if standard input is one.
fn host_window_size() -> Option<(u16, u16)> {
    console::window_size(std::io::stdin().as_fd())
        .ok()
        .filter(|&(r, c)| r > 0 && c > 0)
}

fn relay_streams(
    streams: Vec<(StreamKind, UnixStream)>,
    console_socket: Option<&PathBuf>,
    done: &Sender<()>,
) -> anyhow::Result<usize> {
    // The `hull` CLI has no VM to end: a relay that panics is only logged.
    let mut outputs = 0;
    for (kind, stream) in streams {
        match kind {
            StreamKind::Stdin => relay("stdin", dup(std::io::stdin().as_fd())?, stream, None)?,
            StreamKind::Stdout => {
                relay(
                    "stdout",
                    stream,
                    dup(std::io::stdout().as_fd())?,
                    Some(done.clone()),
                )?;
                outputs += 1;
            }
            StreamKind::Stderr => {
                relay(
                    "stderr",
                    stream,
                    dup(std::io::stderr().as_fd())?,
                    Some(done.clone()),
                )?;
                outputs += 1;
            }
            StreamKind::Terminal => {
                let (input, output) = match console_socket {
                    Some(path) => {
                        let pty = console::HostPty::open(24, 80)?;
                        console::send_master(path, pty.master.as_fd())?;
                        (File::from(pty.slave.try_clone()?), File::from(pty.slave))
                    }
                    None => (
                        dup(std::io::stdin().as_fd())?,
                        dup(std::io::stdout().as_fd())?,
                    ),
                };
                relay("terminal input", input, stream.try_clone()?, None)?;
                relay("terminal output", stream, output, Some(done.clone()))?;
                outputs += 1;
            }
        }
    }
    Ok(outputs)
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// `--detach`: starts a background `hull exec` with the same process (written to a file in the
/// state directory) and our standard streams, waits until it has started the process, and
/// writes its pid to the pid file.
fn detach(opts: &ExecArgs, root: &Path, process: &Value) -> anyhow::Result<i32> {
    let container = Container::load(root, &opts.id)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let process_path = container
        .dir
        .join(format!("exec-{}-{nanos}.json", std::process::id()));
    std::fs::write(&process_path, serde_json::to_vec(process)?)
        .with_context(|| format!("cannot write {}", process_path.display()))?;
    let (sync_read, sync_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let exe = std::env::current_exe().context("cannot find the hull binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(root);
    if log::max_level() >= log::LevelFilter::Debug {
        cmd.arg("--debug");
    }
    cmd.arg("exec")
        .arg("--process")
        .arg(&process_path)
        .args(["--sync-fd", "3"]);
    if let Some(socket) = &opts.console_socket {
        cmd.arg("--console-socket").arg(socket);
    }
    cmd.arg(&opts.id)
        .stdin(ProcStdio::inherit())
        .stdout(ProcStdio::inherit())
        .stderr(ProcStdio::inherit());
    let fd = sync_write.as_raw_fd();
    // SAFETY: runs between fork and exec: only the async-signal-safe setsid and dup2 system
    // calls; `sync_write` stays open in the parent until after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot start the background hull exec")?;
    drop(sync_write);
    let report = read_report(sync_read);
    let _ = std::fs::remove_file(&process_path);
    match report {
        Some(CreateReport::Created) => {}
        Some(CreateReport::Failed(why) | CreateReport::BadSnapshot(why)) => {
            let _ = child.wait();
            bail!("{why}");
        }
        None => {
            let status = child.wait()?;
            bail!("the background hull exec ended ({status}) before the process started");
        }
    }
    if let Some(path) = &opts.pid_file {
        write_atomic(path, child.id().to_string().as_bytes())
            .with_context(|| format!("--pid-file {}", path.display()))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::Saved;

    fn container_with_spec(spec: Value) -> (Container, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "hull-exec-test-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        let container = Container {
            dir: dir.clone(),
            saved: Saved {
                id: "c".into(),
                pid: 1,
                pid_start: 0,
                bundle: dir.clone(),
                rootfs: dir.join("rootfs"),
                created: String::new(),
                started: true,
                annotations: Default::default(),
                hooks: Value::Null,
                cgroup: None,
                network: None,
                mirrored: Vec::new(),
                pod: false,
            },
        };
        (container, dir)
    }

    #[test]
    fn exec_process_starts_from_the_containers_and_applies_the_flags() {
        let spec = serde_json::json!({"process": {
            "args": ["sh"], "cwd": "/", "terminal": true, "consoleSize": {"height": 1, "width": 2},
            "env": ["PATH=/bin", "A=1"], "user": {"uid": 5, "gid": 5},
            "capabilities": {"bounding": ["CAP_KILL"]}
        }});
        let (container, dir) = container_with_spec(spec);
        let opts = ExecArgs {
            args: vec!["ls".into(), "-l".into()],
            env: vec!["A=2".into(), "B=3".into()],
            cwd: Some("/tmp".into()),
            user: Some("1000:100".into()),
            ..Default::default()
        };
        let p = build_process(&opts, &container).unwrap();
        assert_eq!(p["args"], serde_json::json!(["ls", "-l"]));
        assert_eq!(p["env"], serde_json::json!(["PATH=/bin", "A=2", "B=3"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["user"], serde_json::json!({"uid": 1000, "gid": 100}));
        assert_eq!(p["terminal"], false);
        assert!(p.get("consoleSize").is_none());
        assert_eq!(
            p["capabilities"]["bounding"],
            serde_json::json!(["CAP_KILL"])
        );

        let bad = ExecArgs {
            args: vec!["ls".into()],
            user: Some("root".into()),
            ..Default::default()
        };
        let err = build_process(&bad, &container).unwrap_err();
        assert!(err.to_string().contains("--user root"), "{err}");
        let none = ExecArgs::default();
        assert!(build_process(&none, &container).is_err());

        let file = dir.join("p.json");
        std::fs::write(&file, r#"{"args": []}"#).unwrap();
        let from_file = ExecArgs {
            process_file: Some(file.clone()),
            ..Default::default()
        };
        let err = build_process(&from_file, &container).unwrap_err();
        assert!(err.to_string().contains("field `args`"), "{err}");
        std::fs::write(&file, r#"{"args": ["id"], "cwd": "/"}"#).unwrap();
        assert_eq!(
            build_process(&from_file, &container).unwrap()["args"],
            serde_json::json!(["id"])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
