//! The pod network of a private CRI node: a CNI conflist of Debian's reference plugins
//! (`containernetworking-plugins`, in `/usr/lib/cni`) as a small cluster would have it: a
//! `bridge` of the test's own with `host-local` addresses from a /24 (in 10.88.0.0/16) that no
//! route of the host touches, and `portmap` for host ports where the kernel has netfilter's
//! NAT. containerd adds the loopback network itself (`loopback` from the same directory).
//! Names are unique per run (network, bridge, subnet), host-local keeps its leases in the
//! test's directory, and the bridge (which CNI never deletes) goes on drop.
//!
//! What CNI keeps outside the test's directory, and checked for leftovers: go-cni's results
//! cache in `/var/lib/cni/results`, the bridge's ports (the pods' veths), and portmap's
//! iptables rules, which carry the network's name in their comments.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's containernetworking-plugins are.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The plugins the network needs: the conflist's and the loopback containerd adds.
/// (`portmap` is used where it is there and the kernel has netfilter's NAT.)
pub const PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// libcni's results cache, which containerd 1.6 leaves at its default.
const RESULTS_DIR: &str = "/var/lib/cni/results";
/// iproute2's `ip`.
const IP: &str = "/usr/sbin/ip";

/// A CNI network of the test's own.
pub struct CniNetwork {
    name: String,
    bridge: String,
    subnet_prefix: String,
    conf_dir: PathBuf,
    data_dir: PathBuf,
    portmap: bool,
}

impl CniNetwork {
    /// Writes the conflist into `dir/net.d` (host-local's leases go to `dir/ipam`).
    pub fn write(dir: &Path) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet_prefix = free_subnet(pid + n);
        let network = Self {
            name: format!("hull-cri-{pid}-{n}"),
            bridge: format!("hcri{}{n}", pid % 100_000),
            subnet_prefix,
            conf_dir: dir.join("net.d"),
            data_dir: dir.join("ipam"),
            portmap: Path::new(CNI_BIN_DIR).join("portmap").is_file() && netfilter_nat_available(),
        };
        std::fs::create_dir_all(&network.conf_dir).expect("create the CNI conf dir");
        std::fs::write(
            network.conf_dir.join("10-hull-cri.conflist"),
            network.conflist(),
        )
        .expect("write the CNI conflist");
        network
    }

    /// The conflist: bridge with host-local, then portmap where the kernel can NAT.
    fn conflist(&self) -> String {
        // ipMasq stays off: pods reach only the host, and without it the bridge plugin needs
        // no netfilter at all (the nested lane's L1 kernel has none loaded).
        let bridge = serde_json::json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": self.data_dir,
                "ranges": [[{"subnet": self.subnet(), "gateway": self.gateway()}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        });
        let mut plugins = vec![bridge];
        if self.portmap {
            plugins.push(serde_json::json!({
                "type": "portmap",
                "capabilities": {"portMappings": true}
            }));
        }
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": plugins
        })
        .to_string()
    }

    /// The network's name (unique per run).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// `10.88.X.0/24` (usually).
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.subnet_prefix)
    }

    /// The bridge's address, the pods' gateway: `10.88.X.1` (usually).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet_prefix)
    }

    /// Whether the conflist has `portmap` (it is installed, and the kernel has netfilter's
    /// NAT here).
    pub fn has_portmap(&self) -> bool {
        self.portmap
    }

    /// The conf dir containerd reads.
    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// Whether `ip` is an address of this network's subnet.
    pub fn contains(&self, ip: &str) -> bool {
        ip.strip_prefix(&self.subnet_prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|host| host.parse::<u8>().ok())
            .is_some_and(|host| host > 1 && host < 255)
    }

    /// What CNI still holds for this network: host-local leases, results cached for it,
    /// ports of its bridge (veths), iptables rules that name it.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        // host-local keeps a file per leased address beside its lock and last-reserved file.
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join(&self.name)) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if file != "lock" && !file.starts_with("last_reserved_ip") {
                    left.push(format!("host-local lease {}", entry.path().display()));
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(RESULTS_DIR) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if file.starts_with(&format!("{}-", self.name)) {
                    left.push(format!("CNI result {}", entry.path().display()));
                }
            }
        }
        let ports = ip_output(&["-o", "link", "show", "master", &self.bridge]);
        for line in ports.lines().filter(|l| !l.trim().is_empty()) {
            left.push(format!("port of {}: {line}", self.bridge));
        }
        if self.portmap {
            for table in ["nat", "filter"] {
                let rules = Command::new("iptables-save")
                    .args(["-t", table])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                for rule in rules.lines().filter(|r| rule_names_network(r, &self.name)) {
                    left.push(format!("iptables -t {table}: {rule}"));
                }
            }
        }
        left
    }

    /// The results libcni cached for `ids` (sandbox ids: containerd's loopback network is
    /// `cni-loopback`, cached under that name).
    pub fn cached_results_of(ids: &[&str]) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(RESULTS_DIR) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|file| ids.iter().any(|id| file.contains(id)))
            .map(|file| format!("CNI result {RESULTS_DIR}/{file}"))
            .collect()
    }
}

