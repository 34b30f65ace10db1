//! `hull run`: `create` + `start`, then (in the foreground) wait for hull-vmm, which exits with
//! the container's status, and delete the container. With `--detach` it returns once started.
//! A terminal without `--console-socket` is relayed to hull's own stdio (`tty.rs`).

use anyhow::Context;

use super::create::{create, CreateArgs, CreateOptions};
use super::Global;
use crate::forward::Forwarder;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Return once started, leaving the container running.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Accepted for runc compatibility (hull deletes a foreground container anyway).
    #[arg(long)]
    keep: bool,
}

impl RunArgs {
    pub fn run(&self, global: &Global) -> anyhow::Result<i32> {
        let _ = self.keep;
        let forwarder = Forwarder::start().context("cannot set up signal forwarding")?;
        run(
            &self.create.options(global, !self.detach),
            self.detach,
            &forwarder,
        )
    }
}

/// Runs the container; returns the status to exit with: the container's (code, or 128 +
/// signal) in the foreground, 0 when detached.
fn run(opts: &CreateOptions, detach: bool, forwarder: &Forwarder) -> anyhow::Result<i32> {
    let mut opts = CreateOptions {
        attached: !detach,
        ..opts.clone()
    };
    // A terminal and nowhere to send it: relay it here, as runc does.
    let terminal = if !detach
        && opts.console_socket.is_none()
        && crate::spec::BundleSpec::load(&opts.bundle)?.terminal
    {
        let foreground = crate::tty::Foreground::start(&std::env::temp_dir())?;
        opts.console_socket = Some(foreground.socket().to_owned());
        Some(foreground)
    } else {
        None
    };
    let mut created = create(&opts, forwarder)?;
    created.container.start()?;
    if detach {
        created.keep();
        return Ok(0);
    }
    let status = created.vmm.wait()?;
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 255,
    };
    log::debug!("hull-vmm exited: {status}");
    if opts.debug {
        // hull-vmm's timeline (with --debug it logs each stage with its time since start).
        let log = std::fs::read_to_string(created.container.dir.join(crate::state::VMM_LOG))
            .unwrap_or_default();
        for line in log
            .lines()
            .filter(|l| l.contains(" ms)") || l.contains("restored: "))
        {
            log::debug!("{line}");
        }
    }
    if let Some(terminal) = terminal {
        terminal.finish();
    }
    created.container.delete(false)?;
    Ok(code)
}
