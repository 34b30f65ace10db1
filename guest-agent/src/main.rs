//! `hull-agent`: PID 1 of every hull micro-VM.
//!
//! The kernel starts it as `/init` from the initramfs (see `mkinitramfs.py`). It mounts the early
//! file systems, prints one readiness line for the host, then reaps children and, with
//! `hull.serve`, serves the host protocol over vsock: it sets up and runs the container
//! (`server/`, `container/`). For tests and diagnostics, the host can have it run one shell
//! command instead, given at boot (`hull.exec` on the kernel command line, see
//! `boot_command.rs`; unrelated to `hull exec`). As PID 1 it never exits: every way out, including errors and panics, goes through `power::power_off`, which
//! syncs and resets the VM (the VMM's clean end).
//!
//! Started by anything but the guest kernel it refuses to act (exit status 2), except in the test
//! mode `mode.rs` describes, in a throwaway PID and mount namespace on a host.

// Only `sys.rs` may use `unsafe` (it says `#![allow(unsafe_code)]`).
#![deny(unsafe_code)]

mod boot_command;
mod cmdline;
mod console;
mod container;
mod init;
mod listener;
mod mode;
mod network;
mod power;
mod ready;
mod reaper;
mod relay;
mod seed;
mod server;
mod signals;
mod switch_root;
mod sys;

use std::error::Error;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::boot_command::{BootCommand, BootCommandState};
use crate::cmdline::{Cmdline, BOOT_COMMAND_PARAM, POWEROFF_PARAM, SERVE_PARAM};
use crate::container::{Zygote, ZygotePaths};
use crate::listener::Listener;
use crate::mode::{Facts, Mode, TestConfig};
use crate::ready::Ready;
use crate::server::{Paths, Server};
use crate::signals::{Action, Signals};

const USAGE: &str = "\
usage: hull-agent [--version | --help]

hull-agent is PID 1 of a hull micro-VM and runs only there: the guest kernel starts it as /init
from the initramfs. Anywhere else it refuses to act and exits with status 2. The host tests run
it as PID 1 of a throwaway PID and mount namespace with HULL_AGENT_TEST_ROOT and
HULL_AGENT_TEST_PARENT_PIDNS set (see docs/agent.md).";