impl CniNetwork {
    /// After a failure, when no CNI DEL ran: removes the results cached for this network and
    /// for the sandboxes `ids` (their loopback's).
    pub fn forget_results(&self, ids: &[String]) {
        let Ok(entries) = std::fs::read_dir(RESULTS_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&format!("{}-", self.name))
                || ids.iter().any(|id| file.contains(id.as_str()))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        let _ = Command::new(IP)
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Why the CNI plugins cannot be had, if they cannot: missing, and Debian's
/// `containernetworking-plugins` would not install.
pub fn unavailable() -> Option<String> {
    let missing = |p: &str| !Path::new(CNI_BIN_DIR).join(p).is_file();
    if !PLUGINS.iter().any(|p| missing(p)) {
        return None;
    }
    let installed = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "containernetworking-plugins",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .is_ok_and(|o| o.status.success());
    PLUGINS.iter().find(|p| missing(p)).map(|plugin| {
        format!(
            "the CNI plugin {CNI_BIN_DIR}/{plugin} is missing (apt-get install \
             containernetworking-plugins {})",
            if installed {
                "did not bring it"
            } else {
                "failed"
            }
        )
    })
}

/// Whether the `iptables-save` line `rule` is one a plugin made for `network`: its comment
/// says `name: "NETWORK"` (quoted again by iptables-save).
pub fn rule_names_network(rule: &str, network: &str) -> bool {
    rule.contains(&format!(r#"name: \"{network}\""#))
}

/// Whether iptables can read the NAT table here (portmap's rules live there).
fn netfilter_nat_available() -> bool {
    Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ip_output(args: &[&str]) -> String {
    Command::new(IP)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `10.88.X` (or `10.B.X` past 88) for a /24 that no address or route of the host overlaps,
/// starting from a choice by `seed`.
fn free_subnet(seed: u32) -> String {
    let routes = ip_output(&["-4", "route", "show", "table", "all"]);
    let addresses = ip_output(&["-4", "-o", "addr", "show"]);
    // A route's destination comes first, or after its type (`local 10.0.0.5 dev ...`).
    fn destination(line: &str) -> Option<&str> {
        let mut words = line.split_whitespace();
        match words.next()? {
            "unicast" | "local" | "broadcast" | "multicast" | "anycast" | "unreachable"
            | "blackhole" | "prohibit" | "throw" | "nat" => words.next(),
            first => Some(first),
        }
    }
    let prefixes: Vec<(u32, u32)> = routes
        .lines()
        .filter_map(destination)
        .chain(
            addresses
                .lines()
                .filter_map(|l| l.split_whitespace().nth(3)),
        )
        .filter_map(parse_prefix)
        .collect();
    // containerd's own example network is 10.88.0.0/16: look further if a host has it.
    (88..100u32)
        .flat_map(|b| (0..150).map(move |i| (b, 100 + (seed + i) % 150)))
        .find(|(b, x)| {
            let ours = (u32::from_be_bytes([10, *b as u8, *x as u8, 0]), 24);
            !prefixes.iter().any(|p| overlaps(*p, ours))
        })
        .map(|(b, x)| format!("10.{b}.{x}"))
        .expect("some 10.B.X.0/24 is free of the host's routes")
}

/// `a.b.c.d/len` (or a bare address, a /32) as a number and a length.
fn parse_prefix(text: &str) -> Option<(u32, u32)> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((u32::from(addr), len))
}

/// Whether two prefixes share an address: the shorter one holds the other's start.
fn overlaps(a: (u32, u32), b: (u32, u32)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a.0 & mask == b.0 & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portmap_rules_are_told_by_their_network() {
        let rule = r#"-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"hull-cri-1-1\" id: \"ab\"" -j CNI-DN-9e"#;
        assert!(rule_names_network(rule, "hull-cri-1-1"));
        assert!(!rule_names_network(rule, "hull-cri-1-10"));
        assert!(!rule_names_network(rule, "hull-cri-1"));
    }

    #[test]
    fn prefixes_overlap_when_one_holds_the_other() {
        let p = |t| parse_prefix(t).unwrap();
        assert!(overlaps(p("10.0.0.0/8"), p("10.88.120.0/24")));
        assert!(overlaps(p("10.88.120.7"), p("10.88.120.0/24")));
        assert!(!overlaps(p("10.88.121.0/24"), p("10.88.120.0/24")));
        assert!(overlaps(p("0.0.0.0/0"), p("10.88.120.0/24")));
        assert!(parse_prefix("default").is_none());
    }
}
