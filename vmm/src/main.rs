//! `hull-vmm`: boots one micro-VM and exits with its status.
//!
//! Exit status: 0 when the guest powers off or resets, 1 when the VM fails (triple fault, an
//! instruction nobody can emulate), 2 when it cannot be started (bad configuration, no KVM).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::config::{ConsoleConfig, VmConfig, DEFAULT_MEM_SIZE_MIB, DEFAULT_VCPUS};
use vmm::KvmKind;

#[derive(Parser, Debug)]
#[command(name = "hull-vmm", version, about = "Boot one hull micro-VM")]
struct Args {
    /// VM configuration as a JSON file (exclusive with the flags below).
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline", "vcpus", "mem_size_mib", "console", "boot_messages", "shared_dir", "vsock_uds", "vsock_cid"])]
    config: Option<PathBuf>,
    /// Uncompressed ELF vmlinux.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Uncompressed newc initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line appended to hull's own.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long = "mem-size-mib")]
    mem_size_mib: Option<u32>,
    /// Console: stdout, null or file:PATH.
    #[arg(long)]
    console: Option<ConsoleConfig>,
    /// Show the guest kernel's boot messages.
    #[arg(long)]
    boot_messages: bool,
    /// Share a host directory over virtio-fs: TAG=PATH or TAG=PATH:ro (repeatable).
    #[arg(long = "shared-dir")]
    shared_dir: Vec<vmm::config::SharedDirConfig>,
    /// Give the guest a virtio-vsock device backed by this Unix socket.
    #[arg(long = "vsock-uds")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long = "vsock-cid", default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,
    /// Log level on standard error: error, warn, info, debug.
    #[arg(long, default_value = "warn", value_parser = parse_level)]
    log_level: log::LevelFilter,
}

impl Args {
    fn into_config(self) -> Result<VmConfig, vmm::config::ConfigError> {
        if let Some(path) = self.config {
            return VmConfig::from_file(&path);
        }
        let mut config = VmConfig::new(
            self.kernel
                .expect("clap requires --kernel without --config"),
        );
        config.initramfs = self.initramfs;
        config.cmdline = self.cmdline.unwrap_or_default();
        config.vcpus = self.vcpus.unwrap_or(DEFAULT_VCPUS);
        config.mem_size_mib = self.mem_size_mib.unwrap_or(DEFAULT_MEM_SIZE_MIB);
        config.console = self.console.unwrap_or_default();
        config.boot_messages = self.boot_messages;
        config.shared_dirs = self.shared_dir;
        config.vsock = self.vsock_uds.map(|uds_path| vmm::config::VsockConfig {
            guest_cid: self.vsock_cid,
            uds_path,
        });
        Ok(config)
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("log level {s:?} is not one of off, error, warn, info, debug, trace"))
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // fuse-backend-rs logs errors on bad guest input without any rate limit: a guest could
        // flood the VMM's log. Its messages show only when debugging.
        if metadata.target().starts_with("fuse_backend_rs")
            && log::max_level() < log::LevelFilter::Debug
        {
            return false;
        }
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "hull-vmm: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let args = Args::parse();
    log::set_max_level(args.log_level);
    let _ = log::set_logger(&StderrLogger);
    let config_path = args.config.clone();

    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("hull-vmm: error: {}", error_chain(&err));
            return ExitCode::from(2);
        }
    };
    let kind = KvmKind::detect();
    if let Some(warning) = kind.warning() {
        eprintln!("hull-vmm: warning: {warning}");
    }
    let vmm = match vmm::build(&config, kind) {
        Ok(vmm) => vmm,
        Err(err) => {
            let origin = config_path
                .map(|p| format!("config file {}: ", p.display()))
                .unwrap_or_default();
            eprintln!("hull-vmm: error: {origin}{}", error_chain(&err));
            return ExitCode::from(2);
        }
    };
    log::info!("kernel command line: {}", vmm.cmdline());
    match vmm.run() {
        Ok(outcome) => {
            let a = outcome.assists;
            log::info!(
                "{}; emulation assists: {} int3, {} fwait, {} xsave-family ({:.1} us each in the VMM)",
                outcome.exit,
                a.int3,
                a.fwait,
                a.xstate,
                a.xstate_ns as f64 / 1000.0 / a.xstate.max(1) as f64
            );
            let code = outcome.exit.exit_code();
            if code != 0 {
                eprintln!("hull-vmm: error: {}", outcome.exit);
            }
            ExitCode::from(code as u8)
        }
        Err(err) => {
            eprintln!("hull-vmm: error: {}", error_chain(&err));
            ExitCode::from(1)
        }
    }
}
