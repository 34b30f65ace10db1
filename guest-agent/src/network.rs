//! The guest's NICs: the host mirrors each interface of the container's network namespace onto
//! a TAP and puts it in one of the VM's NIC slots; here the slot's virtio-mmio device is bound
//! to its driver (a slot was a placeholder when the kernel probed it at boot), and the NIC it
//! becomes is given the mirrored interface's name, MTU and addresses, brought up, and the
//! routes added, all over netlink, in the container's network namespace (the NIC appears in
//! the agent's and is moved there).
//!
//! Everything in the request is checked before it is used; a NIC that is found is configured
//! again as asked (a repeated request is no error).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hull_netlink::{Link, Netlink, Route};
use hull_protocol::{parse_mac, ErrorKind, ErrorResponse, NetInterface, NetRoute, NetworkConfig};

/// Where a platform device is bound to the virtio-mmio driver, probing it again.
const BIND: &str = "/sys/bus/platform/drivers/virtio-mmio/bind";

/// For the NIC of a bound slot to be registered (the probe registers it before the write to
/// `bind` returns; this is a margin).
const NIC_DEADLINE: Duration = Duration::from_secs(5);

fn invalid(message: String) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::InvalidRequest, message)
}

fn failed(message: String) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::Io, message)
}

/// Brings up every interface of `config`, then adds its routes, in the network namespace
/// `target` (the container's) if given, else the agent's own. A slot's NIC appears in the
/// agent's namespace and is moved into `target` first.
pub fn configure(config: &NetworkConfig, target: Option<&File>) -> Result<(), ErrorResponse> {
    let checked = config
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, iface)| Checked::of(i, iface))
        .collect::<Result<Vec<_>, _>>()?;
    let routes = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| CheckedRoute::of(i, route))
        .collect::<Result<Vec<_>, _>>()?;
    let mut here = Netlink::open().map_err(|e| failed(e.to_string()))?;
    for iface in &checked {
        let already_there = match target {
            Some(target) => in_netns(target, || iface.find(&mut open()?))?.is_some(),
            None => false,
        };
        if already_there {
            continue;
        }
        let link = iface.arrive(&mut here)?;
        if let (Some(target), Some(link)) = (target, link) {
            here.move_link(link.index, target.as_raw_fd())
                .map_err(|e| iface.fail(error_chain(&e)))?;
        }
    }
    match target {
        Some(target) => in_netns(target, || configure_here(&checked, &routes)),
        None => configure_here(&checked, &routes),
    }
}

fn open() -> Result<Netlink, ErrorResponse> {
    Netlink::open().map_err(|e| failed(e.to_string()))
}

/// Runs `body` on a thread that has joined the network namespace `netns`.
fn in_netns<T: Send>(
    netns: &File,
    body: impl FnOnce() -> Result<T, ErrorResponse> + Send,
) -> Result<T, ErrorResponse> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    failed(format!(
                        "cannot join the container's network namespace: {e}"
                    ))
                })?;
                body()
            })
            .join()
            .unwrap_or_else(|_| Err(failed("the network thread panicked".into())))
    })
}

