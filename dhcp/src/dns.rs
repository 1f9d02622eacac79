//! The gateway's DNS responder, as pure logic: a query's bytes and the local zone in, an
//! answer's bytes (or "forward it upstream") out. Local names are the network's guests: static
//! hosts, DHCP clients that sent a host name, and configured `dns.hosts`; they answer to their
//! bare name and, with a domain, to `name.domain`, and by PTR in the subnet's reverse zone.
//! Bare names and names under the local domain that nobody has are NXDOMAIN here, never
//! forwarded (dnsmasq's domain-needed); everything else is forwarded.
//!
//! IPv6: names with IPv6 addresses answer AAAA, and those addresses' ip6.arpa names PTR; the
//! network's IPv6 prefix and link-local addresses (fe80::/10) are local reverse zones. A local
//! name with addresses of one family only answers the other's query with no data (NOERROR,
//! no answer), never NXDOMAIN, so resolvers asking for both keep the one they got.

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

pub const PORT: u16 = 53;
pub const QTYPE_A: u16 = 1;
pub const QTYPE_PTR: u16 = 12;
pub const QTYPE_AAAA: u16 = 28;
/// TTL of local answers: short, names follow DHCP leases.
const TTL: u32 = 60;

/// The names the gateway answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalZone {
    /// Lowercase, without trailing dot.
    pub domain: Option<String>,
    /// (lowercase name, address).
    pub names: Vec<(String, Ipv4Addr)>,
    /// The network's subnet (address, prefix): its reverse zone is local.
    pub subnet: (Ipv4Addr, u8),
    /// (lowercase name, IPv6 address).
    pub names6: Vec<(String, Ipv6Addr)>,
    /// The network's IPv6 prefix (address, length), if it has one: its reverse zone is local.
    pub subnet6: Option<(Ipv6Addr, u8)>,
}

/// What to do with a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsAction {
    /// Send these bytes back to the client.
    Answer(Vec<u8>),
    /// Not ours: forward the query unchanged to an upstream resolver.
    Forward,
}

/// Where a message's single question ends, and its name, as the forwarder needs them to
/// relay the query's bytes unchanged and to match an answer's question to the query's
/// byte for byte (case aside). Compression pointers are not allowed in a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Lowercase labels joined by '.', no trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset of the end of the question in the query.
    pub end: usize,
}

/// Parses the first question of a message (see [`Question`]).
pub fn parse_question(q: &[u8]) -> Option<Question> {
    let mut i = 12;
    let mut name = String::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 || name.len() + len + 1 > 255 {
            return None;
        }
        let label = q.get(i..i + len)?;
        if !label.iter().all(|c| c.is_ascii_graphic() && *c != b'.') {
            return None;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*q.get(i + 2)?, *q.get(i + 3)?]);
    Some(Question { name, qtype, qclass, end: i + 4 })
}

/// A response to `query` (id, opcode and RD copied; RA set) with `rcode`, the query's
/// question if it has one, and `answers`.
fn response(query: &Message, rcode: ResponseCode, authoritative: bool, answers: Vec<Record>) -> Vec<u8> {
    let mut r = Message::new();
    r.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(authoritative)
        .set_response_code(rcode)
        .add_queries(query.queries().iter().take(1).cloned())
        .add_answers(answers);
    r.to_vec().unwrap_or_default()
}

/// An error answer with only the header, for a query too broken to parse: its id and RD
/// are read from its first bytes.
fn bare_error(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut r = Message::error_msg(u16::from_be_bytes([query[0], query[1]]), OpCode::Query, rcode);
    r.set_recursion_desired(query[2] & 1 != 0).set_recursion_available(true);
    r.to_vec().unwrap_or_default()
}

/// `name` as a domain name, for PTR data (None if it cannot be one).
fn dns_name(name: &str) -> Option<Name> {
    Name::from_ascii(format!("{name}.")).ok()
}

