//! The gateway's DNS service: local names (the network's `dns.hosts`, named static DHCP hosts,
//! DHCP clients that sent a host name) are answered by `vunet_dhcp::dns` (pure); everything
//! else is forwarded upstream (`forwarder`), over UDP or, for answers that do not fit a
//! datagram, over TCP (`tcp`).
//!
//! With `gateway6` the gateway answers UDP queries on its global and link-local IPv6 addresses
//! too (forwarded ones included: the answer goes back over IPv6), and the zone has IPv6
//! names: `dns.hosts` with IPv6 addresses, named `[network.dhcp6]` hosts, and every DHCP
//! client's name at the SLAAC address its MAC forms under the gateway's /64 (a Linux guest's
//! default). DNS over TCP listens on the IPv6 addresses too.

mod forwarder;
mod tcp;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vunet_dhcp::dns::{DnsAction, LocalZone};
use vunet_dhcp::server::RESERVED_NAMES;
use vunet_dhcp::DhcpServer;
use vunet_switch::gateway::{build_udp, slaac, udp_datagram, Gateway, Gateway6};
use vunet_switch::udp6::{build_udp6, udp6_datagram};
use vunet_switch::Mac;

pub use forwarder::{resolv_conf_servers, Forwarder, QUERY_TIMEOUT};
pub use tcp::DnsTcp;

use crate::datapath::{unix_now, GatewayCx, GatewayService, Handled, Port};

/// The DNS service of one network.
pub struct DnsService {
    pub domain: Option<String>,
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Configured names with IPv6 addresses: `dns.hosts` ones, then named `[network.dhcp6]`
    /// hosts.
    pub hosts6: Vec<(String, Ipv6Addr)>,
    pub forwarder: Option<Arc<Forwarder>>,
    /// The resolvers asked for names outside the network (over UDP and over TCP).
    pub upstreams: Vec<SocketAddr>,
    /// DNS over TCP, for answers that do not fit a datagram.
    pub tcp: Arc<DnsTcp>,
}

impl DnsService {
    pub fn new(network: &str, cfg: &crate::config::DnsConfig) -> DnsService {
        let upstreams = match &cfg.forwarders {
            Some(f) => f.clone(),
            None => resolv_conf_servers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        };
        let forwarder = match Forwarder::new(upstreams.clone()) {
            Ok(Some(f)) => {
                info!(network = %network, "DNS: names outside the network are forwarded to {upstreams:?}");
                Some(Arc::new(f))
            }
            Ok(None) => {
                info!(network = %network, "DNS: no upstream resolver; names outside the network are refused");
                None
            }
            Err(e) => {
                warn!(network = %network, "DNS: cannot open the forwarding socket ({e}); names outside the network are refused");
                None
            }
        };
        let upstreams = if forwarder.is_some() { upstreams.into_iter().filter(|a| a.is_ipv4()).collect() } else { Vec::new() };
        DnsService {
            domain: cfg.domain.clone(),
            hosts: cfg.hosts.clone(),
            hosts6: cfg.hosts6.clone(),
            forwarder,
            upstreams,
            tcp: Default::default(),
        }
    }
}

