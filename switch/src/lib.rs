//! Pure forwarding logic for vunet. Nothing in this crate owns a file descriptor, a thread or
//! a clock: callers pass bytes and the current time in, and get decisions or bytes back. That
//! keeps the logic unit-testable, fuzzable and benchmarkable without a VM.
//!
//! - [`mac_table`]: MAC learning with aging and a bounded size.
//! - [`counters`]: per-port frame, byte and drop counters (atomics, shared across threads).
//! - [`vnet`]: the virtio-net header, validated defensively.
//! - [`offload`]: software checksum completion and TCP segmentation for receivers that did not
//!   negotiate the offload the sender used.
//! - [`checksum`]: the Internet checksum.
//! - [`ledger`]: eviction order with per-port quotas for the bounded tables (MAC table,
//!   firewall flows, ARP neighbours).
//! - [`vlan`]: 802.1Q VLANs: ingress classification and egress tagging per port mode (OVS's).
//! - [`socknat`]: NAT through the host's own sockets: the TCP splice and UDP flows between a
//!   guest's frames and host sockets that an I/O layer drives (docs/socket-nat.md).
//! - [`vxlan`]: the VXLAN header, the outer source port's flow hash, and the bounded table of
//!   inner MACs behind remote tunnel endpoints (docs/vxlan.md).

pub mod arp;
pub mod checksum;
pub mod counters;
pub mod firewall;
pub mod gateway;
pub mod gro;
pub mod ipv4;
pub mod ipv6;
pub mod ledger;
pub mod mac_table;
pub mod nat;
pub mod offload;
pub mod port_security;
pub mod proto;
pub mod ratelimit;
pub mod router;
pub mod router6;
pub mod socknat;
pub mod udp6;
pub mod vlan;
pub mod vnet;
pub mod vxlan;

pub use counters::{DropReason, PortCounters};
pub use mac_table::{Decision, DecisionCache, Flow, MacTable, PortId};
pub use vnet::VnetHeader;

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// The largest Ethernet frame (without virtio-net header) a port may send: a 64 KiB IP packet
/// (a TSO segment) plus an Ethernet header and one VLAN tag. Anything larger is dropped.
pub const MAX_FRAME_LEN: usize = 14 + 4 + 65535;

/// The largest MTU a network may have: a TSO frame's MSS may be as large as the MTU, and
/// each segment cut from it carries up to 60 bytes of IPv4 header and 60 of TCP header on top;
/// with this bound every IP total length and TCP length vunet writes fits in 16 bits.
pub const MAX_MTU: u16 = 65535 - 60 - 60;

/// The smallest frame that carries an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// Destination MAC of a frame (the caller guarantees at least 14 bytes).
pub fn dst_mac(frame: &[u8]) -> Mac {
    frame[0..6].try_into().unwrap_or([0; 6])
}

/// Source MAC of a frame (the caller guarantees at least 14 bytes).
pub fn src_mac(frame: &[u8]) -> Mac {
    frame[6..12].try_into().unwrap_or([0; 6])
}

/// Group (multicast or broadcast) bit of a MAC address.
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

/// Parses "52:54:00:12:34:56".
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Formats a MAC as "52:54:00:12:34:56".
pub fn format_mac(mac: &Mac) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("52:54:00:ab:cd:ef").unwrap();
        assert_eq!(m, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(format_mac(&m), "52:54:00:ab:cd:ef");
        assert!(parse_mac("52:54:00:ab:cd").is_none());
        assert!(parse_mac("52:54:00:ab:cd:ef:01").is_none());
        assert!(parse_mac("52:54:00:ab:cd:zz").is_none());
        assert!(is_multicast(&[0xff; 6]));
        assert!(is_multicast(&[0x01, 0, 0x5e, 0, 0, 1]));
        assert!(!is_multicast(&m));
    }
}
