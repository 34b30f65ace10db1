//! Against the kernel, each test in a network namespace of its own thread (`unshare` of a
//! network namespace moves the calling thread alone), with TAPs made by `TUNSETIFF`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::*;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Runs `body` in a new network namespace on a thread of its own; `None` (skipped) without
/// root.
fn in_new_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root, to make a network namespace");
        return None;
    }
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        body()
    });
    Some(thread.join().expect("the test thread"))
}

/// A TAP named `name`, gone when the descriptor closes.
fn tap(name: &str) -> OwnedFd {
    // SAFETY: a plain open of a NUL-terminated path; the result is checked.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(raw >= 0, "open /dev/net/tun");
    // SAFETY: `raw` is a descriptor just opened and owned by nothing else.
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

fn link(nl: &mut Netlink, name: &str) -> Option<Link> {
    nl.links().unwrap().into_iter().find(|l| l.name == name)
}

#[test]
fn links_are_listed_renamed_resized_and_brought_up() {
    in_new_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let lo = link(&mut nl, "lo").expect("lo");
        assert!(lo.loopback && !lo.up);
        let _fd = tap("hulltest0");
        let before = link(&mut nl, "hulltest0").expect("the TAP");
        assert_eq!(before.kind.as_deref(), Some("tun"));
        assert!(before.mac.is_some() && !before.up);
        nl.set_link(before.index, Some("eth7"), Some(9000), None)
            .unwrap();
        nl.set_link(before.index, None, None, Some(true)).unwrap();
        let after = link(&mut nl, "eth7").expect("renamed");
        assert_eq!(
            (after.index, after.mtu, after.up),
            (before.index, 9000, true)
        );
        let err = nl
            .set_link(after.index, None, Some(100_000), None)
            .unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
        assert!(err.to_string().contains("MTU 100000"), "{err}");
    });
}

#[test]
fn addresses_and_routes_are_added_and_listed() {
    in_new_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let _fd = tap("hulltest0");
        let index = link(&mut nl, "hulltest0").unwrap().index;
        nl.set_link(index, None, None, Some(true)).unwrap();
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7));
        let v6 = IpAddr::V6("fd00:9::7".parse::<Ipv6Addr>().unwrap());
        nl.add_address(index, v4, 24).unwrap();
        nl.add_address(index, v6, 64).unwrap();
        let err = nl.add_address(index, v4, 24).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        let addresses: Vec<_> = nl
            .addresses()
            .unwrap()
            .into_iter()
            .filter(|a| a.index == index && !a.link_scope)
            .map(|a| (a.ip, a.prefix))
            .collect();
        assert!(addresses.contains(&(v4, 24)), "{addresses:?}");
        assert!(addresses.contains(&(v6, 64)), "{addresses:?}");
        let default = Route {
            destination: None,
            gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 9, 8, 1))),
            interface: index,
            kernel: false,
            metric: None,
        };
        let subnet = Route {
            destination: Some((IpAddr::V4(Ipv4Addr::new(192, 168, 50, 0)), 24)),
            gateway: None,
            interface: index,
            kernel: false,
            metric: Some(7),
        };
        nl.add_route(&default).unwrap();
        nl.add_route(&subnet).unwrap();
        // Again: replaced, not refused.
        nl.add_route(&default).unwrap();
        let routes = nl.routes().unwrap();
        assert!(routes.contains(&default), "{routes:?}");
        assert!(routes.contains(&subnet), "{routes:?}");
        assert!(
            routes
                .iter()
                .any(|r| r.kernel
                    && r.destination == Some((IpAddr::V4(Ipv4Addr::new(10, 9, 8, 0)), 24))),
            "the address's own subnet: {routes:?}"
        );
    });
}

#[test]
fn ingress_redirects_are_made_listed_and_removed_with_their_qdisc() {
    in_new_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let _a = tap("hulltest0");
        let _b = tap("hulltest1");
        let a = link(&mut nl, "hulltest0").unwrap().index;
        let b = link(&mut nl, "hulltest1").unwrap().index;
        let err = nl.add_redirect(a, b).unwrap_err();
        assert!(err.errno().is_some(), "a filter without a qdisc: {err}");
        nl.add_ingress_qdisc(a).unwrap();
        nl.add_ingress_qdisc(b).unwrap();
        let err = nl.add_ingress_qdisc(a).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        assert!(nl.qdiscs(a).unwrap().contains(&"ingress".to_owned()));
        nl.add_redirect(a, b).unwrap();
        nl.add_redirect(b, a).unwrap();
        assert_eq!(nl.redirects(a).unwrap(), [b]);
        assert_eq!(nl.redirects(b).unwrap(), [a]);
        nl.delete_ingress_qdisc(a).unwrap();
        assert!(!nl.qdiscs(a).unwrap().contains(&"ingress".to_owned()));
        let err = nl.redirects(a).map(|r| r.len());
        assert!(matches!(err, Ok(0) | Err(_)), "{err:?}");
        nl.add_veth("hullv0", "hullv1").unwrap();
        let v0 = link(&mut nl, "hullv0").expect("the veth");
        assert_eq!(v0.kind.as_deref(), Some("veth"));
        assert!(link(&mut nl, "hullv1").is_some(), "its peer");
        let err = nl.add_veth("hullv0", "hullv2").unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        nl.delete_link(b).unwrap_or_else(|e| panic!("{e}"));
        assert!(link(&mut nl, "hulltest1").is_none());
        let err = nl.delete_link(b).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
    });
}
