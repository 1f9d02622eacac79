use super::*;
use crate::arp::QUEUE_PER_NEIGHBOR;
use crate::firewall::{Action, Proto, Rule};
use etherparse::PacketBuilder;

const GW_MAC: Mac = [2, 0x76, 0x75, 0, 0, 1];
const UP_MAC: Mac = [2, 0x76, 0x75, 0, 0, 2];
const GUEST_MAC: Mac = [0x52, 0x54, 0, 0, 0, 10];
const LAN_MAC: Mac = [0x52, 0x54, 0, 0, 0, 99];

fn a(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn guest() -> Ipv6Addr {
    a("fd00:7675:1::10")
}
fn uplink_ip() -> Ipv6Addr {
    a("2001:db8:77::50")
}
fn lan_router() -> Ipv6Addr {
    a("2001:db8:77::1")
}
fn lan_host() -> Ipv6Addr {
    a("2001:db8:77::9")
}
fn far() -> Ipv6Addr {
    a("2001:db8:99::1")
}

fn router(mode: RouteMode) -> Router6 {
    Router6::new(Router6Config {
        mode,
        inside: Gateway6::new(GW_MAC, a("fd00:7675:1::1"), 64),
        outside_mac: UP_MAC,
        outside: (uplink_ip(), 64),
        next_hop: Some(lan_router()),
        proxy_ndp: false,
        inside_mtu: 1500,
        outside_mtu: 1500,
        firewall: vec![
            Rule { action: Action::Reject, proto: Proto::Tcp, ports: Some((22, 22)), from: None, to: None },
            Rule { action: Action::Deny, proto: Proto::Tcp, ports: Some((23, 23)), from: None, to: None },
            // An IPv4 rule never matches IPv6.
            Rule { action: Action::Deny, proto: Proto::Any, ports: None, from: Some(("10.0.0.0".parse().unwrap(), 8)), to: None },
        ],
        firewall_default: Action::Allow,
    })
}

#[allow(clippy::too_many_arguments)]
fn udp(src_mac: Mac, dst_mac: Mac, src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, hop: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src.octets(), dst.octets(), hop)
        .udp(sport, dport)
        .write(&mut f, &vec![7u8; len])
        .unwrap();
    f
}

fn tcp_syn(src_mac: Mac, dst_mac: Mac, src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 100)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    f
}

fn echo(src_mac: Mac, dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_echo_request(9, 1)
        .write(&mut f, b"ping")
        .unwrap();
    f
}

/// An NS from the LAN for `target`, to its solicited-node group.
fn lan_ns(target: Ipv6Addr) -> Vec<u8> {
    let mut f = Vec::new();
    build_ns(&mut f, LAN_MAC, &lan_router(), &target);
    f
}

/// The LAN router's NA for itself, to the router's uplink address.
fn lan_na(target: Ipv6Addr) -> Vec<u8> {
    let mut f = Vec::new();
    start_icmpv6(&mut f, LAN_MAC, UP_MAC, &target, &uplink_ip(), 255, 32);
    f.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0, NA_SOLICITED | NA_OVERRIDE, 0, 0, 0]);
    f.extend_from_slice(&target.octets());
    f.extend_from_slice(&[OPT_TARGET_LL, 1]);
    f.extend_from_slice(&LAN_MAC);
    finish_icmpv6(&mut f);
    f
}

fn icmp_type(frame: &[u8]) -> Option<(u8, u8)> {
    let p = ipv6::parse(frame).ok()?;
    (p.proto == IPPROTO_ICMPV6 && ipv6::icmpv6_checksum_ok(&p.src, &p.dst, p.payload)).then(|| (p.payload[0], p.payload[1]))
}

fn hop(frame: &[u8]) -> u8 {
    frame[ETH + 7]
}

/// The router has asked for `target` on the uplink; the LAN answers.
fn lan_answers(r: &mut Router6, target: Ipv6Addr, emit: &mut Vec<Emit>) {
    let ns = emit.iter().find(|e| {
        e.to == Side::Uplink && matches!(parse_nd(&e.frame), Ok(Some(nd)) if nd.kind == ND_NEIGHBOR_SOLICIT && nd.target == target)
    });
    let ns = ns.expect("the router solicits the next hop");
    assert_eq!(&ns.frame[0..6], &multicast_mac(&solicited_node(&target)), "to its solicited-node group");
    emit.clear();
    let mut na = lan_na(target);
    assert_eq!(r.from_uplink(&mut na, &VnetHeader::default(), 1, emit), Ok(Verdict::Consumed));
}

