//! `hull doctor`: whether this host can run hull's micro-VMs, and how. The KVM part (hardware
//! or PVM, the capabilities hull needs) comes from `hull-vmm --check-host`, since hull-vmm is
//! the process that uses KVM; then where the guest kernel and initramfs are.

use std::process::Command;

use crate::paths::{find_guest_dir, guest_dirs, vmm_binary};

/// Prints the report; returns 0 when hull can run here, 1 otherwise.
pub fn run() -> i32 {
    let mut ok = true;
    match vmm_binary() {
        Ok(vmm) => match Command::new(&vmm).arg("--check-host").output() {
            Ok(report) => {
                out!("{}", String::from_utf8_lossy(&report.stdout).trim_end());
                ok &= report.status.success();
            }
            Err(err) => {
                ok = false;
                out!("hull-vmm: cannot run {}: {err}", vmm.display());
            }
        },
        Err(err) => {
            ok = false;
            out!("hull-vmm: {err:#}");
        }
    }
    match find_guest_dir(&guest_dirs()) {
        Some(dir) => out!("guest: {}", dir.display()),
        None => {
            ok = false;
            out!("guest: no vmlinux and initramfs.cpio found (run `make kernel agent`)");
        }
    }
    i32::from(!ok)
}
