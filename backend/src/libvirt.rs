//! libvirt network XML → vunet TOML (`vunet import-libvirt FILE.xml`, and `vunet run --config
//! FILE.xml`). The seeds' networks import as they are: `default` (NAT with DHCP, through the
//! host's sockets; with `<forward dev=...>` the uplink is left to complete), routed,
//! isolated (no `<forward>`), bridged (`<forward mode='bridge'/><bridge name='br0'/>`), with
//! `<dhcp><host>`, `<dns><host>`/`<forwarder>` and `<mtu>`. Whatever vunet cannot honour is
//! named in one warning line each, never dropped silently.

use std::net::Ipv4Addr;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// An XML element with what vunet reads of it.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
    line: usize,
}

impl Element {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }
    fn child(&self, n: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == n)
    }
    fn all<'a>(&'a self, n: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == n)
    }
}

/// A conversion result: the TOML text and one line per thing not honoured.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    pub warnings: Vec<String>,
}

/// Deepest element nesting accepted: libvirt's networks use four levels; the bound keeps a
/// hostile file from building (and recursively dropping) an arbitrarily deep tree.
const MAX_DEPTH: usize = 64;

/// Line numbers of byte offsets: the newlines' offsets, found in one pass, then a binary
/// search per lookup (counting from the start at every element was quadratic).
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Lines {
        Lines(text.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i).collect())
    }
    fn at(&self, pos: usize) -> usize {
        self.0.partition_point(|&nl| nl < pos) + 1
    }
}

fn start(lines: &Lines, file: &str, e: &BytesStart, pos: usize) -> Result<Element, String> {
    let line = lines.at(pos);
    let mut el = Element { name: String::from_utf8_lossy(e.name().as_ref()).into_owned(), line, ..Default::default() };
    for a in e.attributes() {
        let a = a.map_err(|err| format!("{file}:{line}: malformed XML: {err}"))?;
        let v = a.unescape_value().map_err(|err| format!("{file}:{line}: malformed XML: {err}"))?;
        el.attrs.push((String::from_utf8_lossy(a.key.as_ref()).into_owned(), v.into_owned()));
    }
    Ok(el)
}

