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

use std::path::Path;
use std::time::{Duration, Instant};

use hull_tests::cri::kubelet::{host_mount, Pod, CLUSTER_DNS};
use hull_tests::cri::{
    api, hull_shim, parse_log, CriError, CriNode, PodTrace, HULL_HANDLER, RUNC_HANDLER,
};
use hull_tests::harness::{http_get, require_guest_artifacts};

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
    if let Some(why) = hull_tests::cri::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    require_guest_artifacts();
    let shim = hull_shim();
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
    let step = Instant::now();
    s.ok(s.node.cri().stop_pod_sandbox(&sandbox));
    let stopped = s.ok(s.node.cri().pod_sandbox_status(&sandbox, false));
    s.ensure(
        stopped.status.as_ref().map(|st| st.state)
            == Some(api::PodSandboxState::SandboxNotready as i32),
        || format!("PodSandboxStatus after StopPodSandbox: {stopped:?}"),
    );
    s.ok(s.node.cri().remove_pod_sandbox(&sandbox));
    eprintln!(
        "[{handler}] StopPodSandbox and RemovePodSandbox took {:?}",
        step.elapsed()
    );
    let gone = s.node.cri().pod_sandbox_status(&sandbox, false);
    s.ensure(matches!(&gone, Err(e) if e.is_not_found()), || {
        format!("PodSandboxStatus of the removed pod: {gone:?}")
    });
    let pods = s.ok(s.node.cri().list_pod_sandbox(None));
    let containers = s.ok(s.node.cri().list_containers(None));
    s.ensure(pods.is_empty() && containers.is_empty(), || {
        format!("listed after removal: pods {pods:?}, containers {containers:?}")
    });
    s.node.assert_nothing_left(&trace);
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
        let mut logs = String::new();
        for container in ["server", "client"] {
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
