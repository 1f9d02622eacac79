//! Any bytes as frames through the IPv6 router of a nat and of a route network (ND proxy on),
//! from the guests' side and from the LAN: parsing, ND on both sides, ICMPv6 errors with their
//! quoted packets, the firewall and nat mode's reply tracking, timers. Nothing may panic, and
//! the neighbour caches and their queues stay bounded.
#![no_main]
use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use vunet_switch::arp::{MAX_NEIGHBORS, QUEUE_TOTAL};
use vunet_switch::firewall::{Action, Proto, Rule};
use vunet_switch::gateway::Gateway6;
use vunet_switch::router::RouteMode;
use vunet_switch::router6::{Router6, Router6Config};
use vunet_switch::vnet::VnetHeader;

const GW_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 1];
const UP_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 2];

fn router(mode: RouteMode) -> Router6 {
    Router6::new(Router6Config {
        mode,
        inside: Gateway6::new(GW_MAC, Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 1), 64),
        outside_mac: UP_MAC,
        outside: (Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x50), 64),
        next_hop: Some(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
        proxy_ndp: true,
        inside_mtu: 1500,
        outside_mtu: 1280,
        firewall: vec![Rule { action: Action::Reject, proto: Proto::Tcp, ports: Some((22, 22)), from: None, to: None }],
        firewall_default: Action::Allow,
    })
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
                // Aim most frames at the router's MACs and at IPv6 so they get past the first checks.
                f[0..6].copy_from_slice(if ctl & 2 == 0 { &GW_MAC } else { &UP_MAC });
                f[12..14].copy_from_slice(&[0x86, 0xdd]);
            }
            let _ = if ctl & 1 == 0 { r.from_guest(0, &mut f, &hdr, now, &mut emit) } else { r.from_uplink(&mut f, &hdr, now, &mut emit) };
            r.guest_nd(0, &f, now, &mut emit);
            now += (ctl >> 2) as u64 * 50;
            r.tick(now, &mut emit);
            for e in emit.drain(..) {
                assert!(e.frame.len() >= 14);
            }
            let (inside, outside, queued) = r.neighbor_counts();
            assert!(inside <= MAX_NEIGHBORS && outside <= MAX_NEIGHBORS && queued <= 2 * QUEUE_TOTAL);
        }
    }
});
