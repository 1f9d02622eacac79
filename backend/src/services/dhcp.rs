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
                // A DHCP reply is a few hundred bytes: it always fits a datagram.
                match build_udp(reply, gw.mac, r.dst_mac, gw.ip, r.dst_ip, SERVER_PORT, CLIENT_PORT, &r.payload) {
                    true => Handled::Reply,
                    false => Handled::Consumed,
                }
            }
            None => Handled::NotMine,
        }
    }
}

/// The DHCP server of network `n` (None without `[network.dhcp]` or a gateway), with the
/// leases of `lease_file` restored.
pub fn server(n: &NetworkConfig, lease_file: Option<&Path>) -> Option<DhcpServer> {
    let d = n.dhcp.as_ref()?;
    let (ip, prefix) = n.gateway?;
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
        let restored = server.restore(&load_leases(&n.name, path), unix_now());
        if restored > 0 {
            info!(network = %n.name, "restored {restored} DHCP lease(s) from {}", path.display());
        }
    }
    Some(server)
}

/// Writes the lease file atomically: a temporary file, fsync, rename.
fn save_leases(path: &Path, leases: &[Lease]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("leases.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(lease_file::serialize(leases).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the lease file. A corrupt or truncated one is set aside (renamed `.corrupt`) with a
/// warning and vunet starts without those leases; it never refuses to start over it.
fn load_leases(net: &str, path: &Path) -> Vec<Lease> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return vec![],
        Err(e) => {
            warn!(network = %net, file = %path.display(), "cannot read the lease file: {}", io_reason(&e));
            return vec![];
        }
    };
    match lease_file::parse(&text) {
        Ok(l) => l,
        Err(e) => {
            let aside = path.with_extension("leases.corrupt");
            let _ = std::fs::rename(path, &aside);
            warn!(network = %net, file = %path.display(), "lease file is corrupt ({e}); set aside as {}, starting without it", aside.display());
            vec![]
        }
    }
}
