//! The host cgroup of a container's hull-vmm: the VM's memory, its threads and its CPU time are
//! charged to the container, not to whoever started it, and bounded.
//!
//! Where: the spec's `linux.cgroupsPath` (a path below the cgroup root; with
//! `--systemd-cgroup`, systemd's `slice:prefix:name`, made as the directory systemd would use:
//! `a-b.slice` is `a.slice/a-b.slice`, the container `prefix-name.scope` in it), or
//! `/hull/<id>`. On cgroup v2 that is one directory with the memory, pids and cpu controllers
//! enabled down to it; on a v1 (or hybrid) host, one directory in each of the memory, pids and
//! cpu hierarchies.
//!
//! Limits: memory (the guest's RAM plus [`VMM_OVERHEAD`] for hull-vmm itself, its page tables
//! and the file server's page cache), pids ([`VMM_TASKS`] plus one per vCPU: hull-vmm's
//! threads), and CPU from the spec's `linux.resources.cpu` (quota and period, shares).
//! `hull delete` removes the directories, as does a `create` that fails.
//!
//! A host with no cgroup file system (or none of these controllers) runs VMs without one,
//! with a warning.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::Value;

/// Memory hull-vmm may use beyond the guest's RAM.
pub const VMM_OVERHEAD: u64 = 128 << 20;
/// Tasks hull-vmm may have besides its vCPU threads (event loop, spawner, fs worker,
/// supervisor and its helpers, one thread per control-socket client).
pub const VMM_TASKS: u64 = 64;

/// Where cgroup file systems are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// The controllers used, by their v2 names (the same names as v1 hierarchies).
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// What to limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub tasks: u64,
    /// `linux.resources.cpu.quota` and `period` (microseconds).
    pub cpu_quota: Option<(i64, u64)>,
    /// `linux.resources.cpu.shares`.
    pub cpu_shares: Option<u64>,
}

impl Limits {
    /// The limits for a VM of `memory_mib` and `vcpus` made from `spec`.
    pub fn for_vm(
        spec: &Value,
        config: &Path,
        memory_mib: u64,
        vcpus: u64,
    ) -> anyhow::Result<Self> {
        let cpu = spec.pointer("/linux/resources/cpu");
        let field = |name: &str| cpu.and_then(|c| c.get(name)).filter(|v| !v.is_null());
        let bad = |name: &str, value: &Value, why: &str| {
            anyhow::anyhow!(
                "{}: field `linux.resources.cpu.{name}` = {value}: {why}",
                config.display()
            )
        };
        let quota = match field("quota") {
            None => None,
            Some(v) => {
                let quota = v
                    .as_i64()
                    .ok_or_else(|| bad("quota", v, "must be an integer"))?;
                let period = match field("period") {
                    None => 100_000,
                    Some(p) => p
                        .as_u64()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad("period", p, "must be a positive integer"))?,
                };
                (quota > 0).then_some((quota, period))
            }
        };
        let shares = match field("shares") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| bad("shares", v, "must be a non-negative integer"))?,
            )
            .filter(|s| *s > 0),
        };
        Ok(Self {
            memory_bytes: (memory_mib << 20) + VMM_OVERHEAD,
            tasks: VMM_TASKS + vcpus,
            cpu_quota: quota,
            cpu_shares: shares,
        })
    }
}

