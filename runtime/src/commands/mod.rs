//! `hull`'s commands, one file each, as youki lays them out: every file owns its clap
//! arguments and its logic, and runs with the global flags in [`Global`]. The container's
//! state and the lifecycle steps several commands share (start, kill, delete) live in
//! `crate::container`.

mod create;
mod delete;
mod doctor;
mod exec;
mod features;
mod kill;
mod list;
mod ps;
mod run;
pub mod spec;
mod start;
mod state;

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

/// The global flags a command needs.
pub struct Global {
    /// Directory for the containers' state (`--root`).
    pub root: PathBuf,
    /// `--debug`: hull-vmm logs the timings of each stage too.
    pub debug: bool,
    /// `--systemd-cgroup`: `linux.cgroupsPath` is `slice:prefix:name`.
    pub systemd_cgroup: bool,
    /// runc's `--rootless` (`spec` writes a rootless spec when it is "true").
    pub rootless: Option<String>,
}

/// Output formats of `list` and `ps`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check that this host can run hull micro-VMs, and how.
    Doctor,
    /// Create a container: boot its micro-VM and prepare its process, not started.
    Create(create::CreateArgs),
    /// Start a created container's process.
    Start(start::StartArgs),
    /// Create and start a container; in the foreground, relay its stdio and exit with its status.
    Run(run::RunArgs),
    /// Print a container's state as JSON.
    State(state::StateArgs),
    /// Send a signal (name or number, default SIGTERM) to a container's init.
    Kill(kill::KillArgs),
    /// Delete a stopped container (any container with --force).
    Delete(delete::DeleteArgs),
    /// List the containers under --root.
    List(list::ListArgs),
    /// List the processes of a container (pids in its VM).
    Ps(ps::PsArgs),
    /// Run another process in a running container.
    Exec(exec::ExecArgs),
    /// Print the OCI runtime features document.
    Features,
    /// Write a default config.json into the bundle.
    Spec(spec::SpecArgs),
}

impl Command {
    /// Runs the command; `Ok(status)` is the status to exit with.
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        match self {
            Command::Doctor => Ok(doctor::run()),
            Command::Create(args) => args.run(global),
            Command::Start(args) => args.run(global),
            Command::Run(args) => args.run(global),
            Command::State(args) => args.run(global),
            Command::Kill(args) => args.run(global),
            Command::Delete(args) => args.run(global),
            Command::List(args) => args.run(global),
            Command::Ps(args) => args.run(global),
            Command::Exec(args) => args.run(global),
            Command::Features => features::run(),
            Command::Spec(args) => args.run(global),
        }
    }
}

/// Prints a JSON document, indented.
fn print_json(value: &serde_json::Value) {
    out!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}
