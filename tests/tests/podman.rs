//! End to end: Debian's Podman 4.3, rootful, runs hull containers with `--runtime <hull>`
//! (conmon drives hull as it drives runc). The test gives Podman a storage root, run root and
//! event log of its own in a temporary directory, imports a busybox image made here, and checks
//! what a Podman user does: `podman run` with output and exit status (and Podman's
//! `/run/.containerenv`), a volume, `-it` (a terminal: typed input and the window size),
//! `-d` with `exec`, `logs`, `stop` and `rm`; on Podman's default network (a CNI bridge),
//! `-p` serving a page to the host and a container fetching it from another by address.
//! Nothing may be left: no `hull-vmm`, no hull state directory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{
    check_terminal_session, http_get, processes_mentioning, require_guest_artifacts, run,
    unmount_below, workspace_bin, Finished, TempDir, TERMINAL_SCRIPT,
};
use hull_tests::image::write_busybox_tar;

const PODMAN: &str = "/usr/bin/podman";
const IMAGE: &str = "localhost/hull-busybox:test";
/// For a command that boots a micro-VM.
const VM_DEADLINE: Duration = Duration::from_secs(300);

struct Podman {
    dir: TempDir,
}

impl Podman {
    fn args(&self) -> Vec<String> {
        let path = self.dir.path();
        vec![
            "--root".into(),
            path.join("root").display().to_string(),
            "--runroot".into(),
            path.join("run").display().to_string(),
            "--tmpdir".into(),
            path.join("tmp").display().to_string(),
            "--runtime".into(),
            workspace_bin("hull").display().to_string(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--events-backend".into(),
            "file".into(),
            "--storage-driver".into(),
            "overlay".into(),
        ]
    }

    fn podman(&self, args: &[&str]) -> Finished {
        let mut cmd = Command::new(PODMAN);
        // (Image imports go through TMPDIR, /var/tmp by default.)
        cmd.env("TMPDIR", self.dir.path().join("tmp"))
            .args(self.args())
            .args(args);
        run(cmd, VM_DEADLINE)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(out.status.success(), "podman {args:?}: {out:?}");
        out.stdout
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers a failed test left, then Podman's mounts.
        let _ = self.podman(&["rm", "-a", "-f"]);
        unmount_below(self.dir.path());
    }
}

#[test]
fn podman_runs_hull_containers() {
    require_guest_artifacts();
    assert!(
        Path::new(PODMAN).is_file(),
        "Debian's podman is not installed (make deps installs it)"
    );
    let podman = Podman {
        dir: TempDir::new("podman"),
    };
    std::fs::create_dir(podman.dir.path().join("tmp")).unwrap();
    let tarball = podman.dir.path().join("image.tar");
    write_busybox_tar(&tarball);
    podman.ok(&["import", tarball.to_str().unwrap(), IMAGE]);
    let hull_run = |extra: &[&str], script: &str| -> Finished {
        let mut args = vec!["run", "--network", "none"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
        podman.podman(&args)
    };

    // run: output, exit status, Podman's own file; a volume both ways.
    let host = TempDir::new("podman-volume");
    std::fs::write(host.path().join("in"), "from the host\n").unwrap();
    let volume = format!("{}:/data", host.path().display());
    let first = hull_run(
        &["--rm", "-v", &volume],
        "echo hello; test -f /run/.containerenv && echo containerenv; cat /data/in; \
         echo from the container > /data/out; exit 4",
    );
    assert_eq!(first.status.code(), Some(4), "{first:?}");
    assert_eq!(
        first.stdout, "hello\ncontainerenv\nfrom the host\n",
        "{first:?}"
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).unwrap(),
        "from the container\n"
    );

    // --uidmap/--gidmap: a user namespace made in the guest; Podman shifts the image's
    // files to the mapped ids, and the container's root writes as 100000 on the host.
    let mapped = hull_run(
        &[
            "--rm",
            "--uidmap",
            "0:100000:65536",
            "--gidmap",
            "0:100000:65536",
        ],
        "id -u; cat /proc/self/uid_map; echo x > /tmp/f && ls -n /tmp/f",
    );
    assert_eq!(mapped.status.code(), Some(0), "{mapped:?}");
    let words: Vec<&str> = mapped.stdout.split_whitespace().collect();
    assert_eq!(words[..4], ["0", "0", "100000", "65536"], "{mapped:?}");
    // `ls -n` in the container: owner 0 0 (in its namespace).
    assert_eq!(words[6..8], ["0", "0"], "{mapped:?}");

    // -it: a terminal (under script(1), whose pty is the terminal podman sees) of the size
    // set on it, and typed input.
    let mut command = vec![PODMAN.to_owned()];
    command.extend(podman.args());
    command.extend(
        [
            "run",
            "-it",
            "--rm",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            TERMINAL_SCRIPT,
        ]
        .map(str::to_owned),
    );
    check_terminal_session(&command.join(" "), &[], VM_DEADLINE);

    // -d with exec, logs, stop, rm.
    let id = hull_run(
        &["-d", "--name", "bg"],
        "trap 'echo got-term; exit 5' TERM; echo started; while :; do sleep 1; done",
    );
    assert!(id.status.success(), "{id:?}");
    let end = std::time::Instant::now() + VM_DEADLINE;
    while !podman.ok(&["logs", "bg"]).contains("started") {
        assert!(std::time::Instant::now() < end, "bg never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(podman.ok(&["exec", "bg", "echo", "exec-ok"]), "exec-ok\n");
    podman.ok(&["stop", "bg"]);
    assert_eq!(
        podman
            .ok(&["inspect", "-f", "{{.State.ExitCode}}", "bg"])
            .trim(),
        "5"
    );
    assert!(podman.ok(&["logs", "bg"]).contains("got-term"));
    podman.ok(&["rm", "bg"]);

    // Podman's default network (a CNI bridge): a published port serves a page to the host,
    // and another container reaches the server by its address.
    let web = podman.podman(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        "127.0.0.1:18081:80",
        IMAGE,
        "sh",
        "-c",
        "mkdir -p /www && echo hello-from-hull > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    assert!(web.status.success(), "{web:?}");
    let page = http_get("127.0.0.1:18081", VM_DEADLINE);
    assert!(
        page.starts_with("HTTP/1.") && page.ends_with("hello-from-hull\n"),
        "{page:?}"
    );
    let address = podman.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"]);
    let fetch = format!("wget -qO- http://{}/", address.trim());
    let fetched = podman.podman(&["run", "--rm", IMAGE, "sh", "-c", &fetch]);
    assert!(fetched.status.success(), "{fetched:?}");
    assert_eq!(fetched.stdout, "hello-from-hull\n", "{fetched:?}");
    podman.ok(&["rm", "-f", "web"]);
    let web = web.stdout.trim();
    assert!(
        processes_mentioning(web).is_empty(),
        "left: {:?}",
        processes_mentioning(web)
    );

    // Podman gives hull no --root: its state directories are in hull's default one.
    let id = id.stdout.trim();
    assert!(
        processes_mentioning(id).is_empty(),
        "left: {:?}",
        processes_mentioning(id)
    );
    assert!(
        !Path::new("/run/hull").join(id).exists(),
        "state directory of {id} left"
    );
}
