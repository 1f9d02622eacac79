//! The lease file: one lease a line, `MAC IP EXPIRY NAME` (`-` for no name), after a header
//! line naming the format. Text, so an administrator can read it; strict, so a truncated or
//! corrupt file is recognised as such and set aside rather than half-trusted.
//!
//! Version 2 adds DHCPv6 leases, `MAC IPv6 EXPIRY NAME DUID IAID` (DUID in hex). A file with
//! no DHCPv6 lease is still written as version 1, so an older vunet reads it; both versions
//! are read.

use std::net::IpAddr;

use crate::server::Lease;
use crate::v6::Lease6;

pub const HEADER: &str = "# vunet leases v1";
/// The header of a file that holds DHCPv6 leases.
pub const HEADER_V2: &str = "# vunet leases v2";

/// Longest DUID kept (RFC 8415 §11.1).
const MAX_DUID: usize = 130;

/// A network's leases, both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leases {
    pub v4: Vec<Lease>,
    pub v6: Vec<Lease6>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseFileError {
    pub line: usize,
    pub reason: &'static str,
}

impl std::fmt::Display for LeaseFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut it = s.split(':');
    for b in m.iter_mut() {
        let p = it.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    it.next().is_none().then_some(m)
}

/// The file's text for IPv4 `leases` only (a version 1 file).
pub fn serialize(leases: &[Lease]) -> String {
    serialize_all(&Leases { v4: leases.to_vec(), v6: Vec::new() })
}

/// The file's text for `leases`. It ends with an `# end` line, so a file cut short by a crash
/// (even at a line boundary) is detected.
pub fn serialize_all(leases: &Leases) -> String {
    let mut s = format!("{}\n", if leases.v6.is_empty() { HEADER } else { HEADER_V2 });
    for l in &leases.v4 {
        s.push_str(&format!("{} {} {} {}\n", fmt_mac(&l.mac), l.ip, l.expires, l.hostname.as_deref().unwrap_or("-")));
    }
    for l in &leases.v6 {
        let duid: String = l.duid.iter().map(|b| format!("{b:02x}")).collect();
        let name = l.hostname.as_deref().unwrap_or("-");
        s.push_str(&format!("{} {} {} {name} {duid} {}\n", fmt_mac(&l.mac), l.ip, l.expires, l.iaid));
    }
    s.push_str("# end\n");
    s
}

/// Parses a lease file's IPv4 leases (of either version).
pub fn parse(text: &str) -> Result<Vec<Lease>, LeaseFileError> {
    parse_all(text).map(|l| l.v4)
}

