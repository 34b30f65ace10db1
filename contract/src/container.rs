//! What `hull` gives hull-vmm to run a container (`container.json`), and the one line hull-vmm
//! answers on its sync descriptor once the container exists in the guest, or cannot.

use std::path::{Path, PathBuf};

use hull_protocol::{CreateContainer, Stdio};
use serde::{Deserialize, Serialize};

/// What `hull` gives hull-vmm to run a container (`--container FILE`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// The request that creates the container (its id, spec, rootfs and init's stdio). None
    /// for a pod VM: it starts with no container, and its clients create the pod's containers
    /// (`CreateContainer::pod`) on the control socket.
    pub create: Option<CreateContainer>,
    /// Where to serve `hull` commands.
    pub control_socket: PathBuf,
    /// With a terminal: where to send the pty master (runc's `--console-socket`). Without
    /// one, hull-vmm's own standard streams are the container's.
    #[serde(default)]
    pub console_socket: Option<PathBuf>,
}

/// A container file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContainerConfigError {
    #[error("cannot read container file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container file {}: malformed", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("container file {}: field `console_socket` is missing: a terminal needs one", path.display())]
    NoConsoleSocket { path: PathBuf },
}

impl ContainerConfig {
    /// Reads a container configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ContainerConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ContainerConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self =
            serde_json::from_str(&text).map_err(|source| ContainerConfigError::Malformed {
                path: path.to_owned(),
                source,
            })?;
        let terminal = config
            .create
            .as_ref()
            .is_some_and(|c| matches!(c.stdio, Stdio::Terminal { .. }));
        if terminal && config.console_socket.is_none() {
            return Err(ContainerConfigError::NoConsoleSocket {
                path: path.to_owned(),
            });
        }
        Ok(config)
    }
}

/// hull-vmm's one line on its sync descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateReport {
    /// The container is created; its init waits for `start_container`.
    Created,
    /// It could not be; the text says why.
    Failed(String),
    /// The snapshot it was to be restored from is unusable (corrupt, truncated, from another
    /// hull-vmm, host boot or VM shape); the text says why. The caller may rebuild it.
    BadSnapshot(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_config_round_trips_and_needs_a_console_socket_for_a_terminal() {
        let dir = std::env::temp_dir().join(format!("hull-ccfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = ContainerConfig {
            create: Some(CreateContainer {
                container_id: "c1".into(),
                spec: hull_protocol::spec::ContainerSpec {
                    process: hull_protocol::spec::Process {
                        terminal: true,
                        args: vec!["true".into()],
                        cwd: "/".into(),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                rootfs: hull_protocol::Rootfs {
                    fs_tag: "rootfs".into(),
                    readonly: false,
                    subdir: None,
                },
                stdio: Stdio::Terminal { rows: 24, cols: 80 },
                binds_fs_tag: None,
                pod: false,
            }),
            control_socket: dir.join("control.sock"),
            console_socket: Some(dir.join("console.sock")),
        };
        let path = dir.join("container.json");
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(ContainerConfig::from_file(&path).unwrap(), config);

        config.console_socket = None;
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        let err = ContainerConfig::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("console_socket"), "{err}");
        std::fs::write(&path, "{").unwrap();
        let err = ContainerConfig::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reports_are_one_json_line_each() {
        assert_eq!(
            serde_json::to_string(&CreateReport::Created).unwrap(),
            "\"created\""
        );
        assert_eq!(
            serde_json::to_string(&CreateReport::Failed("x".into())).unwrap(),
            "{\"failed\":\"x\"}"
        );
    }
}
