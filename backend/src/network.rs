//! Networks and their guest ports at run time: the shared state the data path reads, and the
//! per-port thread that accepts (server mode) or makes (client mode) vhost-user connections,
//! one after another, for as long as vunet runs.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vunet_switch::vnet::RxCaps;
use vunet_switch::{format_mac, DropReason, Mac, MacTable, PortCounters, PortId};

use crate::config::{io_reason, Config, Mode, NetworkConfig, PortConfig, PortMode};
use crate::datapath::ms_since;
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
    #[error("cannot start a thread: {0}")]
    Thread(String),
}

/// Where a port's senders write: the RX ring and memory of the guest connected right now.
pub struct RxTarget {
    pub vring: Vring,
    pub mem: GuestMem,
    pub caps: RxCaps,
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
    pub connected: AtomicBool,
    /// Virtio features acked on the current connection.
    pub features: AtomicU64,
    /// Number of vhost-user connections so far.
    pub connections: AtomicU64,
    last_log_ms: AtomicU64,
}

/// One virtual network: its ports and its switch.
pub struct Network {
    pub name: String,
    pub mode: Mode,
    pub mtu: u16,
    pub ports: RwLock<Vec<Arc<GuestPort>>>,
    pub macs: Mutex<MacTable>,
    epoch: Instant,
}

impl Network {
    pub fn now_ms(&self) -> u64 {
        ms_since(self.epoch)
    }

    pub fn port(&self, name: &str) -> Option<Arc<GuestPort>> {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).iter().find(|p| p.name == name).cloned()
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

/// The running daemon: every network of a configuration.
pub struct Daemon {
    pub networks: Vec<Arc<Network>>,
}

impl Daemon {
    /// Starts every network and port of `cfg`. Sockets are checked and bound before this
    /// returns, so a mistake is reported here, not later in a thread.
    pub fn start(cfg: &Config) -> Result<Daemon, StartError> {
        let mut listeners = Vec::new();
        for n in &cfg.networks {
            for p in &n.ports {
                if p.mode == PortMode::Server {
                    listeners.push(Some(bind_socket(p)?));
                } else {
                    listeners.push(None);
                }
            }
        }
        let mut listeners = listeners.into_iter();
        let mut networks = Vec::new();
        for n in &cfg.networks {
            let net = Arc::new(new_network(n));
            for port in net.ports.read().unwrap_or_else(|e| e.into_inner()).iter() {
                let listener = listeners.next().flatten();
                let (net2, port2) = (net.clone(), port.clone());
                thread::Builder::new()
                    .name(format!("port-{}", port.name))
                    .spawn(move || serve_port(net2, port2, listener))
                    .map_err(|e| StartError::Thread(e.to_string()))?;
            }
            networks.push(net);
        }
        Ok(Daemon { networks })
    }

    pub fn network(&self, name: &str) -> Option<&Arc<Network>> {
        self.networks.iter().find(|n| n.name == name)
    }
}

fn new_network(n: &NetworkConfig) -> Network {
    let ports = n
        .ports
        .iter()
        .enumerate()
        .map(|(id, p)| {
            Arc::new(GuestPort {
                id,
                name: p.name.clone(),
                socket: p.socket.clone(),
                mode: p.mode,
                mac: p.mac,
                counters: PortCounters::default(),
                rx: Mutex::new(None),
                connected: AtomicBool::new(false),
                features: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                last_log_ms: AtomicU64::new(0),
            })
        })
        .collect();
    Network { name: n.name.clone(), mode: n.mode, mtu: n.mtu, ports: RwLock::new(ports), macs: Mutex::new(MacTable::default()), epoch: Instant::now() }
}

/// Binds a server-mode socket, refusing to steal one a live process is listening on and
/// replacing a stale one left by a crash.
pub fn bind_socket(p: &PortConfig) -> Result<Listener, StartError> {
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
    Listener::new(path, false).map_err(|e| StartError::Listen {
        port,
        path: path.clone(),
        reason: match e {
            vhost::vhost_user::Error::SocketError(io) => io_reason(&io),
            other => other.to_string(),
        },
    })
}

/// Serves one port forever: one vhost-user connection after another.
fn serve_port(net: Arc<Network>, port: Arc<GuestPort>, mut listener: Option<Listener>) {
    let mut waiting_logged = false;
    loop {
        let mem: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = match PortDevice::new(net.clone(), port.clone(), mem.clone()) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                warn!(port = %port.name, "cannot create the device: {e}; retrying");
                thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut daemon = match VhostUserDaemon::new(format!("vu-{}", port.name), device.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                warn!(port = %port.name, "cannot create the vhost-user daemon: {e}; retrying");
                thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let started = match listener.as_mut() {
            Some(l) => daemon.start(l),
            None => {
                let path = port.socket.to_string_lossy().into_owned();
                let r = daemon.start_client(&path);
                if r.is_err() {
                    if !waiting_logged {
                        info!(network = %net.name, port = %port.name, socket = %path, "waiting for the VMM to listen on the socket");
                        waiting_logged = true;
                    }
                    device.notify_exit();
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
                r
            }
        };
        if let Err(e) = started {
            warn!(port = %port.name, "connection failed: {e}");
            device.notify_exit();
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        waiting_logged = false;
        port.connections.fetch_add(1, Ordering::Relaxed);
        port.connected.store(true, Ordering::Release);
        info!(network = %net.name, port = %port.name, "guest connected");
        let result = daemon.wait();
        // The guest is gone: nobody may write into its memory any more, and what was learned
        // behind this port is stale.
        port.connected.store(false, Ordering::Release);
        *port.rx.lock().unwrap_or_else(|e| e.into_inner()) = None;
        net.macs.lock().unwrap_or_else(|e| e.into_inner()).forget_port(port.id);
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        match result {
            Ok(()) => info!(network = %net.name, port = %port.name, "guest disconnected"),
            Err(e) => info!(network = %net.name, port = %port.name, "guest disconnected ({e})"),
        }
        if let Some(m) = port.mac {
            debug!(port = %port.name, mac = %format_mac(&m), "port ready for a new connection");
        }
        if listener.is_none() {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Error for any I/O failure that is not the user's to fix.
pub fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}
