//! Deciding whether this process may act as init at all, and where.
//!
//! The agent acts as init only as PID 1, in one of two modes:
//! - **Guest**: PID 1 with an initramfs (ramfs or tmpfs) as `/`. That second condition keeps a
//!   host's PID 1 (or a container's) from ever mistaking itself for a guest.
//! - **Test**: asked for with [`ENV_TEST_ROOT`], for the host tests. The agent must be PID 1 of
//!   a PID namespace other than the initial one and other than the harness's
//!   ([`ENV_TEST_PARENT_PIDNS`], the inode of the harness's `/proc/self/ns/pid`), so "power off"
//!   only ends that namespace. It enters a private mount namespace of its own before mounting
//!   anything, mounts under the test root instead of `/`, and takes the hooks below.
//!
//! Anything else is refused with exit status 2 before the agent changes anything.

use std::path::PathBuf;

use nix::sys::statfs::{FsType, TMPFS_MAGIC};

use crate::init::RAMFS_MAGIC;
use crate::power::{self, PowerTarget};

/// Test mode: the directory to mount under instead of `/`. Must be absolute.
pub const ENV_TEST_ROOT: &str = "HULL_AGENT_TEST_ROOT";
/// Test mode: the inode number of the harness's PID namespace.
pub const ENV_TEST_PARENT_PIDNS: &str = "HULL_AGENT_TEST_PARENT_PIDNS";
/// Test mode: a kernel command line to use instead of `/proc/cmdline`.
pub const ENV_TEST_CMDLINE: &str = "HULL_AGENT_TEST_CMDLINE";
/// Test mode: a command for `/bin/sh -c`, started after the readiness line.
pub const ENV_TEST_EXEC: &str = "HULL_AGENT_TEST_EXEC";
/// Test mode: if `1`, panic after the readiness line (tests the panic hook).
pub const ENV_TEST_PANIC: &str = "HULL_AGENT_TEST_PANIC";
/// Test mode: the shell the `hull.exec` hook runs instead of `/bin/sh` (tests a missing shell).
pub const ENV_TEST_SHELL: &str = "HULL_AGENT_TEST_SHELL";
/// Test mode: the Unix socket to listen on instead of vsock `CONTROL_PORT` (with `hull.serve`).
pub const ENV_TEST_CONTROL_SOCKET: &str = "HULL_AGENT_TEST_CONTROL_SOCKET";
/// Test mode: the Unix socket to listen on instead of vsock `STDIO_PORT` (with `hull.serve`).
pub const ENV_TEST_STDIO_SOCKET: &str = "HULL_AGENT_TEST_STDIO_SOCKET";
/// Test mode: a directory bind-mounted as the container's rootfs instead of the virtio-fs share.
pub const ENV_TEST_ROOTFS: &str = "HULL_AGENT_TEST_ROOTFS";

/// Why the agent refuses to act as init.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("not PID 1 (pid {pid}): hull-agent runs only as the init of a hull guest")]
    NotPid1 { pid: i32 },
    #[error("root file system type {fs_type:#x} is not an initramfs (ramfs or tmpfs)")]
    RootNotInitramfs { fs_type: i64 },
    #[error("cannot tell the root file system type")]
    RootUnknown,
    #[error("{ENV_TEST_ROOT} must be an absolute path, got {root:?}")]
    TestRootNotAbsolute { root: String },
    #[error("{ENV_TEST_PARENT_PIDNS} must be the harness's PID namespace inode, got {value:?}")]
    TestParentPidns { value: Option<String> },
    #[error("cannot tell this process's PID namespace")]
    OwnPidnsUnknown,
    #[error(
        "PID namespace {own} is not a throwaway one (initial or the harness's): refusing test mode"
    )]
    NotThrowawayPidns { own: u64 },
}

/// Test mode settings, see the `ENV_TEST_*` constants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestConfig {
    pub root: PathBuf,
    pub parent_pidns: u64,
    pub cmdline: Option<String>,
    pub exec: Option<String>,
    pub panic: bool,
    pub shell: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub stdio_socket: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
}

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Guest,
    Test(TestConfig),
}

impl Mode {
    /// The directory the early mounts go under.
    pub fn root(&self) -> PathBuf {
        match self {
            Mode::Guest => PathBuf::from("/"),
            Mode::Test(config) => config.root.clone(),
        }
    }

