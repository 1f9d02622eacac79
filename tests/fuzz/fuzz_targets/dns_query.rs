//! Any bytes as a DNS query to the gateway: an answer (never a panic), echoing the id.
#![no_main]
use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use vunet_dhcp::dns::{DnsAction, LocalZone};

fuzz_target!(|data: &[u8]| {
    let zone = LocalZone {
        domain: Some("lab".into()),
        names: vec![("web".into(), Ipv4Addr::new(192, 168, 122, 10)), ("alpha".into(), Ipv4Addr::new(192, 168, 122, 100))],
        subnet: (Ipv4Addr::new(192, 168, 122, 1), 24),
        names6: vec![
            ("web".into(), Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0x5054, 0xff, 0xfe00, 0x10)),
            ("six".into(), Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 6)),
        ],
        subnet6: Some((Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 1), 64)),
    };
    if let Some(DnsAction::Answer(a)) = zone.respond(data) {
        assert!(a.len() >= 12);
        assert_eq!(a[0..2], data[0..2]);
    }
    let _ = vunet_dhcp::dns::refused(data);
});
