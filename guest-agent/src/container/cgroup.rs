//! The container's cgroup in the guest (cgroup v2, `<cgroup root>/container`): a fork or memory
//! bomb in the container meets its own limits, and the agent (PID 1 of the guest, whose death
//! panics the kernel) keeps the rest.
//!
//! - `memory.max`: the spec's `linux.resources.memory.limit`, or else the guest's memory less
//!   a reserve for the kernel and the agent ([`reserve_bytes`]); the kernel's OOM killer then
//!   acts inside the container (`memory.oom.group` stays 0: one process at a time, as on a host).
//! - `pids.max`: the spec's `linux.resources.pids.limit`, or else the guest's `pid_max` less
//!   [`AGENT_TASKS`], so the agent can always fork (an `exec`, a reaped child's replacement).
//!
//! The init goes in before it is started, an exec'd process likewise; every process they make
//! stays in it.

use std::fs;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

/// Tasks kept for the agent when the spec sets no `pids` limit.
pub const AGENT_TASKS: u64 = 256;
/// The least memory kept for the guest kernel and the agent when the spec sets no limit.
pub const MIN_RESERVE: u64 = 24 << 20;

/// The memory kept out of the container's reach in a guest of `total` bytes: an eighth, at
/// least [`MIN_RESERVE`].
pub fn reserve_bytes(total: u64) -> u64 {
    (total / 8).max(MIN_RESERVE)
}

/// `memory.max` for the container: the spec's limit, or the guest's memory less the reserve.
pub fn memory_max(spec_limit: Option<u64>, total: u64) -> u64 {
    spec_limit.unwrap_or_else(|| total.saturating_sub(reserve_bytes(total)).max(MIN_RESERVE))
}

/// `pids.max` for the container: the spec's limit, or `pid_max` less [`AGENT_TASKS`].
pub fn pids_max(spec_limit: Option<u64>, pid_max: u64) -> u64 {
    spec_limit.unwrap_or_else(|| pid_max.saturating_sub(AGENT_TASKS).max(1))
}

/// Makes `<root>/<name>` with its limits; returns its directory. A VM's one container is
/// `container`; each of a pod's is `pod-<container id>`.
pub fn create(
    root: &Path,
    name: &str,
    proc_dir: &Path,
    memory_limit: Option<u64>,
    pids_limit: Option<u64>,
) -> Result<PathBuf, String> {
    let total = mem_total(proc_dir)?;
    let pid_max = fs::read_to_string(proc_dir.join("sys/kernel/pid_max"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32_768);
    write(&root.join("cgroup.subtree_control"), "+memory +pids")?;
    let dir = root.join(name);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot make cgroup {}: {e}", dir.display())),
    }
    write(
        &dir.join("memory.max"),
        &memory_max(memory_limit, total).to_string(),
    )?;
    // The container's memory is not to be swapped out of its limit.
    let _ = write(&dir.join("memory.swap.max"), "0");
    write(
        &dir.join("pids.max"),
        &pids_max(pids_limit, pid_max).to_string(),
    )?;
    Ok(dir)
}

/// Changes the limits of the cgroup at `dir` (`update`); `None` leaves one as it is.
pub fn update(dir: &Path, resources: &hull_protocol::Resources) -> Result<(), String> {
    if let Some(limit) = resources.memory_limit {
        write(&dir.join("memory.max"), &limit.to_string())?;
    }
    if let Some(limit) = resources.pids_limit {
        write(&dir.join("pids.max"), &limit.to_string())?;
    }
    Ok(())
}

/// What the cgroup at `dir` has used. A file the kernel lacks counts as zero.
pub fn stats(dir: &Path) -> hull_protocol::ContainerStats {
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    let single = |name: &str| parse_limit(read(name).trim());
    let keyed = |name: &str| {
        let text = read(name);
        move |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    let cpu = keyed("cpu.stat");
    let memory = keyed("memory.stat");
    let events = keyed("memory.events");
    hull_protocol::ContainerStats {
        cpu_usage_usec: cpu("usage_usec"),
        cpu_user_usec: cpu("user_usec"),
        cpu_system_usec: cpu("system_usec"),
        memory_usage_bytes: single("memory.current"),
        memory_limit_bytes: single("memory.max"),
        memory_anon_bytes: memory("anon"),
        memory_file_bytes: memory("file"),
        memory_inactive_file_bytes: memory("inactive_file"),
        pids_current: single("pids.current"),
        pids_limit: single("pids.max"),
        oom_kills: events("oom_kill"),
    }
}

/// A cgroup file's one value: a number, or `max` as `u64::MAX`; zero if unreadable.
fn parse_limit(value: &str) -> u64 {
    if value == "max" {
        u64::MAX
    } else {
        value.parse().unwrap_or(0)
    }
}

/// Removes the cgroup at `dir` once its processes are gone (they may still be dying: the
/// kernel refuses with `EBUSY` until then, so it tries for a while).
pub fn remove(dir: &Path) -> Result<(), String> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if std::time::Instant::now() < end && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot remove cgroup {}: {e}", dir.display())),
        }
    }
}

/// Moves `pid` (not started yet) into the cgroup at `dir`.
pub fn enter(dir: &Path, pid: Pid) -> Result<(), String> {
    write(&dir.join("cgroup.procs"), &pid.as_raw().to_string())
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(proc_dir: &Path) -> Result<u64, String> {
    let path = proc_dir.join("meminfo");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib << 10)
        .ok_or_else(|| format!("{}: no MemTotal", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_the_agent_its_share() {
        assert_eq!(memory_max(Some(100 << 20), 256 << 20), 100 << 20);
        assert_eq!(memory_max(None, 256 << 20), (256 << 20) - (32 << 20));
        assert_eq!(memory_max(None, 128 << 20), (128 << 20) - MIN_RESERVE);
        assert_eq!(memory_max(None, 16 << 20), MIN_RESERVE);
        assert_eq!(pids_max(Some(100), 32_768), 100);
        assert_eq!(pids_max(None, 32_768), 32_768 - AGENT_TASKS);
        assert_eq!(pids_max(None, 10), 1);
    }

    #[test]
    fn a_cgroup_is_made_with_its_limits_in_a_fake_root() {
        // Plain directories standing in for the cgroup root and /proc.
        let base = std::env::temp_dir().join(format!("hull-agent-cgroup-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (root, proc_dir) = (base.join("cgroup"), base.join("proc"));
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(proc_dir.join("sys/kernel")).unwrap();
        fs::write(
            proc_dir.join("meminfo"),
            "MemTotal:         262144 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        fs::write(proc_dir.join("sys/kernel/pid_max"), "4096\n").unwrap();
        let dir = create(&root, "container", &proc_dir, None, Some(50)).unwrap();
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert_eq!(
            read("memory.max"),
            ((256u64 << 20) - (32 << 20)).to_string()
        );
        assert_eq!(read("pids.max"), "50");
        enter(&dir, Pid::from_raw(77)).unwrap();
        assert_eq!(read("cgroup.procs"), "77");
        let err = create(&root, "container", &base.join("nothing"), None, None).unwrap_err();
        assert!(err.contains("meminfo"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }
}