fn parse_xml(text: &str, file: &str) -> Result<Element, String> {
    let lines = Lines::of(text);
    let mut r = Reader::from_str(text);
    r.config_mut().trim_text(true);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    loop {
        let before = r.buffer_position() as usize;
        // Whitespace before a tag is read with it: the element starts at its '<'.
        let pos = text.get(before..).and_then(|t| t.find('<')).map_or(before, |o| before + o);
        let ev = r.read_event().map_err(|e| format!("{file}:{}: malformed XML: {e}", lines.at(r.error_position() as usize)))?;
        if matches!(ev, Event::Start(_) | Event::Empty(_)) && stack.len() >= MAX_DEPTH {
            return Err(format!("{file}:{}: XML nested deeper than {MAX_DEPTH} elements", lines.at(pos)));
        }
        match ev {
            Event::Start(e) => stack.push(start(&lines, file, &e, pos)?),
            Event::Empty(e) => {
                let el = start(&lines, file, &e, pos)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack.pop().ok_or_else(|| format!("{file}:{}: malformed XML: unexpected end tag", lines.at(pos)))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.unescape().map_err(|e| format!("{file}:{}: malformed XML: {e}", lines.at(pos)))?);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(format!("{file}:{}: malformed XML: <{}> is not closed", stack[0].line, stack[0].name));
    }
    root.ok_or_else(|| format!("{file}: no XML element"))
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn prefix_of(ip: &Element, file: &str) -> Result<u8, String> {
    if let Some(p) = ip.attr("prefix") {
        return p.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{file}:{}: invalid prefix {p:?}", ip.line));
    }
    let mask = ip.attr("netmask").unwrap_or("255.255.255.0");
    let m: Ipv4Addr = mask.parse().map_err(|_| format!("{file}:{}: invalid netmask {mask:?}", ip.line))?;
    let bits = u32::from(m);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(format!("{file}:{}: invalid netmask {mask}", ip.line));
    }
    Ok(bits.leading_ones() as u8)
}

/// Converts one libvirt `<network>` definition.
pub fn import(text: &str, file: &str) -> Result<Imported, String> {
    let net = parse_xml(text, file)?;
    if net.name != "network" {
        return Err(format!("{file}:{}: expected a libvirt <network>, found <{}>", net.line, net.name));
    }
    let mut warnings = Vec::new();
    let mut warn = |line: usize, what: String| warnings.push(format!("{file}:{line}: {what}"));
    let name = net.child("name").map(|n| n.text.trim().to_string()).filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| format!("{file}:{}: <network> has no <name>", net.line))?;

    let forward = net.child("forward");
    let fmode = forward.map(|f| f.attr("mode").unwrap_or("nat"));
    let (mode, uplink) = match fmode {
        None => ("isolated", None),
        Some("nat") => ("nat", None),
        Some("route") => ("route", None),
        Some("open") => {
            warn(forward.map(|f| f.line).unwrap_or(0), "forward mode 'open' (no firewall rules) is imported as route".into());
            ("route", None)
        }
        Some("bridge") => {
            let dev = net
                .child("bridge")
                .and_then(|b| b.attr("name"))
                .or_else(|| forward.and_then(|f| f.child("interface")).and_then(|i| i.attr("dev")));
            let dev = dev.ok_or_else(|| {
                format!("{file}:{}: forward mode 'bridge' needs <bridge name='...'/>", forward.map(|f| f.line).unwrap_or(0))
            })?;
            ("bridge", Some(("af-packet", dev.to_string())))
        }
        Some(m @ ("passthrough" | "private" | "vepa")) => {
            let f = forward.unwrap_or(&net);
            let dev = f.attr("dev").or_else(|| f.child("interface").and_then(|i| i.attr("dev")));
            let dev = dev.ok_or_else(|| format!("{file}:{}: forward mode '{m}' needs <interface dev='...'/>", f.line))?;
            if m != "passthrough" {
                warn(
                    f.line,
                    format!("forward mode '{m}' is imported as a macvtap uplink in passthru mode (vunet switches the guests itself)"),
                );
            }
            ("bridge", Some(("macvtap", dev.to_string())))
        }
        Some(other) => {
            return Err(format!(
                "{file}:{}: unknown forward mode {other:?} (expected nat, route, open, bridge, passthrough, private or vepa)",
                forward.map(|f| f.line).unwrap_or(0)
            ))
        }
    };

    let mut t = format!("# imported from {file} by vunet import-libvirt\n\n[[network]]\nname = {}\nmode = {}\n", q(&name), q(mode));
    let ips: Vec<&Element> = net.all("ip").filter(|i| i.attr("family").is_none_or(|f| f == "ipv4")).collect();
    let ips6: Vec<&Element> = net.all("ip").filter(|i| i.attr("family") == Some("ipv6")).collect();
    for extra in net.all("ip").filter(|i| i.attr("family").is_some_and(|f| f != "ipv4" && f != "ipv6")) {
        warn(extra.line, format!("<ip family='{}'> is not supported; ignored", extra.attr("family").unwrap_or("")));
    }
    for extra in ips6.iter().skip(1) {
        warn(extra.line, "a second IPv6 <ip> is not supported (one gateway6 prefix per network); ignored".into());
    }
    for extra in ips.iter().skip(1) {
        warn(extra.line, "a second IPv4 <ip> is not supported (one gateway address per network); ignored".into());
    }
    let ip = ips.first().copied();
    if let Some(ip) = ip {
        let addr = ip.attr("address").ok_or_else(|| format!("{file}:{}: <ip> has no address", ip.line))?;
        addr.parse::<Ipv4Addr>().map_err(|_| format!("{file}:{}: invalid address {addr:?}", ip.line))?;
        t.push_str(&format!("gateway = {}\n", q(&format!("{addr}/{}", prefix_of(ip, file)?))));
    } else if !matches!(mode, "bridge" | "isolated") {
        return Err(format!("{file}:{}: a {mode} network needs an <ip address=... prefix=...>", net.line));
    }
    // IPv6: the gateway's address and prefix (router advertisements, SLAAC), and DHCPv6 from
    // its first range. It rides on the IPv4 gateway, which libvirt networks with IPv6 have.
    let ip6 = ips6.first().copied().filter(|i6| {
        if ip.is_none() {
            warn(i6.line, "<ip family='ipv6'> without an IPv4 <ip>: vunet's gateway needs its IPv4 address too; ignored".into());
        }
        ip.is_some()
    });
    if let Some(i6) = ip6 {
        let addr = i6.attr("address").ok_or_else(|| format!("{file}:{}: <ip> has no address", i6.line))?;
        addr.parse::<std::net::Ipv6Addr>().map_err(|_| format!("{file}:{}: invalid IPv6 address {addr:?}", i6.line))?;
        let prefix = i6.attr("prefix").unwrap_or("64");
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| (1..=127).contains(p))
            .ok_or_else(|| format!("{file}:{}: invalid prefix {prefix:?}", i6.line))?;
        t.push_str(&format!("gateway6 = {}\n", q(&format!("{addr}/{prefix}"))));
    }
    if let Some(m) = net.child("mtu") {
        let size = m.attr("size").unwrap_or("");
        let max = vunet_switch::MAX_MTU;
        size.parse::<u16>()
            .ok()
            .filter(|s| (68..=max).contains(s))
            .ok_or_else(|| format!("{file}:{}: invalid mtu size {size:?} (68 to {max})", m.line))?;
        t.push_str(&format!("mtu = {size}\n"));
    }

    // DHCP: the first range and every static host.
    if let Some(dhcp) = ip.and_then(|i| i.child("dhcp")) {
        let ranges: Vec<&Element> = dhcp.all("range").collect();
        if let Some(r) = ranges.first() {
            let (s, e) = (r.attr("start").unwrap_or(""), r.attr("end").unwrap_or(""));
            t.push_str(&format!("[network.dhcp]\nrange = [{}, {}]\n", q(s), q(e)));
            if let Some(l) = r.child("lease") {
                let unit = l.attr("unit").unwrap_or("minutes");
                let secs = match (l.attr("expiry").map(|x| (x, x.parse::<u64>())), unit) {
                    (Some((_, Ok(x))), "seconds") => Some(x),
                    (Some((x, Ok(n))), u @ ("minutes" | "hours")) => {
                        let per = if u == "minutes" { 60 } else { 3600 };
                        Some(n.checked_mul(per).ok_or_else(|| format!("{file}:{}: lease expiry {x} {u} is too long", l.line))?)
                    }
                    _ => None,
                };
                match secs {
                    Some(s) if s > 0 => t.push_str(&format!("lease_time = {s}\n")),
                    _ => warn(l.line, "an infinite or unreadable <lease> is not supported; the default lease time is used".into()),
                }
            }
        } else {
            warn(dhcp.line, "<dhcp> without a <range> serves only static hosts in libvirt; vunet needs a range, so DHCP is off".into());
        }
        for extra in ranges.iter().skip(1) {
            warn(extra.line, "only the first DHCP <range> is used".into());
        }
        let hosts: Vec<String> = dhcp
            .all("host")
            .filter_map(|h| {
                let (mac, hip) = (h.attr("mac")?, h.attr("ip")?);
                let name = h.attr("name").map(|n| format!(", name = {}", q(n))).unwrap_or_default();
                Some(format!("{{ mac = {}, ip = {}{name} }}", q(mac), q(hip)))
            })
            .collect();
        for h in dhcp.all("host").filter(|h| h.attr("mac").is_none() || h.attr("ip").is_none()) {
            warn(h.line, "a DHCP <host> without both mac and ip is not supported; ignored".into());
        }
        if !ranges.is_empty() && !hosts.is_empty() {
            t.push_str(&format!("hosts = [\n  {},\n]\n", hosts.join(",\n  ")));
        }
        for b in dhcp.all("bootp") {
            warn(b.line, "<bootp> (network boot) is not supported; ignored".into());
        }
    }

    if let Some(d6) = ip6.and_then(|i| i.child("dhcp")) {
        match d6.all("range").next() {
            Some(r) => t.push_str(&format!(
                "[network.dhcp6]\nrange = [{}, {}]\n",
                q(r.attr("start").unwrap_or("")),
                q(r.attr("end").unwrap_or(""))
            )),
            None => warn(d6.line, "IPv6 <dhcp> without a <range> is not imported; guests use SLAAC".into()),
        }
        for h in d6.all("host") {
            warn(h.line, "IPv6 DHCP <host> entries name a DUID or a host name; vunet's [network.dhcp6] hosts are by MAC: ignored".into());
        }
    }
    if net.child("port").is_some_and(|p| p.attr("isolated") == Some("yes")) {
        t.push_str("# <port isolated='yes'/>: give every [[network.port]] here `isolated = true`.\n");
        warn(
            net.child("port").map(|p| p.line).unwrap_or(0),
            "<port isolated='yes'/> is per port in vunet: add `isolated = true` to each [[network.port]]".into(),
        );
    }

    // DNS: domain, static hosts, forwarders.
    let dns = net.child("dns");
    let domain = net.child("domain").and_then(|d| d.attr("name"));
    if ip.is_some() && (dns.is_some() || domain.is_some()) {
        t.push_str("[network.dns]\n");
        if let Some(d) = domain {
            t.push_str(&format!("domain = {}\n", q(d)));
        }
        if let Some(dns) = dns {
            if dns.attr("enable") == Some("no") {
                warn(dns.line, "<dns enable='no'>: vunet's gateway always answers DNS; local answers only are kept".into());
            }
            let hosts: Vec<String> = dns
                .all("host")
                .flat_map(|h| {
                    let hip = h.attr("ip").unwrap_or("").to_string();
                    h.all("hostname").map(move |n| format!("{{ name = {}, ip = {} }}", q(n.text.trim()), q(&hip))).collect::<Vec<_>>()
                })
                .collect();
            if !hosts.is_empty() {
                t.push_str(&format!("hosts = [\n  {},\n]\n", hosts.join(",\n  ")));
            }
            let fwd: Vec<String> = dns.all("forwarder").filter_map(|f| f.attr("addr")).map(q).collect();
            for f in dns.all("forwarder").filter(|f| f.attr("addr").is_none()) {
                warn(f.line, "a <forwarder> for a domain only is not supported; ignored".into());
            }
            if !fwd.is_empty() {
                t.push_str(&format!("forwarders = [{}]\n", fwd.join(", ")));
            }
            for what in ["txt", "srv"] {
                for x in dns.all(what) {
                    warn(x.line, format!("DNS <{what}> records are not supported; ignored"));
                }
            }
        }
        if let Some(d) = net.child("domain").filter(|d| d.attr("localOnly").is_some()) {
            warn(d.line, "<domain localOnly> is what vunet always does (names under the domain are never forwarded)".into());
        }
    } else if let Some(d) = dns.or(net.child("domain")) {
        warn(d.line, "DNS needs a gateway <ip>; ignored".into());
    }

    if let Some((kind, dev)) = &uplink {
        t.push_str(&format!("[network.uplink]\nkind = {}\ninterface = {}\n", q(kind), q(dev)));
    }
    // VLANs: libvirt honours <vlan> on OVS bridges (and hostdev/macvtap passthrough) only. A
    // bridged network's own <vlan> is what every guest port gets: one tag puts all of them on
    // that VLAN of the LAN (vunet: the uplink's `vlan`), a trunk carries the tags to the guests
    // (the uplink's `trunk`; the ports need it too). vunet imports no ports: a <portgroup>'s
    // <vlan> becomes a commented port template to copy.
    if let Some(v) = net.child("vlan") {
        let spec = vlan_spec(v, file)?;
        if mode != "bridge" {
            warn(
                v.line,
                format!("<vlan> on a {mode} network is not supported (libvirt itself takes it on bridged OVS networks only); ignored"),
            );
        } else if !spec.trunk {
            t.push_str(&format!("vlan = {}\n", spec.tags[0]));
        } else {
            t.push_str(&format!("trunk = [{}]\n", spec.list()));
            warn(
                v.line,
                format!(
                    "<vlan trunk='yes'>: the uplink carries VLANs {} tagged; give each guest port `{}` as well",
                    spec.list(),
                    spec.port_keys().trim_end().replace('\n', ", ")
                ),
            );
        }
    }
    if let Some(b) = net.child("bridge") {
        if mode != "bridge" {
            warn(
                b.line,
                format!(
                    "<bridge name='{}'> is not created: vunet needs no kernel bridge (guests attach through vhost-user sockets)",
                    b.attr("name").unwrap_or("")
                ),
            );
        }
    }
    // `<forward mode='nat'>` alone is libvirt's default network: NAT through the host's own
    // addresses. vunet does that with the host's sockets (socket NAT, no uplink). With a `dev=`
    // the NAT is meant to leave by one interface: that is uplink NAT, which needs an address on
    // that LAN, so the uplink is left for the user to complete, and what only uplink NAT takes
    // (a port range, routes behind guests) is written as comments for then.
    let dev = forward.and_then(|f| f.attr("dev"));
    let socket_nat = mode == "nat" && dev.is_none();
    let pending_uplink = mode == "nat" && dev.is_some();
    if let Some(f) = forward {
        if mode == "route" || (mode == "nat" && dev.is_some()) {
            warn(
                f.line,
                format!(
                    "forward mode '{mode}': vunet routes through an uplink of its own: add [network.uplink] with kind, interface{} and address (\"dhcp\" or a static one){}",
                    dev.map(|d| format!(", e.g. interface = \"{d}\"")).unwrap_or_default(),
                    if mode == "nat" { "; until then the guests go out through the host's sockets (socket NAT)" } else { "" }
                ),
            );
        }
        if let Some(n) = f.child("nat").filter(|_| mode == "nat") {
            if let Some(p) = n.child("port") {
                match (p.attr("start").and_then(|v| v.parse::<u16>().ok()), p.attr("end").and_then(|v| v.parse::<u16>().ok())) {
                    // libvirt's own default range says nothing socket NAT must honour.
                    (Some(1024), Some(65535)) if socket_nat => {}
                    (Some(_), Some(_)) if socket_nat => warn(
                        p.line,
                        "<nat><port> is not used: through the host's sockets, the host's kernel picks the source ports; ignored".into(),
                    ),
                    // Uplink NAT's port range, for when the uplink is added (a nat network
                    // without one refuses `ports`).
                    (Some(lo), Some(hi)) if lo > 0 && lo <= hi => {
                        t.push_str(&format!("# With [network.uplink] added:\n# [network.nat]\n# ports = [{lo}, {hi}]\n"))
                    }
                    _ => warn(p.line, "<nat><port> needs start and end ports; ignored".into()),
                }
            }
            for x in n.all("address") {
                let what = if socket_nat {
                    "<nat><address> ranges are not supported: socket NAT's connections leave from the host's own addresses"
                } else {
                    "<nat><address> ranges are not supported: vunet masquerades to its one uplink address"
                };
                warn(x.line, what.into());
            }
            if n.attr("ipv6").is_some() {
                warn(n.line, "<nat ipv6>: vunet routes IPv6, it does not masquerade it; ignored".into());
            }
        }
    }
    // Networks behind guests (libvirt <route>): for the networks vunet routes.
    for r in net.all("route") {
        let gw = r.attr("gateway").unwrap_or("");
        let addr = r.attr("address").unwrap_or("");
        if r.attr("family").is_some_and(|f| f == "ipv6") || addr.contains(':') {
            warn(r.line, "IPv6 <route> is not supported; ignored".into());
        } else if !matches!(mode, "nat" | "route") {
            warn(r.line, "<route> needs a nat or route network; ignored".into());
        } else if socket_nat {
            warn(r.line, "<route> needs a router with an uplink: socket NAT carries the guests' own subnet only; ignored".into());
        } else {
            let route = format!("[[network.route]]\naddress = {}\nvia = {}\n", q(&format!("{addr}/{}", prefix_of(r, file)?)), q(gw));
            if pending_uplink {
                t.push_str("# With [network.uplink] added:\n");
                t.push_str(&route.lines().map(|l| format!("# {l}\n")).collect::<String>());
            } else {
                t.push_str(&route);
            }
        }
    }
    let known =
        ["name", "uuid", "forward", "bridge", "mtu", "domain", "dns", "ip", "mac", "route", "port", "vlan", "portgroup", "bandwidth"];
    if let Some(m) = net.child("mac") {
        warn(m.line, "<mac> of the bridge is not used: the gateway's MAC is derived from the network name".into());
    }
    for c in net.children.iter().filter(|c| !known.contains(&c.name.as_str())) {
        warn(c.line, format!("<{}> is not supported; ignored", c.name));
    }
    let isolated = net.child("port").is_some_and(|p| p.attr("isolated") == Some("yes"));
    for pg in net.all("portgroup") {
        let pname = pg.attr("name").unwrap_or("");
        // What a guest port of this group gets: its VLAN, its limits, the network's isolation.
        let mut keys = String::new();
        if let Some(v) = pg.child("vlan") {
            keys.push_str(&vlan_spec(v, file)?.port_keys());
        }
        if isolated {
            keys.push_str("isolated = true\n");
        }
        if let Some(bw) = pg.child("bandwidth") {
            keys.push_str(&bandwidth_keys(bw, file)?);
        }
        if keys.is_empty() {
            warn(pg.line, format!("<portgroup name='{pname}'> is not supported (vunet has no port groups); ignored"));
            continue;
        }
        t.push_str(&format!(
            "\n# <portgroup name='{pname}'>: a guest port of it would be\n# [[network.port]]\n# name = \"...\"\n# socket = \"....sock\"\n{}",
            keys.lines().map(|l| format!("# {l}\n")).collect::<String>()
        ));
        warn(
            pg.line,
            format!("<portgroup name='{pname}'>: vunet has no port groups; its settings are written as a commented port template"),
        );
    }
    if let Some(bw) = net.child("bandwidth") {
        warn(
            bw.line,
            "a network-wide <bandwidth> (one limit all guests share) is not supported; limits are per port: [network.port.bandwidth]; ignored".into(),
        );
    }
    t.push_str("\n# Guests attach through vhost-user sockets: add [[network.port]] tables here, or use\n# `vunet port-add NETWORK NAME` on the running daemon.\n");
    Ok(Imported { toml: t, warnings })
}