fn main() {
    let facts = Facts::of_this_process();
    if facts.pid != 1 {
        // Not init: a plain command line tool that only answers --version and --help.
        match std::env::args().nth(1).as_deref() {
            Some("--version" | "-V") => {
                println!("hull-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0)
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            _ => {}
        }
    }
    // As PID 1 the kernel may pass unknown boot parameters as arguments: they are ignored.
    match mode::decide(&facts) {
        Ok(mode) => run(mode),
        Err(err) => {
            eprintln!("hull-agent: refusing to act as init: {err}\n\n{USAGE}");
            std::process::exit(2)
        }
    }
}

/// Runs as init. Never returns.
fn run(mode: Mode) -> ! {
    power::set_target(mode.power_target());
    std::panic::set_hook(Box::new(|info| power::fatal(&format!("panic: {info}"))));
    if matches!(mode, Mode::Guest) && !switch_root::switched(std::env::args_os()) {
        // The kernel started us as `/init` of the initramfs: go on from a real mount.
        let program = std::env::args_os()
            .next()
            .and_then(|arg| std::ffi::CString::new(arg.into_encoded_bytes()).ok())
            .unwrap_or_else(|| c"/init".to_owned());
        power::fatal(&error_chain(&switch_root::leave_initramfs(&program)));
    }

    let mut signals = Signals::block().unwrap_or_else(|e| power::fatal(&error_chain(&e)));
    if let Err(e) = prepare(&mode) {
        power::fatal(&e);
    }
    // Children that ended before SIGCHLD was blocked sent their signal for nothing.
    log_reaped(&mode, reaper::reap_all());

    let cmdline = match &mode {
        Mode::Test(TestConfig {
            cmdline: Some(text),
            ..
        }) => Cmdline::parse(text),
        _ => Cmdline::read(&mode.root().join("proc/cmdline"))
            .unwrap_or_else(|e| power::fatal(&error_chain(&e))),
    };
    // The container's init is made before the readiness line, so that a template's snapshot
    // holds it (container/zygote.rs), and before the listeners, so that it holds none of them.
    let zygote = cmdline.serve().then(|| spawn_zygote(&mode)).flatten();
    // Listening before the readiness line, so the host may connect as soon as it reads it.
    let listeners = cmdline
        .serve()
        .then(|| listen(&mode).unwrap_or_else(|e| power::fatal(&e)));
    let line = Ready::gather(&mode.root().join("proc/uptime"))
        .and_then(|ready| ready.line())
        .unwrap_or_else(|e| power::fatal(&error_chain(&e)));
    console::emit(&line);
    let mut boot_command = cmdline
        .boot_command()
        .map(|command| start_boot_command(&mode.boot_command_shell(), command));
    if cmdline.poweroff_when_ready() {
        if boot_command.is_some() {
            // The command's end powers off anyway; a harness may pass both.
            console::log(&format!(
                "{BOOT_COMMAND_PARAM} given: {POWEROFF_PARAM}=ready waits for the command"
            ));
        } else {
            power::power_off("requested on the kernel command line");
        }
    }
    if let Mode::Test(config) = &mode {
        run_test_hooks(config);
    }
    let server = listeners.map(|(control, stdio)| {
        Server::start(server_paths(&mode), zygote, control, stdio)
            .unwrap_or_else(|e| power::fatal(&format!("cannot start the server threads: {e}")))
    });

    loop {
        match signals.wait() {
            Ok((_, Action::Reap)) => match &mut boot_command {
                None => {
                    let reaped = reaper::reap_all();
                    if let Some(server) = &server {
                        server.reaped(&reaped);
                    }
                    log_reaped(&mode, reaped);
                }
                Some(command) => {
                    let (reaped, state) = command.reap_with(reaper::reap_all);
                    log_reaped(&mode, reaped);
                    finish_boot_command(&mode, command, state);
                }
            },
            Ok((signal, Action::PowerOff)) => power::power_off(signal.as_str()),
            Err(e) => power::fatal(&error_chain(&e)),
        }
    }
}

/// The control and stdio listeners: vsock ports in the guest, Unix sockets in test mode.
fn listen(mode: &Mode) -> Result<(Listener, Listener), String> {
    use hull_protocol::{CONTROL_PORT, STDIO_PORT};
    match mode {
        Mode::Guest => {
            let bind = |port| {
                Listener::vsock(port).map_err(|e| format!("{SERVE_PARAM}: vsock port {port}: {e}"))
            };
            Ok((bind(CONTROL_PORT)?, bind(STDIO_PORT)?))
        }
        Mode::Test(config) => {
            let bind = |path: &Option<std::path::PathBuf>, name: &str| {
                let path = path
                    .as_ref()
                    .ok_or_else(|| format!("{SERVE_PARAM} in test mode needs {name}"))?;
                Listener::unix(path).map_err(|e| format!("listening on {}: {e}", path.display()))
            };
            Ok((
                bind(&config.control_socket, mode::ENV_TEST_CONTROL_SOCKET)?,
                bind(&config.stdio_socket, mode::ENV_TEST_STDIO_SOCKET)?,
            ))
        }
    }
}

fn server_paths(mode: &Mode) -> Paths {
    let root = mode.root();
    let (rootfs_override, cgroup_root) = match mode {
        Mode::Guest => (None, Some(root.join("sys/fs/cgroup"))),
        Mode::Test(config) => (config.rootfs.clone(), None),
    };
    Paths {
        cgroup_root,
        proc_dir: root.join("proc"),
        rootfs_dir: root.join("run/hull/rootfs"),
        agent_root: root,
        rootfs_override,
    }
}

/// The zygote (`container/zygote.rs`); without one (logged), containers are set up the usual
/// way.
fn spawn_zygote(mode: &Mode) -> Option<Zygote> {
    let paths = server_paths(mode);
    Zygote::spawn(ZygotePaths {
        proc_dir: paths.proc_dir,
        rootfs_dir: paths.rootfs_dir,
        agent_root: paths.agent_root,
    })
    .map_err(|e| {
        console::log(&format!(
            "warning: no pre-made container init: {}",
            e.message
        ))
    })
    .ok()
}

/// Starts the `hull.exec` command, or powers off with a fatal error.
fn start_boot_command(shell: &Path, command: &str) -> BootCommand {
    match BootCommand::start(shell, command) {
        Ok(started) => {
            console::log(&format!(
                "{BOOT_COMMAND_PARAM}: started pid={}: {command}",
                started.pid()
            ));
            started
        }
        Err(e) => power::fatal(&error_chain(&e)),
    }
}

/// Once the `hull.exec` command has ended: prints the exit line and powers off.
fn finish_boot_command(mode: &Mode, command: &BootCommand, state: BootCommandState) {
    match state {
        BootCommandState::Running => {}
        BootCommandState::Ended(exit) => {
            if matches!(mode, Mode::Test(_)) {
                console::log(&format!("reaped pid={} {exit}", command.pid()));
            }
            console::emit(&exit.line());
            power::power_off(&format!("{BOOT_COMMAND_PARAM} command ended"));
        }
        BootCommandState::Lost => power::fatal(&format!(
            "{BOOT_COMMAND_PARAM}: command pid={} was reaped without a readable status",
            command.pid()
        )),
    }
}

/// Everything before the readiness line that can fail fatally.
fn prepare(mode: &Mode) -> Result<(), String> {
    match mode {
        Mode::Guest => {
            // Ctrl-alt-del then sends SIGINT to init instead of resetting without a sync.
            if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
                console::log(&format!("warning: cannot disable ctrl-alt-del reset: {e}"));
            }
            // The guest's own network namespace, which a container without one of its own
            // shares.
            if let Err(e) = sys::loopback_up() {
                console::log(&format!("warning: cannot bring lo up: {e}"));
            }
        }
        Mode::Test(_) => enter_private_mount_namespace()?,
    }
    init::mount_early(&mode.root()).map_err(|e| error_chain(&e))
}

/// Test mode: whatever the harness did, nothing mounted here may reach the host's namespace.
fn enter_private_mount_namespace() -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(
        None::<&str>,
        Path::new("/"),
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))
}

/// Test mode: what the host tests ask for after the readiness line.
fn run_test_hooks(config: &TestConfig) {
    if let Some(command) = &config.exec {
        // The child is reaped by the main loop, like any other.
        match Command::new("/bin/sh")
            .args(["-c", command])
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(child) => console::log(&format!("started test command, pid={}", child.id())),
            Err(e) => console::log(&format!("cannot start test command: {e}")),
        }
    }
    if config.panic {
        panic!("test panic requested with {}", mode::ENV_TEST_PANIC);
    }
}

fn log_reaped(mode: &Mode, reaped: Vec<reaper::Reaped>) {
    // In the guest, orphans are reaped quietly: the console is for the host.
    if matches!(mode, Mode::Test(_)) {
        for r in reaped {
            console::log(&format!("reaped {r}"));
        }
    }
}

/// An error and its causes on one line, `outer: inner: ...`.
pub fn error_chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