#[test]
fn forwards_both_ways_with_the_hop_limit_decremented() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    let mut f = udp(GUEST_MAC, GW_MAC, guest(), 4000, far(), 53, 64, 20);
    assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed), "waits for the next hop");
    lan_answers(&mut r, lan_router(), &mut emit);
    assert_eq!(emit.len(), 1, "the waiting frame is released");
    let out = &emit[0];
    assert_eq!((out.to, &out.frame[0..6], &out.frame[6..12], hop(&out.frame)), (Side::Uplink, &LAN_MAC[..], &UP_MAC[..], 63));
    assert_eq!(ipv6::parse(&out.frame).unwrap().src, guest(), "routed, not translated");
    emit.clear();
    let mut f2 = udp(GUEST_MAC, GW_MAC, guest(), 4000, far(), 53, 64, 20);
    assert_eq!(r.from_guest(0, &mut f2, &VnetHeader::default(), 2, &mut emit), Ok(Verdict::Forward(Side::Uplink)));
    // The way back: the guest is known from its own packets.
    let mut back = udp(LAN_MAC, UP_MAC, far(), 53, guest(), 4000, 50, 20);
    assert_eq!(r.from_uplink(&mut back, &VnetHeader::default(), 3, &mut emit), Ok(Verdict::Forward(Side::Guests)));
    assert_eq!((&back[0..6], &back[6..12], hop(&back)), (&GUEST_MAC[..], &GW_MAC[..], 49));
    assert!(emit.is_empty());
    // An address on the uplink's prefix is its own next hop.
    let mut f3 = udp(GUEST_MAC, GW_MAC, guest(), 4000, lan_host(), 53, 64, 20);
    assert_eq!(r.from_guest(0, &mut f3, &VnetHeader::default(), 4, &mut emit), Ok(Verdict::Consumed));
    assert!(emit.iter().any(|e| matches!(parse_nd(&e.frame), Ok(Some(nd)) if nd.target == lan_host() && nd.src == uplink_ip())));
}

#[test]
fn an_unknown_guest_is_solicited_and_its_advertisement_releases_the_frame() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    let mut f = udp(LAN_MAC, UP_MAC, far(), 53, guest(), 4000, 64, 20);
    assert_eq!(r.from_uplink(&mut f, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
    let ns = emit.pop().expect("a solicitation to the guests");
    assert_eq!(ns.to, Side::Guests);
    let nd = parse_nd(&ns.frame).unwrap().unwrap();
    assert_eq!((nd.target, nd.src), (guest(), r.cfg.inside.link_local));
    let mut na = Vec::new();
    start_icmpv6(&mut na, GUEST_MAC, GW_MAC, &guest(), &r.cfg.inside.link_local, 255, 32);
    na.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0, NA_SOLICITED | NA_OVERRIDE, 0, 0, 0]);
    na.extend_from_slice(&guest().octets());
    na.extend_from_slice(&[OPT_TARGET_LL, 1]);
    na.extend_from_slice(&GUEST_MAC);
    finish_icmpv6(&mut na);
    r.guest_nd(0, &na, 1, &mut emit);
    assert_eq!(emit.len(), 1);
    assert_eq!((emit[0].to, &emit[0].frame[0..6], hop(&emit[0].frame)), (Side::Guests, &GUEST_MAC[..], 63));
}

