//! `hull`: the runc-compatible OCI runtime CLI. `hull run` runs a bundle's container in its
//! own micro-VM and exits with its status; `hull doctor` tells whether this host can run
//! hull's micro-VMs and how. runc's global flags (`--root`, `--log`, `--log-format`,
//! `--debug`) are accepted before or after the command.

mod logger;
mod paths;
mod run;
mod signals;
mod spec;
mod state;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvm_ioctls::{Cap, Kvm};
use vmm::KvmKind;

use crate::logger::LogFormat;
use crate::paths::{find_guest_dir, guest_dirs};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run hull micro-VMs, and how.
    Doctor,
    /// Create and run a container, relaying its stdio; exit with its status.
    Run {
        /// The bundle directory (holding config.json).
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
        /// The container id, unique under --root.
        id: String,
    },
}

fn doctor() -> ExitCode {
    let mut ok = true;
    let kind = KvmKind::detect();
    match Kvm::new() {
        Ok(kvm) => {
            println!(
                "kvm: /dev/kvm usable, API version {}",
                kvm.get_api_version()
            );
            println!("kvm kind: {kind}");
            if let Some(warning) = kind.warning() {
                println!("warning: {warning}");
            }
            println!("max vCPUs per VM: {}", kvm.get_max_vcpus());
            for (cap, name) in [
                (Cap::Irqchip, "IRQCHIP"),
                (Cap::Pit2, "PIT2"),
                (Cap::Irqfd, "IRQFD"),
                (Cap::Ioeventfd, "IOEVENTFD"),
                (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            ] {
                let present = kvm.check_extension(cap);
                ok &= present;
                println!(
                    "capability {name}: {}",
                    if present { "yes" } else { "MISSING" }
                );
            }
        }
        Err(err) => {
            ok = false;
            println!("kvm: cannot open /dev/kvm: {err}");
        }
    }
    match find_guest_dir(&guest_dirs()) {
        Some(dir) => println!("guest: {}", dir.display()),
        None => {
            ok = false;
            println!("guest: no vmlinux and initramfs.cpio found (run `make kernel agent`)");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `hull run`: exits with the container's status, or 1 (128 + N if interrupted by signal N)
/// when the container could not be run.
fn run_command(cli: &Cli, bundle: PathBuf, id: String, log_to_file: bool) -> ExitCode {
    let (tx, rx) = std::sync::mpsc::channel();
    let signal_tx = tx.clone();
    // Before any other thread starts: threads inherit the blocked signals.
    if let Err(err) =
        signals::forward(move |signal| signal_tx.send(run::Incoming::Signal(signal)).is_ok())
    {
        eprintln!("hull: error: cannot set up signal forwarding: {err}");
        return ExitCode::FAILURE;
    }
    let inbox = run::Inbox { tx, rx };
    let opts = run::RunOptions {
        root: cli.root.clone(),
        bundle,
        id,
        debug: cli.debug,
    };
    match run::run(&opts, &inbox) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(err) => {
            let msg = format!("{err:#}");
            log::error!("{msg}");
            if log_to_file {
                eprintln!("hull: error: {msg}");
            }
            match err.downcast_ref::<run::Interrupted>() {
                Some(run::Interrupted(signal)) => {
                    ExitCode::from((128 + signal).clamp(0, 255) as u8)
                }
                None => ExitCode::FAILURE,
            }
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
    match &cli.command {
        Command::Doctor => doctor(),
        Command::Run { bundle, id } => run_command(&cli, bundle.clone(), id.clone(), log_to_file),
    }
}
