//! Mount points of a read-only rootfs, made on the host before the VM starts.
//!
//! The agent creates each missing mount destination before it mounts there (docs/agent.md),
//! but a `root.readonly` rootfs is shared read-only: the virtio-fs device refuses every write,
//! so the agent cannot. runc makes them before it remounts the root read-only; hull makes them
//! on the host: an empty file for a bind mount of a regular file, a directory (with its
//! parents) for everything else.
//!
//! Everything is created inside the rootfs, whatever its symbolic links say. Each step is
//! resolved from a descriptor of the rootfs with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)`, so the kernel treats the rootfs as `/` (absolute links and `..`
//! stay in it), and each missing entry is made with `mkdirat`/`openat(O_CREAT | O_EXCL)` in the
//! directory so resolved, which never follow a link in the last component. A dangling link
//! (whose target is missing in the rootfs) is followed by hand the same way, as the kernel
//! would inside the container, and its target made.
//!
//! A destination beneath one that the spec mounts earlier (`/dev/pts` under a `/dev` tmpfs,
//! `/sys/fs/cgroup` under `/sys`) is not in the rootfs but in that file system, and the agent
//! makes it there: it is left alone.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mkdirat, Mode};
use serde_json::Value;

use crate::spec::SpecError;

/// Links followed for one destination before giving up, as the kernel's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

/// Errors reading `mounts` or making mount points.
#[derive(Debug, thiserror::Error)]
pub enum MountPointError {
    /// `mounts` is not what the spec says.
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot open rootfs {}", rootfs.display())]
    Rootfs {
        rootfs: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make mount point {destination} in rootfs {}: at {at}", rootfs.display())]
    Create {
        destination: String,
        rootfs: PathBuf,
        /// The entry at fault, as a path in the container.
        at: String,
        #[source]
        source: std::io::Error,
    },
}

/// One entry of the spec's `mounts`: what deciding on its mount point needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecMount {
    pub destination: String,
    pub kind: Option<String>,
    pub source: Option<String>,
    /// `type` "bind" or a `bind`/`rbind` option, as the agent decides.
    pub bind: bool,
}

/// What a mount point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountPointKind {
    Directory,
    /// For a bind mount of a regular file.
    File,
}

/// A mount point to make: `destination` is the spec's (absolute, in the container).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    pub destination: String,
    pub kind: MountPointKind,
}

/// The spec's `mounts`, in order; `spec` is the contents of `config_path` (named in errors).
pub fn spec_mounts(spec: &Value, config_path: &Path) -> Result<Vec<SpecMount>, MountPointError> {
    let invalid = |field: String, value: &Value, reason: &str| {
        MountPointError::from(SpecError::invalid(config_path, field, value, reason))
    };
    let entries = match spec.get("mounts") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(other) => return Err(invalid("mounts".into(), other, "must be an array")),
    };
    let mut mounts = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let field = |name: &str| format!("mounts[{i}].{name}");
        if !entry.is_object() {
            return Err(invalid(format!("mounts[{i}]"), entry, "must be an object"));
        }
        let optional = |name: &str| match entry.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(field(name), other, "must be a string")),
        };
        let destination = optional("destination")?
            .ok_or_else(|| SpecError::missing(config_path, field("destination")))?;
        let kind = optional("type")?;
        let source = optional("source")?;
        let options: Vec<&str> = match entry.get("options") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                items.iter().filter_map(Value::as_str).collect()
            }
            Some(other) => {
                return Err(invalid(
                    field("options"),
                    other,
                    "must be an array of strings",
                ))
            }
        };
        let bind = kind.as_deref() == Some("bind")
            || options.iter().any(|o| *o == "bind" || *o == "rbind");
        mounts.push(SpecMount {
            destination,
            kind,
            source,
            bind,
        });
    }
    Ok(mounts)
}

