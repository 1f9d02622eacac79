//! The control socket: a unix socket (owner-only) on which the running daemon answers one
//! request per connection, one line in, text out. The `vunet` subcommands (`dhcp-leases`,
//! `port-list`, `net-list`) are its clients.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use vunet_switch::format_mac;

use crate::config::io_reason;
use crate::network::{unix_now, Network, StartError};

/// Binds the control socket (refusing one a live daemon is using) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let err = |reason: String| StartError::Control { path: path.to_path_buf(), reason };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(io_reason(&e)))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(err("in use by another vunet".into()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| err(io_reason(&e)))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| err(io_reason(&e)))?;
    Ok(l)
}

/// Serves requests for as long as the daemon runs.
pub fn serve(listener: UnixListener, networks: Vec<Arc<Network>>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        // A bounded read: a request is one short line.
        let mut reader = BufReader::new((&conn).take_bytes(1024));
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let reply = answer(line.trim(), &networks);
        if conn.write_all(reply.as_bytes()).is_err() {
            warn!("control socket: client went away");
        }
    }
}

trait TakeBytes {
    fn take_bytes(self, n: u64) -> std::io::Take<Self>
    where
        Self: Sized;
}

impl<R: std::io::Read> TakeBytes for R {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}

/// The answer to one request; an error starts with "error: ".
pub fn answer(request: &str, networks: &[Arc<Network>]) -> String {
    let mut words = request.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let find = |name: Option<&str>| -> Result<&Arc<Network>, String> {
        let name = name.ok_or("error: which network?\n")?;
        networks.iter().find(|n| n.name == name).ok_or_else(|| format!("error: no network named {name:?}\n"))
    };
    let r = match cmd {
        "net-list" => Ok(net_list(networks)),
        "port-list" => find(words.next()).map(|n| port_list(n)),
        "dhcp-leases" => find(words.next()).map(|n| dhcp_leases(n)),
        other => Err(format!("error: unknown request {other:?}\n")),
    };
    r.unwrap_or_else(|e| e)
}

fn net_list(networks: &[Arc<Network>]) -> String {
    let mut s = format!("{:<16} {:<9} {:<20} {}\n", "NAME", "MODE", "GATEWAY", "PORTS");
    for n in networks {
        let gw = n.gateway.map(|g| format!("{}/{}", g.ip, g.prefix)).unwrap_or_else(|| "-".into());
        let ports = n.ports.read().unwrap_or_else(|e| e.into_inner());
        let up = ports.iter().filter(|p| p.connected.load(std::sync::atomic::Ordering::Relaxed)).count();
        s.push_str(&format!("{:<16} {:<9} {:<20} {}/{} connected\n", n.name, n.mode.name(), gw, up, ports.len()));
    }
    s
}

fn port_list(n: &Network) -> String {
    let mut s = String::new();
    for p in n.ports.read().unwrap_or_else(|e| e.into_inner()).iter() {
        let up = p.connected.load(std::sync::atomic::Ordering::Relaxed);
        let mac = p.locked_mac().map(|m| format_mac(&m)).unwrap_or_else(|| "-".into());
        let ip = p.leased_ip().map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        let attach = match &p.uplink {
            Some(u) => format!("{}={}", u.kind.name(), u.ifname),
            None => format!("socket={}", p.socket.display()),
        };
        s.push_str(&format!(
            "{} {} {} mac={} ip={}: {}\n",
            p.name,
            attach,
            if up { "connected" } else { "waiting" },
            mac,
            ip,
            p.counters.snapshot()
        ));
    }
    s
}

fn dhcp_leases(n: &Network) -> String {
    let Some(dhcp) = n.dhcp.as_ref() else { return format!("error: network {:?} has no DHCP server\n", n.name) };
    let leases = dhcp.lock().unwrap_or_else(|e| e.into_inner()).leases(unix_now());
    let mut s = format!("{:<17}  {:<15}  {:<20}  {}\n", "MAC", "IP", "EXPIRES (UTC)", "NAME");
    for l in leases {
        s.push_str(&format!(
            "{:<17}  {:<15}  {:<20}  {}\n",
            format_mac(&l.mac),
            l.ip,
            utc(l.expires),
            l.hostname.as_deref().unwrap_or("-")
        ));
    }
    s
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

/// Sends one request to a daemon and returns its answer.
pub fn request(path: &Path, req: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("cannot reach the vunet daemon at {}: {}", path.display(), io_reason(&e)))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(format!("{req}\n").as_bytes()).map_err(|e| format!("control socket {}: {}", path.display(), io_reason(&e)))?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).map_err(|e| format!("control socket {}: {}", path.display(), io_reason(&e)))?;
    Ok(out)
}

/// The default control socket when the configuration names none.
pub fn default_path() -> PathBuf {
    PathBuf::from("/run/vunet/control.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_358_433), "2026-11-22 14:40:33");
    }
}
