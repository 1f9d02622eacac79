//! The gateway's DNS service: local names (the network's `dns.hosts`, named static DHCP hosts,
//! DHCP clients that sent a host name) are answered by `vunet_dhcp::dns` (pure); everything
//! else is forwarded upstream (`forwarder`), over UDP or, for answers that do not fit a
//! datagram, over TCP (`tcp`).
//!
//! With `gateway6` the gateway answers UDP queries on its global and link-local IPv6 addresses
//! too (forwarded ones included: the answer goes back over IPv6), and the zone has IPv6
//! names: `dns.hosts` with IPv6 addresses, named `[network.dhcp6]` hosts, and every DHCP
//! client's name at the SLAAC address its MAC forms under the gateway's /64 (a Linux guest's
//! default). DNS over TCP listens on the IPv6 addresses too.

mod forwarder;
mod tcp;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vunet_dhcp::dns::{DnsAction, LocalZone};
use vunet_dhcp::server::RESERVED_NAMES;
use vunet_dhcp::DhcpServer;
use vunet_switch::gateway::{build_udp, slaac, udp_datagram, Gateway, Gateway6};
use vunet_switch::udp6::{build_udp6, udp6_datagram};
use vunet_switch::Mac;

pub use forwarder::{resolv_conf_servers, Forwarder, QUERY_TIMEOUT};
pub use tcp::DnsTcp;

use crate::datapath::{unix_now, GatewayCx, GatewayService, Handled, Port};

/// The DNS service of one network.
pub struct DnsService {
    pub domain: Option<String>,
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Configured names with IPv6 addresses: `dns.hosts` ones, then named `[network.dhcp6]`
    /// hosts.
    pub hosts6: Vec<(String, Ipv6Addr)>,
    pub forwarder: Option<Arc<Forwarder>>,
    /// The resolvers asked for names outside the network (over UDP and over TCP).
    pub upstreams: Vec<SocketAddr>,
    /// DNS over TCP, for answers that do not fit a datagram.
    pub tcp: Arc<DnsTcp>,
}

impl DnsService {
    pub fn new(network: &str, cfg: &crate::config::DnsConfig) -> DnsService {
        let upstreams = match &cfg.forwarders {
            Some(f) => f.clone(),
            None => resolv_conf_servers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        };
        let forwarder = match Forwarder::new(upstreams.clone()) {
            Ok(Some(f)) => {
                info!(network = %network, "DNS: names outside the network are forwarded to {upstreams:?}");
                Some(Arc::new(f))
            }
            Ok(None) => {
                info!(network = %network, "DNS: no upstream resolver; names outside the network are refused");
                None
            }
            Err(e) => {
                warn!(network = %network, "DNS: cannot open the forwarding socket ({e}); names outside the network are refused");
                None
            }
        };
        let upstreams = if forwarder.is_some() { upstreams.into_iter().filter(|a| a.is_ipv4()).collect() } else { Vec::new() };
        DnsService {
            domain: cfg.domain.clone(),
            hosts: cfg.hosts.clone(),
            hosts6: cfg.hosts6.clone(),
            forwarder,
            upstreams,
            tcp: Default::default(),
        }
    }
}

impl DnsService {
    /// The names the gateway answers for right now: `dns.hosts`, named static DHCP hosts, and
    /// DHCP clients that sent a host name. The DHCP server gives a client's name to one lease
    /// only and never a configured one; a lease name that still collides (none should) is
    /// left out, so configured names always win.
    ///
    /// IPv6 (with `gw6`): the configured IPv6 names, and each DHCP client's name (static or
    /// leased) at the SLAAC address of its MAC under the gateway's prefix if that is a /64,
    /// unless the name has a configured IPv6 address.
    pub fn zone(&self, dhcp: Option<&Mutex<DhcpServer>>, gw: &Gateway, gw6: Option<&Gateway6>) -> LocalZone {
        let mut names: Vec<(String, Ipv4Addr)> = self.hosts.clone();
        let mut names6: Vec<(String, Ipv6Addr)> = self.hosts6.clone();
        let slaac_prefix = gw6.filter(|g| g.prefix == 64).map(|g| g.ip);
        if let Some(dhcp) = dhcp {
            let server = dhcp.lock().unwrap_or_else(|e| e.into_inner());
            let mut macs: Vec<(String, Mac)> = Vec::new();
            for h in &server.config().hosts {
                if let Some(n) = &h.name {
                    names.push((n.clone(), h.ip));
                    macs.push((n.to_ascii_lowercase(), h.mac));
                }
            }
            let configured: HashSet<String> = names.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
            for l in server.leases(unix_now()) {
                let Some(n) = l.hostname else { continue };
                if !configured.contains(&n) && !RESERVED_NAMES.contains(&n.as_str()) {
                    names.push((n.clone(), l.ip));
                    macs.push((n, l.mac));
                }
            }
            if let Some(prefix) = slaac_prefix {
                let configured6: HashSet<String> = names6.iter().map(|(n, _)| n.clone()).collect();
                names6.extend(macs.into_iter().filter(|(n, _)| !configured6.contains(n)).map(|(n, mac)| (n, slaac(prefix, &mac))));
            }
        }
        LocalZone { domain: self.domain.clone(), names, subnet: (gw.ip, gw.prefix), names6, subnet6: gw6.map(|g| (g.ip, g.prefix)) }
    }
}

