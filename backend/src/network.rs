//! Networks and their guest ports at run time: the shared state the data path reads, and the
//! per-port thread that accepts (server mode) or makes (client mode) vhost-user connections,
//! one after another, for as long as vunet runs.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vunet_dhcp::dns::{DnsAction, LocalZone};
use vunet_dhcp::message::{reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::{lease_file, DhcpMessage, DhcpServer, Lease, MessageType, ServerConfig};
use vunet_switch::gateway::{build_udp, gateway_mac, udp_datagram, udp_payload, Gateway};
use vunet_switch::vnet::RxCaps;
use vunet_switch::{format_mac, DropReason, Mac, MacTable, PortCounters, PortId};

use crate::config::{io_reason, Config, Mode, NetworkConfig, PortConfig, PortMode, UplinkAddress, UplinkConfig, UplinkKind};
use crate::datapath::ms_since;
use crate::dns_service::DnsService;
use crate::uplink::Uplink;
use crate::vhost_port::{GuestMem, PortDevice, Vring};

/// A failure to start that a user can fix: printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("port {port}: socket {path}: directory does not exist")]
    NoDirectory { port: String, path: PathBuf },
    #[error("port {port}: socket {path} is in use by another process")]
    SocketInUse { port: String, path: PathBuf },
    #[error("port {port}: {path} exists and is not a socket")]
    NotASocket { port: String, path: PathBuf },
    #[error("port {port}: cannot listen on {path}: {reason}")]
    Listen { port: String, path: PathBuf, reason: String },
    #[error("control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
    #[error("state_dir {path}: {reason}")]
    StateDir { path: PathBuf, reason: String },
    #[error("network {network}: {source}")]
    Uplink { network: String, source: crate::uplink::UplinkError },
    /// A failure of the host (threads, the private socket directory), not of the config.
    #[error("{0}")]
    Host(String),
}

/// Where a port's senders write: the RX ring and memory of the guest connected right now.
pub struct RxTarget {
    pub vring: Vring,
    pub mem: GuestMem,
    pub caps: RxCaps,
    /// Frames waiting for receive buffers.
    pub backlog: crate::datapath::Backlog,
}

/// A guest port: configuration, counters, and the current connection's RX target.
pub struct GuestPort {
    pub id: PortId,
    pub name: String,
    pub socket: PathBuf,
    pub mode: PortMode,
    pub mac: Option<Mac>,
    pub counters: PortCounters,
    pub rx: Mutex<Option<RxTarget>>,
    /// Port security on this port (own MAC, own leased IP, no DHCP server).
    pub security: bool,
    /// The MAC the port is locked to (bit 48 set when locked): the configured one, else the
    /// first one its guest sends with.
    locked_mac: AtomicU64,
    /// The IPv4 address the port's guest holds a lease for (0: none).
    leased_ip: AtomicU32,
    /// Set while frames wait in the receive backlog, so an RX kick with nothing to flush does
    /// not take the lock the senders are using.
    pub backlogged: AtomicBool,
    pub connected: AtomicBool,
    /// Virtio features acked on the current connection.
    pub features: AtomicU64,
    /// Number of vhost-user connections so far.
    pub connections: AtomicU64,
    last_log_ms: AtomicU64,
    /// Set on the network's uplink port: frames for it go to a host interface, not a guest.
    pub uplink: Option<Arc<crate::uplink::Uplink>>,
    /// The uplink of a nat or route network: not switched at L2 with the guests; its frames
    /// go through the router.
    pub routed: bool,
    /// Set when the port is deleted at run time; its thread ends, its slot stays (port ids
    /// index the network's port list).
    pub removed: AtomicBool,
    /// The current VMM connection, to cut it when the port is removed.
    conn: Mutex<Option<UnixStream>>,
    /// Set while at least one `vunet capture` listens on this port.
    pub capturing: AtomicBool,
    captures: Mutex<Vec<std::sync::mpsc::SyncSender<crate::capture::Captured>>>,
}

