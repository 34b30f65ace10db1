//! `make bench`: how fast hull-vmm starts and how much memory it takes, over several runs.
//!
//! - tiny guest: process start to the guest's first serial byte, and to exit;
//! - real kernel and agent: process start to the agent's readiness line (and the guest's own
//!   uptime at that point, which excludes VMM setup and early boot before timekeeping);
//! - peak RSS of hull-vmm (the kernel's `ru_maxrss` for the child);
//! - `hull run` of a busybox `/bin/true` bundle next to `runc run` of the same bundle, on the
//!   same machine, in the same run, when runc is installed.
//!
//! Times are wall-clock; the figures are printed, never asserted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use clap::Parser;
use hull_tests::harness::{workspace_bin, TempDir};
use hull_tests::tiny_guest::Asm;
use vmm::KvmKind;

#[derive(Parser)]
#[command(about = "Measure hull-vmm start-up time and memory")]
struct Args {
    /// Guest kernel (ELF vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs with the agent.
    #[arg(long)]
    initramfs: PathBuf,
    /// Runs with the tiny guest.
    #[arg(long, default_value_t = 30)]
    tiny_runs: usize,
    /// Runs with the real kernel (about a minute each on a PVM host).
    #[arg(long, default_value_t = 3)]
    boot_runs: usize,
    /// Runs of runc for reference.
    #[arg(long, default_value_t = 30)]
    runc_runs: usize,
    /// Runs of `hull run` on the same bundle (about a minute each on a PVM host).
    #[arg(long, default_value_t = 3)]
    hull_runs: usize,
    /// The test initramfs (with ymm-stress), for the context-switch measurement.
    #[arg(long)]
    test_initramfs: Option<PathBuf>,
    /// Yields per process in the context-switch measurement.
    #[arg(long, default_value_t = 2000)]
    yields: u32,
}

/// One measured run of a child process.
struct Sample {
    /// Spawn to the first stdout line matching the marker.
    to_marker: Option<Duration>,
    /// Spawn to exit.
    to_exit: Duration,
    /// Peak resident set, KiB.
    max_rss_kib: i64,
    /// The matching line.
    marker_line: Option<String>,
    status: i32,
}

/// Runs `cmd`, timing the first output line that satisfies `marker` and the exit, and
/// collecting the child's peak RSS from `wait4`.
fn measure(mut cmd: Command, marker: impl Fn(&str) -> bool + Send + 'static) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let mut found = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let now = Instant::now();
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if !found {
                // Only complete lines: a read may end in the middle of one.
                let complete = &seen[..seen.rfind('\n').map_or(0, |i| i + 1)];
                if let Some(line) = complete.lines().find(|l| marker(l)) {
                    found = true;
                    let _ = tx.send((now, line.to_owned()));
                }
            }
        }
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (std's `Child` never waited for it);
    // `status` and `usage` are valid, writable locals for the duration of the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    let to_exit = start.elapsed();
    // The child is reaped; `Child`'s drop does not wait, so forget nothing but the handle.
    drop(child);
    let _ = reader.join();
    let marker = rx.try_recv().ok();
    Sample {
        to_marker: marker.as_ref().map(|(at, _)| at.duration_since(start)),
        to_exit,
        max_rss_kib: usage.ru_maxrss,
        marker_line: marker.map(|(_, l)| l),
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        },
    }
}

/// min / median / max of durations, in milliseconds.
fn summary_ms(mut values: Vec<Duration>) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    values.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms (n={})",
        ms(values[0]),
        ms(values[values.len() / 2]),
        ms(values[values.len() - 1]),
        values.len()
    )
}

fn max_rss(samples: &[Sample]) -> String {
    let rss = samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
    format!("{:.1} MiB", rss as f64 / 1024.0)
}

fn bench_tiny(runs: usize) {
    let dir = TempDir::new("bench-tiny");
    let kernel = dir.path().join("tiny.elf");
    let mut asm = Asm::new();
    asm.out_bytes(0x3f8, b"ready\n")
        .i8042_reset()
        .halt_forever();
    std::fs::write(&kernel, asm.to_elf()).expect("temp dir is writable");
    let samples: Vec<Sample> = (0..runs)
        .map(|_| {
            let mut cmd = Command::new(workspace_bin("hull-vmm"));
            cmd.arg("--kernel")
                .arg(&kernel)
                .args(["--mem-size-mib", "128"]);
            measure(cmd, |l| l.starts_with("ready"))
        })
        .collect();
    assert!(samples
        .iter()
        .all(|s| s.status == 0 && s.to_marker.is_some()));
    println!("tiny guest, 128 MiB, 1 vCPU:");
    println!(
        "  start to first guest output: {}",
        summary_ms(samples.iter().filter_map(|s| s.to_marker).collect())
    );
    println!(
        "  start to exit:               {}",
        summary_ms(samples.iter().map(|s| s.to_exit).collect())
    );
    println!("  peak RSS of hull-vmm:        {}", max_rss(&samples));
}

