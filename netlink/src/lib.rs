//! A small synchronous rtnetlink client for hull: what it takes to mirror a network namespace's
//! interfaces onto TAPs on the host (links, addresses, routes, an ingress qdisc and a u32
//! filter with a mirred redirect on each side, as Kata does it), and to give the guest's NICs
//! their addresses and routes.
//!
//! One [`Netlink`] is one `NETLINK_ROUTE` socket in the network namespace of the thread that
//! opened it; each call sends one request and reads its answer (a dump, or the kernel's
//! acknowledgement) before it returns. Errors name what was asked and carry the kernel's errno.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `ETH_P_ALL`: a tc filter's protocol that matches every frame.
const ETH_P_ALL: u16 = 0x0003;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened, bound or used.
    #[error("netlink: {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the request.
    #[error("{what}")]
    Refused {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be read.
    #[error("{what}: {message}")]
    Protocol { what: String, message: String },
}

impl Error {
    /// The kernel's errno, if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address of an Ethernet-like link.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    /// The driver's kind (`veth`, `tun`, `macvlan`, `bridge`...), if it says.
    pub kind: Option<String>,
}

/// One address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
    /// Valid only on the link (an IPv6 `fe80::/10` address, say).
    pub link_scope: bool,
}

/// A unicast route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The destination network; `None` is the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// The interface it goes out of.
    pub interface: u32,
    /// Made by the kernel for an address's own subnet (it makes it again where the address is
    /// added).
    pub kernel: bool,
    pub metric: Option<u32>,
}

