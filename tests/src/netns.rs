//! Network namespaces, veths and bridges for the network tests and benchmarks, made with
//! iproute2's `ip` as a CNI plugin would make them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// iproute2's `ip`.
pub const IP: &str = "/usr/sbin/ip";

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new(IP)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {IP}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why namespaces cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root, for network namespaces".into());
    }
    if !Path::new(IP).exists() {
        return Some(format!("needs iproute2's {IP}, to build the namespaces"));
    }
    None
}

/// A network namespace made with `ip netns add` (or named with `ip netns attach`), deleted on
/// drop.
pub struct Netns(pub String);

impl Netns {
    /// `hull-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hull-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        Self(name)
    }

    /// The namespace of process `pid`, named `hull-<tag>-<pid of the test>`.
    pub fn of_process(tag: &str, pid: &str) -> Self {
        let name = format!("hull-{tag}-{}", std::process::id());
        ip(&["netns", "attach", &name, pid]);
        Self(name)
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `body` on a thread that has joined this namespace.
    pub fn run<T: Send + 'static>(
        &self,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).expect("the namespace file");
            // SAFETY: setns on a descriptor that lives across the call; it moves this thread
            // alone.
            let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
            body()
        })
    }

    /// A veth from this namespace (`name`, with `cidr` if given) to `eth0` in `peer` (with
    /// `peer_cidr` and a default route through `gateway`), both of MTU `mtu`, up.
    #[allow(clippy::too_many_arguments)]
    pub fn veth_to(
        &self,
        name: &str,
        cidr: Option<&str>,
        peer: &Netns,
        peer_cidr: &str,
        gateway: &str,
        mtu: u32,
    ) {
        let mtu = mtu.to_string();
        self.ip(&[
            "link", "add", name, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu,
            "netns", &peer.0,
        ]);
        if let Some(cidr) = cidr {
            self.ip(&["addr", "add", cidr, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
        peer.ip(&["addr", "add", peer_cidr, "dev", "eth0"]);
        peer.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["route", "add", "default", "via", gateway]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(IP).args(["netns", "del", &self.0]).status();
    }
}

/// Points a bundle's `config.json` at the network namespace `netns` (its `network` entry gets
/// the path) and gives its process `CAP_NET_RAW` (for `ping`).
pub fn use_netns(config_path: &Path, netns: Option<&Path>) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config_path).expect("config.json"))
            .expect("config.json is JSON");
    for ns in config["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
    {
        if ns["type"] == "network" {
            if let Some(path) = netns {
                ns["path"] = serde_json::json!(path);
            }
        }
    }
    config["process"]["capabilities"] = serde_json::json!({
        "bounding": ["CAP_NET_RAW"], "effective": ["CAP_NET_RAW"], "permitted": ["CAP_NET_RAW"]});
    std::fs::write(config_path, config.to_string()).expect("config.json is writable");
}
