//! `mkinitramfs.py`: the archive lists as expected with `cpio`, holds the agent unchanged as
//! `/init` and the extra files and links asked for, and is the same byte for byte on every run.
//! Also runs the script's doctests.
//! Skips (and passes) where `python3` or `cpio` is missing.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/mkinitramfs.py");

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

struct TempDir(PathBuf);

impl TempDir {
    /// `test` keeps the tests that run in parallel apart.
    fn new(test: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("hull-initramfs-test-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkinitramfs(out: &Path, agent: &Path) {
    let status = mkinitramfs_with(out, agent, &[]);
    assert!(status.success(), "mkinitramfs.py failed: {status}");
}

/// Runs the script with extra arguments and returns how it ended.
fn mkinitramfs_with(out: &Path, agent: &Path, extra: &[&str]) -> std::process::ExitStatus {
    Command::new("python3")
        .args([
            SCRIPT,
            out.to_str().expect("utf-8"),
            agent.to_str().expect("utf-8"),
        ])
        .args(extra)
        .env_remove("SOURCE_DATE_EPOCH")
        .stderr(Stdio::null())
        .status()
        .expect("run mkinitramfs.py")
}

/// A fake agent: any ELF-looking file will do; an odd length exercises the padding.
fn fake_agent(dir: &Path) -> (PathBuf, Vec<u8>) {
    let agent = dir.join("agent");
    let mut content = b"\x7fELF".to_vec();
    content.extend((0..4099u32).map(|i| (i % 251) as u8));
    std::fs::write(&agent, &content).expect("write fake agent");
    (agent, content)
}

/// One file's content, extracted with cpio.
fn extract(archive: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", name])
        .stdin(std::fs::File::open(archive).expect("open archive"))
        .output()
        .expect("run cpio");
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

fn cpio(args: &[&str], archive: &Path) -> String {
    let out = Command::new("cpio")
        .args(args)
        .stdin(std::fs::File::open(archive).expect("open archive"))
        .output()
        .expect("run cpio");
    assert!(out.status.success(), "cpio {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 listing")
}

#[test]
fn archive_lists_holds_the_agent_and_is_deterministic() {
    if !have("python3") || !have("cpio") {
        eprintln!("skipping: needs python3 and cpio");
        return;
    }
    let dir = TempDir::new("archive");
    let (agent, content) = fake_agent(&dir.0);

    let first = dir.0.join("a.cpio");
    let second = dir.0.join("b.cpio");
    mkinitramfs(&first, &agent);
    mkinitramfs(&second, &agent);
    let bytes = std::fs::read(&first).expect("read archive");
    assert_eq!(
        bytes,
        std::fs::read(&second).expect("read archive"),
        "not deterministic"
    );
    assert!(bytes.starts_with(b"070701"), "not newc");
    assert_eq!(bytes.len() % 512, 0);

    let listing = cpio(&["-itv", "--quiet"], &first);
    let rows: Vec<(String, String)> = listing
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace();
            let mode = words.next().unwrap_or_default().to_owned();
            let name = words.last().unwrap_or_default().to_owned();
            (mode, name)
        })
        .collect();
    let expected = [
        ("drwxr-xr-x", "dev"),
        ("crw-------", "dev/console"),
        ("-rwxr-xr-x", "init"),
        ("dr-xr-xr-x", "proc"),
        ("drwx------", "root"),
        ("drwxr-xr-x", "run"),
        ("dr-xr-xr-x", "sys"),
        ("drwxrwxrwt", "tmp"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(m, n)| ((*m).to_owned(), (*n).to_owned()))
        .collect();
    assert_eq!(rows, expected, "listing:\n{listing}");
    let console = listing
        .lines()
        .find(|l| l.ends_with("dev/console"))
        .expect("console entry");
    assert!(
        console.contains("5,   1") || console.contains("5, 1"),
        "{console}"
    );
    assert!(
        listing.lines().all(|l| l.contains("root     root")),
        "{listing}"
    );

    assert!(
        extract(&first, "init") == content,
        "init differs from the agent"
    );
}

#[test]
fn extra_files_and_links_with_their_parents() {
    if !have("python3") || !have("cpio") {
        eprintln!("skipping: needs python3 and cpio");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("extra");
    let (agent, _) = fake_agent(&dir.0);
    let tool = dir.0.join("tool");
    std::fs::write(&tool, b"tool contents, 29 bytes long\n").expect("write tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let data = dir.0.join("data");
    std::fs::write(&data, b"x").expect("write data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let add_tool = format!("{}:/bin/tool", tool.display());
    let add_data = format!("{}:usr/share/deep/data", data.display());
    let add_moded = format!("{}://sbin/moded:0750", data.display());
    // Order of the arguments does not matter.
    let args = [
        "--add",
        &add_tool,
        "--symlink",
        "/bin/sh:tool",
        "--add",
        &add_data,
        "--symlink",
        "usr/bin:../bin",
        "--add",
        &add_moded,
    ];
    let reversed = args.chunks(2).rev().flatten().copied().collect::<Vec<_>>();
    let first = dir.0.join("a.cpio");
    let second = dir.0.join("b.cpio");
    assert!(mkinitramfs_with(&first, &agent, &args).success());
    assert!(mkinitramfs_with(&second, &agent, &reversed).success());
    assert!(
        std::fs::read(&first).expect("read") == std::fs::read(&second).expect("read"),
        "not deterministic"
    );

    let listing = cpio(&["-itv", "--quiet"], &first);
    let rows: Vec<String> = listing
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            // The mode, and the name (with " -> target" for links) after the date: mtime 0 is
            // "Jan 1 1970". A device has "5, 1" for its size, so count from the year.
            let year = words.iter().position(|w| *w == "1970").expect("mtime 0");
            format!("{} {}", words[0], words[year + 1..].join(" "))
        })
        .collect();
    let expected = [
        "drwxr-xr-x bin",
        "lrwxrwxrwx bin/sh -> tool",
        "-rwxr-xr-x bin/tool",
        "drwxr-xr-x dev",
        "crw------- dev/console",
        "-rwxr-xr-x init",
        "dr-xr-xr-x proc",
        "drwx------ root",
        "drwxr-xr-x run",
        "drwxr-xr-x sbin",
        "-rwxr-x--- sbin/moded",
        "dr-xr-xr-x sys",
        "drwxrwxrwt tmp",
        "drwxr-xr-x usr",
        "lrwxrwxrwx usr/bin -> ../bin",
        "drwxr-xr-x usr/share",
        "drwxr-xr-x usr/share/deep",
        "-rw-r--r-- usr/share/deep/data",
    ];
    assert_eq!(rows, expected, "listing:\n{listing}");
    assert_eq!(
        extract(&first, "bin/tool"),
        b"tool contents, 29 bytes long\n"
    );
    assert_eq!(extract(&first, "usr/share/deep/data"), b"x");

    // Mistakes are refused with status 1 and no archive.
    let never = dir.0.join("never.cpio");
    let missing = format!("{}:/bin/x", dir.0.join("missing").display());
    let not_a_file = format!("{}:/bin/x", dir.0.display());
    let bad_mode = format!("{}:/bin/x:rwx", tool.display());
    let dotdot = format!("{}:/bin/../x", tool.display());
    let twice = format!("{}:/bin/sh", tool.display());
    let over_init = format!("{}:/init", tool.display());
    let under_file = format!("{}:/bin/tool/x", tool.display());
    for bad in [
        vec!["--add", &missing],
        vec!["--add", &not_a_file],
        vec!["--add", &bad_mode],
        vec!["--add", &dotdot],
        vec!["--add", "nocolon"],
        vec!["--add", &add_tool, "--symlink", "/bin/tool:x"],
        vec!["--symlink", "/bin/sh:x", "--add", &twice],
        vec!["--add", &over_init],
        vec!["--add", &add_tool, "--add", &under_file],
        vec!["--symlink", "/bin/sh"],
        vec!["--symlink", "/:x"],
    ] {
        let status = mkinitramfs_with(&never, &agent, &bad);
        assert_eq!(status.code(), Some(1), "{bad:?}: {status}");
        assert!(!never.exists(), "{bad:?} wrote an archive");
    }
}

#[test]
fn rejects_a_non_elf_agent_and_bad_usage() {
    if !have("python3") {
        eprintln!("skipping: needs python3");
        return;
    }
    let dir = TempDir::new("reject");
    let not_elf = dir.0.join("script.sh");
    std::fs::File::create(&not_elf)
        .and_then(|mut f| f.write_all(b"#!/bin/sh\n"))
        .expect("write file");
    let out_path = dir.0.join("never.cpio");
    let status = Command::new("python3")
        .args([
            SCRIPT,
            out_path.to_str().expect("utf-8"),
            not_elf.to_str().expect("utf-8"),
        ])
        .stderr(Stdio::null())
        .status()
        .expect("run mkinitramfs.py");
    assert_eq!(status.code(), Some(1));
    assert!(!out_path.exists());

    let status = Command::new("python3")
        .arg(SCRIPT)
        .stderr(Stdio::null())
        .status()
        .expect("run mkinitramfs.py");
    assert_eq!(status.code(), Some(2));
}

#[test]
fn doctests_pass() {
    if !have("python3") {
        eprintln!("skipping: needs python3");
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "doctest", SCRIPT])
        .output()
        .expect("run doctest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