/// The path below the cgroup root: from `linux.cgroupsPath`, or `/hull/<id>`.
pub fn relative_path(
    spec: &Value,
    config: &Path,
    id: &str,
    systemd: bool,
) -> anyhow::Result<PathBuf> {
    let given = match spec.pointer("/linux/cgroupsPath") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => bail!(
            "{}: field `linux.cgroupsPath` = {other}: must be a string",
            config.display()
        ),
    };
    let bad = |value: &str, why: &str| {
        anyhow::anyhow!(
            "{}: field `linux.cgroupsPath` = {value:?}: {why}",
            config.display()
        )
    };
    let path = match (given, systemd) {
        (None, false) => PathBuf::from("hull").join(id),
        (None, true) => PathBuf::from("system.slice").join(format!("hull-{id}.scope")),
        (Some(value), true) => {
            let parts: Vec<&str> = value.split(':').collect();
            let [slice, prefix, name] = parts[..] else {
                bail!(bad(
                    value,
                    "with --systemd-cgroup it must be slice:prefix:name"
                ));
            };
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            if !slice.ends_with(".slice") || slice.contains('/') {
                bail!(bad(value, "the slice must be a name ending in .slice"));
            }
            let mut path = expand_slice(slice).ok_or_else(|| bad(value, "malformed slice"))?;
            let unit = if name.ends_with(".slice") {
                name.to_owned()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            path.push(unit);
            path
        }
        (Some(value), false) => {
            if value.contains(':') && !value.starts_with('/') {
                bail!(bad(
                    value,
                    "slice:prefix:name is systemd's form: pass --systemd-cgroup"
                ));
            }
            PathBuf::from(value.trim_start_matches('/'))
        }
    };
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    if !normal || path.as_os_str().is_empty() {
        bail!(bad(
            &path.display().to_string(),
            "must name a cgroup below the root, without `.` or `..`"
        ));
    }
    Ok(path)
}

/// systemd's directory for a slice: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" || stem.is_empty() {
        return Some(PathBuf::new());
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// The cgroup file systems on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// One unified hierarchy at the root.
    V2(PathBuf),
    /// A hierarchy per controller (those found).
    V1(Vec<(&'static str, PathBuf)>),
}

fn layout(root: &Path) -> Option<Layout> {
    if root.join("cgroup.controllers").is_file() {
        return Some(Layout::V2(root.to_owned()));
    }
    let found: Vec<_> = CONTROLLERS
        .iter()
        .map(|c| (*c, root.join(c)))
        .filter(|(_, dir)| dir.join("cgroup.procs").is_file())
        .collect();
    (!found.is_empty()).then_some(Layout::V1(found))
}

/// A VM's cgroup directories (one on v2, one per controller on v1), recorded in the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
}

impl VmCgroup {
    /// Makes the cgroup at `relative` with `limits` (`None` on a host without cgroups).
    pub fn create(relative: &Path, limits: &Limits) -> anyhow::Result<Option<Self>> {
        Self::create_in(Path::new(ROOT), relative, limits)
    }

    fn create_in(root: &Path, relative: &Path, limits: &Limits) -> anyhow::Result<Option<Self>> {
        let Some(layout) = layout(root) else {
            log::warn!(
                "no cgroup file system with the memory, pids or cpu controller at {}: the VM \
                 runs without a cgroup of its own",
                root.display()
            );
            return Ok(None);
        };
        let mut made = VmCgroup::default();
        let result = match &layout {
            Layout::V2(root) => made.create_v2(root, relative, limits),
            Layout::V1(hierarchies) => made.create_v1(hierarchies, relative, limits),
        };
        match result {
            Ok(()) => Ok(Some(made)),
            Err(err) => {
                made.remove();
                Err(err)
            }
        }
    }

    fn create_v2(&mut self, root: &Path, relative: &Path, limits: &Limits) -> anyhow::Result<()> {
        let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .collect();
        let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
        // Each ancestor passes the controllers down (the root's own processes do not stop
        // this; a non-root ancestor with processes of its own would, and says so).
        let mut dir = root.to_owned();
        for part in relative.components() {
            if !enable.is_empty() {
                write(&dir.join("cgroup.subtree_control"), enable.trim_end())?;
            }
            dir.push(part);
            self.make_dir(&dir)?;
        }
        let file = |name: &str| dir.join(name);
        if wanted.contains(&"memory") {
            write(&file("memory.max"), &limits.memory_bytes.to_string())?;
            // No swap: a guest's memory out on the host's swap is slow and out of bounds.
            let _ = write(&file("memory.swap.max"), "0");
        }
        if wanted.contains(&"pids") {
            write(&file("pids.max"), &limits.tasks.to_string())?;
        }
        if wanted.contains(&"cpu") {
            if let Some((quota, period)) = limits.cpu_quota {
                write(&file("cpu.max"), &format!("{quota} {period}"))?;
            }
            if let Some(shares) = limits.cpu_shares {
                write(&file("cpu.weight"), &shares_to_weight(shares).to_string())?;
            }
        }
        Ok(())
    }