/// One virtual network: its ports and its switch.
pub struct Network {
    pub name: String,
    pub mode: Mode,
    pub mtu: u16,
    /// The network's own endpoint at its gateway address (ARP, ping), if it has one.
    pub gateway: Option<Gateway>,
    /// The gateway's DNS service.
    pub dns: Option<DnsService>,
    /// The gateway's DHCP server, and the file its leases persist in.
    pub dhcp: Option<Mutex<DhcpServer>>,
    pub lease_file: Option<PathBuf>,
    pub ports: RwLock<Vec<Arc<GuestPort>>>,
    pub macs: Mutex<MacTable>,
    epoch: Instant,
    /// Set when the network is taken out of a running daemon; its threads end.
    pub stopped: AtomicBool,
    /// The router between the guests and the uplink (nat and route networks).
    pub router: Option<Mutex<vunet_switch::router::Router>>,
    /// Whether the uplink address comes from a DHCP lease over the uplink.
    pub uplink_dhcp: bool,
}

const LOCKED: u64 = 1 << 48;

fn mac_word(m: &Mac) -> u64 {
    m.iter().fold(LOCKED, |w, &b| (w & !LOCKED) << 8 | b as u64 | LOCKED)
}

impl GuestPort {
    /// The MAC this port is locked to, locking it to `seen` if it is not yet. On first lock
    /// the address leased to that MAC (if any) becomes the port's.
    pub fn lock_mac(&self, seen: Mac, net: &Network) -> Mac {
        let w = self.locked_mac.load(Ordering::Relaxed);
        if w & LOCKED != 0 {
            return (w & !LOCKED).to_be_bytes()[2..8].try_into().unwrap_or(seen);
        }
        if self.locked_mac.compare_exchange(0, mac_word(&seen), Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            if let Some(ip) = net.dhcp.as_ref().and_then(|d| d.lock().unwrap_or_else(|e| e.into_inner()).ip_of(&seen, unix_now())) {
                self.leased_ip.store(u32::from(ip), Ordering::Relaxed);
            }
            return seen;
        }
        self.lock_mac(seen, net)
    }

    pub fn locked_mac(&self) -> Option<Mac> {
        let w = self.locked_mac.load(Ordering::Relaxed);
        (w & LOCKED != 0).then(|| (w & !LOCKED).to_be_bytes()[2..8].try_into().unwrap_or([0; 6]))
    }

    pub fn leased_ip(&self) -> Option<Ipv4Addr> {
        match self.leased_ip.load(Ordering::Relaxed) {
            0 => None,
            v => Some(Ipv4Addr::from(v)),
        }
    }

    /// Takes the port out of its network: the guest is disconnected, the socket removed, the
    /// port's thread ends.
    pub fn remove(&self, net: &Network) {
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(up) = &self.uplink {
            up.close();
        }
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if self.uplink.is_none() && self.mode == PortMode::Server {
            // Wakes the port's thread in accept(); it sees `removed` and ends.
            let _ = UnixStream::connect(&self.socket);
            let _ = std::fs::remove_file(&self.socket);
        }
        self.connected.store(false, Ordering::Release);
        net.macs.lock().unwrap_or_else(|e| e.into_inner()).forget_port(self.id);
    }

    /// Starts sending this port's frames to a capture.
    pub fn add_capture(&self, tx: std::sync::mpsc::SyncSender<crate::capture::Captured>) {
        let mut c = self.captures.lock().unwrap_or_else(|e| e.into_inner());
        c.push(tx);
        self.capturing.store(true, Ordering::Release);
    }

    /// Hands a copy of a frame seen on this port to its captures; forgets captures whose
    /// client is gone. Called only while `capturing` is set.
    pub fn capture(&self, frame: &[u8]) {
        let ts = crate::capture::now();
        let mut c = self.captures.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|tx| !matches!(tx.try_send((ts, frame.to_vec())), Err(std::sync::mpsc::TrySendError::Disconnected(_))));
        if c.is_empty() {
            self.capturing.store(false, Ordering::Release);
        }
    }

    /// A guest left: the next one may have another MAC and must lease its address anew.
    fn forget_guest(&self) {
        self.locked_mac.store(self.mac.map(|m| mac_word(&m)).unwrap_or(0), Ordering::Relaxed);
        self.leased_ip.store(0, Ordering::Relaxed);
    }
}

impl Network {
    pub fn now_ms(&self) -> u64 {
        ms_since(self.epoch)
    }

