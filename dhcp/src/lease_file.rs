//! The lease file: one lease a line, `MAC IP EXPIRY NAME` (`-` for no name), after a header
//! line naming the format. Text, so an administrator can read it; strict, so a truncated or
//! corrupt file is recognised as such and set aside rather than half-trusted.

use std::net::Ipv4Addr;

use crate::server::Lease;

pub const HEADER: &str = "# vunet leases v1";

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

/// The file's text for `leases`. It ends with an `# end` line, so a file cut short by a crash
/// (even at a line boundary) is detected.
pub fn serialize(leases: &[Lease]) -> String {
    let mut s = format!("{HEADER}\n");
    for l in leases {
        s.push_str(&format!("{} {} {} {}\n", fmt_mac(&l.mac), l.ip, l.expires, l.hostname.as_deref().unwrap_or("-")));
    }
    s.push_str("# end\n");
    s
}

/// Parses a lease file; any deviation is an error naming the line.
pub fn parse(text: &str) -> Result<Vec<Lease>, LeaseFileError> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, HEADER)) => {}
        _ => return Err(LeaseFileError { line: 1, reason: "missing header" }),
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        if line == "# end" {
            return Ok(out);
        }
        let err = |reason| LeaseFileError { line: i + 1, reason };
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 4 {
            return Err(err("expected: MAC IP EXPIRY NAME"));
        }
        let mac = parse_mac(f[0]).ok_or(err("bad MAC"))?;
        let ip: Ipv4Addr = f[1].parse().map_err(|_| err("bad IP"))?;
        let expires: u64 = f[2].parse().map_err(|_| err("bad expiry"))?;
        let hostname = match f[3] {
            "-" => None,
            n if !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => Some(n.to_string()),
            _ => return Err(err("bad name")),
        };
        out.push(Lease { mac, ip, expires, hostname });
    }
    Err(LeaseFileError { line: text.lines().count() + 1, reason: "truncated (no end line)" })
}

#[cfg(test)]
mod tests {
    use super::*;

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
