//! DHCP messages: the BOOTP header, the magic cookie and the options (RFC 2131 §2, RFC 2132).
//! Parsing never panics and never allocates more than the message's own size.

use std::net::Ipv4Addr;

use crate::Mac;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const FIXED_LEN: usize = 236;

pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN: u8 = 15;
    pub const MTU: u8 = 26;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MSG_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAM_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const RENEWAL_T1: u8 = 58;
    pub const REBINDING_T2: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
    pub fn code(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
        }
    }
}

/// The fields of a client's message the server acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpMessage {
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: Mac,
    pub msg_type: MessageType,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    /// Option 12, printable ASCII only, at most 63 bytes.
    pub hostname: Option<String>,
}

/// Why a message was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Truncated,
    NotARequest,
    NotEthernet,
    NoMagicCookie,
    BadOption,
    NoMessageType,
}

fn ip_at(b: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3])
}

/// A host name as DHCP clients send it: kept only if it is a plausible DNS label.
fn clean_hostname(v: &[u8]) -> Option<String> {
    let v = v.strip_suffix(&[0]).unwrap_or(v);
    if v.is_empty() || v.len() > 63 || !v.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') || v[0] == b'-' {
        return None;
    }
    Some(String::from_utf8_lossy(v).to_ascii_lowercase())
}

impl DhcpMessage {
    /// Parses a BOOTREQUEST (the UDP payload sent to port 67).
    pub fn parse(b: &[u8]) -> Result<DhcpMessage, ParseError> {
        if b.len() < FIXED_LEN + 4 {
            return Err(ParseError::Truncated);
        }
        if b[0] != BOOTREQUEST {
            return Err(ParseError::NotARequest);
        }
        if b[1] != 1 || b[2] != 6 {
            return Err(ParseError::NotEthernet);
        }
        if b[FIXED_LEN..FIXED_LEN + 4] != MAGIC {
            return Err(ParseError::NoMagicCookie);
        }
        let mut m = DhcpMessage {
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: ip_at(b, 12),
            giaddr: ip_at(b, 24),
            chaddr: [b[28], b[29], b[30], b[31], b[32], b[33]],
            msg_type: MessageType::Discover,
            requested_ip: None,
            server_id: None,
            hostname: None,
        };
        let mut msg_type = None;
        let mut i = FIXED_LEN + 4;
        while i < b.len() {
            let code = b[i];
            if code == opt::PAD {
                i += 1;
                continue;
            }
            if code == opt::END {
                break;
            }
            let len = *b.get(i + 1).ok_or(ParseError::BadOption)? as usize;
            let v = b.get(i + 2..i + 2 + len).ok_or(ParseError::BadOption)?;
            match (code, len) {
                (opt::MSG_TYPE, 1) => msg_type = MessageType::from_u8(v[0]),
                (opt::REQUESTED_IP, 4) => m.requested_ip = Some(ip_at(v, 0)),
                (opt::SERVER_ID, 4) => m.server_id = Some(ip_at(v, 0)),
                (opt::HOSTNAME, _) => m.hostname = clean_hostname(v),
                _ => {}
            }
            i += 2 + len;
        }
        m.msg_type = msg_type.ok_or(ParseError::NoMessageType)?;
        Ok(m)
    }
}

/// Builds a BOOTREPLY.
pub struct ReplyBuilder {
    buf: Vec<u8>,
}

impl ReplyBuilder {
    /// Starts a reply to `req` with `yiaddr`, from server `siaddr`.
    pub fn new(req: &DhcpMessage, msg_type: MessageType, yiaddr: Ipv4Addr, server: Ipv4Addr) -> Self {
        let mut buf = vec![0u8; FIXED_LEN];
        buf[0] = BOOTREPLY;
        buf[1] = 1;
        buf[2] = 6;
        buf[4..8].copy_from_slice(&req.xid.to_be_bytes());
        buf[10..12].copy_from_slice(&req.flags.to_be_bytes());
        if msg_type == MessageType::Ack || msg_type == MessageType::Offer {
            buf[12..16].copy_from_slice(&req.ciaddr.octets());
        }
        buf[16..20].copy_from_slice(&yiaddr.octets());
        buf[20..24].copy_from_slice(&server.octets());
        buf[24..28].copy_from_slice(&req.giaddr.octets());
        buf[28..34].copy_from_slice(&req.chaddr);
        buf.extend_from_slice(&MAGIC);
        let mut r = ReplyBuilder { buf };
        r.option(opt::MSG_TYPE, &[msg_type.code()]);
        r.option(opt::SERVER_ID, &server.octets());
        r
    }

    /// Appends an option (values over 255 bytes are cut to 255).
    pub fn option(&mut self, code: u8, value: &[u8]) -> &mut Self {
        let v = &value[..value.len().min(255)];
        self.buf.push(code);
        self.buf.push(v.len() as u8);
        self.buf.extend_from_slice(v);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(opt::END);
        // BOOTP's minimum message length; some clients insist on it.
        if self.buf.len() < 300 {
            self.buf.resize(300, 0);
        }
        self.buf
    }
}