    /// The names the gateway answers for right now: `dns.hosts`, named static DHCP hosts, and
    /// DHCP clients that sent a host name.
    pub fn dns_zone(&self, gw: &Gateway) -> LocalZone {
        let mut names: Vec<(String, Ipv4Addr)> = self.dns.as_ref().map(|d| d.hosts.clone()).unwrap_or_default();
        if let Some(dhcp) = &self.dhcp {
            let server = dhcp.lock().unwrap_or_else(|e| e.into_inner());
            names.extend(server.config().hosts.iter().filter_map(|h| Some((h.name.clone()?, h.ip))));
            names.extend(server.leases(unix_now()).into_iter().filter_map(|l| Some((l.hostname?, l.ip))));
        }
        LocalZone { domain: self.dns.as_ref().and_then(|d| d.domain.clone()), names, subnet: (gw.ip, gw.prefix) }
    }

    /// Answers a DNS query from a guest (UDP to port 53 of the gateway) into `out`, or
    /// forwards it upstream (then the answer comes later, from the forwarder's thread).
    pub fn serve_dns(&self, port: &GuestPort, gw: &Gateway, frame: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(dns) = self.dns.as_ref() else { return false };
        if frame[0..6] != gw.mac {
            return false;
        }
        let Some((client_ip, client_port, query)) = udp_datagram(frame, vunet_dhcp::dns::PORT) else { return false };
        let client_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let answer = match self.dns_zone(gw).respond(query) {
            Some(DnsAction::Answer(a)) => a,
            Some(DnsAction::Forward) => match &dns.forwarder {
                Some(f) => {
                    f.forward(query, port.id, client_mac, client_ip, client_port);
                    return false;
                }
                None => vunet_dhcp::dns::refused(query),
            },
            None => return false,
        };
        build_udp(out, gw.mac, client_mac, gw.ip, client_ip, vunet_dhcp::dns::PORT, client_port, &answer);
        true
    }

    /// Answers a DHCP message from a guest (a UDP datagram to port 67 in `frame`), writing the
    /// reply frame to `out`. Lease changes are saved to the lease file at once.
    pub fn serve_dhcp(&self, port: &GuestPort, gw: &Gateway, frame: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(dhcp) = self.dhcp.as_ref() else {
            return false;
        };
        let Some((_, payload)) = udp_payload(frame, SERVER_PORT) else {
            return false;
        };
        let Ok(msg) = DhcpMessage::parse(payload) else {
            return false;
        };
        // With port security a guest leases only for its own MAC (no pool exhaustion with
        // made-up client addresses).
        if port.security && port.locked_mac() != Some(msg.chaddr) {
            port.counters.dropped(DropReason::SpoofedMac);
            return false;
        }
        let now = unix_now();
        let mut server = dhcp.lock().unwrap_or_else(|e| e.into_inner());
        let reply = server.handle(&msg, now);
        match (&reply, msg.msg_type) {
            (_, MessageType::Inform) => {}
            (Some(r), _) if r.msg_type == MessageType::Ack => {
                if let Some(ip) = reply_yiaddr(&r.payload).filter(|ip| !ip.is_unspecified()) {
                    port.leased_ip.store(u32::from(ip), Ordering::Relaxed);
                }
            }
            (_, MessageType::Release | MessageType::Decline) => port.leased_ip.store(0, Ordering::Relaxed),
            _ => {}
        }
        if matches!(msg.msg_type, MessageType::Request | MessageType::Release | MessageType::Decline) {
            if let Some(path) = &self.lease_file {
                if let Err(e) = save_leases(path, &server.leases(now)) {
                    warn!(network = %self.name, file = %path.display(), "cannot save DHCP leases: {e}");
                }
            }
        }
        drop(server);
        match reply {
            Some(r) => {
                build_udp(out, gw.mac, r.dst_mac, gw.ip, r.dst_ip, SERVER_PORT, CLIENT_PORT, &r.payload);
                true
            }
            None => false,
        }
    }

    /// The live port named `name`.
    pub fn port(&self, name: &str) -> Option<Arc<GuestPort>> {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).iter().find(|p| p.name == name && !p.removed.load(Ordering::Acquire)).cloned()
    }

    /// The ports that have not been removed.
    pub fn live_ports(&self) -> Vec<Arc<GuestPort>> {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).iter().filter(|p| !p.removed.load(Ordering::Acquire)).cloned().collect()
    }

    /// Logs a dropped frame at most once per second per port: a hostile guest can make drops
    /// at line rate, the log must not follow it.
    pub fn log_drop(&self, port: &GuestPort, r: DropReason) {
        let now = self.now_ms() + 1000;
        let last = port.last_log_ms.load(Ordering::Relaxed);
        if now >= last + 1000 && port.last_log_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            warn!(network = %self.name, port = %port.name, reason = r.name(), "dropped a frame from the guest (further drops counted, logged at most once a second)");
        }
    }
}

