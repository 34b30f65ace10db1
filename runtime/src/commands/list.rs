//! `hull list`: the containers under `--root`, as runc's table or JSON, or only their ids.

use super::{Format, Global};
use crate::container::{Container, Status};

#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    format: Format,
    /// Only the ids.
    #[arg(long, short = 'q')]
    quiet: bool,
}

impl ListArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        let containers = Container::list(&global.root)?;
        if self.quiet {
            for c in &containers {
                out!("{}", c.saved.id);
            }
            return Ok(0);
        }
        match self.format {
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
}
