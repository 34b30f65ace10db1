//! OCI hooks (config.md, "POSIX-platform Hooks"), run on the host.
//!
//! A hook is a program run with its `args` (the first is its `argv[0]`, as with `execv`), its
//! `env` and nothing else, and the container's state JSON on standard input. Its output is
//! captured; a hook that cannot be started, exits non-zero, is killed, or outlives its `timeout`
//! is an error naming `hooks.<kind>[<index>]`, its path, what happened and the end of what it
//! wrote. Hooks of one kind run in order and the first failure stops them, as in runc.
//!
//! Each hook runs in a process group of its own, so that a timeout kills (SIGKILL) everything
//! it started in that group, not only its first process: nothing is then left holding its
//! output pipes. The wait itself is one channel that the output readers and a `waitid` thread
//! feed, so there is one deadline and no polling.
//!
//! All kinds run on the host, including `createContainer` and `startContainer`, which the spec
//! runs in the container's namespaces: with hull those namespaces are inside the VM.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use serde_json::Value;

/// How much of a hook's stdout and of its stderr is kept (the end of it).
const OUTPUT_TAIL_BYTES: usize = 4096;
/// After a hook has ended, how long processes it left behind may keep its output open.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// One entry of `hooks.<kind>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Absolute path of the program.
    pub path: PathBuf,
    /// Its arguments, `argv[0]` first; empty means `argv[0]` is `path`.
    pub args: Vec<String>,
    /// Its whole environment, `NAME=value` each.
    pub env: Vec<String>,
    /// How long it may run before it is killed.
    pub timeout: Option<Duration>,
}

/// The spec's `hooks`, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub prestart: Vec<Hook>,
    pub create_runtime: Vec<Hook>,
    pub create_container: Vec<Hook>,
    pub start_container: Vec<Hook>,
    pub poststart: Vec<Hook>,
    pub poststop: Vec<Hook>,
}

/// Errors in the `hooks` of a `config.json`: the file, the field and the value.
pub type HookError = crate::spec::SpecError;

/// Reads `hooks` of `spec`, the contents of `config_path` (named in errors).
pub fn parse_hooks(spec: &Value, config_path: &Path) -> Result<Hooks, HookError> {
    let parser = Parser { path: config_path };
    let hooks = match spec.get("hooks") {
        None | Some(Value::Null) => return Ok(Hooks::default()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(parser.invalid("hooks".into(), other, "must be an object")),
    };
    let list = |kind: &str| -> Result<Vec<Hook>, HookError> {
        let field = format!("hooks.{kind}");
        match hooks.get(kind) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(entries)) => entries
                .iter()
                .enumerate()
                .map(|(i, entry)| parser.hook(&format!("{field}[{i}]"), entry))
                .collect(),
            Some(other) => Err(parser.invalid(field, other, "must be an array of hooks")),
        }
    };
    Ok(Hooks {
        prestart: list("prestart")?,
        create_runtime: list("createRuntime")?,
        create_container: list("createContainer")?,
        start_container: list("startContainer")?,
        poststart: list("poststart")?,
        poststop: list("poststop")?,
    })
}

/// Builds errors that name the config file.
struct Parser<'a> {
    path: &'a Path,
}

impl Parser<'_> {
    fn invalid(&self, field: String, value: &Value, reason: &'static str) -> HookError {
        HookError::invalid(self.path, field, value, reason)
    }

    fn strings(&self, field: String, value: Option<&Value>) -> Result<Vec<String>, HookError> {
        match value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => Ok(items
                .iter()
                .map(|s| s.as_str().expect("checked").to_owned())
                .collect()),
            Some(other) => Err(self.invalid(field, other, "must be an array of strings")),
        }
    }

    fn hook(&self, field: &str, entry: &Value) -> Result<Hook, HookError> {
        if !entry.is_object() {
            return Err(self.invalid(field.to_owned(), entry, "must be an object"));
        }
        let path = match entry.get("path") {
            None | Some(Value::Null) => {
                return Err(HookError::missing(self.path, format!("{field}.path")))
            }
            Some(Value::String(p)) if p.starts_with('/') => PathBuf::from(p),
            Some(other) => {
                return Err(self.invalid(
                    format!("{field}.path"),
                    other,
                    "must be an absolute path",
                ))
            }
        };
        let args = self.strings(format!("{field}.args"), entry.get("args"))?;
        let env = self.strings(format!("{field}.env"), entry.get("env"))?;
        for (i, var) in env.iter().enumerate() {
            if !matches!(var.split_once('='), Some((name, _)) if !name.is_empty()) {
                return Err(self.invalid(
                    format!("{field}.env[{i}]"),
                    &Value::String(var.clone()),
                    "must be NAME=VALUE",
                ));
            }
        }
        let timeout = match entry.get("timeout") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_i64() {
                Some(secs) if secs > 0 => Some(Duration::from_secs(secs as u64)),
                Some(_) => {
                    return Err(self.invalid(
                        format!("{field}.timeout"),
                        value,
                        "must be greater than zero",
                    ))
                }
                None => {
                    return Err(self.invalid(
                        format!("{field}.timeout"),
                        value,
                        "must be an integer number of seconds",
                    ))
                }
            },
        };
        Ok(Hook {
            path,
            args,
            env,
            timeout,
        })
    }
}

