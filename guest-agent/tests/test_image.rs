//! The end-to-end test equipment in `tests/guest/`, checked on the host at native speed:
//! - `ymm_stress.c` builds, its checker catches corruption planted on purpose (`--self-test`),
//!   and it passes on this (correct) host kernel;
//! - `build-initramfs.sh` packs the agent, busybox and ymm-stress deterministically, and skips
//!   the work when nothing changed;
//! - with a static agent (`HULL_AGENT_BIN`, from `guest-agent/build.sh`) and root: the image,
//!   unpacked, runs `hull.exec` commands with the agent as PID 1 of a throwaway namespace
//!   chrooted into it, as in a guest but on the host's kernel.
//!
//! Parts whose tools are missing (gcc, busybox-static, cpio, root) say so and pass.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const STRESS_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/guest/ymm_stress.c");
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/guest/build-initramfs.sh"
);
const APPLETS: &[&str] = &[
    "sh", "ls", "wc", "cat", "echo", "true", "false", "sleep", "ps", "grep", "head", "seq", "yes",
    "uname", "kill", "mount", "dmesg",
];

struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("hull-image-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn compile_stress(dir: &Path) -> PathBuf {
    let out = dir.join("ymm-stress");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-static",
            "-mavx2",
            "-fno-tree-vectorize",
            "-Wall",
            "-Wextra",
        ])
        .args(["-Werror", "-o"])
        .arg(&out)
        .arg(STRESS_SRC)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed: {status}");
    out
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .expect("run ymm-stress")
}

#[test]
fn ymm_stress_catches_planted_corruption_and_passes_here() {
    if !have("gcc") {
        eprintln!("skipping: needs gcc");
        return;
    }
    let dir = TempDir::new("stress");
    let stress = compile_stress(&dir.0);

    let out = run(&stress, &["--self-test"]);
    if out.status.code() == Some(2) && text(&out.stderr).contains("no AVX") {
        eprintln!("skipping: this CPU has no AVX");
        return;
    }
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // 2 processes x 50 rounds, 2 registers corrupted and 1 swapped in each.
    let width = if stdout.contains("width=512") {
        512
    } else {
        256
    };
    assert!(
        stdout.contains(&format!(
            "ymm-stress: PROCS=2 YIELDS=50 width={width} corrupted=200 swapped=100\n"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("self-test passed"), "{stdout}");

    // This host's kernel saves the extended state: nothing is corrupted.
    let out = run(&stress, &["4", "2000"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!("ymm-stress: PROCS=4 YIELDS=2000 width={width} corrupted=0 swapped=0\n")
    );
    assert!(out.stderr.is_empty(), "{out:?}");

    for bad in [&[][..], &["0", "5"], &["4"], &["4", "x"], &["--self-tes"]] {
        let out = run(&stress, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        assert!(text(&out.stderr).contains("usage:"), "{out:?}");
    }
}

/// The agent to pack: `HULL_AGENT_BIN` (static) if set, else cargo's (dynamic) build.
fn agent() -> (String, bool) {
    match std::env::var("HULL_AGENT_BIN") {
        Ok(bin) => (bin, true),
        Err(_) => (env!("CARGO_BIN_EXE_hull-agent").to_owned(), false),
    }
}

fn busybox_static_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "busybox-static"])
        .output()
        .is_ok_and(|o| text(&o.stdout) == "install ok installed")
}

fn build_image(out_dir: &Path, agent: &str) -> Output {
    let out = Command::new("bash")
        .arg(BUILD_SCRIPT)
        .arg(out_dir)
        .arg(agent)
        .env("HULL_TEST_INITRAMFS_ANY_AGENT", "1")
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("run build-initramfs.sh");
    assert!(out.status.success(), "{out:?}");
    out
}

#[test]
fn test_initramfs_holds_agent_busybox_and_ymm_stress() {
    if !have("gcc") || !have("cpio") || !have("python3") || !busybox_static_installed() {
        eprintln!("skipping: needs gcc, cpio, python3 and busybox-static");
        return;
    }
    let dir = TempDir::new("image");
    let (agent, _) = agent();
    let out = build_image(&dir.0, &agent);
    assert!(!text(&out.stderr).contains("up to date"), "{out:?}");
    let archive = dir.0.join("test-initramfs.cpio");
    let first = std::fs::read(&archive).expect("read archive");

    let out = build_image(&dir.0, &agent);
    assert!(text(&out.stderr).contains("up to date"), "{out:?}");
    // Rebuilt from scratch: the same bytes.
    std::fs::remove_file(dir.0.join("test-initramfs.stamp")).expect("remove stamp");
    build_image(&dir.0, &agent);
    assert!(std::fs::read(&archive).expect("read archive") == first);

    let listing = Command::new("cpio")
        .args(["-itv", "--quiet"])
        .stdin(std::fs::File::open(&archive).expect("open archive"))
        .output()
        .expect("run cpio");
    let listing = text(&listing.stdout);
    let has = |mode: &str, name: &str| {
        listing
            .lines()
            .any(|l| l.starts_with(mode) && l.ends_with(&format!(" {name}")))
    };
    for (mode, name) in [
        ("-rwxr-xr-x", "init"),
        ("-rwxr-xr-x", "bin/busybox"),
        ("-rwxr-xr-x", "bin/ymm-stress"),
        ("drwxr-xr-x", "bin"),
        ("crw-------", "dev/console"),
    ] {
        assert!(has(mode, name), "no {mode} {name}:\n{listing}");
    }
    for applet in APPLETS {
        assert!(
            has("lrwxrwxrwx", &format!("bin/{applet} -> busybox")),
            "no link for {applet}:\n{listing}"
        );
    }
}

fn which(tool: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    let path = text(&out.stdout).trim().to_owned();
    (out.status.success() && !path.is_empty()).then_some(path)
}

/// Boots the unpacked image `root` on the host: the agent as PID 1 of a new PID and mount
/// namespace, chrooted into a bind mount of `root` (so `/` is a mount point it can make
/// private), without PATH like under the kernel, with `cmdline` as its kernel command line.
/// `/proc` is mounted first: test mode reads its PID namespace from there before mounting.
fn boot_chroot(root: &Path, cmdline: &str) -> Output {
    let (Some(mount), Some(chroot), Some(env)) = (which("mount"), which("chroot"), which("env"))
    else {
        panic!("needs mount, chroot and env");
    };
    let pidns = nix::sys::stat::stat("/proc/self/ns/pid")
        .expect("stat pid ns")
        .st_ino;
    let script = format!(
        r#"{mount} --bind "$0" "$0" && {mount} -t proc proc "$0/proc" &&
           exec {env} -u PATH {chroot} "$0" /init"#
    );
    Command::new("timeout")
        .args(["120", "unshare", "--pid", "--fork", "--mount"])
        .args(["--propagation", "private", "--kill-child", "--", "sh", "-c"])
        .arg(script)
        .arg(root)
        .env("HULL_AGENT_TEST_ROOT", "/")
        .env("HULL_AGENT_TEST_PARENT_PIDNS", pidns.to_string())
        .env("HULL_AGENT_TEST_CMDLINE", cmdline)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare")
}

fn exec_exit(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("HULL_AGENT_EXEC_EXIT "))
        .unwrap_or_else(|| panic!("no exit line: {out:?}"));
    serde_json::from_str(line).expect("exit record is JSON")
}

