//! The container's network: every interface of its network namespace on the host is mirrored
//! into the VM, as Kata does it with CNI.
//!
//! hull-vmm lives in that namespace (it joins the spec's path, or makes a new one that Docker's
//! prestart hook then fills). For each interface there that is not loopback (a veth, a macvlan,
//! anything with an address), hull:
//!
//! 1. makes a TAP beside it (`tapN_hull`): persistent and owned by hull-vmm's user, so that
//!    hull-vmm, which has no `CAP_NET_ADMIN`, can attach to it by name from its jail; with the
//!    interface's MTU, up;
//! 2. gives both an ingress qdisc and redirects each one's ingress out of the other (a u32
//!    filter matching everything, with a mirred egress redirect): what arrives for the
//!    interface goes to the guest, what the guest sends leaves by the interface. The host's
//!    own stack in the namespace sees none of it, and the interface keeps its addresses;
//! 3. asks hull-vmm (`configure_network` on the control socket) to put the TAP in a NIC slot
//!    with the interface's MAC and MTU; the guest agent then brings the NIC up under the
//!    interface's name with its IPv4 addresses and routes (the default route included).
//!
//! This runs at the end of `create` (after the prestart hooks, where Docker adds its veth) and
//! again at `start` for interfaces that appeared in between. `delete` removes the TAPs and the
//! qdiscs (with their filters) from a namespace that outlives the container; a namespace that
//! goes with the container takes them along. A step that fails undoes the steps before it.
//!
//! Everything here is netlink (`hull-netlink`) from a thread that has joined the namespace; the
//! TAP itself is made with `TUNSETIFF`, as there is no netlink request for it.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hull_netlink::{Link, Netlink};
use hull_protocol::{format_mac, NetInterface, NetRoute, NetworkConfig};
use serde::{Deserialize, Serialize};

/// NIC slots every container's VM has (and its template): interfaces beyond are refused.
pub const NIC_SLOTS: u8 = 4;

/// The names of hull's TAPs: `tap0_hull`, `tap1_hull`...
const TAP_SUFFIX: &str = "_hull";

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// One interface mirrored into the VM, as `state.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirrored {
    /// The namespace's interface, and its index.
    pub link: String,
    pub index: u32,
    /// The TAP beside it.
    pub tap: String,
}

/// Where the container's network namespace is, for `start` and `delete` to go back to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// The spec's path.
    Path(PathBuf),
    /// Made by hull-vmm: `/proc/<pid>/ns/net` while it lives.
    Vmm,
}

impl Namespace {
    /// Opens the namespace; `vmm` is hull-vmm's pid and start time.
    pub fn open(&self, vmm: (i32, u64)) -> anyhow::Result<File> {
        let path = match self {
            Self::Path(path) => path.clone(),
            Self::Vmm => {
                let path = PathBuf::from(format!("/proc/{}/ns/net", vmm.0));
                let file = File::open(&path).with_context(|| {
                    format!("the container's network namespace {}", path.display())
                })?;
                // The pid was hull-vmm's when the file was opened: the namespace is its.
                if !crate::container::process_alive(vmm.0, vmm.1) {
                    bail!(
                        "hull-vmm (pid {}) is gone, and its network namespace",
                        vmm.0
                    );
                }
                return Ok(file);
            }
        };
        File::open(&path)
            .with_context(|| format!("the container's network namespace {}", path.display()))
    }
}

/// Runs `body` on a thread that has joined the network namespace `netns`.
fn in_namespace<T: Send>(
    netns: &File,
    body: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("cannot join the container's network namespace")?;
                body()
            })
            .join()
            .unwrap_or_else(|_| bail!("the network thread panicked"))
    })
}

/// What was made for one interface, undone in reverse if a later step fails.
#[derive(Default)]
struct Undo {
    taps: Vec<u32>,
    qdiscs: Vec<u32>,
}

impl Undo {
    fn run(&self, nl: &mut Netlink) {
        for &index in self.qdiscs.iter().rev() {
            if let Err(e) = nl.delete_ingress_qdisc(index) {
                log::warn!("undoing the network setup: {e}");
            }
        }
        for &index in self.taps.iter().rev() {
            if let Err(e) = nl.delete_link(index) {
                log::warn!("undoing the network setup: {e}");
            }
        }
    }
}

