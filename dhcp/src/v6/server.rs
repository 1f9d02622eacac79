//! The DHCPv6 server state machine (RFC 8415 §18.3): one binding per (client DUID, IAID),
//! each holding a distinct address. The table is bounded ([`MAX_BINDINGS`], and
//! [`MAX_PER_MAC`] per client MAC) however large the range, so a flood of Solicits with
//! made-up DUIDs cannot grow it.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use dhcproto::v6::{DhcpOption, DhcpOptions, IAAddr, Message, MessageType, Status, StatusCode, IANA};
use dhcproto::{Decodable, Encodable, Name};

use crate::Mac;

/// How long an Advertise holds its address for the client.
pub const OFFER_SECS: u64 = 60;
/// How long an address a client Declined (someone else uses it) is left alone.
pub const DECLINE_SECS: u64 = 600;
/// Most bindings (offers and leases) held at once.
pub const MAX_BINDINGS: usize = 4096;
/// Most bindings one client MAC holds: a guest changing its DUID or IAID takes over its
/// oldest binding past this.
pub const MAX_PER_MAC: usize = 8;
/// Most declined addresses remembered.
pub const MAX_DECLINED: usize = 256;
/// Most IA_NAs of one message answered; a client asks for one.
const MAX_IAS: usize = 4;
/// Longest DUID (RFC 8415 §11.1: 128 octets after the 2-octet type).
const MAX_DUID: usize = 130;
/// Longest message considered: a DHCPv6 message fits an Ethernet MTU, and the bound keeps
/// the codec's recursion over nested options shallow.
const MAX_MESSAGE: usize = 1500;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticHost6 {
    pub mac: Mac,
    pub ip: Ipv6Addr,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server6Config {
    /// The gateway's MAC: the server's DUID-LL.
    pub server_mac: Mac,
    /// The gateway's global address and the prefix length of the link.
    pub gateway: Ipv6Addr,
    pub prefix: u8,
    /// Addresses handed out dynamically, first and last.
    pub range: Option<(Ipv6Addr, Ipv6Addr)>,
    pub hosts: Vec<StaticHost6>,
    pub lease_secs: u32,
    /// Announced DNS server (option 23) and search domain (option 24).
    pub dns: Option<Ipv6Addr>,
    pub domain: Option<String>,
}

/// A bound lease, as listed and persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease6 {
    /// The client's MAC: from its DUID's link-layer address, else the frames it sent from.
    pub mac: Mac,
    pub ip: Ipv6Addr,
    /// Expiry, in the caller's clock (seconds since the Unix epoch in vunet).
    pub expires: u64,
    pub hostname: Option<String>,
    pub duid: Vec<u8>,
    pub iaid: u32,
}

#[derive(Clone, Debug)]
struct Binding {
    mac: Mac,
    ip: Ipv6Addr,
    expires: u64,
    bound: bool,
}

type Key = (Vec<u8>, u32);

/// The link-layer address in a DUID-LLT (type 1) or DUID-LL (type 3) of Ethernet (hardware
/// type 1).
pub fn duid_mac(duid: &[u8]) -> Option<Mac> {
    let ll = match duid {
        [0, 1, 0, 1, _, _, _, _, rest @ ..] => rest,
        [0, 3, 0, 1, rest @ ..] => rest,
        _ => return None,
    };
    <Mac>::try_from(ll).ok()
}

/// The link-layer address in the Client Identifier of a DHCPv6 message, if it has one.
pub fn client_duid_mac(payload: &[u8]) -> Option<Mac> {
    let msg = decode(payload)?;
    match msg.opts().get(dhcproto::v6::OptionCode::ClientId) {
        Some(DhcpOption::ClientId(d)) => duid_mac(d),
        _ => None,
    }
}

/// A client's message, decoded; None for anything else (relay messages, too long, garbage).
fn decode(payload: &[u8]) -> Option<Message> {
    // Relay-forward/reply nest whole messages: no relays here.
    if payload.len() > MAX_MESSAGE || matches!(payload.first(), Some(12 | 13) | None) {
        return None;
    }
    if !well_formed(&payload[4.min(payload.len())..], 0) {
        return None;
    }
    Message::from_bytes(payload).ok()
}

/// Deepest nesting of options a client needs: IA_NA → IA Address → Status Code.
const MAX_DEPTH: usize = 3;

/// Whether the options in `buf` nest no deeper than `MAX_DEPTH`, carry no relay message, and
/// have the lengths their fixed fields need. The codec decodes nested options by recursion (a
/// guest must not choose its depth), reads fixed fields whatever the option's length says,
/// and subtracts from lengths it has not checked (a panic with overflow checks): this check
/// comes first.
fn well_formed(mut buf: &[u8], depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    while buf.len() >= 4 {
        let code = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        // An option running past its container: malformed (the codec would read fixed fields
        // past the option's own length first).
        let Some(data) = buf.get(4..4 + len) else { return false };
        let fits = match code {
            7 | 19 => len == 1,  // Preference, Reconfigure Message
            8 => len == 2,       // Elapsed Time
            12 => len == 16,     // Server Unicast
            13 => len >= 2,      // Status Code
            14 | 20 => len == 0, // Rapid Commit, Reconfigure Accept
            16 | 17 => len >= 4, // Vendor Class, Vendor-specific Information
            3 | 25 => len >= 12, // IA_NA, IA_PD
            4 => len >= 4,       // IA_TA
            5 => len >= 24,      // IA Address
            26 => len >= 25,     // IA Prefix
            _ => true,
        };
        if !fits {
            return false;
        }
        // Where each encapsulating option's own options start.
        let inner = match code {
            9 => return false,
            3 | 25 => 12,
            4 | 17 => 4,
            5 => 24,
            26 => 25,
            _ => usize::MAX,
        };
        if let Some(sub) = data.get(inner..) {
            if !well_formed(sub, depth + 1) {
                return false;
            }
        }
        buf = &buf[4 + len..];
    }
    true
}