impl LocalZone {
    fn strip_domain<'a>(&self, name: &'a str) -> Option<&'a str> {
        if !name.contains('.') {
            return Some(name);
        }
        let d = self.domain.as_deref()?;
        let host = name.strip_suffix(d)?.strip_suffix('.')?;
        (!host.contains('.')).then_some(host)
    }

    fn full_name(&self, host: &str) -> String {
        match &self.domain {
            Some(d) => format!("{host}.{d}"),
            None => host.to_string(),
        }
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.subnet.1 == 0 { 0 } else { u32::MAX << (32 - self.subnet.1 as u32) };
        u32::from(ip) & mask == u32::from(self.subnet.0) & mask
    }

    /// Whether `ip`'s reverse name is the network's to answer: in its IPv6 prefix, or
    /// link-local (which no resolver upstream knows).
    fn in_subnet6(&self, ip: Ipv6Addr) -> bool {
        let mask = |len: u8| if len == 0 { 0 } else { u128::MAX << (128 - len.min(128) as u32) };
        let link_local = u128::from(ip) & mask(10) == 0xfe80u128 << 112;
        link_local || self.subnet6.is_some_and(|(net, len)| u128::from(ip) & mask(len) == u128::from(net) & mask(len))
    }

    /// Whether `name` is in the local domain (so it is answered here, if only NXDOMAIN).
    fn is_local(&self, name: &str) -> bool {
        !name.contains('.') || self.domain.as_deref().is_some_and(|d| name == d || name.ends_with(&format!(".{d}")))
    }

    /// PTR records naming the hosts in `found`, for question `q`.
    fn pointers<'a>(&self, q: &Query, found: impl Iterator<Item = &'a String>) -> Vec<Record> {
        if q.query_type() != RecordType::PTR || q.query_class() != DNSClass::IN {
            return Vec::new();
        }
        found.filter_map(|n| dns_name(&self.full_name(n))).map(|n| Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(n)))).collect()
    }

    /// Answers a query, or says to forward it. `None`: not worth an answer (not a query, or
    /// too short to carry an id).
    pub fn respond(&self, query: &[u8]) -> Option<DnsAction> {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            return None;
        }
        let Ok(msg) = Message::from_vec(query) else {
            return Some(DnsAction::Answer(bare_error(query, ResponseCode::FormErr)));
        };
        if msg.op_code() != OpCode::Query {
            return Some(DnsAction::Answer(response(&msg, ResponseCode::NotImp, false, Vec::new())));
        }
        let [q] = msg.queries() else {
            return Some(DnsAction::Answer(bare_error(query, ResponseCode::FormErr)));
        };
        let lower = q.name().to_lowercase().to_ascii();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let is_in = |t: RecordType| q.query_type() == t && q.query_class() == DNSClass::IN;
        let (found, answers) = if let Some(rev) = name.strip_suffix(".in-addr.arpa") {
            let octets: Vec<u8> = rev.split('.').filter_map(|o| o.parse().ok()).collect();
            if octets.len() != 4 || rev.split('.').count() != 4 {
                return Some(DnsAction::Forward);
            }
            let ip = Ipv4Addr::new(octets[3], octets[2], octets[1], octets[0]);
            if !self.in_subnet(ip) {
                return Some(DnsAction::Forward);
            }
            let found: Vec<&String> = self.names.iter().filter(|(_, a)| *a == ip).map(|(n, _)| n).collect();
            (!found.is_empty(), self.pointers(q, found.into_iter()))
        } else if let Some(rev) = name.strip_suffix(".ip6.arpa") {
            let Some(ip) = parse_ip6_arpa(rev) else { return Some(DnsAction::Forward) };
            if !self.in_subnet6(ip) {
                return Some(DnsAction::Forward);
            }
            let found: Vec<&String> = self.names6.iter().filter(|(_, a)| *a == ip).map(|(n, _)| n).collect();
            (!found.is_empty(), self.pointers(q, found.into_iter()))
        } else if self.is_local(name) {
            let host = self.strip_domain(name);
            let v4 = self.names.iter().filter(|(n, _)| Some(n.as_str()) == host).map(|(_, a)| RData::A(A(*a)));
            let v6 = self.names6.iter().filter(|(n, _)| Some(n.as_str()) == host).map(|(_, a)| RData::AAAA(AAAA(*a)));
            let all: Vec<RData> = v4.chain(v6).collect();
            let found = !all.is_empty();
            // A name with addresses of the other family only: no data, not NXDOMAIN.
            let wanted = all.into_iter().filter(|d| is_in(d.record_type()));
            (found, wanted.map(|d| Record::from_rdata(q.name().clone(), TTL, d)).collect())
        } else {
            return Some(DnsAction::Forward);
        };
        let rcode = if found { ResponseCode::NoError } else { ResponseCode::NXDomain };
        Some(DnsAction::Answer(response(&msg, rcode, true, answers)))
    }
}

