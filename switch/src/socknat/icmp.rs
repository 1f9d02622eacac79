//! ICMP echo (ping) through unprivileged ping sockets (`socket(AF_INET, SOCK_DGRAM,
//! IPPROTO_ICMP)`, allowed by `net.ipv4.ping_group_range`). One socket per flow, a flow being
//! a guest address, its echo identifier and the remote address, so a reply read from the
//! socket goes back to exactly the guest and identifier that asked. The kernel gives each ping
//! socket an identifier of its own and rewrites the one the guest chose, both ways round: the
//! reply's identifier is restored here, and its checksum fixed. Flows expire when idle; the
//! table is bounded in all and per guest, and a full table drops new flows (counted), never
//! old ones.

use std::collections::HashMap;
use std::net::IpAddr;

use super::wire::{self, Link, ICMP_ECHO_LEN, ICMP_ECHO_REPLY, ICMP_FRAME_HDR};
use super::{Counters, Drop, FlowId};
use crate::checksum::{finish, sum};
use crate::vnet::VnetHeader;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpConfig {
    /// All flows (ping sockets) of the network.
    pub max_flows: usize,
    /// Flows of one guest address.
    pub max_per_guest: usize,
    /// Idle time-out (ms). A ping sends every second; a minute of silence means it stopped.
    pub idle_ms: u64,
}

impl Default for IcmpConfig {
    fn default() -> Self {
        IcmpConfig { max_flows: 1024, max_per_guest: 256, idle_ms: 60_000 }
    }
}

/// A flow's identity: who pings whom, with which echo identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IcmpKey {
    pub guest: IpAddr,
    /// The identifier the guest put in its echo requests.
    pub ident: u16,
    pub remote: IpAddr,
}

/// What the I/O layer does with a guest echo request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpOp<'a> {
    /// A new flow: open a ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`), `connect()` it to
    /// `remote`, then `send()` `message` (the whole ICMP message; the kernel sets its own
    /// identifier and the checksum).
    Open { id: FlowId, remote: IpAddr, message: &'a [u8] },
    /// An existing flow: `send()` `message` on its socket.
    Send { id: FlowId, message: &'a [u8] },
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    key: IcmpKey,
    link: Link,
    last_ms: u64,
}

/// The ICMP echo flows of one network.
pub struct IcmpTable {
    cfg: IcmpConfig,
    slots: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    by_key: HashMap<IcmpKey, FlowId>,
    per_guest: HashMap<IpAddr, usize>,
    live: usize,
    ip_id: u16,
    pub counters: Counters,
}

impl IcmpTable {
    pub fn new(cfg: IcmpConfig) -> IcmpTable {
        IcmpTable {
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            per_guest: HashMap::new(),
            live: 0,
            ip_id: 0,
            counters: Counters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn guest_flows(&self, guest: IpAddr) -> usize {
        self.per_guest.get(&guest).copied().unwrap_or(0)
    }

    pub fn key(&self, id: FlowId) -> Option<IcmpKey> {
        Some(self.slots.get(id)?.as_ref()?.key)
    }

    /// An ICMP frame from a guest: an echo request goes out on its flow's ping socket, to any
    /// address (the I/O layer decides which destinations it lets through). Anything else, or a
    /// new flow beyond the bounds, is dropped and counted.
    pub fn input<'a>(&mut self, frame: &'a [u8], hdr: &VnetHeader, now: u64) -> Result<IcmpOp<'a>, Drop> {
        let e = wire::parse_icmp_echo(frame, hdr).inspect_err(|&why| self.counters.drop(why))?;
        let key = IcmpKey { guest: e.src, ident: e.ident, remote: e.dst };
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(f) = self.slots[id].as_mut() {
                f.last_ms = now;
                f.link = e.link;
            }
            self.counters.bytes_to_host += e.message.len() as u64;
            return Ok(IcmpOp::Send { id, message: e.message });
        }
        let why = if self.live >= self.cfg.max_flows {
            Drop::TableFull
        } else if self.guest_flows(e.src) >= self.cfg.max_per_guest {
            Drop::ShareExceeded
        } else {
            let id = super::place(&mut self.slots, &mut self.free, Flow { key, link: e.link, last_ms: now });
            self.by_key.insert(key, id);
            *self.per_guest.entry(e.src).or_insert(0) += 1;
            self.live += 1;
            self.counters.bytes_to_host += e.message.len() as u64;
            return Ok(IcmpOp::Open { id, remote: e.dst, message: e.message });
        };
        self.counters.drop(why);
        Err(why)
    }

    /// A message the flow's ping socket received: the caller put its `len` bytes (ICMP header
    /// and data, as `recv` on a ping socket gives them) at `wire::ICMP_FRAME_HDR` in `buf`.
    /// For an echo reply this restores the guest's identifier (the kernel's is in it), fixes
    /// the checksum and writes the headers in front, from the remote to the guest. Returns the
    /// frame length; None for an unknown flow, a message that is no echo reply or does not
    /// fit `buf` (counted as `bad_icmp`), or a packet too large for IP.
    pub fn reply(&mut self, id: FlowId, len: usize, buf: &mut [u8], now: u64) -> Option<usize> {
        let f = self.slots.get_mut(id)?.as_mut()?;
        let end = ICMP_FRAME_HDR.checked_add(len)?;
        let Some(m) = buf.get_mut(ICMP_FRAME_HDR..end) else {
            self.counters.drop(Drop::BadIcmp);
            return None;
        };
        if m.len() < ICMP_ECHO_LEN {
            self.counters.drop(Drop::BadIcmp);
            return None;
        }
        if m[0] != ICMP_ECHO_REPLY || m[1] != 0 {
            // A ping socket delivers only echo replies (errors come on its error queue).
            self.counters.drop(Drop::BadIcmp);
            return None;
        }
        f.last_ms = now;
        let (link, key) = (f.link, f.key);
        m[4..6].copy_from_slice(&key.ident.to_be_bytes());
        m[2..4].copy_from_slice(&[0, 0]);
        let c = finish(sum(m, 0));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        self.ip_id = self.ip_id.wrapping_add(1);
        let n = wire::write_icmp_frame(buf, &link, key.remote, key.guest, len, self.ip_id)?;
        self.counters.bytes_to_guest += len as u64;
        Some(n)
    }

    /// Removes the flows idle too long and passes each id to `closed`, for the I/O layer to
    /// close its socket.
    pub fn tick(&mut self, now: u64, mut closed: impl FnMut(FlowId)) {
        for id in 0..self.slots.len() {
            let expired = matches!(&self.slots[id], Some(f) if now.saturating_sub(f.last_ms) >= self.cfg.idle_ms);
            if expired {
                self.remove(id);
                self.counters.idle_timeouts += 1;
                closed(id);
            }
        }
    }

    /// Removes a flow (its socket failed for good, or the network goes away).
    pub fn remove(&mut self, id: FlowId) -> bool {
        let Some(f) = self.slots.get_mut(id).and_then(Option::take) else { return false };
        self.by_key.remove(&f.key);
        if let Some(n) = self.per_guest.get_mut(&f.key.guest) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&f.key.guest);
            }
        }
        self.free.push(id);
        self.live -= 1;
        true
    }
}