/// The names of an absolute container path, `.` and `..` taken lexically (as the spec's
/// destinations are compared, not resolved).
fn lexical(destination: &str) -> Vec<&std::ffi::OsStr> {
    let mut names = Vec::new();
    for component in Path::new(destination).components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::ParentDir => {
                names.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    names
}

/// The mount points `mounts` need in the rootfs, in order: not `/`, not one beneath an earlier
/// mount, each once. A relative destination is left out (the agent refuses it).
/// `source_is_file` says whether a bind source is a regular file.
pub fn plan(mounts: &[SpecMount], source_is_file: impl Fn(&str) -> bool) -> Vec<MountPoint> {
    let mut points = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        if !m.destination.starts_with('/') {
            continue;
        }
        let names = lexical(&m.destination);
        let covered = mounts[..i]
            .iter()
            .filter(|earlier| earlier.destination.starts_with('/'))
            .any(|earlier| {
                let above = lexical(&earlier.destination);
                above.len() < names.len() && names.starts_with(&above)
            });
        let repeated = points
            .iter()
            .any(|p: &MountPoint| lexical(&p.destination) == names);
        if names.is_empty() || covered || repeated {
            continue;
        }
        let file = m.bind && m.source.as_deref().is_some_and(&source_is_file);
        points.push(MountPoint {
            destination: m.destination.clone(),
            kind: if file {
                MountPointKind::File
            } else {
                MountPointKind::Directory
            },
        });
    }
    points
}

/// Makes the missing `points` in `rootfs`; returns what it made, as container paths in the
/// order made (parents first). Existing entries are left as they are, whatever their type.
pub fn prepare(rootfs: &Path, points: &[MountPoint]) -> Result<Vec<PathBuf>, MountPointError> {
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| MountPointError::Rootfs {
        rootfs: rootfs.to_owned(),
        source: e.into(),
    })?;
    let mut made = Vec::new();
    for point in points {
        make_in_root(&root, point, &mut made).map_err(|(at, errno)| MountPointError::Create {
            destination: point.destination.clone(),
            rootfs: rootfs.to_owned(),
            at: Path::new("/").join(at).display().to_string(),
            source: errno.into(),
        })?;
    }
    Ok(made)
}

/// Opens `rel` (relative to the rootfs, `""` for itself) with the rootfs as `/`.
fn open_in_root(root: &OwnedFd, rel: &Path, directory: bool) -> nix::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root.as_fd(), rel, how)
}