fn in_prefix(ip: &Ipv6Addr, net: &Ipv6Addr, prefix: u8) -> bool {
    let m = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix.min(128) as u32) };
    u128::from(*ip) & m == u128::from(*net) & m
}

pub struct Dhcp6Server {
    cfg: Server6Config,
    duid: Vec<u8>,
    bindings: BTreeMap<Key, Binding>,
    by_ip: BTreeMap<Ipv6Addr, Key>,
    declined: BTreeMap<Ipv6Addr, u64>,
    /// Where the walk for a free address starts: after the last address given.
    cursor: u128,
}

/// What one IA_NA of a message gets.
enum IaAnswer {
    /// The address with its lifetimes (0 for an address the client must stop using).
    Addr(Ipv6Addr, u32),
    Status(Status, &'static str),
}

impl Dhcp6Server {
    pub fn new(cfg: Server6Config) -> Self {
        let mut duid = vec![0, 3, 0, 1];
        duid.extend_from_slice(&cfg.server_mac);
        let cursor = cfg.range.map(|(lo, _)| u128::from(lo)).unwrap_or(0);
        Dhcp6Server { cfg, duid, bindings: BTreeMap::new(), by_ip: BTreeMap::new(), declined: BTreeMap::new(), cursor }
    }

    pub fn config(&self) -> &Server6Config {
        &self.cfg
    }

    /// The server's DUID (DUID-LL of the gateway's MAC).
    pub fn duid(&self) -> &[u8] {
        &self.duid
    }

    fn on_link(&self, ip: &Ipv6Addr) -> bool {
        in_prefix(ip, &self.cfg.gateway, self.cfg.prefix)
    }

    fn in_range(&self, ip: &Ipv6Addr) -> bool {
        self.cfg.range.is_some_and(|(lo, hi)| *ip >= lo && *ip <= hi) && self.on_link(ip)
    }

    fn static_for(&self, mac: &Mac) -> Option<&StaticHost6> {
        self.cfg.hosts.iter().find(|h| h.mac == *mac)
    }

    /// Whether `ip` may be given to `key` (of client `mac`) now.
    fn free_for(&self, ip: &Ipv6Addr, key: &Key, mac: &Mac, now: u64) -> bool {
        if *ip == self.cfg.gateway || !self.on_link(ip) || self.cfg.hosts.iter().any(|h| h.ip == *ip && h.mac != *mac) {
            return false;
        }
        if self.declined.get(ip).is_some_and(|&until| until > now) {
            return false;
        }
        match self.by_ip.get(ip) {
            Some(owner) if owner != key => self.bindings.get(owner).is_none_or(|b| b.expires <= now),
            _ => true,
        }
    }

    /// The address for `key`: the client's static one, the one it has, one it hints at, or
    /// the first free one of the range.
    fn choose(&self, key: &Key, mac: &Mac, hints: &[Ipv6Addr], now: u64) -> Option<Ipv6Addr> {
        if let Some(h) = self.static_for(mac) {
            return Some(h.ip);
        }
        if let Some(b) = self.bindings.get(key) {
            if self.in_range(&b.ip) && self.free_for(&b.ip, key, mac, now) {
                return Some(b.ip);
            }
        }
        if let Some(h) = hints.iter().find(|h| self.in_range(h) && self.free_for(h, key, mac, now)) {
            return Some(*h);
        }
        let (lo, hi) = self.cfg.range?;
        // Each address passed over is taken by a binding, a declined address, a static host or
        // the gateway: the walk is as long as those tables at most.
        let limit = self.bindings.len() + self.declined.len() + self.cfg.hosts.len() + 2;
        let (lo, hi) = (u128::from(lo), u128::from(hi));
        let start = self.cursor.clamp(lo, hi);
        (start..=hi).chain(lo..start).take(limit).map(Ipv6Addr::from).find(|ip| self.free_for(ip, key, mac, now))
    }

    /// Records `ip` for `key`, making room first: expired bindings go, then the client MAC's
    /// oldest past `MAX_PER_MAC`. False if the table is full of live bindings.
    fn bind(&mut self, key: &Key, mac: Mac, ip: Ipv6Addr, expires: u64, bound: bool, now: u64) -> bool {
        if !self.bindings.contains_key(key) {
            if self.bindings.len() >= MAX_BINDINGS {
                self.purge(now);
            }
            let mine: Vec<(&Key, &Binding)> = self.bindings.iter().filter(|(_, b)| b.mac == mac).collect();
            if mine.len() >= MAX_PER_MAC {
                if let Some(oldest) = mine.iter().min_by_key(|(_, b)| b.expires).map(|(k, _)| (*k).clone()) {
                    self.unbind(&oldest);
                }
            }
            if self.bindings.len() >= MAX_BINDINGS {
                return false;
            }
        }
        if let Some(old) = self.bindings.get(key) {
            if old.ip != ip {
                self.by_ip.remove(&old.ip);
            }
        }
        if let Some(prev) = self.by_ip.insert(ip, key.clone()) {
            if prev != *key {
                self.bindings.remove(&prev);
            }
        }
        self.bindings.insert(key.clone(), Binding { mac, ip, expires, bound });
        if self.in_range(&ip) {
            self.cursor = u128::from(ip).wrapping_add(1);
        }
        true
    }

    fn unbind(&mut self, key: &Key) {
        if let Some(b) = self.bindings.remove(key) {
            if self.by_ip.get(&b.ip) == Some(key) {
                self.by_ip.remove(&b.ip);
            }
        }
    }

    fn purge(&mut self, now: u64) {
        let dead: Vec<Key> = self.bindings.iter().filter(|(_, b)| b.expires <= now).map(|(k, _)| k.clone()).collect();
        for k in dead {
            self.unbind(&k);
        }
        self.declined.retain(|_, &mut until| until > now);
    }

