//! The gateway's DHCPv6 server: answers guests' DHCPv6 messages (UDP from port 546 to port
//! 547, at All_DHCP_Relay_Agents_and_Servers or the gateway's own addresses, unicast
//! included) with the pure server of `vunet_dhcp::v6`. Its leases persist in the network's
//! lease file, next to the DHCPv4 ones: the run-time layer hands it `leases_changed`, which
//! wakes that file's writer (services never name each other).

use std::sync::{Arc, Mutex};

use tracing::info;
use vunet_dhcp::lease_file::Leases;
use vunet_dhcp::v6::frame::{build_udp6, parse_udp6, Udp6Error};
use vunet_dhcp::v6::{client_duid_mac, Dhcp6Server, Server6Config, StaticHost6, ALL_SERVERS, CLIENT_PORT, SERVER_PORT};
use vunet_switch::gateway::Gateway6;
use vunet_switch::DropReason;

use crate::config::NetworkConfig;
use crate::datapath::{unix_now, GatewayCx, GatewayService, Handled, Port};

/// DHCPv6 on a network's gateway: the server's state (shared with the listings and the lease
/// writer), and what to call when its leases change (never blocks on a write).
pub struct Dhcp6Service {
    pub server: Arc<Mutex<Dhcp6Server>>,
    pub leases_changed: Option<Box<dyn Fn() + Send + Sync>>,
}

impl GatewayService for Dhcp6Service {
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let Some(gw) = cx.gateway6 else { return Handled::NotMine };
        let u = match parse_udp6(frame) {
            Ok(u) => u,
            Err(Udp6Error::NotUdp) => return Handled::NotMine,
            Err(Udp6Error::Malformed) => {
                // Bad lengths or checksum: only a DHCPv6 datagram is ours to count.
                if frame.len() >= 58 && frame[12..14] == [0x86, 0xdd] && frame[56..58] == SERVER_PORT.to_be_bytes() {
                    port.counters.dropped(DropReason::BadIpHeader);
                    return Handled::Consumed;
                }
                return Handled::NotMine;
            }
        };
        if u.dst_port != SERVER_PORT || u.src_port != CLIENT_PORT {
            return Handled::NotMine;
        }
        if u.dst != ALL_SERVERS && !gw.is_mine(&u.dst) && u.dst != gw.link_local {
            return Handled::NotMine;
        }
        // Answers go back to where the client sent from (its link-local address).
        if u.src.is_unspecified() || u.src.is_multicast() {
            port.counters.dropped(DropReason::BadIpHeader);
            return Handled::Consumed;
        }
        // With port security a guest leases only for its own MAC: the link-layer address in
        // its DUID, if any, must be the port's (no static host's address by a made-up DUID).
        if port.security {
            let locked = port.locked_mac();
            if locked != Some(u.src_mac) || client_duid_mac(u.payload).is_some_and(|m| Some(m) != locked) {
                port.counters.dropped(DropReason::SpoofedMac);
                return Handled::Consumed;
            }
        }
        let (answer, changed) = self.server.lock().unwrap_or_else(|e| e.into_inner()).handle(u.payload, u.src_mac, unix_now());
        if changed {
            if let Some(f) = &self.leases_changed {
                f();
            }
        }
        match answer {
            Some(payload) if build_udp6(reply, gw.mac, u.src_mac, gw.link_local, u.src, SERVER_PORT, CLIENT_PORT, &payload) => {
                Handled::Reply
            }
            _ => Handled::Consumed,
        }
    }
}