/// A `<bandwidth>`'s `<inbound>` and `<outbound>` as `[network.port.bandwidth]` lines (the same
/// units: kilobytes per second, burst in KiB). `floor` has no meaning without libvirt's
/// network-wide QoS: left out.
fn bandwidth_keys(bw: &Element, file: &str) -> Result<String, String> {
    let mut out = String::new();
    for dir in ["inbound", "outbound"] {
        let Some(e) = bw.child(dir) else { continue };
        let mut parts = Vec::new();
        for k in ["average", "peak", "burst"] {
            if let Some(v) = e.attr(k) {
                let n: u64 = v.parse().map_err(|_| format!("{file}:{}: <{dir} {k}='{v}'> is not a number", e.line))?;
                if !(k == "peak" && dir == "outbound") {
                    parts.push(format!("{k} = {n}"));
                }
            }
        }
        if !parts.is_empty() {
            out.push_str(&format!("{dir} = {{ {} }}\n", parts.join(", ")));
        }
    }
    Ok(if out.is_empty() { out } else { format!("[network.port.bandwidth]\n{out}") })
}

/// A libvirt `<vlan>`: its tags, the native one (and whether it leaves tagged), and whether
/// it is a trunk (`trunk='yes'`, several tags, or a native VLAN).
struct VlanSpec {
    tags: Vec<u16>,
    native: Option<(u16, bool)>,
    trunk: bool,
}

