//! The DHCP server state machine (RFC 2131 §4.3): one binding per client MAC, each holding a
//! distinct address, so memory is bounded by the size of the range plus the static hosts,
//! whatever a flood of DISCOVERs from random MACs does.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::message::{opt, DhcpMessage, MessageType, ReplyBuilder};
use crate::Mac;

/// How long an OFFER holds its address for the client.
pub const OFFER_SECS: u64 = 60;
/// How long an address a client DECLINEd (someone else uses it) is left alone.
pub const DECLINE_SECS: u64 = 600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticHost {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The server's (gateway's) address and the subnet's prefix length.
    pub server_ip: Ipv4Addr,
    pub prefix: u8,
    /// First and last address handed out dynamically.
    pub range: (Ipv4Addr, Ipv4Addr),
    pub hosts: Vec<StaticHost>,
    pub lease_secs: u32,
    /// Announce the server as the router (option 3): in modes that route.
    pub router: bool,
    /// Announce a DNS server (option 6).
    pub dns: Option<Ipv4Addr>,
    pub domain: Option<String>,
    pub mtu: Option<u16>,
}

/// A bound lease, as listed and persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// Expiry, in the caller's clock (seconds since the Unix epoch in vunet).
    pub expires: u64,
    pub hostname: Option<String>,
}

/// An answer to send: the DHCP payload and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub payload: Vec<u8>,
    /// IP destination; 255.255.255.255 when broadcast.
    pub dst_ip: Ipv4Addr,
    /// Ethernet destination: the client's MAC, or broadcast.
    pub dst_mac: Mac,
    pub msg_type: MessageType,
}

/// Names no DHCP client gets as its DNS name: they steer other hosts' traffic (proxy
/// auto-discovery, IPv6 transition, the loopback, the gateway itself).
pub const RESERVED_NAMES: &[&str] = &["localhost", "wpad", "isatap", "gateway", "_gateway"];

/// At most this many refused names wait to be logged (`take_name_refusals`).
const MAX_REFUSALS: usize = 64;

#[derive(Clone, Debug)]
struct Binding {
    ip: Ipv4Addr,
    expires: u64,
    bound: bool,
    /// The client's DNS name (checked: nobody else holds it).
    hostname: Option<String>,
    /// The last name this client asked for and did not get, so it is reported once.
    refused_name: Option<String>,
}

/// Who holds which address: bound leases and static hosts. The server keeps it up to date at
/// every change of a binding; port security reads it for every frame whose source is not the
/// sender's own lease, so it is shared rather than behind the server's lock (which DHCP and DNS
/// take), and `revision` lets readers cache what they found.
#[derive(Debug, Default)]
pub struct Holders {
    revision: AtomicU64,
    map: RwLock<HashMap<Ipv4Addr, Mac>>,
}