#[test]
fn test_initramfs_runs_commands_with_the_agent_as_init() {
    let (agent, is_static) = agent();
    if !is_static || !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipping: needs root and a static agent in HULL_AGENT_BIN (guest-agent/build.sh)"
        );
        return;
    }
    if !have("gcc") || !have("cpio") || !have("python3") || !busybox_static_installed() {
        eprintln!("skipping: needs gcc, cpio, python3 and busybox-static");
        return;
    }
    let dir = TempDir::new("boot");
    build_image(&dir.0, &agent);
    let root = dir.0.join("root");
    std::fs::create_dir(&root).expect("create root");
    let status = Command::new("cpio")
        .args(["-idm", "--quiet"])
        .current_dir(&root)
        .stdin(std::fs::File::open(dir.0.join("test-initramfs.cpio")).expect("open archive"))
        .status()
        .expect("run cpio");
    assert!(status.success());

    // The pipeline that crashes in a PVM guest without XSAVE.
    let out = boot_chroot(&root, r#"console=ttyS0 hull.exec="ls /proc | wc -l""#);
    assert_eq!(exec_exit(&out), serde_json::json!({"code": 0}), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.trim().parse::<u32>().is_ok_and(|n| n > 3)),
        "{stdout}"
    );

    let out = boot_chroot(
        &root,
        r#"hull.exec="ymm-stress 4 2000 && ymm-stress --self-test""#,
    );
    assert_eq!(exec_exit(&out), serde_json::json!({"code": 0}), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ymm-stress: PROCS=4 YIELDS=2000 width=")
            && stdout.contains(" corrupted=0 swapped=0"),
        "{stdout}"
    );
    assert!(stdout.contains("self-test passed"), "{stdout}");

    // busybox's own kill on itself.
    let out = boot_chroot(&root, r#"hull.exec="echo $PATH; kill -SEGV $$""#);
    assert_eq!(
        exec_exit(&out),
        serde_json::json!({"signal": 11}),
        "{out:?}"
    );
    assert!(text(&out.stdout).contains("/sbin:/bin"), "{out:?}");

    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    assert!(
        !mounts.contains(root.to_str().expect("utf-8")),
        "mounts left under {}",
        root.display()
    );
}
