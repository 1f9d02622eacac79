//! Any bytes as frames through the router of a nat and of a route network, from the guests'
//! side and from the LAN: parsing, NAT translation (with ICMP errors and their quoted
//! headers), the firewall, ARP, timers. Nothing may panic, and the tables stay bounded.
#![no_main]
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use vunet_switch::firewall::{Action, Proto, Rule};
use vunet_switch::gateway::Gateway;
use vunet_switch::nat::{NatConfig, PortForward};
use vunet_switch::router::{RouteMode, Router, RouterConfig, StaticRoute};
use vunet_switch::vnet::VnetHeader;

const GW_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 1];
const UP_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 2];

fn router(mode: RouteMode) -> Router {
    let cfg = RouterConfig {
        mode,
        inside: Gateway { mac: GW_MAC, ip: Ipv4Addr::new(192, 168, 122, 1), prefix: 24 },
        outside_mac: UP_MAC,
        next_hop: Some(Ipv4Addr::new(10, 10, 11, 1)),
        routes: vec![StaticRoute { net: Ipv4Addr::new(172, 20, 0, 0), prefix: 16, via: Ipv4Addr::new(192, 168, 122, 10) }],
        proxy_arp: true,
        nat: NatConfig {
            max_entries: 64,
            forwards: vec![PortForward { proto: 6, external: (2222, 2230), guest: Ipv4Addr::new(192, 168, 122, 10), guest_port: 22 }],
            ..NatConfig::default()
        },
        firewall: vec![Rule { action: Action::Reject, proto: Proto::Tcp, ports: Some((22, 22)), from: None, to: None }],
        firewall_default: Action::Allow,
    };
    let mut r = Router::new(cfg, None);
    r.set_outside(Some((Ipv4Addr::new(10, 10, 11, 50), 24)), Some(Ipv4Addr::new(10, 10, 11, 1)), &mut Vec::new());
    r
}

fuzz_target!(|data: &[u8]| {
    // The input is a list of frames: [side/flags byte][len u16][12-byte vnet header][frame].
    for mode in [RouteMode::Nat, RouteMode::Route] {
        let mut r = router(mode);
        let mut emit = Vec::new();
        let mut rest = data;
        let mut now = 0u64;
        while rest.len() >= 3 {
            let ctl = rest[0];
            let len = (u16::from_be_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
            let chunk = &rest[3..3 + len];
            rest = &rest[3 + len..];
            let (h, frame) = chunk.split_at(chunk.len().min(12));
            let hdr = VnetHeader::parse(h);
            let mut f = frame.to_vec();
            if f.len() >= 14 {
                // Aim most frames at the router's MACs so they get past the first check.
                f[0..6].copy_from_slice(if ctl & 2 == 0 { &GW_MAC } else { &UP_MAC });
            }
            let _ = if ctl & 1 == 0 { r.from_guest(0, &mut f, &hdr, now, &mut emit) } else { r.from_uplink(&mut f, &hdr, now, &mut emit) };
            r.guest_arp(0, &f, now, &mut emit);
            now += (ctl >> 2) as u64 * 50;
            r.tick(now, &mut emit);
            for e in emit.drain(..) {
                assert!(e.frame.len() >= 14);
            }
            assert!(r.nat.len() <= 64);
        }
    }
});
