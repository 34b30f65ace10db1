//! A container's life on the host after `create` (`commands/create.rs`): the commands find it
//! by its state (`state.json`) and talk to its `hull-vmm` over the control socket
//! (`hull_contract::control`); `start`, `kill` and `delete`, which several commands share,
//! are here.
//!
//! `state.json` records what `hull` needs later: the VMM's pid and start time (so a reused pid
//! is never mistaken for the container), the bundle, whether `start` has run, and the spec's
//! hooks (poststop runs at `delete`). The status is derived: `stopped` once the VMM is gone
//! (or a zombie), else `created` or `running` as recorded.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hull_contract::control::Client;
use hull_protocol::{ProcessRef, RequestBody, ResponseBody};
use serde::{Deserialize, Serialize};

/// The OCI runtime spec version hull's state documents follow.
pub const OCI_VERSION: &str = "1.0.2";
/// For `start_container` and other requests to be answered.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
/// For a killed hull-vmm to be gone.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// What `state.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub id: String,
    /// hull-vmm's pid: the container's init as the host sees it.
    pub pid: i32,
    /// Its start time (`/proc/PID/stat` field 22), to tell a reused pid apart.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, UTC.
    pub created: String,
    /// Whether `start` has succeeded.
    pub started: bool,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The spec's `hooks` object (poststop runs at `delete`).
    #[serde(default)]
    pub hooks: serde_json::Value,
    /// hull-vmm's host cgroup (removed at `delete`).
    #[serde(default)]
    pub cgroup: Option<crate::cgroup::VmCgroup>,
    /// The container's network namespace on the host.
    #[serde(default)]
    pub network: Option<crate::network::Namespace>,
    /// Its interfaces mirrored into the VM (their TAPs and qdiscs are removed at `delete`).
    #[serde(default)]
    pub mirrored: Vec<crate::network::Mirrored>,
    /// A pod VM (`create --pod`): the VM is the pod's sandbox and runs no container of its
    /// own; the shim makes the pod's containers in it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pod: bool,
}

/// A container's status, as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

/// A container found under `--root`.
#[derive(Debug)]
pub struct Container {
    pub dir: PathBuf,
    pub saved: Saved,
}

impl Container {
    /// Loads `<root>/<id>/state.json`.
    pub fn load(root: &Path, id: &str) -> anyhow::Result<Self> {
        crate::state::validate_id(id)?;
        let dir = root.join(id);
        let path = dir.join("state.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {id} does not exist (no {})", path.display())
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let saved = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed state", path.display()))?;
        Ok(Self { dir, saved })
    }

