//! VM templates: a snapshot of a booted guest, waiting at the agent's idle point, from which
//! `hull create` restores each container's VM instead of booting a kernel.
//!
//! One template per guest kernel, initramfs (which holds the agent), hull-vmm, vCPU count,
//! memory size, kernel command line and device set, on this host boot, with this hull: those
//! inputs are the template's [`Key`], and a hash of it names its directory in the cache
//! ([`cache_dir`]). The directory holds hull-vmm's snapshot (`state`, `memory`) and `key.json`,
//! the key in full, which must match before the template is used (so a hash collision or a
//! hand-copied directory is never restored).
//!
//! A template is built on first use, under an exclusive lock on `<hash>.lock`, so that
//! concurrent first `create`s build it once: a cold boot of a VM like the container's (its
//! share an empty directory, its vsock socket a private one) that hull-vmm snapshots as soon as
//! the agent is ready (`--snapshot-when-ready`), in `<hash>.build-<pid>/`, renamed into place
//! whole. Templates of another host boot, another hull, or files that changed since are
//! removed when a new one is built. A template hull-vmm cannot restore (corrupt, truncated, of
//! another shape) is replaced by the caller, with a warning that says why.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hull_contract::vm::VmConfig;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The environment variable naming the template cache directory.
pub const ENV_DIR: &str = "HULL_TEMPLATE_DIR";
/// The environment variable that makes every `create` boot cold when set to `1`.
pub const ENV_COLD: &str = "HULL_COLD_BOOT";
/// The file in a template directory holding its key.
const KEY_FILE: &str = "key.json";
/// Where the host's boot id is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The template cache: `$HULL_TEMPLATE_DIR`, else `/var/cache/hull/templates` for root,
/// else `$XDG_CACHE_HOME/hull/templates` (`~/.cache/hull/templates`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(ENV_DIR) {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/hull/templates");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("hull/templates")
}

/// Whether `HULL_COLD_BOOT=1` asks for cold boots.
pub fn cold_by_environment() -> bool {
    std::env::var_os(ENV_COLD).is_some_and(|v| v == "1")
}

/// A file the template depends on, by identity (not content: hashing a kernel on every
/// `create` would cost more than the restore saves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

impl FileId {
    fn of(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = path
            .canonicalize()
            .with_context(|| format!("{}", path.display()))?;
        let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
            path,
        })
    }
}

/// Everything a template depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub hull_version: String,
    pub boot_id: String,
    pub kernel: FileId,
    pub initramfs: Option<FileId>,
    pub vmm: FileId,
    pub vcpus: u8,
    pub mem_size_mib: u32,
    pub cmdline: String,
    pub boot_messages: bool,
    /// `cid`, or `None` without vsock.
    pub vsock_cid: Option<u64>,
    /// Each shared directory's tag and whether it is read-only.
    pub shared_dirs: Vec<(String, bool)>,
    /// Empty NIC slots.
    #[serde(default)]
    pub nic_slots: u8,
}

impl Key {
    /// The key of a VM like `config`, started by `vmm`.
    pub fn new(config: &VmConfig, vmm: &Path) -> anyhow::Result<Self> {
        let boot_id = std::fs::read_to_string(BOOT_ID)
            .with_context(|| format!("cannot read the host's boot id ({BOOT_ID})"))?;
        Ok(Self {
            hull_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: boot_id.trim().to_owned(),
            kernel: FileId::of(&config.kernel)?,
            initramfs: config.initramfs.as_deref().map(FileId::of).transpose()?,
            vmm: FileId::of(vmm)?,
            vcpus: config.vcpus,
            mem_size_mib: config.mem_size_mib,
            cmdline: config.cmdline.clone(),
            boot_messages: config.boot_messages,
            vsock_cid: config.vsock.as_ref().map(|v| v.guest_cid),
            shared_dirs: config
                .shared_dirs
                .iter()
                .map(|d| (d.tag.clone(), d.read_only))
                .collect(),
            nic_slots: config.nic_slots,
        })
    }

