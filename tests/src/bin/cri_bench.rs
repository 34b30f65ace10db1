//! `cri-bench`: pods through CRI, hull's handler beside runc's in the same run, on a private
//! containerd with CNI (the end-to-end tests' harness, `hull_tests::cri`). Measures
//! 1. the time to a running pod with one container (RunPodSandbox + CreateContainer +
//!    StartContainer), one pod at a time;
//! 2. the same for `--pods` pods started at once, p50 and p99 (the slowest of ten);
//! 3. the host memory of one idle pod: RSS and PSS of the pod's shim and everything below it
//!    (hull: the shim and the pod's hull-vmm; runc: the shim, pause and the container).
//!
//! Run as root with the guest built: `cri-bench [--runs N] [--pods N] [--lane NAME]`.
//! `make bench` runs it; times from an emulated lane are only good as ratios.

use std::path::Path;
use std::time::{Duration, Instant};

use hull_tests::cri::{api, hull_shim, Cri, CriNode};

const HANDLERS: [&str; 2] = ["runc", "hull"];

struct Options {
    runs: usize,
    pods: usize,
    lane: String,
}

fn options() -> Options {
    let mut options = Options {
        runs: 5,
        pods: 10,
        lane: "this host".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--runs" => options.runs = value().parse().unwrap_or_else(|_| usage("--runs N")),
            "--pods" => options.pods = value().parse().unwrap_or_else(|_| usage("--pods N")),
            "--lane" => options.lane = value(),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if options.runs == 0 || options.pods == 0 {
        usage("--runs and --pods must be at least 1");
    }
    options
}

fn usage(why: &str) -> ! {
    eprintln!("cri-bench: {why}\nusage: cri-bench [--runs N] [--pods N] [--lane NAME]");
    std::process::exit(2);
}

fn main() {
    let options = options();
    if let Some(why) = hull_tests::cri::unavailable() {
        eprintln!("cri-bench: skipped: {why}");
        std::process::exit(0);
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("cri-bench: skipped: no /dev/kvm");
        std::process::exit(0);
    }
    let shim = hull_shim();
    let node = CriNode::start(Some(&shim));
    let image = node.app_image().to_owned();
    let bench = Bench {
        node: &node,
        image: &image,
    };
    let first = node.pod("bench", "pull");
    if let Err(err) = node.cri().pull_image(&image, Some(&first.sandbox_config())) {
        node.fail(&format!("PullImage {image}: {err}"));
    }

    println!("CRI pods ({}), runc and hull in the same run", options.lane);
    let mut rows = Vec::new();
    for handler in HANDLERS {
        // Not counted: the first pod of a handler (hull builds its pod VM template then).
        let warm = bench.start_pod(handler, "warm");
        bench.remove_pod(&warm);
        let sequential: Vec<Duration> = (0..options.runs)
            .map(|i| {
                let pod = bench.start_pod(handler, &format!("seq{i}"));
                let took = pod.took;
                bench.remove_pod(&pod);
                took
            })
            .collect();
        let concurrent = bench.start_at_once(handler, options.pods);
        let memory = bench.idle_memory(handler);
        rows.push((handler, sequential, concurrent, memory));
    }
    println!(
        "{:<6} {:>22} {:>26} {:>26} {:>12}",
        "",
        "one pod (min/median)",
        "pods at once (p50/p99)",
        "idle pod RSS / PSS (MiB)",
        "idle CPU"
    );
    for (handler, sequential, concurrent, (rss, pss, cpu)) in &rows {
        println!(
            "{:<6} {:>10.0} / {:>7.0} ms {:>13.0} / {:>7.0} ms {:>14.1} / {:>7.1} {:>10.1} m",
            handler,
            ms(percentile(sequential, 0.0)),
            ms(percentile(sequential, 0.5)),
            ms(percentile(concurrent, 0.5)),
            ms(percentile(concurrent, 0.99)),
            *rss as f64 / 1024.0,
            *pss as f64 / 1024.0,
            cpu,
        );
    }
    println!(
        "({} single pods and {} pods at once per runtime; memory: the pod's shim and its \
         descendants after 5 s idle)",
        options.runs, options.pods
    );
    node.shut_down();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q` quantile (nearest rank) of `samples`.
fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Bench<'a> {
    node: &'a CriNode,
    image: &'a str,
}

/// A running pod and how long it took to get there.
struct RunningPod {
    sandbox: String,
    took: Duration,
}

impl Bench<'_> {
    /// RunPodSandbox, CreateContainer and StartContainer of one `sleep` container, timed.
    fn start_pod(&self, handler: &str, name: &str) -> RunningPod {
        let (sandbox_config, container) = self.configs(handler, name);
        start_with(self.node.cri(), handler, &sandbox_config, &container)
            .unwrap_or_else(|e| self.node.fail(&e))
    }

    /// The pod and container configuration of pod `name`.
    fn configs(&self, handler: &str, name: &str) -> (api::PodSandboxConfig, api::ContainerConfig) {
        let pod = self.node.pod("bench", &format!("{handler}-{name}"));
        let container = pod.container_config("main", self.image, &["sleep", "3600"], Vec::new());
        (pod.sandbox_config(), container)
    }

    fn remove_pod(&self, pod: &RunningPod) {
        let cri = self.node.cri();
        if let Err(err) = cri
            .stop_pod_sandbox(&pod.sandbox)
            .and_then(|()| cri.remove_pod_sandbox(&pod.sandbox))
        {
            self.node
                .fail(&format!("removing pod {}: {err}", pod.sandbox));
        }
    }

    /// `count` pods started from as many threads at once (each with a CRI connection of its
    /// own, as kubelets of a busy node would be): each one's time to running.
    fn start_at_once(&self, handler: &str, count: usize) -> Vec<Duration> {
        let configs: Vec<_> = (0..count)
            .map(|i| self.configs(handler, &format!("burst{i}")))
            .collect();
        let socket = self.node.containerd().socket();
        let results: Vec<Result<RunningPod, String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = configs
                .iter()
                .map(|(sandbox_config, container)| {
                    let socket = &socket;
                    scope.spawn(move || {
                        let cri = Cri::connect(socket, Duration::from_secs(600))
                            .map_err(|e| format!("connect: {e}"))?;
                        start_with(&cri, handler, sandbox_config, container)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("a pod's thread"))
                .collect()
        });
        let mut took = Vec::new();
        for result in results {
            match result {
                Ok(pod) => {
                    took.push(pod.took);
                    self.remove_pod(&pod);
                }
                Err(err) => self.node.fail(&err),
            }
        }
        took
    }

    /// RSS and PSS in KiB of an idle pod's shim and its descendants, and the CPU they use
    /// idle in millicores (over [`IDLE`]).
    fn idle_memory(&self, handler: &str) -> (u64, u64, f64) {
        let pod = self.start_pod(handler, "idle");
        std::thread::sleep(Duration::from_secs(5));
        let shims = processes_with(&pod.sandbox, "containerd-shim");
        let mut pids = Vec::new();
        for shim in shims {
            pids.push(shim);
            pids.extend(descendants(shim));
        }
        let ticks = || pids.iter().map(|pid| cpu_ticks(*pid)).sum::<u64>();
        let before = ticks();
        std::thread::sleep(IDLE);
        let used = ticks().saturating_sub(before);
        // SAFETY: sysconf has no memory effects; _SC_CLK_TCK is a valid name.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let millicores = used as f64 / hz / IDLE.as_secs_f64() * 1000.0;
        let (mut rss, mut pss) = (0, 0);
        for pid in &pids {
            let (r, p) = rollup(*pid);
            rss += r;
            pss += p;
        }
        self.remove_pod(&pod);
        if pids.is_empty() {
            self.node.fail(&format!(
                "[{handler}] no shim found for pod {}",
                pod.sandbox
            ));
        }
        (rss, pss, millicores)
    }
}

/// How long an idle pod's CPU use is measured.
const IDLE: Duration = Duration::from_secs(10);

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// Starts one pod with one container through `cri`, timed to the container's start.
fn start_with(
    cri: &Cri,
    handler: &str,
    sandbox_config: &api::PodSandboxConfig,
    container: &api::ContainerConfig,
) -> Result<RunningPod, String> {
    let start = Instant::now();
    let sandbox = cri
        .run_pod_sandbox(sandbox_config, handler)
        .map_err(|e| format!("[{handler}] RunPodSandbox: {e}"))?;
    let id = cri
        .create_container(&sandbox, container, sandbox_config)
        .map_err(|e| format!("[{handler}] CreateContainer: {e}"))?;
    cri.start_container(&id)
        .map_err(|e| format!("[{handler}] StartContainer: {e}"))?;
    let took = start.elapsed();
    let status = cri
        .container_status(&id)
        .map_err(|e| format!("[{handler}] ContainerStatus: {e}"))?;
    if status.state != api::ContainerState::ContainerRunning as i32 {
        return Err(format!(
            "[{handler}] the container is not running: {status:?}"
        ));
    }
    Ok(RunningPod { sandbox, took })
}

/// Processes whose command line holds both `word` and `needle`.
fn processes_with(needle: &str, word: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(needle) && cmdline.contains(word) {
            found.push(pid);
        }
    }
    found
}

/// Every descendant of `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let children = std::fs::read_dir(format!("/proc/{parent}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|task| std::fs::read_to_string(task.path().join("children")).unwrap_or_default())
            .collect::<Vec<String>>()
            .join(" ");
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            all.push(child);
            queue.push(child);
        }
    }
    all
}

/// `Rss` and `Pss` of `/proc/PID/smaps_rollup`, in KiB.
fn rollup(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}
