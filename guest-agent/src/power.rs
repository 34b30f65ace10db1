//! Powering the VM off, and the one place that may call `reboot(2)`.
//!
//! The guest has no ACPI. "Power off" is `sync()` then `reboot(LINUX_REBOOT_CMD_RESTART)`: the
//! kernel is booted with `reboot=k`, resets through the i8042 controller, and `hull-vmm` treats
//! that reset as the VM's clean end.
//!
//! On a host, `reboot(2)` must never run. The [`PowerTarget`] decides what "power off" does and
//! is set once at start-up by the mode check in `mode.rs`; [`power_off`] checks it again right
//! before the call:
//! - [`PowerTarget::Guest`]: PID 1 with an initramfs (ramfs or tmpfs) as `/`.
//! - [`PowerTarget::TestNamespace`]: PID 1 of a PID namespace that is neither the initial one nor
//!   the one the test harness runs in. There, `reboot(RESTART)` only ends the namespace: the
//!   kernel kills its init, whose parent sees it die of `SIGHUP` (reboot(2), "Behavior inside PID
//!   namespaces").
//!
//! With no target set, or if a check fails, the agent exits instead (status 1); as PID 1 of a VM
//! that panics the guest kernel, which is still better than a hung VM.

use std::sync::OnceLock;

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::stat::stat;
use nix::unistd::{getpid, sync};

use crate::console;

/// The inode number of the initial PID namespace (`PROC_PID_INIT_INO` in
/// `include/linux/proc_ns.h`), fixed by the kernel.
pub const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// What "power off" may do in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerTarget {
    /// PID 1 of the guest: reset the VM.
    Guest,
    /// PID 1 of a throwaway PID namespace on a host: end the namespace. `parent_pidns` is the
    /// inode of the harness's PID namespace, which must not be ours.
    TestNamespace { parent_pidns: u64 },
}

static TARGET: OnceLock<PowerTarget> = OnceLock::new();

/// Sets what [`power_off`] does. Only the first call counts.
pub fn set_target(target: PowerTarget) {
    let _ = TARGET.set(target);
}

/// The inode of the PID namespace this process is in.
pub fn own_pidns() -> nix::Result<u64> {
    stat("/proc/self/ns/pid").map(|st| st.st_ino)
}

/// Whether `reboot(RESTART)` from this process ends a throwaway namespace rather than a machine.
pub fn is_throwaway_pidns(own_pidns: u64, parent_pidns: u64) -> bool {
    own_pidns != PROC_PID_INIT_INO && own_pidns != parent_pidns
}

/// Syncs file systems and powers off. Never returns.
pub fn power_off(reason: &str) -> ! {
    console::log(&format!("power off: {reason}"));
    sync();
    match TARGET.get().copied() {
        Some(PowerTarget::Guest) if getpid().as_raw() == 1 => {
            // Returns only on failure.
            let err = reboot(RebootMode::RB_AUTOBOOT).err();
            console::emit(&format!("HULL_AGENT_FATAL reboot failed: {err:?}"));
        }
        Some(PowerTarget::TestNamespace { parent_pidns }) if getpid().as_raw() == 1 => {
            match own_pidns() {
                Ok(own) if is_throwaway_pidns(own, parent_pidns) => {
                    let err = reboot(RebootMode::RB_AUTOBOOT).err();
                    console::emit(&format!("HULL_AGENT_FATAL reboot failed: {err:?}"));
                }
                other => console::log(&format!(
                    "not rebooting: PID namespace {other:?} is not a throwaway one"
                )),
            }
        }
        target => console::log(&format!("not rebooting: power target {target:?}")),
    }
    std::process::exit(1)
}

/// Prints `HULL_AGENT_FATAL <message>` on the console and powers off.
pub fn fatal(message: &str) -> ! {
    console::emit(&format!("HULL_AGENT_FATAL {}", one_line(message)));
    power_off("fatal error")
}

/// The message on a single line, so the host can read the fatal line as one record.
fn one_line(message: &str) -> String {
    message.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throwaway_namespace_check() {
        assert!(!is_throwaway_pidns(PROC_PID_INIT_INO, 4_026_532_177));
        assert!(!is_throwaway_pidns(4_026_532_177, 4_026_532_177));
        assert!(is_throwaway_pidns(4_026_532_178, 4_026_532_177));
        assert!(is_throwaway_pidns(4_026_532_178, PROC_PID_INIT_INO));
    }

    #[test]
    fn fatal_message_is_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
