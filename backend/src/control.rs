//! The control socket: a unix socket (owner-only, or owner and one group) on which the running
//! daemon answers one request per connection. A request is one line of JSON
//! (`{"cmd":"port-list","network":"default"}`); the answer is one JSON document,
//! `{"ok": ...}` or `{"error": "..."}`. The `vunet` subcommands are its clients and print the
//! answers as tables, or as they are with `--json`. `capture` is the one streaming request:
//! after its `{"ok":...}` line come pcap bytes until the client hangs up.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::warn;
use vunet_switch::counters::DropReason;
use vunet_switch::{format_mac, parse_mac};

use crate::config::{io_reason, PortConfig, PortMode};
use crate::datapath::{unix_now, Network, Port, PortKind};
use crate::ports::vhost::conn::bind_private;
use crate::runtime::{PortError, StartError, Supervisor};
use crate::services::socknat::{FlowInfo, SocketNat};

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    NetList,
    PortList { network: String },
    DhcpLeases { network: String },
    PortAdd { network: String, name: String, socket: Option<PathBuf>, mac: Option<String>, mode: Option<String> },
    PortDel { network: String, name: String },
    Capture { network: String, port: String },
}

/// Binds the control socket (refusing one a live daemon is using): mode 0600, or 0660 with
/// `group` as its group. What is at the path is looked at without following a link: a stale
/// socket is replaced, anything else is refused and left alone. The socket is bound in a new
/// private (0700) directory next to the path, given its group and mode there, and only then
/// renamed into place: nobody can connect to it, or swap it for a link, before that.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |reason: String| StartError::Control { path: path.to_path_buf(), reason };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(io_reason(&e)))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(err("in use by another vunet".into()));
            }
        }
        Ok(_) => return Err(err("exists and is not a socket (vunet leaves it alone; remove it or choose another path)".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(io_reason(&e))),
    }
    let gid = match group {
        Some(g) => Some(crate::config::group_id(g).ok_or_else(|| err(format!("no group named {g:?}")))?),
        None => None,
    };
    bind_private(path, if gid.is_some() { 0o660 } else { 0o600 }, gid).map_err(|(step, e)| err(format!("{step}{}", io_reason(&e))))
}

/// Serves requests for as long as the daemon runs, each on a short-lived thread (a capture
/// streams for as long as its client listens).
pub fn serve(listener: UnixListener, shared: Arc<Supervisor>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let s = shared.clone();
        let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || handle(conn, &s));
    }
}

fn handle(mut conn: UnixStream, shared: &Arc<Supervisor>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    // A bounded read: a request is one short line.
    if BufReader::new((&conn).take(4096)).read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Capture { network, port }) => match find_port(shared, &network, &port) {
            Ok(p) => return crate::capture::stream(conn, &p),
            Err(e) => json!({ "error": e.to_string() }),
        },
        Ok(req) => match answer(req, shared) {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "error": e.to_string() }),
        },
        Err(e) => json!({ "error": format!("bad request: {e}") }),
    };
    if conn.write_all(format!("{reply}\n").as_bytes()).is_err() {
        warn!("control socket: client went away");
    }
}

/// Why a request was refused: the one line the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("invalid port name {0:?} (letters, digits, '-', '_', '.', at most 64)")]
    PortName(String),
    #[error("invalid MAC address {0:?}")]
    Mac(String),
    #[error("unknown port mode {0:?} (expected server or client)")]
    PortMode(String),
    #[error("network {0:?} has no DHCP server")]
    NoDhcp(String),
    #[error("capture streams; it is not answered here")]
    Streams,
    #[error(
        "socket {} is outside the socket directory {} (port-add creates and connects to sockets only there; socket_dir in the configuration sets it)",
        path.display(),
        dir.display()
    )]
    SocketOutside { path: PathBuf, dir: PathBuf },
    #[error("socket {}: {reason}", path.display())]
    Socket { path: PathBuf, reason: String },
}

