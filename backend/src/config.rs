//! The TOML configuration (DESIGN.md "Minimum configuration contract") and its validation.
//! Every user mistake becomes one [`ConfigError`] naming the file and line.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use vunet_switch::{parse_mac, Mac};

/// A configuration mistake, printed as one line: `FILE:LINE: message`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    #[error("{file}:{line}: {msg}")]
    At { file: String, line: usize, msg: String },
    /// A message that already names its place (libvirt XML import).
    #[error("{0}")]
    Import(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Isolated,
    Nat,
    Route,
    Bridge,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Isolated => "isolated",
            Mode::Nat => "nat",
            Mode::Route => "route",
            Mode::Bridge => "bridge",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortMode {
    /// vunet listens on the socket, the VMM connects (QEMU's default `-chardev socket,path=`).
    Server,
    /// The VMM listens (`server=on`), vunet connects and keeps reconnecting.
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    pub name: String,
    /// The vhost-user socket (empty for a tap port).
    pub socket: PathBuf,
    /// A tap port: the host-side tap interface vunet creates instead of a guest socket.
    pub tap: Option<String>,
    pub mode: PortMode,
    pub mac: Option<Mac>,
    /// Port security (own MAC, own leased IP, no DHCP server); `None`: on where the network
    /// has a gateway.
    pub port_security: Option<bool>,
}

/// `[network.dns]`: the gateway's DNS service (on whenever the network has a gateway).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DnsConfig {
    pub domain: Option<String>,
    /// Extra local names (libvirt `<dns><host>`).
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Upstream resolvers; `None`: the host's /etc/resolv.conf.
    pub forwarders: Option<Vec<std::net::SocketAddr>>,
}

/// `[network.dhcp]`: the gateway's DHCP server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpConfig {
    pub range: (Ipv4Addr, Ipv4Addr),
    pub hosts: Vec<vunet_dhcp::StaticHost>,
    pub lease_secs: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkKind {
    AfPacket,
    Macvtap,
    Tap,
}

impl UplinkKind {
    pub fn name(self) -> &'static str {
        match self {
            UplinkKind::AfPacket => "af-packet",
            UplinkKind::Macvtap => "macvtap",
            UplinkKind::Tap => "tap",
        }
    }
}

/// `[network.uplink]`: the way out of the network to a host interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkConfig {
    pub kind: UplinkKind,
    /// af-packet: the interface to attach to; macvtap: its parent; tap: the tap to create.
    pub interface: String,
    /// macvtap: the name of the macvtap (default `vu` + the network name).
    pub name: Option<String>,
    /// macvtap: its MAC address.
    pub mac: Option<Mac>,
    /// The uplink carries the gateway's own traffic only (nat/route: a macvtap in bridge mode
    /// with its own MAC) rather than every guest's (bridge: passthru).
    pub own_mac: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub name: String,
    pub mode: Mode,
    /// Gateway address and prefix length.
    pub gateway: Option<(Ipv4Addr, u8)>,
    pub mtu: u16,
    pub dhcp: Option<DhcpConfig>,
    pub dns: DnsConfig,
    pub uplink: Option<UplinkConfig>,
    pub ports: Vec<PortConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    /// A group that may use the control socket too (mode 0660 instead of 0600).
    pub control_group: Option<String>,
    /// Where the port counters are served in Prometheus text format (`GET /metrics`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub networks: Vec<NetworkConfig>,
    /// Settings that parsed but that this version does not act on, one line each.
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    control_group: Option<String>,
    metrics_listen: Option<Spanned<String>>,
    #[serde(default)]
    network: Vec<Spanned<RawNetwork>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: Spanned<String>,
    mode: Spanned<String>,
    gateway: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    dhcp: Option<Spanned<RawDhcp>>,
    dns: Option<Spanned<RawDns>>,
    uplink: Option<Spanned<RawUplink>>,
    port_forward: Option<Spanned<toml::Value>>,
    #[serde(default)]
    port: Vec<Spanned<RawPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    range: Spanned<Vec<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<RawHost>>,
    lease_time: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    domain: Option<String>,
    #[serde(default)]
    hosts: Vec<Spanned<RawDnsHost>>,
    forwarders: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    kind: Spanned<String>,
    interface: Spanned<String>,
    name: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    router: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsHost {
    name: String,
    ip: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    mac: String,
    ip: String,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Spanned<String>,
    kind: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    socket: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    port_security: Option<bool>,
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, span: Range<usize>) -> usize {
        let at = span.start.min(self.text.len());
        self.text[..at].bytes().filter(|&b| b == b'\n').count() + 1
    }
    fn err(&self, span: Range<usize>, msg: impl Into<String>) -> ConfigError {
        ConfigError::At { file: self.file.to_string(), line: self.line_of(span), msg: msg.into() }
    }
}

