//! The TOML configuration (DESIGN.md "Minimum configuration contract") and its validation.
//! Every user mistake becomes one [`ConfigError`] naming the file and line.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use vunet_switch::vlan::{PortVlan, Vid, VlanSet, MAX_VID};
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
    /// virtio-net queue pairs offered to the guest (1 to 8; QEMU: `-netdev
    /// vhost-user,...,queues=N` and `-device virtio-net-pci,mq=on`).
    pub queues: u16,
    /// A server-mode socket's file mode (`socket_mode`, the port's or else its network's);
    /// `None`: 0660 with a group, else 0600.
    pub socket_mode: Option<u32>,
    /// The group a server-mode socket is given (`socket_group`, resolved to a gid), so that a
    /// VMM running as another user (libvirt's `libvirt-qemu`) can connect.
    pub socket_group: Option<u32>,
    /// The port's VLAN mode (`vlan = N`: access; `trunk = [..]` with optional `native_vlan`
    /// and `native_tagged`); untagged (the network's own VLAN) without them.
    pub vlan: PortVlan,
    /// libvirt's `<port isolated='yes'/>`: the port reaches the gateway, the uplink and
    /// non-isolated ports, never another isolated one.
    pub isolated: bool,
    /// `[network.port.bandwidth]`: rate limits each way, libvirt's units.
    pub bandwidth: Bandwidth,
}

/// libvirt's `<bandwidth>` for one port: `inbound` is toward the guest, `outbound` from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bandwidth {
    pub inbound: Option<RateLimit>,
    pub outbound: Option<RateLimit>,
}

/// One direction's limit, in libvirt's units: `average` and `peak` in kilobytes (1000 bytes)
/// per second, `burst` in KiB. 12500 is 100 Mbit/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub average: u64,
    pub peak: Option<u64>,
    pub burst: Option<u64>,
}

impl PortConfig {
    /// The mode a server-mode socket is bound with.
    pub fn effective_socket_mode(&self) -> u32 {
        self.socket_mode.unwrap_or(if self.socket_group.is_some() { 0o660 } else { 0o600 })
    }
}

/// `[network.dns]`: the gateway's DNS service (on whenever the network has a gateway).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DnsConfig {
    pub domain: Option<String>,
    /// Extra local names (libvirt `<dns><host>`).
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Extra local names with an IPv6 address (`dns.hosts` entries whose `ip` is IPv6).
    pub hosts6: Vec<(String, Ipv6Addr)>,
    /// Upstream resolvers; `None`: the host's /etc/resolv.conf.
    pub forwarders: Option<Vec<std::net::SocketAddr>>,
}

/// `[network.dhcp6]`: stateful DHCPv6 from the gateway (router advertisements then carry M).
/// Without it, guests configure themselves from the advertised prefix (SLAAC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dhcp6Config {
    /// Addresses handed out dynamically; None: only the static hosts get addresses.
    pub range: Option<(Ipv6Addr, Ipv6Addr)>,
    pub hosts: Vec<Dhcp6Host>,
    pub lease_secs: u32,
}

/// A DHCPv6 reservation. Matched by the client's MAC (from its DUID-LL/LLT, or the frame's
/// source), since that is what a VM's configuration knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dhcp6Host {
    pub mac: Mac,
    pub ip: Ipv6Addr,
    pub name: Option<String>,
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
    /// A VXLAN tunnel over a UDP socket (docs/vxlan.md).
    Vxlan,
}

impl UplinkKind {
    pub fn name(self) -> &'static str {
        match self {
            UplinkKind::AfPacket => "af-packet",
            UplinkKind::Macvtap => "macvtap",
            UplinkKind::Tap => "tap",
            UplinkKind::Vxlan => "vxlan",
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
    /// The VLANs the uplink carries: `trunk = [..]` (tagged), or `vlan = N` (the network is
    /// VLAN N of the LAN: [`PortVlan::Outer`]); untagged without them.
    pub vlan: PortVlan,
    /// kind = "vxlan": the tunnel (`interface` is then only its name, `vxlan<VNI>`).
    pub vxlan: Option<VxlanConfig>,
}

/// `kind = "vxlan"`: one VNI over UDP between `local` and the `remotes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// The address datagrams are sent from and received on.
    pub local: Ipv4Addr,
    /// The UDP port, ours and the remotes' (default 4789).
    pub port: u16,
    /// Where broadcast, multicast and unknown unicast go (head-end replication).
    pub remotes: Vec<Ipv4Addr>,
    /// A multicast group they go to as well (or instead), joined on `local`'s interface.
    pub group: Option<Ipv4Addr>,
}

/// Where a routed network's uplink address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkAddress {
    /// `address = "10.10.11.50/24"`, with `router = "10.10.11.1"` as the default next hop.
    Static { addr: (Ipv4Addr, u8), router: Option<Ipv4Addr> },
    /// `address = "dhcp"`: leased from the LAN's DHCP server over the uplink.
    Dhcp,
}

/// How a `nat` or `route` network routes to its uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub address: UplinkAddress,
    /// The router's MAC on the uplink's LAN.
    pub mac: Mac,
    pub proxy_arp: bool,
    /// Networks behind guests (`[[network.route]]`).
    pub routes: Vec<vunet_switch::router::StaticRoute>,
    /// Masquerade settings and `[[network.port_forward]]` (nat mode).
    pub nat: vunet_switch::nat::NatConfig,
    /// `[[network.firewall]]` and `firewall_default` (route mode).
    pub firewall: Vec<vunet_switch::firewall::Rule>,
    pub firewall_default: vunet_switch::firewall::Action,
    /// IPv6 routing (`address6`); None: the network routes no IPv6.
    pub v6: Option<Routing6Config>,
}

/// IPv6 on a routed network's uplink: routed (never translated) in nat and route modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing6Config {
    /// `address6`: the router's address and on-link prefix on the uplink's LAN.
    pub address: (Ipv6Addr, u8),
    /// `router6`: the default next hop (on that prefix, or link-local).
    pub router: Option<Ipv6Addr>,
    /// `proxy_ndp` (route mode): answer neighbour solicitations for the guest prefix.
    pub proxy_ndp: bool,
}

/// Socket NAT's defaults (`[network.nat]` of a nat network without an uplink).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_TCP_IDLE_SECS: u64 = 7200;
pub const DEFAULT_UDP_IDLE_SECS: u64 = 180;

/// A `nat` network without `[network.uplink]`: the guests go out through the host's own
/// sockets (no root, no uplink address), like passt or slirp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketNatConfig {
    /// Connections to the gateway address reach the host's 127.0.0.1 (`host_loopback`); off,
    /// the host's own services are out of the guests' reach.
    pub host_loopback: bool,
    /// Most TCP flows of the network; UDP and ICMP flows get the same bound each.
    pub max_connections: usize,
    /// Most flows of one guest address (of each kind), so one guest cannot take them all.
    pub max_per_guest: usize,
    /// Idle time-outs (`tcp_timeout`, `udp_timeout`), seconds.
    pub tcp_idle_secs: u64,
    pub udp_idle_secs: u64,
    /// `[[network.port_forward]]`: host sockets listening for the guests.
    pub forwards: Vec<SocketForward>,
}

impl Default for SocketNatConfig {
    fn default() -> Self {
        SocketNatConfig {
            host_loopback: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_guest: DEFAULT_MAX_CONNECTIONS / 4,
            tcp_idle_secs: DEFAULT_TCP_IDLE_SECS,
            udp_idle_secs: DEFAULT_UDP_IDLE_SECS,
            forwards: Vec::new(),
        }
    }
}

/// A socket NAT port forward: host port(s) `external` on `listen` → the guest's `guest_port`
/// onward (a range maps port by port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketForward {
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// The host address listened on; `None`: all host addresses.
    pub listen: Option<IpAddr>,
    pub external: (u16, u16),
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub name: String,
    pub mode: Mode,
    /// Gateway address and prefix length.
    pub gateway: Option<(Ipv4Addr, u8)>,
    /// `gateway6`: the gateway's IPv6 address and the on-link prefix it advertises.
    pub gateway6: Option<(Ipv6Addr, u8)>,
    pub mtu: u16,
    /// How long a worker polls its ring for more frames before it sleeps (µs). Like
    /// SO_BUSY_POLL or vhost-net's busyloop timeout: lower latency and fewer kicks under load,
    /// for CPU time. 0: after a wake-up that moved frames it looks for 20 µs more, yielding
    /// its core meanwhile, then sleeps until the guest's kick.
    pub busy_poll_us: u32,
    /// Most threads of the network that move frames out of guests' TX rings at once; a kick
    /// that finds them all busy leaves its ring to one of them, which serves every ring it
    /// holds a burst at a time. Also the most threads one port's queue pairs are kicked on.
    /// Default: the cores vunet may run on.
    pub workers: u16,
    pub dhcp: Option<DhcpConfig>,
    pub dhcp6: Option<Dhcp6Config>,
    pub dns: DnsConfig,
    pub uplink: Option<UplinkConfig>,
    /// Set for `nat` and `route` networks with an uplink.
    pub routing: Option<RoutingConfig>,
    /// Set exactly for `nat` networks without an uplink (socket NAT).
    pub socket_nat: Option<SocketNatConfig>,
    /// The network's `socket_mode`/`socket_group`: what its server-mode guest ports (those
    /// added at run time too) get unless a port sets its own.
    pub socket_mode: Option<u32>,
    pub socket_group: Option<u32>,
    pub ports: Vec<PortConfig>,
}

