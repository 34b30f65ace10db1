//! Warm start: `hull run` restores the container's VM from a template built on first use
//! (`runtime/src/template.rs`), each container still its own: fresh randomness, the host's
//! clock. A corrupt template is rebuilt with a warning; `--cold-boot` boots the kernel.
//!
//! Every test here has a template cache of its own (`HULL_TEMPLATE_DIR`), so it sees the
//! first use and what follows.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use hull_tests::bundle::Bundle;
use hull_tests::harness::{guest_artifacts, processes_mentioning, workspace_bin, TempDir};

fn check_artifacts() {
    let (kernel, initramfs) = guest_artifacts();
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest artifacts missing: run `make kernel agent` first"
    );
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `hull --root ROOT run --bundle BUNDLE ID` with the template cache `templates`.
fn hull_run(templates: &Path, bundle: &Path, id: &str, extra: &[&str]) -> Output {
    let root = TempDir::new("warm-root");
    let out = Command::new(workspace_bin("hull"))
        .env("HULL_TEMPLATE_DIR", templates)
        .env_remove("HULL_COLD_BOOT")
        .arg("--root")
        .arg(root.path())
        .arg("run")
        .args(extra)
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .output()
        .expect("run hull");
    assert!(
        !root.path().join(id).exists(),
        "state directory of {id} left behind"
    );
    assert!(
        processes_mentioning(&root.path().display().to_string()).is_empty(),
        "processes of {id} left behind"
    );
    out
}

fn templates_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("key.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn context(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two containers restored from one template read different random bytes, and their clocks
/// are the host's, not the template's.
#[test]
fn containers_from_one_template_have_their_own_randomness_and_the_hosts_clock() {
    check_artifacts();
    let templates = TempDir::new("warm-templates");
    let bundle = Bundle::builder()
        .script("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s")
        .build();
    let mut outputs = Vec::new();
    for id in ["warm-a", "warm-b", "warm-c"] {
        let before = now();
        let out = hull_run(templates.path(), bundle.path(), id, &[]);
        let after = now();
        assert_eq!(out.status.code(), Some(0), "{}", context(&out));
        let text = stdout(&out);
        let mut lines = text.lines();
        let random = lines.next().unwrap_or_default().to_owned();
        let guest_time: f64 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no date in {text:?}"));
        assert_eq!(random.len(), 64, "{text:?}");
        // `date +%s` truncates: the guest's second is at most one before the host's.
        assert!(
            guest_time >= before.floor() - 1.0 && guest_time <= after + 1.0,
            "{id}: the guest's clock says {guest_time}, the host's was {before:.1}..{after:.1}"
        );
        outputs.push(random);
        // The first run built the template; the others restored from it.
        assert_eq!(templates_in(templates.path()).len(), 1, "{id}");
    }
    outputs.sort();
    outputs.dedup();
    assert_eq!(
        outputs.len(),
        3,
        "two containers read the same random bytes"
    );
}

/// A template that hull-vmm cannot restore is replaced, with a warning naming why, and the
/// container still runs; `--cold-boot` does not touch the cache.
#[test]
fn a_corrupt_template_is_rebuilt_and_cold_boot_skips_the_cache() {
    check_artifacts();
    let templates = TempDir::new("warm-corrupt");
    let bundle = Bundle::builder().script("echo ok").build();

    let out = hull_run(templates.path(), bundle.path(), "cold", &["--cold-boot"]);
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert_eq!(stdout(&out), "ok\n");
    assert!(templates_in(templates.path()).is_empty());

    let out = hull_run(templates.path(), bundle.path(), "first", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let names = templates_in(templates.path());
    assert_eq!(names.len(), 1);
    let state = templates.path().join(&names[0]).join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();

    let out = hull_run(templates.path(), bundle.path(), "after-corruption", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert_eq!(stdout(&out), "ok\n");
    assert!(
        stderr.contains("is unusable") && stderr.contains("checksum mismatch"),
        "{}",
        context(&out)
    );
    assert_eq!(templates_in(templates.path()), names);
    assert_ne!(std::fs::read(&state).unwrap(), bytes, "not rebuilt");

    // Nothing of the builds is left but the template and its lock.
    let mut left: Vec<String> = std::fs::read_dir(templates.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [names[0].clone(), format!("{}.lock", names[0])]);

    // A cache that cannot be made (here: a file is in the way) boots cold, with a warning.
    let blocked = templates.path().join("not-a-directory");
    std::fs::write(&blocked, b"").unwrap();
    let out = hull_run(&blocked.join("cache"), bundle.path(), "no-cache", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert_eq!(stdout(&out), "ok\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: booting cold, no VM template"),
        "{}",
        context(&out)
    );
    std::fs::remove_file(&blocked).unwrap();

    // `hull doctor` shows it.
    let doctor = Command::new(workspace_bin("hull"))
        .env("HULL_TEMPLATE_DIR", templates.path())
        .arg("doctor")
        .output()
        .unwrap();
    let text = stdout(&doctor);
    assert!(
        text.contains(&format!("templates: 1 in {}", templates.path().display()))
            && text.contains(&names[0]),
        "{text}"
    );
}