fn in_subnet(ip: Ipv4Addr, (gw, prefix): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX << (32 - prefix as u32);
    let (a, g) = (u32::from(ip), u32::from(gw));
    a & mask == g & mask && a & !mask != 0 && a & !mask != !mask
}

fn valid_dns_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

fn parse_dns(cx: &Ctx, d: &Spanned<RawDns>) -> Result<DnsConfig, ConfigError> {
    let raw = d.get_ref();
    let domain = match &raw.domain {
        Some(dom) if !valid_dns_name(dom) => return Err(cx.err(d.span(), format!("invalid domain {dom:?}"))),
        dom => dom.as_ref().map(|s| s.to_ascii_lowercase()),
    };
    let mut hosts = Vec::new();
    for h in &raw.hosts {
        let v = h.get_ref();
        if !valid_dns_name(&v.name) || v.name.contains('.') {
            return Err(cx.err(h.span(), format!("invalid host name {:?} (one label: letters, digits and '-')", v.name)));
        }
        let ip: Ipv4Addr = v.ip.parse().map_err(|_| cx.err(h.span(), format!("invalid IP address {:?}", v.ip)))?;
        hosts.push((v.name.to_ascii_lowercase(), ip));
    }
    let forwarders = match &raw.forwarders {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|f| {
                    let s = f.get_ref();
                    s.parse::<std::net::SocketAddr>()
                        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
                        .map_err(|_| cx.err(f.span(), format!("invalid forwarder {s:?} (an IP address, optionally with :port)")))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(DnsConfig { domain, hosts, forwarders })
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or whitespace.
fn valid_ifname(n: &str) -> bool {
    !n.is_empty() && n.len() <= 15 && n != "." && n != ".." && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn parse_uplink(
    cx: &Ctx,
    u: &Spanned<RawUplink>,
    net: &str,
    mode: Mode,
    warnings: &mut Vec<String>,
) -> Result<Option<UplinkConfig>, ConfigError> {
    let raw = u.get_ref();
    let kind = match raw.kind.get_ref().as_str() {
        "af-packet" => UplinkKind::AfPacket,
        "macvtap" => UplinkKind::Macvtap,
        "tap" => UplinkKind::Tap,
        other => return Err(cx.err(raw.kind.span(), format!("unknown uplink kind {other:?} (expected af-packet, macvtap or tap)"))),
    };
    let interface = raw.interface.get_ref().clone();
    if !valid_ifname(&interface) {
        return Err(
            cx.err(raw.interface.span(), format!("invalid interface name {interface:?} (1 to 15 characters, no '/', ':' or spaces)"))
        );
    }
    let name = match &raw.name {
        Some(n) if kind != UplinkKind::Macvtap => return Err(cx.err(n.span(), "uplink name is only for kind = \"macvtap\"")),
        Some(n) if !valid_ifname(n.get_ref()) => return Err(cx.err(n.span(), format!("invalid interface name {:?}", n.get_ref()))),
        Some(n) => Some(n.get_ref().clone()),
        None => None,
    };
    let mac = match &raw.mac {
        Some(m) if kind != UplinkKind::Macvtap => return Err(cx.err(m.span(), "uplink mac is only for kind = \"macvtap\"")),
        Some(m) => match parse_mac(m.get_ref()) {
            Some(mac) if !vunet_switch::is_multicast(&mac) && mac != [0; 6] => Some(mac),
            _ => return Err(cx.err(m.span(), format!("invalid MAC address {:?}", m.get_ref()))),
        },
        None => None,
    };
    if mode == Mode::Isolated && kind != UplinkKind::Tap {
        return Err(cx.err(
            raw.kind.span(),
            format!("network {net:?}: an isolated network has no way out to a LAN (a tap uplink to the host only); use mode = \"bridge\""),
        ));
    }
    for (key, v) in [("address", &raw.address), ("router", &raw.router)] {
        if let Some(v) = v {
            warnings.push(format!(
                "{}:{}: network {net:?}: uplink {key} is not supported by this version of vunet yet and is ignored",
                cx.file,
                cx.line_of(v.span())
            ));
        }
    }
    if matches!(mode, Mode::Nat | Mode::Route) {
        warnings.push(format!(
            "{}:{}: network {net:?}: mode {} does not route to its uplink in this version of vunet; the uplink is not attached",
            cx.file,
            cx.line_of(u.span()),
            mode.name()
        ));
        return Ok(None);
    }
    Ok(Some(UplinkConfig { kind, interface, name, mac, own_mac: false }))
}

fn parse_dhcp(cx: &Ctx, d: &Spanned<RawDhcp>, net: &str, gateway: Option<(Ipv4Addr, u8)>) -> Result<DhcpConfig, ConfigError> {
    let raw = d.get_ref();
    let Some(gw) = gateway else {
        return Err(cx.err(d.span(), format!("network {net:?}: [network.dhcp] needs a gateway address to serve from")));
    };
    let subnet = format!("{}/{}", gw.0, gw.1);
    let r = raw.range.get_ref();
    let ip = |s: &str| s.parse::<Ipv4Addr>().ok();
    let (Some(lo), Some(hi)) = (r.first().and_then(|s| ip(s)), r.get(1).and_then(|s| ip(s))) else {
        return Err(cx.err(raw.range.span(), "range must be two IPv4 addresses, e.g. [\"192.168.122.2\", \"192.168.122.254\"]"));
    };
    if r.len() != 2 || lo > hi {
        return Err(cx.err(raw.range.span(), format!("invalid range {lo} - {hi}")));
    }
    if !in_subnet(lo, gw) || !in_subnet(hi, gw) {
        return Err(cx.err(raw.range.span(), format!("range {lo} - {hi} is outside the gateway's subnet {subnet}")));
    }
    let mut hosts: Vec<vunet_dhcp::StaticHost> = Vec::new();
    for h in &raw.hosts {
        let v = h.get_ref();
        let mac = parse_mac(&v.mac)
            .filter(|m| !vunet_switch::is_multicast(m) && *m != [0; 6])
            .ok_or_else(|| cx.err(h.span(), format!("invalid MAC address {:?}", v.mac)))?;
        let hip = ip(&v.ip).ok_or_else(|| cx.err(h.span(), format!("invalid IP address {:?}", v.ip)))?;
        if !in_subnet(hip, gw) || hip == gw.0 {
            return Err(cx.err(h.span(), format!("static host {hip} is not a host address of the gateway's subnet {subnet}")));
        }
        if hosts.iter().any(|o| o.mac == mac) {
            return Err(cx.err(h.span(), format!("static host MAC {} is listed twice", v.mac)));
        }
        if hosts.iter().any(|o| o.ip == hip) {
            return Err(cx.err(h.span(), format!("static hosts overlap: {hip} is given twice")));
        }
        let name = match &v.name {
            Some(n) if n.is_empty() || n.len() > 63 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                return Err(cx.err(h.span(), format!("invalid host name {n:?} (letters, digits and '-')")))
            }
            n => n.clone(),
        };
        hosts.push(vunet_dhcp::StaticHost { mac, ip: hip, name });
    }
    let lease_secs = match &raw.lease_time {
        Some(t) if !(60..=31_536_000).contains(t.get_ref()) => return Err(cx.err(t.span(), "lease_time must be 60 to 31536000 seconds")),
        Some(t) => *t.get_ref() as u32,
        None => 3600,
    };
    Ok(DhcpConfig { range: (lo, hi), hosts, lease_secs })
}

/// Parses "192.168.122.1/24".
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    (1..=30).contains(&prefix).then_some((addr, prefix))
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { file: file.clone(), msg: format!("cannot read: {}", io_reason(&e)) })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if text.trim_start().starts_with('<') {
            // A libvirt network definition, taken as `vunet import-libvirt` converts it.
            let imported = crate::libvirt::import(&text, &file).map_err(ConfigError::Import)?;
            // Line numbers of the generated TOML mean nothing in the XML: name the file only.
            let mut c = Self::parse(&imported.toml, &file, base).map_err(|e| match e {
                ConfigError::At { file, msg, .. } => ConfigError::File { file, msg },
                e => e,
            })?;
            let prefix = format!("{file}:");
            for w in c.warnings.iter_mut() {
                if let Some((_, msg)) = w.strip_prefix(&prefix).and_then(|r| r.split_once(": ")) {
                    *w = format!("{file}: {msg}");
                }
            }
            c.warnings.splice(0..0, imported.warnings);
            return Ok(c);
        }
        Self::parse(&text, &file, base)
    }

    /// Parses configuration text. Relative socket paths are taken relative to `base` (the
    /// directory of the configuration file).
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let cx = Ctx { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(span) => cx.err(span, msg),
                None => ConfigError::File { file: file.to_string(), msg },
            }
        })?;
        let metrics_listen = match &raw.metrics_listen {
            Some(m) => Some(m.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
                cx.err(m.span(), format!("invalid metrics_listen {:?} (expected ADDRESS:PORT, e.g. \"127.0.0.1:9477\")", m.get_ref()))
            })?),
            None => None,
        };
        let mut networks = Vec::new();
        let mut warnings = Vec::new();
        let mut net_names = HashSet::new();
        let mut sockets = HashSet::new();
        let mut taps = HashSet::new();
        if raw.network.is_empty() {
            return Err(ConfigError::File { file: file.to_string(), msg: "no [[network]] defined".into() });
        }
        for n in raw.network {
            let n_span = n.span();
            let n = n.into_inner();
            let name = n.name.get_ref().trim().to_string();
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(cx.err(
                    n.name.span(),
                    format!("invalid network name {:?} (letters, digits, '-', '_', '.', at most 64)", n.name.get_ref()),
                ));
            }
            if !net_names.insert(name.clone()) {
                return Err(cx.err(n.name.span(), format!("duplicate network name {name:?}")));
            }
            let mode = match n.mode.get_ref().as_str() {
                "isolated" => Mode::Isolated,
                "nat" => Mode::Nat,
                "route" => Mode::Route,
                "bridge" => Mode::Bridge,
                other => return Err(cx.err(n.mode.span(), format!("unknown mode {other:?} (expected isolated, nat, route or bridge)"))),
            };
            let gateway = match &n.gateway {
                Some(g) => Some(parse_cidr(g.get_ref()).ok_or_else(|| {
                    cx.err(
                        g.span(),
                        format!("invalid gateway {:?} (expected an IPv4 address with a prefix, e.g. 192.168.122.1/24)", g.get_ref()),
                    )
                })?),
                None if mode != Mode::Bridge => {
                    return Err(cx.err(
                        n_span.clone(),
                        format!("network {name:?}: mode {} needs a gateway (e.g. gateway = \"192.168.122.1/24\")", mode.name()),
                    ))
                }
                None => None,
            };
            let mtu = match &n.mtu {
                Some(m) => {
                    let v = *m.get_ref();
                    if !(68..=65535).contains(&v) {
                        return Err(cx.err(m.span(), format!("invalid mtu {v} (68 to 65535)")));
                    }
                    v as u16
                }
                None => 1500,
            };
            let dhcp = match &n.dhcp {
                Some(d) => Some(parse_dhcp(&cx, d, &name, gateway)?),
                None => None,
            };
            let dns = match &n.dns {
                Some(d) if gateway.is_none() => {
                    return Err(cx.err(d.span(), format!("network {name:?}: [network.dns] needs a gateway address to serve from")))
                }
                Some(d) => parse_dns(&cx, d)?,
                None => DnsConfig::default(),
            };
            if let Some(v) = &n.port_forward {
                warnings.push(format!(
                    "{}:{}: network {name:?}: [port_forward] is not supported by this version of vunet yet and is ignored",
                    file,
                    cx.line_of(v.span())
                ));
            }
            let uplink = match &n.uplink {
                Some(u) => parse_uplink(&cx, u, &name, mode, &mut warnings)?,
                None => None,
            };
            if let Some(u) = uplink.as_ref().filter(|u| u.kind == UplinkKind::Tap) {
                if !taps.insert(u.interface.clone()) {
                    return Err(cx.err(n.uplink.as_ref().map(|u| u.span()).unwrap_or(0..0), format!("tap {} is used twice", u.interface)));
                }
            }
            if gateway.is_some() || matches!(mode, Mode::Nat | Mode::Route) {
                warnings.push(format!(
                    "{}:{}: network {name:?}: the gateway answers ARP, ping and DNS{}{}",
                    file,
                    cx.line_of(n.mode.span()),
                    if dhcp.is_some() { " and serves DHCP" } else { "" },
                    if mode == Mode::Nat || mode == Mode::Route { "; routing and NAT are not implemented in this version" } else { "" }
                ));
            }
            let mut ports = Vec::new();
            let mut port_names = HashSet::new();
            for p in n.port {
                let p = p.into_inner();
                let pname = p.name.get_ref().trim().to_string();
                if pname.is_empty() || pname.len() > 64 || !pname.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(cx.err(p.name.span(), format!("invalid port name {:?}", p.name.get_ref())));
                }
                if !port_names.insert(pname.clone()) {
                    return Err(cx.err(p.name.span(), format!("duplicate port name {pname:?} in network {name:?}")));
                }
                let tap = match p.kind.as_ref().map(|k| k.get_ref().as_str()) {
                    None | Some("vhost-user") => None,
                    Some("tap") => {
                        let Some(i) = &p.interface else {
                            return Err(cx.err(p.name.span(), format!("port {pname:?}: a tap port needs interface = \"NAME\"")));
                        };
                        if !valid_ifname(i.get_ref()) {
                            return Err(cx.err(
                                i.span(),
                                format!("invalid interface name {:?} (1 to 15 characters, no '/', ':' or spaces)", i.get_ref()),
                            ));
                        }
                        if let Some(s) = &p.socket {
                            return Err(cx.err(s.span(), format!("port {pname:?}: a tap port has no socket")));
                        }
                        if !taps.insert(i.get_ref().clone()) {
                            return Err(cx.err(i.span(), format!("tap {} is used by two ports", i.get_ref())));
                        }
                        Some(i.get_ref().clone())
                    }
                    Some(other) => {
                        let span = p.kind.as_ref().map(|k| k.span()).unwrap_or(0..0);
                        return Err(cx.err(span, format!("unknown port kind {other:?} (expected vhost-user or tap)")));
                    }
                };
                if tap.is_none() {
                    if let Some(i) = &p.interface {
                        return Err(cx.err(i.span(), format!("port {pname:?}: interface is only for kind = \"tap\"")));
                    }
                }
                let socket = match (&p.socket, &tap) {
                    (_, Some(_)) => PathBuf::new(),
                    (None, None) => return Err(cx.err(p.name.span(), format!("port {pname:?} needs a socket path"))),
                    (Some(s), None) if s.get_ref().is_empty() => return Err(cx.err(s.span(), "empty socket path")),
                    (Some(s), None) => {
                        let socket = base.join(s.get_ref());
                        if !sockets.insert(socket.clone()) {
                            return Err(cx.err(s.span(), format!("socket {} is used by two ports", socket.display())));
                        }
                        socket
                    }
                };
                let mode = match p.mode.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("server") => PortMode::Server,
                    Some("client") => PortMode::Client,
                    Some(other) => {
                        return Err(cx.err(
                            p.mode.as_ref().map(|m| m.span()).unwrap_or(0..0),
                            format!("unknown port mode {other:?} (expected server or client)"),
                        ))
                    }
                };
                let mac = match &p.mac {
                    Some(m) => {
                        let mac =
                            parse_mac(m.get_ref()).ok_or_else(|| cx.err(m.span(), format!("invalid MAC address {:?}", m.get_ref())))?;
                        if vunet_switch::is_multicast(&mac) || mac == [0; 6] {
                            return Err(cx.err(m.span(), format!("MAC address {:?} is not a unicast address", m.get_ref())));
                        }
                        Some(mac)
                    }
                    None => None,
                };
                if tap.is_some() && (p.mode.is_some() || p.mac.is_some()) {
                    let span = p.mode.as_ref().or(p.mac.as_ref()).map(|m| m.span()).unwrap_or(0..0);
                    return Err(cx.err(span, format!("port {pname:?}: mode and mac are for vhost-user ports, not taps")));
                }
                ports.push(PortConfig { name: pname, socket, tap, mode, mac, port_security: p.port_security });
            }
            networks.push(NetworkConfig { name, mode, gateway, mtu, dhcp, dns, uplink, ports });
        }
        Ok(Config {
            state_dir: raw.state_dir.map(|p| base.join(p)),
            control_socket: raw.control_socket.map(|p| base.join(p)),
            control_group: raw.control_group,
            metrics_listen,
            networks,
            warnings,
        })
    }

    /// The embedded default: network `default`, isolated, gateway 192.168.122.1/24, and four
    /// server-mode guest sockets `vm1.sock` … `vm4.sock` in `runtime_dir`.
    pub fn default_in(runtime_dir: &Path) -> Config {
        let ports = (1..=4)
            .map(|i| PortConfig {
                name: format!("vm{i}"),
                tap: None,
                socket: runtime_dir.join(format!("vm{i}.sock")),
                mode: PortMode::Server,
                mac: None,
                port_security: None,
            })
            .collect();
        Config {
            state_dir: None,
            control_socket: None,
            control_group: None,
            metrics_listen: None,
            networks: vec![NetworkConfig {
                name: "default".into(),
                mode: Mode::Isolated,
                gateway: Some((Ipv4Addr::new(192, 168, 122, 1), 24)),
                mtu: 1500,
                dhcp: Some(DhcpConfig {
                    range: (Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 254)),
                    hosts: vec![],
                    lease_secs: 3600,
                }),
                dns: DnsConfig::default(),
                uplink: None,
                ports,
            }],
            warnings: vec![],
        }
    }
}

