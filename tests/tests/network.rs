//! End to end: a container's network namespace mirrored into its micro-VM, through the `hull`
//! binary. Each test builds its namespaces, veths and bridge with iproute2's `ip`, as a CNI
//! plugin would, and talks to the container from a thread that has joined the "host side"
//! namespace:
//!
//! - TCP both ways, UDP (a DNS query answered by the test), ICMP and 100 MiB checked by SHA-256, over a veth of MTU 9000; the
//!   guest's NIC has the interface's name, MAC, MTU, address and default route;
//! - two containers in two namespaces on one bridge (MTU 1280) talking to each other;
//! - an interface moved into a new namespace after `create` (Docker's prestart hook does this),
//!   picked up at `start`;
//! - bad input: host networking, more interfaces than NIC slots, an interface that already
//!   has an ingress qdisc: each refused naming what is wrong, with nothing left (no process,
//!   state, TAP or qdisc).
//!
//! After each container is deleted its namespace has no `tapN_hull` and no ingress qdisc.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hull_netlink::Netlink;
use hull_tests::bundle::Bundle;
use hull_tests::harness::{assert_container_gone, require_guest_artifacts, workspace_bin, TempDir};
use hull_tests::netns::{unavailable, use_netns, Netns};
use serde_json::Value;
use sha2::{Digest, Sha256};

const DEADLINE: Duration = Duration::from_secs(600);
/// MiB sent to the container and checked there, unless `HULL_TEST_NET_MIB` says otherwise
/// (the PVM lane, where the guest's network stack runs emulated at tens of KB/s, sends less).
const BULK_MIB: usize = 100;

fn bulk_bytes() -> usize {
    std::env::var("HULL_TEST_NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BULK_MIB)
        << 20
}

/// The namespace's interfaces named `tapN_hull`, and those with an ingress qdisc.
fn leftovers(netns: &Netns) -> (Vec<String>, Vec<String>) {
    netns
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let links = nl.links().unwrap();
            let taps = links
                .iter()
                .filter(|l| l.name.ends_with("_hull"))
                .map(|l| l.name.clone())
                .collect();
            let ingress = links
                .iter()
                .filter(|l| nl.qdiscs(l.index).unwrap().iter().any(|k| k == "ingress"))
                .map(|l| l.name.clone())
                .collect();
            (taps, ingress)
        })
        .join()
        .unwrap()
}

fn assert_clean(netns: &Netns) {
    let (taps, ingress) = leftovers(netns);
    assert!(taps.is_empty(), "TAPs left in {}: {taps:?}", netns.0);
    assert!(
        ingress.is_empty(),
        "ingress qdiscs left in {}: {ingress:?}",
        netns.0
    );
}

/// Skips (returning false) where the test cannot build its namespaces.
fn can_run() -> bool {
    require_guest_artifacts();
    match unavailable() {
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
        None => true,
    }
}

/// A bundle running `script` in the network namespace at `netns` (a new one if `None`), with
/// `CAP_NET_RAW` for `ping`.
fn bundle(script: &str, netns: Option<&Path>) -> Bundle {
    let bundle = Bundle::builder().script(script).build();
    use_netns(&bundle.config(), netns);
    bundle
}

