//! What kind of KVM this host has, and the measures a PVM host needs.
//!
//! PVM (`kvm_pvm`) is a shadow-paging hypervisor for nested clouds. An ordinary guest kernel
//! runs there, but its kernel-mode code is emulated, `KVM_SET_CPUID2` does not change what the
//! guest reads, a few instructions stop the emulator, and system calls from guest user mode
//! arrive in user mode. hull applies its workarounds only on such a host.

use std::fmt;
use std::path::Path;

/// The kernel command line a PVM host needs:
/// - `clearcpuid=...` keeps the guest kernel away from CLAC, POPCNT and CMPXCHG16B, which the
///   host's instruction emulator cannot run (the XSAVE family, which it cannot run either, the
///   VMM executes instead: the guest kernel must save its processes' AVX state);
/// - `hull_pvm_syscall` switches on hull's guest-kernel patch that completes system calls that
///   reach `entry_SYSCALL_64` still in user mode (see `kernel-config/patches`).
pub const PVM_CMDLINE: &str = "clearcpuid=smap,popcnt,cx16 hull_pvm_syscall";

/// The kind of KVM behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization (VMX or SVM).
    Hardware,
    /// PVM: guest kernel code is emulated.
    Pvm,
}

impl KvmKind {
    /// Detects the host's KVM from the loaded modules.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detects the host's KVM from a `/sys/module`-like directory.
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            KvmKind::Pvm
        } else {
            KvmKind::Hardware
        }
    }

    /// Extra kernel command line this host needs, if any.
    pub fn extra_cmdline(self) -> Option<&'static str> {
        match self {
            KvmKind::Hardware => None,
            KvmKind::Pvm => Some(PVM_CMDLINE),
        }
    }

    /// The one-line warning to print on a host that slows guests down, if any.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            KvmKind::Hardware => None,
            KvmKind::Pvm => Some(
                "this host's KVM is PVM (kvm_pvm): guest kernel code is emulated, \
                 so a micro-VM boots in about a minute instead of about 100 ms",
            ),
        }
    }
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmKind::Hardware => "hardware",
            KvmKind::Pvm => "pvm",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_is_recognised_by_its_module() {
        let dir = std::env::temp_dir().join(format!("hull-host-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(KvmKind::detect_in(&dir), KvmKind::Hardware);
        assert_eq!(KvmKind::Hardware.extra_cmdline(), None);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmKind::detect_in(&dir), KvmKind::Pvm);
        assert!(KvmKind::Pvm
            .extra_cmdline()
            .unwrap()
            .contains("hull_pvm_syscall"));
        assert!(KvmKind::Pvm.warning().unwrap().contains("emulated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