    fn decline(&mut self, ip: Ipv6Addr, now: u64) {
        self.declined.retain(|_, &mut until| until > now);
        if self.declined.len() >= MAX_DECLINED {
            if let Some(first) = self.declined.iter().min_by_key(|(_, &u)| u).map(|(ip, _)| *ip) {
                self.declined.remove(&first);
            }
        }
        self.declined.insert(ip, now + DECLINE_SECS);
    }

    fn t1_t2(&self) -> (u32, u32) {
        let l = self.cfg.lease_secs;
        (l / 2, l / 5 * 4)
    }

    /// Handles one client message (the UDP payload) from a guest whose frames come from
    /// `src_mac`, at time `now`. Returns the reply's payload, and whether the leases changed.
    pub fn handle(&mut self, payload: &[u8], src_mac: Mac, now: u64) -> (Option<Vec<u8>>, bool) {
        let Some(msg) = decode(payload) else { return (None, false) };
        let opts = msg.opts();
        let client_id = match opts.get_all(dhcproto::v6::OptionCode::ClientId) {
            Some([DhcpOption::ClientId(d)]) if (3..=MAX_DUID).contains(&d.len()) => Some(d.clone()),
            None => None,
            _ => return (None, false), // Several client IDs, or a bad one.
        };
        let server_id = match opts.get_all(dhcproto::v6::OptionCode::ServerId) {
            Some([DhcpOption::ServerId(d)]) => Some(d.as_slice()),
            None => None,
            _ => return (None, false),
        };
        let ours = server_id == Some(self.duid.as_slice());
        let ias: Vec<&IANA> = opts
            .get_all(dhcproto::v6::OptionCode::IANA)
            .unwrap_or(&[])
            .iter()
            .filter_map(|o| match o {
                DhcpOption::IANA(ia) => Some(ia),
                _ => None,
            })
            .take(MAX_IAS)
            .collect();
        let mac = client_id.as_deref().and_then(duid_mac).unwrap_or(src_mac);
        let t = msg.msg_type();
        // RFC 8415 §16: which messages must (not) carry which identifiers.
        let valid = match t {
            MessageType::Solicit | MessageType::Rebind | MessageType::Confirm => client_id.is_some() && server_id.is_none(),
            MessageType::Request | MessageType::Renew | MessageType::Release | MessageType::Decline => client_id.is_some() && ours,
            MessageType::InformationRequest => (server_id.is_none() || ours) && ias.is_empty(),
            _ => false,
        };
        if !valid || mac[0] & 1 == 1 || mac == [0; 6] {
            return (None, false);
        }
        let duid = client_id.clone().unwrap_or_default();
        let mut changed = false;
        let mut status: Option<(Status, &str)> = None;
        let mut answers: Vec<(u32, IaAnswer)> = Vec::new();
        let mut reply_type = MessageType::Reply;
        match t {
            MessageType::Solicit => {
                let rapid = opts.get(dhcproto::v6::OptionCode::RapidCommit).is_some();
                if !rapid {
                    reply_type = MessageType::Advertise;
                }
                for ia in &ias {
                    let key = (duid.clone(), ia.id);
                    let a = match self.choose(&key, &mac, &hints(ia), now) {
                        Some(ip) => {
                            let (expires, bound) = if rapid {
                                (now + self.cfg.lease_secs as u64, true)
                            } else {
                                let keep = self.bindings.get(&key).is_some_and(|b| b.bound && b.ip == ip && b.expires > now);
                                (if keep { self.bindings[&key].expires } else { now + OFFER_SECS }, keep)
                            };
                            if self.bind(&key, mac, ip, expires, bound, now) {
                                changed |= rapid;
                                IaAnswer::Addr(ip, self.cfg.lease_secs)
                            } else {
                                IaAnswer::Status(Status::NoAddrsAvail, "no addresses available")
                            }
                        }
                        None => IaAnswer::Status(Status::NoAddrsAvail, "no addresses available"),
                    };
                    answers.push((ia.id, a));
                }
                if ias.is_empty() {
                    status = Some((Status::NoAddrsAvail, "no addresses available"));
                }
            }
            MessageType::Request => {
                for ia in &ias {
                    let key = (duid.clone(), ia.id);
                    let a = match self.choose(&key, &mac, &hints(ia), now) {
                        Some(ip) if self.bind(&key, mac, ip, now + self.cfg.lease_secs as u64, true, now) => {
                            changed = true;
                            IaAnswer::Addr(ip, self.cfg.lease_secs)
                        }
                        _ => IaAnswer::Status(Status::NoAddrsAvail, "no addresses available"),
                    };
                    answers.push((ia.id, a));
                }
                if ias.is_empty() {
                    status = Some((Status::NoAddrsAvail, "no addresses available"));
                }
            }
            MessageType::Renew | MessageType::Rebind => {
                for ia in &ias {
                    let key = (duid.clone(), ia.id);
                    let held = self.bindings.get(&key).filter(|b| b.bound).map(|b| b.ip);
                    // The address the client keeps: its binding's, else (after a restart
                    // without the lease file) the one it names, if it is still right for it.
                    let keep = held.or_else(|| {
                        hints(ia).into_iter().find(|h| match self.static_for(&mac) {
                            Some(s) => s.ip == *h,
                            None => self.in_range(h) && self.free_for(h, &key, &mac, now),
                        })
                    });
                    // A static host whose address changed in the configuration moves.
                    let keep = match (keep, self.static_for(&mac)) {
                        (Some(ip), Some(s)) if s.ip != ip => None,
                        (k, _) => k,
                    };
                    match keep {
                        Some(ip) if self.bind(&key, mac, ip, now + self.cfg.lease_secs as u64, true, now) => {
                            changed = true;
                            answers.push((ia.id, IaAnswer::Addr(ip, self.cfg.lease_secs)));
                        }
                        _ if t == MessageType::Rebind && hints(ia).iter().any(|h| !self.on_link(h)) => {
                            // Addresses from elsewhere: the client must stop using them.
                            for h in hints(ia) {
                                answers.push((ia.id, IaAnswer::Addr(h, 0)));
                            }
                        }
                        _ => answers.push((ia.id, IaAnswer::Status(Status::NoBinding, "no binding for this IA"))),
                    }
                    // Addresses the client names that it no longer holds: lifetimes 0.
                    if let Some(IaAnswer::Addr(ip, l)) = answers.last().map(|(_, a)| a) {
                        if *l > 0 {
                            let ip = *ip;
                            for h in hints(ia).into_iter().filter(|h| *h != ip) {
                                answers.push((ia.id, IaAnswer::Addr(h, 0)));
                            }
                        }
                    }
                }
            }
            MessageType::Release | MessageType::Decline => {
                for ia in &ias {
                    let key = (duid.clone(), ia.id);
                    let held = self.bindings.get(&key).map(|b| b.ip);
                    match held.filter(|ip| hints(ia).contains(ip)) {
                        Some(ip) => {
                            if t == MessageType::Decline {
                                self.unbind(&key);
                                self.decline(ip, now);
                            } else if let Some(b) = self.bindings.get_mut(&key) {
                                // Kept, expired, so the client gets the same address back.
                                b.expires = now;
                                b.bound = false;
                            }
                            changed = true;
                        }
                        None => answers.push((ia.id, IaAnswer::Status(Status::NoBinding, "no binding for this IA"))),
                    }
                }
                status = Some((Status::Success, "done"));
            }
            MessageType::Confirm => {
                let addrs: Vec<Ipv6Addr> = ias.iter().flat_map(|ia| hints(ia)).collect();
                if addrs.is_empty() {
                    return (None, false); // RFC 8415 §18.3.3: nothing to confirm, no reply.
                }
                status = Some(if addrs.iter().all(|a| self.on_link(a)) {
                    (Status::Success, "all addresses on link")
                } else {
                    (Status::NotOnLink, "not on link")
                });
            }
            _ => {} // Information-request: the common options only.
        }
        let mut out = DhcpOptions::new();
        if let Some(d) = client_id {
            out.insert(DhcpOption::ClientId(d));
        }
        out.insert(DhcpOption::ServerId(self.duid.clone()));
        if t == MessageType::Solicit && reply_type == MessageType::Reply {
            out.insert(DhcpOption::RapidCommit);
        }
        let (t1, t2) = self.t1_t2();
        let mut ia_ids: Vec<u32> = answers.iter().map(|(id, _)| *id).collect();
        ia_ids.dedup();
        for id in ia_ids {
            let mut ia_opts = DhcpOptions::new();
            let mut any_addr = false;
            for (_, a) in answers.iter().filter(|(i, _)| *i == id) {
                match a {
                    IaAnswer::Addr(ip, life) => {
                        any_addr |= *life > 0;
                        ia_opts.insert(DhcpOption::IAAddr(IAAddr {
                            addr: *ip,
                            preferred_life: *life,
                            valid_life: *life,
                            opts: DhcpOptions::new(),
                        }));
                    }
                    IaAnswer::Status(s, m) => ia_opts.insert(DhcpOption::StatusCode(StatusCode { status: *s, msg: (*m).into() })),
                }
            }
            let (t1, t2) = if any_addr { (t1, t2) } else { (0, 0) };
            out.insert(DhcpOption::IANA(IANA { id, t1, t2, opts: ia_opts }));
        }
        if let Some((s, m)) = status {
            out.insert(DhcpOption::StatusCode(StatusCode { status: s, msg: m.into() }));
        }
        if let Some(dns) = self.cfg.dns {
            out.insert(DhcpOption::DomainNameServers(vec![dns]));
        }
        if let Some(name) = self.cfg.domain.as_deref().and_then(|d| Name::from_ascii(format!("{}.", d.trim_end_matches('.'))).ok()) {
            out.insert(DhcpOption::DomainSearchList(vec![name]));
        }
        let mut reply = Message::new_with_id(reply_type, msg.xid());
        reply.set_opts(out);
        (reply.to_vec().ok(), changed)
    }

