//! Any bytes as a DHCP message, fed to a live server (state kept across inputs): parsing and
//! the state machine must never panic, and state stays bounded.
#![no_main]
use std::net::Ipv4Addr;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vunet_dhcp::{DhcpMessage, DhcpServer, ServerConfig, StaticHost};

static SERVER: Mutex<Option<DhcpServer>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = SERVER.lock().unwrap();
    let server = guard.get_or_insert_with(|| {
        DhcpServer::new(ServerConfig {
            server_ip: Ipv4Addr::new(192, 168, 122, 1),
            prefix: 24,
            range: (Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 30)),
            hosts: vec![StaticHost { mac: [0x52, 0x54, 0, 0, 0, 0x10], ip: Ipv4Addr::new(192, 168, 122, 10), name: Some("web".into()) }],
            lease_secs: 3600,
            router: true,
            dns: Some(Ipv4Addr::new(192, 168, 122, 1)),
            domain: Some("lab".into()),
            mtu: Some(1500),
        })
    });
    let now = data.first().map(|&b| b as u64 * 100).unwrap_or(0);
    if let Ok(msg) = DhcpMessage::parse(data) {
        if let Some(reply) = server.handle(&msg, now) {
            assert!(reply.payload.len() >= 240);
        }
        assert!(server.leases(now).len() <= 30);
    }
});
