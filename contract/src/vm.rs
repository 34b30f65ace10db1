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

/// A host directory the guest mounts over virtio-fs (`mount -t virtiofs TAG DIR`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDirConfig {
    /// The mount tag: 1 to 36 bytes.
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
    /// Refuse every change (the OCI spec's `root.readonly`).
    #[serde(default)]
    pub read_only: bool,
    /// Host paths hull-vmm binds into `path`, in its own mount namespace, before it shares it:
    /// how a container's bind mounts reach the guest. Each goes on `path/<name>`, which must
    /// exist (an empty file or directory, like the source).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<HostBind>,
}

/// A host file or directory bound into a shared directory (see [`SharedDirConfig::binds`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostBind {
    /// The host path (absolute; symbolic links in it are followed, as `mount(2)` does).
    pub source: PathBuf,
    /// The entry of the shared directory it goes on: one plain file name.
    pub name: String,
    /// Bound read-only: the file server's writes fail with `EROFS`.
    #[serde(default)]
    pub read_only: bool,
    /// With the mounts below the source (`rbind`).
    #[serde(default)]
    pub recursive: bool,
}

/// Longest virtio-fs tag (the size of the device's config-space field).
pub const MAX_TAG_LEN: usize = 36;

impl std::str::FromStr for SharedDirConfig {
    type Err = String;

    /// `TAG=PATH` or `TAG=PATH:ro`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tag, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("shared directory {s:?} is not TAG=PATH[:ro]"))?;
        let (path, read_only) = match rest.strip_suffix(":ro") {
            Some(path) => (path, true),
            None => (rest, false),
        };
        Ok(Self {
            tag: tag.to_owned(),
            path: path.into(),
            read_only,
            binds: Vec::new(),
        })
    }
}

/// The guest's virtio-vsock device, backed by Unix sockets on the host: host programs connect
/// to `uds_path` and write `CONNECT <port>\n`; guest connections to host port P arrive at
/// `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 and up).
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u64,
    /// The Unix socket the VMM listens on; must not exist yet.
    pub uds_path: PathBuf,
}

fn default_guest_cid() -> u64 {
    3
}

/// A virtio-net device backed by a TAP of hull-vmm's network namespace, opened (and created if
/// missing) before the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP's name (1 to 15 bytes).
    pub tap: String,
    /// The guest NIC's MAC, `aa:bb:cc:dd:ee:ff`: unicast, not all zeros.
    pub mac: String,
    /// The guest NIC's MTU (68 and up).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

fn default_mtu() -> u16 {
    1500
}

impl NetConfig {
    /// The MAC's six bytes, if it is one a guest NIC can take.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        hull_protocol::parse_mac(&self.mac)
    }
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `TAP=MAC` or `TAP=MAC/MTU`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tap, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("network device {s:?} is not TAP=MAC[/MTU]"))?;
        let (mac, mtu) = match rest.split_once('/') {
            Some((mac, mtu)) => (
                mac,
                mtu.parse()
                    .map_err(|_| format!("network device {s:?}: MTU {mtu:?} is not a number"))?,
            ),
            None => (rest, default_mtu()),
        };
        Ok(Self {
            tap: tap.to_owned(),
            mac: mac.to_owned(),
            mtu,
        })
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
    /// Host directories shared with the guest over virtio-fs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_dirs: Vec<SharedDirConfig>,
    /// The virtio-vsock device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// virtio-net devices, one per TAP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// Empty NIC slots, filled while the VM runs with TAPs of hull-vmm's network namespace
    /// (a container's interfaces, mirrored): at most [`MAX_NIC_SLOTS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nic_slots: u8,
    /// The network namespace hull-vmm lives in, joined or made before the jail; without one
    /// the jail gives it a new, empty one (the TAPs of `net` are opened before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetNamespace>,
}