/// The running daemon: every network of a configuration, changeable at run time (control
/// socket `port-add`/`port-del`, SIGHUP reload).
pub struct Daemon {
    pub shared: Arc<Shared>,
}

/// What the daemon's threads share.
pub struct Shared {
    networks: RwLock<Vec<Arc<Network>>>,
    /// Private (0700) directory for the sockets between the relay and the vhost-user daemons.
    internal_dir: PathBuf,
    internal_seq: AtomicU64,
    /// Where `port-add` puts a socket it is not given a path for.
    pub socket_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// The configuration each running network has now, to tell what a reload changes.
    configs: Mutex<Vec<NetworkConfig>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.internal_dir);
    }
}

fn private_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let dir = std::env::temp_dir().join(format!("vunet-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), StartError> {
    thread::Builder::new().name(name).spawn(f).map(|_| ()).map_err(|e| StartError::Host(format!("cannot start a thread: {e}")))
}

/// Binds the server-mode sockets of `n`'s guest ports (None for client-mode ones), in order.
fn bind_sockets(n: &NetworkConfig) -> Result<Vec<Option<UnixListener>>, StartError> {
    n.ports
        .iter()
        .filter(|p| p.tap.is_none())
        .map(|p| if p.mode == PortMode::Server { bind_socket(p).map(Some) } else { Ok(None) })
        .collect()
}

impl Daemon {
    /// Starts every network and port of `cfg`. Sockets are checked and bound before this
    /// returns, so a mistake is reported here, not later in a thread.
    pub fn start(cfg: &Config) -> Result<Daemon, StartError> {
        let mut listeners = Vec::new();
        for n in &cfg.networks {
            listeners.push(bind_sockets(n)?);
        }
        if let Some(dir) = &cfg.state_dir {
            std::fs::create_dir_all(dir).map_err(|e| StartError::StateDir { path: dir.clone(), reason: io_reason(&e) })?;
        }
        let internal_dir = private_dir().map_err(|e| {
            StartError::Host(format!("cannot create a private directory in {}: {}", std::env::temp_dir().display(), io_reason(&e)))
        })?;
        let socket_dir = cfg
            .control_socket
            .as_deref()
            .and_then(|c| c.parent())
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .or_else(|| cfg.networks.iter().flat_map(|n| &n.ports).find_map(|p| p.socket.parent().map(Path::to_path_buf)))
            .unwrap_or_else(std::env::temp_dir);
        let shared = Arc::new(Shared {
            networks: RwLock::new(Vec::new()),
            internal_dir,
            internal_seq: AtomicU64::new(0),
            socket_dir,
            state_dir: cfg.state_dir.clone(),
            configs: Mutex::new(Vec::new()),
        });
        for (n, l) in cfg.networks.iter().zip(listeners) {
            shared.start_network(n, l)?;
        }
        if let Some(path) = &cfg.control_socket {
            let listener = crate::control::bind(path, cfg.control_group.as_deref())?;
            let s = shared.clone();
            spawn("control".into(), move || crate::control::serve(listener, s))?;
        }
        if let Some(addr) = cfg.metrics_listen {
            crate::metrics::start(addr, shared.clone())
                .map_err(|e| StartError::Host(format!("metrics_listen {addr}: {}", io_reason(&e))))?;
        }
        Ok(Daemon { shared })
    }

    pub fn network(&self, name: &str) -> Option<Arc<Network>> {
        self.shared.network(name)
    }

    pub fn networks(&self) -> Vec<Arc<Network>> {
        self.shared.networks()
    }

    /// Applies a re-read configuration (SIGHUP): networks and ports that were added are
    /// started, those removed are stopped; untouched networks and ports keep running with their
    /// guests. Other changes to a running network are reported, and apply at the next start.
    /// Returns one line per thing done or refused.
    pub fn apply(&self, new: &Config) -> Vec<String> {
        let sh = &self.shared;
        let mut log = Vec::new();
        for net in sh.networks() {
            if !new.networks.iter().any(|n| n.name == net.name) {
                match sh.stop_network(&net.name) {
                    Ok(()) => log.push(format!("network {}: removed", net.name)),
                    Err(e) => log.push(format!("network {}: {e}", net.name)),
                }
                sh.configs.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.name != net.name);
            }
        }
        for nc in &new.networks {
            let old = sh.configs.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.name == nc.name).cloned();
            let Some(old) = old else {
                match bind_sockets(nc).and_then(|l| sh.start_network(nc, l)) {
                    Ok(_) => log.push(format!("network {}: added", nc.name)),
                    Err(e) => log.push(format!("network {}: cannot start: {e}", nc.name)),
                }
                continue;
            };
            let Some(net) = sh.network(&nc.name) else { continue };
            let settings = |c: &NetworkConfig| NetworkConfig { ports: Vec::new(), ..c.clone() };
            if settings(&old) != settings(nc) {
                log.push(format!("network {}: changes other than ports apply when vunet restarts", nc.name));
            }
            for p in old.ports.iter().filter(|p| !nc.ports.contains(p)) {
                match sh.remove_port(&net, &p.name) {
                    Ok(()) => log.push(format!("network {}: port {} removed", nc.name, p.name)),
                    Err(e) => log.push(format!("network {}: {e}", nc.name)),
                }
            }
            for p in nc.ports.iter().filter(|p| !old.ports.contains(p)) {
                match sh.add_port(&net, p.clone()) {
                    Ok(_) => log.push(format!("network {}: port {} added", nc.name, p.name)),
                    Err(e) => log.push(format!("network {}: port {}: {e}", nc.name, p.name)),
                }
            }
            let mut configs = sh.configs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = configs.iter_mut().find(|c| c.name == nc.name) {
                c.ports = nc.ports.clone();
            }
        }
        log
    }
}