impl Holders {
    /// The client `ip` is leased to or reserved for.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(&ip).copied()
    }

    /// Moves whenever an address changes holder.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    fn set(&self, ip: Ipv4Addr, mac: Option<Mac>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let changed = match mac {
            Some(m) => map.insert(ip, m) != Some(m),
            None => map.remove(&ip).is_some(),
        };
        if changed {
            self.revision.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub struct DhcpServer {
    cfg: ServerConfig,
    bindings: BTreeMap<Mac, Binding>,
    by_ip: BTreeMap<Ipv4Addr, Mac>,
    declined: BTreeMap<Ipv4Addr, u64>,
    /// Names of the network's own (configured DNS hosts, the gateway's): never a client's.
    reserved: Vec<String>,
    /// Names refused since the last `take_name_refusals`, for the caller to log.
    refusals: Vec<(Mac, String)>,
    holders: Arc<Holders>,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

impl DhcpServer {
    pub fn new(cfg: ServerConfig) -> Self {
        let holders = Arc::new(Holders::default());
        for h in &cfg.hosts {
            holders.set(h.ip, Some(h.mac));
        }
        DhcpServer {
            cfg,
            bindings: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            declined: BTreeMap::new(),
            reserved: Vec::new(),
            refusals: Vec::new(),
            holders,
        }
    }

    /// Who holds which address, kept up to date by this server.
    pub fn holders(&self) -> Arc<Holders> {
        self.holders.clone()
    }

    /// Brings `ip`'s entry in `holders` in line with the bindings: a static host's address is
    /// its host's, else a bound lease's (expired or not: nobody else has it yet).
    fn sync_holder(&self, ip: Ipv4Addr) {
        let mac = self
            .cfg
            .hosts
            .iter()
            .find(|h| h.ip == ip)
            .map(|h| h.mac)
            .or_else(|| self.by_ip.get(&ip).filter(|m| self.bindings.get(*m).is_some_and(|b| b.bound && b.ip == ip)).copied());
        self.holders.set(ip, mac);
    }

    /// Adds names that belong to the network itself (its configured DNS hosts): no client
    /// gets them, and a client that holds one now (from a lease file) loses it.
    pub fn reserve_names<I: IntoIterator<Item = String>>(&mut self, names: I) {
        self.reserved.extend(names.into_iter().map(|n| n.to_ascii_lowercase()));
        let reserved = std::mem::take(&mut self.reserved);
        for b in self.bindings.values_mut() {
            if b.hostname.as_ref().is_some_and(|h| reserved.contains(h)) {
                b.refused_name = b.hostname.take();
            }
        }
        self.reserved = reserved;
    }

    /// Host names refused to clients since the last call (taken by another client, or
    /// reserved), each reported once per client and name.
    pub fn take_name_refusals(&mut self) -> Vec<(Mac, String)> {
        std::mem::take(&mut self.refusals)
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        let m = mask(self.cfg.prefix);
        let (a, s) = (u32::from(ip), u32::from(self.cfg.server_ip));
        a & m == s & m && a & !m != 0 && a & !m != !m
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        self.in_subnet(ip) && ip >= self.cfg.range.0 && ip <= self.cfg.range.1
    }

    fn static_for(&self, mac: &Mac) -> Option<&StaticHost> {
        self.cfg.hosts.iter().find(|h| h.mac == *mac)
    }

    /// Whether `ip` may be given to `mac` now.
    fn free_for(&self, ip: Ipv4Addr, mac: &Mac, now: u64) -> bool {
        if ip == self.cfg.server_ip || !self.in_subnet(ip) {
            return false;
        }
        if self.cfg.hosts.iter().any(|h| h.ip == ip && h.mac != *mac) {
            return false;
        }
        if self.declined.get(&ip).is_some_and(|&until| until > now) {
            return false;
        }
        match self.by_ip.get(&ip) {
            Some(owner) if owner != mac => self.bindings.get(owner).is_none_or(|b| b.expires <= now),
            _ => true,
        }
    }

    /// The address for `mac`: its static one, the one it had, the one it asks for, or the
    /// first free one in the range.
    fn choose(&self, mac: &Mac, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        if let Some(h) = self.static_for(mac) {
            return Some(h.ip);
        }
        if let Some(b) = self.bindings.get(mac) {
            if self.in_range(b.ip) && self.free_for(b.ip, mac, now) {
                return Some(b.ip);
            }
        }
        if let Some(r) = requested.filter(|&r| self.in_range(r) && self.free_for(r, mac, now)) {
            return Some(r);
        }
        let (lo, hi) = (u32::from(self.cfg.range.0), u32::from(self.cfg.range.1));
        (lo..=hi).map(Ipv4Addr::from).find(|&ip| self.in_range(ip) && self.free_for(ip, mac, now))
    }

    /// Records `ip` for `mac`, evicting an expired holder of that address. `hostname` is
    /// the name the client asks for: it keeps it only if `dns_name` allows.
    fn bind(&mut self, mac: Mac, ip: Ipv4Addr, expires: u64, bound: bool, hostname: Option<String>, now: u64) {
        let (hostname, refused) = self.dns_name(&mac, hostname, now);
        let mut refused_name = self.bindings.get(&mac).and_then(|b| b.refused_name.clone());
        let mut old_ip = None;
        if let Some(old) = self.bindings.get(&mac) {
            if old.ip != ip {
                self.by_ip.remove(&old.ip);
                old_ip = Some(old.ip);
            }
        }
        if let Some(prev) = self.by_ip.insert(ip, mac) {
            if prev != mac {
                self.bindings.remove(&prev);
            }
        }
        if let Some(name) = refused {
            if refused_name.as_ref() != Some(&name) && self.refusals.len() < MAX_REFUSALS {
                self.refusals.push((mac, name.clone()));
            }
            refused_name = Some(name);
        }
        self.bindings.insert(mac, Binding { ip, expires, bound, hostname, refused_name });
        if let Some(old) = old_ip {
            self.sync_holder(old);
        }
        self.sync_holder(ip);
    }

    /// Whether `mac` may be known by `name` in DNS: a static host's own name always; else a
    /// name that is not reserved, not a static host's, and not held by another live lease
    /// (the first holder keeps it). Returns (the name it gets, the name refused).
    fn dns_name(&self, mac: &Mac, name: Option<String>, now: u64) -> (Option<String>, Option<String>) {
        let Some(name) = name else { return (None, None) };
        if self.static_for(mac).and_then(|h| h.name.as_ref()).is_some_and(|n| n.eq_ignore_ascii_case(&name)) {
            return (Some(name), None);
        }
        let taken = RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(&name))
            || self.reserved.iter().any(|r| r.eq_ignore_ascii_case(&name))
            || self.cfg.hosts.iter().any(|h| h.name.as_ref().is_some_and(|n| n.eq_ignore_ascii_case(&name)))
            || self
                .bindings
                .iter()
                .any(|(m, b)| m != mac && b.bound && b.expires > now && b.hostname.as_ref().is_some_and(|n| n.eq_ignore_ascii_case(&name)));
        if taken {
            (None, Some(name))
        } else {
            (Some(name), None)
        }
    }

    fn unbind(&mut self, mac: &Mac) {
        if let Some(b) = self.bindings.remove(mac) {
            self.by_ip.remove(&b.ip);
            self.sync_holder(b.ip);
        }
    }

    /// The static entry's name, else the one the client sends, else the one it sent before.
    fn hostname_for(&self, mac: &Mac, msg: &DhcpMessage) -> Option<String> {
        self.static_for(mac)
            .and_then(|h| h.name.clone())
            .or_else(|| msg.hostname.clone())
            .or_else(|| self.bindings.get(mac).and_then(|b| b.hostname.clone()))
    }

    fn reply(&self, req: &DhcpMessage, t: MessageType, yiaddr: Ipv4Addr, lease: bool, hostname: Option<&str>) -> Reply {
        let mut r = ReplyBuilder::new(req, t, yiaddr, self.cfg.server_ip);
        if t != MessageType::Nak {
            if lease {
                let l = self.cfg.lease_secs;
                r.option(opt::LEASE_TIME, &l.to_be_bytes());
                r.option(opt::RENEWAL_T1, &(l / 2).to_be_bytes());
                r.option(opt::REBINDING_T2, &(l / 8 * 7).to_be_bytes());
            }
            let m = mask(self.cfg.prefix);
            r.option(opt::SUBNET_MASK, &m.to_be_bytes());
            r.option(opt::BROADCAST, &(u32::from(self.cfg.server_ip) | !m).to_be_bytes());
            if self.cfg.router {
                r.option(opt::ROUTER, &self.cfg.server_ip.octets());
            }
            if let Some(dns) = self.cfg.dns {
                r.option(opt::DNS, &dns.octets());
            }
            if let Some(d) = &self.cfg.domain {
                r.option(opt::DOMAIN, d.as_bytes());
            }
            if let Some(mtu) = self.cfg.mtu {
                r.option(opt::MTU, &mtu.to_be_bytes());
            }
            if let Some(h) = hostname {
                r.option(opt::HOSTNAME, h.as_bytes());
            }
        } else {
            r.option(opt::MESSAGE, b"address not valid here");
        }
        // RFC 2131 §4.1: to ciaddr if the client has one, broadcast if it asked or for a NAK,
        // else to the address being given, at the client's MAC.
        let bcast = Ipv4Addr::BROADCAST;
        let (dst_ip, dst_mac) = if t == MessageType::Nak {
            (bcast, [0xff; 6])
        } else if !req.ciaddr.is_unspecified() {
            (req.ciaddr, req.chaddr)
        } else if req.flags & 0x8000 != 0 {
            (bcast, [0xff; 6])
        } else {
            (yiaddr, req.chaddr)
        };
        Reply { payload: r.finish(), dst_ip, dst_mac, msg_type: t }
    }

    /// Handles one client message at time `now`; returns the answer to send, if any.
    pub fn handle(&mut self, msg: &DhcpMessage, now: u64) -> Option<Reply> {
        if !msg.giaddr.is_unspecified() || msg.chaddr[0] & 1 == 1 || msg.chaddr == [0; 6] {
            return None; // No relays; no multicast or empty hardware addresses.
        }
        let mac = msg.chaddr;
        match msg.msg_type {
            MessageType::Discover => {
                let ip = self.choose(&mac, msg.requested_ip, now)?;
                let wanted = self.hostname_for(&mac, msg);
                let hostname = self.dns_name(&mac, wanted.clone(), now).0;
                let keep_bound = self.bindings.get(&mac).is_some_and(|b| b.bound && b.ip == ip && b.expires > now);
                if !keep_bound {
                    self.bind(mac, ip, now + OFFER_SECS, false, wanted, now);
                }
                Some(self.reply(msg, MessageType::Offer, ip, true, hostname.as_deref()))
            }
            MessageType::Request => {
                if let Some(sid) = msg.server_id {
                    if sid != self.cfg.server_ip {
                        // The client took another server's offer: forget ours.
                        if self.bindings.get(&mac).is_some_and(|b| !b.bound) {
                            self.unbind(&mac);
                        }
                        return None;
                    }
                }
                let wanted = msg.requested_ip.or((!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr))?;
                let ok = match self.static_for(&mac) {
                    Some(h) => h.ip == wanted,
                    None => self.in_range(wanted) && self.free_for(wanted, &mac, now),
                };
                if !ok {
                    // Wrong for this network (or taken): tell the client to start over. A
                    // request for an address outside our subnet is answered the same way.
                    return Some(self.reply(msg, MessageType::Nak, Ipv4Addr::UNSPECIFIED, false, None));
                }
                let name = self.hostname_for(&mac, msg);
                let hostname = self.dns_name(&mac, name.clone(), now).0;
                self.bind(mac, wanted, now + self.cfg.lease_secs as u64, true, name, now);
                Some(self.reply(msg, MessageType::Ack, wanted, true, hostname.as_deref()))
            }
            MessageType::Release => {
                if let Some(b) = self.bindings.get_mut(&mac) {
                    if b.ip == msg.ciaddr {
                        // Kept, expired, so the client gets the same address back if it is free.
                        b.expires = now;
                        b.bound = false;
                        self.sync_holder(msg.ciaddr);
                    }
                }
                None
            }
            MessageType::Decline => {
                let ip = msg.requested_ip?;
                if self.bindings.get(&mac).is_some_and(|b| b.ip == ip) {
                    self.unbind(&mac);
                    self.declined.retain(|_, &mut until| until > now);
                    self.declined.insert(ip, now + DECLINE_SECS);
                }
                None
            }
            MessageType::Inform => {
                if msg.ciaddr.is_unspecified() {
                    return None;
                }
                let hostname = self.dns_name(&mac, self.hostname_for(&mac, msg), now).0;
                Some(self.reply(msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED, false, hostname.as_deref()))
            }
            MessageType::Offer | MessageType::Ack | MessageType::Nak => None,
        }
    }

    /// Leases that are bound and not expired.
    pub fn leases(&self, now: u64) -> Vec<Lease> {
        self.bindings
            .iter()
            .filter(|(_, b)| b.bound && b.expires > now)
            .map(|(mac, b)| Lease { mac: *mac, ip: b.ip, expires: b.expires, hostname: b.hostname.clone() })
            .collect()
    }

    /// The IP currently leased to `mac`.
    pub fn ip_of(&self, mac: &Mac, now: u64) -> Option<Ipv4Addr> {
        self.bindings.get(mac).filter(|b| b.bound && b.expires > now).map(|b| b.ip)
    }

    /// Restores persisted leases (after a restart). Leases that no longer fit the
    /// configuration (outside the subnet, another host's static address, duplicates) are
    /// skipped; returns how many were restored.
    pub fn restore(&mut self, leases: &[Lease], now: u64) -> usize {
        let mut n = 0;
        for l in leases {
            let fits = match self.static_for(&l.mac) {
                Some(h) => h.ip == l.ip,
                None => self.in_subnet(l.ip) && self.free_for(l.ip, &l.mac, now),
            };
            if fits && l.expires > now && !self.by_ip.contains_key(&l.ip) {
                self.bind(l.mac, l.ip, l.expires, true, l.hostname.clone(), now);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::tests::client_msg;
    use crate::message::{reply_options, reply_yiaddr};

    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
    const M1: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const M2: Mac = [0x52, 0x54, 0, 0, 0, 2];
    const WEB: Mac = [0x52, 0x54, 0, 0, 0, 0x10];

    fn server() -> DhcpServer {
        DhcpServer::new(ServerConfig {
            server_ip: SERVER,
            prefix: 24,
            range: (Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 254)),
            hosts: vec![StaticHost { mac: WEB, ip: Ipv4Addr::new(192, 168, 122, 10), name: Some("web".into()) }],
            lease_secs: 3600,
            router: true,
            dns: Some(SERVER),
            domain: Some("vunet".into()),
            mtu: Some(1500),
        })
    }

    fn msg(t: MessageType, mac: Mac, extra: &[(u8, Vec<u8>)]) -> DhcpMessage {
        DhcpMessage::parse(&client_msg(t, mac, 42, extra)).unwrap()
    }

    fn opt_of(r: &Reply, code: u8) -> Option<Vec<u8>> {
        reply_options(&r.payload).into_iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    /// DISCOVER → OFFER → REQUEST → ACK; returns the address.
    fn bind(s: &mut DhcpServer, mac: Mac, now: u64) -> Ipv4Addr {
        let offer = s.handle(&msg(MessageType::Discover, mac, &[]), now).expect("offer");
        assert_eq!(offer.msg_type, MessageType::Offer);
        let ip = reply_yiaddr(&offer.payload).unwrap();
        let ack = s
            .handle(
                &msg(MessageType::Request, mac, &[(opt::REQUESTED_IP, ip.octets().to_vec()), (opt::SERVER_ID, SERVER.octets().to_vec())]),
                now,
            )
            .expect("ack");
        assert_eq!(ack.msg_type, MessageType::Ack);
        assert_eq!(reply_yiaddr(&ack.payload), Some(ip));
        ip
    }

    #[test]
    fn full_exchange_with_the_options_a_guest_needs() {
        let mut s = server();
        let offer = s.handle(&msg(MessageType::Discover, M1, &[(opt::HOSTNAME, b"alpha".to_vec())]), 1000).unwrap();
        assert_eq!(reply_yiaddr(&offer.payload), Some(Ipv4Addr::new(192, 168, 122, 2)));
        assert_eq!(opt_of(&offer, opt::MSG_TYPE), Some(vec![2]));
        assert_eq!(opt_of(&offer, opt::SERVER_ID), Some(SERVER.octets().to_vec()));
        assert_eq!(opt_of(&offer, opt::SUBNET_MASK), Some(vec![255, 255, 255, 0]));
        assert_eq!(opt_of(&offer, opt::ROUTER), Some(SERVER.octets().to_vec()));
        assert_eq!(opt_of(&offer, opt::DNS), Some(SERVER.octets().to_vec()));
        assert_eq!(opt_of(&offer, opt::DOMAIN), Some(b"vunet".to_vec()));
        assert_eq!(opt_of(&offer, opt::MTU), Some(1500u16.to_be_bytes().to_vec()));
        assert_eq!(opt_of(&offer, opt::LEASE_TIME), Some(3600u32.to_be_bytes().to_vec()));
        assert_eq!(opt_of(&offer, opt::HOSTNAME), Some(b"alpha".to_vec()));
        assert_eq!((offer.dst_mac, offer.dst_ip), (M1, Ipv4Addr::new(192, 168, 122, 2)));
        assert!(s.leases(1000).is_empty(), "an offer is not a lease");
        let ip = bind(&mut s, M1, 1001);
        let leases = s.leases(1001);
        assert_eq!(leases.len(), 1);
        assert_eq!((leases[0].mac, leases[0].ip, leases[0].expires), (M1, ip, 1001 + 3600));
        assert_eq!(leases[0].hostname.as_deref(), Some("alpha"));
    }

    #[test]
    fn static_host_gets_its_address_and_name_and_nobody_else_does() {
        let mut s = server();
        assert_eq!(bind(&mut s, WEB, 0), Ipv4Addr::new(192, 168, 122, 10));
        let r = s.handle(&msg(MessageType::Discover, WEB, &[]), 1).unwrap();
        assert_eq!(opt_of(&r, opt::HOSTNAME), Some(b"web".to_vec()));
        // Another client asking for .10 gets something else, and is NAKed if it insists.
        let offer = s.handle(&msg(MessageType::Discover, M1, &[(opt::REQUESTED_IP, vec![192, 168, 122, 10])]), 2).unwrap();
        assert_ne!(reply_yiaddr(&offer.payload), Some(Ipv4Addr::new(192, 168, 122, 10)));
        let nak = s.handle(&msg(MessageType::Request, M1, &[(opt::REQUESTED_IP, vec![192, 168, 122, 10])]), 3).unwrap();
        assert_eq!(nak.msg_type, MessageType::Nak);
        assert_eq!(nak.dst_mac, [0xff; 6]);
    }

    #[test]
    fn renewal_rebinding_and_init_reboot() {
        let mut s = server();
        let ip = bind(&mut s, M1, 0);
        // Renewing: unicast REQUEST with ciaddr, no server id / requested ip.
        let mut renew = msg(MessageType::Request, M1, &[]);
        renew.ciaddr = ip;
        let ack = s.handle(&renew, 1800).unwrap();
        assert_eq!(ack.msg_type, MessageType::Ack);
        assert_eq!(ack.dst_ip, ip, "answered to ciaddr");
        assert_eq!(s.leases(1800)[0].expires, 1800 + 3600);
        // Init-reboot with the right address: ACK; with a foreign one: NAK.
        let reboot = msg(MessageType::Request, M1, &[(opt::REQUESTED_IP, ip.octets().to_vec())]);
        assert_eq!(s.handle(&reboot, 1900).unwrap().msg_type, MessageType::Ack);
        let wrong = msg(MessageType::Request, M1, &[(opt::REQUESTED_IP, vec![10, 9, 9, 9])]);
        assert_eq!(s.handle(&wrong, 1901).unwrap().msg_type, MessageType::Nak);
        // A client that chose another server: our offer is dropped, no answer.
        s.handle(&msg(MessageType::Discover, M2, &[]), 2000).unwrap();
        let other =
            msg(MessageType::Request, M2, &[(opt::SERVER_ID, vec![192, 168, 122, 99]), (opt::REQUESTED_IP, vec![192, 168, 122, 3])]);
        assert!(s.handle(&other, 2001).is_none());
    }

    #[test]
    fn release_decline_and_inform() {
        let mut s = server();
        let ip = bind(&mut s, M1, 0);
        let mut rel = msg(MessageType::Release, M1, &[]);
        rel.ciaddr = ip;
        assert!(s.handle(&rel, 10).is_none());
        assert!(s.leases(10).is_empty());
        // The same client gets the same address back.
        assert_eq!(bind(&mut s, M1, 20), ip);
        // DECLINE: the address is in use by someone else; it is not offered for a while.
        assert!(s.handle(&msg(MessageType::Decline, M1, &[(opt::REQUESTED_IP, ip.octets().to_vec())]), 30).is_none());
        let next = bind(&mut s, M1, 31);
        assert_ne!(next, ip);
        assert!(s.leases(31).iter().all(|l| l.ip != ip));
        // INFORM: configuration only, no address, no lease time.
        let mut inf = msg(MessageType::Inform, M2, &[]);
        inf.ciaddr = Ipv4Addr::new(192, 168, 122, 200);
        let ack = s.handle(&inf, 40).unwrap();
        assert_eq!(ack.msg_type, MessageType::Ack);
        assert_eq!(reply_yiaddr(&ack.payload), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(opt_of(&ack, opt::LEASE_TIME), None);
        assert_eq!(ack.dst_ip, Ipv4Addr::new(192, 168, 122, 200));
    }

    #[test]
    fn holders_follow_leases_and_reservations() {
        let mut s = server();
        let h = s.holders();
        assert_eq!(h.holder(Ipv4Addr::new(192, 168, 122, 10)), Some(WEB), "a static host's address is reserved from the start");
        let offer = s.handle(&msg(MessageType::Discover, M1, &[]), 0).unwrap();
        let offered = reply_yiaddr(&offer.payload).unwrap();
        assert_eq!(h.holder(offered), None, "an offer holds nothing");
        let rev = h.revision();
        let ip = bind(&mut s, M1, 1);
        assert_eq!((h.holder(ip), h.revision() > rev), (Some(M1), true));
        // A release naming another address is ignored: the lease stays, and so does its holder.
        let mut wrong = msg(MessageType::Release, M1, &[]);
        wrong.ciaddr = Ipv4Addr::new(192, 168, 122, 99);
        s.handle(&wrong, 2);
        assert_eq!((s.ip_of(&M1, 2), h.holder(ip)), (Some(ip), Some(M1)));
        let mut rel = msg(MessageType::Release, M1, &[]);
        rel.ciaddr = ip;
        s.handle(&rel, 3);
        assert_eq!((s.ip_of(&M1, 3), h.holder(ip)), (None, None));
        let ip = bind(&mut s, M1, 4);
        s.handle(&msg(MessageType::Decline, M1, &[(opt::REQUESTED_IP, ip.octets().to_vec())]), 5);
        assert_eq!(h.holder(ip), None);
        // Restored leases hold their addresses too.
        let mut t = server();
        t.restore(&[Lease { mac: M2, ip: Ipv4Addr::new(192, 168, 122, 50), expires: 100, hostname: None }], 10);
        assert_eq!(t.holders().holder(Ipv4Addr::new(192, 168, 122, 50)), Some(M2));
    }

    #[test]
    fn distinct_addresses_and_bounded_state_under_a_discover_flood() {
        let mut s = server();
        let mut seen = std::collections::HashSet::new();
        for i in 0..64u8 {
            assert!(seen.insert(bind(&mut s, [0x52, 0x54, 1, 0, 0, i], 0)));
        }
        // 10 000 random clients: at most the range's worth of bindings ever exist.
        for i in 0..10_000u32 {
            let mac = [0x52, 0x55, (i >> 16) as u8, (i >> 8) as u8, i as u8, 7];
            s.handle(&msg(MessageType::Discover, mac, &[]), 1);
        }
        assert!(s.bindings.len() <= 253 + 1, "{}", s.bindings.len());
        assert_eq!(s.by_ip.len(), s.bindings.len());
        assert_eq!(s.leases(1).len(), 64, "bound leases survive the flood");
        // After the offers expire, the addresses are offered again.
        assert!(s.handle(&msg(MessageType::Discover, [0x52, 0x56, 0, 0, 0, 1], &[]), 1).is_none(), "range exhausted");
        assert!(s.handle(&msg(MessageType::Discover, [0x52, 0x56, 0, 0, 0, 1], &[]), 1 + OFFER_SECS).is_some());
    }

    #[test]
    fn leases_expire_and_restore_after_restart() {
        let mut s = server();
        let ip = bind(&mut s, M1, 0);
        let saved = s.leases(0);
        let mut t = server();
        assert_eq!(t.restore(&saved, 100), 1);
        assert_eq!(t.ip_of(&M1, 100), Some(ip));
        assert_eq!(bind(&mut t, M1, 200), ip, "same address after a restart");
        // Expired and misfit leases are not restored.
        let stale = [
            Lease { mac: M2, ip: Ipv4Addr::new(192, 168, 122, 50), expires: 5, hostname: None },
            Lease { mac: M2, ip: Ipv4Addr::new(10, 0, 0, 5), expires: 9999, hostname: None },
            Lease { mac: M2, ip: Ipv4Addr::new(192, 168, 122, 10), expires: 9999, hostname: None },
        ];
        assert_eq!(server().restore(&stale, 10), 0);
        assert!(s.leases(3601).is_empty(), "expired");
    }

    /// DISCOVER → REQUEST under host name `name`; returns the ACK.
    fn bind_named(s: &mut DhcpServer, mac: Mac, name: &str, now: u64) -> Reply {
        let h = (opt::HOSTNAME, name.as_bytes().to_vec());
        let offer = s.handle(&msg(MessageType::Discover, mac, std::slice::from_ref(&h)), now).expect("offer");
        let ip = reply_yiaddr(&offer.payload).unwrap().octets().to_vec();
        let req = msg(MessageType::Request, mac, &[h, (opt::REQUESTED_IP, ip), (opt::SERVER_ID, SERVER.octets().to_vec())]);
        let ack = s.handle(&req, now).expect("ack");
        assert_eq!(ack.msg_type, MessageType::Ack);
        ack
    }

    fn name_of(s: &DhcpServer, mac: Mac, now: u64) -> Option<String> {
        s.leases(now).into_iter().find(|l| l.mac == mac).and_then(|l| l.hostname)
    }

    #[test]
    fn the_first_holder_of_a_host_name_keeps_it() {
        let mut s = server();
        bind_named(&mut s, M1, "alpha", 0);
        assert_eq!(name_of(&s, M1, 0).as_deref(), Some("alpha"));
        assert!(s.take_name_refusals().is_empty());
        // A second guest asking for the same name gets its address, but no name.
        let ack = bind_named(&mut s, M2, "Alpha", 1);
        assert_eq!(opt_of(&ack, opt::HOSTNAME), None, "the name is not confirmed to the second guest");
        assert_eq!(name_of(&s, M2, 1), None);
        assert_eq!(name_of(&s, M1, 1).as_deref(), Some("alpha"), "the first holder keeps it");
        assert_eq!(s.take_name_refusals(), vec![(M2, "alpha".to_string())]);
        // Renewing does not take it either, and is not reported again.
        bind_named(&mut s, M2, "alpha", 2);
        assert_eq!(name_of(&s, M2, 2), None);
        assert!(s.take_name_refusals().is_empty(), "reported once");
        // The first holder renews and keeps it; once its lease is gone, the name is free.
        bind_named(&mut s, M1, "alpha", 3);
        assert_eq!(name_of(&s, M1, 3).as_deref(), Some("alpha"));
        let mut rel = msg(MessageType::Release, M1, &[]);
        rel.ciaddr = s.ip_of(&M1, 3).unwrap();
        s.handle(&rel, 4);
        bind_named(&mut s, M2, "alpha", 5);
        assert_eq!(name_of(&s, M2, 5).as_deref(), Some("alpha"));
        bind_named(&mut s, M1, "alpha", 6);
        assert_eq!(name_of(&s, M1, 6), None, "now M1 is second");
    }

    #[test]
    fn reserved_static_and_configured_names_are_never_a_clients() {
        let mut s = server();
        s.reserve_names(["files".to_string()]);
        for (i, name) in ["wpad", "WPAD", "localhost", "isatap", "gateway", "web", "files"].iter().enumerate() {
            let mac = [0x52, 0x54, 0, 0, 1, i as u8];
            let ack = bind_named(&mut s, mac, name, 0);
            assert_eq!(name_of(&s, mac, 0), None, "{name}");
            assert_eq!(opt_of(&ack, opt::HOSTNAME), None, "{name}");
        }
        assert_eq!(s.take_name_refusals().len(), 7);
        // The static host has its name even though it sends another one, or none.
        bind_named(&mut s, WEB, "other", 0);
        assert_eq!(name_of(&s, WEB, 0).as_deref(), Some("web"));
    }

    #[test]
    fn restored_leases_follow_the_same_name_rules() {
        let l = |mac: Mac, last: u8, name: &str| Lease {
            mac,
            ip: Ipv4Addr::new(192, 168, 122, last),
            expires: 9999,
            hostname: Some(name.to_string()),
        };
        let mut s = server();
        let saved = [l(M1, 20, "dup"), l(M2, 21, "dup"), l([0x52, 0x54, 0, 0, 0, 3], 22, "web"), l([0x52, 0x54, 0, 0, 0, 4], 23, "nas")];
        assert_eq!(s.restore(&saved, 10), 4, "every lease is restored, names or not");
        assert_eq!(name_of(&s, M1, 10).as_deref(), Some("dup"));
        assert_eq!(name_of(&s, M2, 10), None);
        assert_eq!(name_of(&s, [0x52, 0x54, 0, 0, 0, 3], 10), None, "a static host's name");
        // A name the configuration now gives to a DNS host is taken from the lease.
        s.reserve_names(["NAS".to_string()]);
        assert_eq!(name_of(&s, [0x52, 0x54, 0, 0, 0, 4], 10), None);
    }

    #[test]
    fn ignores_relays_and_bad_hardware_addresses() {
        let mut s = server();
        let mut m = msg(MessageType::Discover, M1, &[]);
        m.giaddr = Ipv4Addr::new(10, 0, 0, 1);
        assert!(s.handle(&m, 0).is_none());
        assert!(s.handle(&msg(MessageType::Discover, [0xff; 6], &[]), 0).is_none());
        assert!(s.handle(&msg(MessageType::Discover, [0; 6], &[]), 0).is_none());
    }
}
