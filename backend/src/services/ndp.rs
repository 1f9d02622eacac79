//! The gateway's IPv6 neighbour discovery and ping (pure logic: `vunet_switch::ipv6::nd`):
//! neighbour solicitations for its addresses, router solicitations and echo requests are
//! answered as frames come; unsolicited router advertisements go to every guest from a small
//! thread of the network's (`run`) — three 16 s apart at start, then every 200–600 s at random
//! (RFC 4861 §6.2.4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info};
use vunet_switch::gateway::Gateway6;
use vunet_switch::ipv6::nd::{Ndp, RaConfig, Verdict, MAX_RTR_ADV_INTERVAL_S, MIN_RTR_ADV_INTERVAL_S};
use vunet_switch::ipv6::Ipv6Drop;

use crate::datapath::{GatewayCx, GatewayService, Handled, Inject, Port, PortKind};

/// RFC 4861 §10 MAX_INITIAL_RTR_ADVERTISEMENTS and MAX_INITIAL_RTR_ADVERT_INTERVAL.
const INITIAL_RAS: u32 = 3;
const INITIAL_INTERVAL_S: u64 = 16;

pub struct NdpService {
    network: String,
    ndp: Ndp,
    drops: [AtomicU64; Ipv6Drop::ALL.len()],
    /// Unsolicited advertisements sent (one per guest reached).
    pub ras_sent: AtomicU64,
}

impl NdpService {
    /// The service of network `network` with gateway `gw`: `default_router` (whether guests
    /// may route IPv6 out through the gateway: see `NetworkConfig::ipv6_default_route`), `mtu`, `dhcp6` (the network runs DHCPv6: M and O, no
    /// SLAAC) and its DNS domain (DNSSL).
    pub fn new(network: &str, gw: Gateway6, default_router: bool, mtu: u16, dhcp6: bool, domain: Option<&str>) -> NdpService {
        let cfg = RaConfig::new(!default_router, dhcp6, mtu, gw.prefix);
        NdpService { network: network.to_string(), ndp: Ndp::new(gw, cfg, domain), drops: Default::default(), ras_sent: AtomicU64::new(0) }
    }

    pub fn ra_config(&self) -> &RaConfig {
        self.ndp.config()
    }

    /// Sends unsolicited router advertisements to every connected guest until the network
    /// stops. Taps (the host's own interface) and uplinks are left alone: an advertisement
    /// there would hand the host or the LAN a route through vunet.
    pub fn run(self: Arc<Self>, mut inject: Inject) {
        let mut ra = Vec::new();
        self.ndp.unsolicited_ra(&mut ra);
        let c = self.ra_config();
        info!(
            network = %self.network,
            router_lifetime = c.router_lifetime, managed = c.managed, slaac = c.autonomous,
            "IPv6 router advertisements"
        );
        let mut sent = 0u32;
        let mut reported = Vec::new();
        while !inject.stopped() {
            // Drops are rare (a broken or hostile guest): said once per interval, if any came.
            let drops = self.drops();
            if drops != reported {
                info!(network = %self.network, ?drops, "IPv6 frames to the gateway dropped so far");
                reported = drops;
            }
            let guests: Vec<_> = inject
                .network()
                .live_ports()
                .into_iter()
                .filter(|p| p.kind == PortKind::Vhost && p.connected.load(Ordering::Acquire))
                .map(|p| p.id)
                .collect();
            for id in guests {
                inject.send_to_port(id, &ra);
                self.ras_sent.fetch_add(1, Ordering::Relaxed);
            }
            sent = sent.saturating_add(1);
            let wait = if sent < INITIAL_RAS {
                INITIAL_INTERVAL_S
            } else {
                rand::random_range(MIN_RTR_ADV_INTERVAL_S as u64..=MAX_RTR_ADV_INTERVAL_S as u64)
            };
            // In steps, so a stopped network's thread ends within a second.
            for _ in 0..wait {
                if inject.stopped() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

impl GatewayService for NdpService {
    fn handle(&self, _cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        match self.ndp.handle(frame, reply) {
            Verdict::NotMine => Handled::NotMine,
            Verdict::Reply => Handled::Reply,
            Verdict::Ignored => Handled::Consumed,
            Verdict::Drop(r) => {
                self.drops[r as usize].fetch_add(1, Ordering::Relaxed);
                debug!(network = %self.network, port = %port.name, reason = r.name(), "IPv6 frame to the gateway dropped");
                Handled::Consumed
            }
        }
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        Ipv6Drop::ALL.iter().map(|r| (r.name(), self.drops[*r as usize].load(Ordering::Relaxed))).filter(|(_, n)| *n > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use vunet_switch::gateway::{gateway_mac, Gateway6};

    use crate::datapath::{GatewayCx, GatewayService, Handled, Port, PortKind};
    // By its full path: layers.rs reads `super::` as the services layer.
    use crate::services::ndp::NdpService;

    fn gw6() -> Gateway6 {
        Gateway6::new(gateway_mac("n"), "fd00:7675:1::1".parse().unwrap(), 64)
    }

    #[test]
    fn configuration_maps_to_the_advertisement() {
        let s = NdpService::new("n", gw6(), false, 1500, false, None);
        assert_eq!(s.ra_config().router_lifetime, 0);
        assert!(s.ra_config().autonomous && !s.ra_config().managed);
        let s = NdpService::new("n", gw6(), true, 9000, true, Some("lab"));
        assert_eq!(s.ra_config().router_lifetime, 1800);
        assert!(!s.ra_config().autonomous && s.ra_config().managed && s.ra_config().other);
        assert_eq!(s.ra_config().mtu, Some(9000));
    }

    /// A router solicitation from a guest's link-local address, hop limit `hop`.
    fn rs(hop: u8) -> Vec<u8> {
        let src: std::net::Ipv6Addr = "fe80::5054:ff:fe00:7".parse().unwrap();
        let dst = vunet_switch::ipv6::ALL_ROUTERS;
        let mut f = Vec::new();
        vunet_switch::ipv6::start_icmpv6(&mut f, [0x52, 0x54, 0, 0, 0, 7], [0x33, 0x33, 0, 0, 0, 2], &src, &dst, hop, 0);
        f.extend_from_slice(&[133, 0, 0, 0, 0, 0, 0, 0]);
        vunet_switch::ipv6::finish_icmpv6(&mut f);
        f
    }

    #[test]
    fn answers_a_solicitation_and_counts_what_it_drops() {
        let s = NdpService::new("n", gw6(), true, 1500, false, None);
        let gw = vunet_switch::gateway::Gateway { mac: gateway_mac("n"), ip: "10.0.0.1".parse().unwrap(), prefix: 24 };
        let (g6, hdr) = (gw6(), vunet_switch::VnetHeader::default());
        let cx = GatewayCx { network: "n", gateway: &gw, gateway6: Some(&g6), dhcp: None, hdr: &hdr };
        let port = Port::new(0, "p0", PortKind::Vhost);
        let mut reply = Vec::new();
        assert_eq!(s.handle(&cx, &port, &rs(255), &mut reply), Handled::Reply);
        assert_eq!(reply[14 + 40], 134, "a router advertisement");
        assert!(s.drops().is_empty());
        assert_eq!(s.handle(&cx, &port, &rs(64), &mut reply), Handled::Consumed);
        assert_eq!(s.drops(), vec![("nd_bad_hop_limit", 1)]);
    }
}