impl Shared {
    pub fn network(&self, name: &str) -> Option<Arc<Network>> {
        self.networks.read().unwrap_or_else(|e| e.into_inner()).iter().find(|n| n.name == name).cloned()
    }

    pub fn networks(&self) -> Vec<Arc<Network>> {
        self.networks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts one network: its taps and uplink, its gateway's DNS threads, its guest ports
    /// (`listeners`: the bound sockets of its server-mode ports, in order).
    pub fn start_network(self: &Arc<Self>, n: &NetworkConfig, listeners: Vec<Option<UnixListener>>) -> Result<Arc<Network>, StartError> {
        if self.network(&n.name).is_some() {
            return Err(StartError::Host(format!("network {} already runs", n.name)));
        }
        let mut taps = HashMap::new();
        for p in &n.ports {
            if let Some(tap) = &p.tap {
                let u = UplinkConfig { kind: UplinkKind::Tap, interface: tap.clone(), name: None, mac: None, own_mac: false };
                let up = Uplink::open(&n.name, &u).map_err(|source| StartError::Uplink { network: n.name.clone(), source })?;
                taps.insert(p.name.clone(), Arc::new(up));
            }
        }
        let uplink = match &n.uplink {
            Some(u) => Some(Arc::new(Uplink::open(&n.name, u).map_err(|source| StartError::Uplink { network: n.name.clone(), source })?)),
            None => None,
        };
        let net = Arc::new(new_network(n, self.state_dir.as_deref(), &mut taps));
        if let Some(up) = uplink {
            let port = Arc::new(uplink_port(&net, up));
            net.ports.write().unwrap_or_else(|e| e.into_inner()).push(port);
        }
        if let (Some(gw), Some(f)) = (net.gateway, net.dns.as_ref().and_then(|d| d.forwarder.clone())) {
            let net2 = net.clone();
            spawn(format!("dns-{}", net.name), move || f.run(net2, gw))?;
        }
        if let (Some(gw), Some(dns)) = (net.gateway, net.dns.as_ref()) {
            let (net2, tcp, upstreams) = (net.clone(), dns.tcp.clone(), dns.upstreams.clone());
            spawn(format!("dns-tcp-{}", net.name), move || tcp.run(net2, gw, upstreams))?;
        }
        let ports = net.ports.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut listeners = listeners.into_iter();
        for port in ports {
            match port.uplink.clone() {
                Some(up) => {
                    let net2 = net.clone();
                    spawn(format!("uplink-{}", port.name), move || crate::uplink::run(net2, port, up))?;
                }
                None => self.serve(&net, port, listeners.next().flatten())?,
            }
        }
        self.networks.write().unwrap_or_else(|e| e.into_inner()).push(net.clone());
        self.configs.lock().unwrap_or_else(|e| e.into_inner()).push(n.clone());
        Ok(net)
    }

    /// Starts serving a guest port's connections on a thread of its own.
    fn serve(&self, net: &Arc<Network>, port: Arc<GuestPort>, listener: Option<UnixListener>) -> Result<(), StartError> {
        let internal_path = self.internal_dir.join(format!("c{}.sock", self.internal_seq.fetch_add(1, Ordering::Relaxed)));
        let internal = Listener::new(&internal_path, true)
            .map_err(|e| StartError::Host(format!("internal socket {}: {e}", internal_path.display())))?;
        let net2 = net.clone();
        spawn(format!("port-{}", port.name), move || serve_port(net2, port, listener, internal, internal_path))
    }

    /// Adds a guest port to a running network (control socket `port-add`).
    pub fn add_port(&self, net: &Arc<Network>, mut p: PortConfig) -> Result<Arc<GuestPort>, String> {
        if p.socket.as_os_str().is_empty() && p.tap.is_none() {
            p.socket = self.socket_dir.join(format!("{}-{}.sock", net.name, p.name));
        }
        if net.port(&p.name).is_some() {
            return Err(format!("network {:?} already has a port named {:?}", net.name, p.name));
        }
        if p.tap.is_none() && self.networks().iter().flat_map(|n| n.live_ports()).any(|q| q.uplink.is_none() && q.socket == p.socket) {
            return Err(format!("socket {} is used by another port", p.socket.display()));
        }
        let mut ports = net.ports.write().unwrap_or_else(|e| e.into_inner());
        if ports.iter().any(|q| q.name == p.name && !q.removed.load(Ordering::Acquire)) {
            return Err(format!("network {:?} already has a port named {:?}", net.name, p.name));
        }
        if let Some(tap) = &p.tap {
            let u = UplinkConfig { kind: UplinkKind::Tap, interface: tap.clone(), name: None, mac: None, own_mac: false };
            let up = Arc::new(Uplink::open(&net.name, &u).map_err(|e| e.to_string())?);
            let port = Arc::new(guest_port(ports.len(), &p, net.gateway.is_some(), Some(up.clone())));
            ports.push(port.clone());
            drop(ports);
            let (net2, port2) = (net.clone(), port.clone());
            spawn(format!("uplink-{}", port.name), move || crate::uplink::run(net2, port2, up)).map_err(|e| e.to_string())?;
            info!(network = %net.name, port = %p.name, "tap port added");
            return Ok(port);
        }
        let listener = if p.mode == PortMode::Server { Some(bind_socket(&p).map_err(|e| e.to_string())?) } else { None };
        let port = Arc::new(guest_port(ports.len(), &p, net.gateway.is_some(), None));
        ports.push(port.clone());
        drop(ports);
        self.serve(net, port.clone(), listener).map_err(|e| e.to_string())?;
        info!(network = %net.name, port = %p.name, socket = %p.socket.display(), "port added");
        Ok(port)
    }

    /// Removes a port: its guest is disconnected, its socket removed; other ports go on.
    pub fn remove_port(&self, net: &Network, name: &str) -> Result<(), String> {
        let port = net.port(name).ok_or_else(|| format!("network {:?} has no port named {name:?}", net.name))?;
        if port.uplink.is_some() && port.name.starts_with("uplink:") {
            return Err(format!("{name:?} is the network's uplink, not a port"));
        }
        port.remove(net);
        info!(network = %net.name, port = %name, "port removed");
        Ok(())
    }

    /// Stops a network: every port removed, its threads told to end.
    pub fn stop_network(&self, name: &str) -> Result<(), String> {
        let net = self.network(name).ok_or_else(|| format!("no network named {name:?}"))?;
        self.networks.write().unwrap_or_else(|e| e.into_inner()).retain(|n| n.name != name);
        net.stopped.store(true, Ordering::Release);
        for p in net.live_ports() {
            p.remove(&net);
        }
        info!(network = %name, "network stopped");
        Ok(())
    }
}

/// Seconds since the Unix epoch: the DHCP server's clock, so lease expiries survive restarts.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

fn dhcp_server(n: &NetworkConfig, lease_file: Option<&Path>) -> Option<DhcpServer> {
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

/// The switch port of a network's uplink (always "connected"; the uplink itself knows whether
/// its interface is there).
fn uplink_port(net: &Network, up: Arc<crate::uplink::Uplink>) -> GuestPort {
    GuestPort {
        id: net.ports.read().unwrap_or_else(|e| e.into_inner()).len(),
        name: format!("uplink:{}", up.ifname),
        socket: PathBuf::new(),
        mode: PortMode::Server,
        mac: None,
        counters: PortCounters::default(),
        rx: Mutex::new(None),
        security: false,
        locked_mac: AtomicU64::new(0),
        leased_ip: AtomicU32::new(0),
        backlogged: AtomicBool::new(false),
        connected: AtomicBool::new(true),
        features: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        last_log_ms: AtomicU64::new(0),
        uplink: Some(up),
        routed: net.router.is_some(),
        removed: AtomicBool::new(false),
        conn: Mutex::new(None),
        capturing: AtomicBool::new(false),
        captures: Mutex::new(Vec::new()),
    }
}

/// A port of a network (`has_gateway`: port security defaults on), with its tap if it is one.
fn guest_port(id: PortId, p: &PortConfig, has_gateway: bool, tap: Option<Arc<Uplink>>) -> GuestPort {
    GuestPort {
        id,
        name: p.name.clone(),
        socket: p.socket.clone(),
        mode: p.mode,
        mac: p.mac,
        counters: PortCounters::default(),
        rx: Mutex::new(None),
        // A tap port is the host's own interface: trusted unless asked otherwise.
        security: p.port_security.unwrap_or(has_gateway && p.tap.is_none()),
        locked_mac: AtomicU64::new(p.mac.map(|m| mac_word(&m)).unwrap_or(0)),
        leased_ip: AtomicU32::new(0),
        backlogged: AtomicBool::new(false),
        connected: AtomicBool::new(p.tap.is_some()),
        features: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        last_log_ms: AtomicU64::new(0),
        uplink: tap,
        routed: false,
        removed: AtomicBool::new(false),
        conn: Mutex::new(None),
        capturing: AtomicBool::new(false),
        captures: Mutex::new(Vec::new()),
    }
}

fn new_network(n: &NetworkConfig, state_dir: Option<&Path>, taps: &mut HashMap<String, Arc<Uplink>>) -> Network {
    let ports = n.ports.iter().enumerate().map(|(id, p)| Arc::new(guest_port(id, p, n.gateway.is_some(), taps.remove(&p.name)))).collect();
    let gateway = n.gateway.map(|(ip, prefix)| Gateway { mac: gateway_mac(&n.name), ip, prefix });
    let lease_file = state_dir.filter(|_| n.dhcp.is_some()).map(|d| d.join(format!("{}.leases", n.name)));
    let dns = gateway.map(|_| DnsService::new(&n.name, &n.dns));
    let dhcp = dhcp_server(n, lease_file.as_deref()).map(Mutex::new);
    Network {
        name: n.name.clone(),
        mode: n.mode,
        mtu: n.mtu,
        gateway,
        dhcp,
        dns,
        lease_file,
        ports: RwLock::new(ports),
        macs: Mutex::new(MacTable::default()),
        epoch: Instant::now(),
        stopped: AtomicBool::new(false),
        router: router(n, gateway),
        uplink_dhcp: n.routing.as_ref().is_some_and(|r| r.address == UplinkAddress::Dhcp),
    }
}

/// The router of a nat or route network with an uplink; a static uplink address is set at
/// once, a leased one when the lease comes.
fn router(n: &NetworkConfig, gateway: Option<Gateway>) -> Option<Mutex<vunet_switch::router::Router>> {
    use vunet_switch::router::{RouteMode, Router, RouterConfig};
    let (r, inside) = (n.routing.as_ref()?, gateway?);
    let cfg = RouterConfig {
        mode: if n.mode == Mode::Nat { RouteMode::Nat } else { RouteMode::Route },
        inside,
        outside_mac: r.mac,
        next_hop: None,
        routes: r.routes.clone(),
        proxy_arp: r.proxy_arp,
        nat: r.nat.clone(),
        firewall: r.firewall.clone(),
        firewall_default: r.firewall_default,
    };
    let mut router = Router::new(cfg, None);
    if let UplinkAddress::Static { addr, router: next_hop } = r.address {
        // The gratuitous ARP goes out when the uplink thread starts.
        router.set_outside(Some(addr), next_hop, &mut Vec::new());
    }
    Some(Mutex::new(router))
}

/// Binds a server-mode socket, refusing to steal one a live process is listening on and
/// replacing a stale one left by a crash.
pub fn bind_socket(p: &PortConfig) -> Result<UnixListener, StartError> {
    let path = &p.socket;
    let port = p.name.clone();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(StartError::NoDirectory { port, path: path.clone() });
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(StartError::NotASocket { port, path: path.clone() });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse { port, path: path.clone() });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| StartError::Listen { port, path: path.clone(), reason: io_reason(&e) })
}

