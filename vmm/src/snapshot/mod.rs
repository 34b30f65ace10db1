//! Snapshots of a paused VM, and what a restore checks before it uses one.
//!
//! A snapshot is a directory of two files:
//! - `state` ([`file`]): a versioned, checksummed record of every vCPU's state, the VM's
//!   (interrupt controllers, PIT, clock) and the devices', with what the snapshot was taken
//!   from (hull's version, the host's boot, the VM's shape) and an id;
//! - `memory` ([`memory`]): guest RAM, only the pages the guest touched, with the same id.
//!
//! The memory file is written first and the state file last, each whole or not at all
//! (a temporary name, then a rename), so a directory with a `state` has a matching `memory`.
//!
//! A snapshot is only restored on the host boot it was taken on: the guest's TSC is the host's
//! and cannot be set back on every KVM (`../shared/DESIGN.md`), so after a reboot it would run
//! backwards.
//!
//! Virtio devices are snapshotted only when quiet (`VirtioDevice::snapshot_ready`): nothing in
//! flight, no vsock connection, the virtio-fs share not mounted. What is saved is the
//! transport's registers and queue configuration; a restore attaches new devices from the
//! restoring VM's configuration (its own vsock socket, its own shared directory) in the same
//! order, puts the transports in the saved state and starts the devices with each queue at its
//! used index in guest memory. The agent's idle point, waiting for the host's first
//! connection, is such a moment.

pub mod file;
pub mod memory;
pub mod state;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

pub use file::StateFileError;
pub use memory::{DumpStats, MemoryFileError};
pub use state::{StateError, VcpuState, VmState};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Where the host's boot id is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Why a snapshot cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot take a snapshot: {0}")]
    Unsupported(&'static str),
    #[error("cannot take a snapshot")]
    Device(#[source] devices::virtio::MmioTransportError),
    #[error("{}: taken {what} {snapshot}, but this is {here}", path.display())]
    Mismatch {
        path: PathBuf,
        what: &'static str,
        snapshot: String,
        here: String,
    },
    #[error("cannot make snapshot directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the host's boot id ({BOOT_ID})")]
    BootId(#[source] std::io::Error),
    #[error("cannot get random bytes for the snapshot's id")]
    Random(#[source] std::io::Error),
}

/// COM1's registers and input FIFO: vm-superio's own state, which has no serde of its own.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Everything in the state file.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// Ties the state file to its memory file.
    pub id: [u8; 16],
    /// The hull-vmm that took it (`CARGO_PKG_VERSION`).
    pub hull_version: String,
    /// The host's boot id then.
    pub boot_id: String,
    /// Guest RAM in MiB, and the VM's vCPU count.
    pub mem_size_mib: u32,
    pub vcpu_count: u8,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// Each virtio-mmio transport's state, in slot order.
    pub virtio: Vec<devices::virtio::MmioState>,
}

/// The host's boot id, read once (a jailed hull-vmm has no `/proc/sys`: it reads it before).
pub fn boot_id() -> Result<String, SnapshotError> {
    static READ: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = READ.get() {
        return Ok(id.clone());
    }
    let id = std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_owned())
        .map_err(SnapshotError::BootId)?;
    Ok(READ.get_or_init(|| id).clone())
}

/// 16 random bytes.
pub fn new_id() -> Result<[u8; 16], SnapshotError> {
    let mut id = [0u8; 16];
    let mut filled = 0;
    while filled < id.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `id`, which lives
        // across the call.
        let n = unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), id.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SnapshotError::Random(err));
        }
        filled += n as usize;
    }
    Ok(id)
}

impl Snapshot {
    /// Checks that this snapshot can be restored here as a VM of `vcpus` vCPUs and
    /// `mem_size_mib` MiB; `path` is its state file, for the message.
    pub fn check(&self, path: &Path, vcpus: u8, mem_size_mib: u32) -> Result<(), SnapshotError> {
        let mismatch = |what, snapshot: String, here: String| {
            Err(SnapshotError::Mismatch {
                path: path.to_owned(),
                what,
                snapshot,
                here,
            })
        };
        let version = env!("CARGO_PKG_VERSION");
        if self.hull_version != version {
            return mismatch("by hull-vmm", self.hull_version.clone(), version.to_owned());
        }
        let boot = boot_id()?;
        if self.boot_id != boot {
            return mismatch(
                "on host boot",
                self.boot_id.clone(),
                format!("boot {boot} (the host has rebooted since)"),
            );
        }
        if self.vcpu_count != vcpus || usize::from(vcpus) != self.vcpus.len() {
            return mismatch(
                "of a VM with vCPUs:",
                self.vcpu_count.to_string(),
                format!("a VM with {vcpus}"),
            );
        }
        if self.mem_size_mib != mem_size_mib {
            return mismatch(
                "of a VM with MiB of memory:",
                self.mem_size_mib.to_string(),
                format!("a VM with {mem_size_mib}"),
            );
        }
        Ok(())
    }
}

/// `dir/state` and `dir/memory`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(STATE_FILE), dir.join(MEMORY_FILE))
}