/// The socket a run-time port may use: `socket` (relative: in `dir`) when it lies in the socket
/// directory `dir` or below it, with `..` resolved and every link of its directory followed
/// (a link out of `dir` is outside), and is not itself a link; the empty path (the supervisor
/// then names one in `dir`) when none is given. Anything else is refused, naming `dir`.
pub fn confine_socket(dir: &Path, socket: Option<PathBuf>) -> Result<PathBuf, ControlError> {
    use std::path::Component;
    let Some(socket) = socket.filter(|s| !s.as_os_str().is_empty()) else { return Ok(PathBuf::new()) };
    let outside = || ControlError::SocketOutside { path: socket.clone(), dir: dir.to_path_buf() };
    let fail = |e: std::io::Error, p: &Path| ControlError::Socket { path: p.to_path_buf(), reason: io_reason(&e) };
    let real_dir = dir.canonicalize().map_err(|e| fail(e, dir))?;
    let joined = if socket.is_absolute() { socket.clone() } else { real_dir.join(&socket) };
    // `..` resolved by the names first, so a path that says it leaves is refused as such
    // even where its directories do not exist.
    let plain = |p: &Path| {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    };
    let named = plain(&joined);
    if !named.starts_with(&real_dir) && !std::path::absolute(dir).is_ok_and(|d| named.starts_with(plain(&d))) {
        return Err(outside());
    }
    let (Some(parent), Some(name)) = (named.parent(), named.file_name()) else { return Err(outside()) };
    let real_parent = parent.canonicalize().map_err(|e| fail(e, &socket))?;
    if !real_parent.starts_with(&real_dir) {
        return Err(outside());
    }
    let path = real_parent.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            Err(ControlError::Socket { path: socket.clone(), reason: "is a symbolic link (port-add follows none)".into() })
        }
        _ => Ok(path),
    }
}

fn find(shared: &Supervisor, name: &str) -> Result<Arc<Network>, PortError> {
    shared.network(name).ok_or_else(|| PortError::NoNetwork(name.to_string()))
}

fn find_port(shared: &Supervisor, network: &str, port: &str) -> Result<Arc<Port>, PortError> {
    let n = find(shared, network)?;
    n.port(port).ok_or_else(|| PortError::NoPort { network: network.to_string(), port: port.to_string() })
}

/// The answer to one request.
pub fn answer(req: Request, shared: &Arc<Supervisor>) -> Result<Value, ControlError> {
    match req {
        Request::NetList => {
            Ok(Value::Array(shared.networks().iter().map(|n| net_info(n, shared.socket_nat(&n.name).as_deref())).collect()))
        }
        Request::PortList { network } => {
            let net = find(shared, &network)?;
            let flows = shared.socket_nat(&network).map(|s| s.flows());
            Ok(Value::Array(
                net.live_ports()
                    .iter()
                    .map(|p| {
                        let mut v = port_info(p);
                        // A routed uplink's IPv6 addresses are the router's (address6 and
                        // its link-local).
                        if let (PortKind::Uplink, Some(r6)) = (p.kind, net.router6.as_ref()) {
                            let r6 = r6.lock().unwrap_or_else(|e| e.into_inner());
                            v["ipv6"] = json!([r6.cfg.outside.0.to_string(), r6.outside_link_local().to_string()]);
                        }
                        if let Some(flows) = &flows {
                            v["nat_flows"] = port_flows(p, flows);
                        }
                        v
                    })
                    .collect(),
            ))
        }
        Request::DhcpLeases { network } => dhcp_leases(&*find(shared, &network)?),
        Request::PortAdd { network, name, socket, mac, mode } => {
            let net = find(shared, &network)?;
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(ControlError::PortName(name));
            }
            let mac = match mac {
                Some(m) => Some(parse_mac(&m).filter(|m| !vunet_switch::is_multicast(m) && *m != [0; 6]).ok_or(ControlError::Mac(m))?),
                None => None,
            };
            let mode = match mode.as_deref() {
                None | Some("server") => PortMode::Server,
                Some("client") => PortMode::Client,
                Some(other) => return Err(ControlError::PortMode(other.to_string())),
            };
            // Sockets in the configuration file are the operator's; a control client's stay in
            // the socket directory.
            let socket = confine_socket(&shared.socket_dir, socket)?;
            let cfg = PortConfig {
                name,
                socket,
                tap: None,
                mode,
                mac,
                port_security: None,
                queues: 1,
                socket_mode: None,
                socket_group: None,
                isolated: false,
                bandwidth: Default::default(),
                vlan: Default::default(),
            };
            let port = shared.add_port(&net, cfg)?;
            Ok(port_info(&port))
        }
        Request::PortDel { network, name } => {
            let net = find(shared, &network)?;
            shared.remove_port(&net, &name)?;
            Ok(json!({ "removed": name }))
        }
        Request::Capture { .. } => Err(ControlError::Streams),
    }
}