/// Waits for the next VMM connection: accepted on the port's socket (server mode), or made to
/// the VMM's socket, retried every 100 ms (client mode).
fn next_frontend(net: &Network, port: &GuestPort, listener: Option<&UnixListener>) -> Option<UnixStream> {
    let mut waiting_logged = false;
    loop {
        if port.removed.load(Ordering::Acquire) {
            return None;
        }
        let r = match listener {
            Some(l) => l.accept().map(|(s, _)| s),
            None => UnixStream::connect(&port.socket),
        };
        match r {
            Ok(s) => return Some(s),
            Err(e) => {
                if !waiting_logged {
                    match listener {
                        Some(_) => {
                            warn!(network = %net.name, port = %port.name, "accept failed: {}", io_reason(&e))
                        }
                        None => {
                            info!(network = %net.name, port = %port.name, socket = %port.socket.display(), "waiting for the VMM to listen on the socket ({})", io_reason(&e))
                        }
                    }
                    waiting_logged = true;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one port forever: one vhost-user connection after another, each with a fresh
/// device and daemon.
fn serve_port(net: Arc<Network>, port: Arc<GuestPort>, listener: Option<UnixListener>, mut internal: Listener, internal_path: PathBuf) {
    loop {
        let Some(frontend) = next_frontend(&net, &port, listener.as_ref()) else { break };
        if port.removed.load(Ordering::Acquire) {
            break;
        }
        *port.conn.lock().unwrap_or_else(|e| e.into_inner()) = frontend.try_clone().ok();
        let mem: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let started = PortDevice::new(net.clone(), port.clone(), mem.clone())
            .map_err(|e| e.to_string())
            .and_then(|d| {
                let d = Arc::new(d);
                VhostUserDaemon::new(format!("vu-{}", port.name), d.clone(), mem).map(|daemon| (d, daemon)).map_err(|e| e.to_string())
            })
            .and_then(|(d, mut daemon)| {
                let backend_end = UnixStream::connect(&internal_path).map_err(|e| e.to_string())?;
                crate::proxy::spawn(frontend, backend_end, &port.name).map_err(|e| e.to_string())?;
                match daemon.start(&mut internal) {
                    Ok(()) => Ok((d, daemon)),
                    Err(e) => {
                        d.notify_exit();
                        Err(e.to_string())
                    }
                }
            });
        let (_device, mut daemon) = match started {
            Ok(x) => x,
            Err(e) => {
                warn!(network = %net.name, port = %port.name, "cannot serve the connection: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        port.connections.fetch_add(1, Ordering::Relaxed);
        port.connected.store(true, Ordering::Release);
        info!(network = %net.name, port = %port.name, "guest connected");
        let result = daemon.wait();
        // The guest is gone: nobody may write into its memory any more, and what was learned
        // behind this port is stale.
        port.connected.store(false, Ordering::Release);
        *port.rx.lock().unwrap_or_else(|e| e.into_inner()) = None;
        port.forget_guest();
        net.macs.lock().unwrap_or_else(|e| e.into_inner()).forget_port(port.id);
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        let counters = port.counters.snapshot();
        match result {
            Ok(()) => {
                info!(network = %net.name, port = %port.name, "guest disconnected; port totals: {counters}")
            }
            Err(e) => {
                info!(network = %net.name, port = %port.name, "guest disconnected ({e}); port totals: {counters}")
            }
        }
        if let Some(m) = port.mac {
            debug!(port = %port.name, mac = %format_mac(&m), "port ready for a new connection");
        }
        port.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        if port.removed.load(Ordering::Acquire) {
            break;
        }
        if listener.is_none() {
            thread::sleep(Duration::from_millis(100));
        }
    }
    debug!(network = %net.name, port = %port.name, "port thread ends");
}
