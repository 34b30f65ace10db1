//! `make bench`: how fast hull-vmm starts and how much memory it takes, over several runs.
//!
//! - tiny guest: process start to the guest's first serial byte, and to exit;
//! - the jail: the same with a container VM's devices, jailed and not, and hull-vmm's own time
//!   to enter the jail;
//! - pausing every vCPU of a running tiny guest (request to every vCPU's acknowledgement), and
//!   resuming them, in process through `vmm::Vmm` as a warm start's snapshot will;
//! - real kernel and agent: process start to the agent's readiness line (and the guest's own
//!   uptime at that point, which excludes VMM setup and early boot before timekeeping);
//! - peak RSS of hull-vmm (the kernel's `ru_maxrss` for the child);
//! - warm start: a snapshot of the real guest at the agent's idle point (boot, snapshot time,
//!   memory written); process start to the restored vCPUs running and to the agent's answer;
//!   the memory (RSS and PSS) of 10 idle VMs restored from one snapshot next to one booted;
//! - `hull run` of a busybox `/bin/true` bundle, restored from its template (warm) and booted
//!   (cold), next to `runc run` of the same bundle, on the same machine, in the same run, when
//!   runc is installed;
//! - networking: TCP throughput host to container and back, and the round trip of a 64-byte
//!   request, for runc and hull in the same namespace setup (a veth to a host-side namespace).
//!
//! Times are wall-clock; the figures are printed, never asserted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use clap::Parser;
use hull_tests::harness::{workspace_bin, TempDir};
use hull_tests::tiny_guest::{counting_guest, Asm};
use vm_memory::{Bytes, GuestAddress};
use vmm::{ConsoleConfig, KvmKind, VmConfig};

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
    /// Pause and resume cycles of a running tiny guest.
    #[arg(long, default_value_t = 1000)]
    pause_cycles: usize,
    /// Runs with the real kernel (about a minute each on a PVM host).
    #[arg(long, default_value_t = 3)]
    boot_runs: usize,
    /// Runs of runc for reference.
    #[arg(long, default_value_t = 30)]
    runc_runs: usize,
    /// Runs of `hull run` on the same bundle, each of warm and cold (a cold one is about a
    /// minute on a PVM host).
    #[arg(long, default_value_t = 3)]
    hull_runs: usize,
    /// Restores of the real guest's snapshot, timed one by one.
    #[arg(long, default_value_t = 10)]
    restore_runs: usize,
    /// Idle VMs restored from one snapshot at once, for their memory.
    #[arg(long, default_value_t = 10)]
    idle_vms: usize,
    /// The test initramfs (with ymm-stress), for the context-switch measurement.
    #[arg(long)]
    test_initramfs: Option<PathBuf>,
    /// Yields per process in the context-switch measurement.
    #[arg(long, default_value_t = 2000)]
    yields: u32,
    /// MiB sent each way in the network measurement (default 64, 2 on a PVM host, where the
    /// guest's network stack runs emulated at tens of KB/s).
    #[arg(long)]
    net_mib: Option<usize>,
    /// Only the network measurement.
    #[arg(long)]
    network_only: bool,
    /// Round trips of a 64-byte request in the network measurement.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    /// The lane the figures come from, printed with each of them (default: this host's KVM).
    #[arg(long)]
    lane: Option<String>,
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

/// The median of durations, if there are any.
fn median(mut values: Vec<Duration>) -> Option<Duration> {
    values.sort();
    values.get(values.len() / 2).copied()
}

/// min / median / max of durations, in microseconds.
fn summary_us(mut values: Vec<Duration>) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    values.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "min {:.0} us, median {:.0} us, max {:.0} us (n={})",
        us(values[0]),
        us(values[values.len() / 2]),
        us(values[values.len() - 1]),
        values.len()
    )
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

fn max_rss_kib(samples: &[Sample]) -> i64 {
    samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0)
}

fn max_rss(samples: &[Sample]) -> String {
    format!("{:.1} MiB", max_rss_kib(samples) as f64 / 1024.0)
}

/// What the ratios at the end are made of: medians and peak RSS, per kind of run.
#[derive(Default)]
struct Figures {
    boot_to_ready: Option<Duration>,
    boot_rss_kib: i64,
    runc_run: Option<Duration>,
    runc_rss_kib: i64,
    hull_run: Option<Duration>,
    hull_rss_kib: i64,
    hull_cold_run: Option<Duration>,
    restore_to_answer: Option<Duration>,
    booted_pss_kib: i64,
    restored_pss_kib: i64,
}