/// A port's socket-NAT flows: `{"tcp": n, "udp": n, "icmp": n, "flows": [...]}`.
fn port_flows(p: &Port, flows: &[FlowInfo]) -> Value {
    let mine: Vec<&FlowInfo> = flows.iter().filter(|f| f.port == p.id).collect();
    let count = |proto: &str| mine.iter().filter(|f| f.proto == proto).count();
    json!({
        "tcp": count("tcp"),
        "udp": count("udp"),
        "icmp": count("icmp"),
        "flows": mine.iter().map(|f| json!({ "proto": f.proto, "guest": f.guest.to_string(), "remote": f.remote.to_string(), "state": f.state })).collect::<Vec<_>>(),
    })
}

fn net_info(n: &Network, socknat: Option<&SocketNat>) -> Value {
    let ports = n.live_ports();
    let uplink = ports
        .iter()
        .find(|p| p.kind == PortKind::Uplink)
        .and_then(|p| p.link.as_ref())
        .map(|l| l.describe())
        .map(|(kind, interface)| format!("{kind} {interface}"));
    // A routed network's uplink address (none until a DHCP lease comes) and NAT connections.
    let (uplink_address, nat_connections) = match n.router.as_ref() {
        Some(r) => {
            let r = r.lock().unwrap_or_else(|e| e.into_inner());
            (r.outside().map(|(ip, p)| format!("{ip}/{p}")), Some(r.nat.len()))
        }
        None => (None, None),
    };
    let uplink_address6 = n.router6.as_ref().map(|r| {
        let c = &r.lock().unwrap_or_else(|e| e.into_inner()).cfg;
        format!("{}/{}", c.outside.0, c.outside.1)
    });
    let socket_nat = socknat.map(|s| {
        let sum = s.summary();
        let drops: serde_json::Map<String, Value> =
            sum.drops.iter().filter(|(_, n)| *n > 0).map(|(k, n)| (k.to_string(), json!(n))).collect();
        json!({
            "tcp_flows": sum.tcp_flows,
            "udp_flows": sum.udp_flows,
            "icmp_flows": sum.icmp_flows,
            "ipv6_flows": sum.tcp6_flows + sum.udp6_flows + sum.icmp6_flows,
            "refused": sum.refused,
            "unreachable": sum.unreachable,
            "forward_accepted": sum.forward_accepted,
            "bytes_to_host": sum.bytes_to_host,
            "bytes_to_guest": sum.bytes_to_guest,
            "drops": drops,
        })
    });
    json!({
        "name": n.name,
        "mode": n.mode.name(),
        "socket_nat": socket_nat,
        "gateway": n.gateway.map(|g| format!("{}/{}", g.ip, g.prefix)),
        "mtu": n.mtu,
        "uplink": uplink,
        "uplink_address": uplink_address,
        "uplink_address6": uplink_address6,
        "nat_connections": nat_connections,
        "ports": ports.len(),
        "connected": ports.iter().filter(|p| p.connected.load(Ordering::Relaxed)).count(),
        "state": "active",
    })
}

