//! Socket NAT: guests reach the outside through the host's own sockets, with no privileges,
//! no tap and no uplink address (issue 13). The pure half: protocol state machines over byte
//! slices. The I/O half (sockets, epoll, timers) lives in the backend and drives these.
//!
//! - [`wire`]: parsing guest frames and building frames back (Ethernet, IPv4 and IPv6).
//! - [`tcp`]: one guest TCP connection spliced onto one host stream socket, without buffering.
//! - [`udp`]: UDP flows, one connected host socket each.
//! - [`icmp`]: ICMP echo through unprivileged ping sockets, one per guest echo flow.
//! - [`TcpTable`] (here): the bounded table of TCP flows of one network.
//!
//! docs/socket-nat.md describes the design and what the I/O layer must do.

pub mod icmp;
pub mod tcp;
pub mod udp;
pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::vnet::VnetHeader;
use tcp::{TcpConfig, TcpFlow};
use wire::{TcpSegment, ACK, RST, SYN};

/// Why socket NAT dropped a guest frame or segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Drop {
    /// Shorter than Ethernet and an IP header.
    ShortFrame,
    /// Neither IPv4 nor IPv6; or an inbound flow whose two ends are of different versions.
    NotIp,
    /// Bad version, header length, total length or header checksum; an IPv6 extension header
    /// chain that is truncated, too long, or has a routing header with segments left.
    BadIpHeader,
    /// An IP fragment: nothing here reassembles.
    Fragment,
    NotTcp,
    NotUdp,
    /// TCP header truncated, or a data offset outside the segment.
    BadTcpHeader,
    /// TCP options that overrun the header, or an MSS or window scale of the wrong length.
    BadOptions,
    /// UDP header truncated, a length field that does not fit, or a UDP GSO frame.
    BadUdpHeader,
    /// A TCP segment, not a SYN, for no flow (answered with RST).
    NoFlow,
    /// A new flow over the guest's share of the table (a SYN is answered with RST).
    ShareExceeded,
    /// A new flow with the table full (a SYN is answered with RST).
    TableFull,
    /// A segment for a flow already closed.
    FlowClosed,
    /// A segment that is not valid in the flow's state (data before the handshake).
    BadState,
    /// A segment without ACK after the handshake.
    NoAck,
    /// An ACK for data never sent, or a wrong ACK of our SYN-ACK.
    BadAck,
    /// A RST outside the window.
    BadRst,
    /// Data after a hole: no reassembly, the guest resends in order (a duplicate ACK asks).
    OutOfOrder,
    /// Data beyond the window offered (in part or whole).
    BeyondWindow,
    /// Data after the guest's own FIN.
    AfterFin,
    /// An inbound connection (port forward) whose addresses a live flow already uses.
    FlowExists,
    NotIcmp,
    /// ICMP shorter than its header, a bad ICMP checksum, or an ICMP GSO frame.
    BadIcmp,
    /// ICMP other than an echo request (code 0): nothing else goes out through ping sockets.
    NotEchoRequest,
}

impl Drop {
    pub const COUNT: usize = 24;
    pub const ALL: [Drop; Drop::COUNT] = [
        Drop::ShortFrame,
        Drop::NotIp,
        Drop::BadIpHeader,
        Drop::Fragment,
        Drop::NotTcp,
        Drop::NotUdp,
        Drop::BadTcpHeader,
        Drop::BadOptions,
        Drop::BadUdpHeader,
        Drop::NoFlow,
        Drop::ShareExceeded,
        Drop::TableFull,
        Drop::FlowClosed,
        Drop::BadState,
        Drop::NoAck,
        Drop::BadAck,
        Drop::BadRst,
        Drop::OutOfOrder,
        Drop::BeyondWindow,
        Drop::AfterFin,
        Drop::FlowExists,
        Drop::NotIcmp,
        Drop::BadIcmp,
        Drop::NotEchoRequest,
    ];

