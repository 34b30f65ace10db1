//! End to end: Debian's Docker (dockerd 20.10) runs hull containers, `--runtime hull`. The test
//! starts a private dockerd (its own data root, exec root, socket and pid file in a temporary
//! directory, a bridge of its own, no iptables), imports a busybox image made here (no
//! registry is reachable) with `docker import`, and checks what a Docker user does: `docker run` with its
//! output and exit status, Docker's `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`,
//! volumes both ways and read-only, `-it` (typed input and the window size), `-d` with `exec`, `logs`, `top`, `stop` (SIGTERM, then
//! SIGKILL after the timeout), `restart`, `kill`, `wait` and `rm -f`; on Docker's default
//! bridge (a bridge the test makes), `-p` serving a page to the host through Docker's userland
//! proxy, and a container fetching it from another by address. Docker's exec root gives
//! hull state directories far past the length a socket address holds. When dockerd has
//! stopped, nothing may be left: no `hull-vmm`, no hull state directory, no mount.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hull_tests::harness::{
    check_terminal_session, http_get, processes_mentioning, require_guest_artifacts, run,
    unmount_below, workspace_bin, Finished, TempDir, TERMINAL_SCRIPT,
};
use hull_tests::image::write_busybox_tar;

const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's client (another `docker` may come first on PATH).
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "hull-busybox:test";
/// For a command that boots a micro-VM.
const VM_DEADLINE: Duration = Duration::from_secs(300);
/// For dockerd to answer (about a minute in the nested lane, where every instruction of the
/// host is emulated), and to stop.
const DAEMON_DEADLINE: Duration = Duration::from_secs(300);

/// The bridge of the private dockerd's default network, made by the test (dockerd would
/// otherwise make `docker0`, which a system dockerd may own), and its address.
const BRIDGE_CIDR: &str = "10.231.0.1/24";

/// A bridge of the host made with iproute2's `ip`, deleted on drop.
struct Bridge(String);

