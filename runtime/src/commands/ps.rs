//! `hull ps ID`: the container's processes, as the agent lists them in the guest (their pids
//! are the guest's, not the host's).
//!
//! `--format json` is for programs (containerd's shim, and through it `docker top`), which take
//! the pids for host pids: they list and signal host processes by them. So it gives the one host
//! process that stands for the container, its hull-vmm; a guest's pid there would name an
//! unrelated host process.

use anyhow::{anyhow, bail};
use hull_protocol::{ProcessInfo, RequestBody, ResponseBody};

use super::{Format, Global};
use crate::container::{Container, Status, REQUEST_DEADLINE};

#[derive(clap::Args)]
pub struct PsArgs {
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    format: Format,
    id: String,
    /// Accepted for runc compatibility (ps options); ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    ps_args: Vec<String>,
}

impl PsArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        if !self.ps_args.is_empty() {
            log::debug!("ps options ignored: {:?}", self.ps_args);
        }
        let container = Container::load(&global.root, &self.id)?;
        let processes = processes(&container)?;
        match self.format {
            Format::Json => {
                out!("{}", serde_json::json!([container.saved.pid]));
            }
            Format::Table => {
                out!("{:>7} {:>7} {:>6} CMD", "PID", "PPID", "UID");
                for p in &processes {
                    let cmd = if p.args.is_empty() {
                        format!("[{}]", p.comm)
                    } else {
                        p.args.join(" ")
                    };
                    // The guest names its processes: one printable line each.
                    let cmd = hull_contract::printable_line(&cmd);
                    out!("{:>7} {:>7} {:>6} {cmd}", p.pid, p.ppid, p.uid);
                }
            }
        }
        Ok(0)
    }
}

/// The container's processes, from the guest.
fn processes(container: &Container) -> anyhow::Result<Vec<ProcessInfo>> {
    if container.status() == Status::Stopped {
        bail!("container {} is not running", container.saved.id);
    }
    match container
        .client()?
        .request(RequestBody::ListProcesses, Some(REQUEST_DEADLINE))?
    {
        ResponseBody::Processes(list) => Ok(list),
        other => Err(anyhow!("unexpected answer to list_processes: {other:?}")),
    }
}
