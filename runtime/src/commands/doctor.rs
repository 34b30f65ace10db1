//! `hull doctor`: whether this host can run hull's micro-VMs, and how. The KVM part (hardware
//! or PVM, the capabilities hull needs) comes from `hull-vmm --check-host`, since hull-vmm is
//! the process that uses KVM; then where the guest kernel and initramfs are, and the VM
//! templates containers are restored from.

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
    let cache = crate::template::cache_dir();
    let templates = crate::template::list(&cache);
    out!(
        "templates: {} in {}{}",
        templates.len(),
        cache.display(),
        if templates.is_empty() {
            " (the first container of each kernel and VM shape builds one)"
        } else {
            ""
        }
    );
    for (dir, key) in templates {
        let age = crate::template::built_at(&dir)
            .and_then(|t| t.elapsed().ok())
            .map_or_else(|| "?".to_owned(), |d| format!("{} s", d.as_secs()));
        let memory = std::fs::metadata(dir.join("memory")).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        let shares: Vec<String> = key
            .shared_dirs
            .iter()
            .map(|(tag, ro)| format!("{tag}{}", if *ro { ":ro" } else { "" }))
            .collect();
        out!(
            "template {}: {} vCPUs, {} MiB ({} MiB on disk), shares [{}], kernel {}, built {age} ago",
            dir.display(),
            key.vcpus,
            key.mem_size_mib,
            memory >> 20,
            shares.join(" "),
            key.kernel.path.display(),
        );
    }
    i32::from(!ok)
}