impl Figures {
    /// The proportions a user of this lane's kind of host will see, whatever the CPU's speed.
    fn print_ratios(&self, lane: &str) {
        println!("[{lane}] ratios (medians, same lane, same run):");
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.1}", a.as_secs_f64() / b.as_secs_f64())
            }
            _ => "n/a".into(),
        };
        println!(
            "  hull run warm / runc run (/bin/true):   {}",
            ratio(self.hull_run, self.runc_run)
        );
        println!(
            "  hull run cold / runc run (/bin/true):   {}",
            ratio(self.hull_cold_run, self.runc_run)
        );
        println!(
            "  hull run cold / hull run warm:          {}",
            ratio(self.hull_cold_run, self.hull_run)
        );
        println!(
            "  boot to agent ready / restore to agent: {}",
            ratio(self.boot_to_ready, self.restore_to_answer)
        );
        println!(
            "  boot to agent ready / hull run:         {}",
            ratio(self.boot_to_ready, self.hull_run)
        );
        // Peak RSS in KiB; 0 where that kind of run was not measured.
        let rss_ratio = |a: i64, b: i64| match (a, b) {
            (1.., 1..) => format!("{:.1}", a as f64 / b as f64),
            _ => "n/a".into(),
        };
        println!(
            "  peak RSS hull-vmm (real kernel) / runc: {}",
            rss_ratio(self.boot_rss_kib, self.runc_rss_kib)
        );
        println!(
            "  peak RSS hull run / runc run:           {}",
            rss_ratio(self.hull_rss_kib, self.runc_rss_kib)
        );
        println!(
            "  PSS of a restored idle VM / a booted:   {}",
            rss_ratio(self.restored_pss_kib, self.booted_pss_kib)
        );
    }
}

/// Whether `path` is an ELF executable without a program interpreter (statically linked).
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("eight bytes")))
    };
    // A 64-bit little-endian ELF: program headers at e_phoff, e_phnum of e_phentsize bytes.
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(entsize), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(count)).all(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX);
        let header = at.saturating_add(i * usize::from(entsize));
        u32_at(header).is_some_and(|kind| kind != PT_INTERP)
    })
}