    /// Every container under `root`, by id.
    pub fn list(root: &Path) -> anyhow::Result<Vec<Self>> {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", root.display())),
        };
        let mut containers = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("state.json").is_file() {
                match Self::load(root, &name) {
                    Ok(c) => containers.push(c),
                    Err(err) => log::warn!("{err:#}"),
                }
            }
        }
        containers.sort_by(|a, b| a.saved.id.cmp(&b.saved.id));
        Ok(containers)
    }

    pub fn status(&self) -> Status {
        if !process_alive(self.saved.pid, self.saved.pid_start) {
            Status::Stopped
        } else if self.saved.started {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// runc's state document.
    pub fn state_json(&self) -> serde_json::Value {
        let status = self.status();
        serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.saved.id,
            "pid": if status == Status::Stopped { 0 } else { self.saved.pid },
            "status": status.as_str(),
            "bundle": self.saved.bundle,
            "rootfs": self.saved.rootfs,
            "created": self.saved.created,
            "owner": "",
            "annotations": self.saved.annotations,
        })
    }

    /// The state the hooks get on standard input (the OCI runtime spec's `state`).
    pub fn hook_state(&self, status: Status) -> Vec<u8> {
        let mut state = serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.saved.id,
            "status": status.as_str(),
            "bundle": self.saved.bundle,
            "annotations": self.saved.annotations,
        });
        if status != Status::Stopped {
            state["pid"] = self.saved.pid.into();
        }
        serde_json::to_vec(&state).expect("a state serializes")
    }

    /// The spec's hooks, as recorded at `create`.
    fn hooks(&self) -> anyhow::Result<crate::hooks::Hooks> {
        let spec = serde_json::json!({ "hooks": self.saved.hooks });
        Ok(crate::hooks::parse_hooks(
            &spec,
            &self.dir.join("state.json"),
        )?)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// A connection to the container's hull-vmm.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::connect(&self.control_socket())
            .with_context(|| format!("cannot reach container {}", self.saved.id))
    }

    /// Rewrites `state.json` (atomically: a new file renamed over the old one).
    pub fn save(&self) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(&self.saved).expect("a state serializes"),
        )
    }

    /// `hull start`.
    pub fn start(&mut self) -> anyhow::Result<()> {
        match self.status() {
            Status::Created => {}
            Status::Running => bail!(
                "cannot start an already running container {}",
                self.saved.id
            ),
            Status::Stopped => bail!(
                "cannot start a container that has stopped: {}",
                self.saved.id
            ),
        }
        self.sync_network()
            .with_context(|| format!("cannot start container {}", self.saved.id))?;
        if self.saved.pod {
            // The pod's containers are started by the shim; the VM itself runs already.
            self.saved.started = true;
            return self.save();
        }
        let answer = self
            .client()?
            .request(RequestBody::StartContainer, Some(REQUEST_DEADLINE))
            .with_context(|| format!("cannot start container {}", self.saved.id))?;
        if let ResponseBody::Started { pid } = answer {
            log::debug!(
                "container {} started: pid {pid} in the guest",
                self.saved.id
            );
        }
        self.saved.started = true;
        self.save()?;
        let hooks = self.hooks()?;
        crate::hooks::run_hooks_warning(
            "poststart",
            &hooks.poststart,
            &self.hook_state(Status::Running),
        );
        Ok(())
    }

    /// Mirrors the interfaces of the container's network namespace that are not in the VM yet
    /// (all of them at `create`; at `start`, those added since, by a prestart hook or by hand).
    pub fn sync_network(&mut self) -> anyhow::Result<()> {
        let Some(namespace) = &self.saved.network else {
            return Ok(());
        };
        let vmm = (self.saved.pid, self.saved.pid_start);
        let all = crate::network::sync(namespace, vmm, &self.saved.mirrored, || self.client())?;
        if all != self.saved.mirrored {
            self.saved.mirrored = all;
            self.save()?;
        }
        Ok(())
    }

    /// Removes the TAPs and qdiscs of the mirroring from a network namespace that outlives
    /// the container: the spec's path, or hull-vmm's own while it lives (`netns`, opened before
    /// hull-vmm is killed). A namespace that is gone took them along.
    fn unmirror(&self, netns: Option<File>) {
        let Some(netns) = netns else { return };
        if let Err(err) = crate::network::unmirror(&netns, &self.saved.mirrored) {
            log::warn!("container {}: {err:#}", self.saved.id);
        }
    }

    /// The network namespace to remove the mirroring from, if it can be reached.
    fn namespace_to_clean(&self) -> Option<File> {
        if self.saved.mirrored.is_empty() {
            return None;
        }
        let namespace = self.saved.network.as_ref()?;
        match namespace.open((self.saved.pid, self.saved.pid_start)) {
            Ok(file) => Some(file),
            Err(err) => {
                log::debug!("no network namespace to clean: {err:#}");
                None
            }
        }
    }

    /// `hull kill`: `SIGKILL` to the init ends the VM (hull-vmm itself is killed); other
    /// signals, and `--all`, go to the guest.
    pub fn kill(&self, signal: i32, all: bool) -> anyhow::Result<()> {
        if self.status() == Status::Stopped {
            bail!("container {} is not running", self.saved.id);
        }
        if signal == libc::SIGKILL && !all {
            return self.kill_vmm();
        }
        if self.saved.pod {
            // A pod VM has no init of its own: hull-vmm powers it off on a terminating signal.
            let pid = nix::unistd::Pid::from_raw(self.saved.pid);
            let signal = nix::sys::signal::Signal::try_from(signal)
                .with_context(|| format!("signal {signal}"))?;
            return nix::sys::signal::kill(pid, signal)
                .with_context(|| format!("cannot signal pod VM {}", self.saved.id));
        }
        self.client()?
            .request(
                RequestBody::Signal {
                    process: ProcessRef::Init,
                    signal,
                    all,
                },
                Some(REQUEST_DEADLINE),
            )
            .with_context(|| format!("cannot signal container {}", self.saved.id))?;
        Ok(())
    }

    /// Kills hull-vmm (if it is still the process recorded) and waits until it is gone.
    fn kill_vmm(&self) -> anyhow::Result<()> {
        let (pid, start) = (self.saved.pid, self.saved.pid_start);
        if !process_alive(pid, start) {
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            .with_context(|| format!("cannot kill hull-vmm (pid {pid})"))?;
        let end = Instant::now() + KILL_DEADLINE;
        while process_alive(pid, start) {
            if Instant::now() >= end {
                bail!(
                    "hull-vmm (pid {pid}) is still alive {} s after SIGKILL",
                    KILL_DEADLINE.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// `hull delete`: a stopped container, or any with `force` (its VM is killed). Runs the
    /// poststop hooks, then removes the state.
    pub fn delete(&self, force: bool) -> anyhow::Result<()> {
        let netns = self.namespace_to_clean();
        let status = self.status();
        if status != Status::Stopped {
            if !force {
                bail!(
                    "cannot delete container {} that is not stopped: {}",
                    self.saved.id,
                    status.as_str()
                );
            }
            self.kill_vmm()?;
        }
        let poststop = self.hooks().map(|h| h.poststop).unwrap_or_default();
        crate::hooks::run_hooks_warning("poststop", &poststop, &self.hook_state(Status::Stopped));
        self.unmirror(netns);
        if let Some(cgroup) = &self.saved.cgroup {
            cgroup.remove();
        }
        if !crate::state::release_pod_share(&self.dir) {
            bail!(
                "cannot delete {}: its pod share is still mounted",
                self.dir.display()
            );
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("cannot remove {}", self.dir.display()))
    }
}

/// Whether `pid` is alive (not a zombie) and is the process that started at `start`.
pub fn process_alive(pid: i32, start: u64) -> bool {
    match proc_stat(pid) {
        Some((state, started)) => state != 'Z' && state != 'X' && started == start,
        None => false,
    }
}

/// A process's state letter and start time, from `/proc/PID/stat`.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the whole line is the 20th after the name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    // The temporary file is new, made beside `path` (the rename must not cross file systems),
    // and never a name that is already there: a pid file may be asked for in a directory others
    // can write, where a planted symlink must not make root write elsewhere.
    let name = path
        .file_name()
        .with_context(|| format!("cannot write {}: not a file name", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    for attempt in 0..100u32 {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}-{attempt}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).with_context(|| format!("cannot write {}", tmp.display())),
        };
        let written = file
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))
            .and_then(|()| {
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("cannot write {}", path.display()))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return written;
    }
    bail!(
        "cannot write {}: no free temporary name beside it",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let (state, start) = proc_stat(pid).unwrap();
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start + 1));
        assert!(!process_alive(i32::MAX, start));
    }

    /// Symlinks planted where a temporary file could go (the names this and the old code use)
    /// are neither followed nor replaced, and nothing else is left beside the file.
    #[test]
    fn write_atomic_never_writes_through_a_planted_symlink() {
        let dir = crate::testutil::TempDir::new("write-atomic");
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let planted = [
            "container.tmp".to_owned(),
            format!(".container.pid.{}-0.tmp", std::process::id()),
        ];
        for name in &planted {
            std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
        }
        write_atomic(&dir.join("container.pid"), b"123").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert_eq!(
            std::fs::read_to_string(dir.join("container.pid")).unwrap(),
            "123"
        );
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected = vec!["container.pid".to_owned(), "victim".to_owned()];
        expected.extend(planted);
        expected.sort();
        assert_eq!(names, expected);
        // Written again: replaced, not appended.
        write_atomic(&dir.join("container.pid"), b"4").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("container.pid")).unwrap(),
            "4"
        );
    }

    #[test]
    fn a_reaped_child_is_stopped() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let start = proc_stat(pid).map(|(_, s)| s).unwrap_or(0);
        child.wait().unwrap();
        assert!(!process_alive(pid, start));
    }
}
