//! The seam between the switching step and the gateway's services. A frame for the gateway
//! (its MAC, or broadcast) is offered to the network's services in order; the first that
//! takes it ends the search. A new service (router advertisements, DHCPv6) is a new type in
//! `services/` and one more entry in the list the run-time layer builds.

use std::sync::Mutex;

use vunet_dhcp::DhcpServer;
use vunet_switch::gateway::{Gateway, Gateway6};
use vunet_switch::vnet::VnetHeader;

use super::port::Port;

/// What a service may read of its network while it handles a frame.
pub struct GatewayCx<'a> {
    /// The network's name, for logs.
    pub network: &'a str,
    pub gateway: &'a Gateway,
    /// The gateway's IPv6 side, if the network has `gateway6`.
    pub gateway6: Option<&'a Gateway6>,
    /// The network's DHCP state (leases name guests for DNS; the DHCP service serves them).
    pub dhcp: Option<&'a Mutex<DhcpServer>>,
    /// The frame's virtio-net header (GSO and checksum state; only services that
    /// `takes_offloaded` see frames where it matters).
    pub hdr: &'a VnetHeader,
}

/// What a service did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Not for this service: offer it to the next.
    NotMine,
    /// Taken; nothing to send now (an answer may come later through `Inject`).
    Consumed,
    /// Taken; `reply` holds the frame to send back to the sending port.
    Reply,
}

/// One service the gateway runs (ARP/ICMP, DHCP, DNS over UDP or TCP...).
pub trait GatewayService: Send + Sync {
    /// Looks at a complete frame (checksums filled in, no GSO) that `port` sent to the
    /// gateway or broadcast; writes an answer into `reply` when it returns `Reply`.
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled;

    /// Whether this service takes frames as the guest sent them: a TSO segment of up to
    /// 64 KiB, a partial checksum left unfilled (socket NAT writes payloads to host sockets and
    /// needs neither split nor checksum). Other services see complete frames only.
    fn takes_offloaded(&self) -> bool {
        false
    }

    /// Frames the service dropped that no port counter holds (they passed port security and
    /// failed the protocol's own checks), by reason, for the metrics; reasons with drops only.
    fn drops(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
