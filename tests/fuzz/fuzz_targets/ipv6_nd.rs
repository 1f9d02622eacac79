//! Any bytes as an IPv6 frame from a guest to the gateway: the extension-header walk, ND
//! (neighbour and router solicitations) and echo, on an isolated SLAAC network and a nat
//! network with DHCPv6. Whatever comes back is a valid ICMPv6 frame from the gateway.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vunet_switch::gateway::{gateway_mac, Gateway6};
use vunet_switch::ipv6::nd::{Ndp, RaConfig, Verdict};
use vunet_switch::ipv6::{icmpv6_checksum_ok, parse, IPPROTO_ICMPV6};

fuzz_target!(|data: &[u8]| {
    let gw = Gateway6::new(gateway_mac("default"), "fd00:7675:1::1".parse().unwrap(), 64);
    let mut out = Vec::new();
    for (isolated, dhcp6) in [(true, false), (false, true)] {
        let nd = Ndp::new(gw, RaConfig::new(isolated, dhcp6, 1500, 64), Some("lab"));
        if nd.handle(data, &mut out) == Verdict::Reply {
            assert!(out.len() >= 60 && out[6..12] == gw.mac);
            let p = parse(&out).expect("the answer parses");
            assert_eq!(p.proto, IPPROTO_ICMPV6);
            assert!(gw.is_mine(&p.src) && icmpv6_checksum_ok(&p.src, &p.dst, p.payload));
        }
    }
});
