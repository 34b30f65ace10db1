//! `hull kill ID [SIGNAL]`: a signal (name or number, as runc takes them) to the container's
//! init, or with `--all` to every process of the container.

use super::Global;
use crate::container::Container;
use crate::signal_name::parse_signal;

#[derive(clap::Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(long, short = 'a')]
    all: bool,
    id: String,
    #[arg(default_value = "SIGTERM")]
    signal: String,
}

impl KillArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        let number = parse_signal(&self.signal)?;
        Container::load(&global.root, &self.id)?.kill(number, self.all)?;
        Ok(0)
    }
}