    /// 16 hex digits: FNV-1a of the key's JSON.
    pub fn hash(&self) -> String {
        let text = serde_json::to_vec(self).expect("a key serializes");
        let hash = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        format!("{hash:016x}")
    }
}

/// A template ready to restore from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The snapshot directory (`hull-vmm --restore`).
    pub dir: PathBuf,
    /// Whether this call built it (the first use).
    pub built: bool,
}

/// What `hull-vmm --snapshot-when-ready` prints.
#[derive(Debug, Deserialize)]
struct BuildReport {
    boot_ms: u64,
    memory_written_bytes: u64,
    snapshot_us: u64,
}

/// A template hull-vmm refused: why, and when the caller chose it (a template built since is
/// another one, and is used rather than rebuilt again).
#[derive(Debug, Clone, Copy)]
pub struct Stale<'a> {
    pub why: &'a str,
    pub chosen_at: SystemTime,
}

/// The template for a VM like `config`, built if there is none (or `stale` is why the one
/// there must be replaced).
pub fn ensure(
    config: &VmConfig,
    vmm: &Path,
    cache: &Path,
    stale: Option<Stale<'_>>,
) -> anyhow::Result<Template> {
    let key = Key::new(config, vmm)?;
    let hash = key.hash();
    let dir = cache.join(&hash);
    if stale.is_none() && matches(&dir, &key) {
        return Ok(Template { dir, built: false });
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        // Only its owner reads the guests' memory.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(cache)
            .with_context(|| format!("cannot make the template cache {}", cache.display()))?;
    }
    let lock_path = cache.join(format!("{hash}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let waited = Instant::now();
    let _lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((lock, _)) => {
            log::info!(
                "waiting for the VM template {} that another hull is building",
                dir.display()
            );
            if std::io::stderr().is_terminal() {
                eprintln!("hull: waiting for the VM template another hull is building...");
            }
            Flock::lock(lock, FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .with_context(|| format!("cannot lock {}", lock_path.display()))?
        }
    };
    if let Some(stale) = stale {
        let rebuilt_since = built_at(&dir).is_some_and(|t| t > stale.chosen_at);
        if rebuilt_since && matches(&dir, &key) {
            log::debug!("template {} was rebuilt by another hull", dir.display());
            return Ok(Template { dir, built: false });
        }
        eprintln!(
            "hull: warning: VM template {} is unusable ({}); rebuilding it",
            dir.display(),
            stale.why
        );
    } else if matches(&dir, &key) {
        // Built by the hull we waited for.
        log::debug!(
            "template {} built meanwhile ({:?})",
            dir.display(),
            waited.elapsed()
        );
        return Ok(Template { dir, built: false });
    }
    remove_stale(cache, &key);
    build(config, vmm, cache, &key, &dir)?;
    Ok(Template { dir, built: true })
}

/// Whether `dir` is a complete template of `key`.
fn matches(dir: &Path, key: &Key) -> bool {
    let Ok(text) = std::fs::read(dir.join(KEY_FILE)) else {
        return false;
    };
    serde_json::from_slice::<Key>(&text).is_ok_and(|k| k == *key)
        && dir.join("state").is_file()
        && dir.join("memory").is_file()
}

/// Whether a file `key` depends on has changed or gone since (a rebuilt kernel, agent or
/// hull-vmm): no configuration will ask for that template again.
fn inputs_changed(key: &Key) -> bool {
    let same = |f: &FileId| FileId::of(&f.path).is_ok_and(|now| now == *f);
    !(same(&key.kernel) && key.initramfs.as_ref().is_none_or(same) && same(&key.vmm))
}

/// Removes templates of another host boot or hull version or of files that have changed since,
/// and builds left by a hull that died: none of them can be used again, and each holds tens of
/// MiB of disk.
fn remove_stale(cache: &Path, key: &Key) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((_, pid)) = name.split_once(".build-") {
            let alive = pid
                .parse::<i32>()
                .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        let Ok(text) = std::fs::read(path.join(KEY_FILE)) else {
            continue;
        };
        let Ok(other) = serde_json::from_slice::<Key>(&text) else {
            continue;
        };
        let other_boot = other.boot_id != key.boot_id || other.hull_version != key.hull_version;
        if other_boot || inputs_changed(&other) {
            log::info!("removing stale VM template {}", path.display());
            let _ = std::fs::remove_dir_all(&path);
            // A lock of this boot may be held by a hull still waiting on it; it stays.
            if other_boot {
                let _ = std::fs::remove_file(cache.join(format!("{name}.lock")));
            }
        }
    }
}

/// Boots a VM like `config` and snapshots it at the agent's idle point into `dir`.
fn build(config: &VmConfig, vmm: &Path, cache: &Path, key: &Key, dir: &Path) -> anyhow::Result<()> {
    let work = cache.join(format!("{}.build-{}", key.hash(), std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = build_in(config, vmm, key, &work, dir);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn build_in(
    config: &VmConfig,
    vmm: &Path,
    key: &Key,
    work: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let share = work.join("share");
    std::fs::create_dir_all(&share).with_context(|| format!("cannot make {}", share.display()))?;
    let mut template = config.clone();
    // The template's hull-vmm lives in the jail's empty network namespace; a container's
    // hull-vmm joins its own before it restores.
    template.netns = None;
    template.console = hull_contract::vm::ConsoleConfig::File(work.join("console.log"));
    if let Some(vsock) = &mut template.vsock {
        vsock.uds_path = work.join("v.sock");
    }
    for shared in &mut template.shared_dirs {
        shared.path = share.clone();
        // A container's bind mounts are its own; the template shares an empty directory.
        shared.binds.clear();
    }
    let vm_json = work.join(crate::state::VM_CONFIG);
    std::fs::write(
        &vm_json,
        serde_json::to_vec_pretty(&template).expect("a VmConfig serializes"),
    )
    .with_context(|| format!("cannot write {}", vm_json.display()))?;
    let snapshot = work.join("snapshot");
    let log = work.join(crate::state::VMM_LOG);
    let started = Instant::now();
    log::info!(
        "building the VM template {} (a cold boot, once per kernel and VM shape)",
        dir.display()
    );
    let mut cmd = Command::new(vmm);
    // SAFETY: the closure runs in the child between fork and exec and only makes the prctl
    // system call: the build's VM must not outlive a hull that is killed while it waits.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .arg("--config")
        .arg(&vm_json)
        .arg("--snapshot-when-ready")
        .arg(&snapshot)
        .arg("--log-file")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", vmm.display()))?;
    let terminal = std::io::stderr().is_terminal();
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for hull-vmm")? {
            break status;
        }
        if terminal {
            eprint!(
                "\rhull: first use of this kernel and VM shape: booting the VM template ({} s)",
                started.elapsed().as_secs()
            );
            let _ = std::io::stderr().flush();
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if terminal {
        eprintln!();
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    if !status.success() {
        let tail = hull_contract::tail(&log, 2048);
        bail!(
            "cannot build the VM template (hull-vmm {status}):\n{}",
            tail.trim_end()
        );
    }
    let report: BuildReport = serde_json::from_str(out.trim())
        .with_context(|| format!("hull-vmm's template report {out:?}"))?;
    write_key(&snapshot, key)?;
    // Replaced by two renames, so that a hull-vmm restoring from the old one meanwhile keeps
    // its files (they go when the last one closes them) and the name is missing for
    // microseconds only.
    let old = work.join("replaced");
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move the old template {} aside", dir.display()))?;
    }
    std::fs::rename(&snapshot, dir)
        .with_context(|| format!("cannot publish template {}", dir.display()))?;
    let line = format!(
        "built the VM template {} in {:.1} s (boot {} ms, snapshot {} us, {} MiB of memory)",
        dir.display(),
        started.elapsed().as_secs_f64(),
        report.boot_ms,
        report.snapshot_us,
        report.memory_written_bytes >> 20
    );
    log::info!("{line}");
    if terminal {
        eprintln!("hull: {line}");
    }
    Ok(())
}

fn write_key(dir: &Path, key: &Key) -> anyhow::Result<()> {
    let path = dir.join(KEY_FILE);
    let mut file = File::create(&path).with_context(|| format!("{}", path.display()))?;
    file.write_all(&serde_json::to_vec_pretty(key).expect("a key serializes"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("{}", path.display()))
}

/// When the template was built, for `hull doctor`.
pub fn built_at(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir.join(KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
        .filter(|t| *t > UNIX_EPOCH)
}

/// The templates in `cache`, with their keys, for `hull doctor`.
pub fn list(cache: &Path) -> Vec<(PathBuf, Key)> {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read(e.path().join(KEY_FILE)).ok()?;
            Some((e.path(), serde_json::from_slice(&text).ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let file = |p: &str| FileId {
            path: p.into(),
            size: 1,
            mtime_ns: 2,
            inode: 3,
        };
        Key {
            hull_version: "0.1.0".into(),
            boot_id: "b".into(),
            kernel: file("/k"),
            initramfs: Some(file("/i")),
            vmm: file("/v"),
            vcpus: 1,
            mem_size_mib: 256,
            cmdline: "hull.serve".into(),
            boot_messages: false,
            vsock_cid: Some(3),
            shared_dirs: vec![("rootfs".into(), false)],
            nic_slots: 4,
        }
    }

    #[test]
    fn every_input_changes_the_hash() {
        let base = key();
        let mut changed = Vec::new();
        let mut k = base.clone();
        k.kernel.mtime_ns += 1;
        changed.push(k);
        let mut k = base.clone();
        k.vcpus = 2;
        changed.push(k);
        let mut k = base.clone();
        k.shared_dirs[0].1 = true;
        changed.push(k);
        let mut k = base.clone();
        k.boot_id = "c".into();
        changed.push(k);
        let mut k = base.clone();
        k.vmm.inode = 9;
        changed.push(k);
        for k in changed {
            assert_ne!(k.hash(), base.hash(), "{k:?}");
        }
        assert_eq!(base.hash(), key().hash());
        assert_eq!(base.hash().len(), 16);
    }

    #[test]
    fn only_a_complete_directory_with_the_same_key_matches_and_stale_ones_go() {
        let cache = std::env::temp_dir().join(format!("hull-templates-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let inputs = cache.join("inputs");
        std::fs::create_dir_all(&inputs).unwrap();
        let file = |name: &str| {
            let path = inputs.join(name);
            std::fs::write(&path, name).unwrap();
            FileId::of(&path).unwrap()
        };
        let key = || Key {
            kernel: FileId::of(&inputs.join("vmlinux")).unwrap(),
            initramfs: Some(FileId::of(&inputs.join("initramfs")).unwrap()),
            vmm: FileId::of(&inputs.join("hull-vmm")).unwrap(),
            ..super::tests::key()
        };
        let _ = (file("vmlinux"), file("initramfs"), file("hull-vmm"));
        let dir = cache.join(key().hash());
        std::fs::create_dir_all(&dir).unwrap();
        write_key(&dir, &key()).unwrap();
        assert!(!matches(&dir, &key()), "no snapshot files yet");
        std::fs::write(dir.join("state"), b"s").unwrap();
        std::fs::write(dir.join("memory"), b"m").unwrap();
        assert!(matches(&dir, &key()));
        let mut other = key();
        other.mem_size_mib = 512;
        assert!(!matches(&dir, &other));

        // A template of a kernel that has been rebuilt since is removed.
        let mut rebuilt = key();
        rebuilt.kernel.size += 1;
        let rebuilt_dir = cache.join(rebuilt.hash());
        std::fs::create_dir_all(&rebuilt_dir).unwrap();
        write_key(&rebuilt_dir, &rebuilt).unwrap();

        // Another boot's template and a dead build are removed; this boot's stays.
        let mut old = key();
        old.boot_id = "old boot".into();
        let old_dir = cache.join(old.hash());
        std::fs::create_dir_all(&old_dir).unwrap();
        write_key(&old_dir, &old).unwrap();
        let dead = cache.join("0123.build-999999999");
        std::fs::create_dir_all(&dead).unwrap();
        remove_stale(&cache, &key());
        assert!(dir.exists());
        assert!(!old_dir.exists() && !dead.exists() && !rebuilt_dir.exists());
        assert_eq!(list(&cache).len(), 1);
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