/// The most NIC slots a VM has (each is a virtio-mmio device with an interrupt line).
pub const MAX_NIC_SLOTS: u8 = 8;

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Where hull-vmm's network namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NetNamespace {
    /// A new one, made for the VM: it is the container's (`/proc/<hull-vmm>/ns/net`).
    New,
    /// The namespace file at this path (a container's `linux.namespaces[].path`), joined.
    Path(PathBuf),
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
            shared_dirs: Vec::new(),
            vsock: None,
            net: Vec::new(),
            nic_slots: 0,
            netns: None,
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
        if self.nic_slots > MAX_NIC_SLOTS {
            return Err(invalid(
                "nic_slots",
                self.nic_slots.to_string(),
                format!("a VM has at most {MAX_NIC_SLOTS}"),
            ));
        }
        if let Some(NetNamespace::Path(path)) = &self.netns {
            if !path.is_absolute() {
                return Err(invalid(
                    "netns.path",
                    format!("{:?}", path.display().to_string()),
                    "must be an absolute path".into(),
                ));
            }
        }
        let mut taps = std::collections::HashSet::new();
        for net in &self.net {
            if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains(['\0', '/']) {
                return Err(invalid(
                    "net.tap",
                    format!("{:?}", net.tap),
                    "must be an interface name of 1 to 15 bytes".into(),
                ));
            }
            if !taps.insert(net.tap.as_str()) {
                return Err(invalid(
                    "net.tap",
                    format!("{:?}", net.tap),
                    "is used twice".into(),
                ));
            }
            if net.mac_bytes().is_none() {
                return Err(invalid(
                    "net.mac",
                    format!("{:?}", net.mac),
                    "must be a unicast MAC other than all zeros, as aa:bb:cc:dd:ee:ff".into(),
                ));
            }
            if net.mtu < 68 {
                return Err(invalid(
                    "net.mtu",
                    net.mtu.to_string(),
                    "must be at least 68 (virtio-net's minimum)".into(),
                ));
            }
        }
        let mut tags = std::collections::HashSet::new();
        for dir in &self.shared_dirs {
            if dir.tag.is_empty() || dir.tag.len() > MAX_TAG_LEN || dir.tag.contains('\0') {
                return Err(invalid(
                    "shared_dirs.tag",
                    format!("{:?}", dir.tag),
                    format!("must be 1 to {MAX_TAG_LEN} bytes without NUL"),
                ));
            }
            if !tags.insert(dir.tag.as_str()) {
                return Err(invalid(
                    "shared_dirs.tag",
                    format!("{:?}", dir.tag),
                    "is used twice".into(),
                ));
            }
            match std::fs::metadata(&dir.path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(invalid(
                        "shared_dirs.path",
                        dir.path.display().to_string(),
                        "is not a directory".into(),
                    ))
                }
                Err(err) => {
                    return Err(invalid(
                        "shared_dirs.path",
                        dir.path.display().to_string(),
                        err.to_string(),
                    ))
                }
            }
            for bind in &dir.binds {
                let plain = !bind.name.is_empty()
                    && bind.name != "."
                    && bind.name != ".."
                    && !bind.name.contains(['/', '\0']);
                if !plain {
                    return Err(invalid(
                        "shared_dirs.binds.name",
                        format!("{:?}", bind.name),
                        "must be one plain file name".into(),
                    ));
                }
                if !bind.source.is_absolute() {
                    return Err(invalid(
                        "shared_dirs.binds.source",
                        bind.source.display().to_string(),
                        "must be absolute".into(),
                    ));
                }
            }
        }
        if let Some(vsock) = &self.vsock {
            if !(3..u64::from(u32::MAX)).contains(&vsock.guest_cid) {
                return Err(invalid(
                    "vsock.guest_cid",
                    vsock.guest_cid.to_string(),
                    "must be from 3 to 4294967294".into(),
                ));
            }
            let uds = || vsock.uds_path.display().to_string();
            if vsock.uds_path.symlink_metadata().is_ok() {
                return Err(invalid("vsock.uds_path", uds(), "already exists".into()));
            }
            let parent = vsock
                .uds_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty());
            if let Some(parent) = parent {
                if !parent.is_dir() {
                    return Err(invalid(
                        "vsock.uds_path",
                        uds(),
                        format!("directory {} does not exist", parent.display()),
                    ));
                }
            }
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
    fn net_devices_parse_and_validate_naming_field_and_value() {
        let net: NetConfig = "tap0=02:00:00:00:00:01/9000".parse().unwrap();
        assert_eq!((net.tap.as_str(), net.mtu), ("tap0", 9000));
        assert_eq!(net.mac_bytes(), Some([2, 0, 0, 0, 0, 1]));
        let net: NetConfig = "tap0=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(net.mtu, 1500);
        assert!("tap0".parse::<NetConfig>().is_err());
        assert!("tap0=02:00:00:00:00:01/big".parse::<NetConfig>().is_err());

        let mut cfg = VmConfig::new(existing_file());
        let check = |cfg: &mut VmConfig, net: &str| {
            cfg.net = vec![net.parse().unwrap()];
            cfg.validate(2).err().map(|e| e.to_string())
        };
        assert_eq!(check(&mut cfg, "tap0=02:00:00:00:00:01"), None);
        assert_eq!(
            check(&mut cfg, "tap0=01:00:00:00:00:01").as_deref(),
            Some(
                "field `net.mac` = \"01:00:00:00:00:01\": must be a unicast MAC other than all \
                 zeros, as aa:bb:cc:dd:ee:ff"
            )
        );
        for bad in [
            "tap0=00:00:00:00:00:00",
            "tap0=02:00:00:00:00",
            "tap0=02:00:00:00:00:0g",
        ] {
            assert!(
                check(&mut cfg, bad).is_some_and(|e| e.contains("net.mac")),
                "{bad}"
            );
        }
        assert!(check(&mut cfg, "tap0=02:00:00:00:00:01/67").is_some_and(|e| e.contains("net.mtu")));
        assert!(check(&mut cfg, "a-name-far-too-long=02:00:00:00:00:01")
            .is_some_and(|e| e.contains("net.tap")));
        cfg.net = vec!["t=02:00:00:00:00:01".parse().unwrap(); 2];
        assert!(cfg
            .validate(2)
            .unwrap_err()
            .to_string()
            .contains("is used twice"));
    }

    #[test]
    fn shared_dirs_parse_and_validate() {
        let dir: SharedDirConfig = "rootfs=/tmp:ro".parse().unwrap();
        assert_eq!((dir.tag.as_str(), dir.read_only), ("rootfs", true));
        assert_eq!(dir.path, PathBuf::from("/tmp"));
        assert!(!"data=/srv".parse::<SharedDirConfig>().unwrap().read_only);
        assert!("no-equals".parse::<SharedDirConfig>().is_err());

        let mut cfg = VmConfig::new(existing_file());
        cfg.shared_dirs = vec!["a=/tmp".parse().unwrap(), "a=/".parse().unwrap()];
        let err = cfg.validate(1).unwrap_err().to_string();
        assert_eq!(err, "field `shared_dirs.tag` = \"a\": is used twice");
        cfg.shared_dirs = vec!["b=/no/such/dir".parse().unwrap()];
        let err = cfg.validate(1).unwrap_err().to_string();
        assert!(
            err.starts_with("field `shared_dirs.path` = /no/such/dir:"),
            "{err}"
        );
        cfg.shared_dirs = vec![format!("{}=/tmp", "t".repeat(37)).parse().unwrap()];
        assert!(cfg.validate(1).is_err());
        let json = r#"{"kernel": "/k", "shared_dirs": [{"tag": "rootfs", "path": "/srv", "read_only": true}]}"#;
        let cfg: VmConfig = serde_json::from_str(json).unwrap();
        assert!(cfg.shared_dirs[0].read_only);
    }

    #[test]
    fn vsock_is_validated() {
        let mut cfg = VmConfig::new(existing_file());
        cfg.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: std::env::temp_dir().join("hull-vsock-validate"),
        });
        let err = cfg.validate(1).unwrap_err().to_string();
        assert!(err.starts_with("field `vsock.guest_cid` = 2"), "{err}");
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: existing_file(),
        });
        let err = cfg.validate(1).unwrap_err().to_string();
        assert!(err.ends_with("already exists"), "{err}");
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/no/such/dir/v.sock".into(),
        });
        let err = cfg.validate(1).unwrap_err().to_string();
        assert!(
            err.contains("directory /no/such/dir does not exist"),
            "{err}"
        );
        let cfg: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "vsock": {"uds_path": "/run/v.sock"}}"#)
                .unwrap();
        assert_eq!(cfg.vsock.unwrap().guest_cid, 3);
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
