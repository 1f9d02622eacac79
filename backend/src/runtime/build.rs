//! From a network's configuration to the data path's state: the `Network` with its ports,
//! gateway, DHCP state, router and the list of gateway services, in the order they are asked.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use vunet_switch::gateway::{gateway_mac, Gateway, Gateway6};
use vunet_switch::ratelimit::{Rate, TokenBucket};
use vunet_switch::router::{RouteMode, Router, RouterConfig};
use vunet_switch::router6::{Router6, Router6Config};
use vunet_switch::PortId;

use super::error::StartError;
use crate::config::{Mode, NetworkConfig, PortConfig, RateLimit, UplinkAddress};
use crate::datapath::{GatewayService, HostLink, Network, Port, PortKind, RxShaper};
use crate::ports::uplink::Uplink;
use crate::services::arp_icmp::ArpIcmp;
use crate::services::dhcp::{self, DhcpService, LeaseWriter};
use crate::services::dhcp6::{self, Dhcp6Service};
use crate::services::dns::DnsService;
use crate::services::ndp::NdpService;
use crate::services::socknat::SocketNat;

/// A network as built: the data path's state, and its DNS service whose threads the
/// supervisor starts (None without a gateway).
pub struct Built {
    pub net: Network,
    pub dns: Option<Arc<DnsService>>,
    /// The writer of the network's lease file (a state_dir and a DHCP server), whose thread
    /// the supervisor starts.
    pub leases: Option<Arc<LeaseWriter>>,
    /// Socket NAT (a nat network without an uplink), whose thread the supervisor starts.
    pub socknat: Option<Arc<SocketNat>>,
    /// IPv6 neighbour discovery (a network with gateway6), whose advertising thread the
    /// supervisor starts.
    pub ndp: Option<Arc<NdpService>>,
}

/// Builds network `n`; `taps` holds the opened taps of its tap ports, by port name. Fails
/// on a lease file that exists but cannot be read, or a host out of file descriptors.
pub fn network(n: &NetworkConfig, state_dir: Option<&Path>, taps: &HashMap<String, Arc<Uplink>>) -> Result<Built, StartError> {
    let mut net = Network::new(n.name.clone(), n.mode, n.mtu);
    net.busy_poll_us = n.busy_poll_us;
    net.workers = n.workers as usize;
    let gateway = n.gateway.map(|(ip, prefix)| Gateway { mac: gateway_mac(&n.name), ip, prefix });
    let has_dhcp = (n.dhcp.is_some() || n.dhcp6.is_some()) && gateway.is_some();
    let lease_file = state_dir.filter(|_| has_dhcp).map(|d| d.join(format!("{}.leases", n.name)));
    // One file holds both families' leases: read once, an error if it cannot be read.
    let saved = match &lease_file {
        Some(f) => dhcp::load_leases(&n.name, f)?,
        None => Default::default(),
    };
    net.gateway = gateway;
    net.gateway6 = gateway.and(n.gateway6).map(|(ip, prefix)| Gateway6::new(gateway_mac(&n.name), ip, prefix));
    net.reserved6 = n.dhcp6.iter().flat_map(|d| d.hosts.iter().map(|h| (h.ip, h.mac))).collect();
    net.dhcp6 = dhcp6::server(n, net.gateway6.as_ref(), &saved).map(|s| Arc::new(Mutex::new(s)));
    net.dhcp = dhcp::server(n, &saved).map(|mut server| {
        // The network's own DNS names are never a DHCP client's.
        server.reserve_names(n.dns.hosts.iter().map(|(name, _)| name.clone()).chain(n.dns.hosts6.iter().map(|(name, _)| name.clone())));
        Mutex::new(server)
    });
    let leases = lease_file.filter(|_| net.dhcp.is_some() || net.dhcp6.is_some()).map(|f| Arc::new(LeaseWriter::new(&n.name, f)));
    net.router = router(n, gateway).map(Mutex::new);
    net.router6 = router6(n, net.gateway6).map(Mutex::new);
    net.uplink_dhcp = n.routing.as_ref().is_some_and(|r| r.address == UplinkAddress::Dhcp);
    let ports: Vec<Arc<Port>> =
        n.ports.iter().enumerate().map(|(id, p)| Arc::new(guest_port(id, p, &net, taps.get(&p.name).cloned()))).collect();
    net.ports = ports.into();
    // The gateway's services, in the order a frame for the gateway is offered to them.
    let dns = gateway.map(|_| {
        let mut dns = DnsService::new(&n.name, &n.dns);
        // Named DHCPv6 reservations answer AAAA (after `dns.hosts`, which win).
        dns.hosts6.extend(n.dhcp6.iter().flat_map(|d| d.hosts.iter().filter_map(|h| Some((h.name.clone()?.to_ascii_lowercase(), h.ip)))));
        Arc::new(dns)
    });
    let socknat = match (gateway, &n.socket_nat) {
        (Some(gw), Some(cfg)) => Some(Arc::new(
            SocketNat::new(&n.name, gw, net.gateway6, n.mtu, cfg)
                .map_err(|e| StartError::Host(format!("network {:?}: socket NAT: {e}", n.name)))?,
        )),
        _ => None,
    };
    let ndp = net
        .gateway6
        .map(|g6| Arc::new(NdpService::new(&n.name, g6, n.ipv6_default_route(), n.mtu, n.dhcp6.is_some(), n.dns.domain.as_deref())));
    if let Some(dns) = &dns {
        let mut services: Vec<Arc<dyn GatewayService>> =
            vec![dns.tcp.clone(), Arc::new(ArpIcmp), Arc::new(DhcpService { leases: leases.clone() }), dns.clone()];
        if let Some(server) = &net.dhcp6 {
            let (w, rev) = (leases.clone(), net.leases6_rev.clone());
            // A change also makes ports re-check their IPv6 claims against the leases.
            let leases_changed: Option<Box<dyn Fn() + Send + Sync>> = Some(Box::new(move || {
                rev.fetch_add(1, std::sync::atomic::Ordering::Release);
                if let Some(w) = &w {
                    w.mark_dirty();
                }
            }));
            // Before DNS and socket NAT, which take UDP too.
            services.insert(3, Arc::new(Dhcp6Service { server: server.clone(), leases_changed }));
        }
        if let Some(s) = &ndp {
            services.push(s.clone());
        }
        // Last: it takes what the gateway's own services did not (TCP and UDP for outside).
        if let Some(s) = &socknat {
            services.push(s.clone());
        }
        net.services = services;
    }
    Ok(Built { net, dns, leases, socknat, ndp })
}

