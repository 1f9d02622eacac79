//! The gateway's DNS service: local names (the network's `dns.hosts`, named static DHCP hosts,
//! DHCP clients that sent a host name) are answered by `vunet_dhcp::dns` (pure); everything
//! else is forwarded upstream (`forwarder`), over UDP or, for answers that do not fit a
//! datagram, over TCP (`tcp`).

mod forwarder;
mod tcp;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vunet_dhcp::dns::{DnsAction, LocalZone};
use vunet_dhcp::server::RESERVED_NAMES;
use vunet_dhcp::DhcpServer;
use vunet_switch::gateway::{build_udp, udp_datagram, Gateway};
use vunet_switch::Mac;

pub use forwarder::{resolv_conf_servers, Forwarder, QUERY_TIMEOUT};
pub use tcp::DnsTcp;

use crate::datapath::{unix_now, GatewayCx, GatewayService, Handled, Port};

/// The DNS service of one network.
pub struct DnsService {
    pub domain: Option<String>,
    pub hosts: Vec<(String, Ipv4Addr)>,
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
        DnsService { domain: cfg.domain.clone(), hosts: cfg.hosts.clone(), forwarder, upstreams, tcp: Default::default() }
    }
}

impl DnsService {
    /// The names the gateway answers for right now: `dns.hosts`, named static DHCP hosts, and
    /// DHCP clients that sent a host name. The DHCP server gives a client's name to one lease
    /// only and never a configured one; a lease name that still collides (none should) is
    /// left out, so configured names always win.
    pub fn zone(&self, dhcp: Option<&Mutex<DhcpServer>>, gw: &Gateway) -> LocalZone {
        let mut names: Vec<(String, Ipv4Addr)> = self.hosts.clone();
        if let Some(dhcp) = dhcp {
            let server = dhcp.lock().unwrap_or_else(|e| e.into_inner());
            names.extend(server.config().hosts.iter().filter_map(|h| Some((h.name.clone()?, h.ip))));
            let configured: HashSet<String> = names.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
            names.extend(
                server
                    .leases(unix_now())
                    .into_iter()
                    .filter_map(|l| Some((l.hostname?, l.ip)))
                    .filter(|(n, _)| !configured.contains(n) && !RESERVED_NAMES.contains(&n.as_str())),
            );
        }
        LocalZone { domain: self.domain.clone(), names, subnet: (gw.ip, gw.prefix) }
    }
}

/// DNS over UDP to port 53 of the gateway: answered at once into the reply, or forwarded
/// upstream (the answer comes later, from the forwarder's thread).
impl GatewayService for DnsService {
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let gw = cx.gateway;
        // Queries to the gateway's own address only: one to another server through the
        // gateway's MAC (socket NAT, a router) is for that server.
        if frame[0..6] != gw.mac || frame.len() < 34 || frame[30..34] != gw.ip.octets() {
            return Handled::NotMine;
        }
        let Some((client_ip, client_port, query)) = udp_datagram(frame, vunet_dhcp::dns::PORT) else { return Handled::NotMine };
        let client_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let answer = match self.zone(cx.dhcp, gw).respond(query) {
            Some(DnsAction::Answer(a)) => a,
            Some(DnsAction::Forward) => match &self.forwarder {
                Some(f) => {
                    f.forward(query, port.id, client_mac, client_ip, client_port);
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
