//! The `hull` runtime as a library: the OCI CLI's commands (`hull` is a thin `main` over them),
//! and what the containerd shim (`containerd-shim-hull-v2`) shares with them: reading and
//! checking a bundle's spec, the state directory, the warm-start templates and the network
//! mirroring. Neither links the VMM: both drive `hull-vmm` through the contract crate.

/// `println!` that does not panic when standard output is closed (`hull list | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub mod cgroup;
pub mod commands;
pub mod container;
pub mod forward;
pub mod hooks;
pub mod logger;
pub mod mountpoints;
pub mod network;
pub mod paths;
pub mod signal_name;
pub mod spec;
pub mod state;
pub mod template;
#[cfg(test)]
mod testutil;
pub mod tty;