impl NetworkConfig {
    /// Whether the gateway's router advertisements name it a default router: guests have a
    /// way out for IPv6. Not on an isolated network, nor on a nat or route network whose
    /// uplink routes no IPv6 (no `address6`); socket NAT (nat without an uplink) and bridge
    /// networks keep advertising one.
    pub fn ipv6_default_route(&self) -> bool {
        match self.mode {
            Mode::Isolated => false,
            Mode::Nat if self.routing.is_none() => true,
            Mode::Nat | Mode::Route => self.routing.as_ref().is_some_and(|r| r.v6.is_some()),
            Mode::Bridge => true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    /// A group that may use the control socket too (mode 0660 instead of 0600).
    pub control_group: Option<String>,
    /// The directory `port-add` (the control socket) may create or connect to sockets in
    /// (default: the control socket's directory). Sockets in this file are not confined.
    pub socket_dir: Option<PathBuf>,
    /// Where the port counters are served in Prometheus text format (`GET /metrics`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub networks: Vec<NetworkConfig>,
    /// Settings that parsed but that this version does not act on, one line each.
    pub warnings: Vec<String>,
    /// Choices made for the user that `run` tells about (the embedded default's subnet when
    /// 192.168.122.0/24 is taken), one line each.
    pub notes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    control_group: Option<String>,
    socket_dir: Option<PathBuf>,
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
    gateway6: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    busy_poll_us: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
    dhcp: Option<Spanned<RawDhcp>>,
    dhcp6: Option<Spanned<RawDhcp6>>,
    dns: Option<Spanned<RawDns>>,
    uplink: Option<Spanned<RawUplink>>,
    nat: Option<Spanned<RawNat>>,
    #[serde(default)]
    port_forward: Vec<Spanned<RawForward>>,
    #[serde(default)]
    firewall: Vec<Spanned<RawRule>>,
    firewall_default: Option<Spanned<String>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    socket_mode: Option<Spanned<toml::Value>>,
    socket_group: Option<Spanned<toml::Value>>,
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
struct RawDhcp6 {
    range: Option<Spanned<Vec<String>>>,
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
    interface: Option<Spanned<String>>,
    vni: Option<Spanned<i64>>,
    local: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    remotes: Option<Spanned<Vec<Spanned<String>>>>,
    group: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    router: Option<Spanned<String>>,
    proxy_arp: Option<bool>,
    address6: Option<Spanned<String>>,
    router6: Option<Spanned<String>>,
    proxy_ndp: Option<Spanned<bool>>,
    vlan: Option<Spanned<i64>>,
    trunk: Option<Spanned<Vec<Spanned<i64>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    host_loopback: Option<Spanned<bool>>,
    max_connections: Option<Spanned<i64>>,
    max_per_guest: Option<Spanned<i64>>,
    ports: Option<Spanned<Vec<i64>>>,
    max_entries: Option<Spanned<i64>>,
    tcp_timeout: Option<Spanned<i64>>,
    udp_timeout: Option<Spanned<i64>>,
    icmp_timeout: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    proto: Spanned<String>,
    port: Spanned<toml::Value>,
    to: Spanned<String>,
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Spanned<String>,
    proto: Option<Spanned<String>>,
    port: Option<Spanned<toml::Value>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    address: Spanned<String>,
    via: Spanned<String>,
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
    queues: Option<Spanned<i64>>,
    socket_mode: Option<Spanned<toml::Value>>,
    socket_group: Option<Spanned<toml::Value>>,
    vlan: Option<Spanned<i64>>,
    trunk: Option<Spanned<Vec<Spanned<i64>>>>,
    native_vlan: Option<Spanned<i64>>,
    native_tagged: Option<Spanned<bool>>,
    isolated: Option<bool>,
    bandwidth: Option<Spanned<RawBandwidth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBandwidth {
    inbound: Option<Spanned<RawRate>>,
    outbound: Option<Spanned<RawRate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    average: i64,
    peak: Option<i64>,
    burst: Option<i64>,
}

/// `[network.port.bandwidth]`: each limit's `average` 1 to 100,000,000 kB/s (800 Gbit/s),
/// `peak` at least `average` (inbound only, as in libvirt), `burst` 1 to 4,194,304 KiB.
fn parse_bandwidth(cx: &Ctx, b: &Spanned<RawBandwidth>, port: &str) -> Result<Bandwidth, ConfigError> {
    let rate = |r: &Spanned<RawRate>, dir: &str| -> Result<RateLimit, ConfigError> {
        let v = r.get_ref();
        let bad = |what: String| cx.err(r.span(), format!("port {port:?}: bandwidth {dir}: {what}"));
        if !(1..=100_000_000).contains(&v.average) {
            return Err(bad(format!("average {} must be 1 to 100000000 (kilobytes per second)", v.average)));
        }
        if let Some(p) = v.peak {
            if dir == "outbound" {
                return Err(bad("peak is for inbound only (libvirt ignores it on outbound)".into()));
            }
            if p < v.average || p > 100_000_000 {
                return Err(bad(format!("peak {p} must be at least average and at most 100000000")));
            }
        }
        if let Some(b) = v.burst {
            if !(1..=4_194_304).contains(&b) {
                return Err(bad(format!("burst {b} must be 1 to 4194304 (KiB)")));
            }
        }
        Ok(RateLimit { average: v.average as u64, peak: v.peak.map(|p| p as u64), burst: v.burst.map(|b| b as u64) })
    };
    let raw = b.get_ref();
    Ok(Bandwidth {
        inbound: raw.inbound.as_ref().map(|r| rate(r, "inbound")).transpose()?,
        outbound: raw.outbound.as_ref().map(|r| rate(r, "outbound")).transpose()?,
    })
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

/// `socket_mode`: an octal string ("0660") or a TOML octal integer (0o660), permission bits
/// only (no setuid, setgid or sticky bit).
fn parse_socket_mode(cx: &Ctx, v: &Spanned<toml::Value>) -> Result<u32, ConfigError> {
    let mode = match v.get_ref() {
        toml::Value::String(s) => {
            let digits = s.strip_prefix("0o").unwrap_or(s);
            (!digits.is_empty() && digits.len() <= 4).then(|| u32::from_str_radix(digits, 8).ok()).flatten()
        }
        toml::Value::Integer(i) => u32::try_from(*i).ok(),
        _ => None,
    };
    mode.filter(|m| *m <= 0o777)
        .ok_or_else(|| cx.err(v.span(), format!("invalid socket_mode {} (an octal mode such as \"0660\", at most 0777)", v.get_ref())))
}

/// `socket_group`: a group name of this host, or a numeric gid.
fn parse_socket_group(cx: &Ctx, v: &Spanned<toml::Value>) -> Result<u32, ConfigError> {
    match v.get_ref() {
        toml::Value::String(name) => group_id(name)
            .or_else(|| name.parse::<u32>().ok().filter(|g| *g != u32::MAX))
            .ok_or_else(|| cx.err(v.span(), format!("unknown socket_group {name:?} (no such group on this host)"))),
        toml::Value::Integer(g) => u32::try_from(*g)
            .ok()
            .filter(|g| *g != u32::MAX)
            .ok_or_else(|| cx.err(v.span(), format!("invalid socket_group {g} (a group name or a gid)"))),
        other => Err(cx.err(v.span(), format!("invalid socket_group {other} (a group name or a gid)"))),
    }
}

/// The gid of the group `name` on this host (getgrnam_r: a reload may parse while other
/// threads run).
pub fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: all-zero bytes are a valid `struct group` (null pointers, zero gid).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer points at memory owned here, `buf` for `buf.len()` bytes.
        let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !result.is_null()).then_some(grp.gr_gid);
    }
}

/// A VLAN ID of the configuration: 1 to 4094.
fn parse_vid(cx: &Ctx, key: &str, v: &Spanned<i64>) -> Result<Vid, ConfigError> {
    match *v.get_ref() {
        n @ 1..=4094 => Ok(n as Vid),
        n => Err(cx.err(v.span(), format!("invalid {key} {n} (a VLAN ID, 1 to {MAX_VID})"))),
    }
}

/// A port's (or uplink's) VLAN keys: `vlan = N` (access, or on an uplink the network's VLAN of
/// the LAN), or `trunk = [..]` (a list: an empty one is refused rather than meaning "all",
/// so a typo cannot open every VLAN) with an optional `native_vlan` and `native_tagged`.
fn parse_port_vlan(
    cx: &Ctx,
    what: &str,
    vlan: Option<&Spanned<i64>>,
    trunk: Option<&Spanned<Vec<Spanned<i64>>>>,
    native: Option<&Spanned<i64>>,
    native_tagged: Option<&Spanned<bool>>,
    uplink: bool,
) -> Result<PortVlan, ConfigError> {
    if let (Some(_), Some(t)) = (vlan, trunk) {
        return Err(cx.err(t.span(), format!("{what}: vlan and trunk exclude each other (an access port has one VLAN, a trunk a list)")));
    }
    if trunk.is_none() {
        if let Some(n) = native {
            return Err(cx.err(n.span(), format!("{what}: native_vlan is for trunk ports")));
        }
    }
    if native.is_none() {
        if let Some(t) = native_tagged {
            return Err(cx.err(t.span(), format!("{what}: native_tagged needs a native_vlan")));
        }
    }
    if let Some(v) = vlan {
        let vid = parse_vid(cx, "vlan", v)?;
        return Ok(if uplink { PortVlan::Outer(vid) } else { PortVlan::Access(vid) });
    }
    let Some(t) = trunk else { return Ok(PortVlan::Untagged) };
    if t.get_ref().is_empty() {
        return Err(cx.err(t.span(), format!("{what}: trunk = [] carries no VLAN; list the VLAN IDs it carries (1 to {MAX_VID})")));
    }
    let vids = t.get_ref().iter().map(|v| parse_vid(cx, "trunk VLAN", v)).collect::<Result<VlanSet, _>>()?;
    let native = native.map(|n| parse_vid(cx, "native_vlan", n)).transpose()?;
    Ok(PortVlan::Trunk { vids, native, native_tagged: native_tagged.is_some_and(|t| *t.get_ref()) })
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
    let (mut hosts, mut hosts6) = (Vec::new(), Vec::new());
    for h in &raw.hosts {
        let v = h.get_ref();
        if !valid_dns_name(&v.name) || v.name.contains('.') {
            return Err(cx.err(h.span(), format!("invalid host name {:?} (one label: letters, digits and '-')", v.name)));
        }
        match v.ip.parse().map_err(|_| cx.err(h.span(), format!("invalid IP address {:?}", v.ip)))? {
            std::net::IpAddr::V4(ip) => hosts.push((v.name.to_ascii_lowercase(), ip)),
            std::net::IpAddr::V6(ip) => hosts6.push((v.name.to_ascii_lowercase(), ip)),
        }
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
    Ok(DnsConfig { domain, hosts, hosts6, forwarders })
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or whitespace.
fn valid_ifname(n: &str) -> bool {
    !n.is_empty() && n.len() <= 15 && n != "." && n != ".." && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn parse_uplink(cx: &Ctx, u: &Spanned<RawUplink>, net: &str, mode: Mode) -> Result<Option<UplinkConfig>, ConfigError> {
    let raw = u.get_ref();
    let kind = match raw.kind.get_ref().as_str() {
        "af-packet" => UplinkKind::AfPacket,
        "macvtap" => UplinkKind::Macvtap,
        "tap" => UplinkKind::Tap,
        "vxlan" => UplinkKind::Vxlan,
        other => return Err(cx.err(raw.kind.span(), format!("unknown uplink kind {other:?} (expected af-packet, macvtap, tap or vxlan)"))),
    };
    let vxlan = parse_vxlan(cx, u, net, kind)?;
    let interface = match (&raw.interface, &vxlan) {
        (Some(i), Some(_)) => return Err(cx.err(i.span(), "a vxlan uplink has no interface (it is a UDP socket on `local`)")),
        (None, Some(v)) => format!("vxlan{}", v.vni),
        (None, None) => return Err(cx.err(u.span(), format!("network {net:?}: uplink kind {:?} needs an interface", kind.name()))),
        (Some(i), None) => {
            let interface = i.get_ref().clone();
            if !valid_ifname(&interface) {
                return Err(cx.err(i.span(), format!("invalid interface name {interface:?} (1 to 15 characters, no '/', ':' or spaces)")));
            }
            interface
        }
    };
    let name = match &raw.name {
        Some(n) if kind != UplinkKind::Macvtap => return Err(cx.err(n.span(), "uplink name is only for kind = \"macvtap\"")),
        Some(n) if !valid_ifname(n.get_ref()) => return Err(cx.err(n.span(), format!("invalid interface name {:?}", n.get_ref()))),
        Some(n) => Some(n.get_ref().clone()),
        None => None,
    };
    let routed = matches!(mode, Mode::Nat | Mode::Route);
    let mac = match &raw.mac {
        Some(m) if kind != UplinkKind::Macvtap && !routed => {
            return Err(cx.err(m.span(), "uplink mac is only for kind = \"macvtap\" (or a nat or route network's router)"))
        }
        Some(m) => match parse_mac(m.get_ref()) {
            Some(mac) if !vunet_switch::is_multicast(&mac) && mac != [0; 6] => Some(mac),
            _ => return Err(cx.err(m.span(), format!("invalid MAC address {:?}", m.get_ref()))),
        },
        None => None,
    };
    if mode == Mode::Isolated && !matches!(kind, UplinkKind::Tap | UplinkKind::Vxlan) {
        return Err(cx.err(
            raw.kind.span(),
            format!("network {net:?}: an isolated network has no way out to a LAN (a tap uplink to the host only); use mode = \"bridge\""),
        ));
    }
    if !routed {
        for (key, v) in [("address", &raw.address), ("router", &raw.router), ("address6", &raw.address6), ("router6", &raw.router6)] {
            if let Some(v) = v {
                return Err(cx.err(
                    v.span(),
                    format!(
                        "network {net:?}: uplink {key} is for nat and route networks (a bridge network's guests are LAN hosts themselves)"
                    ),
                ));
            }
        }
        if raw.proxy_arp.is_some() {
            return Err(cx.err(u.span(), format!("network {net:?}: proxy_arp is for route networks")));
        }
        if let Some(p) = &raw.proxy_ndp {
            return Err(cx.err(p.span(), format!("network {net:?}: proxy_ndp is for route networks")));
        }
    }
    if routed {
        if let Some(span) = raw.vlan.as_ref().map(|v| v.span()).or(raw.trunk.as_ref().map(|t| t.span())) {
            return Err(cx.err(
                span,
                format!("network {net:?}: uplink vlan and trunk are for bridge networks (a nat or route network's uplink is the router's, untagged)"),
            ));
        }
    }
    let vlan = parse_port_vlan(cx, &format!("network {net:?}: uplink"), raw.vlan.as_ref(), raw.trunk.as_ref(), None, None, true)?;
    Ok(Some(UplinkConfig { kind, interface, name, mac, own_mac: routed, vlan, vxlan }))
}

/// The `vni`, `local`, `port`, `remotes` and `group` keys: for kind = "vxlan" only.
fn parse_vxlan(cx: &Ctx, u: &Spanned<RawUplink>, net: &str, kind: UplinkKind) -> Result<Option<VxlanConfig>, ConfigError> {
    let raw = u.get_ref();
    if kind != UplinkKind::Vxlan {
        let spans = [raw.vni.as_ref().map(|v| v.span()), raw.local.as_ref().map(|v| v.span()), raw.port.as_ref().map(|v| v.span())];
        let more = [raw.remotes.as_ref().map(|v| v.span()), raw.group.as_ref().map(|v| v.span())];
        if let Some(span) = spans.into_iter().chain(more).flatten().next() {
            return Err(cx.err(span, format!("network {net:?}: vni, local, port, remotes and group are for kind = \"vxlan\"")));
        }
        return Ok(None);
    }
    let group = match &raw.group {
        Some(g) => match g.get_ref().parse::<Ipv4Addr>() {
            Ok(a) if a.is_multicast() => Some(a),
            _ => return Err(cx.err(g.span(), format!("invalid group {:?} (an IPv4 multicast address, e.g. 239.1.1.1)", g.get_ref()))),
        },
        None => None,
    };
    let vni = match &raw.vni {
        Some(v) if (0..=i64::from(vunet_switch::vxlan::MAX_VNI)).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => return Err(cx.err(v.span(), format!("invalid vni {} (0 to {})", v.get_ref(), vunet_switch::vxlan::MAX_VNI))),
        None => return Err(cx.err(u.span(), format!("network {net:?}: a vxlan uplink needs a vni (e.g. vni = 42)"))),
    };
    let local = match &raw.local {
        Some(l) => match l.get_ref().parse::<Ipv4Addr>() {
            Ok(a) if !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast() => a,
            _ => return Err(cx.err(l.span(), format!("invalid local address {:?} (an IPv4 address of this host)", l.get_ref()))),
        },
        None => {
            return Err(cx.err(u.span(), format!("network {net:?}: a vxlan uplink needs `local`, the address to send from and listen on")))
        }
    };
    let port = match &raw.port {
        Some(p) if (1..=65535).contains(p.get_ref()) => *p.get_ref() as u16,
        Some(p) => return Err(cx.err(p.span(), format!("invalid port {} (1 to 65535)", p.get_ref()))),
        None => vunet_switch::vxlan::DEFAULT_PORT,
    };
    let mut remotes = Vec::new();
    for r in raw.remotes.iter().flat_map(|r| r.get_ref()) {
        match r.get_ref().parse::<Ipv4Addr>() {
            Ok(a) if a == local => return Err(cx.err(r.span(), format!("remote {a} is the local address"))),
            Ok(a) if !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast() => {
                if remotes.contains(&a) {
                    return Err(cx.err(r.span(), format!("remote {a} is listed twice")));
                }
                remotes.push(a);
            }
            _ => return Err(cx.err(r.span(), format!("invalid remote address {:?} (a unicast IPv4 address)", r.get_ref()))),
        }
    }
    if remotes.is_empty() && group.is_none() {
        return Err(cx.err(u.span(), format!("network {net:?}: a vxlan uplink needs `remotes` (or a multicast `group`) to flood to")));
    }
    Ok(Some(VxlanConfig { vni, local, port, remotes, group }))
}

/// The MTU of the interface that holds `addr` (None if no interface does).
pub fn mtu_of_address(addr: Ipv4Addr) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{}/mtu", interface_of_address(addr)?)).ok()?.trim().parse().ok()
}

/// The name of the interface that holds `addr` (None if no interface does).
pub fn interface_of_address(addr: Ipv4Addr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut name = None;
    let mut p = list;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs made.
        let ifa = unsafe { &*p };
        // SAFETY: an AF_INET address is a sockaddr_in.
        if !ifa.ifa_addr.is_null() && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                // SAFETY: ifa_name is a NUL-terminated string.
                name = Some(unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned());
                break;
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs made, freed once.
    unsafe { libc::freeifaddrs(list) };
    name
}

/// A port or port range: `22`, `"22"` or `"8000-8010"`.
fn port_range(v: &toml::Value) -> Option<(u16, u16)> {
    let (lo, hi) = match v {
        toml::Value::Integer(p) => (*p, *p),
        toml::Value::String(s) => match s.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let p = s.trim().parse().ok()?;
                (p, p)
            }
        },
        _ => return None,
    };
    (1..=65535).contains(&lo).then_some(())?;
    (lo..=65535).contains(&hi).then_some((lo as u16, hi as u16))
}

fn proto_number(s: &str) -> Option<u8> {
    match s {
        "tcp" => Some(vunet_switch::proto::IPPROTO_TCP),
        "udp" => Some(vunet_switch::proto::IPPROTO_UDP),
        _ => None,
    }
}

/// Two socket NAT forwards' listening addresses can take the same host port: either is all
/// addresses, or they are equal, or one is its family's wildcard (`::` also takes IPv4 where
/// the host's `bindv6only` is off, its default).
fn listens_overlap(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => {
            let v6_any = |x: IpAddr| x == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
            a == b || v6_any(a) || v6_any(b) || (a.is_unspecified() || b.is_unspecified()) && a.is_ipv4() == b.is_ipv4()
        }
    }
}

/// Routing of a `nat` or `route` network: the uplink address, NAT settings and port forwards,
/// firewall rules, static routes (`RoutingConfig`, with an uplink), or socket NAT's settings
/// and forwards (a nat network without one). `uplink` is the parsed `[network.uplink]`.
#[allow(clippy::too_many_arguments)]
fn parse_routing(
    cx: &Ctx,
    n: &RawNetwork,
    net: &str,
    mode: Mode,
    gateway: Option<(Ipv4Addr, u8)>,
    gateway6: Option<(Ipv6Addr, u8)>,
    uplink: Option<&UplinkConfig>,
    warnings: &mut Vec<String>,
) -> Result<(Option<RoutingConfig>, Option<SocketNatConfig>), ConfigError> {
    use vunet_switch::firewall::{Action, Proto, Rule};
    use vunet_switch::nat::{NatConfig, PortForward};
    let routed = matches!(mode, Mode::Nat | Mode::Route);
    let misplaced =
        |span: Range<usize>, what: &str, for_mode: &str| cx.err(span, format!("network {net:?}: {what} is for mode = \"{for_mode}\""));
    if mode != Mode::Nat {
        if let Some(f) = n.port_forward.first() {
            return Err(misplaced(f.span(), "[[network.port_forward]]", "nat"));
        }
        if let Some(v) = &n.nat {
            return Err(misplaced(v.span(), "[network.nat]", "nat"));
        }
    }
    if mode != Mode::Route {
        if let Some(f) = n.firewall.first() {
            return Err(cx.err(
                f.span(),
                format!(
                    "network {net:?}: [[network.firewall]] is for mode = \"route\" (a nat network lets in only replies and port forwards)"
                ),
            ));
        }
        if let Some(f) = &n.firewall_default {
            return Err(misplaced(f.span(), "firewall_default", "route"));
        }
    }
    if !routed {
        if let Some(r) = n.route.first() {
            return Err(cx.err(r.span(), format!("network {net:?}: [[network.route]] is for nat and route networks")));
        }
        return Ok((None, None));
    }
    let Some(gw) = gateway else { return Ok((None, None)) };
    let host_of_subnet = |ip: Ipv4Addr| in_subnet(ip, gw) && ip != gw.0;
    let mut routes = Vec::new();
    for r in &n.route {
        let raw = r.get_ref();
        let (net_ip, prefix) = parse_cidr(raw.address.get_ref()).ok_or_else(|| {
            cx.err(raw.address.span(), format!("invalid route address {:?} (e.g. \"172.20.0.0/16\")", raw.address.get_ref()))
        })?;
        let via: Ipv4Addr =
            raw.via.get_ref().parse().map_err(|_| cx.err(raw.via.span(), format!("invalid address {:?}", raw.via.get_ref())))?;
        if !host_of_subnet(via) {
            return Err(cx.err(raw.via.span(), format!("route via {via}: not a guest address of the gateway's subnet {}/{}", gw.0, gw.1)));
        }
        routes.push(vunet_switch::router::StaticRoute { net: net_ip, prefix, via });
    }
    // A nat network without an uplink goes out through the host's own sockets.
    let socket = mode == Mode::Nat && uplink.is_none();
    let mut nat = NatConfig::default();
    let mut snat = SocketNatConfig::default();
    if let Some(v) = &n.nat {
        let raw = v.get_ref();
        let flavour = |span: Range<usize>, key: &str| {
            if socket {
                cx.err(span, format!("network {net:?}: nat {key} is for uplink NAT (a nat network with [network.uplink]); this one goes out through the host's sockets"))
            } else {
                cx.err(span, format!("network {net:?}: nat {key} is for socket NAT (a nat network without [network.uplink])"))
            }
        };
        if socket {
            // The host's kernel picks the source ports and holds the connections.
            if let Some(p) = &raw.ports {
                return Err(flavour(p.span(), "ports"));
            }
            if let Some(m) = &raw.max_entries {
                return Err(
                    cx.err(m.span(), format!("network {net:?}: nat max_entries is for uplink NAT; socket NAT's bound is max_connections"))
                );
            }
            if let Some(t) = &raw.icmp_timeout {
                return Err(flavour(t.span(), "icmp_timeout"));
            }
        } else {
            let uplink_only = [
                raw.host_loopback.as_ref().map(|h| (h.span(), "host_loopback")),
                raw.max_connections.as_ref().map(|m| (m.span(), "max_connections")),
                raw.max_per_guest.as_ref().map(|m| (m.span(), "max_per_guest")),
            ];
            if let Some((span, key)) = uplink_only.into_iter().flatten().next() {
                return Err(flavour(span, key));
            }
        }
        if let Some(p) = &raw.ports {
            match p.get_ref()[..] {
                [lo, hi] if (1..=65535).contains(&lo) && (lo..=65535).contains(&hi) => nat.ports = (lo as u16, hi as u16),
                _ => return Err(cx.err(p.span(), "nat ports must be [start, end] within 1-65535, e.g. [1024, 65535]")),
            }
        }
        if let Some(m) = &raw.max_entries {
            if !(16..=4_000_000).contains(m.get_ref()) {
                return Err(cx.err(m.span(), format!("invalid max_entries {} (16 to 4000000)", m.get_ref())));
            }
            nat.max_entries = *m.get_ref() as usize;
        }
        // Socket NAT has no ICMP time-out of its own (refused above).
        let mut no_icmp_idle = 0;
        for (t, field, secs) in [
            (&raw.tcp_timeout, &mut nat.timeouts.tcp_established, &mut snat.tcp_idle_secs),
            (&raw.udp_timeout, &mut nat.timeouts.udp_replied, &mut snat.udp_idle_secs),
            (&raw.icmp_timeout, &mut nat.timeouts.icmp, &mut no_icmp_idle),
        ] {
            if let Some(t) = t {
                if !(1..=864_000).contains(t.get_ref()) {
                    return Err(cx.err(t.span(), format!("invalid timeout {} (seconds, 1 to 864000)", t.get_ref())));
                }
                *field = *t.get_ref() as u64 * 1000;
                *secs = *t.get_ref() as u64;
            }
        }
        if let Some(h) = &raw.host_loopback {
            snat.host_loopback = *h.get_ref();
        }
        if let Some(m) = &raw.max_connections {
            if !(16..=1_000_000).contains(m.get_ref()) {
                return Err(cx.err(m.span(), format!("invalid max_connections {} (16 to 1000000)", m.get_ref())));
            }
            snat.max_connections = *m.get_ref() as usize;
        }
        snat.max_per_guest = (snat.max_connections / 4).max(1);
        if let Some(m) = &raw.max_per_guest {
            if !(1..=snat.max_connections as i64).contains(m.get_ref()) {
                return Err(
                    cx.err(m.span(), format!("invalid max_per_guest {} (1 to max_connections, {})", m.get_ref(), snat.max_connections))
                );
            }
            snat.max_per_guest = *m.get_ref() as usize;
        }
    }
    for f in &n.port_forward {
        let raw = f.get_ref();
        let proto = proto_number(raw.proto.get_ref()).ok_or_else(|| {
            cx.err(raw.proto.span(), format!("unknown port_forward proto {:?} (expected tcp or udp)", raw.proto.get_ref()))
        })?;
        let external = port_range(raw.port.get_ref())
            .ok_or_else(|| cx.err(raw.port.span(), "port_forward port must be a port or a range, e.g. 2222 or \"8000-8010\""))?;
        let (ip, port) = raw
            .to
            .get_ref()
            .rsplit_once(':')
            .and_then(|(ip, port)| Some((ip.parse::<Ipv4Addr>().ok()?, port.parse::<u16>().ok().filter(|&p| p > 0)?)))
            .ok_or_else(|| {
                cx.err(
                    raw.to.span(),
                    format!("port_forward to must be a guest address and port, e.g. \"192.168.122.10:22\", not {:?}", raw.to.get_ref()),
                )
            })?;
        if !host_of_subnet(ip) {
            return Err(
                cx.err(raw.to.span(), format!("port_forward to {ip}: not a guest address of the gateway's subnet {}/{}", gw.0, gw.1))
            );
        }
        if port as u32 + (external.1 - external.0) as u32 > 65535 {
            return Err(cx.err(raw.to.span(), "port_forward: the guest port range goes past 65535"));
        }
        let listen = match &raw.listen {
            None => None,
            Some(l) if !socket => {
                return Err(cx.err(
                    l.span(),
                    format!("network {net:?}: port_forward listen is for socket NAT (a nat network without [network.uplink]); uplink NAT forwards arrive on the uplink address"),
                ))
            }
            Some(l) => Some(l.get_ref().parse::<IpAddr>().map_err(|_| {
                cx.err(l.span(), format!("invalid port_forward listen {:?} (a host address, e.g. \"127.0.0.1\" or \"::1\")", l.get_ref()))
            })?),
        };
        let overlaps = |o_proto: u8, o_ext: (u16, u16)| o_proto == proto && o_ext.0 <= external.1 && external.0 <= o_ext.1;
        let taken = if socket {
            snat.forwards.iter().any(|o| overlaps(o.proto, o.external) && listens_overlap(o.listen, listen))
        } else {
            nat.forwards.iter().any(|o: &PortForward| overlaps(o.proto, o.external))
        };
        if taken {
            return Err(cx.err(raw.port.span(), "port_forward: this port is already forwarded"));
        }
        if socket {
            snat.forwards.push(SocketForward { proto, listen, external, guest: ip, guest_port: port });
        } else {
            nat.forwards.push(PortForward { proto, external, guest: ip, guest_port: port });
        }
    }
    let action = |s: &Spanned<String>| match s.get_ref().as_str() {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        "reject" => Ok(Action::Reject),
        other => Err(cx.err(s.span(), format!("unknown firewall action {other:?} (expected allow, deny or reject)"))),
    };
    let mut firewall = Vec::new();
    for r in &n.firewall {
        let raw = r.get_ref();
        let proto = match raw.proto.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None | Some((_, "any")) => Proto::Any,
            Some((_, "tcp")) => Proto::Tcp,
            Some((_, "udp")) => Proto::Udp,
            Some((_, "icmp")) => Proto::Icmp,
            Some((p, other)) => return Err(cx.err(p.span(), format!("unknown firewall proto {other:?} (expected tcp, udp, icmp or any)"))),
        };
        let ports = match &raw.port {
            None => None,
            Some(_) if !matches!(proto, Proto::Tcp | Proto::Udp) => {
                return Err(cx.err(r.span(), "a firewall port needs proto = \"tcp\" or \"udp\""))
            }
            Some(p) => Some(
                port_range(p.get_ref())
                    .ok_or_else(|| cx.err(p.span(), "firewall port must be a port or a range, e.g. 22 or \"8000-8010\""))?,
            ),
        };
        let subnet = |v: &Option<Spanned<String>>| -> Result<Option<(IpAddr, u8)>, ConfigError> {
            match v {
                None => Ok(None),
                Some(v) if v.get_ref() == "any" => Ok(None),
                Some(v) => {
                    let s = v.get_ref();
                    let v4 = if s.contains('/') { parse_cidr(s) } else { s.parse::<Ipv4Addr>().ok().map(|ip| (ip, 32)) };
                    // IPv6 rules filter the routed IPv6 (address6): a prefix, or one address.
                    let v6 = || match s.split_once('/') {
                        Some((a, p)) => a.parse::<Ipv6Addr>().ok().zip(p.parse::<u8>().ok().filter(|p| (1..=128).contains(p))),
                        None => s.parse::<Ipv6Addr>().ok().map(|ip| (ip, 128)),
                    };
                    v4.map(|(ip, p)| (IpAddr::V4(ip), p))
                        .or_else(|| v6().map(|(ip, p)| (IpAddr::V6(ip), p)))
                        .map(Some)
                        .ok_or_else(|| cx.err(v.span(), format!("invalid address {s:?} (an IPv4 or IPv6 address or subnet, or \"any\")")))
                }
            }
        };
        firewall.push(Rule { action: action(&raw.action)?, proto, ports, from: subnet(&raw.from)?, to: subnet(&raw.to)? });
    }
    let firewall_default = match &n.firewall_default {
        Some(f) => action(f)?,
        None => Action::Allow,
    };
    if socket {
        if let Some(r) = n.route.first() {
            return Err(cx.err(
                r.span(),
                format!("network {net:?}: [[network.route]] needs a router with an uplink (route mode, or nat with [network.uplink]); socket NAT carries the guests' own subnet only"),
            ));
        }
        return Ok((None, Some(snat)));
    }
    let Some(up) = uplink else {
        warnings.push(format!(
            "{}:{}: network {net:?}: mode {} without an [network.uplink]: the guests have their gateway but no way out",
            cx.file,
            cx.line_of(n.mode.span()),
            mode.name()
        ));
        return Ok((None, None));
    };
    let raw_up = n.uplink.as_ref().map(|u| u.get_ref());
    let router = match raw_up.and_then(|u| u.router.as_ref()) {
        Some(r) => {
            Some(r.get_ref().parse::<Ipv4Addr>().map_err(|_| cx.err(r.span(), format!("invalid router address {:?}", r.get_ref())))?)
        }
        None => None,
    };
    let address = match raw_up.and_then(|u| u.address.as_ref()) {
        None => return Err(cx.err(n.uplink.as_ref().map(|u| u.span()).unwrap_or(0..0), format!("network {net:?}: a {} network's uplink needs an address (\"dhcp\", or e.g. \"10.10.11.50/24\" with router = \"10.10.11.1\")", mode.name()))),
        Some(a) if a.get_ref() == "dhcp" => {
            if let Some(r) = raw_up.and_then(|u| u.router.as_ref()) {
                return Err(cx.err(r.span(), "router comes from the DHCP lease when address = \"dhcp\""));
            }
            UplinkAddress::Dhcp
        }
        Some(a) => {
            let addr = parse_cidr(a.get_ref()).filter(|c| in_subnet(c.0, *c) || c.1 == 32).ok_or_else(|| {
                cx.err(a.span(), format!("invalid uplink address {:?} (\"dhcp\", or an address with its prefix, e.g. \"10.10.11.50/24\")", a.get_ref()))
            })?;
            if let Some(r) = router {
                if !in_subnet(r, addr) {
                    return Err(cx.err(raw_up.and_then(|u| u.router.as_ref()).map(|r| r.span()).unwrap_or(0..0), format!("router {r} is not on the uplink's subnet {}/{}", addr.0, addr.1)));
                }
            }
            if in_subnet(addr.0, gw) || addr.0 == gw.0 {
                return Err(cx.err(a.span(), format!("uplink address {} is inside the guests' subnet {}/{}", addr.0, gw.0, gw.1)));
            }
            UplinkAddress::Static { addr, router }
        }
    };
    let proxy_arp = raw_up.and_then(|u| u.proxy_arp).unwrap_or(false);
    if proxy_arp && mode != Mode::Route {
        return Err(
            cx.err(n.uplink.as_ref().map(|u| u.span()).unwrap_or(0..0), format!("network {net:?}: proxy_arp is for route networks"))
        );
    }
    let mac = up.mac.unwrap_or_else(|| vunet_switch::gateway::gateway_mac(&format!("{net}/uplink")));
    let v6 = match raw_up {
        Some(u) => parse_routing6(cx, u, net, mode, gateway6)?,
        None => None,
    };
    Ok((Some(RoutingConfig { address, mac, proxy_arp, routes, nat, firewall, firewall_default, v6 }), None))
}