fn parse_duid(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !(6..=2 * MAX_DUID).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// Parses a lease file (version 1 or 2); any deviation is an error naming the line.
pub fn parse_all(text: &str) -> Result<Leases, LeaseFileError> {
    let mut lines = text.lines().enumerate();
    let v2 = match lines.next() {
        Some((_, HEADER)) => false,
        Some((_, HEADER_V2)) => true,
        _ => return Err(LeaseFileError { line: 1, reason: "missing header" }),
    };
    let mut out = Leases::default();
    for (i, line) in lines {
        if line == "# end" {
            return Ok(out);
        }
        let err = |reason| LeaseFileError { line: i + 1, reason };
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 4 && !(v2 && f.len() == 6) {
            return Err(err(if v2 { "expected: MAC IP EXPIRY NAME [DUID IAID]" } else { "expected: MAC IP EXPIRY NAME" }));
        }
        let mac = parse_mac(f[0]).ok_or(err("bad MAC"))?;
        let ip: IpAddr = f[1].parse().map_err(|_| err("bad IP"))?;
        let expires: u64 = f[2].parse().map_err(|_| err("bad expiry"))?;
        let hostname = match f[3] {
            "-" => None,
            n if !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => Some(n.to_string()),
            _ => return Err(err("bad name")),
        };
        match (ip, f.len()) {
            (IpAddr::V4(ip), 4) => out.v4.push(Lease { mac, ip, expires, hostname }),
            (IpAddr::V6(ip), 6) => {
                let duid = parse_duid(f[4]).ok_or(err("bad DUID"))?;
                let iaid: u32 = f[5].parse().map_err(|_| err("bad IAID"))?;
                out.v6.push(Lease6 { mac, ip, expires, hostname, duid, iaid });
            }
            _ => return Err(err("bad IP")),
        }
    }
    Err(LeaseFileError { line: text.lines().count() + 1, reason: "truncated (no end line)" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn sample() -> Vec<Lease> {
        vec![
            Lease {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                ip: Ipv4Addr::new(192, 168, 122, 2),
                expires: 1_800_000_000,
                hostname: Some("alpha".into()),
            },
            Lease { mac: [0x52, 0x54, 0, 0, 0, 2], ip: Ipv4Addr::new(192, 168, 122, 3), expires: 1_800_000_100, hostname: None },
        ]
    }

    #[test]
    fn round_trip() {
        let text = serialize(&sample());
        assert_eq!(parse(&text).unwrap(), sample());
        assert_eq!(parse(&serialize(&[])).unwrap(), vec![]);
    }

    fn sample6() -> Leases {
        Leases {
            v4: sample(),
            v6: vec![Lease6 {
                mac: [0x52, 0x54, 0, 0, 0, 3],
                ip: "fd00:7675:1::100".parse().unwrap(),
                expires: 1_800_000_200,
                hostname: Some("gamma".into()),
                duid: vec![0, 1, 0, 1, 0x2c, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 3],
                iaid: 0x0102_0304,
            }],
        }
    }

    #[test]
    fn ipv6_leases_make_a_version_2_file_and_version_1_files_still_load() {
        let text = serialize_all(&sample6());
        assert!(text.starts_with("# vunet leases v2\n"), "{text}");
        assert!(text.contains("52:54:00:00:00:03 fd00:7675:1::100 1800000200 gamma 000100012c000001525400000003 16909060\n"), "{text}");
        assert_eq!(parse_all(&text).unwrap(), sample6());
        assert_eq!(parse(&text).unwrap(), sample());
        // Without IPv6 leases the file is what an older vunet wrote and reads.
        let v1 = serialize_all(&Leases { v4: sample(), v6: vec![] });
        assert_eq!(v1, serialize(&sample()));
        assert!(v1.starts_with("# vunet leases v1\n"));
        assert_eq!(parse_all(&v1).unwrap(), Leases { v4: sample(), v6: vec![] });
        // A version 1 file holds no IPv6 lines; a line's fields match its family.
        assert_eq!(parse_all(&text.replace(HEADER_V2, HEADER)).unwrap_err().line, 4);
        assert_eq!(parse_all(&text.replace("fd00:7675:1::100", "10.0.0.9")).unwrap_err().reason, "bad IP");
        assert_eq!(parse_all(&text.replace(" gamma ", " gamma 0001 ")).unwrap_err().line, 4);
        assert_eq!(parse_all(&text.replace("000100012c", "0x0100012c")).unwrap_err().reason, "bad DUID");
        assert_eq!(parse_all(&text.replace("16909060", "-1")).unwrap_err().reason, "bad IAID");
        for cut in 0..text.len() - 1 {
            assert!(parse_all(&text[..cut]).is_err(), "cut at {cut} must not parse");
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let text = serialize(&sample());
        // Everything short of the end line is refused (only its final newline may be missing).
        for cut in 0..text.len() - 1 {
            assert!(parse(&text[..cut]).is_err(), "cut at {cut} must not parse");
        }
        for (bad, line) in [
            (text.replace("52:54:00:00:00:01", "52:54:00:00:01"), 2),
            (text.replace("192.168.122.3", "192.168.122.300"), 3),
            (text.replace("1800000000", "18x"), 2),
            (text.replace("alpha", "al pha"), 2),
            (text.replace("# vunet leases v1", "# something else"), 1),
        ] {
            assert_eq!(parse(&bad).unwrap_err().line, line, "{bad}");
        }
    }
}