#[test]
fn hop_limit_one_gets_time_exceeded_and_no_route_gets_unreachable() {
    let mut r = router(RouteMode::Nat);
    let mut emit = Vec::new();
    let mut f = udp(GUEST_MAC, GW_MAC, guest(), 4000, far(), 33434, 1, 20);
    assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::TtlExceeded));
    let e = emit.pop().unwrap();
    assert_eq!((e.to, &e.frame[0..6], icmp_type(&e.frame)), (Side::Guests, &GUEST_MAC[..], Some((ICMP6_TIME_EXCEEDED, 0))));
    let p = ipv6::parse(&e.frame).unwrap();
    assert_eq!((p.src, p.dst), (r.cfg.inside.ip, guest()));
    assert_eq!(&p.payload[8..8 + 40], &f[ETH..ETH + 40], "quotes the packet");
    // From the LAN too.
    let mut f = udp(LAN_MAC, UP_MAC, far(), 53, guest(), 4000, 1, 20);
    assert_eq!(r.from_uplink(&mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::Firewall), "nat: not a reply");
    r.cfg.next_hop = None;
    let mut f = udp(GUEST_MAC, GW_MAC, guest(), 4000, far(), 53, 64, 20);
    assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::NoRoute));
    assert_eq!(icmp_type(&emit.pop().unwrap().frame), Some((ICMP6_DEST_UNREACH, UNREACH6_NO_ROUTE)));
}

