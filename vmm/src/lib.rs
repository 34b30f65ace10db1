//! hull-vmm: one KVM micro-VM per container.
//!
//! `builder` wires a VM from a plain `VmConfig`: guest memory and the kernel (`arch`), the
//! in-kernel interrupt controllers (`vstate::vm`), devices on port and MMIO buses
//! (`device_manager`), and one thread per vCPU (`vstate::vcpu`). On PVM hosts (`host`) the
//! kernel command line carries the host's workarounds and `emulation` completes the few
//! instructions the host's emulator refuses.

pub mod arch;
pub mod builder;
pub use hull_contract::vm as config;
pub mod container;
pub mod device_manager;
pub mod emulation;
#[cfg(any(test, feature = "fuzzing"))]
pub mod emulation_fuzz;
pub mod jail;
pub mod limits;
pub use hull_contract::host;
pub mod log_limit;
pub mod nic;
pub mod seccomp;
pub mod snapshot;
pub mod thread;
pub mod vstate;

/// An error and its sources, `: `-separated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub use builder::{
    build, build_with_devices, build_with_net, open_net_devices, restore, PreparedVm, RunOutcome,
    SnapshotReport, Stopper, Vmm, VmmError,
};
pub use config::{ConsoleConfig, VmConfig};
pub use host::KvmKind;
pub use thread::{Spawner, ThreadKind};
pub use vstate::vcpu::VmExit;