/// The interfaces of the namespace `netns` not yet mirrored (not in `done`), mirrored onto new
/// TAPs: returns them, and what the guest must be told of them. Nothing is left made if it
/// fails.
pub fn mirror(netns: &File, done: &[Mirrored]) -> anyhow::Result<(Vec<Mirrored>, NetworkConfig)> {
    in_namespace(netns, || {
        let mut nl = Netlink::open()?;
        let links = nl.links()?;
        let addresses = nl.addresses()?;
        let routes = nl.routes()?;
        let wanted: Vec<&Link> = links
            .iter()
            .filter(|link| mirrorable(link, &addresses))
            .filter(|link| !done.iter().any(|d| d.index == link.index))
            .collect();
        if done.len() + wanted.len() > usize::from(NIC_SLOTS) {
            bail!(
                "the container's network namespace has {} interfaces to mirror into the VM; a \
                 VM has {NIC_SLOTS} NIC slots",
                done.len() + wanted.len()
            );
        }
        let mut undo = Undo::default();
        let mut mirrored = Vec::new();
        let mut config = NetworkConfig {
            interfaces: Vec::new(),
            routes: Vec::new(),
        };
        let mut taken: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
        for link in wanted {
            match mirror_one(&mut nl, link, &addresses, &routes, &mut taken, &mut undo) {
                Ok((one, iface, iface_routes)) => {
                    mirrored.push(one);
                    config.interfaces.push(iface);
                    config.routes.extend(iface_routes);
                }
                Err(err) => {
                    undo.run(&mut nl);
                    return Err(err.context(format!("cannot mirror interface {}", link.name)));
                }
            }
        }
        Ok((mirrored, config))
    })
}

/// Undoes [`mirror`]'s work for `mirrored` (as it was told of a failure after it returned).
pub fn unmirror(netns: &File, mirrored: &[Mirrored]) -> anyhow::Result<()> {
    if mirrored.is_empty() {
        return Ok(());
    }
    in_namespace(netns, || {
        let mut nl = Netlink::open()?;
        let links = nl.links()?;
        let mut failures = Vec::new();
        for one in mirrored {
            // The interface may be gone (and its qdisc with it), or be another of its name.
            if links
                .iter()
                .any(|l| l.index == one.index && l.name == one.link)
            {
                match nl.delete_ingress_qdisc(one.index) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.errno(),
                            Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
                        ) => {}
                    Err(e) => failures.push(e.to_string()),
                }
            }
            if let Some(tap) = links.iter().find(|l| l.name == one.tap) {
                match nl.delete_link(tap.index) {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(libc::ENODEV) => {}
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        if !failures.is_empty() {
            bail!("cannot remove the mirroring: {}", failures.join("; "));
        }
        Ok(())
    })
}

/// Whether `link` is one to mirror: not loopback, an Ethernet address, not a TAP (hull's
/// own, or another VMM's), and a veth or macvlan/ipvlan, or any interface with an address.
fn mirrorable(link: &Link, addresses: &[hull_netlink::Address]) -> bool {
    if link.loopback || link.mac.is_none() {
        return false;
    }
    match link.kind.as_deref() {
        Some("tun") | Some("bridge") => false,
        Some("veth" | "macvlan" | "macvtap" | "ipvlan") => true,
        _ => addresses
            .iter()
            .any(|a| a.index == link.index && !a.link_scope),
    }
}

/// Mirrors one interface; what it made is in `undo`.
fn mirror_one(
    nl: &mut Netlink,
    link: &Link,
    addresses: &[hull_netlink::Address],
    routes: &[hull_netlink::Route],
    taken: &mut Vec<String>,
    undo: &mut Undo,
) -> anyhow::Result<(Mirrored, NetInterface, Vec<NetRoute>)> {
    let mac = link.mac.context("no MAC")?;
    let mtu = u16::try_from(link.mtu)
        .ok()
        .filter(|&m| m >= 68)
        .with_context(|| {
            format!(
                "MTU {} is not one a guest NIC takes (68 to 65535)",
                link.mtu
            )
        })?;
    let tap = (0..)
        .map(|n| format!("tap{n}{TAP_SUFFIX}"))
        .find(|name| !taken.contains(name))
        .expect("an unused name");
    taken.push(tap.clone());
    make_tap(&tap)?;
    let tap_link = nl
        .links()?
        .into_iter()
        .find(|l| l.name == tap)
        .with_context(|| format!("the TAP {tap} vanished"))?;
    undo.taps.push(tap_link.index);
    nl.set_link(tap_link.index, None, Some(link.mtu), Some(true))?;
    for index in [link.index, tap_link.index] {
        nl.add_ingress_qdisc(index).map_err(|e| match e.errno() {
            Some(libc::EEXIST) if index == link.index => anyhow::anyhow!(
                "{} has an ingress qdisc already, which hull would replace",
                link.name
            ),
            Some(libc::ENODEV) if index == link.index => {
                anyhow::anyhow!("{} disappeared", link.name)
            }
            _ => anyhow::Error::new(e),
        })?;
        undo.qdiscs.push(index);
    }
    nl.add_redirect(link.index, tap_link.index)?;
    nl.add_redirect(tap_link.index, link.index)?;
    let own: Vec<String> = addresses
        .iter()
        .filter(|a| a.index == link.index && !a.link_scope && a.ip.is_ipv4())
        .map(|a| format!("{}/{}", a.ip, a.prefix))
        .collect();
    // The guest kernel has no IPv6: only IPv4 addresses and routes are carried.
    let iface_routes = routes
        .iter()
        .filter(|r| r.interface == link.index && !r.kernel)
        .filter(|r| {
            r.destination.is_none_or(|(ip, _)| ip.is_ipv4())
                && r.gateway.is_none_or(|g: IpAddr| g.is_ipv4())
                && (r.destination.is_some() || r.gateway.is_some())
        })
        .map(|r| NetRoute {
            destination: r.destination.map(|(ip, prefix)| format!("{ip}/{prefix}")),
            gateway: r.gateway.map(|g| g.to_string()),
            interface: link.name.clone(),
            metric: r.metric,
        })
        .collect();
    log::debug!(
        "mirroring {} (MAC {}, MTU {mtu}, {own:?}) onto {tap}",
        link.name,
        format_mac(&mac)
    );
    Ok((
        Mirrored {
            link: link.name.clone(),
            index: link.index,
            tap: tap.clone(),
        },
        NetInterface {
            name: link.name.clone(),
            mac: format_mac(&mac),
            mtu,
            addresses: own,
            tap,
            device: String::new(),
        },
        iface_routes,
    ))
}

/// Makes a persistent TAP named `name` (with virtio-net headers, as hull-vmm opens it) in the
/// calling thread's network namespace, owned by uid 0, hull-vmm's.
fn make_tap(name: &str) -> anyhow::Result<()> {
    let fail = |what: &str| {
        let err = std::io::Error::last_os_error();
        anyhow::anyhow!("cannot make the TAP {name}: {what}: {err}")
    };
    // SAFETY: a plain open of a NUL-terminated path; the result is checked.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(fail("open /dev/net/tun"));
    }
    // SAFETY: `raw` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(fail("TUNSETIFF"));
    }
    // SAFETY: these take an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOWNER, 0 as libc::c_ulong) } < 0 {
        return Err(fail("TUNSETOWNER"));
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(fail("TUNSETPERSIST"));
    }
    Ok(())
}