impl VlanSpec {
    fn list(&self) -> String {
        self.tags.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    }
    /// The `[[network.port]]` keys of a port with this VLAN setting.
    fn port_keys(&self) -> String {
        if !self.trunk {
            return format!("vlan = {}\n", self.tags[0]);
        }
        let mut k = format!("trunk = [{}]\n", self.list());
        if let Some((n, tagged)) = self.native {
            k += &format!("native_vlan = {n}\n");
            if tagged {
                k += "native_tagged = true\n";
            }
        }
        k
    }
}

fn vlan_spec(v: &Element, file: &str) -> Result<VlanSpec, String> {
    let mut spec = VlanSpec { tags: Vec::new(), native: None, trunk: v.attr("trunk") == Some("yes") };
    for tag in v.all("tag") {
        let id = tag.attr("id").unwrap_or("");
        let id = id
            .parse::<u16>()
            .ok()
            .filter(|i| (1..=vunet_switch::vlan::MAX_VID).contains(i))
            .ok_or_else(|| format!("{file}:{}: invalid <tag id={id:?}> (a VLAN ID, 1 to 4094)", tag.line))?;
        match tag.attr("nativeMode") {
            None => {}
            Some(m @ ("tagged" | "untagged")) if spec.native.is_none() => spec.native = Some((id, m == "tagged")),
            Some(m @ ("tagged" | "untagged")) => return Err(format!("{file}:{}: a second native <tag nativeMode='{m}'>", tag.line)),
            Some(m) => return Err(format!("{file}:{}: invalid nativeMode {m:?} (tagged or untagged)", tag.line)),
        }
        spec.tags.push(id);
    }
    if spec.tags.is_empty() {
        return Err(format!("{file}:{}: <vlan> without a <tag id=...>", v.line));
    }
    spec.trunk |= spec.tags.len() > 1 || spec.native.is_some();
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode, UplinkKind};
    use std::path::Path;

    fn imported(xml: &str) -> (Config, Vec<String>) {
        let i = import(xml, "net.xml").unwrap();
        (Config::parse(&i.toml, "net.xml", Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{}", i.toml)), i.warnings)
    }

    #[test]
    fn libvirt_default_network() {
        let (c, w) = imported(
            "<network>\n  <name>default</name>\n  <uuid>9a05da11-e96b-47f3-8253-a3a482e445f5</uuid>\n  <forward mode='nat'>\n    <nat><port start='1024' end='65535'/></nat>\n  </forward>\n  <bridge name='virbr0' stp='on' delay='0'/>\n  <mac address='52:54:00:0a:cd:21'/>\n  <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n      <host mac='52:54:00:00:00:10' name='web' ip='192.168.122.10'/>\n    </dhcp>\n  </ip>\n</network>\n",
        );
        let n = &c.networks[0];
        assert_eq!((n.name.as_str(), n.mode, n.gateway), ("default", Mode::Nat, Some((Ipv4Addr::new(192, 168, 122, 1), 24))));
        let d = n.dhcp.as_ref().unwrap();
        assert_eq!(d.range, (Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 254)));
        assert_eq!(d.hosts[0].name.as_deref(), Some("web"));
        assert!(w.iter().any(|l| l.starts_with("net.xml:7:") && l.contains("virbr0")), "{w:?}");
        assert!(!w.iter().any(|l| l.contains("<nat>") || l.contains("<port>")), "libvirt's default port range is no news: {w:?}");
        assert!(n.uplink.is_none() && n.routing.is_none(), "no uplink: NAT through the host's sockets");
        assert_eq!(n.socket_nat, Some(crate::config::SocketNatConfig::default()));
        assert!(!w.iter().any(|l| l.contains("uplink")), "nothing to add for socket NAT: {w:?}");
        assert!(w.iter().any(|l| l.starts_with("net.xml:8:") && l.contains("<mac>")), "{w:?}");
    }

    #[test]
    fn nat_without_dev_is_socket_nat_and_with_dev_awaits_its_uplink() {
        let xml = |fwd: &str| {
            format!("<network><name>d</name>\n{fwd}\n<nat><port start='20000' end='30000'/></nat></forward>\n<ip address='192.168.122.1' prefix='24'/>\n<route address='172.20.0.0' prefix='16' gateway='192.168.122.10'/></network>")
        };
        // No dev=: socket NAT; what only an uplink router could honour is named and dropped.
        let i = import(&xml("<forward mode='nat'>"), "d.xml").unwrap();
        assert!(!i.toml.contains("ports") && !i.toml.contains("network.route"), "{}", i.toml);
        assert_eq!(i.warnings.len(), 2, "{:?}", i.warnings);
        assert!(i.warnings[0].starts_with("d.xml:3: <nat><port> is not used"), "{:?}", i.warnings);
        assert!(i.warnings[1].starts_with("d.xml:5: <route> needs a router with an uplink"), "{:?}", i.warnings);
        let c = Config::parse(&i.toml, "d.toml", Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{}", i.toml));
        assert!(c.networks[0].socket_nat.is_some() && c.networks[0].routing.is_none());
        // dev='eth1': as before, the user is told to add the uplink on eth1; the port range and
        // routes wait as comments, and meanwhile the file runs as socket NAT.
        let i = import(&xml("<forward mode='nat' dev='eth1'>"), "d.xml").unwrap();
        assert!(i.toml.contains("# [network.nat]\n# ports = [20000, 30000]\n"), "{}", i.toml);
        assert!(i.toml.contains("# [[network.route]]\n# address = \"172.20.0.0/16\"\n# via = \"192.168.122.10\"\n"), "{}", i.toml);
        assert_eq!(i.warnings.len(), 1, "{:?}", i.warnings);
        assert!(i.warnings[0].starts_with("d.xml:2: forward mode 'nat': vunet routes through an uplink of its own"), "{:?}", i.warnings);
        assert!(i.warnings[0].contains("interface = \"eth1\""), "{:?}", i.warnings);
        let c = Config::parse(&i.toml, "d.toml", Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{}", i.toml));
        assert!(c.networks[0].socket_nat.is_some());
        // Uncommenting the template, with an uplink, gives uplink NAT with that range and route.
        let done = format!(
            "{}[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth1\"\naddress = \"dhcp\"\n",
            i.toml.replace("# [", "[").replace("# ports", "ports").replace("# address", "address").replace("# via", "via")
        );
        let c = Config::parse(&done, "d.toml", Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{done}"));
        let r = c.networks[0].routing.as_ref().expect("uplink NAT");
        assert_eq!((r.nat.ports, r.routes.len(), c.networks[0].socket_nat.is_none()), ((20000, 30000), 1, true));
        // A route network keeps its routes.
        let i = import("<network><name>r</name><forward mode='route'/><ip address='10.1.0.1' prefix='24'/><route address='172.20.0.0' prefix='16' gateway='10.1.0.10'/></network>", "r.xml").unwrap();
        assert!(i.toml.contains("\n[[network.route]]\n"), "{}", i.toml);
    }

    #[test]
    fn ipv6_address_less_and_isolated_port_networks() {
        let (c, w) = imported(
            "<network><name>six</name><forward mode='nat'/><ip address='192.168.150.1' prefix='24'/>\n\
             <ip family='ipv6' address='fd00:7675:1::1' prefix='64'>\n<dhcp><range start='fd00:7675:1::100' end='fd00:7675:1::1ff'/></dhcp></ip>\n\
             <port isolated='yes'/></network>",
        );
        let n = &c.networks[0];
        assert_eq!(n.gateway6, Some(("fd00:7675:1::1".parse().unwrap(), 64)));
        assert_eq!(
            n.dhcp6.as_ref().and_then(|d| d.range),
            Some(("fd00:7675:1::100".parse().unwrap(), "fd00:7675:1::1ff".parse().unwrap()))
        );
        assert!(w.iter().any(|w| w.contains("isolated = true")), "{w:?}");
        // A network without <ip> is a plain L2 segment.
        let (c, w) = imported("<network><name>seg</name></network>");
        assert_eq!((c.networks[0].mode, c.networks[0].gateway, c.networks[0].dhcp.is_some()), (Mode::Isolated, None, false));
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn routed_isolated_and_bridged_networks() {
        let (c, _) =
            imported("<network><name>r</name><forward mode='route'/><ip address='10.10.0.1' prefix='24'/><mtu size='9000'/></network>");
        assert_eq!((c.networks[0].mode, c.networks[0].mtu), (Mode::Route, 9000));
        let (c, w) = imported(
            "<network><name>iso</name><domain name='lab'/><dns><forwarder addr='192.0.2.53'/><host ip='10.0.0.50'><hostname>files</hostname><hostname>nas</hostname></host></dns><ip address='10.0.0.1' prefix='24'/></network>",
        );
        let n = &c.networks[0];
        assert_eq!(n.mode, Mode::Isolated);
        assert_eq!(n.dns.domain.as_deref(), Some("lab"));
        assert_eq!(n.dns.hosts, vec![("files".to_string(), Ipv4Addr::new(10, 0, 0, 50)), ("nas".to_string(), Ipv4Addr::new(10, 0, 0, 50))]);
        assert_eq!(n.dns.forwarders.as_ref().map(|f| f[0].to_string()), Some("192.0.2.53:53".to_string()));
        assert!(w.is_empty(), "{w:?}");
        let (c, w) = imported("<network><name>host-bridge</name><forward mode='bridge'/><bridge name='br0'/></network>");
        let n = &c.networks[0];
        assert_eq!((n.mode, n.gateway), (Mode::Bridge, None));
        let u = n.uplink.as_ref().unwrap();
        assert_eq!((u.kind, u.interface.as_str()), (UplinkKind::AfPacket, "br0"));
        assert!(w.is_empty(), "{w:?}");
        let (c, _) = imported("<network><name>mv</name><forward mode='passthrough'><interface dev='eth1'/></forward></network>");
        assert_eq!(c.networks[0].uplink.as_ref().map(|u| u.kind), Some(UplinkKind::Macvtap));
    }

    #[test]
    fn mistakes_are_one_line_with_the_place() {
        let e = import("<network><name>x</name>\n<forward mode='hostdev'/><ip address='10.0.0.1' prefix='24'/></network>", "n.xml")
            .unwrap_err();
        assert_eq!(e, "n.xml:2: unknown forward mode \"hostdev\" (expected nat, route, open, bridge, passthrough, private or vepa)");
        let e = import("<network><name>x</name>\n<ip address='10.0.0.1'>\n</network>", "n.xml").unwrap_err();
        assert!(e.starts_with("n.xml:3: malformed XML"), "{e}");
        let e = import("<network><name>x</name><forward mode='nat'/></network>", "n.xml").unwrap_err();
        assert!(e.contains("a nat network needs an <ip"), "{e}");
        assert!(import("<domain/>", "n.xml").unwrap_err().contains("expected a libvirt <network>"));
        assert!(import("", "n.xml").is_err());
        assert!(import("<network><name>x</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>", "n.xml")
            .unwrap_err()
            .contains("netmask"));
    }

    #[test]
    fn deep_nesting_is_one_line_naming_the_place() {
        let mut xml = String::from("<network><name>x</name><ip address='10.0.0.1' prefix='24'/>\n");
        for _ in 0..70 {
            xml.push_str("<a>\n");
        }
        xml.push_str(&"</a>".repeat(70));
        xml.push_str("</network>");
        // <network> is level 1, so the 64th <a> is the 65th level, on line 65.
        assert_eq!(import(&xml, "deep.xml").unwrap_err(), "deep.xml:65: XML nested deeper than 64 elements");
        // Sixty-four levels are fine (an unknown element, named in a warning).
        let ok = format!("<network><name>x</name><ip address='10.0.0.1' prefix='24'/>{}{}</network>", "<a>".repeat(63), "</a>".repeat(63));
        assert_eq!(import(&ok, "deep.xml").unwrap().warnings.len(), 1);
    }

    #[test]
    fn line_numbers_come_from_one_index_of_the_newlines() {
        // The index is built once per file (one pass); each element's line is a binary search
        // in it. Before, each element counted newlines from the start of the file: 200,000
        // lines took minutes. (No time limit here: performance belongs in benchmarks.)
        let lines = Lines::of("a\nbb\n\nccc");
        let at: Vec<usize> = [0, 1, 2, 3, 4, 5, 6, 7, 9].iter().map(|&o| lines.at(o)).collect();
        assert_eq!(at, [1, 1, 2, 2, 2, 3, 4, 4, 4]);
        let mut xml = String::from("<network><name>x</name><ip address='10.0.0.1' prefix='24'/>\n");
        for _ in 0..200_000 {
            xml.push_str("<unknown-thing/>\n");
        }
        xml.push_str("</network>\n");
        let w = import(&xml, "big.xml").unwrap().warnings;
        assert_eq!(w.len(), 200_000);
        assert!(w[199_999].starts_with("big.xml:200001: <unknown-thing>"), "{}", w[199_999]);
    }

    #[test]
    fn lease_units_and_mtu_are_range_checked() {
        let net = |inner: &str| {
            format!("<network><name>x</name><ip address='10.0.0.1' prefix='24'>\n<dhcp><range start='10.0.0.2' end='10.0.0.9'>\n{inner}</range></dhcp></ip></network>")
        };
        let e = import(&net("<lease expiry='18446744073709551' unit='hours'/>"), "l.xml").unwrap_err();
        assert_eq!(e, "l.xml:3: lease expiry 18446744073709551 hours is too long");
        let e = import(&net("<lease expiry='307445734561825861' unit='minutes'/>"), "l.xml").unwrap_err();
        assert!(e.starts_with("l.xml:3: lease expiry"), "{e}");
        assert!(import(&net("<lease expiry='2' unit='hours'/>"), "l.xml").unwrap().toml.contains("lease_time = 7200\n"));
        let e = import("<network><name>x</name><forward mode='bridge'/><bridge name='br0'/>\n<mtu size='65535'/></network>", "m.xml")
            .unwrap_err();
        assert_eq!(e, "m.xml:2: invalid mtu size \"65535\" (68 to 65415)");
        assert!(import("<network><name>x</name><forward mode='bridge'/><bridge name='br0'/><mtu size='65415'/></network>", "m.xml")
            .unwrap()
            .toml
            .contains("mtu = 65415\n"));
    }

    #[test]
    fn vlans_of_bridged_networks_and_portgroups() {
        use vunet_switch::vlan::PortVlan;
        let (c, w) = imported("<network><name>v</name><forward mode='bridge'/><bridge name='br0'/><vlan><tag id='100'/></vlan></network>");
        assert_eq!(c.networks[0].uplink.as_ref().unwrap().vlan, PortVlan::Outer(100));
        assert!(w.is_empty(), "{w:?}");
        let (c, w) = imported(
            "<network><name>t</name><forward mode='bridge'/><bridge name='br0'/>\n<vlan trunk='yes'><tag id='10' nativeMode='untagged'/><tag id='20'/></vlan>\n\
             <portgroup name='web'><vlan><tag id='42'/></vlan></portgroup><portgroup name='tr'><vlan trunk='yes'><tag id='7' nativeMode='tagged'/></vlan></portgroup></network>",
        );
        assert_eq!(
            c.networks[0].uplink.as_ref().unwrap().vlan,
            PortVlan::Trunk { vids: [10, 20].into_iter().collect(), native: None, native_tagged: false }
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("net.xml:2: <vlan trunk='yes'>") && w[0].contains("`trunk = [10, 20], native_vlan = 10`"), "{w:?}");
        let i = import(
            "<network><name>t</name><forward mode='bridge'/><bridge name='br0'/><portgroup name='web'><vlan><tag id='42'/></vlan></portgroup>\
             <portgroup name='tr'><vlan trunk='yes'><tag id='7' nativeMode='tagged'/></vlan></portgroup></network>",
            "n.xml",
        )
        .unwrap();
        assert!(i.toml.contains("# <portgroup name='web'>: a guest port of it would be\n# [[network.port]]\n# name = \"...\"\n# socket = \"....sock\"\n# vlan = 42\n"), "{}", i.toml);
        assert!(i.toml.contains("# trunk = [7]\n# native_vlan = 7\n# native_tagged = true\n"), "{}", i.toml);
        // A VLAN on a network libvirt itself does not tag (a Linux bridge, nat) is named.
        let (_, w) = imported("<network><name>n</name><ip address='10.0.0.1' prefix='24'/><vlan><tag id='5'/></vlan></network>");
        assert!(w.iter().any(|x| x.contains("<vlan> on a isolated network is not supported")), "{w:?}");
        for (xml, want) in [
            ("<network><name>b</name><forward mode='bridge'/><bridge name='br0'/>\n<vlan><tag id='4095'/></vlan></network>", "n.xml:2: invalid <tag id=\"4095\">"),
            ("<network><name>b</name><forward mode='bridge'/><bridge name='br0'/>\n<vlan></vlan></network>", "n.xml:2: <vlan> without a <tag id=...>"),
            ("<network><name>b</name><forward mode='bridge'/><bridge name='br0'/><vlan>\n<tag id='4' nativeMode='maybe'/></vlan></network>", "n.xml:2: invalid nativeMode \"maybe\""),
        ] {
            let e = import(xml, "n.xml").unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn portgroup_bandwidth_and_isolation_become_a_port_template() {
        let i = import(
            "<network><name>q</name><ip address='10.0.0.1' prefix='24'/><port isolated='yes'/>\n\
             <portgroup name='tenant'><bandwidth><inbound average='12500' peak='25000' burst='1024'/><outbound average='12500' peak='9'/></bandwidth></portgroup></network>",
            "n.xml",
        )
        .unwrap();
        let want = "# [[network.port]]\n# name = \"...\"\n# socket = \"....sock\"\n# isolated = true\n# [network.port.bandwidth]\n\
                    # inbound = { average = 12500, peak = 25000, burst = 1024 }\n# outbound = { average = 12500 }\n";
        assert!(i.toml.contains(want), "{}", i.toml);
        // The template, uncommented with a name and socket, is a valid port.
        let port: String = want
            .lines()
            .map(|l| l.trim_start_matches("# ").to_string() + "\n")
            .collect::<String>()
            .replace("\"...\"", "\"t\"")
            .replace("\"....sock\"", "\"t.sock\"");
        let c = Config::parse(&format!("{}{port}", i.toml), "n.toml", Path::new("/")).unwrap();
        let p = &c.networks[0].ports[0];
        assert!(p.isolated && p.bandwidth.inbound.is_some() && p.bandwidth.outbound.is_some_and(|o| o.peak.is_none()));
    }

    #[test]
    fn unknown_elements_are_named() {
        let i = import("<network><name>x</name><ip address='10.0.0.1' prefix='24'/><bandwidth/><portgroup name='p'/></network>", "n.xml")
            .unwrap();
        assert_eq!(i.warnings.len(), 2, "{:?}", i.warnings);
        assert!(i.warnings.iter().any(|w| w.contains("network-wide <bandwidth>")), "{:?}", i.warnings);
    }
}