fn port_info(p: &Port) -> Value {
    let c = p.counters.snapshot();
    let drops: serde_json::Map<String, Value> =
        DropReason::ALL.iter().zip(c.drops.iter()).filter(|(_, &n)| n > 0).map(|(r, &n)| (r.name().to_string(), json!(n))).collect();
    let (kind, attach) = match (p.kind, p.link.as_ref().map(|l| l.describe())) {
        (PortKind::Uplink, Some((link, interface))) => (format!("uplink {link}"), interface),
        (_, Some((_, interface))) => ("tap".to_string(), interface),
        (_, None) => ("vhost-user".to_string(), p.socket.display().to_string()),
    };
    json!({
        "name": p.name,
        "kind": kind,
        "socket": if p.link.is_none() { Some(attach.clone()) } else { None },
        "interface": if p.link.is_some() { Some(attach) } else { None },
        "mode": if p.mode == PortMode::Server { "server" } else { "client" },
        "mac": p.locked_mac().map(|m| format_mac(&m)),
        "ip": p.leased_ip().map(|i| i.to_string()),
        "ipv6": p.ipv6_addresses().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "connected": p.connected.load(Ordering::Relaxed),
        "features": crate::ports::vhost::device::feature_names(p.features.load(Ordering::Relaxed)),
        "rx_frames": c.rx_frames,
        "rx_bytes": c.rx_bytes,
        "tx_frames": c.tx_frames,
        "queues": p.queues.iter().map(|q| json!({ "to_guest": q.to_guest.load(Ordering::Relaxed), "from_guest": q.from_guest.load(Ordering::Relaxed) })).collect::<Vec<_>>(),
        "tx_bytes": c.tx_bytes,
        "drops": drops,
        "isolated": p.isolated,
        "bandwidth": {
            "inbound": p.bandwidth.inbound.map(|l| json!({ "average": l.average, "peak": l.peak, "burst": l.burst })),
            "outbound": p.bandwidth.outbound.map(|l| json!({ "average": l.average, "peak": l.peak, "burst": l.burst })),
        },
        // `untagged`, `access 10`, `trunk 10,20 native 10`, `vlan 100 of the LAN`.
        "vlan": p.vlan.describe(),
        "vxlan": p.link.as_ref().and_then(|l| l.tunnel()).map(|t| json!({
            "vni": t.vni,
            "local": t.local,
            "remotes": t.remotes,
            "group": t.group,
            "learned": t.learned.iter().map(|(mac, remote, age)| json!({ "mac": mac, "remote": remote, "age_s": age })).collect::<Vec<_>>(),
            "evicted": t.evicted,
        })),
    })
}

/// The network's DHCP leases, IPv4 then IPv6 (those with the client's `duid` in hex and `iaid`).
fn dhcp_leases(n: &Network) -> Result<Value, ControlError> {
    if n.dhcp.is_none() && n.dhcp6.is_none() {
        return Err(ControlError::NoDhcp(n.name.clone()));
    }
    let now = unix_now();
    let mut rows: Vec<Value> = Vec::new();
    if let Some(dhcp) = &n.dhcp {
        let leases = dhcp.lock().unwrap_or_else(|e| e.into_inner()).leases(now);
        rows.extend(leases.iter().map(
            |l| json!({ "mac": format_mac(&l.mac), "ip": l.ip.to_string(), "name": l.hostname, "expires": l.expires, "expires_utc": utc(l.expires) }),
        ));
    }
    if let Some(dhcp6) = &n.dhcp6 {
        let leases = dhcp6.lock().unwrap_or_else(|e| e.into_inner()).leases(now);
        rows.extend(leases.iter().map(|l| {
            let duid: String = l.duid.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "mac": format_mac(&l.mac), "ip": l.ip.to_string(), "name": l.hostname, "expires": l.expires, "expires_utc": utc(l.expires), "duid": duid, "iaid": l.iaid })
        }));
    }
    Ok(Value::Array(rows))
}