/// Mirrors what is new in the namespace of a created container whose hull-vmm is `vmm` (pid,
/// start) and asks hull-vmm to bring it into the VM: returns everything mirrored so far.
/// Undone (but what `done` has) if hull-vmm or the agent refuse.
pub fn sync(
    namespace: &Namespace,
    vmm: (i32, u64),
    done: &[Mirrored],
    client: impl FnOnce() -> anyhow::Result<hull_contract::control::Client>,
) -> anyhow::Result<Vec<Mirrored>> {
    let netns = namespace.open(vmm)?;
    let (new, config) = mirror(&netns, done)?;
    if new.is_empty() {
        return Ok(done.to_vec());
    }
    let asked = client().and_then(|mut client| {
        client
            .request(
                hull_protocol::RequestBody::ConfigureNetwork(Box::new(config)),
                Some(crate::container::REQUEST_DEADLINE),
            )
            .context("cannot bring the container's interfaces into the VM")
    });
    if let Err(err) = asked {
        if let Err(undo) = unmirror(&netns, &new) {
            log::warn!("{undo:#}");
        }
        return Err(err);
    }
    let mut all = done.to_vec();
    all.extend(new);
    Ok(all)
}

/// The namespace a spec's network namespace path names, or hull-vmm's own.
pub fn namespace_of(path: Option<&Path>) -> Namespace {
    match path {
        Some(path) => Namespace::Path(path.to_owned()),
        None => Namespace::Vmm,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use hull_netlink::Route;

    use super::*;

    /// Runs `body` on a thread in a new network namespace, given the namespace's file; `None`
    /// (skipped) without root.
    fn in_new_netns<T: Send>(body: impl FnOnce(File, Netlink) -> T + Send) -> Option<T> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root, to make a network namespace");
            return None;
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    let netns = File::open("/proc/thread-self/ns/net").unwrap();
                    Some(body(netns, Netlink::open().unwrap()))
                })
                .join()
                .unwrap()
        })
    }

    fn index(nl: &mut Netlink, name: &str) -> Option<u32> {
        nl.link(name).unwrap().map(|l| l.index)
    }

    fn ingress(nl: &mut Netlink, index: u32) -> bool {
        nl.qdiscs(index).unwrap().iter().any(|k| k == "ingress")
    }

    #[test]
    fn an_interface_is_mirrored_onto_a_tap_both_ways_and_unmirrored() {
        in_new_netns(|netns, mut nl| {
            nl.add_veth("eth0", "peer0").unwrap();
            let eth0 = index(&mut nl, "eth0").unwrap();
            nl.set_link(eth0, None, Some(9000), Some(true)).unwrap();
            nl.add_address(eth0, "10.5.0.2".parse().unwrap(), 24)
                .unwrap();
            let gateway: IpAddr = "10.5.0.1".parse().unwrap();
            nl.add_route(&Route {
                destination: None,
                gateway: Some(gateway),
                interface: eth0,
                kernel: false,
                metric: None,
            })
            .unwrap();
            let mac = nl
                .links()
                .unwrap()
                .into_iter()
                .find(|l| l.index == eth0)
                .and_then(|l| l.mac)
                .unwrap();

            let (mirrored, config) = mirror(&netns, &[]).unwrap();
            // Both ends of the veth are here: both are mirrored, each onto a TAP of its own.
            let mut names: Vec<_> = mirrored.iter().map(|m| m.link.as_str()).collect();
            names.sort();
            assert_eq!(names, ["eth0", "peer0"]);
            let find = |name: &str| config.interfaces.iter().find(|i| i.name == name).unwrap();
            let iface = find("eth0");
            assert_eq!(iface.mac, format_mac(&mac));
            assert_eq!(iface.mtu, 9000);
            assert_eq!(iface.addresses, ["10.5.0.2/24"]);
            let peer = find("peer0");
            assert!(peer.addresses.is_empty());
            let mut taps = [iface.tap.as_str(), peer.tap.as_str()];
            taps.sort();
            assert_eq!(taps, ["tap0_hull", "tap1_hull"]);
            assert_eq!(
                config.routes,
                [NetRoute {
                    destination: None,
                    gateway: Some("10.5.0.1".into()),
                    interface: "eth0".into(),
                    metric: None,
                }],
                "the default route, not the kernel's subnet route"
            );
            let tap = index(&mut nl, &iface.tap).unwrap();
            let tap_link = nl
                .links()
                .unwrap()
                .into_iter()
                .find(|l| l.index == tap)
                .unwrap();
            assert_eq!((tap_link.mtu, tap_link.up), (9000, true));
            assert_eq!(tap_link.kind.as_deref(), Some("tun"));
            assert_eq!(nl.redirects(eth0).unwrap(), [tap]);
            assert_eq!(nl.redirects(tap).unwrap(), [eth0]);

            // Again: nothing new to mirror.
            let (again, config) = mirror(&netns, &mirrored).unwrap();
            assert!(again.is_empty() && config.interfaces.is_empty());

            unmirror(&netns, &mirrored).unwrap();
            assert_eq!(index(&mut nl, "tap0_hull"), None);
            assert_eq!(index(&mut nl, "tap1_hull"), None);
            assert!(!ingress(&mut nl, eth0));
            // Twice: what is gone is no error.
            unmirror(&netns, &mirrored).unwrap();
        });
    }

    #[test]
    fn a_mirroring_that_fails_leaves_nothing_made() {
        in_new_netns(|netns, mut nl| {
            // The second interface has an ingress qdisc of someone else's: the first's TAP and
            // qdiscs, made before, are undone too.
            nl.add_veth("eth0", "eth1").unwrap();
            let eth1 = index(&mut nl, "eth1").unwrap();
            nl.add_ingress_qdisc(eth1).unwrap();
            let err = format!("{:#}", mirror(&netns, &[]).unwrap_err());
            assert!(
                err.contains("cannot mirror interface eth1: eth1 has an ingress qdisc already"),
                "{err}"
            );
            assert_eq!(index(&mut nl, "tap0_hull"), None);
            assert_eq!(index(&mut nl, "tap1_hull"), None);
            let eth0 = index(&mut nl, "eth0").unwrap();
            assert!(!ingress(&mut nl, eth0));
            assert!(ingress(&mut nl, eth1), "the qdisc that was there stays");

            // More interfaces than NIC slots: refused before anything is made.
            nl.add_veth("a0", "a1").unwrap();
            nl.add_veth("b0", "b1").unwrap();
            let err = format!("{:#}", mirror(&netns, &[]).unwrap_err());
            assert!(
                err.contains("has 6 interfaces to mirror into the VM; a VM has 4 NIC slots"),
                "{err}"
            );
            assert!(nl
                .links()
                .unwrap()
                .iter()
                .all(|l| !l.name.ends_with("_hull")));
        });
    }
}