/// The DHCPv6 server of network `n` (None without `[network.dhcp6]` or `gateway6`), with the
/// IPv6 leases of its lease file (`saved`) restored.
pub fn server(n: &NetworkConfig, gw: Option<&Gateway6>, saved: &Leases) -> Option<Dhcp6Server> {
    let (Some(d), Some(gw)) = (n.dhcp6.as_ref(), gw) else { return None };
    let mut server = Dhcp6Server::new(Server6Config {
        server_mac: gw.mac,
        gateway: gw.ip,
        prefix: gw.prefix,
        range: d.range,
        hosts: d.hosts.iter().map(|h| StaticHost6 { mac: h.mac, ip: h.ip, name: h.name.clone() }).collect(),
        lease_secs: d.lease_secs,
        // The gateway answers DNS wherever it exists, on its IPv6 address too.
        dns: Some(gw.ip),
        domain: n.dns.domain.clone(),
    });
    let restored = server.restore(&saved.v6, unix_now());
    if restored > 0 {
        info!(network = %n.name, "restored {restored} DHCPv6 lease(s)");
    }
    Some(server)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::{Arc, Mutex};

    use vunet_dhcp::v6::dhcproto::v6::{DhcpOption, DhcpOptions, Message, MessageType, OptionCode, IANA};
    use vunet_dhcp::v6::dhcproto::{Decodable, Encodable};
    use vunet_dhcp::v6::frame::{build_udp6, parse_udp6};
    use vunet_dhcp::v6::{Dhcp6Server, Server6Config, ALL_SERVERS, CLIENT_PORT, SERVER_PORT};
    use vunet_switch::gateway::{link_local, Gateway, Gateway6};
    use vunet_switch::DropReason;

    use crate::datapath::{GatewayCx, GatewayService, Handled, Port, PortKind};
    use crate::services::dhcp6::Dhcp6Service;

    const GW_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 1];
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 7];

    fn service() -> Dhcp6Service {
        let server = Dhcp6Server::new(Server6Config {
            server_mac: GW_MAC,
            gateway: "fd00:7675:1::1".parse().unwrap(),
            prefix: 64,
            range: Some(("fd00:7675:1::100".parse().unwrap(), "fd00:7675:1::1ff".parse().unwrap())),
            hosts: vec![],
            lease_secs: 3600,
            dns: None,
            domain: None,
        });
        Dhcp6Service { server: Arc::new(Mutex::new(server)), leases_changed: None }
    }

    fn solicit(duid_mac: [u8; 6]) -> Vec<u8> {
        let mut m = Message::new_with_id(MessageType::Solicit, [9, 9, 9]);
        let mut duid = vec![0, 3, 0, 1];
        duid.extend_from_slice(&duid_mac);
        m.opts_mut().insert(DhcpOption::ClientId(duid));
        m.opts_mut().insert(DhcpOption::IANA(IANA { id: 1, t1: 0, t2: 0, opts: DhcpOptions::new() }));
        m.opts_mut().insert(DhcpOption::RapidCommit);
        m.to_vec().unwrap()
    }

    /// A frame from the guest through the service, as the data path hands it over.
    fn send(svc: &Dhcp6Service, port: &Port, dst: Ipv6Addr, payload: &[u8], corrupt: bool) -> (Handled, Vec<u8>) {
        let gw = Gateway { mac: GW_MAC, ip: Ipv4Addr::new(10, 0, 0, 1), prefix: 24 };
        let gw6 = Gateway6::new(GW_MAC, "fd00:7675:1::1".parse().unwrap(), 64);
        let mut frame = Vec::new();
        build_udp6(&mut frame, MAC, [0x33, 0x33, 0, 1, 0, 2], link_local(&MAC), dst, CLIENT_PORT, SERVER_PORT, payload);
        if corrupt {
            let n = frame.len() - 1;
            frame[n] ^= 1;
        }
        let mut reply = Vec::new();
        let cx = GatewayCx { network: "n", gateway: &gw, gateway6: Some(&gw6), dhcp: None, hdr: &Default::default() };
        (svc.handle(&cx, port, &frame, &mut reply), reply)
    }

    #[test]
    fn a_solicit_gets_a_reply_from_link_local_to_link_local() {
        let svc = service();
        let port = Port::new(0, "p0", PortKind::Vhost);
        for dst in [ALL_SERVERS, "fd00:7675:1::1".parse().unwrap(), link_local(&GW_MAC)] {
            let (h, reply) = send(&svc, &port, dst, &solicit(MAC), false);
            assert_eq!(h, Handled::Reply, "to {dst}");
            let u = parse_udp6(&reply).expect("valid checksum");
            assert_eq!((u.src, u.dst, u.src_port, u.dst_port), (link_local(&GW_MAC), link_local(&MAC), 547, 546));
            assert_eq!((u.src_mac, u.dst_mac), (GW_MAC, MAC));
            let m = Message::from_bytes(u.payload).unwrap();
            assert_eq!(m.msg_type(), MessageType::Reply);
            assert!(m.opts().get(OptionCode::IANA).is_some());
        }
        assert_eq!(svc.server.lock().unwrap().leases(crate::datapath::unix_now()).len(), 1);
        // Other destinations are not the server's.
        assert_eq!(send(&svc, &port, "ff02::1".parse().unwrap(), &solicit(MAC), false).0, Handled::NotMine);
    }

    #[test]
    fn bad_checksums_and_spoofed_duids_are_dropped_and_counted() {
        let svc = service();
        let port = Port::new(0, "p0", PortKind::Vhost);
        assert_eq!(send(&svc, &port, ALL_SERVERS, &solicit(MAC), true).0, Handled::Consumed);
        assert_eq!(port.counters.snapshot().drops[DropReason::BadIpHeader as usize], 1);
        // With port security, a DUID naming another MAC (a static host's, say) is refused.
        let mut secure = Port::new(1, "p1", PortKind::Vhost).with_mac(Some(MAC));
        secure.security = true;
        assert_eq!(send(&svc, &secure, ALL_SERVERS, &solicit([0x52, 0x54, 0, 0, 0, 0x10]), false).0, Handled::Consumed);
        assert_eq!(secure.counters.snapshot().drops[DropReason::SpoofedMac as usize], 1);
        assert_eq!(send(&svc, &secure, ALL_SERVERS, &solicit(MAC), false).0, Handled::Reply);
    }
}