/// Renders an answer as the table the CLI prints without `--json`.
pub fn render(req: &Request, v: &Value) -> String {
    let s = |v: &Value, k: &str| match &v[k] {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let rows = v.as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    match req {
        Request::NetList => {
            out.push_str(&format!("{:<16} {:<9} {:<20} {:<22} {:<8} {}\n", "NAME", "MODE", "GATEWAY", "UPLINK", "STATE", "PORTS"));
            for n in &rows {
                out.push_str(&format!(
                    "{:<16} {:<9} {:<20} {:<22} {:<8} {}/{} connected\n",
                    s(n, "name"),
                    s(n, "mode"),
                    s(n, "gateway"),
                    s(n, "uplink"),
                    s(n, "state"),
                    s(n, "connected"),
                    s(n, "ports")
                ));
                if let Some(sn) = n["socket_nat"].as_object() {
                    let drops: Vec<String> = sn
                        .get("drops")
                        .and_then(|d| d.as_object())
                        .map(|d| d.iter().map(|(k, v)| format!("{k}={v}")).collect())
                        .unwrap_or_default();
                    let g = |k: &str| sn.get(k).map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                    out.push_str(&format!(
                        "{:<16} socket NAT: {} TCP, {} UDP, {} ICMP flows ({} over IPv6); {} refused, {} unreachable; drops: {}\n",
                        "",
                        g("tcp_flows"),
                        g("udp_flows"),
                        g("icmp_flows"),
                        g("ipv6_flows"),
                        g("refused"),
                        g("unreachable"),
                        if drops.is_empty() { "none".to_string() } else { drops.join(" ") }
                    ));
                }
                if n["uplink_address"].is_string() || n["nat_connections"].is_number() {
                    out.push_str(&format!(
                        "{:<16} uplink address {}, {} NAT connections\n",
                        "",
                        s(n, "uplink_address"),
                        s(n, "nat_connections")
                    ));
                }
                if n["uplink_address6"].is_string() {
                    out.push_str(&format!("{:<16} uplink address6 {} (IPv6 routed)\n", "", s(n, "uplink_address6")));
                }
            }
        }
        Request::PortList { .. } | Request::PortAdd { .. } => {
            let rows = if rows.is_empty() && v.is_object() { vec![v.clone()] } else { rows };
            for p in &rows {
                let attach =
                    if p["socket"].is_null() { format!("interface={}", s(p, "interface")) } else { format!("socket={}", s(p, "socket")) };
                let drops: Vec<String> =
                    p["drops"].as_object().map(|d| d.iter().map(|(k, n)| format!("{k}={n}")).collect()).unwrap_or_default();
                let feats: Vec<String> =
                    p["features"].as_array().map(|f| f.iter().map(|x| x.as_str().unwrap_or("").to_string()).collect()).unwrap_or_default();
                out.push_str(&format!(
                    "{} ({}, {}) {} {} mac={} ip={}\n  rx {} frames/{} bytes, tx {} frames/{} bytes, drops: {}\n  features: {}\n",
                    s(p, "name"),
                    s(p, "kind"),
                    s(p, "mode"),
                    attach,
                    if p["connected"] == Value::Bool(true) { "connected" } else { "waiting" },
                    s(p, "mac"),
                    s(p, "ip"),
                    s(p, "rx_frames"),
                    s(p, "rx_bytes"),
                    s(p, "tx_frames"),
                    s(p, "tx_bytes"),
                    if drops.is_empty() { "none".to_string() } else { drops.join(" ") },
                    if feats.is_empty() { "-".to_string() } else { feats.join(" ") },
                ));
                let limit = |d: &str| p["bandwidth"][d]["average"].as_u64().map(|a| format!("{d} {a} kB/s"));
                let limits: Vec<String> = ["inbound", "outbound"].iter().filter_map(|d| limit(d)).collect();
                if p["isolated"] == Value::Bool(true) || !limits.is_empty() {
                    out.push_str(&format!(
                        "  {}{}\n",
                        if p["isolated"] == Value::Bool(true) { "isolated " } else { "" },
                        if limits.is_empty() { String::new() } else { format!("limits: {}", limits.join(", ")) }
                    ));
                }
                if p["vxlan"].is_object() {
                    let x = &p["vxlan"];
                    let list = |k: &str| {
                        x[k].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" ")).unwrap_or_default()
                    };
                    let learned: Vec<String> = x["learned"]
                        .as_array()
                        .map(|a| a.iter().map(|e| format!("{}@{}", s(e, "mac"), s(e, "remote"))).collect())
                        .unwrap_or_default();
                    out.push_str(&format!(
                        "  vxlan vni {} local {} remotes: {}{}\n  learned ({}, {} evicted): {}\n",
                        s(x, "vni"),
                        s(x, "local"),
                        list("remotes"),
                        if x["group"].is_string() { format!(" group {}", s(x, "group")) } else { String::new() },
                        learned.len(),
                        s(x, "evicted"),
                        if learned.is_empty() { "-".to_string() } else { learned.join(" ") }
                    ));
                }
                let v6: Vec<&str> = p["ipv6"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
                if !v6.is_empty() {
                    out.push_str(&format!("  ipv6: {}\n", v6.join(" ")));
                }
                if p["vlan"].is_string() && s(p, "vlan") != "untagged" {
                    out.push_str(&format!("  vlan: {}\n", s(p, "vlan")));
                }
                if let Some(nf) = p["nat_flows"].as_object() {
                    let g = |k: &str| nf.get(k).map(|v| v.to_string()).unwrap_or_else(|| "0".into());
                    out.push_str(&format!("  NAT flows: {} tcp, {} udp, {} icmp\n", g("tcp"), g("udp"), g("icmp")));
                    for f in nf.get("flows").and_then(|f| f.as_array()).into_iter().flatten() {
                        out.push_str(&format!("    {:<4} {} -> {} {}\n", s(f, "proto"), s(f, "guest"), s(f, "remote"), s(f, "state")));
                    }
                }
            }
        }
        Request::DhcpLeases { .. } => {
            // IPv6 addresses are wider: the column grows to the longest.
            let w = rows.iter().map(|l| s(l, "ip").len()).max().unwrap_or(0).max(15);
            out.push_str(&format!("{:<17}  {:<w$}  {:<20}  {}\n", "MAC", "IP", "EXPIRES (UTC)", "NAME"));
            for l in &rows {
                out.push_str(&format!("{:<17}  {:<w$}  {:<20}  {}\n", s(l, "mac"), s(l, "ip"), s(l, "expires_utc"), s(l, "name")));
            }
        }
        Request::PortDel { name, .. } => out.push_str(&format!("port {name} removed\n")),
        Request::Capture { .. } => {}
    }
    out
}

