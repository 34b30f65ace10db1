//! End to end: host directories shared with the real guest over virtio-fs. The guest reads
//! and writes a read-write share, a read-only share refuses writes even when the guest mounts
//! it read-write (the device enforces it), and a symlink in a share that points at a host file
//! resolves inside the guest, never on the host.

use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{guest_artifacts, workspace_bin, Running, TempDir};

const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn guest_reads_writes_and_cannot_escape_shared_dirs() {
    let (kernel, _) = guest_artifacts();
    let initramfs = kernel.with_file_name("test-initramfs.cpio");
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest artifacts missing: run `make kernel agent` first"
    );
    let dir = TempDir::new("shared-dir");
    let (rw, ro) = (dir.path().join("rw"), dir.path().join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(rw.join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(ro.join("file"), "read-only content\n").unwrap();
    // A host file whose contents must never reach the guest.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "HOST-SECRET\n").unwrap();
    std::os::unix::fs::symlink(&secret, ro.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret", ro.join("rel-link")).unwrap();

    let script = "mkdir -p /mnt/rw /mnt/ro; \
        mount -t virtiofs data /mnt/rw && mount -t virtiofs ro /mnt/ro; \
        echo read=$(cat /mnt/rw/hello.txt); \
        echo written-by-guest > /mnt/rw/from-guest.txt; \
        echo ro_read=$(cat /mnt/ro/file); \
        if echo x > /mnt/ro/nope; then echo ro_write=allowed; else echo ro_write=refused; fi; \
        cat /mnt/ro/abs-link /mnt/ro/rel-link /mnt/ro/../secret; \
        echo links=$(readlink /mnt/ro/abs-link)";
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--shared-dir")
        .arg(format!("data={}", rw.display()))
        .arg("--shared-dir")
        .arg(format!("ro={}:ro", ro.display()))
        .arg("--cmdline")
        .arg(format!("hull.exec=\"{script}\""));
    let out = Running::spawn(cmd).wait(DEADLINE);
    let context = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(0), "{context}");

    assert!(out.stdout.contains("read=hello from the host"), "{context}");
    assert_eq!(
        std::fs::read_to_string(rw.join("from-guest.txt")).unwrap(),
        "written-by-guest\n"
    );
    assert!(
        out.stdout.contains("ro_read=read-only content"),
        "{context}"
    );
    assert!(out.stdout.contains("ro_write=refused"), "{context}");
    assert!(!ro.join("nope").exists());
    // The links are text to the guest: it sees the target path but not the host's file.
    assert!(
        out.stdout.contains(&format!("links={}", secret.display())),
        "{context}"
    );
    assert!(!out.stdout.contains("HOST-SECRET"), "{context}");
}