/// "No such file or directory" rather than "No such file or directory (os error 2)".
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, "vunet.toml", Path::new("/run/vunet"))
    }

    const GOOD: &str = r#"
state_dir = "/var/lib/vunet"
control_socket = "/run/vunet/control.sock"

[[network]]
name = "default"
mode = "isolated"
gateway = "192.168.122.1/24"

[[network.port]]
name = "vm1"
socket = "vm1.sock"

[[network.port]]
name = "vm2"
socket = "/tmp/vm2.sock"
mode = "client"
mac = "52:54:00:00:00:02"
"#;

    #[test]
    fn parses_the_contract_keys() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/var/lib/vunet")));
        let n = &c.networks[0];
        assert_eq!((n.name.as_str(), n.mode, n.mtu), ("default", Mode::Isolated, 1500));
        assert_eq!(n.gateway, Some((Ipv4Addr::new(192, 168, 122, 1), 24)));
        assert_eq!(n.ports[0].socket, PathBuf::from("/run/vunet/vm1.sock"));
        assert_eq!(n.ports[0].mode, PortMode::Server);
        assert_eq!(n.ports[1].mode, PortMode::Client);
        assert_eq!(n.ports[1].mac, Some([0x52, 0x54, 0, 0, 0, 2]));
    }

    #[test]
    fn full_contract_document_parses_with_warnings_for_later_features() {
        let t = r#"
state_dir = "/var/lib/vunet"
control_socket = "/run/vunet/control.sock"
[[network]]
name = "default"
mode = "nat"
gateway = "192.168.122.1/24"
[network.dhcp]
range = ["192.168.122.2", "192.168.122.254"]
hosts = [{ mac = "52:54:00:00:00:10", ip = "192.168.122.10", name = "web" }]
[network.uplink]
kind = "macvtap"
interface = "eth1"
address = "dhcp"
[[network.port_forward]]
proto = "tcp"
port = 2222
to = "192.168.122.10:22"
[[network.port]]
name = "vm1"
socket = "/run/vunet/vm1.sock"
mode = "server"
"#;
        let c = parse(t).unwrap();
        assert_eq!(c.networks[0].mode, Mode::Nat);
        assert!(
            c.warnings.iter().any(|w| w.contains("does not route to its uplink") && w.starts_with("vunet.toml:11:")),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings.iter().any(|w| w.contains("uplink address is not supported") && w.starts_with("vunet.toml:14:")),
            "{:?}",
            c.warnings
        );
        assert_eq!(c.networks[0].uplink, None, "not attached in nat mode yet");
        assert!(c.warnings.iter().any(|w| w.contains("routing and NAT are not implemented")), "{:?}", c.warnings);
    }

    #[test]
    fn uplinks_parse_and_their_mistakes_name_the_line() {
        let net = |mode: &str, uplink: &str| {
            format!("[[network]]\nname = \"a\"\nmode = \"{mode}\"\ngateway = \"10.0.0.1/24\"\n[network.uplink]\n{uplink}\n")
        };
        let c = parse(&net("bridge", "kind = \"macvtap\"\ninterface = \"eth1\"\nname = \"mv-a\"\nmac = \"52:54:00:aa:bb:cc\"")).unwrap();
        let u = c.networks[0].uplink.clone().unwrap();
        assert_eq!(
            (u.kind, u.interface.as_str(), u.name.as_deref(), u.mac),
            (UplinkKind::Macvtap, "eth1", Some("mv-a"), Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]))
        );
        let c = parse(&net("isolated", "kind = \"tap\"\ninterface = \"vutap0\"")).unwrap();
        assert_eq!(c.networks[0].uplink.as_ref().map(|u| u.kind), Some(UplinkKind::Tap), "a host-only tap on an isolated network");
        let cases = [
            (net("bridge", "kind = \"vde\"\ninterface = \"eth1\""), "vunet.toml:6: unknown uplink kind \"vde\""),
            (net("bridge", "kind = \"tap\"\ninterface = \"a/b\""), "vunet.toml:7: invalid interface name \"a/b\""),
            (net("bridge", "kind = \"tap\"\ninterface = \"averyveryverylongname\""), "vunet.toml:7: invalid interface name"),
            (
                net("isolated", "kind = \"af-packet\"\ninterface = \"eth1\""),
                "vunet.toml:6: network \"a\": an isolated network has no way out",
            ),
            (
                net("bridge", "kind = \"af-packet\"\ninterface = \"eth1\"\nmac = \"52:54:00:00:00:01\""),
                "vunet.toml:8: uplink mac is only for kind = \"macvtap\"",
            ),
            (net("bridge", "kind = \"tap\"\ninterface = \"eth1\"\ncolour = 1"), "vunet.toml:8: unknown field `colour`"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn tap_ports_parse_and_their_mistakes_name_the_line() {
        let net = |port: &str| format!("[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"h\"\n{port}\n");
        let c = parse(&net("kind = \"tap\"\ninterface = \"vutap0\"")).unwrap();
        let p = &c.networks[0].ports[0];
        assert_eq!((p.tap.as_deref(), p.socket.as_os_str().is_empty()), (Some("vutap0"), true));
        let cases = [
            (net("kind = \"tap\""), "vunet.toml:5: port \"h\": a tap port needs interface"),
            (net("kind = \"tap\"\ninterface = \"t0\"\nsocket = \"x.sock\""), "vunet.toml:8: port \"h\": a tap port has no socket"),
            (
                net("kind = \"tap\"\ninterface = \"t0\"\nmode = \"client\""),
                "vunet.toml:8: port \"h\": mode and mac are for vhost-user ports",
            ),
            (net("kind = \"vde\"\nsocket = \"x\""), "vunet.toml:6: unknown port kind \"vde\""),
            (net("interface = \"t0\"\nsocket = \"x\""), "vunet.toml:6: port \"h\": interface is only for kind = \"tap\""),
            (net("mode = \"server\""), "vunet.toml:5: port \"h\" needs a socket path"),
            (
                format!(
                    "{}[[network.port]]\nname = \"i\"\nkind = \"tap\"\ninterface = \"t0\"\n",
                    net("kind = \"tap\"\ninterface = \"t0\"")
                ),
                "vunet.toml:11: tap t0 is used by two ports",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn mistakes_name_the_line() {
        let cases: &[(&str, &str)] = &[
            ("[[network]]\nname = \"a\"\nmode = \"nta\"\ngateway = \"10.0.0.1/24\"\n", "vunet.toml:3: unknown mode \"nta\" (expected isolated, nat, route or bridge)"),
            ("[[network]]\nname = \"a\"\nmode = \"isolated\"\n", "vunet.toml:1: network \"a\": mode isolated needs a gateway"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\ngateway = \"10.0.0.1\"\n", "vunet.toml:4: invalid gateway"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\nmtu = 10\n", "vunet.toml:4: invalid mtu 10"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\ncolour = 1\n", "vunet.toml:4: unknown field `colour`"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"p\"\nsocket = \"x\"\nmode = \"both\"\n", "vunet.toml:7: unknown port mode \"both\""),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"p\"\nsocket = \"x\"\nmac = \"01:00:00:00:00:01\"\n", "vunet.toml:7: MAC address"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"p\"\nsocket = \"x\"\n[[network.port]]\nname = \"p\"\nsocket = \"y\"\n", "vunet.toml:8: duplicate port name \"p\""),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"p\"\nsocket = \"x\"\n[[network.port]]\nname = \"q\"\nsocket = \"x\"\n", "vunet.toml:9: socket /run/vunet/x is used by two ports"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network]]\nname = \"a\"\nmode = \"bridge\"\n", "vunet.toml:5: duplicate network name \"a\""),
            ("[[network]\n", "vunet.toml:1:"),
            ("", "vunet.toml: no [[network]] defined"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}\n got: {e}\nwant: {want}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn dhcp_section() {
        let base = "[[network]]\nname = \"a\"\nmode = \"isolated\"\ngateway = \"192.168.122.1/24\"\n[network.dhcp]\n";
        let ok = format!("{base}range = [\"192.168.122.2\", \"192.168.122.254\"]\nlease_time = 600\nhosts = [{{ mac = \"52:54:00:00:00:10\", ip = \"192.168.122.10\", name = \"web\" }}]\n");
        let d = parse(&ok).unwrap().networks[0].dhcp.clone().unwrap();
        assert_eq!(d.range, (Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 254)));
        assert_eq!(d.lease_secs, 600);
        assert_eq!(d.hosts[0].name.as_deref(), Some("web"));
        let cases: &[(&str, &str)] = &[
            ("range = [\"10.0.0.2\", \"10.0.0.9\"]\n", "vunet.toml:6: range 10.0.0.2 - 10.0.0.9 is outside the gateway's subnet 192.168.122.1/24"),
            ("range = [\"192.168.122.9\", \"192.168.122.2\"]\n", "vunet.toml:6: invalid range"),
            ("range = [\"192.168.122.2\"]\n", "vunet.toml:6: range must be two IPv4 addresses"),
            ("range = [\"192.168.122.2\", \"192.168.122.9\"]\nhosts = [{ mac = \"52:54:00:00:00:10\", ip = \"192.168.122.10\" }, { mac = \"52:54:00:00:00:11\", ip = \"192.168.122.10\" }]\n", "vunet.toml:7: static hosts overlap: 192.168.122.10 is given twice"),
            ("range = [\"192.168.122.2\", \"192.168.122.9\"]\nhosts = [{ mac = \"52:54:00:00:00:10\", ip = \"10.1.1.10\" }]\n", "vunet.toml:7: static host 10.1.1.10 is not a host address of the gateway's subnet"),
            ("range = [\"192.168.122.2\", \"192.168.122.9\"]\nlease_time = 5\n", "vunet.toml:7: lease_time must be 60 to 31536000 seconds"),
        ];
        for (tail, want) in cases {
            let e = parse(&format!("{base}{tail}")).unwrap_err().to_string();
            assert!(e.starts_with(want), "got: {e}\nwant: {want}");
        }
        let no_gw = "[[network]]\nname = \"b\"\nmode = \"bridge\"\n[network.dhcp]\nrange = [\"10.0.0.2\", \"10.0.0.9\"]\n";
        assert!(parse(no_gw).unwrap_err().to_string().contains("[network.dhcp] needs a gateway"));
    }

    #[test]
    fn unreadable_file_is_one_line() {
        let e = Config::load(Path::new("/nonexistent/vunet.toml")).unwrap_err().to_string();
        assert_eq!(e, "/nonexistent/vunet.toml: cannot read: No such file or directory");
    }
}