/// "2026-11-22 14:40:33" for seconds since the Unix epoch (civil-from-days, proleptic
/// Gregorian).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Connects to the daemon and sends one request.
pub fn connect(path: &Path, req: &Request) -> Result<UnixStream, String> {
    let s = UnixStream::connect(path).map_err(|e| format!("cannot reach the vunet daemon at {}: {}", path.display(), io_reason(&e)))?;
    send(s, path, req)
}

fn send(mut s: UnixStream, path: &Path, req: &Request) -> Result<UnixStream, String> {
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("control socket {}: {}", path.display(), io_reason(&e)))?;
    Ok(s)
}

/// Connects to the first of the default `places` where a daemon answers and sends one request
/// there; returns the connection and the place. A place whose directory belongs to neither
/// root nor the user is passed over: anybody may create a directory in /tmp, and the answer
/// of whoever listens there would be taken for the daemon's. Failure is one line naming every
/// place and why it did not answer.
pub fn connect_first(places: &[PathBuf], req: &Request) -> Result<(UnixStream, PathBuf), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut tried = Vec::new();
    for path in places {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let owner = match std::fs::metadata(dir) {
            Ok(m) => m.uid(),
            Err(e) => {
                tried.push(format!("{} ({})", path.display(), io_reason(&e)));
                continue;
            }
        };
        if owner != 0 && owner != uid {
            tried.push(format!("{} (its directory belongs to uid {owner}, not to you)", path.display()));
            continue;
        }
        match UnixStream::connect(path) {
            Ok(s) => return send(s, path, req).map(|s| (s, path.clone())),
            Err(e) => tried.push(format!("{} ({})", path.display(), io_reason(&e))),
        }
    }
    Err(format!(
        "cannot reach the vunet daemon at {}; start one with `vunet run`, or name its socket with --control or --config",
        tried.join(" or ")
    ))
}