    /// The name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Drop::ShortFrame => "short_frame",
            Drop::NotIp => "not_ip",
            Drop::BadIpHeader => "bad_ip_header",
            Drop::Fragment => "fragment",
            Drop::NotTcp => "not_tcp",
            Drop::NotUdp => "not_udp",
            Drop::BadTcpHeader => "bad_tcp_header",
            Drop::BadOptions => "bad_tcp_options",
            Drop::BadUdpHeader => "bad_udp_header",
            Drop::NoFlow => "no_flow",
            Drop::ShareExceeded => "share_exceeded",
            Drop::TableFull => "table_full",
            Drop::FlowClosed => "flow_closed",
            Drop::BadState => "bad_state",
            Drop::NoAck => "no_ack",
            Drop::BadAck => "bad_ack",
            Drop::BadRst => "bad_rst",
            Drop::OutOfOrder => "out_of_order",
            Drop::BeyondWindow => "beyond_window",
            Drop::AfterFin => "after_fin",
            Drop::FlowExists => "flow_exists",
            Drop::NotIcmp => "not_icmp",
            Drop::BadIcmp => "bad_icmp",
            Drop::NotEchoRequest => "not_echo_request",
        }
    }
}

/// Counters of a flow, or of a table (its own drops plus those of its flows). Plain integers:
/// a flow lives on one thread; the backend copies them into its metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub drops: [u64; Drop::COUNT],
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    /// Host data sent to the guest again (retransmissions).
    pub retransmitted_bytes: u64,
    pub fast_retransmits: u64,
    pub rto_retransmits: u64,
    pub persist_probes: u64,
    /// Guest segments that repeated data already acknowledged (answered with an ACK).
    pub guest_retransmits: u64,
    pub challenge_acks: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub connect_timeouts: u64,
    pub idle_timeouts: u64,
    pub guest_resets: u64,
    pub host_resets: u64,
    pub resets_sent: u64,
    /// Flows reset by us (time-outs, retries exhausted).
    pub aborts: u64,
}

impl Counters {
    pub fn drop(&mut self, why: Drop) {
        self.drops[why as usize] += 1;
    }

    pub fn dropped(&self, why: Drop) -> u64 {
        self.drops[why as usize]
    }

    pub fn add(&mut self, o: &Counters) {
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        self.bytes_to_host += o.bytes_to_host;
        self.bytes_to_guest += o.bytes_to_guest;
        self.retransmitted_bytes += o.retransmitted_bytes;
        self.fast_retransmits += o.fast_retransmits;
        self.rto_retransmits += o.rto_retransmits;
        self.persist_probes += o.persist_probes;
        self.guest_retransmits += o.guest_retransmits;
        self.challenge_acks += o.challenge_acks;
        self.refused += o.refused;
        self.unreachable += o.unreachable;
        self.connect_timeouts += o.connect_timeouts;
        self.idle_timeouts += o.idle_timeouts;
        self.guest_resets += o.guest_resets;
        self.host_resets += o.host_resets;
        self.resets_sent += o.resets_sent;
        self.aborts += o.aborts;
    }
}

/// A flow's identity: the guest's end and the remote end it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddr,
    pub remote: SocketAddr,
}

/// An index into a table; stable for the flow's life (reused after removal).
pub type FlowId = usize;

/// Bounds and timers of the TCP flows of one network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpTableConfig {
    /// All flows of the network (`[network.nat] max_connections`).
    pub max_connections: usize,
    /// Flows of one guest address: its share, so one guest's SYN flood leaves room for the
    /// others.
    pub max_per_guest: usize,
    pub tcp: TcpConfig,
}

impl Default for TcpTableConfig {
    fn default() -> Self {
        TcpTableConfig { max_connections: 4096, max_per_guest: 1024, tcp: TcpConfig::default() }
    }
}

/// What became of a guest frame given to [`TcpTable::input`].
#[derive(Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// A segment for an existing flow: pass it to `flow_mut(id).on_segment`.
    Segment(FlowId, TcpSegment<'a>),
    /// A SYN made a new flow (it already took the SYN): drain its `poll_host` (Connect).
    Opened(FlowId),
    /// Refused or unknown: a RST of this length is in the output buffer, for the guest.
    Reply(usize, Drop),
    /// Dropped, counted.
    Dropped(Drop),
}