/// The address of an ip6.arpa name without its suffix: 32 nibbles, least significant first.
fn parse_ip6_arpa(rev: &str) -> Option<Ipv6Addr> {
    let mut v: u128 = 0;
    let mut n = 0;
    for (i, label) in rev.split('.').enumerate() {
        if i >= 32 || label.len() != 1 {
            return None;
        }
        let d = u128::from(label.chars().next()?.to_digit(16)?);
        v |= d << (4 * i);
        n += 1;
    }
    (n == 32).then(|| Ipv6Addr::from(v))
}

/// The ip6.arpa name of an address (tests, benchmarks, the guests' reverse lookups).
pub fn ip6_arpa(ip: Ipv6Addr) -> String {
    let v = u128::from(ip);
    let mut s: String = (0..32).map(|i| format!("{:x}.", (v >> (4 * i)) & 0xf)).collect();
    s.push_str("ip6.arpa");
    s
}

/// REFUSED, for a query the gateway cannot resolve (no upstream resolver).
pub fn refused(query: &[u8]) -> Vec<u8> {
    error_answer(query, ResponseCode::Refused)
}

/// SERVFAIL, for a forwarded query no upstream resolver answered.
pub fn servfail(query: &[u8]) -> Vec<u8> {
    error_answer(query, ResponseCode::ServFail)
}

/// An answer with `rcode` and the query's question, or empty if `query` has no header.
fn error_answer(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    if query.len() < 12 {
        return Vec::new();
    }
    match Message::from_vec(query) {
        Ok(msg) => response(&msg, rcode, false, Vec::new()),
        Err(_) => bare_error(query, rcode),
    }
}

/// Builds a query (tests, benchmarks); empty if `name` is not a domain name.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let Some(name) = dns_name(name.trim_end_matches('.')) else { return Vec::new() };
    let mut m = Message::new();
    m.set_id(id).set_recursion_desired(true).add_query(Query::query(name, RecordType::from(qtype)));
    m.to_vec().unwrap_or_default()
}

/// The rcode and the A/PTR answers of a response (tests, benchmarks).
pub fn read_answers(r: &[u8]) -> Option<(u16, Vec<Ipv4Addr>, Vec<String>)> {
    read_answers_all(r).map(|(rcode, a, _, ptr)| (rcode, a, ptr))
}