/// DNS over UDP to port 53 of the gateway: answered at once into the reply, or forwarded
/// upstream (the answer comes later, from the forwarder's thread).
impl GatewayService for DnsService {
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let gw = cx.gateway;
        if frame.len() >= 14 && frame[12..14] == [0x86, 0xdd] {
            return self.handle6(cx, port, frame, reply);
        }
        // Queries to the gateway's own address only: one to another server through the
        // gateway's MAC (socket NAT, a router) is for that server.
        if frame[0..6] != gw.mac || frame.len() < 34 || frame[30..34] != gw.ip.octets() {
            return Handled::NotMine;
        }
        let Some((client_ip, client_port, query)) = udp_datagram(frame, vunet_dhcp::dns::PORT) else { return Handled::NotMine };
        let client_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let answer = match self.zone(cx.dhcp, gw, cx.gateway6).respond(query) {
            Some(DnsAction::Answer(a)) => a,
            Some(DnsAction::Forward) => match &self.forwarder {
                Some(f) => {
                    f.forward(query, port.id, client_mac, (gw.ip.into(), client_ip.into()), client_port);
                    return Handled::Consumed;
                }
                None => vunet_dhcp::dns::refused(query),
            },
            None => return Handled::NotMine,
        };
        match build_udp(reply, gw.mac, client_mac, gw.ip, client_ip, vunet_dhcp::dns::PORT, client_port, &answer) {
            true => Handled::Reply,
            false => Handled::Consumed,
        }
    }
}

impl DnsService {
    /// A query over UDP to one of the gateway's IPv6 addresses (global or link-local), sent to
    /// the gateway's MAC: answered from that address, or forwarded (the answer comes back from
    /// it later).
    fn handle6(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let (gw, Some(gw6)) = (cx.gateway, cx.gateway6) else { return Handled::NotMine };
        if frame[0..6] != gw6.mac {
            return Handled::NotMine;
        }
        let Some(d) = udp6_datagram(frame, vunet_dhcp::dns::PORT) else { return Handled::NotMine };
        if !gw6.is_mine(&d.dst) {
            return Handled::NotMine;
        }
        let client_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let answer = match self.zone(cx.dhcp, gw, Some(gw6)).respond(d.payload) {
            Some(DnsAction::Answer(a)) => a,
            Some(DnsAction::Forward) => match &self.forwarder {
                Some(f) => {
                    f.forward(d.payload, port.id, client_mac, (IpAddr::V6(d.dst), IpAddr::V6(d.src)), d.sport);
                    return Handled::Consumed;
                }
                None => vunet_dhcp::dns::refused(d.payload),
            },
            None => return Handled::NotMine,
        };
        match build_udp6(reply, gw6.mac, client_mac, d.dst, d.src, vunet_dhcp::dns::PORT, d.sport, &answer) {
            true => Handled::Reply,
            false => Handled::Consumed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DnsConfig;
    use crate::datapath::PortKind;
    use etherparse::PacketBuilder;
    use vunet_dhcp::dns::{build_query, ip6_arpa, read_answers_all, QTYPE_A, QTYPE_AAAA, QTYPE_PTR};
    use vunet_dhcp::{Lease, ServerConfig, StaticHost};
    use vunet_switch::gateway::{gateway_mac, link_local};
    use vunet_switch::udp6::udp6_datagram;
    use vunet_switch::vnet::VnetHeader;

    const GUEST: Mac = [0x52, 0x54, 0, 0, 0, 0x20];
    const STATIC: Mac = [0x52, 0x54, 0, 0, 0, 0x30];
    const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0x5054, 0xff, 0xfe00, 0x20);

    fn gw() -> (Gateway, Gateway6) {
        let mac = gateway_mac("t");
        (Gateway { mac, ip: Ipv4Addr::new(10, 0, 0, 1), prefix: 24 }, Gateway6::new(mac, "fd00:7675:1::1".parse().unwrap(), 64))
    }

    /// No upstream (names outside are refused); `db6` at an IPv6 address, `db4` at an IPv4
    /// one; a static DHCP host "stat" and a client "guest" that leased with its name.
    fn service() -> (DnsService, Mutex<DhcpServer>) {
        let cfg = DnsConfig {
            domain: Some("lab".into()),
            hosts: vec![("db4".into(), Ipv4Addr::new(10, 0, 0, 4))],
            hosts6: vec![("db6".into(), "fd00:7675:1::6".parse().unwrap())],
            forwarders: Some(vec![]),
        };
        let dns = DnsService::new("t", &cfg);
        let mut dhcp = DhcpServer::new(ServerConfig {
            server_ip: Ipv4Addr::new(10, 0, 0, 1),
            prefix: 24,
            range: (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 200)),
            hosts: vec![StaticHost { mac: STATIC, ip: Ipv4Addr::new(10, 0, 0, 30), name: Some("stat".into()) }],
            lease_secs: 3600,
            router: false,
            dns: None,
            domain: None,
            mtu: None,
        });
        let lease = Lease { mac: GUEST, ip: Ipv4Addr::new(10, 0, 0, 120), expires: u64::MAX, hostname: Some("guest".into()) };
        assert_eq!(dhcp.restore(&[lease], unix_now()), 1);
        (dns, Mutex::new(dhcp))
    }