/// `hull --root ROOT ARGS` under the deadline.
fn hull(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(DEADLINE.as_secs().to_string())
        .arg(workspace_bin("hull"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn context(out: &Output) -> String {
    format!(
        "{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `hull run` of `bundle` as container `id` under `root`, in the background.
fn run_in_background(root: &Path, bundle: &Bundle, id: &str) -> std::thread::JoinHandle<Output> {
    let mut cmd = hull(
        root,
        &["run", "--bundle", bundle.path().to_str().unwrap(), id],
    );
    std::thread::spawn(move || cmd.output().expect("run hull"))
}

/// The value after `key:` on a line of `text`.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, String> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => return Err(format!("connect to {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// UDP both ways: answers the container's DNS queries on `udp` (busybox's `nslookup` asks for
/// A and AAAA records) until it has answered an A query, with 10.88.0.77; returns the name asked.
fn answer_dns(udp: &UdpSocket) -> Result<String, String> {
    let mut asked = None;
    // Until the container gets to its query (minutes on a PVM host), then a few seconds.
    udp.set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    loop {
        let mut query = [0u8; 512];
        let (n, from) = match udp.recv_from(&mut query) {
            Ok(got) => got,
            // Once the A query is answered, a while without another ends it.
            Err(_) if asked.is_some() => return Ok(asked.unwrap_or_default()),
            Err(e) => return Err(format!("no DNS query from the container: {e}")),
        };
        let query = &query[..n];
        // The header, then one question: labels up to a zero byte, then type and class.
        let mut at = 12;
        let mut labels = Vec::new();
        while at < n && query[at] != 0 {
            let len = usize::from(query[at]);
            let label = query
                .get(at + 1..at + 1 + len)
                .ok_or("a label past the end")?;
            labels.push(String::from_utf8_lossy(label).into_owned());
            at += 1 + len;
        }
        let end = at + 5;
        let kind = query
            .get(at + 1..at + 3)
            .ok_or("a question without a type")?;
        let is_a = kind == [0, 1];
        let mut answer = query[..2].to_vec();
        answer.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
        answer.extend_from_slice(&query[12..end]);
        if is_a {
            answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 88, 0, 77]);
            asked = Some(labels.join("."));
            udp.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
        }
        udp.send_to(&answer, from).map_err(|e| e.to_string())?;
    }
}

/// What the host side sends the container, and its SHA-256.
fn bulk() -> (Vec<u8>, String) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..bulk_bytes())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let hash = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (data, hash)
}

#[test]
fn traffic_flows_both_ways_through_a_mirrored_veth() {
    if !can_run() {
        return;
    }
    let host = Netns::new("net-h");
    let netns = Netns::new("net-c");
    host.veth_to(
        "vh0",
        Some("10.88.0.1/24"),
        &netns,
        "10.88.0.2/24",
        "10.88.0.1",
        9000,
    );
    let script = "\
        echo \"mtu:$(busybox cat /sys/class/net/eth0/mtu)\"; \
        echo \"mac:$(busybox cat /sys/class/net/eth0/address)\"; \
        echo \"addr:$(busybox ip -4 addr show eth0 | busybox grep -o 'inet [0-9./]*')\"; \
        echo \"route:$(busybox ip route | busybox grep default)\"; \
        busybox ping -c 3 -W 10 10.88.0.1 >/dev/null && echo ping-ok; \
        echo tcp-from-container | busybox nc 10.88.0.1 7001 && echo tcp-sent; \
        busybox nslookup hull.test 10.88.0.1 | busybox grep -A1 'hull.test' | busybox tail -1; \
        echo \"hash:$(busybox timeout 300 busybox nc -l -p 7003 | busybox sha256sum | busybox cut -d' ' -f1)\"";
    let bundle = bundle(script, Some(&netns.path()));
    let root = TempDir::new("net-root");
    let container_mac = netns
        .run(|| {
            let link = Netlink::open().unwrap().link("eth0").unwrap().unwrap();
            hull_protocol::format_mac(&link.mac.unwrap())
        })
        .join()
        .unwrap();
    let (data, want_hash) = bulk();
    // The host side: listeners first, then the bulk transfer into the container.
    // Every step bounded, so that a container that fails cannot hang the test.
    // UDP: a DNS server of the host side's, from before the container starts.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let dns = host.run(move || -> Result<String, String> {
        let udp = UdpSocket::bind("10.88.0.1:53").map_err(|e| format!("bind 53: {e}"))?;
        let _ = bound_tx.send(());
        answer_dns(&udp)
    });
    let _ = bound_rx.recv_timeout(Duration::from_secs(30));
    let host_side = host.run(move || -> Result<(String, String, Duration), String> {
        let err = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
        let tcp = TcpListener::bind("10.88.0.1:7001").map_err(err("bind 7001"))?;
        let deadline = Instant::now() + DEADLINE;
        tcp.set_nonblocking(true).map_err(err("nonblocking"))?;
        let conn = loop {
            match tcp.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("the container never connected to 7001".into());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(err("blocking"))?;
        conn.set_read_timeout(Some(DEADLINE))
            .map_err(err("timeout"))?;
        // One line; busybox's nc then waits for this side to close.
        let mut got = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&conn), &mut got)
            .map_err(err("read 7001"))?;
        drop(conn);
        let question = dns.join().map_err(|_| "the DNS thread panicked")??;
        let mut stream = connect_until("10.88.0.2:7003".parse().unwrap(), deadline)?;
        stream
            .set_write_timeout(Some(DEADLINE))
            .map_err(err("timeout"))?;
        let started = Instant::now();
        stream.write_all(&data).map_err(err("write 7003"))?;
        stream.shutdown(Shutdown::Write).map_err(err("shutdown"))?;
        Ok((got, question, started.elapsed()))
    });
    let out = run_in_background(root.path(), &bundle, "net-veth")
        .join()
        .unwrap();
    let context = context(&out);
    let (tcp, question, took) = host_side
        .join()
        .expect("the host side")
        .unwrap_or_else(|e| panic!("the host side: {e}\n{context}"));
    assert_eq!(out.status.code(), Some(0), "{context}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(field(&stdout, "mtu:"), Some("9000"), "{context}");
    assert_eq!(
        field(&stdout, "mac:"),
        Some(container_mac.as_str()),
        "{context}"
    );
    assert_eq!(
        field(&stdout, "addr:"),
        Some("inet 10.88.0.2/24"),
        "{context}"
    );
    assert!(
        field(&stdout, "route:").is_some_and(|r| r.starts_with("default via 10.88.0.1 dev eth0")),
        "{context}"
    );
    assert!(stdout.contains("ping-ok"), "{context}");
    assert!(stdout.contains("tcp-sent"), "{context}");
    assert_eq!(tcp, "tcp-from-container\n");
    assert_eq!(question, "hull.test", "{context}");
    assert!(
        stdout.contains("Address: 10.88.0.77"),
        "the DNS answer: {context}"
    );
    assert_eq!(
        field(&stdout, "hash:"),
        Some(want_hash.as_str()),
        "{context}"
    );
    eprintln!(
        "{} MiB host to container in {:.1} s ({:.1} Mbit/s)",
        bulk_bytes() >> 20,
        took.as_secs_f64(),
        (bulk_bytes() * 8) as f64 / took.as_secs_f64() / 1e6
    );
    assert_container_gone(root.path(), "net-veth");
    assert_clean(&netns);
}

