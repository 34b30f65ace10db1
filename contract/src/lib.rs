//! The contract between `hull` and `hull-vmm`: everything that crosses between the two
//! processes, in a light crate that both depend on, so that `hull` (and a containerd shim)
//! never links the VMM, KVM or the devices.
//!
//! - [`vm`]: the VM's configuration (`vm.json`), plain data validated before anything starts;
//! - [`container`]: the container's configuration (`container.json`) and the one report line
//!   hull-vmm writes on its sync descriptor;
//! - [`control`]: the client of a container's control socket (the agent's protocol, proxied by
//!   hull-vmm), whose errors keep the agent's error kinds;
//! - [`signals`]: the signals hull-vmm forwards to the container's init, which `hull` forwards
//!   to hull-vmm in turn;
//! - [`console`] and [`relay`]: host ptys sent over `--console-socket`, and the stdio relays;
//! - [`host`]: what kind of KVM this host has (read from sysfs, no KVM call).

pub mod console;
pub mod container;
pub mod control;
pub mod host;
pub mod relay;
pub mod signals;
pub mod vm;

pub use container::{ContainerConfig, ContainerConfigError, CreateReport};
pub use host::KvmKind;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The last `max` bytes of a file, as text (for error messages: a log's or a console's end).
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
