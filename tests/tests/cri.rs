//! End to end: a pod through the CRI, as a kubelet runs one, on a private containerd 1.6 with
//! its CRI plugin (`hull_tests::cri`), once with the `runc` runtime handler (which proves the
//! harness) and once with `hull` (containerd's runtime type `io.containerd.hull.v2`, the
//! `containerd-shim-hull-v2` shim: the pod is one micro-VM).
//!
//! The pod: a sandbox with a log directory, a hostname, the kubelet's default security
//! context and a CNI network (bridge, host-local, portmap where netfilter's NAT is there);
//! the image pulled from a registry on 127.0.0.1; two containers sharing an emptyDir volume
//! and the pod's localhost: "server" writes a page into the volume and serves it with busybox
//! httpd on port 8080, "client" fetches it over 127.0.0.1, writes it into the volume and to
//! its log, and waits for the host to drop a file into the volume before it exits.
//!
//! Checked the way a kubelet and its user would: the pod's address from PodSandboxStatus
//! serves the page to the host (and a host port does, through portmap); ExecSync's output and
//! exit codes (the pod's hostname, kubelet's /etc/hosts, the cluster's resolv.conf, whose
//! kernel it is); ContainerStatus of a finished container; ContainerStats; the CRI log files
//! (`TIME STREAM TAG LINE`) at the paths the runtime reports; StopContainer reaching a
//! shell's TERM trap well within the grace period, its termination message on the host;
//! the listings. With hull, one `hull-vmm` runs the whole pod. Once the pod is removed
//! nothing of it may be left: no shim, no `hull-vmm`, no mount, no network namespace, no CNI
//! lease, cached result, veth or iptables rule, no TAP, no runc state, no shim socket, no
//! container cgroup.
//!
//! Then what goes wrong, with hull only, each on a node of its own: pod annotations that size
//! the VM wrongly (`cri_bad_pod_annotations`), a pod whose hull-vmm the host kills
//! (`cri_container_in_a_dead_pod_vm`), containerd restarting under a running pod
//! (`cri_containerd_restart_keeps_pods`), and the shim run by hand with wrong arguments
//! (`shim_refuses_wrong_arguments`, no containerd and no VM). Each checks the error a user
//! gets, that nothing is lost, and that nothing is left behind.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hull_tests::containerd::signal;
use hull_tests::cri::kubelet::{host_mount, Pod, CLUSTER_DNS};
use hull_tests::cri::{
    api, hull_shim, parse_log, CriError, CriNode, PodTrace, HULL_HANDLER, HULL_POD_DIRS, HULL_SHIM,
    RUNC_HANDLER,
};
use hull_tests::harness::{http_get, require_guest_artifacts, Running, TempDir};
use sha2::{Digest, Sha256};

/// The pod's grace period for its containers, in whole seconds.
const GRACE: Duration = Duration::from_secs(30);
/// For a container to reach a state, or its log a line.
const CONTAINER_DEADLINE: Duration = Duration::from_secs(120);
/// For an ExecSync.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// The port the server listens on, in the pod.
const SERVER_PORT: u16 = 8080;

/// The server: a page in the shared volume, httpd serving it on every address of the pod,
/// a TERM trap that leaves a termination message and exits 143. (It is its PID namespace's
/// init, which a signal reaches only through a handler; `wait` lets the trap run at once.)
fn server_script(token: &str) -> String {
    format!(
        "trap 'echo server got TERM; echo bye from the server > /dev/termination-log; \
               exit 143' TERM; \
         mkdir -p /data/www; echo \"hello from $(hostname) {token}\" > /data/www/index.html; \
         httpd -f -p 0.0.0.0:{SERVER_PORT} -h /data/www & \
         echo server ready; wait"
    )
}

/// The client: fetches the page over the pod's localhost (retrying while httpd starts),
/// keeps it in the volume and logs it, then waits for the host's `done`.
fn client_script() -> String {
    format!(
        "for i in $(seq 1 120); do \
           wget -q -O /data/fetched http://127.0.0.1:{SERVER_PORT}/index.html && break; sleep 0.5; \
         done; \
         [ -s /data/fetched ] || {{ echo fetch failed; exit 3; }}; \
         echo \"fetched: $(cat /data/fetched)\"; \
         for i in $(seq 1 1200); do [ -e /data/done ] && break; sleep 0.5; done; \
         echo client done"
    )
}

#[test]
fn cri_pod_with_runc() {
    if let Some(why) = hull_tests::cri::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    pod_scenario(RUNC_HANDLER, None);
}

#[test]
fn cri_pod_with_hull() {
    let Some(shim) = hull_node_shim() else {
        return;
    };
    pod_scenario(HULL_HANDLER, Some(&shim));
}

/// The hull shim, when this host can run a CRI node with hull pods; otherwise prints why the
/// test is skipped.
fn hull_node_shim() -> Option<PathBuf> {
    if let Some(why) = hull_tests::cri::unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return None;
    }
    require_guest_artifacts();
    Some(hull_shim())
}

