//! `hull doctor`: whether this host can run hull's micro-VMs, and how (hardware KVM or PVM,
//! the KVM capabilities hull needs, where the guest kernel and initramfs are).

use kvm_ioctls::{Cap, Kvm};
use vmm::KvmKind;

use crate::paths::{find_guest_dir, guest_dirs};

/// Prints the report; returns 0 when hull can run here, 1 otherwise.
pub fn run() -> i32 {
    let mut ok = true;
    let kind = KvmKind::detect();
    match Kvm::new() {
        Ok(kvm) => {
            out!(
                "kvm: /dev/kvm usable, API version {}",
                kvm.get_api_version()
            );
            out!("kvm kind: {kind}");
            if let Some(warning) = kind.warning() {
                out!("warning: {warning}");
            }
            out!("max vCPUs per VM: {}", kvm.get_max_vcpus());
            for (cap, name) in [
                (Cap::Irqchip, "IRQCHIP"),
                (Cap::Pit2, "PIT2"),
                (Cap::Irqfd, "IRQFD"),
                (Cap::Ioeventfd, "IOEVENTFD"),
                (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            ] {
                let present = kvm.check_extension(cap);
                ok &= present;
                out!(
                    "capability {name}: {}",
                    if present { "yes" } else { "MISSING" }
                );
            }
        }
        Err(err) => {
            ok = false;
            out!("kvm: cannot open /dev/kvm: {err}");
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
