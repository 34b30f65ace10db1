//! `hull`: the runc-compatible OCI runtime CLI. For now it has `doctor`, which tells whether
//! this host can run hull's micro-VMs and how; the OCI verbs come next.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvm_ioctls::{Cap, Kvm};
use vmm::KvmKind;

#[derive(Parser)]
#[command(name = "hull", version, about = "Run OCI containers in micro-VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run hull micro-VMs, and how.
    Doctor,
}

/// Where hull looks for its guest kernel and initramfs: `$HULL_GUEST_DIR`, an installed
/// `../share/hull/guest` next to the binary, or the workspace's `build/guest`.
fn guest_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("HULL_GUEST_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(bin_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        dirs.push(bin_dir.join("../share/hull/guest"));
        // target/<profile>/hull in a checkout.
        dirs.push(bin_dir.join("../../build/guest"));
    }
    dirs
}

fn doctor() -> ExitCode {
    let mut ok = true;
    let kind = KvmKind::detect();
    match Kvm::new() {
        Ok(kvm) => {
            println!(
                "kvm: /dev/kvm usable, API version {}",
                kvm.get_api_version()
            );
            println!("kvm kind: {kind}");
            if let Some(warning) = kind.warning() {
                println!("warning: {warning}");
            }
            println!("max vCPUs per VM: {}", kvm.get_max_vcpus());
            for (cap, name) in [
                (Cap::Irqchip, "IRQCHIP"),
                (Cap::Pit2, "PIT2"),
                (Cap::Irqfd, "IRQFD"),
                (Cap::Ioeventfd, "IOEVENTFD"),
                (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            ] {
                let present = kvm.check_extension(cap);
                ok &= present;
                println!(
                    "capability {name}: {}",
                    if present { "yes" } else { "MISSING" }
                );
            }
        }
        Err(err) => {
            ok = false;
            println!("kvm: cannot open /dev/kvm: {err}");
        }
    }
    match guest_dirs()
        .into_iter()
        .find(|d| d.join("vmlinux").is_file() && d.join("initramfs.cpio").is_file())
    {
        Some(dir) => println!("guest: {}", dir.canonicalize().unwrap_or(dir).display()),
        None => {
            ok = false;
            println!("guest: no vmlinux and initramfs.cpio found (run `make kernel agent`)");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Doctor => doctor(),
    }
}
