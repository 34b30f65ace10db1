//! `hull start ID`: the created container's process starts (the agent execs it in the guest).

use super::Global;
use crate::container::Container;

#[derive(clap::Args)]
pub struct StartArgs {
    id: String,
}

impl StartArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        Container::load(&global.root, &self.id)?.start()?;
        Ok(0)
    }
}