/// The rcode and the A, AAAA and PTR answers of a response (tests, benchmarks); PTR names
/// lowercase without the trailing dot.
#[allow(clippy::type_complexity)]
pub fn read_answers_all(r: &[u8]) -> Option<(u16, Vec<Ipv4Addr>, Vec<Ipv6Addr>, Vec<String>)> {
    let m = Message::from_vec(r).ok()?;
    let (mut a, mut aaaa, mut ptr) = (Vec::new(), Vec::new(), Vec::new());
    for rec in m.answers() {
        match rec.data() {
            RData::A(ip) => a.push(ip.0),
            RData::AAAA(ip) => aaaa.push(ip.0),
            RData::PTR(n) => ptr.push(n.0.to_lowercase().to_ascii().trim_end_matches('.').to_string()),
            _ => {}
        }
    }
    Some((u16::from(m.response_code()), a, aaaa, ptr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> LocalZone {
        LocalZone {
            domain: Some("vunet".into()),
            names: vec![("web".into(), Ipv4Addr::new(192, 168, 122, 10)), ("alpha".into(), Ipv4Addr::new(192, 168, 122, 100))],
            subnet: (Ipv4Addr::new(192, 168, 122, 1), 24),
            names6: vec![("web".into(), WEB6), ("six".into(), SIX)],
            subnet6: Some((Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 1), 64)),
        }
    }

    const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0x5054, 0xff, 0xfe00, 0x10);
    const SIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x66);

    #[test]
    fn aaaa_for_names_with_ipv6_addresses() {
        for name in ["web", "web.vunet", "WEB.vunet"] {
            let (rcode, a, aaaa, _) = read_answers_all(&answer(&build_query(7, name, QTYPE_AAAA))).unwrap();
            assert_eq!((rcode, a.len(), aaaa), (0, 0, vec![WEB6]), "{name}");
        }
        // A name with only an IPv6 address: A is no data, not NXDOMAIN; and the other way.
        let (rcode, a, aaaa, _) = read_answers_all(&answer(&build_query(7, "six", QTYPE_A))).unwrap();
        assert_eq!((rcode, a.len(), aaaa.len()), (0, 0, 0));
        let (rcode, _, aaaa, _) = read_answers_all(&answer(&build_query(7, "six", QTYPE_AAAA))).unwrap();
        assert_eq!((rcode, aaaa), (0, vec![SIX]));
        let (rcode, _, aaaa, _) = read_answers_all(&answer(&build_query(7, "alpha", QTYPE_AAAA))).unwrap();
        assert_eq!((rcode, aaaa.len()), (0, 0), "IPv4 only: no data");
        let (rcode, _, aaaa, _) = read_answers_all(&answer(&build_query(7, "nosuch", QTYPE_AAAA))).unwrap();
        assert_eq!((rcode, aaaa.len()), (3, 0));
    }

    #[test]
    fn reverse_lookups_in_ip6_arpa() {
        assert_eq!(parse_ip6_arpa(ip6_arpa(WEB6).strip_suffix(".ip6.arpa").unwrap()), Some(WEB6));
        let (rcode, _, _, ptr) = read_answers_all(&answer(&build_query(2, &ip6_arpa(WEB6), QTYPE_PTR))).unwrap();
        assert_eq!((rcode, ptr), (0, vec!["web.vunet".to_string()]));
        let (rcode, _, _, ptr) = read_answers_all(&answer(&build_query(2, &ip6_arpa(SIX).to_uppercase(), QTYPE_PTR))).unwrap();
        assert_eq!((rcode, ptr), (0, vec!["six.vunet".to_string()]));
        // Nobody's address in the prefix, or link-local: NXDOMAIN here.
        let nobody = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x99);
        let ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x99);
        for ip in [nobody, ll] {
            let (rcode, _, _, ptr) = read_answers_all(&answer(&build_query(2, &ip6_arpa(ip), QTYPE_PTR))).unwrap();
            assert_eq!((rcode, ptr.len()), (3, 0), "{ip}");
        }
        // Elsewhere, or not an address (too few nibbles, two-digit labels): forwarded.
        let google = Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888);
        assert_eq!(zone().respond(&build_query(2, &ip6_arpa(google), QTYPE_PTR)), Some(DnsAction::Forward));
        assert_eq!(zone().respond(&build_query(2, "1.0.0.d.f.ip6.arpa", QTYPE_PTR)), Some(DnsAction::Forward));
        let long = ip6_arpa(WEB6).replacen("0.", "00.", 1);
        assert_eq!(zone().respond(&build_query(2, &long, QTYPE_PTR)), Some(DnsAction::Forward));
        let no_subnet = LocalZone { subnet6: None, ..zone() };
        assert_eq!(no_subnet.respond(&build_query(2, &ip6_arpa(WEB6), QTYPE_PTR)), Some(DnsAction::Forward));
    }

    fn answer(q: &[u8]) -> Vec<u8> {
        match zone().respond(q) {
            Some(DnsAction::Answer(a)) => a,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn local_names_answer_bare_and_under_the_domain() {
        for name in ["web", "web.vunet", "WEB.Vunet"] {
            let (rcode, a, _) = read_answers(&answer(&build_query(7, name, QTYPE_A))).unwrap();
            assert_eq!((rcode, a), (0, vec![Ipv4Addr::new(192, 168, 122, 10)]), "{name}");
        }
        let r = answer(&build_query(9, "alpha", QTYPE_A));
        assert_eq!(&r[0..2], &[0, 9], "same id");
        assert_eq!(r[2] & 0x84, 0x84, "response, authoritative");
    }

    #[test]
    fn unknown_local_names_are_nxdomain_and_aaaa_is_nodata() {
        for name in ["nosuch", "nosuch.vunet"] {
            let (rcode, a, _) = read_answers(&answer(&build_query(1, name, QTYPE_A))).unwrap();
            assert_eq!((rcode, a.len()), (3, 0), "{name}");
        }
        let (rcode, a, _) = read_answers(&answer(&build_query(1, "alpha", QTYPE_AAAA))).unwrap();
        assert_eq!((rcode, a.len()), (0, 0));
    }

    #[test]
    fn reverse_lookups_in_the_subnet() {
        let (rcode, _, ptr) = read_answers(&answer(&build_query(2, "10.122.168.192.in-addr.arpa", QTYPE_PTR))).unwrap();
        assert_eq!((rcode, ptr), (0, vec!["web.vunet".to_string()]));
        let (rcode, _, ptr) = read_answers(&answer(&build_query(2, "77.122.168.192.in-addr.arpa", QTYPE_PTR))).unwrap();
        assert_eq!((rcode, ptr.len()), (3, 0));
        assert_eq!(zone().respond(&build_query(2, "8.8.8.8.in-addr.arpa", QTYPE_PTR)), Some(DnsAction::Forward));
    }

    #[test]
    fn error_answers_keep_id_and_question() {
        let q = build_query(0x1234, "example.org", QTYPE_A);
        for (a, rcode) in [(refused(&q), 5), (servfail(&q), 2)] {
            assert_eq!(&a[0..2], &[0x12, 0x34]);
            assert_eq!(u16::from_be_bytes([a[2], a[3]]) & 0x800f, 0x8000 | rcode);
            assert_eq!(&a[12..], &q[12..], "the question");
        }
        assert!(servfail(&q[..5]).is_empty());
    }

    #[test]
    fn other_names_are_forwarded() {
        assert_eq!(zone().respond(&build_query(3, "example.org", QTYPE_A)), Some(DnsAction::Forward));
        let no_domain = LocalZone { domain: None, ..zone() };
        assert_eq!(no_domain.respond(&build_query(3, "web.vunet", QTYPE_A)), Some(DnsAction::Forward));
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing_and_never_panic() {
        let good = build_query(5, "web.vunet", QTYPE_A);
        for cut in 0..good.len() {
            match zone().respond(&good[..cut]) {
                None => assert!(cut < 12),
                Some(DnsAction::Answer(a)) => assert_eq!(u16::from_be_bytes([a[2], a[3]]) & 0xf, 1, "FORMERR at {cut}"),
                Some(DnsAction::Forward) => panic!("a cut query is not forwarded"),
            }
        }
        let mut two = good.clone();
        two[5] = 2;
        assert!(matches!(zone().respond(&two), Some(DnsAction::Answer(a)) if a[3] & 0xf == 1));
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert!(matches!(zone().respond(&pointer), Some(DnsAction::Answer(a)) if a[3] & 0xf == 1));
        let mut update = good.clone();
        update[2] = 5 << 3;
        assert!(matches!(zone().respond(&update), Some(DnsAction::Answer(a)) if a[3] & 0xf == 4));
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(zone().respond(&response), None, "responses are not answered");
        let mut x = good.clone();
        for i in 0..x.len() {
            x[i] = x[i].wrapping_mul(7).wrapping_add(i as u8);
            let _ = zone().respond(&x);
        }
    }
}