    /// The MAC holding a live (bound, unexpired) lease of `ip`, if any: port security lets
    /// no other MAC send from it, and lets the holder take it from a port that claimed it
    /// first.
    pub fn holder(&self, ip: &Ipv6Addr, now: u64) -> Option<Mac> {
        let b = self.bindings.get(self.by_ip.get(ip)?)?;
        (b.bound && b.expires > now).then_some(b.mac)
    }

    /// Leases that are bound and not expired.
    pub fn leases(&self, now: u64) -> Vec<Lease6> {
        self.bindings
            .iter()
            .filter(|(_, b)| b.bound && b.expires > now)
            .map(|((duid, iaid), b)| Lease6 {
                mac: b.mac,
                ip: b.ip,
                expires: b.expires,
                hostname: self.static_for(&b.mac).filter(|h| h.ip == b.ip).and_then(|h| h.name.clone()),
                duid: duid.clone(),
                iaid: *iaid,
            })
            .collect()
    }

    /// Restores persisted leases (after a restart). Leases that no longer fit the
    /// configuration (off the link, another host's static address, taken) are skipped;
    /// returns how many were restored.
    pub fn restore(&mut self, leases: &[Lease6], now: u64) -> usize {
        let mut n = 0;
        for l in leases {
            let key = (l.duid.clone(), l.iaid);
            let fits = match self.static_for(&l.mac) {
                Some(h) => h.ip == l.ip,
                None => self.in_range(&l.ip) && self.free_for(&l.ip, &key, &l.mac, now),
            };
            let valid = (3..=MAX_DUID).contains(&l.duid.len()) && l.expires > now && !self.by_ip.contains_key(&l.ip);
            if fits && valid && self.bind(&key, l.mac, l.ip, l.expires, true, now) {
                n += 1;
            }
        }
        n
    }
}

/// The addresses an IA_NA names (the client's hints, or what it holds).
fn hints(ia: &IANA) -> Vec<Ipv6Addr> {
    ia.opts
        .iter()
        .filter_map(|o| match o {
            DhcpOption::IAAddr(a) => Some(a.addr),
            _ => None,
        })
        .take(MAX_IAS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v6::OptionCode;

    const GW_MAC: Mac = [2, 0x76, 0x75, 0, 0, 1];
    const M1: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const WEB: Mac = [0x52, 0x54, 0, 0, 0, 0x10];

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn server() -> Dhcp6Server {
        Dhcp6Server::new(Server6Config {
            server_mac: GW_MAC,
            gateway: ip("fd00:7675:1::1"),
            prefix: 64,
            range: Some((ip("fd00:7675:1::100"), ip("fd00:7675:1::1ff"))),
            hosts: vec![StaticHost6 { mac: WEB, ip: ip("fd00:7675:1::10"), name: Some("web".into()) }],
            lease_secs: 3600,
            dns: Some(ip("fd00:7675:1::1")),
            domain: Some("lab".into()),
        })
    }

    fn llt(mac: Mac) -> Vec<u8> {
        let mut d = vec![0, 1, 0, 1, 0x2c, 0, 0, 1];
        d.extend_from_slice(&mac);
        d
    }

    /// A client message: type, client DUID, optional server DUID, IA_NAs (id, addresses).
    fn msg(t: MessageType, duid: &[u8], server: Option<&[u8]>, ias: &[(u32, &[Ipv6Addr])], rapid: bool) -> Vec<u8> {
        let mut m = Message::new_with_id(t, [1, 2, 3]);
        let o = m.opts_mut();
        if !duid.is_empty() {
            o.insert(DhcpOption::ClientId(duid.to_vec()));
        }
        if let Some(s) = server {
            o.insert(DhcpOption::ServerId(s.to_vec()));
        }
        for (id, addrs) in ias {
            let opts = addrs
                .iter()
                .map(|a| DhcpOption::IAAddr(IAAddr { addr: *a, preferred_life: 0, valid_life: 0, opts: DhcpOptions::new() }))
                .collect();
            o.insert(DhcpOption::IANA(IANA { id: *id, t1: 0, t2: 0, opts }));
        }
        if rapid {
            o.insert(DhcpOption::RapidCommit);
        }
        m.to_vec().unwrap()
    }

    fn parse(r: &[u8]) -> Message {
        Message::from_bytes(r).unwrap()
    }

    /// The addresses (with valid lifetime) and the IA's T1/T2 in a reply's IA_NAs.
    fn addrs(m: &Message) -> Vec<(Ipv6Addr, u32)> {
        let mut v = Vec::new();
        for o in m.opts().get_all(OptionCode::IANA).unwrap_or(&[]) {
            if let DhcpOption::IANA(ia) = o {
                for a in ia.opts.iter() {
                    if let DhcpOption::IAAddr(a) = a {
                        v.push((a.addr, a.valid_life));
                    }
                }
            }
        }
        v
    }

    fn ia_status(m: &Message) -> Option<Status> {
        for o in m.opts().get_all(OptionCode::IANA).unwrap_or(&[]) {
            if let DhcpOption::IANA(ia) = o {
                if let Some(DhcpOption::StatusCode(s)) = ia.opts.get(OptionCode::StatusCode) {
                    return Some(s.status);
                }
            }
        }
        None
    }

    fn status(m: &Message) -> Option<Status> {
        match m.opts().get(OptionCode::StatusCode) {
            Some(DhcpOption::StatusCode(s)) => Some(s.status),
            _ => None,
        }
    }

    /// Solicit → Advertise → Request → Reply; the address.
    fn lease(s: &mut Dhcp6Server, duid: &[u8], now: u64) -> Ipv6Addr {
        let (adv, changed) = s.handle(&msg(MessageType::Solicit, duid, None, &[(1, &[])], false), M1, now);
        let adv = parse(&adv.expect("advertise"));
        assert_eq!(adv.msg_type(), MessageType::Advertise);
        assert!(!changed, "an Advertise binds nothing");
        assert!(s.leases(now).iter().all(|l| l.duid != duid));
        let a = addrs(&adv)[0].0;
        let sid = s.duid().to_vec();
        let (rep, changed) = s.handle(&msg(MessageType::Request, duid, Some(&sid), &[(1, &[a])], false), M1, now);
        let rep = parse(&rep.expect("reply"));
        assert_eq!((rep.msg_type(), addrs(&rep), changed), (MessageType::Reply, vec![(a, 3600)], true));
        a
    }

    #[test]
    fn solicit_request_reply_with_t1_t2_dns_and_domain() {
        let mut s = server();
        assert_eq!(s.duid(), &[0, 3, 0, 1, 2, 0x76, 0x75, 0, 0, 1]);
        let d = llt(M1);
        let a = lease(&mut s, &d, 1000);
        assert_eq!(a, ip("fd00:7675:1::100"));
        let l = s.leases(1000);
        assert_eq!(l, vec![Lease6 { mac: M1, ip: a, expires: 4600, hostname: None, duid: d.clone(), iaid: 1 }]);
        let sid = s.duid().to_vec();
        let rep = parse(&s.handle(&msg(MessageType::Request, &d, Some(&sid), &[(1, &[])], false), M1, 1000).0.unwrap());
        assert_eq!(rep.xid(), [1, 2, 3]);
        assert_eq!(rep.opts().get(OptionCode::ClientId), Some(&DhcpOption::ClientId(d.clone())));
        assert_eq!(rep.opts().get(OptionCode::ServerId), Some(&DhcpOption::ServerId(sid)));
        match rep.opts().get(OptionCode::IANA) {
            Some(DhcpOption::IANA(ia)) => assert_eq!((ia.id, ia.t1, ia.t2), (1, 1800, 2880)),
            o => panic!("{o:?}"),
        }
        assert_eq!(rep.opts().get(OptionCode::DomainNameServers), Some(&DhcpOption::DomainNameServers(vec![ip("fd00:7675:1::1")])));
        // Option 24 on the wire: the name "lab" as DNS labels.
        let raw = rep.to_vec().unwrap();
        assert!(raw.windows(9).any(|w| w == [0, 24, 0, 5, 3, b'l', b'a', b'b', 0]), "{raw:?}");
        // A second client gets the next address.
        assert_eq!(lease(&mut s, &llt([0x52, 0x54, 0, 0, 0, 2]), 1000), ip("fd00:7675:1::101"));
    }

    #[test]
    fn rapid_commit_binds_at_once_and_static_hosts_match_by_duid_or_frame_mac() {
        let mut s = server();
        let (r, changed) = s.handle(&msg(MessageType::Solicit, &llt(WEB), None, &[(7, &[])], true), M1, 10);
        let r = parse(&r.unwrap());
        assert_eq!(r.msg_type(), MessageType::Reply);
        assert!(r.opts().get(OptionCode::RapidCommit).is_some() && changed);
        assert_eq!(addrs(&r), vec![(ip("fd00:7675:1::10"), 3600)]);
        assert_eq!(s.leases(10)[0].hostname.as_deref(), Some("web"));
        // A DUID without a link-layer address (DUID-EN): the frame's MAC decides.
        let mut s = server();
        let en = [0, 2, 0, 0, 0, 9, 1, 2, 3, 4];
        let r = parse(&s.handle(&msg(MessageType::Solicit, &en, None, &[(1, &[])], true), WEB, 10).0.unwrap());
        assert_eq!(addrs(&r), vec![(ip("fd00:7675:1::10"), 3600)]);
        // Nobody else gets the static address, even when asking for it.
        let r = parse(&s.handle(&msg(MessageType::Solicit, &llt(M1), None, &[(1, &[ip("fd00:7675:1::10")])], true), M1, 10).0.unwrap());
        assert_eq!(addrs(&r), vec![(ip("fd00:7675:1::100"), 3600)]);
    }

    #[test]
    fn renew_and_rebind_extend_and_unknown_or_foreign_addresses_are_refused() {
        let mut s = server();
        let d = llt(M1);
        let a = lease(&mut s, &d, 1000);
        let sid = s.duid().to_vec();
        let (r, changed) = s.handle(&msg(MessageType::Renew, &d, Some(&sid), &[(1, &[a])], false), M1, 2000);
        assert!(changed);
        assert_eq!(addrs(&parse(&r.unwrap())), vec![(a, 3600)]);
        assert_eq!(s.leases(2000)[0].expires, 5600);
        let r = parse(&s.handle(&msg(MessageType::Rebind, &d, None, &[(1, &[a])], false), M1, 3000).0.unwrap());
        assert_eq!(addrs(&r), vec![(a, 3600)]);
        // Renew for an IA the server knows nothing of and an address it cannot give: NoBinding.
        let other = llt([0x52, 0x54, 0, 0, 0, 3]);
        let r = parse(&s.handle(&msg(MessageType::Renew, &other, Some(&sid), &[(1, &[a])], false), M1, 3000).0.unwrap());
        assert_eq!(ia_status(&r), Some(Status::NoBinding));
        // Rebind with an address of another link: lifetime 0.
        let r = parse(&s.handle(&msg(MessageType::Rebind, &other, None, &[(1, &[ip("2001:db8::5")])], false), M1, 3000).0.unwrap());
        assert_eq!(addrs(&r), vec![(ip("2001:db8::5"), 0)]);
        // After a restart without leases, a renewing client keeps a free address it names.
        let mut fresh = server();
        let r = parse(&fresh.handle(&msg(MessageType::Renew, &d, Some(&sid), &[(1, &[a])], false), M1, 3000).0.unwrap());
        assert_eq!(addrs(&r), vec![(a, 3600)]);
    }

    #[test]
    fn server_id_rules_are_enforced() {
        let mut s = server();
        let d = llt(M1);
        let sid = s.duid().to_vec();
        // Solicit, Rebind and Confirm with a Server ID: discarded (RFC 8415 §16).
        for t in [MessageType::Solicit, MessageType::Rebind, MessageType::Confirm] {
            assert_eq!(s.handle(&msg(t, &d, Some(&sid), &[(1, &[])], true), M1, 1).0, None, "{t:?}");
        }
        // Request, Renew, Release, Decline for another server, or without a client ID: discarded.
        for t in [MessageType::Request, MessageType::Renew, MessageType::Release, MessageType::Decline] {
            assert_eq!(s.handle(&msg(t, &d, Some(&[0, 3, 0, 1, 9, 9, 9, 9, 9, 9]), &[(1, &[])], false), M1, 1).0, None);
            assert_eq!(s.handle(&msg(t, &d, None, &[(1, &[])], false), M1, 1).0, None);
            assert_eq!(s.handle(&msg(t, &[], Some(&sid), &[(1, &[])], false), M1, 1).0, None);
        }
        // Server messages and relay messages from a client: never answered.
        for t in [MessageType::Advertise, MessageType::Reply, MessageType::Reconfigure] {
            assert_eq!(s.handle(&msg(t, &d, Some(&sid), &[], false), M1, 1).0, None);
        }
        assert_eq!(s.handle(&[12, 0, 0, 0], M1, 1).0, None);
        assert!(s.leases(1).is_empty());
    }

    #[test]
    fn release_frees_and_decline_blocks_the_address() {
        let mut s = server();
        let d = llt(M1);
        let a = lease(&mut s, &d, 1000);
        let sid = s.duid().to_vec();
        let (r, changed) = s.handle(&msg(MessageType::Release, &d, Some(&sid), &[(1, &[a])], false), M1, 1001);
        assert!(changed);
        assert_eq!(status(&parse(&r.unwrap())), Some(Status::Success));
        assert!(s.leases(1001).is_empty());
        // The same client gets it back.
        assert_eq!(lease(&mut s, &d, 1002), a);
        let r = parse(&s.handle(&msg(MessageType::Decline, &d, Some(&sid), &[(1, &[a])], false), M1, 1003).0.unwrap());
        assert_eq!(status(&r), Some(Status::Success));
        assert!(s.leases(1003).is_empty());
        // Neither this client nor another gets the declined address for a while...
        assert_ne!(lease(&mut s, &d, 1004), a);
        let other = llt([0x52, 0x54, 0, 0, 0, 3]);
        let b = lease(&mut s, &other, 1005);
        assert!(b != a);
        // ...even when asking for it, until DECLINE_SECS have passed.
        let ask = |s: &mut Dhcp6Server, n: u8, now| {
            let r = s.handle(&msg(MessageType::Solicit, &llt([0x52, 0x54, 0, 0, 0, n]), None, &[(1, &[a])], false), M1, now).0;
            addrs(&parse(&r.unwrap()))[0].0
        };
        assert_ne!(ask(&mut s, 4, 1006), a);
        assert_eq!(ask(&mut s, 5, 1003 + DECLINE_SECS + 1), a);
    }

    #[test]
    fn the_holder_of_an_address_is_the_mac_of_its_live_lease() {
        let mut s = server();
        let d = llt(M1);
        let a = lease(&mut s, &d, 1000);
        assert_eq!(s.holder(&a, 1001), Some(M1));
        let expires = s.leases(1001)[0].expires;
        assert_eq!(s.holder(&a, expires), None, "an expired lease holds nothing");
        let sid = s.duid().to_vec();
        s.handle(&msg(MessageType::Release, &d, Some(&sid), &[(1, &[a])], false), M1, 1002);
        assert_eq!(s.holder(&a, 1003), None, "a released lease holds nothing");
        // An offer (Advertise, not yet bound) holds nothing either.
        let r = s.handle(&msg(MessageType::Solicit, &llt([0x52, 0x54, 0, 0, 0, 9]), None, &[(1, &[])], false), M1, 1004).0;
        let offered = addrs(&parse(&r.unwrap()))[0].0;
        assert_eq!(s.holder(&offered, 1004), None);
    }

    #[test]
    fn confirm_says_success_on_link_and_not_on_link_elsewhere() {
        let mut s = server();
        let d = llt(M1);
        let r = parse(&s.handle(&msg(MessageType::Confirm, &d, None, &[(1, &[ip("fd00:7675:1::123")])], false), M1, 1).0.unwrap());
        assert_eq!((r.msg_type(), status(&r)), (MessageType::Reply, Some(Status::Success)));
        let r = parse(&s.handle(&msg(MessageType::Confirm, &d, None, &[(1, &[ip("fd00:1::5")])], false), M1, 1).0.unwrap());
        assert_eq!(status(&r), Some(Status::NotOnLink));
        assert_eq!(s.handle(&msg(MessageType::Confirm, &d, None, &[(1, &[])], false), M1, 1).0, None);
    }

    #[test]
    fn information_request_gets_dns_and_domain_only() {
        let mut s = server();
        let r = parse(&s.handle(&msg(MessageType::InformationRequest, &llt(M1), None, &[], false), M1, 1).0.unwrap());
        assert_eq!(r.msg_type(), MessageType::Reply);
        assert!(r.opts().get(OptionCode::DomainNameServers).is_some() && r.opts().get(OptionCode::DomainSearchList).is_some());
        assert!(r.opts().get(OptionCode::IANA).is_none());
        // Without a client ID too; with an IA_NA it is not an Information-request.
        assert!(s.handle(&msg(MessageType::InformationRequest, &[], None, &[], false), M1, 1).0.is_some());
        assert!(s.handle(&msg(MessageType::InformationRequest, &llt(M1), None, &[(1, &[])], false), M1, 1).0.is_none());
        assert!(s.leases(1).is_empty());
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_made_up_clients() {
        let mut s = server();
        s.cfg.range = Some((ip("fd00:7675:1::100"), ip("fd00:7675:1::ffff:ffff")));
        // One MAC, thousands of DUIDs: it keeps MAX_PER_MAC bindings.
        for i in 0..2000u32 {
            let mut d = vec![0, 2, 0, 0, 0, 9];
            d.extend_from_slice(&i.to_be_bytes());
            s.handle(&msg(MessageType::Solicit, &d, None, &[(1, &[]), (2, &[])], true), M1, 10);
        }
        assert_eq!(s.leases(10).len(), MAX_PER_MAC);
        // Thousands of MACs: at most MAX_BINDINGS, then NoAddrsAvail until some expire.
        let mut refused = 0;
        for i in 0..(MAX_BINDINGS as u32 + 100) {
            let mut mac = [0x52, 0x54, 0, 0, 0, 0];
            mac[2..].copy_from_slice(&(i + 100).to_be_bytes());
            let r = parse(&s.handle(&msg(MessageType::Solicit, &llt(mac), None, &[(1, &[])], true), mac, 10).0.unwrap());
            refused += (ia_status(&r) == Some(Status::NoAddrsAvail)) as usize;
        }
        assert_eq!(s.bindings.len(), MAX_BINDINGS);
        assert_eq!(s.by_ip.len(), MAX_BINDINGS);
        assert!(refused >= 100, "{refused}");
        // Once they expire, newcomers are served again.
        let r = parse(&s.handle(&msg(MessageType::Solicit, &llt(M1), None, &[(1, &[])], true), M1, 10 + 3601).0.unwrap());
        assert_eq!(addrs(&r).len(), 1);
    }

    #[test]
    fn restore_keeps_what_fits() {
        let mut s = server();
        let d = llt(M1);
        let ok = Lease6 { mac: M1, ip: ip("fd00:7675:1::105"), expires: 5000, hostname: None, duid: d.clone(), iaid: 1 };
        let off_link = Lease6 { ip: ip("fd00:9::5"), iaid: 2, ..ok.clone() };
        let stolen = Lease6 { ip: ip("fd00:7675:1::10"), iaid: 3, ..ok.clone() };
        let expired = Lease6 { ip: ip("fd00:7675:1::106"), iaid: 4, expires: 10, ..ok.clone() };
        assert_eq!(s.restore(&[ok.clone(), off_link, stolen, expired], 100), 1);
        assert_eq!(s.leases(100), vec![ok]);
        let sid = s.duid().to_vec();
        let r = parse(&s.handle(&msg(MessageType::Renew, &d, Some(&sid), &[(1, &[])], false), M1, 200).0.unwrap());
        assert_eq!(addrs(&r), vec![(ip("fd00:7675:1::105"), 3600)]);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut s = server();
        let sid = s.duid().to_vec();
        let seeds = [
            msg(MessageType::Solicit, &llt(M1), None, &[(1, &[ip("fd00:7675:1::100")])], true),
            msg(MessageType::Request, &llt(M1), Some(&sid), &[(1, &[ip("fd00:7675:1::100")])], false),
            msg(MessageType::Renew, &llt(M1), Some(&sid), &[(1, &[ip("fd00:7675:1::100")])], false),
        ];
        for seed in &seeds {
            for cut in 0..seed.len() {
                s.handle(&seed[..cut], M1, 5);
            }
            for i in 0..seed.len() {
                for bit in 0..8 {
                    let mut m = seed.clone();
                    m[i] ^= 1 << bit;
                    s.handle(&m, M1, 5);
                }
            }
        }
        // Fixed-size options with lengths that do not fit them (the codec would subtract past
        // zero or read past the option).
        for (code, len) in [(13u16, 1u16), (13, 0), (16, 3), (17, 0), (7, 0), (8, 5), (12, 4), (14, 2)] {
            let mut m = msg(MessageType::Solicit, &llt(M1), None, &[(1, &[])], false);
            m.extend_from_slice(&code.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(&vec![0; len as usize]);
            assert_eq!(s.handle(&m, M1, 5).0, None, "option {code} of {len} bytes");
            // The same inside an IA_NA.
            let mut ia = vec![0, 3];
            ia.extend_from_slice(&(12 + 4 + len).to_be_bytes());
            ia.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0]);
            ia.extend_from_slice(&code.to_be_bytes());
            ia.extend_from_slice(&len.to_be_bytes());
            ia.extend_from_slice(&vec![0; len as usize]);
            let mut m = msg(MessageType::Solicit, &llt(M1), None, &[], false);
            m.extend_from_slice(&ia);
            assert_eq!(s.handle(&m, M1, 5).0, None, "option {code} of {len} bytes in an IA_NA");
            // Last, with its length running past the message's end.
            let mut m = msg(MessageType::Solicit, &llt(M1), None, &[(1, &[])], false);
            m.extend_from_slice(&code.to_be_bytes());
            m.extend_from_slice(&(len + 100).to_be_bytes());
            m.extend_from_slice(&[0; 6]);
            assert_eq!(s.handle(&m, M1, 5).0, None, "option {code} running past the end");
        }
        // What fuzzing found: a Vendor Class too short for its enterprise number, and a Server
        // Unicast option whose fixed 16 bytes the codec read past its length into the next.
        for hex in [
            "0454000000100003002800000e000100012c0000015254000000100003002800000001000000000000000000050018fd0076750001000000000000000001000000000000000000",
            "01010203000cd4b9b9b9b9b9b9b9ffffff00510051510e000010000000000005001805fddd240405062f013f0e000100012c0000b9b9b9b9ffffff0000100000000000050152005104510051510e0000",
        ] {
            let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            s.handle(&bytes, M1, 5);
            client_duid_mac(&bytes);
        }
        // Options nested as deep as a message allows (IA_NA in IA_NA...): refused or answered,
        // without exhausting the stack; longer messages are not looked at.
        for len in [1400, 1500, 60000] {
            let mut inner: Vec<u8> = Vec::new();
            while inner.len() + 16 + 4 < len {
                let mut o = vec![0, 3];
                o.extend_from_slice(&((12 + inner.len()) as u16).to_be_bytes());
                o.extend_from_slice(&[0; 12]);
                o.extend_from_slice(&inner);
                inner = o;
            }
            let mut m = vec![1, 0, 0, 1];
            m.extend_from_slice(&inner);
            std::thread::Builder::new().stack_size(256 * 1024).spawn(move || server().handle(&m, M1, 5)).unwrap().join().unwrap();
        }
    }

    #[test]
    fn duid_link_layer_addresses() {
        assert_eq!(duid_mac(&llt(M1)), Some(M1));
        assert_eq!(duid_mac(&[0, 3, 0, 1, 1, 2, 3, 4, 5, 6]), Some([1, 2, 3, 4, 5, 6]));
        assert_eq!(duid_mac(&[0, 3, 0, 6, 1, 2, 3, 4, 5, 6]), None);
        assert_eq!(duid_mac(&[0, 3, 0, 1, 1, 2, 3]), None);
        assert_eq!(duid_mac(&[0, 2, 0, 0, 0, 9, 1]), None);
        assert_eq!(client_duid_mac(&msg(MessageType::Solicit, &llt(WEB), None, &[], false)), Some(WEB));
    }
}