#[test]
fn two_containers_on_one_bridge_talk_to_each_other() {
    if !can_run() {
        return;
    }
    let host = Netns::new("br-h");
    host.ip(&["link", "add", "br0", "mtu", "1280", "type", "bridge"]);
    host.ip(&["addr", "add", "10.89.0.1/24", "dev", "br0"]);
    host.ip(&["link", "set", "br0", "up"]);
    let one = Netns::new("br-1");
    let two = Netns::new("br-2");
    for (netns, side, cidr) in [(&one, "vb1", "10.89.0.2/24"), (&two, "vb2", "10.89.0.3/24")] {
        host.veth_to(side, None, netns, cidr, "10.89.0.1", 1280);
        host.ip(&["link", "set", side, "master", "br0"]);
    }
    let listener = bundle(
        "echo \"mtu:$(busybox cat /sys/class/net/eth0/mtu)\"; \
         echo \"got:$(busybox timeout 300 busybox nc -l -p 7100)\"",
        Some(&one.path()),
    );
    let talker = bundle(
        "echo \"mtu:$(busybox cat /sys/class/net/eth0/mtu)\"; \
         for i in $(busybox seq 1 60); do \
           busybox ping -c 1 -W 5 -s 1252 10.89.0.2 >/dev/null && { echo ping-ok; break; }; \
         done; \
         for i in $(busybox seq 1 100); do \
           echo from-two | busybox timeout 10 busybox nc 10.89.0.2 7100; \
           [ $? -ne 1 ] && { echo sent; break; }; busybox sleep 1; \
         done",
        Some(&two.path()),
    );
    let root = TempDir::new("br-root");
    let first = run_in_background(root.path(), &listener, "br-one");
    let second = run_in_background(root.path(), &talker, "br-two");
    let (first, second) = (first.join().unwrap(), second.join().unwrap());
    let (c1, c2) = (context(&first), context(&second));
    assert_eq!(first.status.code(), Some(0), "{c1}");
    assert_eq!(second.status.code(), Some(0), "{c2}");
    let (out1, out2) = (
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&second.stdout),
    );
    assert_eq!(field(&out1, "mtu:"), Some("1280"), "{c1}");
    assert_eq!(field(&out2, "mtu:"), Some("1280"), "{c2}");
    assert_eq!(field(&out1, "got:"), Some("from-two"), "{c1}");
    assert!(out2.contains("ping-ok") && out2.contains("sent"), "{c2}");
    for (id, netns) in [("br-one", &one), ("br-two", &two)] {
        assert_container_gone(root.path(), id);
        assert_clean(netns);
    }
}

