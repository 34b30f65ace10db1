//! `hull state ID`: runc's state document of a container, as JSON.

use super::{print_json, Global};
use crate::container::Container;

#[derive(clap::Args)]
pub struct StateArgs {
    id: String,
}

impl StateArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        print_json(&Container::load(&global.root, &self.id)?.state_json());
        Ok(0)
    }
}
