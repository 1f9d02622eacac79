//! Port security, as libvirt's `clean-traffic` filter: a guest port sends only with its own
//! MAC (the configured one, else the first one it uses), only with its own IPv4 address once it
//! holds a DHCP lease (ARP included), never with an address someone else holds (the gateway's,
//! another client's lease or reservation; with or without a lease of its own), and never as a
//! DHCP server. Pure: the frame's first bytes and the port's state in, a verdict out.

use std::net::Ipv4Addr;

use crate::proto::{ETH_P_ARP, ETH_P_IPV4, IPPROTO_UDP};
use crate::{DropReason, Mac};

/// How many bytes of a frame [`check`] needs to see (Ethernet, IPv4 with options, UDP ports).
pub const HEADER_BYTES: usize = 14 + 60 + 4;

/// Checks a frame sent by a guest. `head` is the frame's first bytes (up to
/// [`HEADER_BYTES`]); `mac` the port's MAC; `ip` its leased address, if any; `taken` says
/// whether an address belongs to someone else (the gateway, another MAC's lease or static
/// host). `taken` is asked only about a source that is not the port's own lease, so a guest
/// sending from its lease pays nothing for it.
pub fn check(head: &[u8], mac: &Mac, ip: Option<Ipv4Addr>, taken: impl Fn(Ipv4Addr) -> bool) -> Result<(), DropReason> {
    if head.len() < 14 {
        return Err(DropReason::ShortFrame);
    }
    if head[6..12] != mac[..] {
        return Err(DropReason::SpoofedMac);
    }
    match u16::from_be_bytes([head[12], head[13]]) {
        ETH_P_ARP => {
            // Sender hardware address must be the port's; sender protocol address its lease
            // (or 0.0.0.0, an address probe).
            let Some(a) = head.get(14..42) else { return Ok(()) };
            if a[8..14] != mac[..] {
                return Err(DropReason::SpoofedMac);
            }
            let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
            if Some(spa) == ip || spa.is_unspecified() {
                return Ok(());
            }
            if ip.is_some() || taken(spa) {
                return Err(DropReason::SpoofedIp);
            }
            Ok(())
        }
        ETH_P_IPV4 => {
            let Some(h) = head.get(14..34) else { return Ok(()) };
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let ihl = (h[0] & 0xf) as usize * 4;
            let udp_ports = if h[9] == IPPROTO_UDP && u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 {
                head.get(14 + ihl..14 + ihl + 4).map(|p| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])))
            } else {
                None
            };
            if let Some((sport, _)) = udp_ports {
                if sport == 67 {
                    return Err(DropReason::RogueDhcpServer);
                }
            }
            if Some(src) == ip {
                return Ok(());
            }
            match ip {
                // Before it has an address a client talks DHCP from 0.0.0.0.
                Some(_) if !(src.is_unspecified() && udp_ports == Some((68, 67))) => Err(DropReason::SpoofedIp),
                // Without a lease any address nobody else holds (a static configuration).
                _ if taken(src) => Err(DropReason::SpoofedIp),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const M: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const OTHER: Mac = [0x52, 0x54, 0, 0, 0, 2];
    const IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 5);
    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
    const OTHERS: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 6);

    /// The gateway and another guest's lease are taken.
    fn taken(a: Ipv4Addr) -> bool {
        a == GW || a == OTHERS
    }

    fn check(head: &[u8], mac: &Mac, ip: Option<Ipv4Addr>) -> Result<(), DropReason> {
        super::check(head, mac, ip, taken)
    }

    fn udp(src_mac: Mac, src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(src_mac, [0xff; 6]).ipv4(src, [255; 4], 64).udp(sport, dport).write(&mut f, &[0; 20]).unwrap();
        f
    }

    fn arp(sha: Mac, spa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&M);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 10]);
        f
    }

    #[test]
    fn own_mac_and_ip_pass() {
        assert_eq!(check(&udp(M, IP.octets(), 5000, 53), &M, Some(IP)), Ok(()));
        assert_eq!(check(&arp(M, IP.octets()), &M, Some(IP)), Ok(()));
        assert_eq!(check(&udp(M, [10, 9, 9, 9], 5000, 53), &M, None), Ok(()), "no lease yet: any address");
        assert_eq!(check(&udp(M, [0; 4], 68, 67), &M, Some(IP)), Ok(()), "DHCP from 0.0.0.0");
        assert_eq!(check(&arp(M, [0; 4]), &M, Some(IP)), Ok(()), "ARP probe");
    }

    #[test]
    fn spoofing_is_refused() {
        assert_eq!(check(&udp(OTHER, IP.octets(), 5000, 53), &M, Some(IP)), Err(DropReason::SpoofedMac));
        assert_eq!(check(&udp(M, [192, 168, 122, 6], 5000, 53), &M, Some(IP)), Err(DropReason::SpoofedIp));
        assert_eq!(check(&udp(M, [0; 4], 5000, 53), &M, Some(IP)), Err(DropReason::SpoofedIp));
        assert_eq!(check(&arp(OTHER, IP.octets()), &M, Some(IP)), Err(DropReason::SpoofedMac), "ARP with a foreign sender MAC");
        assert_eq!(check(&arp(M, [192, 168, 122, 1]), &M, Some(IP)), Err(DropReason::SpoofedIp), "ARP claiming the gateway");
        assert_eq!(check(&udp(M, IP.octets(), 67, 68), &M, Some(IP)), Err(DropReason::RogueDhcpServer));
        assert_eq!(check(&udp(M, [10, 0, 0, 9], 67, 68), &M, None), Err(DropReason::RogueDhcpServer));
    }

    #[test]
    fn without_a_lease_addresses_others_hold_are_refused() {
        assert_eq!(check(&udp(M, GW.octets(), 5000, 53), &M, None), Err(DropReason::SpoofedIp), "the gateway's address");
        assert_eq!(check(&udp(M, OTHERS.octets(), 5000, 53), &M, None), Err(DropReason::SpoofedIp), "another guest's lease");
        assert_eq!(check(&arp(M, GW.octets()), &M, None), Err(DropReason::SpoofedIp), "ARP claiming the gateway");
        assert_eq!(check(&arp(M, OTHERS.octets()), &M, None), Err(DropReason::SpoofedIp), "ARP claiming another guest");
        // What a guest without a lease needs: DHCP from 0.0.0.0, ARP probes, a static address.
        assert_eq!(check(&udp(M, [0; 4], 68, 67), &M, None), Ok(()));
        assert_eq!(check(&arp(M, [0; 4]), &M, None), Ok(()));
        assert_eq!(check(&arp(M, [192, 168, 122, 77]), &M, None), Ok(()));
        // The port's own lease is not asked about at all.
        assert_eq!(super::check(&udp(M, IP.octets(), 5000, 53), &M, Some(IP), |_| panic!("asked")), Ok(()));
    }

    #[test]
    fn short_headers_do_not_panic() {
        let f = udp(M, IP.octets(), 67, 68);
        for cut in 0..f.len() {
            let _ = check(&f[..cut], &M, Some(IP));
        }
        let a = arp(M, [1, 2, 3, 4]);
        for cut in 0..a.len() {
            let _ = check(&a[..cut], &M, Some(IP));
        }
    }
}
