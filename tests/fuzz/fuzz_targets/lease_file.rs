//! Any text as a lease file: parsed or refused, and what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vunet_dhcp::lease_file::{parse, parse_all, serialize, serialize_all};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(leases) = parse(text) {
            assert_eq!(parse(&serialize(&leases)).unwrap(), leases);
        }
        if let Ok(leases) = parse_all(text) {
            assert_eq!(parse_all(&serialize_all(&leases)).unwrap(), leases);
        }
    }
});
