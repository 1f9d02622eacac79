//! The gateway's DHCP server: answers guests' DHCP messages with the pure server of
//! `vunet_dhcp` (state in `Network::dhcp`, which port security and the listings read too),
//! records a port's leased address for port security, and keeps the lease file: written
//! atomically at every change, read at start, set aside (never fatal) when corrupt.

use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};
use vunet_dhcp::message::{reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::{lease_file, DhcpMessage, DhcpServer, Lease, MessageType, ServerConfig};
use vunet_switch::gateway::{build_udp, udp_payload};
use vunet_switch::DropReason;

use crate::config::{io_reason, Mode, NetworkConfig};
use crate::datapath::{unix_now, GatewayCx, GatewayService, Handled, Port};

/// DHCP on a network's gateway, with the file its leases persist in.
pub struct DhcpService {
    pub lease_file: Option<PathBuf>,
}

impl GatewayService for DhcpService {
    /// A DHCP message from a guest (a UDP datagram to port 67): the reply goes back to the
    /// port. Lease changes are saved to the lease file at once.
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        let (Some(dhcp), gw) = (cx.dhcp, cx.gateway) else { return Handled::NotMine };
        let Some((_, payload)) = udp_payload(frame, SERVER_PORT) else { return Handled::NotMine };
        let Ok(msg) = DhcpMessage::parse(payload) else { return Handled::NotMine };
        // With port security a guest leases only for its own MAC (no pool exhaustion with
        // made-up client addresses).
        if port.security && port.locked_mac() != Some(msg.chaddr) {
            port.counters.dropped(DropReason::SpoofedMac);
            return Handled::NotMine;
        }
        let now = unix_now();
        let mut server = dhcp.lock().unwrap_or_else(|e| e.into_inner());
        let answer = server.handle(&msg, now);
        match (&answer, msg.msg_type) {
            (_, MessageType::Inform) => {}
            (Some(r), _) if r.msg_type == MessageType::Ack => {
                if let Some(ip) = reply_yiaddr(&r.payload).filter(|ip| !ip.is_unspecified()) {
                    port.set_leased_ip(Some(ip));
                }
            }
            (_, MessageType::Release | MessageType::Decline) => port.set_leased_ip(None),
            _ => {}
        }
        if matches!(msg.msg_type, MessageType::Request | MessageType::Release | MessageType::Decline) {
            if let Some(path) = &self.lease_file {
                if let Err(e) = save_leases(path, &server.leases(now)) {
                    warn!(network = %cx.network, file = %path.display(), "cannot save DHCP leases: {e}");
                }
            }
        }
        drop(server);
        match answer {
            Some(r) => {
                build_udp(reply, gw.mac, r.dst_mac, gw.ip, r.dst_ip, SERVER_PORT, CLIENT_PORT, &r.payload);
                Handled::Reply
            }
            None => Handled::NotMine,
        }
    }
}

/// The DHCP server of network `n` (None without `[network.dhcp]` or a gateway), with the
/// leases of `lease_file` restored; an error if that file exists but cannot be read.
pub fn server(n: &NetworkConfig, lease_file: Option<&Path>) -> Result<Option<DhcpServer>, LeaseFileUnreadable> {
    let (Some(d), Some((ip, prefix))) = (n.dhcp.as_ref(), n.gateway) else { return Ok(None) };
    let mut server = DhcpServer::new(ServerConfig {
        server_ip: ip,
        prefix,
        range: d.range,
        hosts: d.hosts.clone(),
        lease_secs: d.lease_secs,
        // A router is announced only where the gateway routes (libvirt's isolated networks
        // give none).
        router: matches!(n.mode, Mode::Nat | Mode::Route),
        // The gateway answers DNS wherever it exists.
        dns: Some(ip),
        domain: n.dns.domain.clone(),
        mtu: Some(n.mtu),
    });
    if let Some(path) = lease_file {
        let restored = server.restore(&load_leases(&n.name, path)?, unix_now());
        if restored > 0 {
            info!(network = %n.name, "restored {restored} DHCP lease(s) from {}", path.display());
        }
    }
    Ok(Some(server))
}

/// Why a network's lease file cannot be used: vunet refuses to start rather than begin with
/// no leases and overwrite the file at the first change.
#[derive(Debug, thiserror::Error)]
#[error("lease file {}: cannot read it: {reason}", path.display())]
pub struct LeaseFileUnreadable {
    pub path: PathBuf,
    pub reason: String,
}

/// Writes the lease file atomically and durably: a new temporary file next to it (a name
/// nobody can have prepared: O_EXCL, no symlink followed, owner-only since it holds MACs and
/// host names), fsync, rename over the file, fsync the directory so the rename survives a
/// crash too.
pub fn save_leases(path: &Path, leases: &[Lease]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (tmp, mut f) = loop {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let tmp = dir.join(format!(".{name}.{}.{}.{nanos:x}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let written = f
        .write_all(lease_file::serialize(leases).as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Reads the lease file. A missing one is no leases; a corrupt or truncated one is set aside
/// (renamed `.corrupt`) with a warning and vunet starts without those leases. One that exists
/// but cannot be read (permissions, a directory, an I/O error) is an error: starting empty
/// would overwrite it at the first lease.
fn load_leases(net: &str, path: &Path) -> Result<Vec<Lease>, LeaseFileUnreadable> {
    let text = match std::fs::read(path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(LeaseFileUnreadable { path: path.to_path_buf(), reason: io_reason(&e) }),
    };
    match lease_file::parse(&text) {
        Ok(l) => Ok(l),
        Err(e) => {
            let aside = path.with_extension("leases.corrupt");
            let _ = std::fs::rename(path, &aside);
            warn!(network = %net, file = %path.display(), "lease file is corrupt ({e}); set aside as {}, starting without it", aside.display());
            Ok(vec![])
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    // By its full path: layers.rs reads `super::` as the services layer.
    use crate::services::dhcp::{lease_file, load_leases, save_leases, Lease};

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vunet-leases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn one() -> Vec<Lease> {
        vec![Lease { mac: [0x52, 0x54, 0, 0, 0, 1], ip: Ipv4Addr::new(10, 0, 0, 2), expires: 4_000_000_000, hostname: Some("a".into()) }]
    }

    #[test]
    fn the_lease_file_is_owner_only_and_no_temporary_file_is_left() {
        let d = tmp("mode");
        let path = d.join("n.leases");
        // A file from an older version, readable by all: replaced by an owner-only one.
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        save_leases(&path, &one()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "MACs and host names are for the owner only");
        assert_eq!(lease_file::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(), one());
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("n.leases")]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_link_planted_at_a_temporary_name_is_not_followed() {
        let d = tmp("link");
        let path = d.join("n.leases");
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // The name an older version wrote through, and a few guesses at others.
        for name in ["n.leases.tmp", ".n.leases.tmp", "n.leases.leases.tmp"] {
            std::os::unix::fs::symlink(&victim, d.join(name)).unwrap();
        }
        save_leases(&path, &one()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_file());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_lease_file_is_an_error_naming_it_and_a_missing_one_is_empty() {
        let d = tmp("unreadable");
        let path = d.join("n.leases");
        assert_eq!(load_leases("n", &path).unwrap(), vec![]);
        std::fs::create_dir(&path).unwrap();
        let e = load_leases("n", &path).unwrap_err();
        assert_eq!(e.to_string(), format!("lease file {}: cannot read it: Is a directory", path.display()));
        assert!(path.is_dir(), "left as it is");
        let _ = std::fs::remove_dir_all(&d);
    }
}
