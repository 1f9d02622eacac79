//! Any bytes as a frame from a guest, through everything the gateway and port security look
//! at, and the software offloads with a header taken from the input.
#![no_main]
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use vunet_switch::gateway::{gateway_mac, udp_datagram, Gateway};
use vunet_switch::offload::{complete_checksum, segment_tcp};
use vunet_switch::port_security;
use vunet_switch::vnet::VnetHeader;

fuzz_target!(|data: &[u8]| {
    let gw = Gateway { mac: gateway_mac("default"), ip: Ipv4Addr::new(192, 168, 122, 1), prefix: 24 };
    let mut out = Vec::new();
    if gw.handle(data, &mut out) {
        assert!(out.len() >= 60 && out[6..12] == gw.mac);
    }
    let _ = udp_datagram(data, 67);
    let _ = udp_datagram(data, 53);
    // Port security with and without a lease, other guests holding the odd addresses.
    let head = &data[..data.len().min(port_security::HEADER_BYTES)];
    let taken = |ip: Ipv4Addr| ip.octets()[3] % 2 == 1;
    let _ = port_security::check(head, &[0x52, 0x54, 0, 0, 0, 1], Some(Ipv4Addr::new(192, 168, 122, 5)), taken);
    let _ = port_security::check(head, &[0x52, 0x54, 0, 0, 0, 1], None, taken);
    let _ = port_security::check_ipv6(head, &[0x52, 0x54, 0, 0, 0, 1], |ip| ip.octets()[15] % 2 == 0);
    if data.len() > 12 {
        let hdr = VnetHeader::parse(&data[..12]);
        let frame = &data[12..];
        if hdr.validate_tx(frame.len(), 1500).is_ok() {
            let mut f = frame.to_vec();
            let _ = complete_checksum(&mut f, hdr.csum_start as usize, hdr.csum_offset as usize);
            if hdr.is_gso() {
                let mut scratch = Vec::new();
                let _ = segment_tcp(frame, &hdr, &mut scratch, |s| assert!(s.len() <= frame.len() + 0xffff));
            }
        }
    }
});