impl DnsService {
    /// The names the gateway answers for right now: `dns.hosts`, named static DHCP hosts, and
    /// DHCP clients that sent a host name. The DHCP server gives a client's name to one lease
    /// only and never a configured one; a lease name that still collides (none should) is
    /// left out, so configured names always win.
    ///
    /// IPv6 (with `gw6`): the configured IPv6 names, and each DHCP client's name (static or
    /// leased) at the SLAAC address of its MAC under the gateway's prefix if that is a /64,
    /// unless the name has a configured IPv6 address.
    pub fn zone(&self, dhcp: Option<&Mutex<DhcpServer>>, gw: &Gateway, gw6: Option<&Gateway6>) -> LocalZone {
        let mut names: Vec<(String, Ipv4Addr)> = self.hosts.clone();
        let mut names6: Vec<(String, Ipv6Addr)> = self.hosts6.clone();
        let slaac_prefix = gw6.filter(|g| g.prefix == 64).map(|g| g.ip);
        if let Some(dhcp) = dhcp {
            let server = dhcp.lock().unwrap_or_else(|e| e.into_inner());
            let mut macs: Vec<(String, Mac)> = Vec::new();
            for h in &server.config().hosts {
                if let Some(n) = &h.name {
                    names.push((n.clone(), h.ip));
                    macs.push((n.to_ascii_lowercase(), h.mac));
                }
            }
            let configured: HashSet<String> = names.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
            for l in server.leases(unix_now()) {
                let Some(n) = l.hostname else { continue };
                if !configured.contains(&n) && !RESERVED_NAMES.contains(&n.as_str()) {
                    names.push((n.clone(), l.ip));
                    macs.push((n, l.mac));
                }
            }
            if let Some(prefix) = slaac_prefix {
                let configured6: HashSet<String> = names6.iter().map(|(n, _)| n.clone()).collect();
                names6.extend(macs.into_iter().filter(|(n, _)| !configured6.contains(n)).map(|(n, mac)| (n, slaac(prefix, &mac))));
            }
        }
        LocalZone { domain: self.domain.clone(), names, subnet: (gw.ip, gw.prefix), names6, subnet6: gw6.map(|g| (g.ip, g.prefix)) }
    }
}

/// DNS over UDP to port 53 of the gateway: answered at once into the reply, or forwarded
/// upstream (the answer comes later, from the forwarder's thread).
impl GatewayService for DnsService {
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let gw = cx.gateway;
        if frame.len() >= 14 && frame[12..14] == [0x86, 0xdd] {
            return self.handle6(cx, port, frame, reply);
        }
        // Queries to the gateway's own address only: one to another server through the
        // gateway's MAC (socket NAT, a router) is for that server.
        if frame[0..6] != gw.mac || frame.len() < 34 || frame[30..34] != gw.ip.octets() {
            return Handled::NotMine;
        }
        let Some((client_ip, client_port, query)) = udp_datagram(frame, vunet_dhcp::dns::PORT) else { return Handled::NotMine };
        let client_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let answer = match self.zone(cx.dhcp, gw, cx.gateway6).respond(query) {
            Some(DnsAction::Answer(a)) => a,
            Some(DnsAction::Forward) => match &self.forwarder {
                Some(f) => {
                    f.forward(query, port.id, client_mac, (gw.ip.into(), client_ip.into()), client_port);
                    return Handled::Consumed;
                }
                None => vunet_dhcp::dns::refused(query),
            },
            None => return Handled::NotMine,
        };
        match build_udp(reply, gw.mac, client_mac, gw.ip, client_ip, vunet_dhcp::dns::PORT, client_port, &answer) {
            true => Handled::Reply,
            false => Handled::Consumed,
        }
    }
}

impl DnsService {
    /// A query over UDP to one of the gateway's IPv6 addresses (global or link-local), sent to
    /// the gateway's MAC: answered from that address, or forwarded (the answer comes back from
    /// it later).
    fn handle6(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let (gw, Some(gw6)) = (cx.gateway, cx.gateway6) else { return Handled::NotMine };
        if frame[0..6] != gw6.mac {
            return Handled::NotMine;
        }
        let Some(d) = udp6_datagram(frame, vunet_dhcp::dns::PORT) else { return Handled::NotMine };
        if !gw6.is_mine(&d.dst) {
            return Handled::NotMine;
        }
        let client_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let answer = match self.zone(cx.dhcp, gw, Some(gw6)).respond(d.payload) {
            Some(DnsAction::Answer(a)) => a,
            Some(DnsAction::Forward) => match &self.forwarder {
                Some(f) => {
                    f.forward(d.payload, port.id, client_mac, (IpAddr::V6(d.dst), IpAddr::V6(d.src)), d.sport);
                    return Handled::Consumed;
                }
                None => vunet_dhcp::dns::refused(d.payload),
            },
            None => return Handled::NotMine,
        };
        match build_udp6(reply, gw6.mac, client_mac, d.dst, d.src, vunet_dhcp::dns::PORT, d.sport, &answer) {
            true => Handled::Reply,
            false => Handled::Consumed,
        }
    }
}

#[cfg(test)]
mod tests;