impl Bridge {
    fn new() -> Self {
        let name = format!("hullbr{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = Command::new("/usr/sbin/ip")
                .args(args)
                .output()
                .expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&["link", "add", &name, "type", "bridge"]);
        let bridge = Self(name);
        ip(&["addr", "add", BRIDGE_CIDR, "dev", &bridge.0]);
        ip(&["link", "set", &bridge.0, "up"]);
        bridge
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

/// A private dockerd, stopped (and waited for) on drop.
struct Dockerd {
    dir: TempDir,
    daemon: Option<Child>,
    /// Dropped after the daemon.
    _bridge: Bridge,
}

impl Dockerd {
    fn start() -> Self {
        assert!(
            Path::new(DOCKERD).is_file() && Path::new(DOCKER).is_file(),
            "Debian's docker.io is not installed (make deps installs it)"
        );
        let dir = TempDir::new("docker");
        let bridge = Bridge::new();
        let path = dir.path();
        let log = std::fs::File::create(path.join("dockerd.log")).unwrap();
        let daemon = Command::new(DOCKERD)
            .arg("--data-root")
            .arg(path.join("data"))
            .arg("--exec-root")
            .arg(path.join("exec"))
            .arg("--pidfile")
            .arg(path.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", path.join("docker.sock").display()))
            .arg("--add-runtime")
            .arg(format!("hull={}", workspace_bin("hull").display()))
            .arg(format!("--bridge={}", bridge.0))
            // Published ports go through Docker's userland proxy: no iptables rules.
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--storage-driver=overlay2",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let dockerd = Self {
            dir,
            daemon: Some(daemon),
            _bridge: bridge,
        };
        let end = Instant::now() + DAEMON_DEADLINE;
        while !dockerd
            .docker(&["version"], DAEMON_DEADLINE)
            .status
            .success()
        {
            assert!(
                Instant::now() < end,
                "dockerd did not answer within {DAEMON_DEADLINE:?}\n{}",
                dockerd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        dockerd
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env(
            "DOCKER_HOST",
            format!("unix://{}", self.dir.path().join("docker.sock").display()),
        )
        .args(args);
        cmd
    }

    fn docker(&self, args: &[&str], deadline: Duration) -> Finished {
        run(self.command(args), deadline)
    }

    /// `docker ARGS` must succeed; its standard output.
    fn ok(&self, args: &[&str], deadline: Duration) -> String {
        let out = self.docker(args, deadline);
        assert!(
            out.status.success(),
            "docker {args:?}: {:?}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            out.stdout,
            out.stderr,
            self.log()
        );
        out.stdout
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let tail = log.len().saturating_sub(4096);
        format!("--- dockerd.log (tail) ---\n{}", &log[tail..])
    }

    /// Where Docker has hull keep its state directories: `--root` of every runtime of
    /// containerd's runc v2 shim, hull's included, is `<exec-root>/runtime-runc/moby`.
    fn hull_root(&self) -> PathBuf {
        self.dir.path().join("exec/runtime-runc/moby")
    }

    /// Stops dockerd (SIGTERM, as an init system would) and waits for it.
    fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            let end = Instant::now() + DAEMON_DEADLINE;
            while daemon.try_wait().ok().flatten().is_none() {
                if Instant::now() > end {
                    let _ = daemon.kill();
                    let _ = daemon.wait();
                    panic!(
                        "dockerd did not stop within {DAEMON_DEADLINE:?}\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        // What a failed test left: containerd's shims and the VMs, then the mounts.
        for (pid, _) in processes_mentioning_pids(&self.dir.path().display().to_string()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        unmount_below(self.dir.path());
    }
}

/// `docker run --rm --runtime hull IMAGE sh -c SCRIPT` on the default bridge.
fn hull_run_on_bridge(dockerd: &Dockerd, script: &str) -> Finished {
    dockerd.docker(
        &[
            "run",
            "--rm",
            "--runtime",
            "hull",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
        VM_DEADLINE,
    )
}

fn processes_mentioning_pids(needle: &str) -> Vec<(i32, String)> {
    hull_tests::harness::processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(needle))
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(&dir.display().to_string()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn docker_runs_hull_containers() {
    require_guest_artifacts();
    let mut dockerd = Dockerd::start();
    let tarball = dockerd.dir.path().join("image.tar");
    write_busybox_tar(&tarball);
    let imported = dockerd.docker(
        &["import", tarball.to_str().unwrap(), IMAGE],
        DAEMON_DEADLINE,
    );
    assert!(imported.status.success(), "docker import: {imported:?}");
    let hull_run = |extra: &[&str], script: &str| -> Finished {
        let mut args = vec!["run", "--runtime", "hull", "--network", "none"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
        dockerd.docker(&args, VM_DEADLINE)
    };

    // docker run: output and exit status; Docker's resolv.conf, hosts and hostname.
    let first = hull_run(
        &["--name", "first", "--hostname", "hull-first"],
        "echo hello from $(uname -r); cat /etc/hostname; grep -c . /etc/hosts; \
         cat /etc/resolv.conf; exit 3",
    );
    assert_eq!(first.status.code(), Some(3), "{first:?}\n{}", dockerd.log());
    let expected_resolv = dockerd.ok(
        &["inspect", "-f", "{{.ResolvConfPath}}", "first"],
        VM_DEADLINE,
    );
    let resolv = std::fs::read_to_string(expected_resolv.trim()).unwrap();
    let hosts = dockerd.ok(&["inspect", "-f", "{{.HostsPath}}", "first"], VM_DEADLINE);
    let host_lines = std::fs::read_to_string(hosts.trim())
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    let lines: Vec<&str> = first.stdout.lines().collect();
    assert!(lines[0].starts_with("hello from "), "{first:?}");
    assert_eq!(lines[1], "hull-first", "{first:?}");
    assert_eq!(lines[2], host_lines.to_string(), "{first:?}");
    assert_eq!(lines[3..].join("\n") + "\n", resolv, "{first:?}");
    dockerd.ok(&["rm", "first"], VM_DEADLINE);

    // Volumes: both ways, and read-only.
    let host = TempDir::new("docker-volume");
    std::fs::write(host.path().join("in"), "from the host\n").unwrap();
    let volume = format!("{}:/data", host.path().display());
    let read_only = format!("{}:/ro:ro", host.path().display());
    let vol = hull_run(
        &["--rm", "-v", &volume, "-v", &read_only],
        "cat /data/in; echo from the container > /data/out; \
         echo x > /ro/new 2>/dev/null || echo refused",
    );
    assert!(vol.status.success(), "{vol:?}\n{}", dockerd.log());
    assert_eq!(vol.stdout, "from the host\nrefused\n", "{vol:?}");
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).unwrap(),
        "from the container\n"
    );
    assert!(!host.path().join("new").exists());

    // -it: a terminal (under script(1), whose pty is the terminal the client sees) of the size
    // set on it, and typed input.
    check_terminal_session(
        &format!(
            "{DOCKER} run -it --rm --runtime hull --network none {IMAGE} sh -c {TERMINAL_SCRIPT}"
        ),
        &[(
            "DOCKER_HOST",
            format!(
                "unix://{}",
                dockerd.dir.path().join("docker.sock").display()
            ),
        )],
        VM_DEADLINE,
    );

    // Detached: exec, logs, top, stop (SIGTERM), restart, kill, wait, rm -f.
    let id = hull_run(
        &["-d", "--name", "bg"],
        "trap 'echo got-term; exit 5' TERM; echo started; while :; do sleep 1; done",
    );
    assert!(id.status.success(), "{id:?}\n{}", dockerd.log());
    let wait_for_log = |needle: &str, count: usize| {
        let end = Instant::now() + VM_DEADLINE;
        loop {
            let logs = dockerd.ok(&["logs", "bg"], VM_DEADLINE);
            if logs.matches(needle).count() >= count {
                return logs;
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} x{count} in the logs: {logs:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for_log("started", 1);
    let exec = dockerd.ok(
        &[
            "exec",
            "bg",
            "sh",
            "-c",
            "echo exec-ok; cat /proc/1/cmdline",
        ],
        VM_DEADLINE,
    );
    assert!(exec.starts_with("exec-ok\nsh\0-c\0trap"), "{exec:?}");
    let top = dockerd.ok(&["top", "bg"], VM_DEADLINE);
    assert!(top.contains("hull-vmm"), "docker top: {top}");
    dockerd.ok(&["stop", "bg"], VM_DEADLINE);
    assert_eq!(dockerd.ok(&["wait", "bg"], VM_DEADLINE).trim(), "5");
    wait_for_log("got-term", 1);
    dockerd.ok(&["restart", "bg"], VM_DEADLINE);
    wait_for_log("started", 2);
    dockerd.ok(&["kill", "bg"], VM_DEADLINE);
    assert_eq!(dockerd.ok(&["wait", "bg"], VM_DEADLINE).trim(), "137");
    dockerd.ok(&["rm", "-f", "bg"], VM_DEADLINE);

    // stop of a container that ignores SIGTERM: SIGKILL after the timeout.
    let stubborn = hull_run(
        &["-d", "--name", "stubborn"],
        "trap '' TERM; echo started; while :; do sleep 1; done",
    );
    assert!(stubborn.status.success(), "{stubborn:?}");
    let started = Instant::now();
    dockerd.ok(&["stop", "-t", "2", "stubborn"], VM_DEADLINE);
    assert_eq!(dockerd.ok(&["wait", "stubborn"], VM_DEADLINE).trim(), "137");
    eprintln!(
        "docker stop -t 2 of a container ignoring SIGTERM took {:?}",
        started.elapsed()
    );
    // A running container, removed by force.
    let forced = hull_run(&["-d", "--name", "forced"], "while :; do sleep 1; done");
    assert!(forced.status.success(), "{forced:?}");
    dockerd.ok(&["rm", "-f", "forced", "stubborn"], VM_DEADLINE);

    // Docker's default bridge: a published port serves a page to the host, and another
    // container reaches the server by its address.
    let web = dockerd.ok(
        &[
            "run",
            "-d",
            "--runtime",
            "hull",
            "--name",
            "web",
            "-p",
            "127.0.0.1:18080:80",
            IMAGE,
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-hull > /www/index.html && \
             exec httpd -f -p 80 -h /www",
        ],
        VM_DEADLINE,
    );
    assert!(!web.trim().is_empty(), "{web:?}");
    let page = http_get("127.0.0.1:18080", VM_DEADLINE);
    assert!(
        page.starts_with("HTTP/1.") && page.ends_with("hello-from-hull\n"),
        "{page:?}"
    );
    let address = dockerd.ok(
        &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"],
        VM_DEADLINE,
    );
    let address = address.trim();
    assert!(address.starts_with("10.231.0."), "{address:?}");
    let fetched = hull_run_on_bridge(&dockerd, &format!("wget -qO- http://{address}/"));
    assert!(fetched.status.success(), "{fetched:?}\n{}", dockerd.log());
    assert_eq!(fetched.stdout, "hello-from-hull\n", "{fetched:?}");
    dockerd.ok(&["rm", "-f", "web"], VM_DEADLINE);

    // Nothing is left once dockerd has stopped.
    dockerd.stop();
    let left = processes_mentioning("hull-vmm");
    let ours: Vec<_> = left
        .iter()
        .filter(|p| p.contains(&dockerd.dir.path().display().to_string()))
        .collect();
    assert!(ours.is_empty(), "hull-vmm left: {ours:?}");
    let states: Vec<_> = std::fs::read_dir(dockerd.hull_root())
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(states.is_empty(), "hull state directories left: {states:?}");
    let mounts: Vec<_> = mounts_under(&dockerd.dir.path().join("exec"))
        .into_iter()
        .filter(|m| m.contains("runtime-runc"))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}