/// Names, sizes, brings up and addresses every interface, then adds the routes, in the calling
/// thread's network namespace.
fn configure_here(
    checked: &[Checked<'_>],
    routes: &[CheckedRoute<'_>],
) -> Result<(), ErrorResponse> {
    let mut nl = open()?;
    for iface in checked {
        iface.bring_up(&mut nl)?;
    }
    if routes.is_empty() {
        return Ok(());
    }
    let links = nl.links().map_err(|e| failed(e.to_string()))?;
    for route in routes {
        let Some(link) = links.iter().find(|l| l.name == route.interface) else {
            return Err(invalid(format!(
                "routes[{}].interface = {:?}: no such interface in the guest",
                route.at, route.interface
            )));
        };
        let wanted = Route {
            destination: route.destination,
            gateway: route.gateway,
            interface: link.index,
            kernel: false,
            metric: route.metric,
        };
        nl.add_route(&wanted)
            .map_err(|e| failed(format!("routes[{}]: {}", route.at, error_chain(&e))))?;
    }
    Ok(())
}

fn error_chain(err: &hull_netlink::Error) -> String {
    crate::error_chain(err)
}

/// An interface of the request, checked.
struct Checked<'a> {
    at: usize,
    iface: &'a NetInterface,
    mac: [u8; 6],
    addresses: Vec<(IpAddr, u8)>,
}

impl<'a> Checked<'a> {
    fn of(at: usize, iface: &'a NetInterface) -> Result<Self, ErrorResponse> {
        let field = |name: &str, value: &dyn std::fmt::Debug, why: &str| {
            invalid(format!("interfaces[{at}].{name} = {value:?}: {why}"))
        };
        let name = &iface.name;
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains(['/', '\0', ':'])
            || name.chars().any(char::is_whitespace)
            || name == "."
            || name == ".."
            || name == "lo"
        {
            return Err(field(
                "name",
                name,
                "not an interface name the guest can take (1 to 15 bytes, no '/', ':' or \
                 spaces, not lo)",
            ));
        }
        let mac = parse_mac(&iface.mac)
            .ok_or_else(|| field("mac", &iface.mac, "not a unicast MAC other than all zeros"))?;
        if iface.mtu < 68 {
            return Err(field("mtu", &iface.mtu, "below 68, the least IPv4 takes"));
        }
        let device = &iface.device;
        if !device.is_empty() && !is_slot_device(device) {
            return Err(field("device", device, "not a virtio-mmio.N device"));
        }
        let addresses = iface
            .addresses
            .iter()
            .enumerate()
            .map(|(i, cidr)| {
                parse_cidr(cidr).ok_or_else(|| {
                    invalid(format!(
                        "interfaces[{at}].addresses[{i}] = {cidr:?}: not ADDRESS/PREFIX"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            at,
            iface,
            mac,
            addresses,
        })
    }

    fn fail(&self, what: String) -> ErrorResponse {
        failed(format!(
            "interfaces[{}] ({}): {what}",
            self.at, self.iface.name
        ))
    }

    /// The NIC in the calling thread's namespace, binding its slot first if it is not there;
    /// `None` if it is not there and there is no slot to bind.
    fn arrive(&self, nl: &mut Netlink) -> Result<Option<Link>, ErrorResponse> {
        if let Some(link) = self.find(nl)? {
            return Ok(Some(link));
        }
        if self.iface.device.is_empty() {
            return Ok(None);
        }
        std::fs::write(BIND, &self.iface.device)
            .map_err(|e| self.fail(format!("cannot bind {} ({BIND}): {e}", self.iface.device)))?;
        let deadline = Instant::now() + NIC_DEADLINE;
        loop {
            if let Some(link) = self.find(nl)? {
                return Ok(Some(link));
            }
            if Instant::now() > deadline {
                return Err(self.fail(format!(
                    "{} was bound, but no NIC with MAC {} came within {} s",
                    self.iface.device,
                    self.iface.mac,
                    NIC_DEADLINE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Names the NIC, sets its MTU, brings it up and adds its addresses.
    fn bring_up(&self, nl: &mut Netlink) -> Result<(), ErrorResponse> {
        let Some(link) = self.find(nl)? else {
            return Err(self.fail(format!(
                "no NIC with MAC {} and no device to bind",
                self.iface.mac
            )));
        };
        let chain = |e: hull_netlink::Error| self.fail(error_chain(&e));
        if link.name != self.iface.name {
            if link.up {
                nl.set_link(link.index, None, None, Some(false))
                    .map_err(chain)?;
            }
            nl.set_link(link.index, Some(&self.iface.name), None, None)
                .map_err(|e| match e.errno() {
                    Some(libc::EEXIST) => self.fail(format!(
                        "cannot rename {} to {}: the guest has an interface of that name",
                        link.name, self.iface.name
                    )),
                    _ => chain(e),
                })?;
        }
        nl.set_link(
            link.index,
            None,
            Some(u32::from(self.iface.mtu)),
            Some(true),
        )
        .map_err(chain)?;
        for &(ip, prefix) in &self.addresses {
            match nl.add_address(link.index, ip, prefix) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => return Err(chain(e)),
            }
        }
        Ok(())
    }

    fn find(&self, nl: &mut Netlink) -> Result<Option<Link>, ErrorResponse> {
        let links = nl.links().map_err(|e| failed(e.to_string()))?;
        Ok(links.into_iter().find(|l| l.mac == Some(self.mac)))
    }
}

/// A route of the request, checked.
struct CheckedRoute<'a> {
    at: usize,
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    interface: &'a str,
    metric: Option<u32>,
}

impl<'a> CheckedRoute<'a> {
    fn of(at: usize, route: &'a NetRoute) -> Result<Self, ErrorResponse> {
        let destination = route
            .destination
            .as_deref()
            .map(|d| {
                parse_cidr(d).ok_or_else(|| {
                    invalid(format!(
                        "routes[{at}].destination = {d:?}: not ADDRESS/PREFIX"
                    ))
                })
            })
            .transpose()?;
        let gateway = route
            .gateway
            .as_deref()
            .map(|g| {
                g.parse::<IpAddr>().map_err(|_| {
                    invalid(format!("routes[{at}].gateway = {g:?}: not an IP address"))
                })
            })
            .transpose()?;
        if let (Some((dst, _)), Some(gw)) = (destination, gateway) {
            if dst.is_ipv4() != gw.is_ipv4() {
                return Err(invalid(format!(
                    "routes[{at}]: destination {dst} and gateway {gw} are of two IP versions"
                )));
            }
        }
        if destination.is_none() && gateway.is_none() {
            return Err(invalid(format!(
                "routes[{at}]: a default route needs a gateway"
            )));
        }
        Ok(Self {
            at,
            destination,
            gateway,
            interface: &route.interface,
            metric: route.metric,
        })
    }
}

/// `ADDRESS/PREFIX` with a prefix the address's version allows.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = text.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let most = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= most).then_some((ip, prefix))
}

/// `virtio-mmio.N`, the platform device of a command-line virtio-mmio device.
fn is_slot_device(name: &str) -> bool {
    name.strip_prefix("virtio-mmio.")
        .is_some_and(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, addresses: &[&str], device: &str) -> NetInterface {
        NetInterface {
            name: name.into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            tap: String::new(),
            device: device.into(),
        }
    }

    fn refused(config: NetworkConfig) -> String {
        configure(&config, None).unwrap_err().message
    }

    #[test]
    fn bad_fields_are_refused_naming_them() {
        let one = |iface| NetworkConfig {
            interfaces: vec![iface],
            routes: vec![],
        };
        let mac = "02:00:00:00:00:01";
        for (config, wanted) in [
            (one(iface("", mac, &[], "")), "interfaces[0].name = \"\""),
            (
                one(iface("lo", mac, &[], "")),
                "interfaces[0].name = \"lo\"",
            ),
            (
                one(iface("a/b", mac, &[], "")),
                "interfaces[0].name = \"a/b\"",
            ),
            (
                one(iface("eth0", "01:00:00:00:00:01", &[], "")),
                "interfaces[0].mac = \"01:00:00:00:00:01\"",
            ),
            (
                one(iface("eth0", mac, &["10.0.0.1/33"], "")),
                "interfaces[0].addresses[0] = \"10.0.0.1/33\"",
            ),
            (
                one(iface("eth0", mac, &[], "virtio-mmio.1/../../x")),
                "interfaces[0].device = \"virtio-mmio.1/../../x\"",
            ),
            (
                NetworkConfig {
                    interfaces: vec![],
                    routes: vec![NetRoute {
                        destination: None,
                        gateway: None,
                        interface: "eth0".into(),
                        metric: None,
                    }],
                },
                "routes[0]: a default route needs a gateway",
            ),
            (
                NetworkConfig {
                    interfaces: vec![],
                    routes: vec![NetRoute {
                        destination: Some("10.0.0.0/8".into()),
                        gateway: Some("fd00::1".into()),
                        interface: "eth0".into(),
                        metric: None,
                    }],
                },
                "two IP versions",
            ),
        ] {
            let message = refused(config);
            assert!(message.contains(wanted), "{message:?} lacks {wanted:?}");
        }
        let mut bad_mtu = iface("eth0", mac, &[], "");
        bad_mtu.mtu = 67;
        assert!(refused(one(bad_mtu)).contains("interfaces[0].mtu = 67"));
    }

    /// A TAP named `name` in the calling thread's network namespace, gone when the
    /// descriptor closes.
    #[allow(unsafe_code)]
    fn tap(name: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: a plain open of a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
        // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
        assert!(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } >= 0);
        fd
    }

    /// The agent's side against the kernel, in a network namespace of a thread of its own,
    /// with a TAP standing for the NIC a bound slot brings (found by its MAC).
    #[test]
    fn a_nic_found_by_its_mac_is_named_sized_addressed_and_routed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root, to make a network namespace");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let _fd = tap("hulltest0");
            let mut nl = Netlink::open().unwrap();
            let before = nl.link("hulltest0").unwrap().unwrap();
            let mac = hull_protocol::format_mac(&before.mac.unwrap());
            let config = NetworkConfig {
                interfaces: vec![iface("eth0", &mac, &["10.6.0.2/24"], "")],
                routes: vec![
                    NetRoute {
                        destination: None,
                        gateway: Some("10.6.0.1".into()),
                        interface: "eth0".into(),
                        metric: None,
                    },
                    NetRoute {
                        destination: Some("192.168.7.0/24".into()),
                        gateway: None,
                        interface: "eth0".into(),
                        metric: Some(5),
                    },
                ],
            };
            configure(&config, None).unwrap();
            // Again: no error, nothing doubled.
            configure(&config, None).unwrap();
            let after = nl
                .links()
                .unwrap()
                .into_iter()
                .find(|l| l.index == before.index)
                .unwrap();
            assert_eq!(
                (after.name.as_str(), after.mtu, after.up),
                ("eth0", 1500, true)
            );
            let addresses: Vec<_> = nl
                .addresses()
                .unwrap()
                .into_iter()
                .filter(|a| a.index == before.index && a.ip.is_ipv4())
                .map(|a| format!("{}/{}", a.ip, a.prefix))
                .collect();
            assert_eq!(addresses, ["10.6.0.2/24"]);
            let routes = nl.routes().unwrap();
            assert!(routes.iter().any(|r| r.destination.is_none()
                && r.gateway == Some("10.6.0.1".parse().unwrap())
                && r.interface == before.index));
            assert!(routes.iter().any(|r| r.destination
                == Some(("192.168.7.0".parse().unwrap(), 24))
                && r.metric == Some(5)));

            // A route through an interface the guest does not have.
            let mut bad = config.clone();
            bad.interfaces.clear();
            bad.routes[0].interface = "eth9".into();
            let err = configure(&bad, None).unwrap_err().message;
            assert!(
                err.contains("routes[0].interface = \"eth9\": no such interface"),
                "{err}"
            );
            // No NIC of that MAC, and no device to bind.
            let missing = NetworkConfig {
                interfaces: vec![iface("eth1", "02:00:00:00:00:99", &[], "")],
                routes: vec![],
            };
            let err = configure(&missing, None).unwrap_err().message;
            assert!(err.contains("no NIC with MAC 02:00:00:00:00:99"), "{err}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn slot_devices_and_cidrs_parse() {
        assert!(is_slot_device("virtio-mmio.0"));
        assert!(is_slot_device("virtio-mmio.12"));
        assert!(!is_slot_device("virtio-mmio."));
        assert!(!is_slot_device("virtio-mmio.1x"));
        assert!(!is_slot_device("../virtio-mmio.1"));
        assert_eq!(
            parse_cidr("172.17.0.2/16"),
            Some(("172.17.0.2".parse().unwrap(), 16))
        );
        assert_eq!(
            parse_cidr("fd00::2/64"),
            Some(("fd00::2".parse().unwrap(), 64))
        );
        assert_eq!(parse_cidr("fd00::2/129"), None);
        assert_eq!(parse_cidr("172.17.0.2"), None);
    }
}