/// What `make install` installs runs a pod: the shim, hull and hull-vmm from `PREFIX/bin`, the
/// guest from `PREFIX/share/hull/guest`, found by hull beside itself (no HULL_GUEST_DIR).
#[test]
fn cri_pod_from_make_install() {
    if let Some(why) = hull_tests::cri::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let make = std::process::Command::new("make").arg("--version").output();
    if !workspace.join("Makefile").is_file() || !make.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no source tree or no make here (the nested lane's level-1 machine)");
        return;
    }
    require_guest_artifacts();
    hull_shim(); // built, or this fails saying so
    let prefix = hull_tests::harness::TempDir::new("make-install");
    // The recipe alone: the kernel, agent and binaries are built already (`make test`).
    let install = std::process::Command::new("make")
        .current_dir(&workspace)
        .args([
            "--no-print-directory",
            "-o",
            "kernel",
            "-o",
            "agent",
            "-o",
            "build",
        ])
        .arg("install")
        .arg(format!("PREFIX={}", prefix.path().display()))
        .output()
        .expect("run make install");
    assert!(
        install.status.success(),
        "make install: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    let shim = prefix.path().join("bin/containerd-shim-hull-v2");
    for installed in [
        "bin/hull",
        "bin/hull-vmm",
        "bin/containerd-shim-hull-v2",
        "share/hull/guest/vmlinux",
        "share/hull/guest/initramfs.cpio",
        "share/hull/deploy/containerd-hull.toml",
        "share/hull/deploy/runtimeclass.yaml",
    ] {
        assert!(
            prefix.path().join(installed).is_file(),
            "make install left out {installed}"
        );
    }
    pod_scenario(HULL_HANDLER, Some(&shim));
}

/// One pod's life under `handler`, timed step by step.
fn pod_scenario(handler: &'static str, shim: Option<&Path>) {
    let start = Instant::now();
    let node = CriNode::start(shim);
    let mut pod = node.pod("default", "web");
    if node.cni().has_portmap() {
        pod.port_mappings.push(api::PortMapping {
            protocol: api::Protocol::Tcp as i32,
            container_port: SERVER_PORT.into(),
            host_port: free_port().into(),
            host_ip: String::new(),
        });
    }
    let s = Scenario { node, pod, handler };
    let version = s.ok(s.node.cri().version());
    s.ensure(
        version.runtime_name == "containerd" && version.runtime_api_version == "v1",
        || format!("Version: {version:?}"),
    );

    let sandbox_config = s.pod.sandbox_config();
    let step = Instant::now();
    let sandbox = s.ok(s.node.cri().run_pod_sandbox(&sandbox_config, handler));
    eprintln!("[{handler}] RunPodSandbox took {:?}", step.elapsed());
    let mut trace = PodTrace {
        sandbox_id: sandbox.clone(),
        cgroup_parent: s.pod.cgroup_parent.clone(),
        ..Default::default()
    };
    let (ip, netns) = s.check_sandbox(&sandbox);
    trace.netns = netns;

    let step = Instant::now();
    let image = s.node.app_image().to_owned();
    let image_ref = s.ok(s.node.cri().pull_image(&image, Some(&sandbox_config)));
    eprintln!("[{handler}] PullImage took {:?}", step.elapsed());
    let served = s.node.registry_requests();
    s.ensure(
        served
            .iter()
            .any(|r| r.starts_with("GET /v2/hull/busybox/manifests/") && r.ends_with(" 200")),
        || format!("PullImage did not fetch the manifest from the registry: {served:?}"),
    );
    let known = s.ok(s.node.cri().image_status(&image));
    s.ensure(known.as_ref().is_some_and(|i| i.id == image_ref), || {
        format!("ImageStatus {image} after pulling {image_ref}: {known:?}")
    });

    // Containers, as the kubelet makes them once the pod has its address.
    s.pod.write_etc_hosts(&ip);
    let shared = s.pod.empty_dir("shared");
    let token = format!("in pod {}", s.pod.uid);
    let page = format!("hello from {} {token}", s.pod.hostname);
    let volume = || vec![host_mount(&shared, "/data")];
    let server_config = s.pod.container_config(
        "server",
        &image,
        &["sh", "-c", &server_script(&token)],
        volume(),
    );
    let client_config =
        s.pod
            .container_config("client", &image, &["sh", "-c", &client_script()], volume());
    let server = s.create_and_start(&sandbox, &server_config, &sandbox_config);
    trace.container_ids.push(server.clone());
    s.wait_for_log_line("server", "server ready");
    let client = s.create_and_start(&sandbox, &client_config, &sandbox_config);
    trace.container_ids.push(client.clone());
    let fetched = s.wait_for_log_line("client", "fetched: ");
    s.ensure(fetched.content == format!("fetched: {page}"), || {
        format!("the client fetched {fetched:?}, not {page:?}")
    });
    let kept = std::fs::read_to_string(shared.join("fetched")).unwrap_or_default();
    s.ensure(kept == format!("{page}\n"), || {
        format!("the shared volume holds {kept:?}, not the page {page:?}")
    });

    // Both containers run: the pod's processes on the host.
    for id in [&server, &client] {
        s.wait_for_state(id, api::ContainerState::ContainerRunning);
    }
    let vmms = s.node.hull_vmms(&sandbox);
    trace.vmm_pids = vmms.iter().map(|(pid, _)| *pid).collect();
    let want_vmms = usize::from(handler == HULL_HANDLER);
    s.ensure(vmms.len() == want_vmms, || {
        format!(
            "want {want_vmms} hull-vmm for the pod with both containers running, see {vmms:?}; \
             every hull-vmm here: {:?}",
            hull_tests::cri::hull_vmm_processes()
        )
    });
    s.check_listings(&sandbox, &[(&server, "server"), (&client, "client")]);
    s.check_exec(&server, &ip, &page);
    s.check_stats(&server);

    // The pod's address serves the page to the host, and so does its host port.
    let step = Instant::now();
    let answer = http_get(&format!("{ip}:{SERVER_PORT}"), Duration::from_secs(60));
    s.ensure(answer.contains(&page), || {
        format!("GET http://{ip}:{SERVER_PORT}/ from the host: {answer:?}")
    });
    if let Some(mapping) = s.pod.port_mappings.first() {
        let via = format!("{}:{}", s.node.cni().gateway(), mapping.host_port);
        let answer = http_get(&via, Duration::from_secs(60));
        s.ensure(answer.contains(&page), || {
            format!("GET http://{via}/ (portmap to {ip}:{SERVER_PORT}): {answer:?}")
        });
    } else {
        eprintln!("[{handler}] no host port: this kernel has no netfilter NAT for portmap");
    }
    eprintln!(
        "[{handler}] the host fetched the page in {:?}",
        step.elapsed()
    );

    // The client finishes when the host says so through the volume.
    std::fs::write(shared.join("done"), "").expect("write into the shared volume");
    let status = s.wait_for_state(&client, api::ContainerState::ContainerExited);
    s.ensure(
        status.exit_code == 0 && status.reason == "Completed",
        || format!("the finished client's status: {status:?}"),
    );
    s.check_log(
        "client",
        &status.log_path,
        &[&format!("fetched: {page}"), "client done"],
    );

    // StopContainer: the TERM trap runs, well within the grace period.
    let step = Instant::now();
    s.ok(s.node.cri().stop_container(&server, GRACE));
    let took = step.elapsed();
    eprintln!("[{handler}] StopContainer took {took:?}");
    let status = s.ok(s.node.cri().container_status(&server));
    s.ensure(
        status.state == api::ContainerState::ContainerExited as i32 && status.exit_code == 143,
        || format!("the stopped server's status: {status:?}"),
    );
    s.ensure(took < GRACE, || {
        format!("StopContainer took {took:?}: the TERM trap did not end the server")
    });
    s.check_log(
        "server",
        &status.log_path,
        &["server ready", "server got TERM"],
    );
    let message = std::fs::read_to_string(s.pod.termination_log("server")).unwrap_or_default();
    s.ensure(message == "bye from the server\n", || {
        format!("the server's termination message on the host: {message:?}")
    });

    for id in [&server, &client] {
        s.ok(s.node.cri().remove_container(id));
        let gone = s.node.cri().container_status(id);
        s.ensure(matches!(&gone, Err(e) if e.is_not_found()), || {
            format!("ContainerStatus of removed {id}: {gone:?}")
        });
    }
    s.remove_pod(&sandbox, &trace);
    s.node.shut_down();
    eprintln!(
        "[{handler}] the pod's whole life took {:?}",
        start.elapsed()
    );
}

/// The node, the pod, and how to fail with what explains it.
struct Scenario {
    node: CriNode,
    pod: Pod,
    handler: &'static str,
}

impl Scenario {
    /// Panics with `what`, the pod's container logs and containerd's.
    fn fail(&self, what: &str) -> ! {
        // Each container's log is NAME/0.log under the pod's log directory.
        let mut containers: Vec<String> = std::fs::read_dir(self.pod.log_directory())
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        containers.sort();
        let mut logs = String::new();
        for container in &containers {
            logs.push_str(&hull_tests::containerd::tail_of(
                &self.pod.log_file(container),
                4096,
            ));
        }
        panic!(
            "[{}] {what}\n{logs}\n{}",
            self.handler,
            self.node.diagnostics()
        );
    }

    fn ensure(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(&what());
        }
    }

    /// The answer of a CRI call that must succeed.
    fn ok<T>(&self, answer: Result<T, CriError>) -> T {
        answer.unwrap_or_else(|e| self.fail(&e.to_string()))
    }

    /// PodSandboxStatus and ListPodSandbox of the new pod: ready, under `handler`, with an
    /// address of the CNI network. Returns its address and its network namespace.
    fn check_sandbox(&self, sandbox: &str) -> (String, Option<std::path::PathBuf>) {
        let answer = self.ok(self.node.cri().pod_sandbox_status(sandbox, true));
        let status = answer.status.clone().unwrap_or_default();
        let ip = status.network.clone().unwrap_or_default().ip;
        self.ensure(
            status.state == api::PodSandboxState::SandboxReady as i32
                && self.node.cni().contains(&ip)
                && status.metadata.as_ref().map(|m| m.uid.as_str()) == Some(&self.pod.uid),
            || {
                format!(
                    "PodSandboxStatus: want a ready pod with an address in {}: {status:?}",
                    self.node.cni().subnet()
                )
            },
        );
        // containerd's verbose info: the sandbox's OCI spec names its network namespace.
        let info: serde_json::Value = answer
            .info
            .get("info")
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|ns| ns["type"] == "network")
                    .and_then(|ns| ns["path"].as_str())
            })
            .map(std::path::PathBuf::from);
        self.ensure(netns.as_ref().is_some_and(|n| n.exists()), || {
            format!("no network namespace in the sandbox's spec: {netns:?}")
        });
        let listed = self.ok(self
            .node
            .cri()
            .list_pod_sandbox(Some(api::PodSandboxFilter {
                id: sandbox.into(),
                ..Default::default()
            })));
        self.ensure(
            listed.len() == 1
                && listed[0].state == api::PodSandboxState::SandboxReady as i32
                && listed[0].runtime_handler == self.handler,
            || format!("ListPodSandbox: {listed:?}"),
        );
        eprintln!("[{}] pod {sandbox} at {ip}", self.handler);
        (ip, netns)
    }

    /// StopPodSandbox (the pod is then not ready) and RemovePodSandbox (the pod and its
    /// containers are then unknown), timed; then nothing the pod `trace` describes may be left.
    fn remove_pod(&self, sandbox: &str, trace: &PodTrace) {
        let step = Instant::now();
        self.ok(self.node.cri().stop_pod_sandbox(sandbox));
        let stopped = self.ok(self.node.cri().pod_sandbox_status(sandbox, false));
        self.ensure(
            stopped.status.as_ref().map(|st| st.state)
                == Some(api::PodSandboxState::SandboxNotready as i32),
            || format!("PodSandboxStatus after StopPodSandbox: {stopped:?}"),
        );
        self.ok(self.node.cri().remove_pod_sandbox(sandbox));
        eprintln!(
            "[{}] StopPodSandbox and RemovePodSandbox took {:?}",
            self.handler,
            step.elapsed()
        );
        let gone = self.node.cri().pod_sandbox_status(sandbox, false);
        self.ensure(matches!(&gone, Err(e) if e.is_not_found()), || {
            format!("PodSandboxStatus of the removed pod: {gone:?}")
        });
        let pods = self.ok(self.node.cri().list_pod_sandbox(None));
        let containers = self.ok(self.node.cri().list_containers(None));
        self.ensure(pods.is_empty() && containers.is_empty(), || {
            format!("listed after removal: pods {pods:?}, containers {containers:?}")
        });
        self.node.assert_nothing_left(trace);
    }

    /// Waits for the pod `sandbox` to be in `state`.
    fn wait_for_sandbox_state(&self, sandbox: &str, state: api::PodSandboxState) {
        let end = Instant::now() + CONTAINER_DEADLINE;
        loop {
            let answer = self.ok(self.node.cri().pod_sandbox_status(sandbox, false));
            if answer.status.as_ref().map(|s| s.state) == Some(state as i32) {
                return;
            }
            if Instant::now() > end {
                self.fail(&format!(
                    "pod {sandbox} not {state:?} within {CONTAINER_DEADLINE:?}: {answer:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// CreateContainer and StartContainer; the container's id.
    fn create_and_start(
        &self,
        sandbox: &str,
        config: &api::ContainerConfig,
        sandbox_config: &api::PodSandboxConfig,
    ) -> String {
        let name = config.metadata.as_ref().map_or("", |m| m.name.as_str());
        let step = Instant::now();
        let id = self.ok(self
            .node
            .cri()
            .create_container(sandbox, config, sandbox_config));
        let created = step.elapsed();
        self.ok(self.node.cri().start_container(&id));
        eprintln!(
            "[{}] {name}: CreateContainer took {created:?}, StartContainer {:?}",
            self.handler,
            step.elapsed() - created
        );
        id
    }

    /// Waits for container `id` to be in `state`; its status.
    fn wait_for_state(&self, id: &str, state: api::ContainerState) -> api::ContainerStatus {
        let end = Instant::now() + CONTAINER_DEADLINE;
        loop {
            let status = self.ok(self.node.cri().container_status(id));
            if status.state == state as i32 {
                return status;
            }
            if Instant::now() > end {
                self.fail(&format!(
                    "container {id} not {state:?} within {CONTAINER_DEADLINE:?}: {status:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for a stdout line of `container`'s CRI log that starts with `prefix`.
    fn wait_for_log_line(&self, container: &str, prefix: &str) -> hull_tests::cri::LogLine {
        let path = self.pod.log_file(container);
        let end = Instant::now() + CONTAINER_DEADLINE;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // The runtime may be writing the last line.
            let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
            let lines = parse_log(complete).unwrap_or_else(|e| {
                self.fail(&format!("{} is not a CRI log: {e}", path.display()))
            });
            if let Some(line) = lines
                .into_iter()
                .find(|l| l.stream == "stdout" && l.content.starts_with(prefix))
            {
                return line;
            }
            if Instant::now() > end {
                self.fail(&format!(
                    "no line {prefix:?} in {} within {CONTAINER_DEADLINE:?}",
                    path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The CRI log at `log_path` (as ContainerStatus reports it: the kubelet's path) holds
    /// exactly `want`, each a full stdout line.
    fn check_log(&self, container: &str, log_path: &str, want: &[&str]) {
        let expected = self.pod.log_file(container);
        self.ensure(Path::new(log_path) == expected, || {
            format!(
                "{container}'s log path is {log_path:?}, not {}",
                expected.display()
            )
        });
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        let lines = parse_log(&text).unwrap_or_else(|e| self.fail(&e));
        let got: Vec<(&str, &str, &str)> = lines
            .iter()
            .map(|l| (l.stream.as_str(), l.tag.as_str(), l.content.as_str()))
            .collect();
        let wanted: Vec<(&str, &str, &str)> =
            want.iter().map(|line| ("stdout", "F", *line)).collect();
        self.ensure(got == wanted, || {
            format!("{container}'s log {log_path}: want {wanted:?}, got:\n{text}")
        });
    }

    /// ListPodSandbox and ListContainers while the pod runs.
    fn check_listings(&self, sandbox: &str, containers: &[(&str, &str)]) {
        let listed = self.ok(self.node.cri().list_containers(Some(api::ContainerFilter {
            pod_sandbox_id: sandbox.into(),
            ..Default::default()
        })));
        let mut seen: Vec<(String, String, i32)> = listed
            .iter()
            .map(|c| {
                let name = c
                    .metadata
                    .as_ref()
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                (c.id.clone(), name, c.state)
            })
            .collect();
        seen.sort();
        let mut want: Vec<(String, String, i32)> = containers
            .iter()
            .map(|(id, name)| {
                (
                    (*id).to_owned(),
                    (*name).to_owned(),
                    api::ContainerState::ContainerRunning as i32,
                )
            })
            .collect();
        want.sort();
        self.ensure(seen == want, || {
            format!("ListContainers of the pod: want {want:?}, got {listed:?}")
        });
    }

    /// ExecSync in the server: what it sees (the shared volume, the pod's hostname, the
    /// kubelet's hosts file, the cluster's DNS config, whose kernel), and a failing command's
    /// exit code and standard error.
    fn check_exec(&self, server: &str, ip: &str, page: &str) {
        let step = Instant::now();
        let cri = self.node.cri();
        let read = self.ok(cri.exec_sync(server, &["cat", "/data/fetched"], EXEC_TIMEOUT));
        self.ensure(
            read.exit_code == 0 && read.stdout == format!("{page}\n").as_bytes(),
            || format!("ExecSync cat /data/fetched: {read:?}"),
        );
        let failing = self.ok(cri.exec_sync(
            server,
            &["sh", "-c", "echo to stdout; echo to stderr >&2; exit 5"],
            EXEC_TIMEOUT,
        ));
        self.ensure(
            failing.exit_code == 5
                && failing.stdout == b"to stdout\n"
                && failing.stderr == b"to stderr\n",
            || format!("ExecSync exit 5: {failing:?}"),
        );
        let seen = self.ok(cri.exec_sync(
            server,
            &[
                "sh",
                "-c",
                "hostname; uname -r; echo $KUBERNETES_SERVICE_PORT; \
                 cat /etc/hosts /etc/resolv.conf",
            ],
            EXEC_TIMEOUT,
        ));
        let text = String::from_utf8_lossy(&seen.stdout).into_owned();
        let mut lines = text.lines();
        let (hostname, release, port) = (lines.next(), lines.next(), lines.next());
        let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        // With hull the container runs on the guest kernel, with runc on the host's.
        let right_kernel = release.is_some_and(|r| {
            if self.handler == HULL_HANDLER {
                r.ends_with("-hull")
            } else {
                r == host_release
            }
        });
        self.ensure(
            seen.exit_code == 0
                && hostname == Some(self.pod.hostname.as_str())
                && right_kernel
                && port == Some("443")
                && text.contains(&format!("{ip}\t{}", self.pod.hostname))
                && text.contains(&format!("nameserver {CLUSTER_DNS}"))
                && text
                    .contains("search default.svc.cluster.local svc.cluster.local cluster.local")
                && text.contains("options ndots:5"),
            || format!("ExecSync in the server sees:\n{text}\n{seen:?}"),
        );
        eprintln!(
            "[{}] three ExecSyncs took {:?} (kernel {})",
            self.handler,
            step.elapsed(),
            release.unwrap_or("?")
        );
    }

    /// ContainerStats of a running container: CPU time and memory in use.
    fn check_stats(&self, id: &str) {
        let stats = self.ok(self.node.cri().container_stats(id));
        let cpu = stats
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map(|v| v.value);
        let memory = stats
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map(|v| v.value);
        self.ensure(
            stats.attributes.as_ref().map(|a| a.id.as_str()) == Some(id)
                && cpu.is_some_and(|c| c > 0)
                && memory.is_some_and(|m| m > 0),
            || format!("ContainerStats: want CPU time and memory in use: {stats:?}"),
        );
        eprintln!(
            "[{}] server stats: {} ns of CPU, {} bytes working set",
            self.handler,
            cpu.unwrap_or(0),
            memory.unwrap_or(0)
        );
    }
}

/// A TCP port nothing on the host listens on now (the kernel's choice for an ephemeral bind).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("a bound socket's address")
        .port()
}

// --- Bad input: what a user gets wrong, what the host does to a pod, a daemon restarting. ---

/// The pod annotation that sizes a pod VM's memory (docs/kubernetes.md).
const POD_MEMORY_ANNOTATION: &str = "io.hull.pod.memory-mib";
/// The pod annotation that gives a pod VM its vCPUs.
const POD_VCPUS_ANNOTATION: &str = "io.hull.pod.vcpus";

/// A pod whose annotations size its VM wrongly: RunPodSandbox fails with a message naming the
/// annotation and its value, the half-made sandbox is not listed, and nothing of it is left (no
/// shim, no hull-vmm, no pod directory under /run/hull/cri, no mount, network namespace, TAP
/// or cgroup). The node goes on: a pod with good annotations then runs, and its guest has the
/// memory it asked for.
#[test]
fn cri_bad_pod_annotations() {
    let Some(shim) = hull_node_shim() else {
        return;
    };
    let node = CriNode::start(Some(&shim));
    // containerd passes on only the pod annotations its runtime's `pod_annotations` lists.
    let info = node
        .cri()
        .status_info()
        .unwrap_or_else(|e| node.fail(&e.to_string()));
    let config: serde_json::Value = info
        .get("config")
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let passed_on = &config["containerd"]["runtimes"][HULL_HANDLER]["PodAnnotations"];
    if !passed_on
        .as_array()
        .is_some_and(|all| all.iter().any(|a| a == "io.hull.pod.*"))
    {
        node.fail(&format!(
            "the CRI config's hull handler does not pass io.hull.pod.* on: PodAnnotations = \
             {passed_on}"
        ));
    }

    for (n, (annotation, value)) in [(POD_MEMORY_ANNOTATION, "lots"), (POD_VCPUS_ANNOTATION, "0")]
        .into_iter()
        .enumerate()
    {
        let pod = node.pod("default", &format!("badly-sized-{n}"));
        let mut config = pod.sandbox_config();
        config.annotations.insert(annotation.into(), value.into());
        let step = Instant::now();
        let message = match node.cri().run_pod_sandbox(&config, HULL_HANDLER) {
            Ok(id) => node.fail(&format!(
                "RunPodSandbox with {annotation}={value:?} made pod {id}: want an error"
            )),
            Err(e) => e.to_string(),
        };
        eprintln!(
            "[hull] RunPodSandbox with {annotation}={value:?} failed in {:?}: {message}",
            step.elapsed()
        );
        if !(message.contains(annotation) && message.contains(&format!("\"{value}\""))) {
            node.fail(&format!(
                "RunPodSandbox with {annotation}={value:?}: the error does not name the \
                 annotation and its value: {message}"
            ));
        }
        let pods = node.cri().list_pod_sandbox(None);
        let containers = node.cri().list_containers(None);
        if !(matches!(&pods, Ok(p) if p.is_empty()) && matches!(&containers, Ok(c) if c.is_empty()))
        {
            node.fail(&format!(
                "listed after the failed RunPodSandbox: pods {pods:?}, containers {containers:?}"
            ));
        }
        // The error names the sandbox's bundle, .../k8s.io/SANDBOX/config.json.
        let Some(sandbox_id) = ids_in(&message).into_iter().next() else {
            node.fail(&format!("the error names no sandbox: {message}"));
        };
        node.assert_nothing_left(&PodTrace {
            sandbox_id,
            cgroup_parent: pod.cgroup_parent.clone(),
            ..Default::default()
        });
    }

    // A pod whose annotations are right: 384 MiB and one vCPU.
    let pod = node.pod("default", "well-sized");
    let s = Scenario {
        node,
        pod,
        handler: HULL_HANDLER,
    };
    let mut sandbox_config = s.pod.sandbox_config();
    for (annotation, value) in [(POD_MEMORY_ANNOTATION, "384"), (POD_VCPUS_ANNOTATION, "1")] {
        sandbox_config
            .annotations
            .insert(annotation.into(), value.into());
    }
    let sandbox = s.ok(s.node.cri().run_pod_sandbox(&sandbox_config, HULL_HANDLER));
    let (_, netns) = s.check_sandbox(&sandbox);
    let mut trace = PodTrace {
        sandbox_id: sandbox.clone(),
        cgroup_parent: s.pod.cgroup_parent.clone(),
        netns,
        ..Default::default()
    };
    let image = s.node.app_image().to_owned();
    s.ok(s.node.cri().pull_image(&image, Some(&sandbox_config)));
    let config = s
        .pod
        .container_config("app", &image, &["sleep", "infinity"], Vec::new());
    let app = s.create_and_start(&sandbox, &config, &sandbox_config);
    trace.container_ids.push(app.clone());
    trace.vmm_pids = s.node.hull_vmms(&sandbox).iter().map(|(p, _)| *p).collect();
    let seen = s.ok(s.node.cri().exec_sync(
        &app,
        &[
            "sh",
            "-c",
            "cat /proc/meminfo; grep -c ^processor /proc/cpuinfo",
        ],
        EXEC_TIMEOUT,
    ));
    let text = String::from_utf8_lossy(&seen.stdout).into_owned();
    let mem_total_kib: Option<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok());
    let cpus = text.lines().last().unwrap_or_default();
    s.ensure(
        seen.exit_code == 0
            && mem_total_kib.is_some_and(|kib| (300 * 1024..=384 * 1024).contains(&kib))
            && cpus == "1",
        || {
            format!(
                "the guest of a pod with {POD_MEMORY_ANNOTATION}=384 and \
                 {POD_VCPUS_ANNOTATION}=1: want MemTotal from 300 to 384 MiB and 1 CPU, got \
                 MemTotal {mem_total_kib:?} kB and {cpus:?} CPUs:\n{text}\n{seen:?}"
            )
        },
    );
    eprintln!(
        "[hull] the well-sized pod's guest has MemTotal {} kB ({} MiB), {cpus} CPU",
        mem_total_kib.unwrap_or(0),
        mem_total_kib.unwrap_or(0) / 1024
    );
    s.remove_pod(&sandbox, &trace);
    s.node.shut_down();
}

/// A pod whose hull-vmm dies (SIGKILL from the host): its running container is reported
/// exited and the pod not ready; a new container in it is refused with an error saying the
/// pod's VM has exited; StopPodSandbox and RemovePodSandbox then leave nothing behind.
#[test]
fn cri_container_in_a_dead_pod_vm() {
    let Some(shim) = hull_node_shim() else {
        return;
    };
    let node = CriNode::start(Some(&shim));
    let pod = node.pod("default", "doomed");
    let s = Scenario {
        node,
        pod,
        handler: HULL_HANDLER,
    };
    let sandbox_config = s.pod.sandbox_config();
    let sandbox = s.ok(s.node.cri().run_pod_sandbox(&sandbox_config, HULL_HANDLER));
    let (_, netns) = s.check_sandbox(&sandbox);
    let mut trace = PodTrace {
        sandbox_id: sandbox.clone(),
        cgroup_parent: s.pod.cgroup_parent.clone(),
        netns,
        ..Default::default()
    };
    let image = s.node.app_image().to_owned();
    s.ok(s.node.cri().pull_image(&image, Some(&sandbox_config)));
    let first_config = s.pod.container_config(
        "first",
        &image,
        &["sh", "-c", "echo first ready; exec sleep infinity"],
        Vec::new(),
    );
    let first = s.create_and_start(&sandbox, &first_config, &sandbox_config);
    trace.container_ids.push(first.clone());
    s.wait_for_log_line("first", "first ready");

    let vmms = s.node.hull_vmms(&sandbox);
    trace.vmm_pids = vmms.iter().map(|(pid, _)| *pid).collect();
    let &[(vmm, _)] = vmms.as_slice() else {
        s.fail(&format!("want one hull-vmm for the pod, see {vmms:?}"));
    };
    signal(vmm, libc::SIGKILL);
    let step = Instant::now();
    let status = s.wait_for_state(&first, api::ContainerState::ContainerExited);
    s.ensure(status.exit_code != 0, || {
        format!("the container of a killed pod VM exited with 0: {status:?}")
    });
    s.wait_for_sandbox_state(&sandbox, api::PodSandboxState::SandboxNotready);
    eprintln!(
        "[hull] hull-vmm {vmm} killed: the container exited ({}, {}) and the pod was not \
         ready after {:?}",
        status.exit_code,
        status.reason,
        step.elapsed()
    );

    // A container in the dead pod: CreateContainer, or else StartContainer, must fail.
    let second_config = s.pod.container_config(
        "second",
        &image,
        &["sh", "-c", "echo second ran"],
        Vec::new(),
    );
    let refused = match s
        .node
        .cri()
        .create_container(&sandbox, &second_config, &sandbox_config)
    {
        Err(e) => e,
        Ok(second) => {
            trace.container_ids.push(second.clone());
            match s.node.cri().start_container(&second) {
                Err(e) => e,
                Ok(()) => s.fail(&format!(
                    "container {second} started in pod {sandbox}, whose VM was killed"
                )),
            }
        }
    };
    // Once containerd's CRI has seen the sandbox's exit it deletes the sandbox's task (the
    // shim then exits), and containerd 1.6 says so itself; the shim's own message is for a
    // container created before that ("the pod's VM (sandbox ID) has exited with status N").
    let message = refused.to_string();
    eprintln!("[hull] a container in the dead pod: {message}");
    s.ensure(
        message.contains(&sandbox)
            && (message.contains("the pod's VM") && message.contains("has exited")
                || message.contains("failed to get sandbox container task: no running task")),
        || {
            format!(
                "a container in pod {sandbox}, whose VM was killed: want an error saying that \
                 the pod's VM has exited or that its sandbox task is gone, got: {message}"
            )
        },
    );
    // Nothing lost: the pod and its first container are still listed, as they ended.
    let listed = s.ok(s.node.cri().list_containers(None));
    s.ensure(
        listed
            .iter()
            .any(|c| c.id == first && c.state == api::ContainerState::ContainerExited as i32)
            && listed
                .iter()
                .all(|c| c.state != api::ContainerState::ContainerRunning as i32),
        || format!("ListContainers after the pod VM died: {listed:?}"),
    );
    s.remove_pod(&sandbox, &trace);
    s.node.shut_down();
}

/// containerd restarting under a running pod: the pod's hull-vmm and shim are the same
/// processes afterwards, the container runs on, its output during the restart reaches its
/// log with no line lost, ExecSync works, StopContainer's TERM reaches it; then the pod is
/// removed and nothing is left.
#[test]
fn cri_containerd_restart_keeps_pods() {
    let Some(shim) = hull_node_shim() else {
        return;
    };
    let node = CriNode::start(Some(&shim));
    let pod = node.pod("default", "steady");
    let mut s = Scenario {
        node,
        pod,
        handler: HULL_HANDLER,
    };
    let sandbox_config = s.pod.sandbox_config();
    let sandbox = s.ok(s.node.cri().run_pod_sandbox(&sandbox_config, HULL_HANDLER));
    let (_, netns) = s.check_sandbox(&sandbox);
    let mut trace = PodTrace {
        sandbox_id: sandbox.clone(),
        cgroup_parent: s.pod.cgroup_parent.clone(),
        netns,
        ..Default::default()
    };
    let image = s.node.app_image().to_owned();
    s.ok(s.node.cri().pull_image(&image, Some(&sandbox_config)));
    // It logs a tick every 0.2 s, and keeps the last one's number in a volume the host reads.
    let ticker_script = "trap 'echo ticker got TERM; exit 143' TERM; \
                         i=0; while :; do i=$((i+1)); echo \"tick $i\"; echo $i > /data/tick; \
                         sleep 0.2; done";
    let volume = s.pod.empty_dir("ticks");
    let config = s.pod.container_config(
        "ticker",
        &image,
        &["sh", "-c", ticker_script],
        vec![host_mount(&volume, "/data")],
    );
    let ticker = s.create_and_start(&sandbox, &config, &sandbox_config);
    trace.container_ids.push(ticker.clone());
    s.wait_for_log_line("ticker", "tick 3");
    let started_at = s.ok(s.node.cri().container_status(&ticker)).started_at;

    let shims = s.node.containerd().shims();
    let vmms = s.node.hull_vmms(&sandbox);
    trace.vmm_pids = vmms.iter().map(|(pid, _)| *pid).collect();
    s.ensure(shims.len() == 1 && vmms.len() == 1, || {
        format!("want one shim and one hull-vmm for the pod: shims {shims:?}, vmms {vmms:?}")
    });
    // containerd stays down until the ticker has ticked 10 more times.
    let daemon = s.node.containerd().pid();
    let last_before = last_tick(&s.pod.log_file("ticker"));
    let tick_file = volume.join("tick");
    let ticked = || {
        std::fs::read_to_string(&tick_file)
            .ok()
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let down = s.node.restart_containerd(|| {
        let end = Instant::now() + CONTAINER_DEADLINE;
        while ticked() < last_before + 10 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let while_down = ticked();
    eprintln!(
        "[hull] containerd {daemon:?} was down for {down:?}, now {:?}; the ticker went from \
         tick {last_before} (logged) to tick {while_down} meanwhile",
        s.node.containerd().pid()
    );
    s.ensure(while_down >= last_before + 10, || {
        format!("the ticker did not tick while containerd was down: tick {while_down}")
    });

    // The same processes run the pod.
    let shims_after = s.node.containerd().shims();
    let vmms_after = s.node.hull_vmms(&sandbox);
    s.ensure(shims_after == shims && vmms_after == vmms, || {
        format!(
            "after containerd's restart: shims {shims_after:?} (before {shims:?}), hull-vmms \
             {vmms_after:?} (before {vmms:?})"
        )
    });
    s.wait_for_sandbox_state(&sandbox, api::PodSandboxState::SandboxReady);
    let status = s.ok(s.node.cri().container_status(&ticker));
    s.ensure(
        status.state == api::ContainerState::ContainerRunning as i32
            && status.started_at == started_at,
        || format!("the ticker after containerd's restart (started at {started_at}): {status:?}"),
    );
    let said = s.ok(s
        .node
        .cri()
        .exec_sync(&ticker, &["echo", "still here"], EXEC_TIMEOUT));
    s.ensure(
        said.exit_code == 0 && said.stdout == b"still here\n",
        || format!("ExecSync after containerd's restart: {said:?}"),
    );

    // Nothing lost: the ticks printed while containerd was down are in the log, in order.
    s.wait_for_log_line("ticker", &format!("tick {}", while_down + 5));
    let text = std::fs::read_to_string(s.pod.log_file("ticker")).unwrap_or_default();
    let ticks: Vec<String> = parse_log(&text)
        .unwrap_or_else(|e| s.fail(&e))
        .into_iter()
        .map(|l| l.content)
        .collect();
    let expected: Vec<String> = (1..=ticks.len()).map(|i| format!("tick {i}")).collect();
    s.ensure(ticks == expected, || {
        format!("the ticker's log across containerd's restart has lines missing or out of order:\n{text}")
    });

    // The container's end still reaches containerd through the shim.
    let step = Instant::now();
    s.ok(s.node.cri().stop_container(&ticker, GRACE));
    let status = s.ok(s.node.cri().container_status(&ticker));
    s.ensure(
        status.state == api::ContainerState::ContainerExited as i32
            && status.exit_code == 143
            && step.elapsed() < GRACE,
        || {
            format!(
                "StopContainer after containerd's restart (took {:?}): {status:?}",
                step.elapsed()
            )
        },
    );
    s.remove_pod(&sandbox, &trace);
    s.node.shut_down();
}

/// The number of the last `tick N` line of the CRI log at `path` (0 if none).
fn last_tick(path: &Path) -> u32 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_log(&text)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.content.strip_prefix("tick ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The 64-hex-digit words of `text` (containerd's ids of sandboxes and containers), in order.
fn ids_in(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .filter(|word| word.len() == 64)
        .map(str::to_owned)
        .collect()
}

/// `containerd-shim-hull-v2` run by hand with wrong arguments, as containerd never runs it (no
/// containerd, no VM): with none; with `-namespace k8s.io` and an unknown action but no `-id`;
/// `start` and `delete` without `-id`. Each run must exit non-zero (not by a panic) with a
/// message on its standard error naming what is wrong, and leave nothing: no shim process, no
/// socket in /run/containerd/s, no entry under /run/hull/cri.
#[test]
fn shim_refuses_wrong_arguments() {
    let shim = hull_shim();
    let dir = TempDir::new("shim-arguments");
    // What containerd gives a shim it starts: its ttrpc address (listened on here, never
    // answered) and, in the bundle the shim runs in, the `log` FIFO it reads the shim's log
    // from (held open here as containerd holds it).
    let ttrpc = dir.path().join("containerd.sock.ttrpc");
    let _listener = UnixListener::bind(&ttrpc).expect("listen on the ttrpc address");
    let log_fifo = dir.path().join("log");
    let fifo_path = std::ffi::CString::new(log_fifo.as_os_str().as_encoded_bytes())
        .expect("a temporary path has no NUL");
    // SAFETY: mkfifo(3) reads the NUL-terminated path, which outlives the call.
    let made = unsafe { libc::mkfifo(fifo_path.as_ptr(), 0o600) };
    assert_eq!(
        made,
        0,
        "mkfifo {}: {}",
        log_fifo.display(),
        std::io::Error::last_os_error()
    );
    let _log_reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&log_fifo)
        .expect("open the log FIFO");
    let address = dir.path().join("containerd.sock");
    let address = address.to_str().expect("temporary paths are UTF-8");
    let mut leftovers = ShimLeftovers {
        dir: dir.path().to_owned(),
        sockets: Vec::new(),
    };
    let cases: [(&str, Vec<&str>, &str); 4] = [
        ("no arguments", vec![], "namespace"),
        (
            "-namespace k8s.io and an unknown action, no -id",
            vec!["-namespace", "k8s.io", "frobnicate"],
            "frobnicate",
        ),
        (
            "start without -id",
            vec!["-namespace", "k8s.io", "-address", address, "start"],
            "-id",
        ),
        (
            "delete without -id",
            vec!["-namespace", "k8s.io", "-address", address, "delete"],
            "-id",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, args, fault) in cases {
        // The socket a shim of these arguments serves: /run/containerd/s/<sha256 of
        // ADDRESS/NAMESPACE/ID>, as containerd-shim computes it.
        let flag = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .copied()
                .unwrap_or("")
        };
        let key = Path::new(flag("-address"))
            .join(flag("-namespace"))
            .join(flag("-id"));
        let digest = Sha256::digest(key.to_string_lossy().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let socket = Path::new("/run/containerd/s").join(hex);
        let socket_before = socket.exists();

        let mut cmd = std::process::Command::new(&shim);
        cmd.args(&args)
            .current_dir(dir.path())
            .env("TTRPC_ADDRESS", &ttrpc);
        let running = Running::spawn(cmd);
        let pid = running.pid();
        let ran = running.wait(Duration::from_secs(30));
        let stderr = ran.stderr.trim();
        eprintln!(
            "shim with {what}: {} in {:?}, stderr {stderr:?}, stdout {:?}",
            ran.status, ran.elapsed, ran.stdout
        );
        let mut problems = Vec::new();
        match ran.status.code() {
            Some(0) => problems.push("it exited 0".to_owned()),
            Some(101) => problems.push("it panicked (exit 101)".to_owned()),
            None => problems.push(format!("it was killed: {}", ran.status)),
            Some(_) => {}
        }
        if !stderr.contains(fault) {
            problems.push(format!("its message does not name {fault:?}: {stderr:?}"));
        }
        // A shim it left running stands out by its arguments, which name this test's
        // directory; the socket one would serve is not there before.
        let left = leftovers.kill_shims();
        if !left.is_empty() {
            problems.push(format!("it left {left:?}"));
        }
        if !socket_before && socket.exists() {
            problems.push(format!("it left the socket {}", socket.display()));
            leftovers.sockets.push(socket);
        }
        // `hull`, as the shim runs it, keeps its errors in ROOT/.hull-SHIMPID-VERB.err.
        let errors = format!(".hull-{pid}-");
        let hull_entries: Vec<String> = std::fs::read_dir(HULL_POD_DIRS)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with(&errors))
                    .collect()
            })
            .unwrap_or_default();
        if !hull_entries.is_empty() {
            problems.push(format!("it left {hull_entries:?} in {HULL_POD_DIRS}"));
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "{what} ({}): {}",
                args.join(" "),
                problems.join("; ")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "the shim run with wrong arguments:\n  {}",
        wrong.join("\n  ")
    );
}

/// What the shims run by `shim_refuses_wrong_arguments` left: shims still running, whose
/// arguments name the test's directory, and the sockets they made. Removed on drop.
struct ShimLeftovers {
    dir: PathBuf,
    sockets: Vec<PathBuf>,
}

impl ShimLeftovers {
    /// Kills the shims left running; says which they were.
    fn kill_shims(&self) -> Vec<String> {
        let needle = self.dir.display().to_string();
        let mut left = Vec::new();
        for (pid, cmdline) in hull_tests::harness::processes() {
            if cmdline.contains(&needle) && cmdline.contains(HULL_SHIM) {
                signal(pid, libc::SIGKILL);
                left.push(format!("shim {pid}: {cmdline}"));
            }
        }
        left
    }
}

impl Drop for ShimLeftovers {
    fn drop(&mut self) {
        self.kill_shims();
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}
