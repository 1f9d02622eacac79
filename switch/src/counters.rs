//! Per-port counters. Counted from the switch's side of the port, as OVS does for vhost-user
//! ports: `rx` is what the port received from its guest, `tx` what the port delivered to it.
//! Atomics with relaxed ordering: each counter is written by few threads and read rarely.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a frame was dropped. Each has its own counter on the port it concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A descriptor points outside guest memory.
    BadAddress,
    /// A descriptor chain loops or is longer than the queue.
    ChainLoop,
    /// A TX chain containing a device-writable descriptor, an RX chain with a readable one, a
    /// zero-length descriptor, or a chain of more descriptors than a queue holds.
    BadDescriptor,
    /// The chain is too short to hold a virtio-net header and an Ethernet header.
    ShortFrame,
    /// The frame is larger than the MTU (or, for a TSO frame, 64 KiB) plus an Ethernet header.
    Oversize,
    /// The virtio-net header is inconsistent (unknown GSO type, checksum offsets outside the
    /// frame, GSO without checksum offload, MSS of zero, ...).
    BadHeader,
    /// The source MAC is a multicast/broadcast address.
    BadSourceMac,
    /// The receiving guest had no free receive buffers (a full ring drops, it never blocks).
    NoRxBuffer,
    /// The receiving guest's buffers cannot hold the frame (no MRG_RXBUF and a short buffer).
    RxBufferTooSmall,
    /// Software segmentation could not parse the headers of a GSO frame, or it would make more
    /// than `offload::MAX_SEGMENTS` segments.
    SegmentationFailed,
    /// A GSO frame's MSS (`gso_size`) is below `vnet::MIN_GSO_SIZE`: segmenting it in software
    /// would turn one frame into hundreds.
    GsoTooSmall,
    /// The receiving port is not connected or its queue is not running.
    PortDown,
    /// Port security: a source (or ARP sender) MAC that is not the port's.
    SpoofedMac,
    /// Port security: a source (or ARP sender) IPv4 address that is not the port's lease; an
    /// IPv6 source (or advertised target) the port may not use.
    SpoofedIp,
    /// Port security: a DHCP server message (UDP from port 67, or DHCPv6 from 547) from a guest.
    RogueDhcpServer,
    /// Routing: a malformed or truncated IPv4 header (or transport header where NAT needs it).
    BadIpHeader,
    /// Routing: no route to the destination, or a martian source or destination.
    NoRoute,
    /// Routing: the TTL ran out (an ICMP time-exceeded went back).
    TtlExceeded,
    /// Routing: larger than the next link's MTU (an ICMPv6 packet too big went back).
    PacketTooBig,
    /// Routing: the next hop did not answer ARP, or its pending queue was full.
    NeighborUnreachable,
    /// NAT: inbound traffic that is neither a reply nor a port forward, or a protocol NAT
    /// does not translate (fragments, non-echo ICMP without a connection).
    NatNoConnection,
    /// NAT: no source port free, or the connection table full of connections it keeps.
    NatTableFull,
    /// Firewall: a deny or reject rule (or the default policy) matched.
    Firewall,
    /// The source MAC belongs to another port: a guest port with port security holds it (its
    /// first MAC, or its configured one), so nobody else may send with it or take it.
    MacInUse,
    /// Between two isolated ports (`isolated = true`): they reach the gateway, the uplink and
    /// other ports only.
    Isolated,
    /// Over the port's inbound rate limit with its queue full (`[network.port.bandwidth]`).
    RateLimited,
    /// Port security: a router advertisement or redirect (ICMPv6 134, 137) from a guest (RA
    /// guard): only the gateway is a router on a vunet network.
    RogueRouterAdvert,
    /// Port security: an IPv6 packet whose headers it cannot follow to the upper layer within
    /// the bytes it checks (too many or too long extension headers, truncated), or fragmented
    /// neighbour discovery (RFC 6980): either could hide a router advertisement.
    UncheckedIpv6,
    /// VLANs: a frame of a VLAN the port does not carry (a tag on an access port, a VID
    /// outside a trunk's list, an untagged frame on an uplink that is one VLAN of the LAN).
    VlanNotAllowed,
    /// VLANs: an 802.1Q tag cut short by the frame's end, or VID 4095 (reserved).
    BadVlanTag,
    /// VXLAN: a datagram shorter than the 8-byte VXLAN header.
    VxlanShort,
    /// VXLAN: the I flag is clear, or the VXLAN-GPE P bit is set (the payload may not be
    /// Ethernet).
    VxlanBadFlags,
    /// VXLAN: a VNI this uplink does not carry.
    VxlanUnknownVni,
}

impl DropReason {
    pub const ALL: [DropReason; 33] = [
        DropReason::BadAddress,
        DropReason::ChainLoop,
        DropReason::BadDescriptor,
        DropReason::ShortFrame,
        DropReason::Oversize,
        DropReason::BadHeader,
        DropReason::BadSourceMac,
        DropReason::NoRxBuffer,
        DropReason::RxBufferTooSmall,
        DropReason::SegmentationFailed,
        DropReason::GsoTooSmall,
        DropReason::PortDown,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::RogueDhcpServer,
        DropReason::BadIpHeader,
        DropReason::NoRoute,
        DropReason::TtlExceeded,
        DropReason::PacketTooBig,
        DropReason::NeighborUnreachable,
        DropReason::NatNoConnection,
        DropReason::NatTableFull,
        DropReason::Firewall,
        DropReason::MacInUse,
        DropReason::Isolated,
        DropReason::RateLimited,
        DropReason::RogueRouterAdvert,
        DropReason::UncheckedIpv6,
        DropReason::VlanNotAllowed,
        DropReason::BadVlanTag,
        DropReason::VxlanShort,
        DropReason::VxlanBadFlags,
        DropReason::VxlanUnknownVni,
    ];