/// Docker's network setup runs in a prestart hook, after the namespace exists: an interface
/// that appears between `create` and `start` is in the VM when the process starts.
#[test]
fn an_interface_added_after_create_is_picked_up_at_start() {
    if !can_run() {
        return;
    }
    let host = Netns::new("late-h");
    let bundle = bundle(
        "busybox ip -4 addr show eth0 | busybox grep -o 'inet [0-9./]*'; \
         busybox ping -c 2 -W 10 10.90.0.1 >/dev/null && echo ping-ok",
        None,
    );
    let root = TempDir::new("late-root");
    let bundle_dir = bundle.path().to_str().unwrap().to_owned();
    // hull-vmm keeps `create`'s streams (they are the container's): files, not pipes.
    let (stdout_path, stderr_path) = (root.path().join("out"), root.path().join("err"));
    let status = hull(root.path(), &["create", "--bundle", &bundle_dir, "late"])
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .status()
        .unwrap();
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    assert!(status.success(), "{status:?}: {}", read(&stderr_path));
    let state: Value = serde_json::from_slice(
        &hull(root.path(), &["state", "late"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pid = state["pid"].as_i64().expect("a pid").to_string();
    // The container's namespace is hull-vmm's: named for `ip`, as Docker bind-mounts it.
    let late = Netns::of_process("late-c", &pid);
    host.veth_to(
        "vl0",
        Some("10.90.0.1/24"),
        &late,
        "10.90.0.2/24",
        "10.90.0.1",
        1500,
    );
    let start = hull(root.path(), &["start", "late"]).output().unwrap();
    assert!(start.status.success(), "{}", context(&start));
    // The container's output went to hull-vmm's streams: wait for it to end.
    let end = Instant::now() + DEADLINE;
    loop {
        let state: Value = serde_json::from_slice(
            &hull(root.path(), &["state", "late"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        if state["status"] == "stopped" {
            break;
        }
        assert!(Instant::now() < end, "the container did not stop: {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let delete = hull(root.path(), &["delete", "late"]).output().unwrap();
    assert!(delete.status.success(), "{}", context(&delete));
    assert_container_gone(root.path(), "late");
    let (stdout, stderr) = (read(&stdout_path), read(&stderr_path));
    assert!(
        stdout.contains("inet 10.90.0.2/24") && stdout.contains("ping-ok"),
        "{stdout}\n--- stderr ---\n{stderr}"
    );
}

#[test]
fn bad_network_input_is_refused_and_nothing_is_left() {
    if !can_run() {
        return;
    }
    let root = TempDir::new("badnet-root");
    let create = |bundle: &Bundle, id: &str| {
        let out = hull(
            root.path(),
            &["create", "--bundle", bundle.path().to_str().unwrap(), id],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", context(&out));
        assert_container_gone(root.path(), id);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // Host networking: no network namespace in the spec.
    let host_net = bundle("true", None);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(host_net.config()).unwrap()).unwrap();
    config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "network");
    std::fs::write(host_net.config(), config.to_string()).unwrap();
    let err = create(&host_net, "badnet-host");
    assert!(
        err.contains("field `linux.namespaces` = [")
            && err.contains("has no `network` namespace")
            && err.contains("host networking"),
        "{err}"
    );

    // More interfaces than the VM has NIC slots.
    let host = Netns::new("badnet-h");
    let crowded = Netns::new("badnet-c");
    for i in 0..5 {
        let (side, peer) = (format!("vc{i}"), format!("eth{i}"));
        host.ip(&[
            "link", "add", &side, "type", "veth", "peer", "name", &peer, "netns", &crowded.0,
        ]);
    }
    let err = create(&bundle("true", Some(&crowded.path())), "badnet-many");
    assert!(
        err.contains("has 5 interfaces to mirror into the VM; a VM has 4 NIC slots"),
        "{err}"
    );
    assert_clean(&crowded);

    // An interface whose ingress is someone else's: refused, and the TAP made before undone.
    let taken = Netns::new("badnet-q");
    host.ip(&[
        "link", "add", "vq0", "type", "veth", "peer", "name", "eth0", "netns", &taken.0,
    ]);
    taken
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let eth0 = nl.link("eth0").unwrap().unwrap();
            nl.add_ingress_qdisc(eth0.index).unwrap();
        })
        .join()
        .unwrap();
    let err = create(&bundle("true", Some(&taken.path())), "badnet-qdisc");
    assert!(
        err.contains("cannot mirror interface eth0: eth0 has an ingress qdisc already"),
        "{err}"
    );
    let (taps, ingress) = leftovers(&taken);
    assert!(taps.is_empty(), "{taps:?}");
    assert_eq!(ingress, ["eth0"], "only the qdisc that was there before");
}