/// Builds a client's BOOTREQUEST, as a DHCP client would send it (tests, benchmarks).
pub fn build_client_message(
    t: MessageType,
    mac: Mac,
    xid: u32,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    hostname: Option<&str>,
) -> Vec<u8> {
    let mut b = vec![0u8; FIXED_LEN];
    b[0] = BOOTREQUEST;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[28..34].copy_from_slice(&mac);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&[opt::MSG_TYPE, 1, t.code()]);
    if let Some(r) = requested {
        b.extend_from_slice(&[opt::REQUESTED_IP, 4]);
        b.extend_from_slice(&r.octets());
    }
    if let Some(sid) = server_id {
        b.extend_from_slice(&[opt::SERVER_ID, 4]);
        b.extend_from_slice(&sid.octets());
    }
    if let Some(h) = hostname {
        b.extend_from_slice(&[opt::HOSTNAME, h.len().min(255) as u8]);
        b.extend_from_slice(&h.as_bytes()[..h.len().min(255)]);
    }
    b.push(opt::END);
    b
}

/// The message type of a reply.
pub fn reply_type(b: &[u8]) -> Option<MessageType> {
    reply_options(b).into_iter().find(|(c, v)| *c == opt::MSG_TYPE && v.len() == 1).and_then(|(_, v)| MessageType::from_u8(v[0]))
}

/// Reads the options of a reply (for tests and for clients of this crate).
pub fn reply_options(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = FIXED_LEN + 4;
    while i + 1 < b.len() && b[i] != opt::END {
        if b[i] == opt::PAD {
            i += 1;
            continue;
        }
        let len = b[i + 1] as usize;
        let Some(v) = b.get(i + 2..i + 2 + len) else {
            break;
        };
        out.push((b[i], v.to_vec()));
        i += 2 + len;
    }
    out
}

/// `yiaddr` of a reply.
pub fn reply_yiaddr(b: &[u8]) -> Option<Ipv4Addr> {
    (b.len() >= 20).then(|| ip_at(b, 16))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A client message as busybox udhcpc sends it.
    pub fn client_msg(t: MessageType, mac: Mac, xid: u32, extra: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut b = build_client_message(t, mac, xid, None, None, None);
        b.pop(); // END; the extra options go before it.
        for (c, v) in extra {
            b.push(*c);
            b.push(v.len() as u8);
            b.extend_from_slice(v);
        }
        b.push(opt::END);
        b
    }

    #[test]
    fn parses_what_a_client_sends() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let b = client_msg(
            MessageType::Request,
            mac,
            0xdeadbeef,
            &[(opt::REQUESTED_IP, vec![10, 0, 0, 5]), (opt::SERVER_ID, vec![10, 0, 0, 1]), (opt::HOSTNAME, b"Web-1".to_vec())],
        );
        let m = DhcpMessage::parse(&b).unwrap();
        assert_eq!(m.msg_type, MessageType::Request);
        assert_eq!(m.xid, 0xdeadbeef);
        assert_eq!(m.chaddr, mac);
        assert_eq!(m.requested_ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(m.server_id, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(m.hostname.as_deref(), Some("web-1"));
    }

    #[test]
    fn refuses_malformed_messages() {
        let good = client_msg(MessageType::Discover, [2; 6], 1, &[]);
        for cut in 0..FIXED_LEN + 4 {
            assert_eq!(DhcpMessage::parse(&good[..cut]), Err(ParseError::Truncated));
        }
        let mut b = good.clone();
        b[0] = 2;
        assert_eq!(DhcpMessage::parse(&b), Err(ParseError::NotARequest));
        let mut b = good.clone();
        b[2] = 8;
        assert_eq!(DhcpMessage::parse(&b), Err(ParseError::NotEthernet));
        let mut b = good.clone();
        b[FIXED_LEN] = 0;
        assert_eq!(DhcpMessage::parse(&b), Err(ParseError::NoMagicCookie));
        let mut b = good[..FIXED_LEN + 4].to_vec();
        b.extend_from_slice(&[opt::HOSTNAME, 50, b'a']);
        assert_eq!(DhcpMessage::parse(&b), Err(ParseError::BadOption));
        let b = client_msg(MessageType::Discover, [2; 6], 1, &[]);
        let no_type: Vec<u8> = b[..FIXED_LEN + 4].iter().copied().chain([opt::END]).collect();
        assert_eq!(DhcpMessage::parse(&no_type), Err(ParseError::NoMessageType));
        // Garbage everywhere never panics.
        let mut x = good.clone();
        for i in 0..x.len() {
            x[i] = x[i].wrapping_mul(13).wrapping_add(i as u8);
            let _ = DhcpMessage::parse(&x);
        }
    }

    #[test]
    fn hostnames_are_sanitised() {
        assert_eq!(clean_hostname(b"vm1\0").as_deref(), Some("vm1"));
        assert_eq!(clean_hostname(b"bad name"), None);
        assert_eq!(clean_hostname(b"-x"), None);
        assert_eq!(clean_hostname(&[b'a'; 64]), None);
        assert_eq!(clean_hostname(b"evil.example.com"), None);
    }
}