/// Runs `hooks` (of kind `kind`, e.g. "prestart") in order with `state_json` on their stdin;
/// stops at the first that fails, as the spec asks of `prestart`, `createRuntime`,
/// `createContainer` and `startContainer` hooks.
pub fn run_hooks(kind: &str, hooks: &[Hook], state_json: &[u8]) -> anyhow::Result<()> {
    for (i, hook) in hooks.iter().enumerate() {
        run_hook(kind, i, hook, state_json)?;
    }
    Ok(())
}

/// Runs every one of `hooks` in order, whatever the ones before did, and logs a warning for
/// each that fails, as the spec asks of `poststart` and `poststop` hooks. Gives the failures'
/// messages, in order.
pub fn run_hooks_warning(kind: &str, hooks: &[Hook], state_json: &[u8]) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, hook) in hooks.iter().enumerate() {
        if let Err(err) = run_hook(kind, i, hook, state_json) {
            log::warn!("{err:#}");
            failures.push(format!("{err:#}"));
        }
    }
    failures
}

fn run_hook(kind: &str, i: usize, hook: &Hook, state_json: &[u8]) -> anyhow::Result<()> {
    let name = format!("hooks.{kind}[{i}] ({})", hook.path.display());
    let started = Instant::now();
    let outcome = run_one(hook, state_json).map_err(|err| anyhow!("{name}: {err}"))?;
    let output = outcome.output_summary();
    match outcome.failure() {
        None => {
            log::debug!(
                "{name} succeeded in {} ms{output}",
                started.elapsed().as_millis()
            );
            Ok(())
        }
        Some(failure) => Err(anyhow!("{name} failed: {failure}{output}")),
    }
}

/// How a hook ended and the end of its output.
#[derive(Debug)]
struct Outcome {
    status: std::process::ExitStatus,
    timed_out: Option<Duration>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Outcome {
    fn failure(&self) -> Option<String> {
        if let Some(timeout) = self.timed_out {
            return Some(format!(
                "did not finish within its timeout of {} s and was killed",
                timeout.as_secs()
            ));
        }
        if let Some(code) = self.status.code() {
            return (code != 0).then(|| format!("exit status {code}"));
        }
        let signal = self.status.signal().unwrap_or(0);
        let name = Signal::try_from(signal)
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        Some(format!("killed by signal {signal}{name}"))
    }

    /// `; stderr: ...; stdout: ...` for the streams that are not empty.
    fn output_summary(&self) -> String {
        let mut out = String::new();
        for (label, bytes) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim();
            if !text.is_empty() {
                out.push_str(&format!("; {label}: {text}"));
            }
        }
        out
    }
}