/// The TCP flows of one network, bounded in all and per guest. A full table refuses new flows
/// (RST to the SYN, counted); it never evicts an existing one for a new one.
pub struct TcpTable {
    cfg: TcpTableConfig,
    slots: Vec<Option<TcpFlow>>,
    free: Vec<FlowId>,
    by_key: HashMap<FlowKey, FlowId>,
    per_guest: HashMap<IpAddr, usize>,
    live: usize,
    /// Table drops, plus the counters of the flows already removed.
    counters: Counters,
    isn: u32,
    ip_id: u16,
}

impl TcpTable {
    /// `isn_seed` starts the initial sequence numbers (the caller picks it at random). ISNs
    /// guard nothing here but the guest from itself (the remote end sees the host kernel's),
    /// so a seeded, stepping counter is enough.
    pub fn new(cfg: TcpTableConfig, isn_seed: u32) -> TcpTable {
        TcpTable {
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            per_guest: HashMap::new(),
            live: 0,
            counters: Counters::default(),
            isn: isn_seed,
            ip_id: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Flows of one guest address.
    pub fn guest_flows(&self, guest: IpAddr) -> usize {
        self.per_guest.get(&guest).copied().unwrap_or(0)
    }

    pub fn get(&self, key: &FlowKey) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    pub fn flow(&self, id: FlowId) -> Option<&TcpFlow> {
        self.slots.get(id)?.as_ref()
    }

    pub fn flow_mut(&mut self, id: FlowId) -> Option<&mut TcpFlow> {
        self.slots.get_mut(id)?.as_mut()
    }

    /// Live flows, for listings and timers.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &TcpFlow)> {
        self.slots.iter().enumerate().filter_map(|(i, f)| f.as_ref().map(|f| (i, f)))
    }

    /// Counters of the table and all its flows, live and removed.
    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        for (_, f) in self.iter() {
            c.add(&f.counters);
        }
        c
    }

    /// Counts a drop found before the table (a malformed frame the caller parsed).
    pub fn count(&mut self, why: Drop) {
        self.counters.drop(why);
    }

