//! `hull delete ID`: removes a stopped container (any container with `--force`, whose VM is
//! killed first), after its poststop hooks.

use super::Global;
use crate::container::Container;

#[derive(clap::Args)]
pub struct DeleteArgs {
    #[arg(long, short = 'f')]
    force: bool,
    id: String,
}

impl DeleteArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        let container = match Container::load(&global.root, &self.id) {
            Ok(c) => c,
            // runc: deleting a container that does not exist with --force is no error.
            Err(_) if self.force && !global.root.join(&self.id).exists() => return Ok(0),
            Err(err) => return Err(err),
        };
        container.delete(self.force)?;
        Ok(0)
    }
}