/// Makes `point` and its missing parents; on error, the entry at fault (relative to the
/// rootfs) and why.
fn make_in_root(
    root: &OwnedFd,
    point: &MountPoint,
    made: &mut Vec<PathBuf>,
) -> Result<(), (PathBuf, Errno)> {
    let mut todo: VecDeque<OsString> = Path::new(&point.destination)
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    // The path walked so far, as written (the kernel resolves it in the root each time).
    let mut done = PathBuf::new();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        let last = todo.is_empty();
        let candidate = done.join(&name);
        match open_in_root(root, &candidate, !last) {
            Ok(_) => {
                done = candidate;
                continue;
            }
            Err(Errno::ENOENT) => {}
            Err(errno) => return Err((candidate, errno)),
        }
        // `name` is missing in the directory `done` resolves to.
        let parent = open_in_root(root, &done, true).map_err(|e| (done.clone(), e))?;
        let created = if last && point.kind == MountPointKind::File {
            openat(
                parent.as_fd(),
                name.as_os_str(),
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .map(drop)
        } else {
            mkdirat(
                parent.as_fd(),
                name.as_os_str(),
                Mode::from_bits_truncate(0o755),
            )
        };
        match created {
            Ok(()) => {
                made.push(Path::new("/").join(&candidate));
                done = candidate;
            }
            // A link whose target is missing (or a race): follow it inside the root.
            Err(Errno::EEXIST) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err((candidate, Errno::ELOOP));
                }
                let target = match readlinkat(parent.as_fd(), name.as_os_str()) {
                    Ok(target) => PathBuf::from(target),
                    // Not a link: someone made it meanwhile; look again.
                    Err(Errno::EINVAL) => {
                        todo.push_front(name);
                        continue;
                    }
                    Err(errno) => return Err((candidate, errno)),
                };
                if target.is_absolute() {
                    done = PathBuf::new();
                }
                for component in target.components().rev() {
                    match component {
                        Component::Normal(n) => todo.push_front(n.to_owned()),
                        Component::ParentDir => todo.push_front("..".into()),
                        _ => {}
                    }
                }
            }
            Err(errno) => return Err((candidate, errno)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::symlink;

    /// A temporary directory with `rootfs/` and `outside/`, removed on drop.
    struct TempDir(crate::testutil::TempDir);

    impl TempDir {
        fn new() -> Self {
            let dir = crate::testutil::TempDir::new("mountpoints");
            std::fs::create_dir_all(dir.join("rootfs")).unwrap();
            std::fs::create_dir_all(dir.join("outside")).unwrap();
            Self(dir)
        }

        fn rootfs(&self) -> PathBuf {
            self.0.join("rootfs")
        }

        fn outside(&self) -> PathBuf {
            self.0.join("outside")
        }

        fn assert_outside_untouched(&self) {
            let entries: Vec<_> = std::fs::read_dir(self.outside())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert!(
                entries.is_empty(),
                "created outside the rootfs: {entries:?}"
            );
            let top: Vec<_> = std::fs::read_dir(self.0.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            let mut top = top;
            top.sort();
            assert_eq!(top, ["outside", "rootfs"]);
        }
    }

    fn dir(destination: &str) -> MountPoint {
        MountPoint {
            destination: destination.into(),
            kind: MountPointKind::Directory,
        }
    }

    fn file(destination: &str) -> MountPoint {
        MountPoint {
            destination: destination.into(),
            kind: MountPointKind::File,
        }
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn makes_missing_directories_and_files_only() {
        let tmp = TempDir::new();
        let rootfs = tmp.rootfs();
        std::fs::create_dir(rootfs.join("proc")).unwrap();
        std::fs::write(rootfs.join("existing"), "x").unwrap();
        let made = prepare(
            &rootfs,
            &[
                dir("/proc"),
                dir("/dev"),
                dir("/a/b/c/"),
                file("/etc/hosts"),
                dir("/existing"),
                dir("/a/./b/../b/d"),
            ],
        )
        .unwrap();
        assert_eq!(
            made,
            paths(&[
                "/dev",
                "/a",
                "/a/b",
                "/a/b/c",
                "/etc",
                "/etc/hosts",
                // As walked: the kernel resolves `..` after any link.
                "/a/b/../b/d"
            ])
        );
        assert!(rootfs.join("a/b/c").is_dir());
        assert!(rootfs.join("a/b/d").is_dir());
        let hosts = std::fs::symlink_metadata(rootfs.join("etc/hosts")).unwrap();
        assert!(hosts.is_file() && hosts.len() == 0);
        assert_eq!(std::fs::read(rootfs.join("existing")).unwrap(), b"x");
        // Nothing left to make the second time.
        assert!(prepare(&rootfs, &[dir("/dev"), file("/etc/hosts")])
            .unwrap()
            .is_empty());
        tmp.assert_outside_untouched();
    }

    #[test]
    fn an_absolute_link_out_of_the_rootfs_stays_inside() {
        let tmp = TempDir::new();
        let rootfs = tmp.rootfs();
        // `dev -> <host path of outside>`: on the host that is a real directory.
        symlink(tmp.outside(), rootfs.join("dev")).unwrap();
        let made = prepare(&rootfs, &[dir("/dev/pts"), file("/dev/null")]).unwrap();
        let inside = tmp.outside().strip_prefix("/").unwrap().to_owned();
        assert!(rootfs.join(&inside).join("pts").is_dir());
        assert!(rootfs.join(&inside).join("null").is_file());
        // Once its target exists, the link is followed like any other.
        assert_eq!(made.last().unwrap(), Path::new("/dev/null"));
        assert_eq!(
            made[made.len() - 2],
            Path::new("/").join(&inside).join("pts")
        );
        tmp.assert_outside_untouched();
    }

    #[test]
    fn relative_links_and_dotdot_cannot_climb_out() {
        let tmp = TempDir::new();
        let rootfs = tmp.rootfs();
        symlink("../../../../../../../../../../outside", rootfs.join("etc")).unwrap();
        std::fs::create_dir(rootfs.join("var")).unwrap();
        symlink("../outside", rootfs.join("var/run")).unwrap();
        prepare(
            &rootfs,
            &[dir("/etc/ssl"), file("/var/run/x"), dir("/../../outside/y")],
        )
        .unwrap();
        // All three land in <rootfs>/outside.
        assert!(rootfs.join("outside/ssl").is_dir());
        assert!(rootfs.join("outside/x").is_file());
        assert!(rootfs.join("outside/y").is_dir());
        tmp.assert_outside_untouched();
    }

    #[test]
    fn links_within_the_rootfs_are_followed() {
        let tmp = TempDir::new();
        let rootfs = tmp.rootfs();
        std::fs::create_dir_all(rootfs.join("usr/lib")).unwrap();
        symlink("usr/lib", rootfs.join("lib")).unwrap();
        symlink("/var/run", rootfs.join("run")).unwrap();
        let made = prepare(&rootfs, &[dir("/lib/modules"), dir("/run/lock")]).unwrap();
        assert!(rootfs.join("usr/lib/modules").is_dir());
        assert!(rootfs.join("var/run/lock").is_dir());
        assert_eq!(
            made,
            paths(&["/lib/modules", "/var", "/var/run", "/var/run/lock"])
        );
        assert!(std::fs::symlink_metadata(rootfs.join("run"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn what_cannot_be_made_is_an_error_naming_it() {
        let tmp = TempDir::new();
        let rootfs = tmp.rootfs();
        std::fs::write(rootfs.join("etc"), "not a directory").unwrap();
        let err = prepare(&rootfs, &[dir("/etc/ssl")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot make mount point /etc/ssl in rootfs {}: at /etc",
                rootfs.display()
            )
        );
        assert!(matches!(&err, MountPointError::Create { source, .. }
            if source.raw_os_error() == Some(Errno::ENOTDIR as i32)));

        symlink("b", rootfs.join("a")).unwrap();
        symlink("a", rootfs.join("b")).unwrap();
        let err = prepare(&rootfs, &[dir("/a/x")]).unwrap_err();
        let MountPointError::Create { at, source, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(at, "/a");
        assert_eq!(source.raw_os_error(), Some(Errno::ELOOP as i32));

        let err = prepare(&tmp.0.join("nope"), &[dir("/x")]).unwrap_err();
        assert!(matches!(err, MountPointError::Rootfs { .. }), "{err}");
        tmp.assert_outside_untouched();
    }

    #[test]
    fn plan_skips_what_earlier_mounts_cover() {
        let spec = crate::commands::spec::default_spec(false);
        let mounts = spec_mounts(&spec, Path::new("/b/config.json")).unwrap();
        assert_eq!(mounts.len(), 7);
        assert_eq!(
            mounts[1],
            SpecMount {
                destination: "/dev".into(),
                kind: Some("tmpfs".into()),
                source: Some("tmpfs".into()),
                bind: false,
            }
        );
        let points = plan(&mounts, |_| panic!("no bind mounts here"));
        assert_eq!(points, [dir("/proc"), dir("/dev"), dir("/sys")]);

        let m = |destination: &str, kind: &str, source: &str| SpecMount {
            destination: destination.into(),
            kind: Some(kind.into()),
            source: Some(source.into()),
            bind: kind == "bind",
        };
        let mounts = [
            m("/dev/pts", "devpts", "devpts"),
            m("/dev", "tmpfs", "tmpfs"),
            m("/dev/shm", "tmpfs", "shm"),
            m("/etc/hosts", "bind", "/hosts-file"),
            m("/data/", "bind", "/a-dir"),
            m("/data", "tmpfs", "tmpfs"),
            m("/devices", "tmpfs", "tmpfs"),
            m("relative", "tmpfs", "tmpfs"),
            m("/", "tmpfs", "tmpfs"),
        ];
        let points = plan(&mounts, |source| source == "/hosts-file");
        assert_eq!(
            points,
            [
                dir("/dev/pts"),
                dir("/dev"),
                file("/etc/hosts"),
                dir("/data/"),
                dir("/devices"),
            ]
        );
    }

    #[test]
    fn spec_mounts_name_file_field_and_value() {
        let mounts = spec_mounts(
            &json!({"mounts": [
                {"destination": "/a", "type": "none", "source": "/s", "options": ["rbind", "ro"]},
                {"destination": "/b", "options": ["bind"]},
                {"destination": "/c", "type": "bind"},
                {"destination": "/d", "type": "tmpfs"}
            ]}),
            Path::new("/b/config.json"),
        )
        .unwrap();
        let binds: Vec<bool> = mounts.iter().map(|m| m.bind).collect();
        assert_eq!(binds, [true, true, true, false]);
        assert!(spec_mounts(&json!({}), Path::new("/c")).unwrap().is_empty());

        let check = |mounts: Value, want: &str| {
            let err = spec_mounts(&json!({ "mounts": mounts }), Path::new("/b/config.json"))
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("/b/config.json: {want}"));
        };
        check(json!({}), "field `mounts` = {}: must be an array");
        check(
            json!(["/proc"]),
            "field `mounts[0]` = \"/proc\": must be an object",
        );
        check(
            json!([{"destination": "/a"}, {"type": "tmpfs"}]),
            "field `mounts[1].destination` is missing",
        );
        check(
            json!([{"destination": 5}]),
            "field `mounts[0].destination` = 5: must be a string",
        );
        check(
            json!([{"destination": "/a", "options": "ro"}]),
            "field `mounts[0].options` = \"ro\": must be an array of strings",
        );
    }
}