    fn create_v1(
        &mut self,
        hierarchies: &[(&'static str, PathBuf)],
        relative: &Path,
        limits: &Limits,
    ) -> anyhow::Result<()> {
        for (controller, base) in hierarchies {
            let mut dir = base.clone();
            for part in relative.components() {
                dir.push(part);
                self.make_dir(&dir)?;
            }
            match *controller {
                "memory" => {
                    write(
                        &dir.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                }
                "pids" => write(&dir.join("pids.max"), &limits.tasks.to_string())?,
                "cpu" => {
                    if let Some((quota, period)) = limits.cpu_quota {
                        write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                    if let Some(shares) = limits.cpu_shares {
                        write(&dir.join("cpu.shares"), &shares.to_string())?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Makes `dir` unless it exists; records it for removal if made here (the leaf always).
    fn make_dir(&mut self, dir: &Path) -> anyhow::Result<()> {
        match fs::create_dir(dir) {
            Ok(()) => {
                self.dirs.push(dir.to_owned());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot make cgroup {}", dir.display())),
        }
    }

    /// Moves process `pid` (every thread of it) into the cgroup.
    pub fn add(&self, pid: i32) -> anyhow::Result<()> {
        for dir in self.leaves() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The directories processes go in: the deepest made in each hierarchy.
    fn leaves(&self) -> Vec<&Path> {
        self.dirs
            .iter()
            .map(PathBuf::as_path)
            .filter(|d| dir_is_leaf(d, &self.dirs))
            .collect()
    }

    /// Removes the directories made for the VM, deepest first; its processes must be gone
    /// (an exiting process can linger a moment: retried for up to a second).
    pub fn remove(&self) {
        let mut dirs: Vec<&PathBuf> = self.dirs.iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let mut tries = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // EBUSY: a process is still in it (or a sibling's directory, for a parent
                    // shared with other containers: left).
                    Err(e) if tries < 100 && e.raw_os_error() == Some(libc::EBUSY) => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        if e.raw_os_error() != Some(libc::EBUSY) || dir_is_leaf(dir, &self.dirs) {
                            log::warn!("cannot remove cgroup {}: {e}", dir.display());
                        }
                        break;
                    }
                }
            }
        }
    }
}

fn dir_is_leaf(dir: &Path, dirs: &[PathBuf]) -> bool {
    !dirs.iter().any(|o| o != dir && o.starts_with(dir))
}

/// cgroup v1's `cpu.shares` (2-262144) as v2's `cpu.weight` (1-10000), as runc converts it.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    fs::write(path, value).with_context(|| format!("cannot write {value:?} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn path(spec: Value, systemd: bool) -> anyhow::Result<PathBuf> {
        relative_path(&spec, Path::new("/b/config.json"), "c1", systemd)
    }

    #[test]
    fn paths_from_the_spec_or_hull_s_own() {
        assert_eq!(path(json!({}), false).unwrap(), Path::new("hull/c1"));
        assert_eq!(
            path(
                json!({"linux": {"cgroupsPath": "/kubepods/pod1/c1"}}),
                false
            )
            .unwrap(),
            Path::new("kubepods/pod1/c1")
        );
        assert_eq!(
            path(json!({"linux": {"cgroupsPath": "a/b"}}), false).unwrap(),
            Path::new("a/b")
        );
        assert_eq!(
            path(
                json!({"linux": {"cgroupsPath": "system.slice:docker:abc"}}),
                true
            )
            .unwrap(),
            Path::new("system.slice/docker-abc.scope")
        );
        assert_eq!(
            path(
                json!({"linux": {"cgroupsPath": "kubepods-burstable-pod1.slice:cri-containerd:x"}}),
                true
            )
            .unwrap(),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-x.scope"
            )
        );
        assert_eq!(
            path(json!({}), true).unwrap(),
            Path::new("system.slice/hull-c1.scope")
        );
    }

    #[test]
    fn bad_paths_name_the_field_and_value() {
        for (spec, systemd, needle) in [
            (
                json!({"linux": {"cgroupsPath": "/a/../../etc"}}),
                false,
                "\"a/../../etc\"",
            ),
            (
                json!({"linux": {"cgroupsPath": 7}}),
                false,
                "= 7: must be a string",
            ),
            (
                json!({"linux": {"cgroupsPath": "s.slice:p:n"}}),
                false,
                "--systemd-cgroup",
            ),
            (
                json!({"linux": {"cgroupsPath": "/a/b"}}),
                true,
                "slice:prefix:name",
            ),
            (
                json!({"linux": {"cgroupsPath": "bad:p:n"}}),
                true,
                "ending in .slice",
            ),
            (
                json!({"linux": {"cgroupsPath": "a--b.slice:p:n"}}),
                true,
                "malformed slice",
            ),
        ] {
            let err = format!("{:#}", path(spec.clone(), systemd).unwrap_err());
            assert!(
                err.contains("/b/config.json: field `linux.cgroupsPath`") && err.contains(needle),
                "{spec}: {err}"
            );
        }
    }

    #[test]
    fn limits_from_the_vm_and_the_spec() {
        let config = Path::new("/b/config.json");
        let spec = json!({"linux": {"resources": {"cpu": {"quota": 50000, "period": 100000, "shares": 512}}}});
        let limits = Limits::for_vm(&spec, config, 256, 2).unwrap();
        assert_eq!(limits.memory_bytes, (256 << 20) + VMM_OVERHEAD);
        assert_eq!(limits.tasks, VMM_TASKS + 2);
        assert_eq!(limits.cpu_quota, Some((50000, 100000)));
        assert_eq!(limits.cpu_shares, Some(512));
        let none = Limits::for_vm(&json!({}), config, 128, 1).unwrap();
        assert_eq!((none.cpu_quota, none.cpu_shares), (None, None));
        let unlimited = json!({"linux": {"resources": {"cpu": {"quota": -1}}}});
        assert_eq!(
            Limits::for_vm(&unlimited, config, 128, 1)
                .unwrap()
                .cpu_quota,
            None
        );
        let bad = json!({"linux": {"resources": {"cpu": {"shares": "many"}}}});
        let err = Limits::for_vm(&bad, config, 128, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field `linux.resources.cpu.shares` = \"many\""),
            "{err}"
        );
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10000);
    }

    #[test]
    fn a_v2_cgroup_is_made_limited_and_removed_in_a_fake_root() {
        // A plain directory standing in for the cgroup root: the files are written as the
        // kernel would take them; what a real hierarchy does is the end-to-end tests' part.
        let root = std::env::temp_dir().join(format!("hull-cgroup-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("hull")).unwrap();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let limits = Limits {
            memory_bytes: 1 << 30,
            tasks: 70,
            cpu_quota: Some((50_000, 100_000)),
            cpu_shares: Some(1024),
        };
        let made = VmCgroup::create_in(&root, Path::new("hull/c1"), &limits)
            .unwrap()
            .unwrap();
        let leaf = root.join("hull/c1");
        assert_eq!(
            made.dirs,
            std::slice::from_ref(&leaf),
            "hull/ existed: only the leaf is ours"
        );
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&root.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            read(&root.join("hull/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(&leaf.join("memory.max")), (1u64 << 30).to_string());
        assert_eq!(read(&leaf.join("pids.max")), "70");
        assert_eq!(read(&leaf.join("cpu.max")), "50000 100000");
        assert_eq!(read(&leaf.join("cpu.weight")), "39");
        made.add(4242).unwrap();
        assert_eq!(read(&leaf.join("cgroup.procs")), "4242");
        // A fake directory holds files, which a real cgroup's does not: empty it first.
        for entry in fs::read_dir(&leaf).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        made.remove();
        assert!(!leaf.exists());
        assert!(root.join("hull").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
