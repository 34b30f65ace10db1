//! The VM's configuration: plain data, read from a JSON file or built from flags, validated
//! before anything is created so that a bad value is reported with its field and nothing is
//! left behind.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest memory.
pub const DEFAULT_MEM_SIZE_MIB: u32 = 256;
/// Smallest guest memory that fits a kernel, an initramfs and the boot structures.
pub const MIN_MEM_SIZE_MIB: u32 = 32;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEM_SIZE_MIB: u32 = 1 << 20;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    /// hull-vmm's standard output.
    #[default]
    Stdout,
    /// Discarded.
    Null,
    /// Appended to a file.
    File(PathBuf),
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" => Ok(Self::Null),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(format!(
                    "console {s:?} is not one of stdout, null or file:PATH"
                )),
            },
        }
    }
}

/// Everything hull-vmm needs to boot a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux` booted with the 64-bit boot protocol.
    pub kernel: PathBuf,
    /// Uncompressed (newc cpio) initramfs whose `/init` is the guest agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line appended to hull's own.
    #[serde(default)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_mem_size_mib")]
    pub mem_size_mib: u32,
    /// Where the serial console goes.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Show the guest kernel's boot messages; by default the kernel boots `quiet`.
    #[serde(default)]
    pub boot_messages: bool,
}

fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}

fn default_mem_size_mib() -> u32 {
    DEFAULT_MEM_SIZE_MIB
}

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid JSON for a `VmConfig`.
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A field has a value hull cannot use.
    #[error("field `{field}` = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initramfs: None,
            cmdline: String::new(),
            vcpus: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            console: ConsoleConfig::default(),
            boot_messages: false,
        }
    }

    /// Reads and validates a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks every field that can be checked without KVM; `max_vcpus` is the host's limit.
    pub fn validate(&self, max_vcpus: usize) -> Result<(), ConfigError> {
        let invalid = |field, value: String, reason: String| ConfigError::Invalid {
            field,
            value,
            reason,
        };
        check_file("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_file("initramfs", initramfs)?;
        }
        if self.vcpus == 0 || usize::from(self.vcpus) > max_vcpus {
            return Err(invalid(
                "vcpus",
                self.vcpus.to_string(),
                format!("this host runs 1 to {max_vcpus} vCPUs per VM"),
            ));
        }
        if !(MIN_MEM_SIZE_MIB..=MAX_MEM_SIZE_MIB).contains(&self.mem_size_mib) {
            return Err(invalid(
                "mem_size_mib",
                self.mem_size_mib.to_string(),
                format!("must be from {MIN_MEM_SIZE_MIB} to {MAX_MEM_SIZE_MIB}"),
            ));
        }
        if self.cmdline.contains('\0') || self.cmdline.contains('\n') {
            return Err(invalid(
                "cmdline",
                format!("{:?}", self.cmdline),
                "must not contain NUL or newline".into(),
            ));
        }
        Ok(())
    }
}

fn check_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let reason = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(_) => "is not a regular file".to_owned(),
        Err(err) => err.to_string(),
    };
    Err(ConfigError::Invalid {
        field,
        value: path.display().to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing_file() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    #[test]
    fn json_with_defaults() {
        let cfg: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(cfg, VmConfig::new("/k".into()));
        let cfg: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "initramfs": "/i", "vcpus": 2, "mem_size_mib": 512,
                "console": {"file": "/tmp/c.log"}, "cmdline": "x=1", "boot_messages": true}"#,
        )
        .unwrap();
        assert_eq!(cfg.console, ConsoleConfig::File("/tmp/c.log".into()));
        assert_eq!((cfg.vcpus, cfg.mem_size_mib), (2, 512));
    }

    #[test]
    fn unknown_fields_and_bad_types_name_the_field() {
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpu": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpus": -1}"#).unwrap_err();
        assert!(err.to_string().contains("-1"), "{err}");
    }

    #[test]
    fn validation_names_field_and_value() {
        let mut cfg = VmConfig::new(existing_file());
        cfg.validate(2).unwrap();

        cfg.vcpus = 3;
        let err = cfg.validate(2).unwrap_err().to_string();
        assert_eq!(err, "field `vcpus` = 3: this host runs 1 to 2 vCPUs per VM");

        cfg.vcpus = 1;
        cfg.mem_size_mib = 4;
        let err = cfg.validate(2).unwrap_err().to_string();
        assert!(err.starts_with("field `mem_size_mib` = 4:"), "{err}");

        cfg.mem_size_mib = 64;
        cfg.kernel = "/no/such/vmlinux".into();
        let err = cfg.validate(2).unwrap_err().to_string();
        assert!(
            err.starts_with("field `kernel` = /no/such/vmlinux: No such file"),
            "{err}"
        );

        cfg.kernel = existing_file();
        cfg.initramfs = Some(std::env::temp_dir());
        let err = cfg.validate(2).unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");
    }

    #[test]
    fn bad_file_names_the_path() {
        let err = VmConfig::from_file(Path::new("/no/such/config.json")).unwrap_err();
        assert!(err.to_string().contains("/no/such/config.json"), "{err}");
    }

    #[test]
    fn console_flag_syntax() {
        assert_eq!(
            "stdout".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Stdout
        );
        assert_eq!(
            "null".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Null
        );
        assert_eq!(
            "file:/tmp/x".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/tmp/x".into())
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }
}