/// `address6`, `router6` and `proxy_ndp` of a routed network's uplink.
fn parse_routing6(
    cx: &Ctx,
    u: &RawUplink,
    net: &str,
    mode: Mode,
    gateway6: Option<(Ipv6Addr, u8)>,
) -> Result<Option<Routing6Config>, ConfigError> {
    let Some(a) = &u.address6 else {
        if let Some(r) = &u.router6 {
            return Err(cx.err(r.span(), format!("network {net:?}: router6 needs address6 (the router's IPv6 address on the uplink)")));
        }
        if let Some(p) = &u.proxy_ndp {
            return Err(cx.err(p.span(), format!("network {net:?}: proxy_ndp needs address6 (the router's IPv6 address on the uplink)")));
        }
        return Ok(None);
    };
    let Some(g6) = gateway6 else {
        return Err(cx.err(a.span(), format!("network {net:?}: address6 needs gateway6 on the network (the guests' IPv6 prefix to route)")));
    };
    let address = parse_cidr6(a.get_ref()).ok_or_else(|| {
        cx.err(
            a.span(),
            format!(
                "invalid address6 {:?} (a global or unique-local IPv6 address with its prefix, e.g. \"2001:db8:77::50/64\")",
                a.get_ref()
            ),
        )
    })?;
    if in_subnet6(address.0, g6) || in_subnet6(g6.0, address) {
        return Err(cx.err(a.span(), format!("address6 {}/{} overlaps the guests' prefix {}/{}", address.0, address.1, g6.0, g6.1)));
    }
    let router = match &u.router6 {
        None => None,
        Some(r) => {
            let ip: Ipv6Addr = r.get_ref().parse().map_err(|_| cx.err(r.span(), format!("invalid router6 address {:?}", r.get_ref())))?;
            let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
            if ip.is_multicast() || ip.is_unspecified() || ip.is_loopback() || ip == address.0 || !(link_local || in_subnet6(ip, address)) {
                return Err(cx.err(
                    r.span(),
                    format!("router6 {ip} is neither on the uplink's prefix {}/{} nor a link-local (fe80::) address", address.0, address.1),
                ));
            }
            Some(ip)
        }
    };
    let proxy_ndp = match &u.proxy_ndp {
        Some(p) if *p.get_ref() && mode != Mode::Route => {
            return Err(cx.err(p.span(), format!("network {net:?}: proxy_ndp is for route networks")));
        }
        Some(p) => *p.get_ref(),
        None => false,
    };
    Ok(Some(Routing6Config { address, router, proxy_ndp }))
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

fn parse_dhcp6(cx: &Ctx, d: &Spanned<RawDhcp6>, net: &str, gateway6: Option<(Ipv6Addr, u8)>) -> Result<Dhcp6Config, ConfigError> {
    let raw = d.get_ref();
    let Some(gw) = gateway6 else {
        return Err(cx.err(d.span(), format!("network {net:?}: [network.dhcp6] needs gateway6 (the prefix it serves)")));
    };
    let subnet = format!("{}/{}", gw.0, gw.1);
    let ip = |s: &str| s.parse::<Ipv6Addr>().ok();
    let range = match &raw.range {
        None => None,
        Some(r) => {
            let v = r.get_ref();
            let (Some(lo), Some(hi)) = (v.first().and_then(|s| ip(s)), v.get(1).and_then(|s| ip(s))) else {
                return Err(cx.err(r.span(), "range must be two IPv6 addresses, e.g. [\"fd00:7675:1::100\", \"fd00:7675:1::1ff\"]"));
            };
            if v.len() != 2 || lo > hi {
                return Err(cx.err(r.span(), format!("invalid range {lo} - {hi}")));
            }
            if !in_subnet6(lo, gw) || !in_subnet6(hi, gw) {
                return Err(cx.err(r.span(), format!("range {lo} - {hi} is outside gateway6's prefix {subnet}")));
            }
            Some((lo, hi))
        }
    };
    let mut hosts: Vec<Dhcp6Host> = Vec::new();
    for h in &raw.hosts {
        let v = h.get_ref();
        let mac = parse_mac(&v.mac)
            .filter(|m| !vunet_switch::is_multicast(m) && *m != [0; 6])
            .ok_or_else(|| cx.err(h.span(), format!("invalid MAC address {:?}", v.mac)))?;
        let hip = ip(&v.ip).ok_or_else(|| cx.err(h.span(), format!("invalid IPv6 address {:?}", v.ip)))?;
        if !in_subnet6(hip, gw) || hip == gw.0 {
            return Err(cx.err(h.span(), format!("static host {hip} is not a host address of gateway6's prefix {subnet}")));
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
        hosts.push(Dhcp6Host { mac, ip: hip, name });
    }
    if range.is_none() && hosts.is_empty() {
        return Err(cx.err(d.span(), format!("network {net:?}: [network.dhcp6] needs a range or hosts")));
    }
    let lease_secs = match &raw.lease_time {
        Some(t) if !(120..=31_536_000).contains(t.get_ref()) => return Err(cx.err(t.span(), "lease_time must be 120 to 31536000 seconds")),
        Some(t) => *t.get_ref() as u32,
        None => 3600,
    };
    Ok(Dhcp6Config { range, hosts, lease_secs })
}

/// Parses "fd00:7675:1::1/64": a unicast address that is neither link-local, loopback,
/// multicast nor unspecified, with a prefix of 1 to 127.
pub fn parse_cidr6(s: &str) -> Option<(Ipv6Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let addr: Ipv6Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    let bad = addr.is_multicast() || addr.is_loopback() || addr.is_unspecified() || (addr.segments()[0] & 0xffc0) == 0xfe80;
    ((1..=127).contains(&prefix) && !bad).then_some((addr, prefix))
}

/// Whether `ip` is in the prefix of `net`.
pub fn in_subnet6(ip: Ipv6Addr, net: (Ipv6Addr, u8)) -> bool {
    let mask = if net.1 == 0 { 0 } else { u128::MAX << (128 - net.1 as u32) };
    u128::from(ip) & mask == u128::from(net.0) & mask
}

/// Parses "192.168.122.1/24".
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    (1..=30).contains(&prefix).then_some((addr, prefix))
}

/// The worker threads a port's queue pairs get by default: one per core of the host.
pub fn default_workers() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(64) as u16)
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
        let mut vxlan_sockets = HashSet::new();
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
                // An isolated network without an address is a plain L2 segment (libvirt's network
                // without <ip>): guests reach each other only, no DHCP or DNS.
                None if !matches!(mode, Mode::Bridge | Mode::Isolated) => {
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
                    // Bounded below 65535 so that every IP length vunet writes (a TSO segment's
                    // MSS is at most the MTU) fits in 16 bits.
                    if !(68..=i64::from(vunet_switch::MAX_MTU)).contains(&v) {
                        return Err(cx.err(m.span(), format!("invalid mtu {v} (68 to {})", vunet_switch::MAX_MTU)));
                    }
                    v as u16
                }
                None => 1500,
            };
            let mut mtu = mtu;
            let busy_poll_us = match &n.busy_poll_us {
                Some(b) => {
                    let v = *b.get_ref();
                    if !(0..=100_000).contains(&v) {
                        return Err(cx.err(b.span(), format!("invalid busy_poll_us {v} (0 to 100000)")));
                    }
                    v as u32
                }
                None => 0,
            };
            let workers = match &n.workers {
                Some(w) if !(1..=64).contains(w.get_ref()) => {
                    return Err(cx.err(w.span(), format!("invalid workers {} (1 to 64)", w.get_ref())))
                }
                Some(w) => *w.get_ref() as u16,
                None => default_workers(),
            };
            let dhcp = match &n.dhcp {
                Some(d) => Some(parse_dhcp(&cx, d, &name, gateway)?),
                None => None,
            };
            let gateway6 = match &n.gateway6 {
                Some(g) => Some(parse_cidr6(g.get_ref()).ok_or_else(|| {
                    cx.err(
                        g.span(),
                        format!(
                            "invalid gateway6 {:?} (expected a global or unique-local IPv6 address with a prefix, e.g. fd00:7675:1::1/64)",
                            g.get_ref()
                        ),
                    )
                })?),
                None => None,
            };
            if let (Some(g), None) = (&n.gateway6, gateway) {
                return Err(
                    cx.err(g.span(), format!("network {name:?}: gateway6 needs an IPv4 gateway too (the gateway's services run on both)"))
                );
            }
            let dhcp6 = match &n.dhcp6 {
                Some(d) => Some(parse_dhcp6(&cx, d, &name, gateway6)?),
                None => None,
            };
            if let (Some((_, p)), None, Some(g)) = (gateway6, &dhcp6, &n.gateway6) {
                if p != 64 {
                    warnings.push(format!(
                        "{}:{}: network {name:?}: gateway6 prefix /{p}: guests configure addresses themselves (SLAAC) only on a /64; add [network.dhcp6] or use /64",
                        cx.file,
                        cx.line_of(g.span())
                    ));
                }
            }
            let dns = match &n.dns {
                Some(d) if gateway.is_none() => {
                    return Err(cx.err(d.span(), format!("network {name:?}: [network.dns] needs a gateway address to serve from")))
                }
                Some(d) => parse_dns(&cx, d)?,
                None => DnsConfig::default(),
            };
            let uplink = match &n.uplink {
                Some(u) => parse_uplink(&cx, u, &name, mode)?,
                None => None,
            };
            if let Some(u) = uplink.as_ref().filter(|u| u.kind == UplinkKind::Tap) {
                if !taps.insert(u.interface.clone()) {
                    return Err(cx.err(n.uplink.as_ref().map(|u| u.span()).unwrap_or(0..0), format!("tap {} is used twice", u.interface)));
                }
            }
            if let Some(v) = uplink.as_ref().and_then(|u| u.vxlan.as_ref()) {
                // Networks share a (local, port) and are told apart by their VNI; a group's
                // socket is the network's own.
                if v.group.is_some_and(|g| !vxlan_sockets.insert((g, v.port, 0))) {
                    return Err(cx.err(
                        n.uplink.as_ref().map(|u| u.span()).unwrap_or(0..0),
                        format!(
                            "network {name:?}: group {}:{} is another network's uplink's already",
                            v.group.unwrap_or(Ipv4Addr::UNSPECIFIED),
                            v.port
                        ),
                    ));
                }
                if !vxlan_sockets.insert((v.local, v.port, v.vni)) {
                    return Err(cx.err(
                        n.uplink.as_ref().map(|u| u.span()).unwrap_or(0..0),
                        format!("network {name:?}: VNI {} on {}:{} is another network's uplink already", v.vni, v.local, v.port),
                    ));
                }
                // The inner frames ride in the underlay's packets: 50 bytes less by default.
                let underlay = mtu_of_address(v.local);
                let fits = underlay
                    .unwrap_or(1500)
                    .saturating_sub(u32::from(vunet_switch::vxlan::OVERHEAD))
                    .clamp(68, u32::from(vunet_switch::MAX_MTU)) as u16;
                match &n.mtu {
                    None => mtu = fits,
                    Some(m) if mtu > fits => warnings.push(format!(
                        "{}:{}: network {name:?}: mtu {mtu} with a vxlan uplink: the underlay ({}) fits {fits}; larger packets are fragmented",
                        cx.file,
                        cx.line_of(m.span()),
                        underlay.map_or("MTU 1500 assumed".to_string(), |u| format!("MTU {u}"))
                    )),
                    Some(_) => {}
                }
            }
            let (routing, socket_nat) = parse_routing(&cx, &n, &name, mode, gateway, gateway6, uplink.as_ref(), &mut warnings)?;
            // A routed macvtap is created with the router's MAC.
            let uplink = uplink.map(|u| match &routing {
                Some(r) if u.kind == UplinkKind::Macvtap => UplinkConfig { mac: Some(r.mac), ..u },
                _ => u,
            });
            let net_socket_mode = n.socket_mode.as_ref().map(|m| parse_socket_mode(&cx, m)).transpose()?;
            let net_socket_group = n.socket_group.as_ref().map(|g| parse_socket_group(&cx, g)).transpose()?;
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
                let queues = match &p.queues {
                    Some(q) if tap.is_some() => {
                        return Err(cx.err(q.span(), format!("port {pname:?}: queues are for vhost-user ports, not taps")))
                    }
                    Some(q) if !(1..=8).contains(q.get_ref()) => {
                        return Err(cx.err(q.span(), format!("port {pname:?}: invalid queues {} (1 to 8)", q.get_ref())))
                    }
                    Some(q) => *q.get_ref() as u16,
                    None => 1,
                };
                // Only a socket vunet binds has a mode and group of vunet's choosing: QEMU creates
                // a client-mode port's socket.
                if let Some(v) = p.socket_mode.as_ref().or(p.socket_group.as_ref()).filter(|_| tap.is_some() || mode == PortMode::Client) {
                    return Err(cx.err(
                        v.span(),
                        format!("port {pname:?}: socket_mode and socket_group are for server-mode vhost-user ports (the VMM creates a client-mode port's socket)"),
                    ));
                }
                let socket_mode = p.socket_mode.as_ref().map(|m| parse_socket_mode(&cx, m)).transpose()?.or(net_socket_mode);
                let socket_group = p.socket_group.as_ref().map(|g| parse_socket_group(&cx, g)).transpose()?.or(net_socket_group);
                let vlan = parse_port_vlan(
                    &cx,
                    &format!("port {pname:?}"),
                    p.vlan.as_ref(),
                    p.trunk.as_ref(),
                    p.native_vlan.as_ref(),
                    p.native_tagged.as_ref(),
                    false,
                )?;
                let bandwidth = p.bandwidth.as_ref().map(|b| parse_bandwidth(&cx, b, &pname)).transpose()?.unwrap_or_default();
                ports.push(PortConfig {
                    name: pname,
                    socket,
                    tap,
                    mode,
                    mac,
                    port_security: p.port_security,
                    queues,
                    socket_mode,
                    socket_group,
                    vlan,
                    isolated: p.isolated.unwrap_or(false),
                    bandwidth,
                });
            }
            networks.push(NetworkConfig {
                name,
                mode,
                gateway,
                gateway6,
                mtu,
                busy_poll_us,
                workers,
                dhcp,
                dhcp6,
                dns,
                uplink,
                routing,
                socket_nat,
                socket_mode: net_socket_mode,
                socket_group: net_socket_group,
                ports,
            });
        }
        Ok(Config {
            state_dir: raw.state_dir.map(|p| base.join(p)),
            control_socket: raw.control_socket.map(|p| base.join(p)),
            control_group: raw.control_group,
            socket_dir: raw.socket_dir.map(|p| base.join(p)),
            metrics_listen,
            networks,
            warnings,
            notes: Vec::new(),
        })
    }

    /// The embedded default: network `default`, nat through the host's sockets (socket NAT with
    /// its defaults), gateway 192.168.122.1/24 with DHCP (.2–.254) and DNS, four server-mode
    /// guest sockets `vm1.sock` … `vm4.sock` and the control socket `control.sock` in
    /// `runtime_dir`. Where 192.168.122.0/24 overlaps a route of the host (libvirt's virbr0),
    /// the next free 192.168.N.0/24 instead, said in `notes`.
    pub fn default_in(runtime_dir: &Path) -> Config {
        Self::default_for_routes(runtime_dir, &read_host_routes())
    }

    /// [`Config::default_in`] for a given host routing table (`/proc/net/route`, parsed).
    pub fn default_for_routes(runtime_dir: &Path, routes: &[HostRoute]) -> Config {
        let (n, why) = default_subnet(routes);
        let ports = (1..=4)
            .map(|i| PortConfig {
                name: format!("vm{i}"),
                tap: None,
                socket: runtime_dir.join(format!("vm{i}.sock")),
                mode: PortMode::Server,
                mac: None,
                port_security: None,
                queues: 1,
                socket_mode: None,
                socket_group: None,
                vlan: PortVlan::Untagged,
                isolated: false,
                bandwidth: Bandwidth::default(),
            })
            .collect();
        Config {
            state_dir: None,
            // Where the CLI looks first (`vunet net-list` with no flags), owner-only as always.
            control_socket: Some(runtime_dir.join("control.sock")),
            control_group: None,
            socket_dir: None,
            metrics_listen: None,
            networks: vec![NetworkConfig {
                name: "default".into(),
                mode: Mode::Nat,
                gateway: Some((Ipv4Addr::new(192, 168, n, 1), 24)),
                gateway6: None,
                mtu: 1500,
                busy_poll_us: 0,
                workers: default_workers(),
                dhcp: Some(DhcpConfig {
                    range: (Ipv4Addr::new(192, 168, n, 2), Ipv4Addr::new(192, 168, n, 254)),
                    hosts: vec![],
                    lease_secs: 3600,
                }),
                dhcp6: None,
                dns: DnsConfig::default(),
                uplink: None,
                routing: None,
                socket_nat: Some(SocketNatConfig::default()),
                socket_mode: None,
                socket_group: None,
                ports,
            }],
            warnings: vec![],
            notes: why.map(|w| format!("network \"default\": subnet 192.168.{n}.0/24 {w}")).into_iter().collect(),
        }
    }
}