    /// The shell of the `hull.exec` hook.
    pub fn boot_command_shell(&self) -> PathBuf {
        match self {
            Mode::Test(TestConfig {
                shell: Some(shell), ..
            }) => shell.clone(),
            _ => PathBuf::from(crate::boot_command::SHELL),
        }
    }

    /// What "power off" does in this mode.
    pub fn power_target(&self) -> PowerTarget {
        match self {
            Mode::Guest => PowerTarget::Guest,
            Mode::Test(config) => PowerTarget::TestNamespace {
                parent_pidns: config.parent_pidns,
            },
        }
    }
}

/// What [`decide`] looks at, gathered by [`Facts::of_this_process`] (or made up in tests).
#[derive(Debug, Clone)]
pub struct Facts {
    pub pid: i32,
    /// Inode of our PID namespace.
    pub own_pidns: Option<u64>,
    /// `statfs("/")` type.
    pub root_fs: Option<FsType>,
    /// The `ENV_TEST_*` variables that are set.
    pub env: Vec<(&'static str, String)>,
}

impl Facts {
    pub fn of_this_process() -> Self {
        let env = [
            ENV_TEST_ROOT,
            ENV_TEST_PARENT_PIDNS,
            ENV_TEST_CMDLINE,
            ENV_TEST_EXEC,
            ENV_TEST_PANIC,
            ENV_TEST_SHELL,
            ENV_TEST_CONTROL_SOCKET,
            ENV_TEST_STDIO_SOCKET,
            ENV_TEST_ROOTFS,
        ]
        .into_iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| (name, v)))
        .collect();
        Self {
            pid: nix::unistd::getpid().as_raw(),
            own_pidns: power::own_pidns().ok(),
            root_fs: nix::sys::statfs::statfs("/")
                .ok()
                .map(|s| s.filesystem_type()),
            env,
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decides the mode, or why the agent must not act as init.
pub fn decide(facts: &Facts) -> Result<Mode, ModeError> {
    if facts.pid != 1 {
        return Err(ModeError::NotPid1 { pid: facts.pid });
    }
    let Some(root) = facts.var(ENV_TEST_ROOT) else {
        return match facts.root_fs {
            Some(fs) if fs == RAMFS_MAGIC || fs == TMPFS_MAGIC => Ok(Mode::Guest),
            Some(fs) => Err(ModeError::RootNotInitramfs { fs_type: fs.0 }),
            None => Err(ModeError::RootUnknown),
        };
    };
    let root = PathBuf::from(root);
    if !root.is_absolute() {
        return Err(ModeError::TestRootNotAbsolute {
            root: root.display().to_string(),
        });
    }
    let parent_pidns = facts.var(ENV_TEST_PARENT_PIDNS);
    let parent_pidns = parent_pidns
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ModeError::TestParentPidns {
            value: parent_pidns.map(str::to_owned),
        })?;
    let own = facts.own_pidns.ok_or(ModeError::OwnPidnsUnknown)?;
    if !power::is_throwaway_pidns(own, parent_pidns) {
        return Err(ModeError::NotThrowawayPidns { own });
    }
    Ok(Mode::Test(TestConfig {
        root,
        parent_pidns,
        cmdline: facts.var(ENV_TEST_CMDLINE).map(str::to_owned),
        exec: facts.var(ENV_TEST_EXEC).map(str::to_owned),
        panic: facts.var(ENV_TEST_PANIC) == Some("1"),
        shell: facts.var(ENV_TEST_SHELL).map(PathBuf::from),
        control_socket: facts.var(ENV_TEST_CONTROL_SOCKET).map(PathBuf::from),
        stdio_socket: facts.var(ENV_TEST_STDIO_SOCKET).map(PathBuf::from),
        rootfs: facts.var(ENV_TEST_ROOTFS).map(PathBuf::from),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::PROC_PID_INIT_INO;
    use nix::sys::statfs::EXT4_SUPER_MAGIC;
    use std::path::Path;

    const HARNESS_NS: u64 = 4_026_532_177;
    const OWN_NS: u64 = 4_026_532_200;

    fn facts(pid: i32, root_fs: FsType, env: &[(&'static str, &str)]) -> Facts {
        Facts {
            pid,
            own_pidns: Some(OWN_NS),
            root_fs: Some(root_fs),
            env: env.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn guest_needs_pid1_and_an_initramfs() {
        assert_eq!(decide(&facts(1, RAMFS_MAGIC, &[])), Ok(Mode::Guest));
        assert_eq!(decide(&facts(1, TMPFS_MAGIC, &[])), Ok(Mode::Guest));
        assert_eq!(
            decide(&facts(1, EXT4_SUPER_MAGIC, &[])),
            Err(ModeError::RootNotInitramfs {
                fs_type: EXT4_SUPER_MAGIC.0
            })
        );
        assert_eq!(
            decide(&facts(42, RAMFS_MAGIC, &[])),
            Err(ModeError::NotPid1 { pid: 42 })
        );
    }

    #[test]
    fn test_mode_needs_pid1_of_a_throwaway_namespace() {
        let env = [
            (ENV_TEST_ROOT, "/tmp/x"),
            (ENV_TEST_PARENT_PIDNS, "4026532177"),
        ];
        let Ok(Mode::Test(config)) = decide(&facts(1, EXT4_SUPER_MAGIC, &env)) else {
            panic!("test mode refused");
        };
        assert_eq!(config.root, PathBuf::from("/tmp/x"));
        assert_eq!(config.parent_pidns, HARNESS_NS);
        assert!(!config.panic);
        assert_eq!(config.shell, None);

        assert_eq!(
            decide(&facts(7, EXT4_SUPER_MAGIC, &env)),
            Err(ModeError::NotPid1 { pid: 7 })
        );
        let mut same = facts(1, EXT4_SUPER_MAGIC, &env);
        same.own_pidns = Some(HARNESS_NS);
        assert_eq!(
            decide(&same),
            Err(ModeError::NotThrowawayPidns { own: HARNESS_NS })
        );
        let mut initial = facts(1, EXT4_SUPER_MAGIC, &env);
        initial.own_pidns = Some(PROC_PID_INIT_INO);
        assert_eq!(
            decide(&initial),
            Err(ModeError::NotThrowawayPidns {
                own: PROC_PID_INIT_INO
            })
        );
        let mut unknown = facts(1, EXT4_SUPER_MAGIC, &env);
        unknown.own_pidns = None;
        assert_eq!(decide(&unknown), Err(ModeError::OwnPidnsUnknown));
    }

    #[test]
    fn test_mode_settings_are_checked() {
        assert_eq!(
            decide(&facts(1, RAMFS_MAGIC, &[(ENV_TEST_ROOT, "/tmp/x")])),
            Err(ModeError::TestParentPidns { value: None })
        );
        assert_eq!(
            decide(&facts(
                1,
                RAMFS_MAGIC,
                &[
                    (ENV_TEST_ROOT, "/tmp/x"),
                    (ENV_TEST_PARENT_PIDNS, "pid:[1]")
                ]
            )),
            Err(ModeError::TestParentPidns {
                value: Some("pid:[1]".to_owned())
            })
        );
        assert_eq!(
            decide(&facts(
                1,
                RAMFS_MAGIC,
                &[(ENV_TEST_ROOT, "tmp/x"), (ENV_TEST_PARENT_PIDNS, "1")]
            )),
            Err(ModeError::TestRootNotAbsolute {
                root: "tmp/x".to_owned()
            })
        );
        let env = [
            (ENV_TEST_ROOT, "/r"),
            (ENV_TEST_PARENT_PIDNS, "1"),
            (ENV_TEST_CMDLINE, "hull.poweroff=ready"),
            (ENV_TEST_EXEC, "true"),
            (ENV_TEST_PANIC, "1"),
            (ENV_TEST_SHELL, "/no/sh"),
        ];
        let Ok(Mode::Test(config)) = decide(&facts(1, RAMFS_MAGIC, &env)) else {
            panic!("test mode refused");
        };
        assert_eq!(config.cmdline.as_deref(), Some("hull.poweroff=ready"));
        assert_eq!(config.exec.as_deref(), Some("true"));
        assert!(config.panic);
        assert_eq!(config.shell.as_deref(), Some(Path::new("/no/sh")));
        assert_eq!(
            Mode::Test(config).boot_command_shell(),
            PathBuf::from("/no/sh")
        );
        assert_eq!(Mode::Guest.boot_command_shell(), PathBuf::from("/bin/sh"));
    }
}