/// A `NETLINK_ROUTE` socket.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, Error> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| Error::Io { what, source }
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io("cannot open a socket"))?;
        socket.bind_auto().map_err(io("cannot bind the socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("cannot connect the socket to the kernel"))?;
        // Errors then come with the kernel's own message, where it gives one.
        let _ = socket.set_ext_ack(true);
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `message` and reads the answer: every message of a dump (`NLM_F_DUMP`), or none
    /// once the kernel acknowledged it.
    fn exchange(
        &mut self,
        what: &dyn Fn() -> String,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|source| Error::Io {
            what: format!("cannot send: {}", what()),
            source,
        })?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full().map_err(|source| Error::Io {
                what: format!("cannot receive the answer to: {}", what()),
                source,
            })?;
            let mut offset = 0;
            while offset < bytes.len() {
                let packet = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                    .map_err(|e| Error::Protocol {
                    what: what(),
                    message: format!("cannot read the kernel's answer: {e}"),
                })?;
                let length = packet.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length;
                if packet.header.sequence_number != self.seq {
                    continue;
                }
                match packet.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(err) => match err.code {
                        None if !dump => return Ok(answers),
                        None => {}
                        Some(code) => {
                            return Err(Error::Refused {
                                what: what(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            })
                        }
                    },
                    _ => {}
                }
            }
            if !dump && answers.is_empty() && flags & NLM_F_ACK == 0 {
                return Ok(answers);
            }
        }
    }

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let answers = self.exchange(
            &|| "list the interfaces".to_owned(),
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(link)),
                _ => None,
            })
            .collect())
    }

    /// The interface named `name`, if there is one.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, Error> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Every address, IPv4 and IPv6.
    pub fn addresses(&mut self) -> Result<Vec<Address>, Error> {
        let answers = self.exchange(
            &|| "list the addresses".to_owned(),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(address) => address_of(&address),
                _ => None,
            })
            .collect())
    }

    /// The unicast routes of the main table, IPv4 and IPv6, that go out of one interface.
    pub fn routes(&mut self) -> Result<Vec<Route>, Error> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut message = RouteMessage::default();
            message.header.address_family = family;
            let answers = self.exchange(
                &|| "list the routes".to_owned(),
                RouteNetlinkMessage::GetRoute(message),
                NLM_F_DUMP,
            )?;
            routes.extend(answers.into_iter().filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route) => route_of(&route),
                _ => None,
            }));
        }
        Ok(routes)
    }

    /// Renames an interface, sets its MTU, brings it up or down: what is `Some`.
    pub fn set_link(
        &mut self,
        index: u32,
        name: Option<&str>,
        mtu: Option<u32>,
        up: Option<bool>,
    ) -> Result<(), Error> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        if let Some(up) = up {
            message.header.change_mask = LinkFlags::Up;
            if up {
                message.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = name {
            message
                .attributes
                .push(LinkAttribute::IfName(name.to_owned()));
        }
        if let Some(mtu) = mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        let what = || {
            let mut parts = Vec::new();
            if let Some(name) = name {
                parts.push(format!("name {name}"));
            }
            if let Some(mtu) = mtu {
                parts.push(format!("MTU {mtu}"));
            }
            if let Some(up) = up {
                parts.push(if up { "up" } else { "down" }.to_owned());
            }
            format!("set interface {index}: {}", parts.join(", "))
        };
        self.exchange(&what, RouteNetlinkMessage::SetLink(message), NLM_F_ACK)
            .map(drop)
    }

    /// Makes a veth pair, `name` and `peer`, both here.
    pub fn add_veth(&mut self, name: &str, peer: &str) -> Result<(), Error> {
        let mut peer_message = LinkMessage::default();
        peer_message
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
        ]));
        self.exchange(
            &|| format!("add veth pair {name}/{peer}"),
            RouteNetlinkMessage::NewLink(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Moves an interface into the network namespace of the open namespace file `netns`.
    pub fn move_link(&mut self, index: u32, netns: std::os::fd::RawFd) -> Result<(), Error> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes.push(LinkAttribute::NetNsFd(netns));
        self.exchange(
            &|| format!("move interface {index} into the container's network namespace"),
            RouteNetlinkMessage::SetLink(message),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// Deletes an interface.
    pub fn delete_link(&mut self, index: u32) -> Result<(), Error> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.exchange(
            &|| format!("delete interface {index}"),
            RouteNetlinkMessage::DelLink(message),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// Adds `ip/prefix` to an interface.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), Error> {
        let mut message = AddressMessage::default();
        message.header.family = family_of(ip);
        message.header.prefix_len = prefix;
        message.header.index = index;
        message.header.scope = AddressScope::Universe;
        if ip.is_ipv4() {
            message.attributes.push(AddressAttribute::Local(ip));
        }
        message.attributes.push(AddressAttribute::Address(ip));
        self.exchange(
            &|| format!("add address {ip}/{prefix} to interface {index}"),
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Adds a route to the main table (replacing one to the same destination).
    pub fn add_route(&mut self, route: &Route) -> Result<(), Error> {
        let (dst, prefix) = match route.destination {
            Some((ip, prefix)) => (Some(ip), prefix),
            None => (None, 0),
        };
        let family = match (dst, route.gateway) {
            (Some(ip), _) | (None, Some(ip)) => family_of(ip),
            (None, None) => AddressFamily::Inet,
        };
        let mut message = RouteMessage::default();
        message.header.address_family = family;
        message.header.destination_prefix_length = prefix;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = match route.gateway {
            Some(_) => RouteScope::Universe,
            None => RouteScope::Link,
        };
        message.header.kind = RouteType::Unicast;
        if let Some(ip) = dst {
            message
                .attributes
                .push(RouteAttribute::Destination(route_address(ip)));
        }
        if let Some(gateway) = route.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(route_address(gateway)));
        }
        message
            .attributes
            .push(RouteAttribute::Oif(route.interface));
        if let Some(metric) = route.metric {
            message.attributes.push(RouteAttribute::Priority(metric));
        }
        let what = || {
            let to = match route.destination {
                Some((ip, prefix)) => format!("{ip}/{prefix}"),
                None => "default".to_owned(),
            };
            let via = route
                .gateway
                .map(|g| format!(" via {g}"))
                .unwrap_or_default();
            format!("add route {to}{via} on interface {}", route.interface)
        };
        self.exchange(
            &what,
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Adds the ingress qdisc to an interface (refused with `EEXIST` if it has one).
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), Error> {
        self.exchange(
            &|| format!("add an ingress qdisc to interface {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Deletes an interface's ingress qdisc, and with it its filters.
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> Result<(), Error> {
        self.exchange(
            &|| format!("delete the ingress qdisc of interface {index}"),
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// Redirects every frame arriving on interface `from` out of interface `to`: on `from`'s
    /// ingress qdisc, a u32 filter matching everything (one key, mask 0) whose action is a
    /// mirred egress redirect, which steals the frame (`tc filter add dev FROM parent ffff:
    /// protocol all u32 match u8 0 0 action mirred egress redirect dev TO`).
    pub fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), Error> {
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        mirror.generic = TcActionGeneric::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_owned()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        let mut message = TcMessage::default();
        message.header.index = from as i32;
        message.header.parent = TcHandle {
            major: u16::MAX,
            minor: 0,
        };
        // Priority 1, protocol ETH_P_ALL in network byte order.
        message.header.info = u32::from(TcHandle {
            major: 1,
            minor: ETH_P_ALL.to_be(),
        });
        message
            .attributes
            .push(TcAttribute::Kind(TcFilterU32::KIND.to_owned()));
        message.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.exchange(
            &|| format!("redirect interface {from}'s ingress to interface {to}"),
            RouteNetlinkMessage::NewTrafficFilter(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// The kinds of interface `index`'s qdiscs (`ingress`, `noqueue`, `fq_codel`...).
    pub fn qdiscs(&mut self, index: u32) -> Result<Vec<String>, Error> {
        let answers = self.exchange(
            &|| "list the qdiscs".to_owned(),
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == index as i32 => {
                    q.attributes.into_iter().find_map(|a| match a {
                        TcAttribute::Kind(kind) => Some(kind),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The ifindexes that interface `index`'s ingress filters redirect to.
    pub fn redirects(&mut self, index: u32) -> Result<Vec<u32>, Error> {
        let mut message = TcMessage::default();
        message.header.index = index as i32;
        message.header.parent = TcHandle {
            major: u16::MAX,
            minor: 0,
        };
        let answers = self.exchange(
            &|| format!("list the ingress filters of interface {index}"),
            RouteNetlinkMessage::GetTrafficFilter(message),
            NLM_F_DUMP,
        )?;
        let mut targets = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewTrafficFilter(filter) = answer else {
                continue;
            };
            for attribute in &filter.attributes {
                let TcAttribute::Options(options) = attribute else {
                    continue;
                };
                for option in options {
                    let TcOption::U32(TcFilterU32Option::Action(actions)) = option else {
                        continue;
                    };
                    for action in actions {
                        for attribute in &action.attributes {
                            let TcActionAttribute::Options(options) = attribute else {
                                continue;
                            };
                            for option in options {
                                if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) =
                                    option
                                {
                                    targets.push(m.ifindex);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(targets)
    }
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut message = TcMessage::default();
    message.header.index = index as i32;
    message.header.handle = TcHandle {
        major: u16::MAX,
        minor: 0,
    };
    message.header.parent = TcHandle::INGRESS;
    message
        .attributes
        .push(TcAttribute::Kind("ingress".to_owned()));
    message
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(ip) => RouteAddress::Inet(ip),
        IpAddr::V6(ip) => RouteAddress::Inet6(ip),
    }
}

fn link_of(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
        loopback: message.header.flags.contains(LinkFlags::Loopback),
        kind: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn address_of(message: &AddressMessage) -> Option<Address> {
    // IFA_LOCAL is the interface's own address on a point-to-point link, where IFA_ADDRESS is
    // the peer's; elsewhere they are the same.
    let mut ip = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(local) => ip = Some(*local),
            AddressAttribute::Address(address) if ip.is_none() => ip = Some(*address),
            _ => {}
        }
    }
    Some(Address {
        index: message.header.index,
        ip: ip?,
        prefix: message.header.prefix_len,
        link_scope: message.header.scope == AddressScope::Link,
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn route_of(message: &RouteMessage) -> Option<Route> {
    if message.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(message.header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut interface = None;
    let mut metric = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => destination = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Oif(i) => interface = Some(*i),
            RouteAttribute::Priority(p) => metric = Some(*p),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    Some(Route {
        destination: destination.map(|ip| (ip, message.header.destination_prefix_length)),
        gateway,
        interface: interface?,
        kernel: message.header.protocol == RouteProtocol::Kernel,
        metric,
    })
}

#[cfg(test)]
mod tests;