/// A route of the host's IPv4 table, as `/proc/net/route` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoute {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub mask: Ipv4Addr,
}

/// The routes of `/proc/net/route` text that are up (`RTF_UP`). Malformed lines are skipped:
/// the table only steers the choice of a default subnet.
pub fn parse_proc_net_route(text: &str) -> Vec<HostRoute> {
    // The kernel prints each address as the `%08X` of its network-order u32 read in host
    // order, so the native-endian bytes of the number are the address's bytes.
    let addr = |h: &str| u32::from_str_radix(h, 16).ok().map(|v| Ipv4Addr::from(v.to_ne_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (iface, dest, flags, mask) = (f.first()?, addr(f.get(1)?)?, f.get(3)?, addr(f.get(7)?)?);
            let up = u16::from_str_radix(flags, 16).ok()? & 1 != 0;
            up.then(|| HostRoute { iface: iface.to_string(), dest, mask })
        })
        .collect()
}

/// The host's IPv4 routes (none where /proc/net/route cannot be read).
pub fn read_host_routes() -> Vec<HostRoute> {
    std::fs::read_to_string("/proc/net/route").map(|t| parse_proc_net_route(&t)).unwrap_or_default()
}

/// The third byte N of the embedded default's 192.168.N.0/24: 122 (libvirt's) unless a
/// non-default route of the host overlaps it, then the first free of 123..=254. With the
/// reason when it is not 122 (or when none is free and 122 is kept anyway).
pub fn default_subnet(routes: &[HostRoute]) -> (u8, Option<String>) {
    let clash = |n: u8| {
        let net = u32::from(Ipv4Addr::new(192, 168, n, 0));
        routes.iter().filter(|r| !(r.dest.is_unspecified() && r.mask.is_unspecified())).find(|r| {
            // Two prefixes overlap when they agree on the bits of the shorter mask.
            let common = u32::from(r.mask) & 0xffff_ff00;
            (u32::from(r.dest) ^ net) & common == 0
        })
    };
    let Some(taken) = clash(122) else { return (122, None) };
    let why = format!("the host's route {}/{} on {}", taken.dest, u32::from(taken.mask).count_ones(), taken.iface);
    match (123..=254).find(|&n| clash(n).is_none()) {
        Some(n) => (n, Some(format!("instead of 192.168.122.0/24, which overlaps {why}"))),
        None => (122, Some(format!("overlaps {why}, and so does every 192.168.123-254.0/24: guests may not reach that network"))),
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
        assert_eq!(c.socket_dir, None, "port-add's sockets go next to the control socket");
        assert_eq!(parse(&format!("socket_dir = \"guests\"\n{GOOD}")).unwrap().socket_dir, Some(PathBuf::from("/run/vunet/guests")));
        let n = &c.networks[0];
        assert_eq!((n.name.as_str(), n.mode, n.mtu), ("default", Mode::Isolated, 1500));
        assert_eq!(n.gateway, Some((Ipv4Addr::new(192, 168, 122, 1), 24)));
        assert_eq!(n.ports[0].socket, PathBuf::from("/run/vunet/vm1.sock"));
        assert_eq!(n.ports[0].mode, PortMode::Server);
        assert_eq!(n.ports[1].mode, PortMode::Client);
        assert_eq!(n.ports[1].mac, Some([0x52, 0x54, 0, 0, 0, 2]));
    }

    #[test]
    fn full_contract_document_parses_with_routing() {
        use vunet_switch::firewall::{Action, Proto, Rule};
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
[network.nat]
ports = [20000, 30000]
max_entries = 1000
udp_timeout = 60
[[network.port_forward]]
proto = "tcp"
port = 2222
to = "192.168.122.10:22"
[[network.port_forward]]
proto = "udp"
port = "6000-6009"
to = "192.168.122.10:7000"
[[network.port]]
name = "vm1"
socket = "/run/vunet/vm1.sock"
mode = "server"

[[network]]
name = "lab"
mode = "route"
gateway = "10.10.12.1/24"
firewall_default = "allow"
[network.uplink]
kind = "af-packet"
interface = "eth2"
address = "10.10.11.50/24"
router = "10.10.11.1"
proxy_arp = true
mac = "52:54:00:aa:bb:cc"
[[network.firewall]]
action = "reject"
proto = "tcp"
port = 22
[[network.firewall]]
action = "deny"
from = "10.10.11.0/24"
[[network.route]]
address = "172.20.0.0/16"
via = "10.10.12.10"
"#;
        let c = parse(t).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let (nat, lab) = (&c.networks[0], &c.networks[1]);
        let r = nat.routing.as_ref().unwrap();
        assert_eq!(r.address, UplinkAddress::Dhcp);
        assert_eq!((r.nat.ports, r.nat.max_entries, r.nat.timeouts.udp_replied), ((20000, 30000), 1000, 60_000));
        assert_eq!(r.nat.forwards[1].external, (6000, 6009));
        let u = nat.uplink.as_ref().unwrap();
        assert!(u.own_mac && u.mac == Some(r.mac), "a routed macvtap has the router's MAC");
        let r = lab.routing.as_ref().unwrap();
        assert_eq!(
            r.address,
            UplinkAddress::Static { addr: (Ipv4Addr::new(10, 10, 11, 50), 24), router: Some(Ipv4Addr::new(10, 10, 11, 1)) }
        );
        assert!(r.proxy_arp);
        assert_eq!(r.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(r.firewall[0], Rule { action: Action::Reject, proto: Proto::Tcp, ports: Some((22, 22)), from: None, to: None });
        assert_eq!(r.firewall[1].from, Some((Ipv4Addr::new(10, 10, 11, 0).into(), 24)));
        assert_eq!(r.routes[0].via, Ipv4Addr::new(10, 10, 12, 10));
    }

    #[test]
    fn routing_mistakes_name_their_line() {
        let net = |mode: &str, extra: &str| {
            format!("[[network]]\nname = \"a\"\nmode = \"{mode}\"\ngateway = \"10.0.0.1/24\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\n{extra}")
        };
        for (doc, want) in [
            (net("nat", ""), "vunet.toml:5: network \"a\": a nat network's uplink needs an address"),
            (net("nat", "address = \"10.0.0.9/24\"\n"), "vunet.toml:8: uplink address 10.0.0.9 is inside the guests' subnet"),
            (
                net("nat", "address = \"10.1.0.9/24\"\nrouter = \"10.2.0.1\"\n"),
                "vunet.toml:9: router 10.2.0.1 is not on the uplink's subnet",
            ),
            (net("nat", "address = \"dhcp\"\nrouter = \"10.2.0.1\"\n"), "vunet.toml:9: router comes from the DHCP lease"),
            (net("bridge", "address = \"10.1.0.9/24\"\n"), "vunet.toml:8: network \"a\": uplink address is for nat and route networks"),
            (net("nat", "address = \"dhcp\"\nproxy_arp = true\n"), "vunet.toml:5: network \"a\": proxy_arp is for route networks"),
            (
                net("route", "address = \"dhcp\"\n[[network.port_forward]]\nproto = \"tcp\"\nport = 1\nto = \"10.0.0.5:1\"\n"),
                "vunet.toml:9: network \"a\": [[network.port_forward]] is for mode = \"nat\"",
            ),
            (
                net("nat", "address = \"dhcp\"\n[[network.port_forward]]\nproto = \"sctp\"\nport = 1\nto = \"10.0.0.5:1\"\n"),
                "vunet.toml:10: unknown port_forward proto \"sctp\"",
            ),
            (
                net("nat", "address = \"dhcp\"\n[[network.port_forward]]\nproto = \"tcp\"\nport = \"9-1\"\nto = \"10.0.0.5:1\"\n"),
                "vunet.toml:11: port_forward port must be a port or a range",
            ),
            (
                net("nat", "address = \"dhcp\"\n[[network.port_forward]]\nproto = \"tcp\"\nport = 1\nto = \"10.9.0.5:1\"\n"),
                "vunet.toml:12: port_forward to 10.9.0.5: not a guest address",
            ),
            (
                net("nat", "address = \"dhcp\"\n[[network.firewall]]\naction = \"deny\"\n"),
                "vunet.toml:9: network \"a\": [[network.firewall]] is for mode = \"route\"",
            ),
            (
                net("route", "address = \"dhcp\"\n[[network.firewall]]\naction = \"drop\"\n"),
                "vunet.toml:10: unknown firewall action \"drop\"",
            ),
            (
                net("route", "address = \"dhcp\"\n[[network.firewall]]\naction = \"deny\"\nproto = \"icmp\"\nport = 1\n"),
                "vunet.toml:9: a firewall port needs proto",
            ),
            (
                net("route", "address = \"dhcp\"\n[[network.route]]\naddress = \"172.20.0.0/16\"\nvia = \"10.5.0.1\"\n"),
                "vunet.toml:11: route via 10.5.0.1: not a guest address",
            ),
            (net("nat", "address = \"dhcp\"\n[network.nat]\nports = [2000, 1000]\n"), "vunet.toml:10: nat ports must be [start, end]"),
        ] {
            let e = parse(&doc).unwrap_err().to_string();
            assert!(e.starts_with(want), "{doc}\n→ {e}\nwanted {want}");
        }
    }

    #[test]
    fn ipv6_routing_parses_and_its_mistakes_name_their_line() {
        let net = |mode: &str, g6: &str, extra: &str| {
            format!(
                "[[network]]\nname = \"a\"\nmode = \"{mode}\"\ngateway = \"10.0.0.1/24\"\n{g6}[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\naddress = \"10.1.0.9/24\"\n{extra}"
            )
        };
        let g6 = "gateway6 = \"fd00:1::1/64\"\n";
        let c = parse(&net("route", g6, "address6 = \"2001:db8:77::50/64\"\nrouter6 = \"fe80::1\"\nproxy_ndp = true\n[[network.firewall]]\naction = \"deny\"\nfrom = \"2001:db8:66::/48\"\n")).unwrap();
        let n = &c.networks[0];
        let r = n.routing.as_ref().unwrap();
        let v6 = r.v6.unwrap();
        assert_eq!(
            (v6.address, v6.router, v6.proxy_ndp),
            (("2001:db8:77::50".parse().unwrap(), 64), Some("fe80::1".parse().unwrap()), true)
        );
        assert_eq!(r.firewall[0].from, Some(("2001:db8:66::".parse().unwrap(), 48)));
        assert!(n.ipv6_default_route(), "a network that routes IPv6 out advertises a default router");
        let c = parse(&net("nat", g6, "")).unwrap();
        assert!(c.networks[0].routing.as_ref().unwrap().v6.is_none());
        assert!(!c.networks[0].ipv6_default_route(), "an uplink without address6 gives guests no IPv6 way out");
        let socket_nat = parse(&format!("[[network]]\nname = \"a\"\nmode = \"nat\"\ngateway = \"10.0.0.1/24\"\n{g6}")).unwrap();
        assert!(socket_nat.networks[0].ipv6_default_route());
        for (doc, want) in [
            (net("nat", "", "address6 = \"2001:db8:77::50/64\"\n"), "vunet.toml:9: network \"a\": address6 needs gateway6"),
            (net("nat", g6, "address6 = \"2001:db8:77::50\"\n"), "vunet.toml:10: invalid address6"),
            (net("nat", g6, "address6 = \"fd00:1::50/64\"\n"), "vunet.toml:10: address6 fd00:1::50/64 overlaps the guests' prefix"),
            (
                net("nat", g6, "address6 = \"2001:db8:77::50/64\"\nrouter6 = \"2001:db8:78::1\"\n"),
                "vunet.toml:11: router6 2001:db8:78::1 is neither on the uplink's prefix",
            ),
            (net("nat", g6, "address6 = \"2001:db8:77::50/64\"\nrouter6 = \"bogus\"\n"), "vunet.toml:11: invalid router6 address"),
            (net("nat", g6, "router6 = \"fe80::1\"\n"), "vunet.toml:10: network \"a\": router6 needs address6"),
            (
                net("nat", g6, "address6 = \"2001:db8:77::50/64\"\nproxy_ndp = true\n"),
                "vunet.toml:11: network \"a\": proxy_ndp is for route networks",
            ),
            (
                net("route", g6, "address6 = \"2001:db8:77::50/64\"\n[[network.firewall]]\naction = \"deny\"\nfrom = \"2001:db8::/200\"\n"),
                "vunet.toml:13: invalid address \"2001:db8::/200\"",
            ),
        ] {
            let e = parse(&doc).unwrap_err().to_string();
            assert!(e.starts_with(want), "{doc}\n→ {e}\nwanted {want}");
        }
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
    fn vxlan_uplinks_parse_default_their_mtu_and_their_mistakes_name_the_line() {
        let net = |mode: &str, extra: &str, uplink: &str| {
            format!("[[network]]\nname = \"a\"\nmode = \"{mode}\"\ngateway = \"10.0.0.1/24\"\n{extra}[network.uplink]\n{uplink}\n")
        };
        let ok = "kind = \"vxlan\"\nvni = 42\nlocal = \"127.0.0.1\"\nremotes = [\"10.9.0.2\", \"10.9.0.3\"]";
        let c = parse(&net("bridge", "", ok)).unwrap();
        let u = c.networks[0].uplink.clone().unwrap();
        assert_eq!((u.kind, u.interface.as_str()), (UplinkKind::Vxlan, "vxlan42"));
        let v = u.vxlan.unwrap();
        assert_eq!((v.vni, v.local, v.port), (42, Ipv4Addr::LOCALHOST, 4789));
        assert_eq!(v.remotes, vec![Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 3)]);
        // The underlay is loopback here: its MTU minus the 50 bytes of encapsulation.
        let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu").unwrap().trim().parse().unwrap();
        assert_eq!(mtu_of_address(Ipv4Addr::LOCALHOST), Some(lo));
        let want = (lo - 50).min(u32::from(vunet_switch::MAX_MTU)) as u16;
        assert_eq!(c.networks[0].mtu, want, "the network's MTU defaults to the underlay's minus 50 (at most MAX_MTU)");
        let c = parse(&net("bridge", "mtu = 1400\n", ok)).unwrap();
        assert_eq!(c.networks[0].mtu, 1400, "an explicit MTU stays");
        let c = parse(&net("bridge", "", "kind = \"vxlan\"\nvni = 7\nlocal = \"127.0.0.1\"\ngroup = \"239.1.1.1\"")).unwrap();
        let v = c.networks[0].uplink.as_ref().and_then(|u| u.vxlan.clone()).unwrap();
        assert_eq!((v.group, v.remotes.len()), (Some(Ipv4Addr::new(239, 1, 1, 1)), 0), "a group instead of remotes");
        let c = parse(&net("isolated", "", &format!("{ok}\nport = 8472"))).unwrap();
        assert_eq!(
            c.networks[0].uplink.as_ref().and_then(|u| u.vxlan.as_ref()).map(|v| v.port),
            Some(8472),
            "an isolated network spans hosts"
        );
        let twice = format!("{}{}", net("bridge", "", ok), net("bridge", "", ok).replace("name = \"a\"", "name = \"b\""));
        // Two networks share a socket with two VNIs.
        let shared = twice.replacen("vni = 42", "vni = 43", 1);
        assert_eq!(parse(&shared).unwrap().networks.len(), 2, "two VNIs on one local address and port");
        let cases = [
            (
                net("bridge", "", "kind = \"vxlan\"\nlocal = \"127.0.0.1\"\nremotes = [\"10.9.0.2\"]"),
                "vunet.toml:5: network \"a\": a vxlan uplink needs a vni",
            ),
            (net("bridge", "", &ok.replace("vni = 42", "vni = 16777216")), "vunet.toml:7: invalid vni 16777216"),
            (net("bridge", "", &ok.replace("127.0.0.1", "0.0.0.0")), "vunet.toml:8: invalid local address"),
            (net("bridge", "", &ok.replace("10.9.0.3", "10.9.0.2")), "vunet.toml:9: remote 10.9.0.2 is listed twice"),
            (net("bridge", "", &ok.replace("10.9.0.3", "224.0.0.1")), "vunet.toml:9: invalid remote address \"224.0.0.1\""),
            (
                net("bridge", "", "kind = \"vxlan\"\nvni = 1\nlocal = \"127.0.0.1\""),
                "vunet.toml:5: network \"a\": a vxlan uplink needs `remotes` (or a multicast `group`)",
            ),
            (net("bridge", "", &format!("{ok}\ngroup = \"10.1.1.1\"")), "vunet.toml:10: invalid group \"10.1.1.1\""),
            (net("bridge", "", &format!("{ok}\ninterface = \"eth0\"")), "vunet.toml:10: a vxlan uplink has no interface"),
            (net("bridge", "", &format!("{ok}\nport = 0")), "vunet.toml:10: invalid port 0"),
            (
                net("bridge", "", "kind = \"af-packet\"\ninterface = \"eth1\"\nvni = 4"),
                "vunet.toml:8: network \"a\": vni, local, port, remotes and group are for kind = \"vxlan\"",
            ),
            (net("bridge", "", "kind = \"af-packet\""), "vunet.toml:5: network \"a\": uplink kind \"af-packet\" needs an interface"),
            (twice, "vunet.toml:14: network \"b\": VNI 42 on 127.0.0.1:4789 is another network's uplink already"),
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
    fn vlan_keys() {
        let c = parse(
            "[[network]]\nname = \"a\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\ntrunk = [10, 20]\n\
             [[network.port]]\nname = \"acc\"\nsocket = \"a.sock\"\nvlan = 10\n\
             [[network.port]]\nname = \"tr\"\nsocket = \"t.sock\"\ntrunk = [20, 30]\nnative_vlan = 10\n\
             [[network.port]]\nname = \"nt\"\nsocket = \"n.sock\"\ntrunk = [4094]\nnative_vlan = 1\nnative_tagged = true\n\
             [[network.port]]\nname = \"plain\"\nsocket = \"p.sock\"\n",
        )
        .unwrap();
        let n = &c.networks[0];
        assert_eq!(
            n.uplink.as_ref().unwrap().vlan,
            PortVlan::Trunk { vids: [10, 20].into_iter().collect(), native: None, native_tagged: false }
        );
        assert_eq!(n.ports[0].vlan, PortVlan::Access(10));
        assert_eq!(n.ports[1].vlan, PortVlan::Trunk { vids: [20, 30].into_iter().collect(), native: Some(10), native_tagged: false });
        assert_eq!(n.ports[2].vlan, PortVlan::Trunk { vids: [4094].into_iter().collect(), native: Some(1), native_tagged: true });
        assert_eq!(n.ports[3].vlan, PortVlan::Untagged);
        let c = parse(
            "[[network]]\nname = \"a\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\nvlan = 100\n",
        )
        .unwrap();
        assert_eq!(c.networks[0].uplink.as_ref().unwrap().vlan, PortVlan::Outer(100));
    }

    #[test]
    fn vlan_mistakes_name_the_line() {
        let port = "[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"p\"\nsocket = \"p.sock\"\n";
        let uplink = "[[network]]\nname = \"a\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\n";
        let cases: &[(String, &str)] = &[
            (format!("{port}vlan = 0\n"), "vunet.toml:7: invalid vlan 0 (a VLAN ID, 1 to 4094)"),
            (format!("{port}vlan = 4095\n"), "vunet.toml:7: invalid vlan 4095 (a VLAN ID, 1 to 4094)"),
            (format!("{port}trunk = [10, 4095]\n"), "vunet.toml:7: invalid trunk VLAN 4095"),
            (format!("{port}trunk = []\n"), "vunet.toml:7: port \"p\": trunk = [] carries no VLAN"),
            (format!("{port}vlan = 10\ntrunk = [20]\n"), "vunet.toml:8: port \"p\": vlan and trunk exclude each other"),
            (format!("{port}vlan = 10\nnative_vlan = 10\n"), "vunet.toml:8: port \"p\": native_vlan is for trunk ports"),
            (format!("{port}trunk = [10]\nnative_tagged = true\n"), "vunet.toml:8: port \"p\": native_tagged needs a native_vlan"),
            (format!("{port}trunk = [10]\nnative_vlan = 5000\n"), "vunet.toml:8: invalid native_vlan 5000"),
            (format!("{uplink}vlan = -1\n"), "vunet.toml:7: invalid vlan -1"),
            (format!("{uplink}trunk = []\n"), "vunet.toml:7: network \"a\": uplink: trunk = [] carries no VLAN"),
            (
                "[[network]]\nname = \"a\"\nmode = \"nat\"\ngateway = \"10.0.0.1/24\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\naddress = \"dhcp\"\nvlan = 100\n".to_string(),
                "vunet.toml:9: network \"a\": uplink vlan and trunk are for bridge networks",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn mistakes_name_the_line() {
        let cases: &[(&str, &str)] = &[
            ("[[network]]\nname = \"a\"\nmode = \"nta\"\ngateway = \"10.0.0.1/24\"\n", "vunet.toml:3: unknown mode \"nta\" (expected isolated, nat, route or bridge)"),
            ("[[network]]\nname = \"a\"\nmode = \"nat\"\n", "vunet.toml:1: network \"a\": mode nat needs a gateway"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\ngateway = \"10.0.0.1\"\n", "vunet.toml:4: invalid gateway"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\nmtu = 10\n", "vunet.toml:4: invalid mtu 10"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\nmtu = 65535\n", "vunet.toml:4: invalid mtu 65535 (68 to 65415)"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\nbusy_poll_us = -1\n", "vunet.toml:4: invalid busy_poll_us -1"),
            ("[[network]]\nname = \"a\"\nmode = \"bridge\"\nworkers = 0\n", "vunet.toml:4: invalid workers 0"),
            (
                "[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"p\"\nsocket = \"p.sock\"\nqueues = 9\n",
                "vunet.toml:7: port \"p\": invalid queues 9 (1 to 8)",
            ),
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
    fn socket_mode_and_group_per_network_with_port_overrides() {
        let t = r#"
[[network]]
name = "a"
mode = "bridge"
socket_group = "nogroup"
socket_mode = "0640"
[[network.port]]
name = "inherits"
socket = "i.sock"
[[network.port]]
name = "own"
socket = "o.sock"
socket_mode = 0o600
socket_group = 4242
[[network.port]]
name = "vmm-listens"
socket = "c.sock"
mode = "client"
[[network]]
name = "b"
mode = "bridge"
[[network.port]]
name = "plain"
socket = "p.sock"
[[network.port]]
name = "grouped"
socket = "g.sock"
socket_group = "4243"
"#;
        let c = parse(t).unwrap();
        let nogroup = group_id("nogroup").expect("the host has a group nogroup");
        let (a, b) = (&c.networks[0], &c.networks[1]);
        assert_eq!((a.socket_mode, a.socket_group), (Some(0o640), Some(nogroup)), "network defaults kept for port-add");
        let perms = |p: &PortConfig| (p.socket_mode, p.socket_group, p.effective_socket_mode());
        assert_eq!(perms(&a.ports[0]), (Some(0o640), Some(nogroup), 0o640), "a port inherits its network's");
        assert_eq!(perms(&a.ports[1]), (Some(0o600), Some(4242), 0o600), "a port's own win");
        assert_eq!(perms(&b.ports[0]), (None, None, 0o600), "owner-only by default");
        assert_eq!(perms(&b.ports[1]), (None, Some(4243), 0o660), "a group means owner and group by default");
    }

    #[test]
    fn socket_mode_and_group_mistakes_name_the_line() {
        let net = |extra: &str, port: &str| {
            format!("[[network]]\nname = \"a\"\nmode = \"bridge\"\n{extra}[[network.port]]\nname = \"p\"\nsocket = \"p.sock\"\n{port}")
        };
        let cases = [
            (
                net("socket_group = \"no-such-group-here\"\n", ""),
                "vunet.toml:4: unknown socket_group \"no-such-group-here\" (no such group on this host)",
            ),
            (net("", "socket_group = \"no-such-group-here\"\n"), "vunet.toml:7: unknown socket_group \"no-such-group-here\""),
            (net("", "socket_group = -1\n"), "vunet.toml:7: invalid socket_group -1"),
            (net("", "socket_group = true\n"), "vunet.toml:7: invalid socket_group true"),
            (
                net("socket_mode = \"0999\"\n", ""),
                "vunet.toml:4: invalid socket_mode \"0999\" (an octal mode such as \"0660\", at most 0777)",
            ),
            (net("", "socket_mode = \"4755\"\n"), "vunet.toml:7: invalid socket_mode \"4755\""),
            (net("", "socket_mode = 660\n"), "vunet.toml:7: invalid socket_mode 660"),
            (net("", "socket_mode = \"\"\n"), "vunet.toml:7: invalid socket_mode \"\""),
            (
                net("", "mode = \"client\"\nsocket_mode = \"0660\"\n"),
                "vunet.toml:8: port \"p\": socket_mode and socket_group are for server-mode vhost-user ports",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}\n got: {e}\nwant: {want}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        let tap = "[[network]]\nname = \"a\"\nmode = \"bridge\"\n[[network.port]]\nname = \"t\"\nkind = \"tap\"\ninterface = \"t0\"\nsocket_group = \"nogroup\"\n";
        assert!(parse(tap)
            .unwrap_err()
            .to_string()
            .starts_with("vunet.toml:8: port \"t\": socket_mode and socket_group are for server-mode"));
    }

    #[test]
    fn dns_hosts_take_ipv6_addresses() {
        let text = "[[network]]\nname = \"a\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n[network.dns]\nhosts = [{ name = \"Four\", ip = \"10.0.0.4\" }, { name = \"six\", ip = \"fd00::6\" }]\n";
        let d = parse(text).unwrap().networks[0].dns.clone();
        assert_eq!(d.hosts, vec![("four".to_string(), Ipv4Addr::new(10, 0, 0, 4))]);
        assert_eq!(d.hosts6, vec![("six".to_string(), "fd00::6".parse::<Ipv6Addr>().unwrap())]);
        let bad = text.replace("fd00::6", "fd00::g");
        assert_eq!(parse(&bad).unwrap_err().to_string(), "vunet.toml:6: invalid IP address \"fd00::g\"");
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
    fn the_embedded_default_has_a_control_socket_dhcp_and_four_guest_sockets() {
        let c = Config::default_for_routes(Path::new("/tmp/rt"), &[]);
        assert_eq!(c.control_socket.as_deref(), Some(Path::new("/tmp/rt/control.sock")));
        assert_eq!(c.control_group, None, "owner-only");
        let n = &c.networks[0];
        assert_eq!((n.name.as_str(), n.mode, n.gateway), ("default", Mode::Nat, Some((Ipv4Addr::new(192, 168, 122, 1), 24))));
        assert_eq!(n.dhcp.as_ref().map(|d| d.range), Some((Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 254))));
        let sockets: Vec<_> = n.ports.iter().map(|p| p.socket.clone()).collect();
        assert_eq!(sockets, (1..=4).map(|i| PathBuf::from(format!("/tmp/rt/vm{i}.sock"))).collect::<Vec<_>>());
        assert!(n.uplink.is_none() && n.routing.is_none(), "out through the host's sockets, no uplink");
        assert_eq!(n.socket_nat, Some(SocketNatConfig::default()));
        assert!(c.notes.is_empty() && c.warnings.is_empty(), "{:?} {:?}", c.notes, c.warnings);
        // The file form of the same network parses to the same settings.
        let t = "[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n[network.dhcp]\nrange = [\"192.168.122.2\", \"192.168.122.254\"]\n";
        let f = parse(t).unwrap();
        assert_eq!((f.networks[0].socket_nat.as_ref(), f.networks[0].dhcp.as_ref()), (n.socket_nat.as_ref(), n.dhcp.as_ref()));
    }

    /// `/proc/net/route` text with these (interface, destination, mask, flags) rows; the numbers
    /// are printed the way the kernel prints them on this host.
    fn proc_route(rows: &[(&str, [u8; 4], [u8; 4], u16)]) -> String {
        let mut t = String::from("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n");
        for (iface, dest, mask, flags) in rows {
            t.push_str(&format!(
                "{iface}\t{:08X}\t00000000\t{flags:04X}\t0\t0\t0\t{:08X}\t0\t0\t0\n",
                u32::from_ne_bytes(*dest),
                u32::from_ne_bytes(*mask)
            ));
        }
        t
    }

    #[test]
    fn proc_net_route_is_read_in_host_order_and_only_up_routes_count() {
        let t = proc_route(&[
            ("eth0", [0, 0, 0, 0], [0, 0, 0, 0], 3),
            ("virbr0", [192, 168, 122, 0], [255, 255, 255, 0], 1),
            ("down0", [10, 1, 0, 0], [255, 255, 0, 0], 0),
        ]);
        let r = parse_proc_net_route(&format!("{t}garbage line\neth1\tZZ\n"));
        assert_eq!(
            r,
            vec![
                HostRoute { iface: "eth0".into(), dest: Ipv4Addr::UNSPECIFIED, mask: Ipv4Addr::UNSPECIFIED },
                HostRoute { iface: "virbr0".into(), dest: Ipv4Addr::new(192, 168, 122, 0), mask: Ipv4Addr::new(255, 255, 255, 0) },
            ]
        );
        #[cfg(target_endian = "little")]
        assert_eq!(
            parse_proc_net_route("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")[0].dest,
            Ipv4Addr::new(192, 168, 122, 0),
            "the kernel's own text for libvirt's virbr0"
        );
    }

    #[test]
    fn the_default_subnet_avoids_the_hosts_routes() {
        let routes = |rows: &[(&str, [u8; 4], [u8; 4], u16)]| parse_proc_net_route(&proc_route(rows));
        let default_route = ("eth0", [0, 0, 0, 0], [0, 0, 0, 0], 3);
        // The default route and unrelated networks leave libvirt's subnet alone.
        let r = routes(&[default_route, ("eth0", [10, 0, 2, 0], [255, 255, 255, 0], 1), ("x", [192, 168, 0, 0], [255, 255, 255, 0], 1)]);
        assert_eq!(default_subnet(&r), (122, None));
        // libvirt's virbr0 takes it: the next one, and why.
        let r = routes(&[default_route, ("virbr0", [192, 168, 122, 0], [255, 255, 255, 0], 1)]);
        let (n, why) = default_subnet(&r);
        assert_eq!(n, 123);
        assert_eq!(why.as_deref(), Some("instead of 192.168.122.0/24, which overlaps the host's route 192.168.122.0/24 on virbr0"));
        let c = Config::default_for_routes(Path::new("/tmp/rt"), &r);
        let net = &c.networks[0];
        assert_eq!(net.gateway, Some((Ipv4Addr::new(192, 168, 123, 1), 24)));
        assert_eq!(net.dhcp.as_ref().map(|d| d.range), Some((Ipv4Addr::new(192, 168, 123, 2), Ipv4Addr::new(192, 168, 123, 254))));
        assert_eq!(
            c.notes,
            vec!["network \"default\": subnet 192.168.123.0/24 instead of 192.168.122.0/24, which overlaps the host's route 192.168.122.0/24 on virbr0".to_string()]
        );
        // A host route inside 122, a /25 inside 123, a /23 over 124 and 125: 126.
        let r = routes(&[
            ("tun0", [192, 168, 122, 77], [255, 255, 255, 255], 5),
            ("br1", [192, 168, 124, 0], [255, 255, 254, 0], 1),
            ("br2", [192, 168, 123, 128], [255, 255, 255, 128], 1),
        ]);
        assert_eq!(default_subnet(&r).0, 126, "124/23 covers 124 and 125, 123.128/25 is inside 123");
        // A route over all of 192.168/16: nothing is free; 122 is kept, and said.
        let r = routes(&[("vpn0", [192, 168, 0, 0], [255, 255, 0, 0], 1)]);
        let (n, why) = default_subnet(&r);
        assert_eq!(n, 122);
        assert!(why.unwrap().contains("and so does every 192.168.123-254.0/24"));
    }

    fn nat(extra: &str) -> String {
        format!("[[network]]\nname = \"a\"\nmode = \"nat\"\ngateway = \"10.0.0.1/24\"\n{extra}")
    }

    #[test]
    fn isolated_ports_bandwidth_and_address_less_networks() {
        let c = parse(
            "[[network]]\nname = \"seg\"\nmode = \"isolated\"\n\
             [[network.port]]\nname = \"a\"\nsocket = \"a.sock\"\nisolated = true\n\
             [network.port.bandwidth]\ninbound = { average = 12500, peak = 25000, burst = 1024 }\noutbound = { average = 12500 }\n\
             [[network.port]]\nname = \"b\"\nsocket = \"b.sock\"\n",
        )
        .unwrap();
        let n = &c.networks[0];
        assert_eq!((n.gateway, n.dhcp.is_some()), (None, false), "an isolated network without an address: a plain L2 segment");
        let (a, b) = (&n.ports[0], &n.ports[1]);
        assert!(a.isolated && !b.isolated);
        assert_eq!(a.bandwidth.inbound, Some(RateLimit { average: 12500, peak: Some(25000), burst: Some(1024) }));
        assert_eq!(a.bandwidth.outbound, Some(RateLimit { average: 12500, peak: None, burst: None }));
        assert_eq!(b.bandwidth, Bandwidth::default());
        let port = |extra: &str| {
            format!("[[network]]\nname = \"n\"\nmode = \"bridge\"\n[[network.port]]\nname = \"a\"\nsocket = \"a.sock\"\n{extra}")
        };
        for (extra, want) in [
            (
                "[network.port.bandwidth]\ninbound = { average = 0 }\n",
                "vunet.toml:8: port \"a\": bandwidth inbound: average 0 must be 1 to 100000000",
            ),
            (
                "[network.port.bandwidth]\noutbound = { average = 10, peak = 20 }\n",
                "vunet.toml:8: port \"a\": bandwidth outbound: peak is for inbound only",
            ),
            (
                "[network.port.bandwidth]\ninbound = { average = 10, peak = 5 }\n",
                "vunet.toml:8: port \"a\": bandwidth inbound: peak 5 must be at least average",
            ),
            (
                "[network.port.bandwidth]\ninbound = { average = 10, burst = 0 }\n",
                "vunet.toml:8: port \"a\": bandwidth inbound: burst 0 must be 1 to 4194304",
            ),
        ] {
            let e = parse(&port(extra)).unwrap_err().to_string();
            assert!(e.starts_with(want), "{extra}: got {e}");
        }
        // nat and route networks still need their gateway.
        let e = parse("[[network]]\nname = \"r\"\nmode = \"route\"\n").unwrap_err().to_string();
        assert!(e.contains("mode route needs a gateway"), "{e}");
    }

    #[test]
    fn gateway6_and_dhcp6_parse_and_are_checked() {
        let iso = |extra: &str| format!("[[network]]\nname = \"a\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n{extra}");
        let c = parse(&iso("gateway6 = \"fd00:7675:1::1/64\"\n[network.dhcp6]\nrange = [\"fd00:7675:1::100\", \"fd00:7675:1::1ff\"]\n\
             hosts = [{ mac = \"52:54:00:00:00:10\", ip = \"fd00:7675:1::10\", name = \"web\" }]\n"))
        .unwrap();
        let n = &c.networks[0];
        assert_eq!(n.gateway6, Some(("fd00:7675:1::1".parse().unwrap(), 64)));
        let d = n.dhcp6.clone().unwrap();
        assert_eq!(d.range, Some(("fd00:7675:1::100".parse().unwrap(), "fd00:7675:1::1ff".parse().unwrap())));
        assert_eq!(
            d.hosts,
            vec![Dhcp6Host { mac: [0x52, 0x54, 0, 0, 0, 0x10], ip: "fd00:7675:1::10".parse().unwrap(), name: Some("web".into()) }]
        );
        assert_eq!(d.lease_secs, 3600);
        // SLAAC only: no dhcp6.
        let c = parse(&iso("gateway6 = \"2001:db8:5::1/64\"\n")).unwrap();
        assert!(c.networks[0].dhcp6.is_none() && c.warnings.is_empty());
        // A prefix SLAAC cannot use is said.
        let c = parse(&iso("gateway6 = \"2001:db8:5::1/56\"\n")).unwrap();
        assert!(c.warnings[0].contains("vunet.toml:5") && c.warnings[0].contains("SLAAC"), "{:?}", c.warnings);
        for (extra, want) in [
            ("gateway6 = \"fe80::1/64\"\n", "vunet.toml:5: invalid gateway6 \"fe80::1/64\""),
            ("gateway6 = \"fd00::1\"\n", "vunet.toml:5: invalid gateway6"),
            ("[network.dhcp6]\nrange = [\"fd00::2\", \"fd00::3\"]\n", "vunet.toml:5: network \"a\": [network.dhcp6] needs gateway6"),
            (
                "gateway6 = \"fd00::1/64\"\n[network.dhcp6]\nrange = [\"fd00:1::2\", \"fd00:1::3\"]\n",
                "vunet.toml:7: range fd00:1::2 - fd00:1::3 is outside",
            ),
            ("gateway6 = \"fd00::1/64\"\n[network.dhcp6]\nrange = [\"fd00::9\", \"fd00::3\"]\n", "vunet.toml:7: invalid range"),
            (
                "gateway6 = \"fd00::1/64\"\n[network.dhcp6]\nhosts = [{ mac = \"52:54:00:00:00:10\", ip = \"fd00::1\" }]\n",
                "vunet.toml:7: static host fd00::1",
            ),
            ("gateway6 = \"fd00::1/64\"\n[network.dhcp6]\n", "vunet.toml:6: network \"a\": [network.dhcp6] needs a range or hosts"),
            (
                "gateway6 = \"fd00::1/64\"\n[network.dhcp6]\nrange = [\"fd00::9\", \"fd00::10\"]\nlease_time = 60\n",
                "vunet.toml:8: lease_time must be 120",
            ),
        ] {
            let e = parse(&iso(extra)).unwrap_err().to_string();
            assert!(e.starts_with(want), "{extra}: got {e}");
        }
    }

    #[test]
    fn a_nat_network_without_an_uplink_is_socket_nat() {
        let c = parse(&nat("")).unwrap();
        assert!(c.warnings.is_empty(), "socket NAT has a way out: {:?}", c.warnings);
        let n = &c.networks[0];
        assert!(n.routing.is_none());
        let s = n.socket_nat.clone().unwrap();
        assert_eq!(
            (s.host_loopback, s.max_connections, s.max_per_guest, s.tcp_idle_secs, s.udp_idle_secs, s.forwards.len()),
            (false, 4096, 1024, 7200, 180, 0)
        );
        let c = parse(&nat("[network.nat]\nhost_loopback = true\nmax_connections = 100\ntcp_timeout = 600\nudp_timeout = 30\n\
             [[network.port_forward]]\nproto = \"tcp\"\nport = 2222\nto = \"10.0.0.10:22\"\nlisten = \"127.0.0.1\"\n\
             [[network.port_forward]]\nproto = \"tcp\"\nport = 2222\nto = \"10.0.0.11:22\"\nlisten = \"::1\"\n\
             [[network.port_forward]]\nproto = \"udp\"\nport = \"6000-6009\"\nto = \"10.0.0.10:7000\"\n"))
        .unwrap();
        let s = c.networks[0].socket_nat.clone().unwrap();
        assert_eq!(
            (s.host_loopback, s.max_connections, s.max_per_guest, s.tcp_idle_secs, s.udp_idle_secs),
            (true, 100, 25, 600, 30),
            "max_per_guest defaults to a quarter"
        );
        assert_eq!(
            s.forwards,
            vec![
                SocketForward {
                    proto: 6,
                    listen: Some("127.0.0.1".parse().unwrap()),
                    external: (2222, 2222),
                    guest: Ipv4Addr::new(10, 0, 0, 10),
                    guest_port: 22
                },
                SocketForward {
                    proto: 6,
                    listen: Some("::1".parse().unwrap()),
                    external: (2222, 2222),
                    guest: Ipv4Addr::new(10, 0, 0, 11),
                    guest_port: 22
                },
                SocketForward { proto: 17, listen: None, external: (6000, 6009), guest: Ipv4Addr::new(10, 0, 0, 10), guest_port: 7000 },
            ]
        );
        let s = parse(&nat("[network.nat]\nmax_connections = 16\nmax_per_guest = 16\n")).unwrap().networks[0].socket_nat.clone().unwrap();
        assert_eq!((s.max_connections, s.max_per_guest), (16, 16));
        // With an uplink it is uplink NAT, and a route network without one still has no way out.
        let up = parse(&nat("[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\naddress = \"dhcp\"\n")).unwrap();
        assert!(up.networks[0].socket_nat.is_none() && up.networks[0].routing.is_some());
        let route = parse("[[network]]\nname = \"r\"\nmode = \"route\"\ngateway = \"10.0.0.1/24\"\n").unwrap();
        assert!(route.networks[0].socket_nat.is_none());
        assert_eq!(route.warnings.len(), 1);
        assert!(
            route.warnings[0].starts_with("vunet.toml:3: network \"r\": mode route without an [network.uplink]"),
            "{:?}",
            route.warnings
        );
        // Other modes never get it.
        assert!(parse(GOOD).unwrap().networks[0].socket_nat.is_none());
    }

    #[test]
    fn socket_nat_and_uplink_nat_keys_stay_with_their_flavour() {
        let uplink = "[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\naddress = \"dhcp\"\n";
        let fwd =
            |listen: &str, port: &str| format!("[[network.port_forward]]\nproto = \"tcp\"\nport = {port}\nto = \"10.0.0.10:22\"\n{listen}");
        let cases = [
            (nat("[network.nat]\nports = [1024, 65535]\n"), "vunet.toml:6: network \"a\": nat ports is for uplink NAT"),
            (
                nat("[network.nat]\nmax_entries = 100\n"),
                "vunet.toml:6: network \"a\": nat max_entries is for uplink NAT; socket NAT's bound is max_connections",
            ),
            (nat("[network.nat]\nicmp_timeout = 30\n"), "vunet.toml:6: network \"a\": nat icmp_timeout is for uplink NAT"),
            (
                nat(&format!("{uplink}[network.nat]\nhost_loopback = true\n")),
                "vunet.toml:10: network \"a\": nat host_loopback is for socket NAT",
            ),
            (
                nat(&format!("{uplink}[network.nat]\nmax_connections = 100\n")),
                "vunet.toml:10: network \"a\": nat max_connections is for socket NAT",
            ),
            (
                nat(&format!("{uplink}[network.nat]\nmax_per_guest = 10\n")),
                "vunet.toml:10: network \"a\": nat max_per_guest is for socket NAT",
            ),
            (
                nat(&format!("{uplink}{}", fwd("listen = \"127.0.0.1\"\n", "22"))),
                "vunet.toml:13: network \"a\": port_forward listen is for socket NAT",
            ),
            (nat("[network.nat]\nmax_connections = 15\n"), "vunet.toml:6: invalid max_connections 15 (16 to 1000000)"),
            (nat("[network.nat]\nmax_connections = 1000001\n"), "vunet.toml:6: invalid max_connections 1000001"),
            (nat("[network.nat]\nmax_per_guest = 0\n"), "vunet.toml:6: invalid max_per_guest 0 (1 to max_connections, 4096)"),
            (
                nat("[network.nat]\nmax_connections = 100\nmax_per_guest = 101\n"),
                "vunet.toml:7: invalid max_per_guest 101 (1 to max_connections, 100)",
            ),
            (nat("[network.nat]\nhost_loopback = \"yes\"\n"), "vunet.toml:6:"),
            (nat("[network.nat]\ntcp_timeout = 0\n"), "vunet.toml:6: invalid timeout 0"),
            (nat(&fwd("listen = \"localhost\"\n", "22")), "vunet.toml:9: invalid port_forward listen \"localhost\""),
            (
                nat(&format!("{}{}", fwd("", "22"), fwd("listen = \"127.0.0.1\"\n", "\"20-30\""))),
                "vunet.toml:11: port_forward: this port is already forwarded",
            ),
            (
                nat(&format!("{}{}", fwd("listen = \"0.0.0.0\"\n", "22"), fwd("listen = \"127.0.0.1\"\n", "22"))),
                "vunet.toml:12: port_forward: this port is already forwarded",
            ),
            (
                nat(&format!("{}{}", fwd("listen = \"::\"\n", "22"), fwd("listen = \"127.0.0.1\"\n", "22"))),
                "vunet.toml:12: port_forward: this port is already forwarded",
            ),
            (
                nat("[[network.route]]\naddress = \"172.20.0.0/16\"\nvia = \"10.0.0.5\"\n"),
                "vunet.toml:5: network \"a\": [[network.route]] needs a router with an uplink",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text}\n got: {e}\nwant: {want}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        // The same port on two distinct addresses, or on v4's wildcard and v6's loopback, is fine.
        let ok = nat(&format!("{}{}", fwd("listen = \"0.0.0.0\"\n", "22"), fwd("listen = \"::1\"\n", "22")));
        assert_eq!(parse(&ok).unwrap().networks[0].socket_nat.as_ref().map(|s| s.forwards.len()), Some(2));
    }

    #[test]
    fn unreadable_file_is_one_line() {
        let e = Config::load(Path::new("/nonexistent/vunet.toml")).unwrap_err().to_string();
        assert_eq!(e, "/nonexistent/vunet.toml: cannot read: No such file or directory");
    }
}