    /// Stable name used in listings and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadAddress => "bad_address",
            DropReason::ChainLoop => "chain_loop",
            DropReason::BadDescriptor => "bad_descriptor",
            DropReason::ShortFrame => "short_frame",
            DropReason::Oversize => "oversize",
            DropReason::BadHeader => "bad_header",
            DropReason::BadSourceMac => "bad_source_mac",
            DropReason::NoRxBuffer => "no_rx_buffer",
            DropReason::RxBufferTooSmall => "rx_buffer_too_small",
            DropReason::SegmentationFailed => "segmentation_failed",
            DropReason::GsoTooSmall => "gso_too_small",
            DropReason::PortDown => "port_down",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::RogueDhcpServer => "rogue_dhcp_server",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::NoRoute => "no_route",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::PacketTooBig => "packet_too_big",
            DropReason::NeighborUnreachable => "neighbor_unreachable",
            DropReason::NatNoConnection => "nat_no_connection",
            DropReason::NatTableFull => "nat_table_full",
            DropReason::Firewall => "firewall",
            DropReason::MacInUse => "mac_in_use",
            DropReason::Isolated => "isolated",
            DropReason::RateLimited => "rate_limited",
            DropReason::RogueRouterAdvert => "rogue_router_advert",
            DropReason::UncheckedIpv6 => "unchecked_ipv6",
            DropReason::VlanNotAllowed => "vlan_not_allowed",
            DropReason::BadVlanTag => "bad_vlan_tag",
            DropReason::VxlanShort => "vxlan_short",
            DropReason::VxlanBadFlags => "vxlan_bad_flags",
            DropReason::VxlanUnknownVni => "vxlan_unknown_vni",
        }
    }
}

/// Frames, bytes and drops of one port.
#[derive(Debug)]
pub struct PortCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// A point-in-time copy of [`PortCounters`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::ALL.len()],
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for PortCounters {
    fn default() -> Self {
        PortCounters {
            rx_frames: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_frames: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Default for CounterSnapshot {
    fn default() -> Self {
        CounterSnapshot { rx_frames: 0, rx_bytes: 0, tx_frames: 0, tx_bytes: 0, drops: [0; DropReason::ALL.len()] }
    }
}

impl std::fmt::Display for CounterSnapshot {
    /// `rx 12 frames/3456 bytes, tx 7 frames/890 bytes, drops: no_rx_buffer=3 oversize=1`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rx {} frames/{} bytes, tx {} frames/{} bytes, drops:", self.rx_frames, self.rx_bytes, self.tx_frames, self.tx_bytes)?;
        let mut any = false;
        for r in DropReason::ALL {
            let n = self.drop_count(r);
            if n > 0 {
                write!(f, " {}={n}", r.name())?;
                any = true;
            }
        }
        if !any {
            write!(f, " none")?;
        }
        Ok(())
    }
}

impl CounterSnapshot {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

impl PortCounters {
    pub fn received(&self, bytes: usize) {
        self.received_many(1, bytes as u64);
    }
    pub fn delivered(&self, bytes: usize) {
        self.delivered_many(1, bytes as u64);
    }
    /// A burst's frames at once: the data path counts per burst, not per frame, because each
    /// locked add waits for the frame copies before it to leave the store buffer.
    pub fn received_many(&self, frames: u64, bytes: u64) {
        if frames > 0 {
            self.rx_frames.fetch_add(frames, Relaxed);
            self.rx_bytes.fetch_add(bytes, Relaxed);
        }
    }
    pub fn delivered_many(&self, frames: u64, bytes: u64) {
        if frames > 0 {
            self.tx_frames.fetch_add(frames, Relaxed);
            self.tx_bytes.fetch_add(bytes, Relaxed);
        }
    }
    pub fn dropped(&self, r: DropReason) {
        self.drops[r as usize].fetch_add(1, Relaxed);
    }
    pub fn snapshot(&self) -> CounterSnapshot {
        let mut s = CounterSnapshot {
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            ..Default::default()
        };
        for (d, c) in s.drops.iter_mut().zip(&self.drops) {
            *d = c.load(Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let c = PortCounters::default();
        c.received(60);
        c.received(100);
        c.delivered(42);
        c.dropped(DropReason::ChainLoop);
        c.dropped(DropReason::ChainLoop);
        c.dropped(DropReason::Oversize);
        let s = c.snapshot();
        assert_eq!((s.rx_frames, s.rx_bytes, s.tx_frames, s.tx_bytes), (2, 160, 1, 42));
        assert_eq!(s.drop_count(DropReason::ChainLoop), 2);
        assert_eq!(s.drop_count(DropReason::Oversize), 1);
        assert_eq!(s.drop_count(DropReason::BadAddress), 0);
        assert_eq!(s.total_drops(), 3);
        assert_eq!(s.to_string(), "rx 2 frames/160 bytes, tx 1 frames/42 bytes, drops: chain_loop=2 oversize=1");
        assert_eq!(PortCounters::default().snapshot().to_string(), "rx 0 frames/0 bytes, tx 0 frames/0 bytes, drops: none");
        let names: std::collections::HashSet<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