#[test]
fn too_big_packets_get_packet_too_big_with_the_mtu() {
    let mut r = router(RouteMode::Route);
    r.cfg.outside_mtu = 1280;
    let mut emit = Vec::new();
    let mut f = udp(GUEST_MAC, GW_MAC, guest(), 4000, far(), 53, 64, 1400);
    assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::PacketTooBig));
    let e = emit.pop().unwrap();
    assert_eq!(icmp_type(&e.frame), Some((ICMP6_PACKET_TOO_BIG, 0)));
    let p = ipv6::parse(&e.frame).unwrap();
    assert_eq!(u32::from_be_bytes(p.payload[4..8].try_into().unwrap()), 1280);
    assert!(e.frame.len() - ETH <= 1280, "the error fits the minimum MTU");
    // One that fits goes.
    let mut ok = udp(GUEST_MAC, GW_MAC, guest(), 4000, far(), 53, 64, 1200);
    assert_eq!(r.from_guest(0, &mut ok, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
    // Inbound against the network's MTU.
    r.cfg.inside_mtu = 1300;
    let mut big = udp(LAN_MAC, UP_MAC, far(), 53, guest(), 4000, 64, 1400);
    emit.clear();
    assert_eq!(r.from_uplink(&mut big, &VnetHeader::default(), 0, &mut emit), Err(DropReason::PacketTooBig));
    let e = emit.pop().expect("an error back to the LAN hop that sent it");
    assert_eq!((e.to, &e.frame[0..6], icmp_type(&e.frame)), (Side::Uplink, &LAN_MAC[..], Some((ICMP6_PACKET_TOO_BIG, 0))));
    assert_eq!(ipv6::parse(&e.frame).unwrap().src, uplink_ip());
}

#[test]
fn solicitations_for_the_router_are_answered_and_the_prefix_only_with_nd_proxy() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    for target in [uplink_ip(), r.outside_link_local()] {
        let mut ns = lan_ns(target);
        assert_eq!(r.from_uplink(&mut ns, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
        let na = emit.pop().unwrap();
        let nd = parse_nd(&na.frame).unwrap().unwrap();
        assert_eq!(
            (nd.kind, nd.target, nd.lladdr, nd.dst, &na.frame[0..6]),
            (ND_NEIGHBOR_ADVERT, target, Some(UP_MAC), lan_router(), &LAN_MAC[..])
        );
    }
    assert_eq!(r.outside_link_local(), link_local(&UP_MAC));
    assert_eq!(r.outside_neighbor(lan_router(), 1), Some(LAN_MAC), "the solicitor is learned");
    // Echo to the uplink address.
    let mut ping = echo(LAN_MAC, UP_MAC, lan_host(), uplink_ip());
    assert_eq!(r.from_uplink(&mut ping, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
    assert_eq!(icmp_type(&emit.pop().unwrap().frame), Some((ICMP6_ECHO_REPLY, 0)));
    // A guest address: not without ND proxy.
    let mut ns = lan_ns(guest());
    assert_eq!(r.from_uplink(&mut ns, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
    assert!(emit.is_empty());
    r.cfg.proxy_ndp = true;
    assert_eq!(r.from_uplink(&mut ns, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
    let na = emit.pop().unwrap();
    let (nd, m) = (parse_nd(&na.frame).unwrap().unwrap(), ipv6::parse(&na.frame).unwrap().payload[4]);
    assert_eq!((nd.target, nd.lladdr, m & NA_OVERRIDE), (guest(), Some(UP_MAC), 0), "proxied, without override");
    // Never for the gateway's own guest-side address.
    let mut ns = lan_ns(r.cfg.inside.ip);
    assert_eq!(r.from_uplink(&mut ns, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
    // A duplicate address probe for our address is answered to all nodes.
    let mut dad = Vec::new();
    let group = solicited_node(&uplink_ip());
    start_icmpv6(&mut dad, LAN_MAC, multicast_mac(&group), &Ipv6Addr::UNSPECIFIED, &group, 255, 24);
    dad.extend_from_slice(&[ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0]);
    dad.extend_from_slice(&uplink_ip().octets());
    finish_icmpv6(&mut dad);
    assert_eq!(r.from_uplink(&mut dad, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
    assert_eq!(ipv6::parse(&emit.pop().unwrap().frame).unwrap().dst, ALL_NODES);
}

#[test]
fn route_mode_applies_the_firewall_rules() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    let mut hello = udp(GUEST_MAC, GW_MAC, guest(), 1000, lan_host(), 1000, 64, 4);
    r.from_guest(0, &mut hello, &VnetHeader::default(), 0, &mut emit).unwrap();
    emit.clear();
    let mut web = tcp_syn(LAN_MAC, UP_MAC, lan_host(), 5000, guest(), 80);
    assert_eq!(r.from_uplink(&mut web, &VnetHeader::default(), 1, &mut emit), Ok(Verdict::Forward(Side::Guests)));
    let mut ssh = tcp_syn(LAN_MAC, UP_MAC, lan_host(), 5000, guest(), 22);
    assert_eq!(r.from_uplink(&mut ssh, &VnetHeader::default(), 1, &mut emit), Err(DropReason::Firewall));
    // Reject answers; the LAN host's MAC is what it sent from.
    let rej = emit.pop().expect("reject answers");
    assert_eq!((rej.to, &rej.frame[0..6], icmp_type(&rej.frame)), (Side::Uplink, &LAN_MAC[..], Some((ICMP6_DEST_UNREACH, UNREACH6_PORT))));
    let mut telnet = tcp_syn(LAN_MAC, UP_MAC, lan_host(), 5000, guest(), 23);
    assert_eq!(r.from_uplink(&mut telnet, &VnetHeader::default(), 1, &mut emit), Err(DropReason::Firewall));
    assert!(emit.is_empty(), "deny is silent");
}

#[test]
fn nat_mode_lets_in_only_replies_and_errors_about_guest_flows() {
    let mut r = router(RouteMode::Nat);
    let mut emit = Vec::new();
    let mut out = tcp_syn(GUEST_MAC, GW_MAC, guest(), 40000, far(), 80);
    r.from_guest(0, &mut out, &VnetHeader::default(), 0, &mut emit).unwrap();
    let mut reply = tcp_syn(LAN_MAC, UP_MAC, far(), 80, guest(), 40000);
    assert_eq!(r.from_uplink(&mut reply, &VnetHeader::default(), 1, &mut emit), Ok(Verdict::Forward(Side::Guests)));
    let mut other = tcp_syn(LAN_MAC, UP_MAC, far(), 80, guest(), 40001);
    assert_eq!(r.from_uplink(&mut other, &VnetHeader::default(), 1, &mut emit), Err(DropReason::Firewall));
    let mut unsolicited = tcp_syn(LAN_MAC, UP_MAC, lan_host(), 5000, guest(), 80);
    assert_eq!(r.from_uplink(&mut unsolicited, &VnetHeader::default(), 1, &mut emit), Err(DropReason::Firewall));
    let mut ping_in = echo(LAN_MAC, UP_MAC, lan_host(), guest());
    assert_eq!(r.from_uplink(&mut ping_in, &VnetHeader::default(), 1, &mut emit), Err(DropReason::Firewall));
    // A packet too big about the guest's flow comes in (path MTU discovery).
    let mut ptb = Vec::new();
    icmp6_error(&mut ptb, LAN_MAC, UP_MAC, &lan_router(), &out[ETH..], ICMP6_PACKET_TOO_BIG, 0, 1400);
    assert_eq!(r.from_uplink(&mut ptb, &VnetHeader::default(), 1, &mut emit), Ok(Verdict::Forward(Side::Guests)));
    let stranger = tcp_syn(GUEST_MAC, GW_MAC, guest(), 40009, far(), 80);
    let mut ptb = Vec::new();
    icmp6_error(&mut ptb, LAN_MAC, UP_MAC, &lan_router(), &stranger[ETH..], ICMP6_PACKET_TOO_BIG, 0, 1400);
    assert_eq!(r.from_uplink(&mut ptb, &VnetHeader::default(), 1, &mut emit), Err(DropReason::Firewall));
    // Echo replies to a guest's ping.
    let mut ping_out = echo(GUEST_MAC, GW_MAC, guest(), far());
    r.from_guest(0, &mut ping_out, &VnetHeader::default(), 1, &mut emit).unwrap();
    let mut pong = Vec::new();
    PacketBuilder::ethernet2(LAN_MAC, UP_MAC)
        .ipv6(far().octets(), guest().octets(), 60)
        .icmpv6_echo_reply(9, 1)
        .write(&mut pong, b"ping")
        .unwrap();
    assert_eq!(r.from_uplink(&mut pong, &VnetHeader::default(), 2, &mut emit), Ok(Verdict::Forward(Side::Guests)));
}

#[test]
fn link_local_multicast_and_spoofed_packets_are_never_routed() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    let g = guest();
    for dst in [a("fe80::1"), a("ff0e::1"), a("::1"), r.cfg.inside.ip, a("::ffff:10.0.0.1")] {
        let mut f = udp(GUEST_MAC, GW_MAC, g, 1, dst, 1, 64, 4);
        assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::NoRoute), "to {dst}");
    }
    for src in [a("fe80::5"), a("2001:db8:5::1"), r.cfg.inside.ip] {
        let mut f = udp(GUEST_MAC, GW_MAC, src, 1, far(), 1, 64, 4);
        assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::NoRoute), "from {src}");
    }
    for (src, dst) in [
        (a("fe80::9"), g),
        (g, g),
        (far(), a("fe80::10")),
        (far(), r.cfg.inside.ip),
        (far(), a("fd00:7675:1::")),
        (far(), a("fd00:7675:2::1")),
    ] {
        let mut f = udp(LAN_MAC, UP_MAC, src, 1, dst, 1, 64, 4);
        assert_eq!(r.from_uplink(&mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::NoRoute), "{src} -> {dst}");
    }
    assert!(emit.is_empty(), "no errors for those");
    // Another host's frames are not the router's; multicast to the LAN neither.
    let mut f = udp(LAN_MAC, [0x52, 0, 0, 0, 0, 1], far(), 1, g, 1, 64, 4);
    assert_eq!(r.from_uplink(&mut f, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
    let mut f = udp(LAN_MAC, multicast_mac(&ALL_NODES), lan_host(), 1, ALL_NODES, 1, 64, 4);
    assert_eq!(r.from_uplink(&mut f, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    let good = udp(LAN_MAC, UP_MAC, far(), 1, guest(), 1, 64, 20);
    let mut short = good[..ETH + 30].to_vec();
    assert_eq!(r.from_uplink(&mut short, &VnetHeader::default(), 0, &mut emit), Err(DropReason::BadIpHeader));
    let mut v4 = good.clone();
    v4[ETH] = 0x45;
    assert_eq!(r.from_uplink(&mut v4, &VnetHeader::default(), 0, &mut emit), Err(DropReason::BadIpHeader));
    let mut long = good.clone();
    long[ETH + 4..ETH + 6].copy_from_slice(&2000u16.to_be_bytes());
    assert_eq!(r.from_uplink(&mut long, &VnetHeader::default(), 0, &mut emit), Err(DropReason::BadIpHeader));
    let mut g = udp(GUEST_MAC, GW_MAC, guest(), 1, far(), 1, 64, 20);
    g.truncate(ETH + 20);
    assert_eq!(r.from_guest(0, &mut g, &VnetHeader::default(), 0, &mut emit), Err(DropReason::BadIpHeader));
    // An NS with a bad checksum, to our MAC.
    let mut ns = lan_ns(uplink_ip());
    ns[0..6].copy_from_slice(&UP_MAC);
    ns[ETH + 40 + 2] ^= 0xff;
    assert_eq!(r.from_uplink(&mut ns, &VnetHeader::default(), 0, &mut emit), Err(DropReason::BadIpHeader));
    // An NS that crossed a router (hop limit below 255) is not ND.
    let mut ns = lan_ns(uplink_ip());
    ns[ETH + 7] = 64;
    assert_eq!(r.from_uplink(&mut ns, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
    assert!(emit.is_empty());
}

#[test]
fn a_silent_next_hop_gives_address_unreachable_and_the_caches_are_bounded() {
    let mut r = router(RouteMode::Route);
    let mut emit = Vec::new();
    for i in 0..1000u16 {
        let mut f = udp(GUEST_MAC, GW_MAC, guest(), i, lan_host(), 9, 64, 4);
        let _ = r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit);
    }
    assert!(r.neighbor_counts().2 <= QUEUE_PER_NEIGHBOR);
    emit.clear();
    for t in [1000, 2000, 3000] {
        r.tick(t, &mut emit);
    }
    let unreach =
        emit.iter().filter(|e| e.to == Side::Guests && icmp_type(&e.frame) == Some((ICMP6_DEST_UNREACH, UNREACH6_ADDRESS))).count();
    assert_eq!(unreach, QUEUE_PER_NEIGHBOR, "each waiting frame's sender hears address unreachable");
    // The LAN sending to 10,000 guest addresses holds at most its quota of the guests' side.
    for i in 0..10_000u32 {
        let dst = Ipv6Addr::from(u128::from(guest()) + 0x1_0000 + i as u128);
        let mut f = udp(LAN_MAC, UP_MAC, far(), 1, dst, 1, 64, 4);
        let _ = r.from_uplink(&mut f, &VnetHeader::default(), 4000, &mut emit);
    }
    let (inside, outside, queued) = r.neighbor_counts();
    assert!(inside <= crate::arp::MAX_NEIGHBORS / 4 + 1, "{inside} guest-side neighbours");
    assert!(outside <= crate::arp::MAX_NEIGHBORS && queued <= crate::arp::QUEUE_TOTAL);
    // The guest, known before, is still reachable.
    let mut back = udp(LAN_MAC, UP_MAC, far(), 53, guest(), 4000, 50, 4);
    assert_eq!(r.from_uplink(&mut back, &VnetHeader::default(), 4001, &mut emit), Ok(Verdict::Forward(Side::Guests)));
}

#[test]
fn hostile_frames_never_panic() {
    let mut x = 0x9e37_79b9u32;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for mode in [RouteMode::Nat, RouteMode::Route] {
        let mut r = router(mode);
        r.cfg.proxy_ndp = true;
        let mut emit = Vec::new();
        for len in 0..600usize {
            let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 54 {
                f[0..6].copy_from_slice(&if len % 2 == 0 { GW_MAC } else { UP_MAC });
                f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
                f[14] = 0x60;
                let plen = (len - 54) as u16;
                f[18..20].copy_from_slice(&plen.to_be_bytes());
                f[20] = [IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, 0, 60, 44][len % 6];
                if len % 3 == 0 {
                    f[22..38].copy_from_slice(&guest().octets());
                    f[38..54].copy_from_slice(&far().octets());
                }
                if len % 4 == 0 {
                    f[21] = 255;
                    f[54] = [135, 136, 1, 2, 128][len % 5];
                }
            }
            let hdr =
                VnetHeader { flags: (len % 2) as u8, gso_type: if len % 3 == 0 { 4 } else { 0 }, gso_size: 100, ..VnetHeader::default() };
            let _ = r.from_guest(0, &mut f.clone(), &hdr, len as u64, &mut emit);
            let _ = r.from_uplink(&mut f, &hdr, len as u64, &mut emit);
            r.guest_nd(0, &f, len as u64, &mut emit);
            r.tick(len as u64 * 100, &mut emit);
        }
    }
}