    /// Sends `query` over UDP/IPv6 from the guest's SLAAC address to `to` (the gateway's
    /// MAC); the answer's payload, from which address it came.
    fn ask6(dns: &DnsService, dhcp: &Mutex<DhcpServer>, to: Ipv6Addr, query: &[u8]) -> Option<(Ipv6Addr, Vec<u8>)> {
        let (gw, gw6) = gw();
        let mut f = Vec::new();
        PacketBuilder::ethernet2(GUEST, gw.mac).ipv6(GUEST6.octets(), to.octets(), 64).udp(4000, 53).write(&mut f, query).unwrap();
        let cx = GatewayCx { network: "t", gateway: &gw, gateway6: Some(&gw6), dhcp: Some(dhcp), hdr: &VnetHeader::default() };
        let port = Port::new(0, "p0", PortKind::Vhost);
        let mut reply = Vec::new();
        match dns.handle(&cx, &port, &f, &mut reply) {
            Handled::Reply => {
                assert_eq!(reply[0..6], GUEST);
                let d = udp6_datagram(&reply, 4000).expect("a UDP/IPv6 answer");
                assert_eq!((d.dst, d.sport), (GUEST6, 53));
                Some((d.src, d.payload.to_vec()))
            }
            _ => None,
        }
    }

    #[test]
    fn the_gateway_answers_aaaa_and_ip6_arpa_over_ipv6() {
        let (dns, dhcp) = service();
        let (_, gw6) = gw();
        let slaac_of = |mac: &Mac| slaac(gw6.ip, mac);
        for to in [gw6.ip, gw6.link_local] {
            // A DHCP client's name: its SLAAC address; a static host's too; an IPv6 host's.
            for (name, want) in [("guest", slaac_of(&GUEST)), ("stat.lab", slaac_of(&STATIC)), ("db6", "fd00:7675:1::6".parse().unwrap())] {
                let (from, a) = ask6(&dns, &dhcp, to, &build_query(1, name, QTYPE_AAAA)).unwrap();
                assert_eq!(from, to, "answered from the address asked");
                let (rcode, _, aaaa, _) = read_answers_all(&a).unwrap();
                assert_eq!((rcode, aaaa), (0, vec![want]), "{name} via {to}");
            }
            // An IPv4-only name: no data; nobody: NXDOMAIN; the IPv4 side still answers A.
            let (_, a) = ask6(&dns, &dhcp, to, &build_query(1, "db4", QTYPE_AAAA)).unwrap();
            assert_eq!(read_answers_all(&a).map(|(r, _, aaaa, _)| (r, aaaa.len())), Some((0, 0)));
            let (_, a) = ask6(&dns, &dhcp, to, &build_query(1, "nosuch", QTYPE_AAAA)).unwrap();
            assert_eq!(read_answers_all(&a).map(|(r, ..)| r), Some(3));
            let (_, a) = ask6(&dns, &dhcp, to, &build_query(1, "guest", QTYPE_A)).unwrap();
            assert_eq!(read_answers_all(&a).map(|(r, a, ..)| (r, a)), Some((0, vec![Ipv4Addr::new(10, 0, 0, 120)])));
            // Reverse: the SLAAC address names the guest.
            let (_, a) = ask6(&dns, &dhcp, to, &build_query(1, &ip6_arpa(slaac_of(&GUEST)), QTYPE_PTR)).unwrap();
            assert_eq!(read_answers_all(&a).map(|(r, .., ptr)| (r, ptr)), Some((0, vec!["guest.lab".to_string()])));
            // Outside the network, without an upstream: refused, over IPv6.
            let (_, a) = ask6(&dns, &dhcp, to, &build_query(1, "example.org", QTYPE_AAAA)).unwrap();
            assert_eq!(a[3] & 0xf, 5);
        }
        // Not the gateway's address: not the DNS service's.
        assert_eq!(ask6(&dns, &dhcp, "fd00:7675:1::99".parse().unwrap(), &build_query(1, "guest", QTYPE_AAAA)), None);
        assert_ne!(link_local(&GUEST), gw6.link_local);
    }

    #[test]
    fn without_a_64_prefix_dhcp_clients_get_no_slaac_name() {
        let (dns, dhcp) = service();
        let (gw, mut gw6) = gw();
        gw6.prefix = 80;
        let zone = dns.zone(Some(&dhcp), &gw, Some(&gw6));
        assert_eq!(zone.names6, vec![("db6".to_string(), "fd00:7675:1::6".parse().unwrap())]);
        let zone = dns.zone(Some(&dhcp), &gw, None);
        assert_eq!(zone.subnet6, None);
    }
}
