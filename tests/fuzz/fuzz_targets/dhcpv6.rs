//! Any bytes as a DHCPv6 message (and as a frame carrying one), fed to a live server (state
//! kept across inputs): parsing and the state machine never panic, and state stays bounded.
#![no_main]
use std::net::Ipv6Addr;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vunet_dhcp::v6::frame::parse_udp6;
use vunet_dhcp::v6::server::MAX_BINDINGS;
use vunet_dhcp::v6::{client_duid_mac, Dhcp6Server, Server6Config, StaticHost6};

static SERVER: Mutex<Option<Dhcp6Server>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = SERVER.lock().unwrap();
    let server = guard.get_or_insert_with(|| {
        let ip = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        Dhcp6Server::new(Server6Config {
            server_mac: [2, 0x76, 0x75, 0, 0, 1],
            gateway: ip("fd00:7675:1::1"),
            prefix: 64,
            range: Some((ip("fd00:7675:1::100"), ip("fd00:7675:1::11f"))),
            hosts: vec![StaticHost6 { mac: [0x52, 0x54, 0, 0, 0, 0x10], ip: ip("fd00:7675:1::10"), name: Some("web".into()) }],
            lease_secs: 3600,
            dns: Some(ip("fd00:7675:1::1")),
            domain: Some("lab".into()),
        })
    });
    let now = data.first().map(|&b| b as u64 * 100).unwrap_or(0);
    let mac = [0x52, 0x54, 0, 0, 0, data.get(1).copied().unwrap_or(0)];
    let _ = client_duid_mac(data);
    let _ = server.handle(data, mac, now);
    if let Ok(u) = parse_udp6(data) {
        let _ = server.handle(u.payload, u.src_mac, now);
    }
    // 32 range addresses and one static host.
    assert!(server.leases(now).len() <= 33 && server.leases(now).len() <= MAX_BINDINGS);
});