fn bench_tiny(lane: &str, runs: usize) {
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
    println!("[{lane}] tiny guest, 128 MiB, 1 vCPU:");
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

/// What the jail costs hull-vmm's start: a tiny guest with a virtio-fs share and a vsock device
/// (a container's VM's devices), started jailed and not, alternately; start to the guest's
/// first serial byte, and hull-vmm's own figure for entering the jail.
fn bench_jail(lane: &str, runs: usize) {
    let dir = TempDir::new("bench-jail");
    let kernel = dir.path().join("tiny.elf");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("temp dir is writable");
    let mut asm = Asm::new();
    asm.out_bytes(0x3f8, b"ready\n")
        .i8042_reset()
        .halt_forever();
    std::fs::write(&kernel, asm.to_elf()).expect("temp dir is writable");
    let mut jailed = Vec::new();
    let mut free = Vec::new();
    let mut entering = Vec::new();
    for i in 0..runs * 2 {
        let jail = i % 2 == 0;
        let run_dir = dir.path().join(format!("run{i}"));
        std::fs::create_dir(&run_dir).expect("temp dir is writable");
        let log = run_dir.join("vmm.log");
        let mut cmd = Command::new(workspace_bin("hull-vmm"));
        cmd.arg("--kernel")
            .arg(&kernel)
            .args(["--mem-size-mib", "128"])
            .arg("--shared-dir")
            .arg(format!("share={}", share.display()))
            .arg("--vsock-uds")
            .arg(run_dir.join("vsock.sock"))
            .args(["--log-level", "info", "--log-file"])
            .arg(&log)
            .arg("--jail")
            .arg(run_dir.join("jail"));
        if !jail {
            cmd.env("HULL_VMM_JAIL", "off");
        }
        let sample = measure(cmd, |l| l.starts_with("ready"));
        assert!(sample.status == 0 && sample.to_marker.is_some());
        if jail {
            jailed.push(sample.to_marker.expect("checked"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let us = text.lines().find_map(|l| {
                let rest = l.split("jailed in ").nth(1)?;
                rest.split(' ').next()?.parse::<u64>().ok()
            });
            entering.extend(us.map(Duration::from_micros));
        } else {
            free.push(sample.to_marker.expect("checked"));
        }
    }
    println!("[{lane}] the jail: tiny guest with a virtio-fs share and vsock, {runs} runs each:");
    println!(
        "  start to first output, jailed:     {}",
        summary_ms(jailed)
    );
    println!("  start to first output, not jailed: {}", summary_ms(free));
    println!(
        "  entering the jail (hull-vmm):      {}",
        summary_us(entering)
    );
}

/// Pause and resume latency: a counting tiny guest, paused (request to the last vCPU's
/// acknowledgement) and resumed `cycles` times, the guest running between cycles.
fn bench_pause(lane: &str, cycles: usize) {
    const DATA: u64 = 0x30_0000;
    const VCPUS: u8 = 2;
    let dir = TempDir::new("bench-pause");
    let kernel = dir.path().join("tiny.elf");
    let (asm, _) = counting_guest(DATA);
    std::fs::write(&kernel, asm.to_elf()).expect("temp dir is writable");
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = 128;
    config.vcpus = VCPUS;
    config.console = ConsoleConfig::Null;
    let mut vmm = vmm::build(&config, KvmKind::detect()).expect("the tiny guest builds");
    vmm.start().expect("the vCPUs start");
    let count = |vmm: &vmm::Vmm| -> u64 {
        vmm.memory()
            .read_obj(GuestAddress(DATA))
            .expect("the counter is in guest memory")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let wait_past = |vmm: &vmm::Vmm, value: u64| {
        while count(vmm) <= value {
            assert!(Instant::now() < deadline, "the guest stopped counting");
            std::thread::yield_now();
        }
    };
    wait_past(&vmm, 0);
    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        let asked = Instant::now();
        vmm.pause().expect("the vCPUs pause");
        pauses.push(asked.elapsed());
        let at = count(&vmm);
        let asked = Instant::now();
        vmm.resume().expect("the vCPUs resume");
        resumes.push(asked.elapsed());
        wait_past(&vmm, at);
    }
    vmm.memory()
        .write_obj(1u64, GuestAddress(DATA + 8))
        .expect("the stop flag is in guest memory");
    let outcome = vmm.run().expect("the tiny guest runs to its end");
    assert_eq!(outcome.exit, vmm::VmExit::Reset);
    println!(
        "[{lane}] pause and resume of a running tiny guest, {VCPUS} vCPUs (one counting, one \
         waiting for SIPI in KVM_RUN):"
    );
    println!("  pause (asked to all acked):  {}", summary_us(pauses));
    println!("  resume (asked to all acked): {}", summary_us(resumes));
}

fn bench_boot(lane: &str, runs: usize, kernel: &Path, initramfs: &Path, figures: &mut Figures) {
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
    println!("[{lane}] real kernel + agent, 128 MiB, 1 vCPU:");
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
    figures.boot_to_ready = median(samples.iter().filter_map(|s| s.to_marker).collect());
    figures.boot_rss_kib = max_rss_kib(&samples);
}

/// A runc bundle running busybox's `true`, or why not.
fn runc_bundle(dir: &Path) -> Result<PathBuf, String> {
    let busybox = Path::new("/bin/busybox");
    if Command::new("runc").arg("--version").output().is_err() {
        return Err("runc is not installed".into());
    }
    if !is_static_elf(busybox) {
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
fn bench_run(lane: &str, runc_runs: usize, hull_runs: usize, figures: &mut Figures) {
    let dir = TempDir::new("bench-run");
    let bundle = match runc_bundle(dir.path()) {
        Ok(bundle) => bundle,
        Err(why) => {
            println!("[{lane}] runc and hull run of busybox /bin/true: skipped ({why})");
            return;
        }
    };
    // A template cache of this run's own; its template is built by one run not timed here.
    let templates = dir.path().join("templates");
    let run_cmd = |binary: &Path, root: &Path, id: String, cold: bool| {
        let mut cmd = Command::new(binary);
        cmd.env("HULL_TEMPLATE_DIR", &templates)
            .env("HULL_COLD_BOOT", if cold { "1" } else { "0" })
            .arg("--root")
            .arg(root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(id);
        cmd
    };
    if hull_runs > 0 {
        let first = measure(
            run_cmd(
                &workspace_bin("hull"),
                &dir.path().join("first-root"),
                format!("hull-bench-{}-first", std::process::id()),
                false,
            ),
            |_| false,
        );
        assert_eq!(first.status, 0, "the first hull run failed");
        println!(
            "[{lane}] first hull run (builds the VM template): {} ms",
            first.to_exit.as_millis()
        );
    }
    let runtimes = [
        ("runc", PathBuf::from("runc"), runc_runs, false),
        ("hull (warm)", workspace_bin("hull"), hull_runs, false),
        ("hull (cold)", workspace_bin("hull"), hull_runs, true),
    ];
    for (name, binary, runs, cold) in runtimes {
        let root = dir
            .path()
            .join(format!("{}-root", name.replace([' ', '(', ')'], "")));
        let samples: Vec<Sample> = (0..runs)
            .map(|i| {
                let id = format!("hull-bench-{}-{i}", std::process::id());
                measure(run_cmd(&binary, &root, id, cold), |_| false)
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        assert!(samples.iter().all(|s| s.status == 0), "{name} run failed");
        println!("[{lane}] {name} run of busybox /bin/true (same bundle, same machine, same run):");
        println!(
            "  start to exit:               {}",
            summary_ms(samples.iter().map(|s| s.to_exit).collect())
        );
        println!("  peak RSS of {name}:            {}", max_rss(&samples));
        let to_exit = median(samples.iter().map(|s| s.to_exit).collect());
        match (name, cold) {
            ("runc", _) => {
                (figures.runc_run, figures.runc_rss_kib) = (to_exit, max_rss_kib(&samples))
            }
            (_, false) => {
                (figures.hull_run, figures.hull_rss_kib) = (to_exit, max_rss_kib(&samples))
            }
            (_, true) => figures.hull_cold_run = to_exit,
        }
    }
}

/// The network setup of [`bench_network`]: the host side's address, and the container's.
const NET_HOST: &str = "10.66.0.1";
const NET_CONTAINER: &str = "10.66.0.2";

/// What the container runs in [`bench_network`]: a sink that answers the byte count it read
/// (host to container), a source of `blocks` 64 KiB blocks (container to host), an echo server
/// (round trips). The same script under runc and hull.
fn network_script(blocks: usize) -> String {
    format!(
        "/bin/busybox nc -l -p 5001 -e /bin/busybox wc -c; \
         /bin/busybox dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | \
         /bin/busybox nc {NET_HOST} 5002; \
         /bin/busybox nc -l -p 5003 -e /bin/busybox cat"
    )
}

/// Network figures of one runtime.
struct NetFigures {
    to_container: Duration,
    from_container: Duration,
    round_trips: Vec<Duration>,
}

/// The host side of [`network_script`], from a thread in the host namespace.
fn network_host_side(bytes: usize, round_trips: usize) -> Result<NetFigures, String> {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    let deadline = Instant::now() + Duration::from_secs(600);
    let connect = |port: u16| -> Result<TcpStream, String> {
        let addr: std::net::SocketAddr = format!("{NET_CONTAINER}:{port}").parse().unwrap();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(stream) => return Ok(stream),
                Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let listener = TcpListener::bind(format!("{NET_HOST}:5002")).map_err(|e| e.to_string())?;
    // Host to container: from the first byte written to the container's count of them.
    let mut sink = connect(5001)?;
    let block = vec![0x5au8; 65536];
    let started = Instant::now();
    for _ in 0..bytes / block.len() {
        sink.write_all(&block).map_err(|e| e.to_string())?;
    }
    sink.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut count = String::new();
    sink.read_to_string(&mut count).map_err(|e| e.to_string())?;
    let to_container = started.elapsed();
    if count.trim() != bytes.to_string() {
        return Err(format!("the container counted {count:?} of {bytes} bytes"));
    }
    // Container to host: from the first byte read to the last.
    let (mut source, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    let mut got = source.read(&mut buf).map_err(|e| e.to_string())?;
    let started = Instant::now();
    while got < bytes {
        match source.read(&mut buf).map_err(|e| e.to_string())? {
            0 => return Err(format!("the container sent {got} of {bytes} bytes")),
            n => got += n,
        }
    }
    let from_container = started.elapsed();
    drop(source);
    // Round trips of 64 bytes through the echo server.
    let mut echo = connect(5003)?;
    echo.set_nodelay(true).map_err(|e| e.to_string())?;
    let request = [0x42u8; 64];
    let mut answer = [0u8; 64];
    let mut times = Vec::with_capacity(round_trips);
    for _ in 0..round_trips + 1 {
        let sent = Instant::now();
        echo.write_all(&request).map_err(|e| e.to_string())?;
        echo.read_exact(&mut answer).map_err(|e| e.to_string())?;
        times.push(sent.elapsed());
    }
    // The first round trip warms up the path.
    times.remove(0);
    Ok(NetFigures {
        to_container,
        from_container,
        round_trips: times,
    })
}

/// TCP throughput both ways and the round trip of a 64-byte request for runc and hull, each in
/// a network namespace with a veth to the host side's namespace: the same setup, bundle and
/// script, in the same run. hull's traffic crosses the mirroring (tc redirects, the TAP,
/// virtio-net and the guest's own network stack); runc's is the host kernel's alone.
fn bench_network(lane: &str, mib: usize, round_trips: usize) {
    use hull_tests::netns::{use_netns, Netns};
    let dir = TempDir::new("bench-net");
    let bundle = match (runc_bundle(dir.path()), hull_tests::netns::unavailable()) {
        (Ok(bundle), None) => bundle,
        (Err(why), _) | (_, Some(why)) => {
            println!("[{lane}] network throughput and round trips: skipped ({why})");
            return;
        }
    };
    let bytes = mib << 20;
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    spec["process"]["args"] =
        serde_json::json!(["/bin/busybox", "sh", "-c", network_script(bytes / 65536)]);
    std::fs::write(&config, spec.to_string()).unwrap();
    let templates = dir.path().join("templates");
    println!(
        "[{lane}] network, {mib} MiB each way and {round_trips} round trips of 64 bytes over a \
         veth (MTU 1500), runc and hull in the same setup, same run:"
    );
    for (name, binary) in [
        ("runc", PathBuf::from("runc")),
        ("hull", workspace_bin("hull")),
    ] {
        let host = Netns::new("bench-h");
        let netns = Netns::new("bench-c");
        host.veth_to(
            "vb0",
            Some(&format!("{NET_HOST}/24")),
            &netns,
            &format!("{NET_CONTAINER}/24"),
            NET_HOST,
            1500,
        );
        use_netns(&config, Some(&netns.path()));
        let host_side = host.run(move || network_host_side(bytes, round_trips));
        let status = Command::new(&binary)
            .env("HULL_TEMPLATE_DIR", &templates)
            .arg("--root")
            .arg(dir.path().join(format!("{name}-root")))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("hull-bench-net-{}", std::process::id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        let figures = host_side.join().expect("the host side");
        match (status, figures) {
            (Ok(status), Ok(figures)) if status.success() => {
                let rate = |took: Duration| (bytes * 8) as f64 / took.as_secs_f64() / 1e6;
                println!(
                    "  {name:<5} host to container {:>9.1} Mbit/s   container to host {:>9.1} \
                     Mbit/s   round trip {}",
                    rate(figures.to_container),
                    rate(figures.from_container),
                    summary_us(figures.round_trips)
                );
            }
            (status, figures) => println!(
                "  {name}: failed ({status:?}, {:?})",
                figures.err().unwrap_or_default()
            ),
        }
    }
}

/// A `hull-vmm` of the real guest serving the agent (`hull.serve`), with its vsock socket and
/// an empty share in `dir`, named `name`.
fn agent_vm(kernel: &Path, initramfs: &Path, dir: &Path, name: &str) -> Command {
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("the share");
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args([
            "--mem-size-mib",
            "256",
            "--cmdline",
            "hull.serve",
            "--vsock-uds",
        ])
        .arg(dir.join(format!("{name}.sock")))
        .arg("--shared-dir")
        .arg(format!("rootfs={}", share.display()))
        .arg("--console")
        .arg(format!(
            "file:{}",
            dir.join(format!("{name}.console")).display()
        ))
        .args(["--log-level", "info", "--log-file"])
        .arg(dir.join(format!("{name}.log")));
    cmd
}

/// Connects to the agent of the VM whose vsock socket is `uds` and completes the handshake,
/// retrying until `deadline`.
fn agent_answers(uds: &Path, deadline: Instant) -> bool {
    let mut attempts = 0u32;
    while Instant::now() < deadline {
        attempts += 1;
        if let Ok(mut conn) = hull_protocol::hybrid::connect(
            uds,
            hull_protocol::CONTROL_PORT,
            Some(Duration::from_secs(60)),
        ) {
            return hull_protocol::host_handshake(&mut conn, "hull-bench").is_ok();
        }
        // Quick at first (a restore answers within milliseconds), then gentle (a boot takes
        // long, and polling must not steal the guest's CPU).
        let pause = if attempts < 200 { 200 } else { 20_000 };
        std::thread::sleep(Duration::from_micros(pause));
    }
    false
}

/// `Rss` and `Pss` of a process, KiB (`/proc/PID/smaps_rollup`).
fn rss_pss_kib(pid: u32) -> (i64, i64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

fn mean_mib(values: &[i64]) -> String {
    let n = values.len().max(1) as f64;
    format!("{:.1} MiB", values.iter().sum::<i64>() as f64 / n / 1024.0)
}

/// Snapshot of the real guest at the agent's idle point, restores of it, and the memory of
/// restored VMs next to a booted one.
fn bench_warm_start(
    lane: &str,
    kernel: &Path,
    initramfs: &Path,
    runs: usize,
    idle_vms: usize,
    figures: &mut Figures,
) {
    let dir = TempDir::new("bench-warm");
    let snapshot = dir.path().join("snapshot");
    let mut cmd = agent_vm(kernel, initramfs, dir.path(), "template");
    cmd.arg("--snapshot-when-ready").arg(&snapshot);
    let built = measure(cmd, |l| l.starts_with('{'));
    let report: serde_json::Value = built
        .marker_line
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    println!("[{lane}] warm start: snapshot of the real guest at the agent's idle point:");
    if built.status != 0 || report.is_null() {
        println!("  failed (exit {})", built.status);
        return;
    }
    println!(
        "  boot to agent ready {} ms; snapshot {} us; state {} bytes; memory {} of {} MiB written",
        report["boot_ms"],
        report["snapshot_us"],
        report["state_bytes"],
        report["memory_written_bytes"].as_u64().unwrap_or(0) >> 20,
        report["memory_bytes"].as_u64().unwrap_or(0) >> 20
    );

    let mut to_running = Vec::new();
    let mut to_answer = Vec::new();
    let mut timelines = Vec::new();
    for i in 0..runs {
        let name = format!("restore-{i}");
        let mut cmd = agent_vm(kernel, initramfs, dir.path(), &name);
        cmd.arg("--restore").arg(&snapshot);
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hull-vmm --restore");
        let answered = agent_answers(
            &dir.path().join(format!("{name}.sock")),
            started + Duration::from_secs(120),
        );
        let elapsed = started.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        if !answered {
            println!("  restore {i}: the agent did not answer");
            return;
        }
        to_answer.push(elapsed);
        let log =
            std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
        if let Some(us) = log
            .lines()
            .find_map(|l| l.split("restored: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        {
            to_running.push(Duration::from_micros(us));
        }
        if let Some(line) = log
            .lines()
            .find_map(|l| l.split("restore timeline (us): ").nth(1))
        {
            timelines.push(line.to_owned());
        }
    }
    // The last one: the files are in the page cache by then, as they are for a busy host.
    if let Some(line) = timelines.last() {
        println!("  where the restore's time goes (us, last run):  {line}");
    }
    println!(
        "  hull-vmm main to the restored vCPUs running: {}",
        summary_us(to_running)
    );
    println!(
        "  process start to the agent's answer:          {}",
        summary_ms(to_answer.clone())
    );
    figures.restore_to_answer = median(to_answer);

    // The same restores into a VM made before the snapshot is known (`hull-vmm --standby`, as
    // `hull create` starts it): the command line arrives 20 ms after the start, about what hull
    // takes to check a bundle first.
    let mut standby_to_running = Vec::new();
    for i in 0..runs {
        let name = format!("standby-{i}");
        let args: Vec<String> = agent_vm(kernel, initramfs, dir.path(), &name)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut cmd = Command::new(workspace_bin("hull-vmm"));
        cmd.args(["--standby", "3"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: runs between fork and exec and only calls dup2, which is async-signal-safe;
        // `theirs` stays open in the parent until after the spawn.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start hull-vmm --standby");
        drop(theirs);
        std::thread::sleep(Duration::from_millis(20));
        let line = serde_json::json!({ "restore": snapshot }).to_string() + "\n";
        let sent = std::io::Write::write_all(&mut ours, line.as_bytes()).is_ok();
        let answered = sent
            && agent_answers(
                &dir.path().join(format!("{name}.sock")),
                Instant::now() + Duration::from_secs(120),
            );
        let _ = child.kill();
        let _ = child.wait();
        if !answered {
            println!("  standby restore {i}: the agent did not answer");
            break;
        }
        let log =
            std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
        if let Some(us) = log
            .lines()
            .find_map(|l| l.split("restored: ").nth(1))
            .filter(|rest| rest.contains("made before"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        {
            standby_to_running.push(Duration::from_micros(us));
        }
    }
    println!(
        "  with the VM made first (hull-vmm --standby), snapshot known to vCPUs running: {}",
        summary_us(standby_to_running)
    );

    // Memory: idle VMs restored from one snapshot, and one booted.
    let mut children = Vec::new();
    for i in 0..idle_vms {
        let name = format!("idle-{i}");
        let mut cmd = agent_vm(kernel, initramfs, dir.path(), &name);
        cmd.arg("--restore").arg(&snapshot);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hull-vmm --restore");
        children.push((name, child));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let all_answered = children
        .iter()
        .all(|(name, _)| agent_answers(&dir.path().join(format!("{name}.sock")), deadline));
    let (mut rss, mut pss) = (Vec::new(), Vec::new());
    for (_, child) in &children {
        let (r, p) = rss_pss_kib(child.id());
        rss.push(r);
        pss.push(p);
    }
    for (_, child) in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut booted = agent_vm(kernel, initramfs, dir.path(), "booted")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hull-vmm");
    let booted_answered = agent_answers(
        &dir.path().join("booted.sock"),
        Instant::now() + Duration::from_secs(600),
    );
    let (booted_rss, booted_pss) = rss_pss_kib(booted.id());
    let _ = booted.kill();
    let _ = booted.wait();
    if !all_answered || !booted_answered {
        println!("  memory: not measured (an agent did not answer)");
        return;
    }
    println!(
        "  {idle_vms} idle VMs restored from one snapshot: RSS {} each, PSS {} each (mean)",
        mean_mib(&rss),
        mean_mib(&pss)
    );
    println!(
        "  1 idle VM booted:                             RSS {}, PSS {}",
        mean_mib(&[booted_rss]),
        mean_mib(&[booted_pss])
    );
    figures.booted_pss_kib = booted_pss;
    figures.restored_pss_kib = pss.iter().sum::<i64>() / pss.len().max(1) as i64;
}

/// Guest system call and context switch cost: `ymm-stress 1 N` yields without switching,
/// `ymm-stress 2 N` switches on every yield (saving and restoring AVX state each time).
fn bench_context_switches(lane: &str, kernel: &Path, initramfs: &Path, yields: u32) {
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
    println!(
        "[{lane}] guest system calls and context switches (ymm-stress, {yields} yields per process):"
    );
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
    let lane = args
        .lane
        .clone()
        .unwrap_or_else(|| format!("host {kind} KVM"));
    println!(
        "hull-vmm benchmark; lane: {lane}; host KVM: {kind}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(warning) = kind.warning() {
        println!("note: {warning}");
    }
    let net_mib = args.net_mib.unwrap_or(match kind {
        KvmKind::Pvm => 2,
        KvmKind::Hardware => 64,
    });
    if args.network_only {
        bench_network(&lane, net_mib, args.round_trips);
        return;
    }
    let mut figures = Figures::default();
    bench_tiny(&lane, args.tiny_runs);
    bench_jail(&lane, args.tiny_runs);
    bench_pause(&lane, args.pause_cycles);
    bench_boot(
        &lane,
        args.boot_runs,
        &args.kernel,
        &args.initramfs,
        &mut figures,
    );
    if let Some(test_initramfs) = &args.test_initramfs {
        bench_context_switches(&lane, &args.kernel, test_initramfs, args.yields);
    }
    bench_warm_start(
        &lane,
        &args.kernel,
        &args.initramfs,
        args.restore_runs,
        args.idle_vms,
        &mut figures,
    );
    bench_run(&lane, args.runc_runs, args.hull_runs, &mut figures);
    bench_network(&lane, net_mib, args.round_trips);
    figures.print_ratios(&lane);
}