    /// A TCP frame from a guest. Malformed frames are dropped and counted; a segment for no
    /// flow is answered with RST built into `out` (which must hold 74 bytes for IPv6, 54 for IPv4); a SYN opens a
    /// flow within the bounds.
    pub fn input<'a>(&mut self, frame: &'a [u8], hdr: &VnetHeader, now: u64, out: &mut [u8]) -> Input<'a> {
        let seg = match wire::parse_tcp(frame, hdr) {
            Ok(s) => s,
            Err(why) => {
                self.counters.drop(why);
                return Input::Dropped(why);
            }
        };
        let key = FlowKey { guest: seg.src, remote: seg.dst };
        let syn = seg.has(SYN) && !seg.has(ACK) && !seg.has(RST);
        if let Some(&id) = self.by_key.get(&key) {
            // A new connection on the same ports as one that is over but not yet removed (the
            // guest's TIME_WAIT is its own business): the old flow makes room.
            let done = self.flow(id).is_some_and(|f| f.is_done());
            if !(syn && done) {
                return Input::Segment(id, seg);
            }
            self.remove(id);
        }
        let why = if !syn {
            Drop::NoFlow
        } else if self.live >= self.cfg.max_connections {
            Drop::TableFull
        } else if self.guest_flows(seg.src.ip()) >= self.cfg.max_per_guest {
            Drop::ShareExceeded
        } else {
            return Input::Opened(self.open(key, &seg, now));
        };
        self.counters.drop(why);
        self.ip_id = self.ip_id.wrapping_add(1);
        match wire::write_rst_reply(out, &seg, self.ip_id) {
            Some(n) => {
                self.counters.resets_sent += 1;
                Input::Reply(n, why)
            }
            None => Input::Dropped(why),
        }
    }

    /// An inbound connection (a port forward): the host accepted a connection and holds its
    /// connected socket; the guest is to see it come from `remote` to its `guest` address and
    /// port, through `link`. Makes a flow whose first frame is our SYN to the guest (drain
    /// `poll_frame`), bounded as outbound flows are. On refusal (the bounds, a live flow on the
    /// same addresses, ends of different IP versions) the drop is counted and returned: the I/O
    /// layer closes the accepted socket with a reset.
    pub fn open_inbound(&mut self, link: wire::Link, guest: SocketAddr, remote: SocketAddr, now: u64) -> Result<FlowId, Drop> {
        let key = FlowKey { guest, remote };
        let why = if guest.is_ipv4() != remote.is_ipv4() {
            Drop::NotIp
        } else if self.by_key.get(&key).is_some_and(|&id| self.flow(id).is_some_and(|f| !f.is_done())) {
            Drop::FlowExists
        } else {
            if let Some(&id) = self.by_key.get(&key) {
                // Over but not yet removed: it makes room, as for a guest's new SYN.
                self.remove(id);
            }
            if self.live >= self.cfg.max_connections {
                Drop::TableFull
            } else if self.guest_flows(guest.ip()) >= self.cfg.max_per_guest {
                Drop::ShareExceeded
            } else {
                let iss = self.next_isn(now);
                let flow = TcpFlow::new_inbound(self.cfg.tcp, link, guest, remote, iss, now);
                return Ok(self.insert(key, flow));
            }
        };
        self.counters.drop(why);
        Err(why)
    }

    fn next_isn(&mut self, now: u64) -> u32 {
        // Steps far apart so consecutive flows of one guest do not overlap in sequence space.
        self.isn = self.isn.wrapping_add(0x0101_0ab7u32.wrapping_mul(7).wrapping_add(now as u32 & 0xffff));
        self.isn
    }

    fn open(&mut self, key: FlowKey, syn: &TcpSegment, now: u64) -> FlowId {
        let iss = self.next_isn(now);
        let flow = TcpFlow::new(self.cfg.tcp, syn, iss, now);
        self.insert(key, flow)
    }

    fn insert(&mut self, key: FlowKey, flow: TcpFlow) -> FlowId {
        let id = place(&mut self.slots, &mut self.free, flow);
        self.by_key.insert(key, id);
        *self.per_guest.entry(key.guest.ip()).or_insert(0) += 1;
        self.live += 1;
        id
    }

    /// Removes a flow (once [`TcpFlow::is_done`], or when the I/O layer gives up on it).
    pub fn remove(&mut self, id: FlowId) -> Option<TcpFlow> {
        let flow = self.slots.get_mut(id)?.take()?;
        let key = FlowKey { guest: flow.guest(), remote: flow.remote() };
        self.by_key.remove(&key);
        if let Some(n) = self.per_guest.get_mut(&key.guest.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&key.guest.ip());
            }
        }
        self.counters.add(&flow.counters);
        self.free.push(id);
        self.live -= 1;
        Some(flow)
    }

    /// Runs every flow's timers. Returns how many flows are done (for the caller to drain and
    /// remove); a caller with its own timer wheel calls `TcpFlow::tick` per flow instead.
    pub fn tick(&mut self, now: u64) -> usize {
        let mut done = 0;
        for f in self.slots.iter_mut().flatten() {
            f.tick(now);
            done += f.is_done() as usize;
        }
        done
    }
}

#[cfg(test)]
mod tests;

/// Puts `v` in a free slot (one a finished flow left), else in a new one; returns its index,
/// the flow's id. Ids are reused, so the tables never grow past their high-water mark.
pub(crate) fn place<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<usize>, v: T) -> usize {
    match free.pop() {
        Some(id) => {
            slots[id] = Some(v);
            id
        }
        None => {
            slots.push(Some(v));
            slots.len() - 1
        }
    }
}
