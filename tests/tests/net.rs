//! End to end: the virtio-net device under the real guest kernel's driver. hull-vmm starts in a
//! network namespace of its own and opens a TAP there (`--net`); the test joins that namespace
//! from one of its threads and configures the TAP's side as a host would (an address, MTU 9000,
//! up) with ioctls. The guest brings its NIC up, pings the host, and sends 3.4 MB over TCP to a
//! listener of the test, which compares every byte. The guest's NIC has the MAC and the MTU
//! given. (Issue 14's first part: mirroring a container's namespace comes next.)

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hull_tests::harness::{guest_artifacts, workspace_bin, Running};

const DEADLINE: Duration = Duration::from_secs(300);
const TAP: &str = "hulltap0";
const MAC: &str = "02:68:75:6c:6c:07";
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const LINES: u32 = 500_000;

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero `ifreq` is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// In the calling thread's namespace: waits for `TAP` to exist, then gives it `HOST_IP/24`,
/// MTU 9000, and brings it up.
fn configure_host_side() {
    // SAFETY: plain socket creation; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let mut req = ifreq(TAP);
        // SAFETY: reads and writes only `req`.
        if unsafe { libc::ioctl(fd, libc::SIOCGIFINDEX, &mut req) } == 0 {
            break;
        }
        assert!(Instant::now() < end, "hull-vmm never made {TAP}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut req = ifreq(TAP);
    // SAFETY: each ioctl reads (and may write) only `req`; the address is a `sockaddr_in`
    // laid in the union's `sockaddr` as the kernel expects.
    unsafe {
        let addr = &mut req.ifr_ifru.ifru_addr as *mut libc::sockaddr as *mut libc::sockaddr_in;
        (*addr).sin_family = libc::AF_INET as u16;
        (*addr).sin_addr.s_addr = u32::from_ne_bytes(HOST_IP);
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFADDR, &req), 0, "SIOCSIFADDR");
        (*addr).sin_addr.s_addr = u32::from_ne_bytes([255, 255, 255, 0]);
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFNETMASK, &req),
            0,
            "SIOCSIFNETMASK"
        );
        let mut req = ifreq(TAP);
        req.ifr_ifru.ifru_mtu = 9000;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFMTU, &req), 0, "SIOCSIFMTU");
        let mut req = ifreq(TAP);
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req), 0, "SIOCSIFFLAGS");
        libc::close(fd);
    }
}

/// What `busybox seq 1 LINES` prints.
fn expected_stream() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=LINES {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

#[test]
fn the_guest_kernel_s_driver_pings_and_sends_over_tcp_through_a_tap() {
    let (kernel, _) = guest_artifacts();
    let initramfs = kernel.with_file_name("test-initramfs.cpio");
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest artifacts missing: run `make kernel agent` first"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: this host has no TUN/TAP (modprobe tun)"
    );
    let script = "busybox ip link set eth0 up; \
        busybox ip addr add 10.77.0.2/24 dev eth0; \
        echo mtu=$(cat /sys/class/net/eth0/mtu) mac=$(cat /sys/class/net/eth0/address); \
        i=0; until busybox ping -c 1 -W 1 10.77.0.1 >/dev/null; do \
          i=$((i+1)); [ $i -gt 60 ] && break; done; \
        busybox ping -c 3 -W 2 10.77.0.1 >/dev/null && echo ping=ok; \
        i=0; until busybox seq 1 500000 | busybox nc 10.77.0.1 5000; do \
          i=$((i+1)); [ $i -gt 60 ] && break; sleep 1; done; echo sent=$i";
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--mem-size-mib")
        .arg("256")
        .arg("--net")
        .arg(format!("{TAP}={MAC}/9000"))
        .arg("--cmdline")
        .arg(format!("hull.exec=\"{script}\""));
    // SAFETY: `unshare` is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let running = Running::spawn(cmd);
    let pid = running.pid();

    // The host's side, in hull-vmm's namespace, from a thread of the test's.
    let host = std::thread::spawn(move || -> Vec<u8> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("hull-vmm's netns");
        // SAFETY: joins a namespace with a descriptor we own; affects this thread only.
        let joined = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
        configure_host_side();
        let listener = TcpListener::bind("10.77.0.1:5000").expect("listen on the TAP's address");
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().expect("the guest connects");
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("the guest's stream");
        got
    });
    let out = running.wait(DEADLINE);
    let context = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(
        out.stdout.contains(&format!("mtu=9000 mac={MAC}")),
        "{context}"
    );
    assert!(out.stdout.contains("ping=ok"), "{context}");
    assert!(
        out.stdout.contains("sent=") && !out.stdout.contains("sent=61"),
        "{context}"
    );
    let got = host.join().expect("the host's side");
    let want = expected_stream();
    assert_eq!(got.len(), want.len(), "{context}");
    assert!(got == want, "the stream arrived changed");
}
