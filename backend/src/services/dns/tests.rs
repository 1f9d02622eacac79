//! The DNS service over IPv4 and IPv6, driven with crafted queries.

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