/// A port of network `net` (with a gateway, port security defaults on), with its tap if it
/// is one.
pub fn guest_port(id: PortId, p: &PortConfig, net: &Network, tap: Option<Arc<Uplink>>) -> Port {
    let has_gateway = net.gateway.is_some();
    let kind = if tap.is_some() { PortKind::Tap } else { PortKind::Vhost };
    let mut port = Port::new(id, p.name.clone(), kind).with_mac(p.mac).with_queues(p.queues as usize);
    port.socket = p.socket.clone();
    port.mode = p.mode;
    port.isolated = p.isolated;
    port.bandwidth = p.bandwidth;
    let bucket = |l: &RateLimit| TokenBucket::new(Rate { average_kbs: l.average, peak_kbs: l.peak, burst_kib: l.burst }, 0);
    port.tx_limit = p.bandwidth.outbound.as_ref().map(|l| Mutex::new(bucket(l)));
    port.rx_limit = p.bandwidth.inbound.as_ref().map(|l| Mutex::new(RxShaper::new(bucket(l), net.shaper.clone())));
    port.vlan = p.vlan.clone();
    // A tap port is the host's own interface: trusted unless asked otherwise.
    port.security = p.port_security.unwrap_or(has_gateway && p.tap.is_none());
    // A tap is there from the start; a guest port is connected when its VMM comes.
    port.connected = AtomicBool::new(tap.is_some());
    port.link = tap.map(|t| t as Arc<dyn HostLink>);
    port
}

/// The switch port of a network's uplink (always "connected"; the uplink itself knows whether
/// its interface is there).
pub fn uplink_port(id: PortId, routed: bool, up: Arc<Uplink>, vlan: vunet_switch::vlan::PortVlan) -> Port {
    let mut port = Port::new(id, format!("uplink:{}", up.ifname), PortKind::Uplink);
    port.vlan = vlan;
    port.connected = AtomicBool::new(true);
    port.routed = routed;
    port.link = Some(up);
    port
}

/// The router of a nat or route network with an uplink; a static uplink address is set at
/// once, a leased one when the lease comes.
fn router(n: &NetworkConfig, gateway: Option<Gateway>) -> Option<Router> {
    let (r, inside) = (n.routing.as_ref()?, gateway?);
    let cfg = RouterConfig {
        mode: if n.mode == Mode::Nat { RouteMode::Nat } else { RouteMode::Route },
        inside,
        outside_mac: r.mac,
        next_hop: None,
        routes: r.routes.clone(),
        proxy_arp: r.proxy_arp,
        nat: r.nat.clone(),
        firewall: r.firewall.clone(),
        firewall_default: r.firewall_default,
    };
    let mut router = Router::new(cfg, None);
    if let UplinkAddress::Static { addr, router: next_hop } = r.address {
        // The gratuitous ARP goes out when the uplink thread starts.
        router.set_outside(Some(addr), next_hop, &mut Vec::new());
    }
    Some(router)
}

/// The IPv6 router of a nat or route network whose uplink has an IPv6 address (`address6`).
fn router6(n: &NetworkConfig, inside: Option<Gateway6>) -> Option<Router6> {
    let (r, inside) = (n.routing.as_ref()?, inside?);
    let v6 = r.v6?;
    // Packet too big names the uplink interface's MTU (a macvtap's is its parent's).
    let outside_mtu = n
        .uplink
        .as_ref()
        .and_then(|u| std::fs::read_to_string(format!("/sys/class/net/{}/mtu", u.interface)).ok())
        .and_then(|m| m.trim().parse::<u16>().ok())
        .filter(|m| *m >= 1280)
        .unwrap_or(n.mtu);
    Some(Router6::new(Router6Config {
        mode: if n.mode == Mode::Nat { RouteMode::Nat } else { RouteMode::Route },
        inside,
        outside_mac: r.mac,
        outside: v6.address,
        next_hop: v6.router,
        proxy_ndp: v6.proxy_ndp,
        inside_mtu: n.mtu,
        outside_mtu,
        firewall: r.firewall.clone(),
        firewall_default: r.firewall_default,
    }))
}