fn bench_boot(runs: usize, kernel: &Path, initramfs: &Path) {
    let samples: Vec<Sample> = (0..runs)
        .map(|i| {
            let mut cmd = Command::new(workspace_bin("hull-vmm"));
            cmd.arg("--kernel")
                .arg(kernel)
                .arg("--initramfs")
                .arg(initramfs)
                .args(["--mem-size-mib", "128", "--cmdline", "hull.poweroff=ready"]);
            let s = measure(cmd, |l| l.contains("HULL_AGENT_READY "));
            eprintln!(
                "  boot run {}: ready after {:.1} s, exit {}",
                i + 1,
                s.to_marker.unwrap_or_default().as_secs_f64(),
                s.status
            );
            s
        })
        .collect();
    let uptimes: Vec<Duration> = samples
        .iter()
        .filter_map(|s| s.marker_line.as_deref())
        .filter_map(|l| l.split_once("HULL_AGENT_READY ").map(|(_, j)| j.to_owned()))
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .filter_map(|v| v["uptime_ms"].as_u64())
        .map(Duration::from_millis)
        .collect();
    println!("real kernel + agent, 128 MiB, 1 vCPU:");
    println!(
        "  start to agent ready:        {}",
        summary_ms(samples.iter().filter_map(|s| s.to_marker).collect())
    );
    println!("  guest uptime at ready:       {}", summary_ms(uptimes));
    println!(
        "  start to exit (power off):   {}",
        summary_ms(samples.iter().map(|s| s.to_exit).collect())
    );
    println!("  peak RSS of hull-vmm:        {}", max_rss(&samples));
}

/// A runc bundle running busybox's `true`, or why not.
fn runc_bundle(dir: &Path) -> Result<PathBuf, String> {
    let busybox = Path::new("/bin/busybox");
    if Command::new("runc").arg("--version").output().is_err() {
        return Err("runc is not installed".into());
    }
    let is_static = Command::new("file")
        .arg(busybox)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
        .unwrap_or(false);
    if !is_static {
        return Err("/bin/busybox is not busybox-static".into());
    }
    let bundle = dir.join("bundle");
    // The directories an image's rootfs has: runc's default spec mounts onto them, and its
    // root is read-only, so they must exist beforehand.
    for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(bundle.join("rootfs").join(dir)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(busybox, bundle.join("rootfs/bin/busybox")).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink("busybox", bundle.join("rootfs/bin/true"))
        .map_err(|e| e.to_string())?;
    let spec = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .status()
        .map_err(|e| e.to_string())?;
    if !spec.success() {
        return Err("runc spec failed".into());
    }
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
    Ok(bundle)
}

/// `runc run` and then `hull run` of the same busybox `/bin/true` bundle, in the same run.
fn bench_run(runc_runs: usize, hull_runs: usize) {
    let dir = TempDir::new("bench-run");
    let bundle = match runc_bundle(dir.path()) {
        Ok(bundle) => bundle,
        Err(why) => {
            println!("runc and hull run of busybox /bin/true: skipped ({why})");
            return;
        }
    };
    let runtimes = [
        ("runc", PathBuf::from("runc"), runc_runs),
        ("hull", workspace_bin("hull"), hull_runs),
    ];
    for (name, binary, runs) in runtimes {
        let root = dir.path().join(format!("{name}-root"));
        let samples: Vec<Sample> = (0..runs)
            .map(|i| {
                let mut cmd = Command::new(&binary);
                cmd.arg("--root")
                    .arg(&root)
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(format!("hull-bench-{}-{i}", std::process::id()));
                measure(cmd, |_| false)
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        assert!(samples.iter().all(|s| s.status == 0), "{name} run failed");
        println!("{name} run of busybox /bin/true (same bundle, same machine, same run):");
        println!(
            "  start to exit:               {}",
            summary_ms(samples.iter().map(|s| s.to_exit).collect())
        );
        println!("  peak RSS of {name}:            {}", max_rss(&samples));
    }
}

/// Guest system call and context switch cost: `ymm-stress 1 N` yields without switching,
/// `ymm-stress 2 N` switches on every yield (saving and restoring AVX state each time).
fn bench_context_switches(kernel: &Path, initramfs: &Path, yields: u32) {
    let script = format!(
        "read a x < /proc/uptime; ymm-stress 1 {yields} >/dev/null; \
         read b x < /proc/uptime; ymm-stress 2 {yields} >/dev/null; \
         read c x < /proc/uptime; echo SWITCH_TIMES $a $b $c"
    );
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--mem-size-mib", "256", "--cmdline"])
        .arg(format!("hull.exec=\"{script}\""));
    let sample = measure(cmd, |l| l.starts_with("SWITCH_TIMES "));
    let times: Vec<f64> = sample
        .marker_line
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    println!("guest system calls and context switches (ymm-stress, {yields} yields per process):");
    let [a, b, c] = times[..] else {
        println!("  no measurement (exit {})", sample.status);
        return;
    };
    let n = f64::from(yields);
    let yield_ms = (b - a) * 1000.0 / n;
    let switch_ms = ((c - b) * 1000.0 - 2.0 * n * yield_ms) / (2.0 * n);
    println!("  sched_yield without a switch:  {yield_ms:.3} ms");
    println!("  added by a context switch:     {switch_ms:.3} ms (guest uptime, 10 ms resolution)");
}

fn main() {
    let args = Args::parse();
    let kind = KvmKind::detect();
    println!(
        "hull-vmm benchmark; host KVM: {kind}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(warning) = kind.warning() {
        println!("note: {warning}");
    }
    bench_tiny(args.tiny_runs);
    bench_boot(args.boot_runs, &args.kernel, &args.initramfs);
    if let Some(test_initramfs) = &args.test_initramfs {
        bench_context_switches(&args.kernel, test_initramfs, args.yields);
    }
    bench_run(args.runc_runs, args.hull_runs);
}
