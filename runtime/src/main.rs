//! `hull`: the runc-compatible OCI runtime CLI. Every container runs in its own micro-VM,
//! whose `hull-vmm` process is the container's init as the host sees it (`container.rs`).
//! runc's commands and global flags (`--root`, `--log`, `--log-format`, `--debug`) are
//! accepted before or after the command; `hull doctor` tells whether this host can run hull's
//! micro-VMs and how.

mod container;
mod exec;
mod features;
mod hooks;
mod logger;
mod mountpoints;
mod paths;
mod run;
mod signal;
mod signals;
mod spec;
mod specgen;
mod state;
#[cfg(test)]
mod testutil;
mod tty;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kvm_ioctls::{Cap, Kvm};
use vmm::KvmKind;

use crate::container::{Container, CreateOptions, Status};
use crate::logger::LogFormat;
use crate::paths::{find_guest_dir, guest_dirs};

/// `println!` that does not panic when standard output is closed (`hull list | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(name = "hull", version, about = "Run OCI containers in micro-VMs")]
struct Cli {
    /// Directory for the containers' state.
    #[arg(long, global = true, default_value = "/run/hull")]
    root: PathBuf,
    /// Append log messages to this file (default: warnings and errors on standard error).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of the log file.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log debug messages, including the timings of each stage.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility: hull's containers are VMs, not cgroups of the host.
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    /// runc's rootless mode: with `spec`, write a spec for a rootless container; otherwise
    /// accepted (hull needs /dev/kvm, as far as its permissions say, not root).
    #[arg(long, global = true, value_name = "true|false|auto", num_args = 0..=1, default_missing_value = "true")]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The flags `create` and `run` share.
#[derive(clap::Args, Clone)]
struct CreateArgs {
    /// The bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write hull-vmm's pid (the container's init on the host) to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// With `process.terminal`: a Unix socket to send the pty master to.
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Pass this many extra descriptors (refused when not 0: they cannot enter a VM).
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    /// Accepted for runc compatibility (the guest has no pivot_root to skip).
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
    /// The container id, unique under --root.
    id: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run hull micro-VMs, and how.
    Doctor,
    /// Create a container: boot its micro-VM and prepare its process, not started.
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Create and start a container; in the foreground, relay its stdio and exit with its status.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once started, leaving the container running.
        #[arg(long, short = 'd')]
        detach: bool,
        /// Accepted for runc compatibility (hull deletes a foreground container anyway).
        #[arg(long)]
        keep: bool,
    },
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal (name or number, default SIGTERM) to a container's init.
    Kill {
        /// Signal every process of the container.
        #[arg(long, short = 'a')]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a stopped container (any container with --force).
    Delete {
        #[arg(long, short = 'f')]
        force: bool,
        id: String,
    },
    /// List the containers under --root.
    List {
        #[arg(long, short = 'f', value_enum, default_value = "table")]
        format: Format,
        /// Only the ids.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List the processes of a container (pids in its VM).
    Ps {
        #[arg(long, short = 'f', value_enum, default_value = "table")]
        format: Format,
        id: String,
        /// Accepted for runc compatibility (ps options); ignored.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Run another process in a running container.
    Exec {
        /// The process as an OCI `process` JSON file.
        #[arg(long, short = 'p')]
        process: Option<PathBuf>,
        /// Allocate a terminal.
        #[arg(long, short = 't')]
        tty: bool,
        /// Environment variables to add (KEY=VALUE).
        #[arg(long, short = 'e')]
        env: Vec<String>,
        /// Working directory in the container.
        #[arg(long)]
        cwd: Option<String>,
        /// uid[:gid] in the container.
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Additional gids.
        #[arg(long = "additional-gids", short = 'g')]
        additional_gids: Vec<u32>,
        /// Set no_new_privileges.
        #[arg(long = "no-new-privs")]
        no_new_privs: bool,
        /// Return once started.
        #[arg(long, short = 'd')]
        detach: bool,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        #[arg(long = "preserve-fds", default_value_t = 0)]
        preserve_fds: u32,
        /// Internal: the background copy of `exec --detach` reports here.
        #[arg(long = "sync-fd", hide = true)]
        sync_fd: Option<i32>,
        id: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Print the OCI runtime features document.
    Features,
    /// Write a default config.json into the bundle.
    Spec {
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
    },
}

fn doctor() -> ExitCode {
    let mut ok = true;
    let kind = KvmKind::detect();
    match Kvm::new() {
        Ok(kvm) => {
            out!(
                "kvm: /dev/kvm usable, API version {}",
                kvm.get_api_version()
            );
            out!("kvm kind: {kind}");
            if let Some(warning) = kind.warning() {
                out!("warning: {warning}");
            }
            out!("max vCPUs per VM: {}", kvm.get_max_vcpus());
            for (cap, name) in [
                (Cap::Irqchip, "IRQCHIP"),
                (Cap::Pit2, "PIT2"),
                (Cap::Irqfd, "IRQFD"),
                (Cap::Ioeventfd, "IOEVENTFD"),
                (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            ] {
                let present = kvm.check_extension(cap);
                ok &= present;
                out!(
                    "capability {name}: {}",
                    if present { "yes" } else { "MISSING" }
                );
            }
        }
        Err(err) => {
            ok = false;
            out!("kvm: cannot open /dev/kvm: {err}");
        }
    }
    match find_guest_dir(&guest_dirs()) {
        Some(dir) => out!("guest: {}", dir.display()),
        None => {
            ok = false;
            out!("guest: no vmlinux and initramfs.cpio found (run `make kernel agent`)");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

impl CreateArgs {
    fn options(&self, cli: &Cli, attached: bool) -> CreateOptions {
        let _ = (self.no_pivot, self.no_new_keyring);
        CreateOptions {
            root: cli.root.clone(),
            bundle: self.bundle.clone(),
            id: self.id.clone(),
            pid_file: self.pid_file.clone(),
            console_socket: self.console_socket.clone(),
            preserve_fds: self.preserve_fds,
            debug: cli.debug,
            attached,
        }
    }
}

/// Passes the signals hull receives to the hull-vmm it started (which forwards them to the
/// container, or ends the VM if the container does not exist yet).
fn forward_to_vmm() -> anyhow::Result<()> {
    signals::forward(|signal| {
        if signal == libc::SIGWINCH {
            // Our terminal's size goes to the container's (`hull run` with a terminal);
            // hull-vmm learns of it from its own terminal.
            tty::resize();
        } else {
            container::forward_signal(signal);
        }
        true
    })
    .map_err(|e| anyhow::anyhow!("cannot set up signal forwarding: {e}"))
}

fn print_json(value: &serde_json::Value) {
    out!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

/// Runs a command; `Ok(status)` is the status to exit with.
fn dispatch(cli: &Cli) -> anyhow::Result<i32> {
    if cli.systemd_cgroup {
        log::debug!("--systemd-cgroup: hull's containers are VMs; no host cgroup is made");
    }
    match &cli.command {
        Command::Doctor => Ok(i32::from(doctor() != ExitCode::SUCCESS)),
        Command::Create(args) => {
            forward_to_vmm()?;
            container::create(&args.options(cli, false))?.keep();
            Ok(0)
        }
        Command::Start { id } => {
            Container::load(&cli.root, id)?.start()?;
            Ok(0)
        }
        Command::Run {
            create,
            detach,
            keep,
        } => {
            let _ = keep;
            forward_to_vmm()?;
            run::run(&create.options(cli, !detach), *detach)
        }
        Command::State { id } => {
            print_json(&Container::load(&cli.root, id)?.state_json());
            Ok(0)
        }
        Command::Kill { all, id, signal } => {
            let number = signal::parse_signal(signal)?;
            Container::load(&cli.root, id)?.kill(number, *all)?;
            Ok(0)
        }
        Command::Delete { force, id } => {
            let container = match Container::load(&cli.root, id) {
                Ok(c) => c,
                // runc: deleting a container that does not exist with --force is no error.
                Err(_) if *force && !cli.root.join(id).exists() => return Ok(0),
                Err(err) => return Err(err),
            };
            container.delete(*force)?;
            Ok(0)
        }
        Command::List { format, quiet } => {
            let containers = Container::list(&cli.root)?;
            if *quiet {
                for c in &containers {
                    out!("{}", c.saved.id);
                }
                return Ok(0);
            }
            match format {
                Format::Json => {
                    let list: Vec<_> = containers.iter().map(Container::state_json).collect();
                    out!("{}", serde_json::Value::Array(list));
                }
                Format::Table => {
                    out!(
                        "{:<12} {:<8} {:<10} {:<40} {:<30} OWNER",
                        "ID",
                        "PID",
                        "STATUS",
                        "BUNDLE",
                        "CREATED"
                    );
                    for c in &containers {
                        let status = c.status();
                        let pid = if status == Status::Stopped {
                            0
                        } else {
                            c.saved.pid
                        };
                        out!(
                            "{:<12} {:<8} {:<10} {:<40} {:<30} root",
                            c.saved.id,
                            pid,
                            status.as_str(),
                            c.saved.bundle.display(),
                            c.saved.created
                        );
                    }
                }
            }
            Ok(0)
        }
        Command::Ps {
            format,
            id,
            ps_args,
        } => {
            if !ps_args.is_empty() {
                log::debug!("ps options ignored: {ps_args:?}");
            }
            let processes = container::processes(&Container::load(&cli.root, id)?)?;
            match format {
                Format::Json => {
                    let pids: Vec<i32> = processes.iter().map(|p| p.pid).collect();
                    out!("{}", serde_json::json!(pids));
                }
                Format::Table => {
                    out!("{:>7} {:>7} {:>6} CMD", "PID", "PPID", "UID");
                    for p in &processes {
                        let cmd = if p.args.is_empty() {
                            format!("[{}]", p.comm)
                        } else {
                            p.args.join(" ")
                        };
                        out!("{:>7} {:>7} {:>6} {cmd}", p.pid, p.ppid, p.uid);
                    }
                }
            }
            Ok(0)
        }
        Command::Exec {
            process,
            tty,
            env,
            cwd,
            user,
            additional_gids,
            no_new_privs,
            detach,
            pid_file,
            console_socket,
            preserve_fds,
            sync_fd,
            id,
            command,
        } => exec::exec(&exec::ExecOptions {
            root: cli.root.clone(),
            id: id.clone(),
            process_file: process.clone(),
            args: command.clone(),
            tty: *tty,
            env: env.clone(),
            cwd: cwd.clone(),
            user: user.clone(),
            additional_gids: additional_gids.clone(),
            no_new_privs: *no_new_privs,
            detach: *detach,
            pid_file: pid_file.clone(),
            console_socket: console_socket.clone(),
            preserve_fds: *preserve_fds,
            sync_fd: *sync_fd,
        }),
        Command::Features => {
            print_json(&features::features());
            Ok(0)
        }
        Command::Spec { bundle } => {
            // `--rootless` (global, as in runc): a spec for a rootless container.
            let rootless = cli.rootless.as_deref() == Some("true");
            specgen::write_spec(bundle, rootless)?;
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_to_file = match logger::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        Ok(to_file) => to_file,
        Err(err) => {
            let path = cli.log.as_deref().unwrap_or(std::path::Path::new(""));
            eprintln!(
                "hull: error: cannot open log file {}: {err}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match dispatch(&cli) {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(err) => {
            let msg = format!("{err:#}");
            log::error!("{msg}");
            if log_to_file {
                eprintln!("hull: error: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}