/// Reads the daemon's answer to the request sent on `s` (its error as Err).
pub fn read_answer(mut s: UnixStream, path: &Path) -> Result<Value, String> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("control socket {}: {}", path.display(), io_reason(&e)))?;
    let v: Value = serde_json::from_str(out.trim()).map_err(|e| format!("control socket {}: bad answer ({e})", path.display()))?;
    match (v.get("ok"), v.get("error")) {
        (Some(ok), _) => Ok(ok.clone()),
        (_, Some(Value::String(e))) => Err(e.clone()),
        _ => Err(format!("control socket {}: bad answer", path.display())),
    }
}

/// Sends one request and returns the daemon's answer (its error as Err).
pub fn request(path: &Path, req: &Request) -> Result<Value, String> {
    read_answer(connect(path, req)?, path)
}

/// The system daemon's control socket (contrib/vunet.service, or `vunet run` as root): the
/// CLI's last default place.
pub fn default_path() -> PathBuf {
    PathBuf::from("/run/vunet/control.sock")
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_list_text_shows_ipv6_addresses_when_there_are_any() {
        let p = serde_json::json!({ "name": "vm1", "kind": "vhost-user", "mode": "server", "socket": "/s", "connected": true, "mac": "52:54:00:00:00:01",
            "ip": null, "rx_frames": 1, "rx_bytes": 2, "tx_frames": 3, "tx_bytes": 4, "drops": { "rogue_router_advert": 2 }, "features": [],
            "ipv6": ["fe80::5054:ff:fe00:1", "fd00::20"] });
        let req = Request::PortList { network: "n".into() };
        let text = render(&req, &serde_json::Value::Array(vec![p.clone()]));
        assert!(text.contains("drops: rogue_router_advert=2") && text.contains("\n  ipv6: fe80::5054:ff:fe00:1 fd00::20\n"), "{text}");
        let mut none = p;
        none["ipv6"] = serde_json::json!([]);
        assert!(!render(&req, &serde_json::Value::Array(vec![none])).contains("ipv6"));
    }

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_358_433), "2026-11-22 14:40:33");
    }

    #[test]
    fn the_first_default_place_that_answers_is_used_and_a_failure_names_them_all() {
        let d = std::env::temp_dir().join(format!("vunet-control-places-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (none, live) = (d.join("none/control.sock"), d.join("control.sock"));
        let e = connect_first(&[none.clone(), live.clone()], &Request::NetList).unwrap_err();
        assert_eq!(
            e,
            format!(
                "cannot reach the vunet daemon at {} (No such file or directory) or {} (No such file or directory); start one with `vunet run`, or name its socket with --control or --config",
                none.display(),
                live.display()
            )
        );
        let l = UnixListener::bind(&live).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&c).read_line(&mut line).unwrap();
            c.write_all(b"{\"ok\":[]}\n").unwrap();
            line
        });
        let (s, at) = connect_first(&[none, live.clone()], &Request::NetList).unwrap();
        assert_eq!(at, live);
        assert_eq!(read_answer(s, &at), Ok(json!([])));
        assert_eq!(server.join().unwrap(), "{\"cmd\":\"net-list\"}\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn bind_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vunet-control-bind-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_control_socket_replaces_only_a_stale_socket_and_follows_no_link() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let d = bind_dir("kinds");
        let path = d.join("control.sock");
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();

        // A regular file, and a link to one: refused, left as they are.
        std::fs::write(&path, "not a socket").unwrap();
        let e = bind(&path, None).unwrap_err().to_string();
        assert!(e.contains("exists and is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = bind(&path, None).unwrap_err().to_string();
        assert!(e.contains("exists and is not a socket"), "{e}");
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o644);
        std::fs::remove_file(&path).unwrap();

        // A stale socket is replaced; a live one is refused.
        drop(UnixListener::bind(&path).unwrap());
        let l = bind(&path, None).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&path).is_ok());
        assert!(bind(&path, None).unwrap_err().to_string().contains("in use by another vunet"));
        drop(l);
        // With a group: 0660, that group.
        std::fs::remove_file(&path).unwrap();
        let _l = bind(&path, Some("root")).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 0));
        assert_eq!(entries(&d), vec!["control.sock", "victim"], "no private directory left behind");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn nobody_sees_the_control_socket_before_its_mode_is_set() {
        use std::os::unix::fs::MetadataExt;
        let d = bind_dir("window");
        let path = d.join("control.sock");
        let done = std::sync::atomic::AtomicBool::new(false);
        let seen = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        seen.insert(m.mode() & 0o777);
                    }
                }
                seen
            });
            for _ in 0..300 {
                let l = bind(&path, None).unwrap();
                drop(l);
                let _ = std::fs::remove_file(&path);
            }
            done.store(true, Ordering::Relaxed);
            watcher.join().unwrap()
        });
        assert!(
            seen.iter().all(|&m| m == 0o600),
            "modes seen at the path: {:?}",
            seen.iter().map(|m| format!("{m:o}")).collect::<Vec<_>>()
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn port_add_sockets_stay_in_the_socket_directory() {
        let d = bind_dir("confine");
        let dir = d.join("sockets");
        std::fs::create_dir_all(dir.join("tenant")).unwrap();
        std::fs::create_dir_all(d.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), dir.join("way-out")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere/vm.sock"), dir.join("link.sock")).unwrap();
        let ok = |s: &str| confine_socket(&dir, Some(PathBuf::from(s))).unwrap();
        let refused = |s: &str| confine_socket(&dir, Some(PathBuf::from(s))).unwrap_err().to_string();
        assert_eq!(confine_socket(&dir, None).unwrap(), PathBuf::new(), "none given: the supervisor names one in the directory");
        assert_eq!(ok(dir.join("vm5.sock").to_str().unwrap()), dir.join("vm5.sock"));
        assert_eq!(ok("vm6.sock"), dir.join("vm6.sock"), "relative: in the directory");
        assert_eq!(ok(dir.join("tenant/../tenant/vm7.sock").to_str().unwrap()), dir.join("tenant/vm7.sock"));
        let outside = |p: &str| {
            format!(
                "socket {p} is outside the socket directory {} (port-add creates and connects to sockets only there; socket_dir in the configuration sets it)",
                dir.display()
            )
        };
        for p in [
            d.join("other.sock").display().to_string(),
            "/etc/passwd".to_string(),
            format!("{}/../other.sock", dir.display()),
            format!("{}/tenant/../../nowhere/x.sock", dir.display()),
            "../other.sock".to_string(),
            format!("{}/way-out/vm.sock", dir.display()),
            "way-out/vm.sock".to_string(),
        ] {
            assert_eq!(refused(&p), outside(&p));
        }
        assert!(refused("link.sock").ends_with("is a symbolic link (port-add follows none)"));
        assert!(refused("nosuch/vm.sock").contains("No such file or directory"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn requests_are_one_line_of_json() {
        let r = Request::PortAdd { network: "n".into(), name: "p".into(), socket: None, mac: Some("52:54:00:00:00:01".into()), mode: None };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.starts_with("{\"cmd\":\"port-add\""), "{line}");
        assert!(matches!(serde_json::from_str::<Request>(&line).unwrap(), Request::PortAdd { .. }));
        assert!(serde_json::from_str::<Request>("{\"cmd\":\"reboot\"}").is_err());
    }
}
