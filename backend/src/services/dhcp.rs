//! The gateway's DHCP server: answers guests' DHCP messages with the pure server of
//! `vunet_dhcp` (state in `Network::dhcp`, which port security and the listings read too),
//! records a port's leased address for port security, and keeps the lease file: read at
//! start, set aside when corrupt, refused when unreadable, and written atomically after
//! changes by a thread of its own (`LeaseWriter`), so a guest's DHCP never waits for a disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tracing::{info, warn};
use vunet_dhcp::lease_file::Leases;
use vunet_dhcp::message::{reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::v6::Dhcp6Server;
use vunet_dhcp::{lease_file, DhcpMessage, DhcpServer, MessageType, ServerConfig};
use vunet_switch::gateway::{build_udp, udp_payload};
use vunet_switch::DropReason;

use crate::config::{io_reason, Mode, NetworkConfig};
use crate::datapath::{unix_now, GatewayCx, GatewayService, Handled, Port};

/// DHCP on a network's gateway, with the writer of the file its leases persist in.
pub struct DhcpService {
    pub leases: Option<std::sync::Arc<LeaseWriter>>,
}

impl GatewayService for DhcpService {
    /// A DHCP message from a guest (a UDP datagram to port 67): the reply goes back to the
    /// port. A change to the leases wakes the lease writer; nothing waits for it.
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
        for (mac, name) in server.take_name_refusals() {
            warn!(network = %cx.network, port = %port.name, "DHCP client {} asked for host name {name:?}: reserved or held by another guest; it gets no DNS name", vunet_switch::format_mac(&mac));
        }
        match (&answer, msg.msg_type) {
            (_, MessageType::Inform) => {}
            (Some(r), _) if r.msg_type == MessageType::Ack => {
                if let Some(ip) = reply_yiaddr(&r.payload).filter(|ip| !ip.is_unspecified()) {
                    port.set_leased_ip(Some(ip));
                }
            }
            // The server keeps a binding whose release or decline names another address: the
            // port keeps its lease (and port security its check) unless the binding went.
            (_, MessageType::Release | MessageType::Decline) => port.set_leased_ip(server.ip_of(&msg.chaddr, now)),
            _ => {}
        }
        drop(server);
        if matches!(msg.msg_type, MessageType::Request | MessageType::Release | MessageType::Decline) {
            if let Some(w) = &self.leases {
                w.mark_dirty();
            }
        }
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
/// IPv4 leases of its lease file (`saved`, from `load_leases`) restored.
pub fn server(n: &NetworkConfig, saved: &Leases) -> Option<DhcpServer> {
    let (Some(d), Some((ip, prefix))) = (n.dhcp.as_ref(), n.gateway) else { return None };
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
    let restored = server.restore(&saved.v4, unix_now());
    if restored > 0 {
        info!(network = %n.name, "restored {restored} DHCP lease(s)");
    }
    Some(server)
}

/// Least time between two writes of one lease file: changes in between (a guest renewing in
/// a loop) make one write, so a guest cannot keep the disk busy with fsyncs.
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(250);
/// After a failed write (disk full, directory gone), the next try.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Writes one network's lease file from a thread of its own. The guests' path only marks the
/// leases changed; the writer takes a copy of them under the DHCP lock (briefly) and writes
/// outside it, at most once per `MIN_WRITE_INTERVAL`, and not at all when what would be
/// written is what the file already holds (a renewal within the same second).
pub struct LeaseWriter {
    pub path: PathBuf,
    network: String,
    dirty: Mutex<bool>,
    wake: Condvar,
    /// The leases the file holds now, as last written by this writer; held for the whole of
    /// a write, so the thread and a final `write_if_changed` never write at the same time.
    written: Mutex<Option<Leases>>,
    /// Writes done, for tests and logs.
    pub writes: AtomicU64,
}

impl LeaseWriter {
    pub fn new(network: &str, path: PathBuf) -> LeaseWriter {
        LeaseWriter {
            path,
            network: network.to_string(),
            dirty: Mutex::new(false),
            wake: Condvar::new(),
            written: Mutex::new(None),
            writes: AtomicU64::new(0),
        }
    }

    /// The leases changed: the writer will save them. Never blocks on a write.
    pub fn mark_dirty(&self) {
        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_one();
    }

    /// Saves the leases of `dhcp` and `dhcp6` (the network's DHCPv4 and DHCPv6 servers) if
    /// they differ from what the file holds; true if written.
    pub fn write_if_changed(&self, dhcp: Option<&Mutex<DhcpServer>>, dhcp6: Option<&Mutex<Dhcp6Server>>) -> io::Result<bool> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let now = unix_now();
        let leases = Leases {
            v4: dhcp.map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).leases(now)).unwrap_or_default(),
            v6: dhcp6.map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).leases(now)).unwrap_or_default(),
        };
        if written.as_ref() == Some(&leases) {
            return Ok(false);
        }
        save_leases(&self.path, &leases)?;
        *written = Some(leases);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The writer's thread: waits for changes and saves them until `stopped` is set, then
    /// saves once more and returns.
    pub fn run(&self, dhcp: Option<&Mutex<DhcpServer>>, dhcp6: Option<&Mutex<Dhcp6Server>>, stopped: &AtomicBool) {
        loop {
            let stop = {
                let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                while !*dirty && !stopped.load(Ordering::Acquire) {
                    // A timeout, so a stopped network is noticed without a wake-up.
                    dirty = self.wake.wait_timeout(dirty, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner()).0;
                }
                *dirty = false;
                stopped.load(Ordering::Acquire)
            };
            match self.write_if_changed(dhcp, dhcp6) {
                Ok(_) => {}
                Err(e) => {
                    warn!(network = %self.network, file = %self.path.display(), "cannot save DHCP leases: {}", io_reason(&e));
                    if !stop {
                        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
                        std::thread::sleep(RETRY_AFTER);
                    }
                }
            }
            if stop {
                return;
            }
            std::thread::sleep(MIN_WRITE_INTERVAL);
        }
    }
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
pub fn save_leases(path: &Path, leases: &Leases) -> io::Result<()> {
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
    let written =
        f.write_all(lease_file::serialize_all(leases).as_bytes()).and_then(|()| f.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
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
pub fn load_leases(net: &str, path: &Path) -> Result<Leases, LeaseFileUnreadable> {
    let text = match std::fs::read(path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Leases::default()),
        Err(e) => return Err(LeaseFileUnreadable { path: path.to_path_buf(), reason: io_reason(&e) }),
    };
    match lease_file::parse_all(&text) {
        Ok(l) => Ok(l),
        Err(e) => {
            let aside = path.with_extension("leases.corrupt");
            let _ = std::fs::rename(path, &aside);
            warn!(network = %net, file = %path.display(), "lease file is corrupt ({e}); set aside as {}, starting without it", aside.display());
            Ok(Leases::default())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vunet_dhcp::message::{build_client_message, reply_type, CLIENT_PORT, SERVER_PORT};
    use vunet_dhcp::{DhcpServer, MessageType, ServerConfig};
    use vunet_switch::gateway::{build_udp, Gateway};

    use crate::datapath::{GatewayCx, GatewayService, Handled, Port, PortKind};
    // By its full path: layers.rs reads `super::` as the services layer.
    use crate::services::dhcp::{lease_file, load_leases, save_leases, DhcpService, LeaseWriter, Leases};
    use vunet_dhcp::Lease;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 7];

    fn dhcp_server() -> Mutex<DhcpServer> {
        Mutex::new(DhcpServer::new(ServerConfig {
            server_ip: GW,
            prefix: 24,
            range: (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 150)),
            hosts: vec![],
            lease_secs: 3600,
            router: false,
            dns: None,
            domain: None,
            mtu: None,
        }))
    }

    /// A guest's DHCP message through the service, as the data path hands it over; the type of
    /// the answer.
    fn send(svc: &DhcpService, dhcp: &Mutex<DhcpServer>, port: &Port, t: MessageType) -> Option<MessageType> {
        let gw = Gateway { mac: [2, 0, 0, 0, 0, 1], ip: GW, prefix: 24 };
        let msg = build_client_message(t, MAC, 7, Some(Ipv4Addr::new(10, 0, 0, 100)), Some(GW), Some("g"));
        let mut frame = Vec::new();
        build_udp(&mut frame, MAC, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
        let mut reply = Vec::new();
        let cx = GatewayCx { network: "n", gateway: &gw, gateway6: None, dhcp: Some(dhcp), hdr: &Default::default() };
        match svc.handle(&cx, port, &frame, &mut reply) {
            Handled::Reply => vunet_switch::gateway::udp_payload(&reply, CLIENT_PORT).and_then(|(_, p)| reply_type(p)),
            _ => None,
        }
    }

    #[test]
    fn a_guest_never_waits_for_a_lease_write() {
        let d = tmp("slow");
        let writer = std::sync::Arc::new(LeaseWriter::new("n", d.join("n.leases")));
        let svc = DhcpService { leases: Some(writer.clone()) };
        let (dhcp, port) = (dhcp_server(), Port::new(0, "p0", PortKind::Vhost));
        assert_eq!(send(&svc, &dhcp, &port, MessageType::Discover), Some(MessageType::Offer));
        // A write that takes forever (a slow or hung disk) holds the writer.
        let writing = writer.written.lock().unwrap();
        let answered = std::thread::scope(|s| {
            let guest = s.spawn(|| send(&svc, &dhcp, &port, MessageType::Request));
            let deadline = Instant::now() + Duration::from_secs(3);
            while !guest.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let finished = guest.is_finished();
            drop(writing);
            (finished, guest.join().unwrap())
        });
        assert_eq!(answered, (true, Some(MessageType::Ack)), "the ACK did not wait for the lease file");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn renewals_that_change_nothing_are_not_written() {
        let d = tmp("renew");
        let path = d.join("n.leases");
        let writer = std::sync::Arc::new(LeaseWriter::new("n", path.clone()));
        let svc = DhcpService { leases: Some(writer.clone()) };
        let (dhcp, port) = (dhcp_server(), Port::new(0, "p0", PortKind::Vhost));
        let stopped = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| writer.run(Some(&dhcp), None, &stopped));
            send(&svc, &dhcp, &port, MessageType::Discover);
            // A guest renewing in a loop: the same lease, within a second or two.
            for _ in 0..50 {
                assert_eq!(send(&svc, &dhcp, &port, MessageType::Request), Some(MessageType::Ack));
            }
            std::thread::sleep(Duration::from_millis(800));
            stopped.store(true, Ordering::Release);
            writer.mark_dirty();
        });
        let writes = writer.writes.load(Ordering::Relaxed);
        assert!((1..=2).contains(&writes), "{writes} writes for 50 identical renewals");
        let saved = lease_file::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(saved, dhcp.lock().unwrap().leases(crate::datapath::unix_now()));
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vunet-leases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn one() -> Leases {
        Leases {
            v4: vec![Lease {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                ip: Ipv4Addr::new(10, 0, 0, 2),
                expires: 4_000_000_000,
                hostname: Some("a".into()),
            }],
            v6: vec![],
        }
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
        assert_eq!(lease_file::parse_all(&std::fs::read_to_string(&path).unwrap()).unwrap(), one());
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
        assert_eq!(load_leases("n", &path).unwrap(), Leases::default());
        std::fs::create_dir(&path).unwrap();
        let e = load_leases("n", &path).unwrap_err();
        assert_eq!(e.to_string(), format!("lease file {}: cannot read it: Is a directory", path.display()));
        assert!(path.is_dir(), "left as it is");
        let _ = std::fs::remove_dir_all(&d);
    }
}
