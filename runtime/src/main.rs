//! `hull`: the runc-compatible OCI runtime CLI. Every container runs in its own micro-VM,
//! whose `hull-vmm` process is the container's init as the host sees it (`container.rs`).
//! runc's commands and global flags (`--root`, `--log`, `--log-format`, `--debug`) are
//! accepted before or after the command; `hull doctor` tells whether this host can run hull's
//! micro-VMs and how.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use hull::commands::{Command, Global};
use hull::logger::{self, LogFormat};

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
    /// `linux.cgroupsPath` is systemd's `slice:prefix:name`: hull-vmm's cgroup is made where
    /// systemd keeps that unit (through the cgroup file system, not systemd's D-Bus).
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    /// runc's rootless mode: with `spec`, write a spec for a rootless container; otherwise
    /// accepted (hull needs /dev/kvm, as far as its permissions say, not root).
    #[arg(long, global = true, value_name = "true|false|auto", num_args = 0..=1, default_missing_value = "true")]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Runs the command; `Ok(status)` is the status to exit with.
fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let global = Global {
        root: cli.root,
        debug: cli.debug,
        systemd_cgroup: cli.systemd_cgroup,
        rootless: cli.rootless,
    };
    cli.command.run(&global)
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
    match dispatch(cli) {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(err) => {
            let msg = format!("{err:#}");
            log::error!("{msg}");
            if log_to_file {
                eprintln!("hull: error: {}", hull_contract::printable(&msg));
            }
            ExitCode::FAILURE
        }
    }
}
