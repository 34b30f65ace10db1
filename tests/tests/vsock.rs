//! End to end: byte streams between the host and the real guest over virtio-vsock with the
//! hybrid Unix-socket backend, both ways at once: the guest connects out to host port 5000
//! (a Unix socket `<uds>_5000`) and sends 589 KB; the host connects in to a guest echo server
//! on port 6000 (`CONNECT 6000` on the VMM's socket) and gets 256 KiB back byte-exact.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use hull_tests::harness::{guest_artifacts, workspace_bin, Running, TempDir};

const DEADLINE: Duration = Duration::from_secs(300);

/// What the guest sends: `seq 1 100000`.
fn seq_output() -> Vec<u8> {
    (1..=100_000)
        .map(|n| format!("{n}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn streams_flow_both_ways_between_host_and_guest() {
    let (kernel, _) = guest_artifacts();
    let initramfs = kernel.with_file_name("test-initramfs.cpio");
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest artifacts missing: run `make kernel agent` first"
    );
    let dir = TempDir::new("vsock");
    let uds = dir.path().join("vsock.sock");

    // Guest -> host: the host side of port 5000 is a Unix socket next to the VMM's.
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("the guest connects to port 5000");
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut received = Vec::new();
        conn.read_to_end(&mut received)
            .expect("read until the guest's half-close");
        let ok = received == seq_output();
        write!(
            conn,
            "host got {} bytes, {}",
            received.len(),
            if ok { "intact" } else { "CORRUPT" }
        )
        .unwrap();
        ok
    });

    let script = "vsock-echo 6000 1 & \
        seq 1 100000 | vsock-send 5000 > /tmp/reply; echo send_status=$?; \
        echo reply=$(cat /tmp/reply); wait $!; echo echo_status=$?";
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--cmdline")
        .arg(format!("hull.exec=\"{script}\""));
    let mut vm = Running::spawn(cmd);
    vm.wait_for_line(DEADLINE, |l| l.contains("vsock-echo: listening on 6000"));

    // Host -> guest: through the VMM's socket.
    let mut conn = UnixStream::connect(&uds).expect("the VMM listens on its vsock socket");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok_line = String::new();
    reader.read_line(&mut ok_line).unwrap();
    assert!(ok_line.starts_with("OK "), "VMM answered {ok_line:?}");
    let payload: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let writer = {
        let mut conn = conn.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || {
            conn.write_all(&payload).unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    reader
        .read_to_end(&mut echoed)
        .expect("the echo until the guest closes");
    writer.join().unwrap();
    assert!(
        echoed == payload,
        "echo differs: {} of {} bytes",
        echoed.len(),
        payload.len()
    );

    let out = vm.wait(DEADLINE);
    let context = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(
        receiver.join().unwrap(),
        "the guest's bytes arrived corrupted: {context}"
    );
    assert!(out.stdout.contains("send_status=0"), "{context}");
    assert!(
        out.stdout.contains("reply=host got 588895 bytes, intact"),
        "{context}"
    );
    assert!(out.stdout.contains("echo_status=0"), "{context}");
    // The VMM removes its socket when it exits.
    assert!(!uds.exists(), "{} left behind", uds.display());
}
