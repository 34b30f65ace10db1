//! `mkinitramfs.py`: the archive lists as expected with `cpio`, holds the agent unchanged as
//! `/init`, and is the same byte for byte on every run. Also runs the script's doctests.
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
    let status = Command::new("python3")
        .args([
            SCRIPT,
            out.to_str().expect("utf-8"),
            agent.to_str().expect("utf-8"),
        ])
        .env_remove("SOURCE_DATE_EPOCH")
        .status()
        .expect("run mkinitramfs.py");
    assert!(status.success(), "mkinitramfs.py failed: {status}");
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
    let agent = dir.0.join("agent");
    // Any ELF-looking file will do; an odd length exercises the padding.
    let mut content = b"\x7fELF".to_vec();
    content.extend((0..4099u32).map(|i| (i % 251) as u8));
    std::fs::write(&agent, &content).expect("write fake agent");

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

    let init = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "init"])
        .stdin(std::fs::File::open(&first).expect("open archive"))
        .output()
        .expect("run cpio");
    assert!(init.status.success());
    assert!(init.stdout == content, "init differs from the agent");
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