/// What the threads watching a hook report.
enum Event {
    Output(Stream, Vec<u8>),
    Closed,
    Exited,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Keeps the last [`OUTPUT_TAIL_BYTES`] of `more`, after `tail`.
fn keep_tail(tail: &mut Vec<u8>, more: &[u8]) {
    tail.extend_from_slice(more);
    if tail.len() > OUTPUT_TAIL_BYTES {
        tail.drain(..tail.len() - OUTPUT_TAIL_BYTES);
    }
}

fn read_into(mut pipe: impl Read, stream: Stream, tx: mpsc::Sender<Event>) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tx.send(Event::Output(stream, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = tx.send(Event::Closed);
}

/// Starts `hook` and waits for it; `Err` only if it could not be started.
fn run_one(hook: &Hook, state_json: &[u8]) -> Result<Outcome, String> {
    let mut command = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        command.arg0(argv0).args(rest);
    }
    command.env_clear();
    for var in &hook.env {
        if let Some((name, value)) = var.split_once('=') {
            command.env(name, value);
        }
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start it: {err}"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("Linux pids fit in an i32"));

    // A hook need not read its stdin; when it ends without reading, the write fails (EPIPE)
    // and that is fine.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let state = state_json.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&state);
    });
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let out_tx = tx.clone();
    std::thread::spawn(move || read_into(stdout, Stream::Stdout, out_tx));
    let err_tx = tx.clone();
    std::thread::spawn(move || read_into(stderr, Stream::Stderr, err_tx));
    // WNOWAIT leaves the hook a zombie: its pid, and so its process group, cannot be reused
    // before `child.wait()` reaps it below, so the SIGKILLs cannot reach anyone else.
    std::thread::spawn(move || {
        while let Err(Errno::EINTR) =
            waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
        {}
        let _ = tx.send(Event::Exited);
    });

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut open_streams = 2;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = None;
    let deadline = hook.timeout.map(|t| Instant::now() + t);
    while exited_at.is_none() || open_streams > 0 {
        let until = match exited_at {
            Some(at) => Some(at + OUTPUT_GRACE),
            None if timed_out.is_some() => None,
            None => deadline,
        };
        let event = match until {
            Some(until) => rx.recv_timeout(until.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(Event::Output(Stream::Stdout, bytes)) => keep_tail(&mut stdout, &bytes),
            Ok(Event::Output(Stream::Stderr, bytes)) => keep_tail(&mut stderr, &bytes),
            Ok(Event::Closed) => open_streams -= 1,
            Ok(Event::Exited) => exited_at = Some(Instant::now()),
            Err(RecvTimeoutError::Timeout) if exited_at.is_none() => {
                timed_out = hook.timeout;
                // The group, and the hook itself in case it moved to another group.
                for result in [killpg(pid, Signal::SIGKILL), kill(pid, Signal::SIGKILL)] {
                    match result {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(err) => log::warn!("cannot kill hook {}: {err}", hook.path.display()),
                    }
                }
            }
            // Left-behind processes still hold the output: go on without the rest of it.
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child
        .wait()
        .map_err(|err| format!("cannot wait for it: {err}"))?;
    Ok(Outcome {
        status,
        timed_out,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A temporary directory for hook scripts, removed on drop.
    struct TempDir(crate::testutil::TempDir);

    impl TempDir {
        fn new() -> Self {
            Self(crate::testutil::TempDir::new("hooks"))
        }

        /// An executable shell script `name` with `body`.
        /// Written by a child `sh`, never through a descriptor of this process: a test on
        /// another thread that forks while we hold the file open for writing would keep it
        /// open in its child, and executing the script would fail with ETXTBSY.
        fn script(&self, name: &str, body: &str) -> PathBuf {
            use std::io::Write;
            let path = self.0.join(name);
            let mut writer = std::process::Command::new("/bin/sh")
                .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
                .arg(&path)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = writer.stdin.take().unwrap();
            stdin
                .write_all(format!("#!/bin/sh\n{body}\n").as_bytes())
                .unwrap();
            drop(stdin);
            assert!(writer.wait().unwrap().success());
            path
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    fn hook(path: &Path, args: &[&str]) -> Hook {
        Hook {
            path: path.to_owned(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
            timeout: None,
        }
    }

    fn arg(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    #[test]
    fn parses_every_kind_in_order() {
        let spec = json!({
            "hooks": {
                "prestart": [{"path": "/bin/a"}, {"path": "/bin/b", "args": ["b", "-x"]}],
                "createRuntime": [{"path": "/c", "env": ["A=1", "B="], "timeout": 5}],
                "createContainer": [{"path": "/d"}],
                "startContainer": [{"path": "/e"}],
                "poststart": [{"path": "/f"}],
                "poststop": [{"path": "/g"}],
                "someFutureKind": [{"path": "relative is fine here: ignored"}]
            }
        });
        let hooks = parse_hooks(&spec, Path::new("/b/config.json")).unwrap();
        assert_eq!(hooks.prestart.len(), 2);
        assert_eq!(hooks.prestart[1].path, PathBuf::from("/bin/b"));
        assert_eq!(hooks.prestart[1].args, ["b", "-x"]);
        assert_eq!(
            hooks.create_runtime[0],
            Hook {
                path: "/c".into(),
                args: vec![],
                env: vec!["A=1".into(), "B=".into()],
                timeout: Some(Duration::from_secs(5)),
            }
        );
        assert_eq!(hooks.create_container[0].path, PathBuf::from("/d"));
        assert_eq!(hooks.start_container[0].path, PathBuf::from("/e"));
        assert_eq!(hooks.poststart[0].path, PathBuf::from("/f"));
        assert_eq!(hooks.poststop[0].path, PathBuf::from("/g"));
        assert_eq!(
            parse_hooks(&json!({}), Path::new("/c")).unwrap(),
            Hooks::default()
        );
        assert_eq!(
            parse_hooks(&json!({"hooks": null}), Path::new("/c")).unwrap(),
            Hooks::default()
        );
    }

    #[test]
    fn bad_hooks_name_file_field_and_value() {
        let check = |hooks: Value, want: &str| {
            let err = parse_hooks(&json!({ "hooks": hooks }), Path::new("/b/config.json"))
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("/b/config.json: {want}"));
        };
        check(json!([]), "field `hooks` = []: must be an object");
        check(
            json!({"prestart": {"path": "/x"}}),
            "field `hooks.prestart` = {\"path\":\"/x\"}: must be an array of hooks",
        );
        check(
            json!({"prestart": [{"path": "/a"}, {"path": "hook.sh"}]}),
            "field `hooks.prestart[1].path` = \"hook.sh\": must be an absolute path",
        );
        check(
            json!({"poststop": [{"args": ["x"]}]}),
            "field `hooks.poststop[0].path` is missing",
        );
        check(
            json!({"poststart": ["/bin/true"]}),
            "field `hooks.poststart[0]` = \"/bin/true\": must be an object",
        );
        check(
            json!({"createRuntime": [{"path": "/a", "args": "a b"}]}),
            "field `hooks.createRuntime[0].args` = \"a b\": must be an array of strings",
        );
        check(
            json!({"createRuntime": [{"path": "/a", "env": ["A=1", "NOVALUE"]}]}),
            "field `hooks.createRuntime[0].env[1]` = \"NOVALUE\": must be NAME=VALUE",
        );
        check(
            json!({"startContainer": [{"path": "/a", "timeout": 0}]}),
            "field `hooks.startContainer[0].timeout` = 0: must be greater than zero",
        );
        check(
            json!({"startContainer": [{"path": "/a", "timeout": 1.5}]}),
            "field `hooks.startContainer[0].timeout` = 1.5: must be an integer number of seconds",
        );
    }

    #[test]
    fn state_reaches_the_hook_on_stdin() {
        let dir = TempDir::new();
        let script = dir.script("h", "/bin/cat > \"$1\"");
        let out = dir.path("state");
        let state =
            br#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":0,"bundle":"/b"}"#;
        run_hooks("prestart", &[hook(&script, &["h", arg(&out)])], state).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), state);

        // A large state and a hook that does not read it at all.
        let quiet = dir.script("q", "exit 0");
        run_hooks("prestart", &[hook(&quiet, &[])], &vec![b' '; 1 << 20]).unwrap();
    }

    #[test]
    fn environment_is_exactly_the_given_one() {
        let dir = TempDir::new();
        // The shell's own initial environment, as the kernel gave it.
        let script = dir.script("h", "/bin/cat /proc/$$/environ > \"$1\"");
        let out = dir.path("env");
        let mut h = hook(&script, &["h", arg(&out)]);
        h.env = vec!["A=1".into(), "B=two words".into(), "C=x=y".into()];
        run_hooks("poststart", &[h.clone()], b"{}").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"A=1\0B=two words\0C=x=y\0");

        h.env.clear();
        run_hooks("poststart", &[h], b"{}").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"");
    }

    #[test]
    fn argv0_is_the_first_arg_or_the_path() {
        let dir = TempDir::new();
        let out = dir.path("cmdline");
        let sh = Path::new("/bin/sh");
        let cmd = "/bin/cat /proc/$$/cmdline > \"$1\"";
        run_hooks(
            "createRuntime",
            &[hook(sh, &["hull-argv0", "-c", cmd, "sh", arg(&out)])],
            b"{}",
        )
        .unwrap();
        let cmdline = std::fs::read(&out).unwrap();
        assert!(cmdline.starts_with(b"hull-argv0\0-c\0"), "{cmdline:?}");

        // No args: argv[0] is the path and there are no arguments.
        let script = dir.script("h", &format!("/bin/cat /proc/$$/cmdline > {}", arg(&out)));
        run_hooks("createRuntime", &[hook(&script, &[])], b"{}").unwrap();
        let cmdline = std::fs::read(&out).unwrap();
        // The kernel runs a script as `interpreter script-path`.
        assert_eq!(cmdline, format!("/bin/sh\0{}\0", arg(&script)).as_bytes());
    }

    #[test]
    fn a_failing_hook_is_named_and_stops_the_rest() {
        let dir = TempDir::new();
        let ok = dir.script("ok", "exit 0");
        let bad = dir.script(
            "bad",
            "echo progress; echo 'no network for you' >&2; exit 3",
        );
        let marker = dir.path("ran");
        let after = dir.script("after", &format!("/bin/touch {}", arg(&marker)));
        let err = run_hooks(
            "prestart",
            &[hook(&ok, &[]), hook(&bad, &[]), hook(&after, &[])],
            b"{}",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            format!(
                "hooks.prestart[1] ({}) failed: exit status 3; stderr: no network for you; \
                 stdout: progress",
                bad.display()
            )
        );
        assert!(!marker.exists());

        let killed = dir.script("killed", "kill -TERM $$");
        let err = run_hooks("prestart", &[hook(&killed, &[])], b"{}")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("failed: killed by signal 15 (SIGTERM)"),
            "{err}"
        );
    }

    #[test]
    fn a_failing_poststart_or_poststop_hook_is_a_warning_and_the_rest_run() {
        let dir = TempDir::new();
        let bad = dir.script("bad", "echo 'no network for you' >&2; exit 3");
        let missing = dir.path("missing");
        for kind in ["poststart", "poststop"] {
            let marker = dir.path(&format!("ran-{kind}"));
            let after = dir.script("after", &format!("/bin/touch {}", arg(&marker)));
            let failures = run_hooks_warning(
                kind,
                &[hook(&bad, &[]), hook(&missing, &[]), hook(&after, &[])],
                b"{}",
            );
            assert!(
                marker.exists(),
                "{kind}: the hook after the failures did not run"
            );
            assert_eq!(failures.len(), 2, "{failures:?}");
            assert_eq!(
                failures[0],
                format!(
                    "hooks.{kind}[0] ({}) failed: exit status 3; stderr: no network for you",
                    bad.display()
                )
            );
            assert!(
                failures[1].starts_with(&format!(
                    "hooks.{kind}[1] ({}): cannot start it",
                    missing.display()
                )),
                "{failures:?}"
            );
        }
    }

    #[test]
    fn a_hook_that_cannot_start_is_named() {
        let dir = TempDir::new();
        let missing = dir.path("missing");
        let err = run_hooks("createContainer", &[hook(&missing, &[])], b"{}")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "hooks.createContainer[0] ({}): cannot start it: No such file or directory \
                 (os error 2)",
                missing.display()
            )
        );
    }

    #[test]
    fn timeout_kills_the_hook_and_what_it_started() {
        let dir = TempDir::new();
        let pid_file = dir.path("sleeper");
        let script = dir.script(
            "slow",
            &format!(
                "echo started >&2\n/bin/sleep 60 &\necho $! > {}\nwait",
                arg(&pid_file)
            ),
        );
        let mut h = hook(&script, &[]);
        h.timeout = Some(Duration::from_secs(1));
        let started = Instant::now();
        let err = run_hooks("startContainer", &[h], b"{}")
            .unwrap_err()
            .to_string();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
        assert_eq!(
            err,
            format!(
                "hooks.startContainer[0] ({}) failed: did not finish within its timeout of 1 s \
                 and was killed; stderr: started",
                script.display()
            )
        );
        // The background sleep was in the hook's process group: it is gone too (reaped by
        // whoever inherited it, so wait for that with a deadline).
        let sleeper = std::fs::read_to_string(&pid_file).unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", sleeper.trim()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
            // Gone, or a zombie waiting for its new parent.
            let alive = state
                .rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z') && !rest.is_empty());
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "sleep survived: {state}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
