//! The networks of a running daemon and their threads: started from a configuration, changed
//! at run time (`port-add`, `port-del`, SIGHUP reload), stopped. Every port's and service's
//! thread is spawned here.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use tracing::info;
use vhost::vhost_user::Listener;

use super::build;
use super::error::{PortError, StartError};
use crate::config::{Config, NetworkConfig, PortConfig, PortMode, UplinkConfig, UplinkKind};
use crate::datapath::{run_shaper, Inject, Network, Port, PortKind};
use crate::ports::uplink::{self, Uplink};
use crate::ports::vhost::conn::{bind_socket, serve_port};
use crate::services::dhcp::LeaseWriter;
use crate::services::socknat::SocketNat;

/// What the daemon's threads share: the running networks and what it takes to add to them.
pub struct Supervisor {
    networks: RwLock<Vec<Arc<Network>>>,
    /// Private (0700) directory for the sockets between the relay and the vhost-user daemons.
    internal_dir: PathBuf,
    internal_seq: AtomicU64,
    /// Where `port-add` puts a socket it is not given a path for, and the only directory
    /// (with those under it) where it may create or connect to one.
    pub socket_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// The configuration each running network has now, to tell what a reload changes.
    configs: Mutex<Vec<NetworkConfig>>,
    /// Each running network's lease writer, by network name, for the last save at exit.
    lease_writers: Mutex<Vec<(String, Arc<LeaseWriter>)>>,
    /// Each running socket-NAT network's NAT, by network name, for the listings and metrics.
    socknats: Mutex<Vec<(String, Arc<SocketNat>)>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.internal_dir);
    }
}

/// A new private (0700) directory under the temporary directory.
pub fn private_dir() -> io::Result<PathBuf> {
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

/// Starts a named thread.
pub fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), StartError> {
    thread::Builder::new().name(name).spawn(f).map(|_| ()).map_err(|e| StartError::Host(format!("cannot start a thread: {e}")))
}

/// Binds the server-mode sockets of `n`'s guest ports (None for client-mode ones), in order.
pub fn bind_sockets(n: &NetworkConfig) -> Result<Vec<Option<UnixListener>>, StartError> {
    n.ports
        .iter()
        .filter(|p| p.tap.is_none())
        .map(|p| if p.mode == PortMode::Server { bind_socket(p).map(Some).map_err(StartError::from) } else { Ok(None) })
        .collect()
}

/// Opens the tap of a tap port.
fn open_tap(network: &str, tap: &str) -> Result<Uplink, crate::ports::uplink::UplinkError> {
    let u = UplinkConfig {
        kind: UplinkKind::Tap,
        interface: tap.to_string(),
        name: None,
        mac: None,
        own_mac: false,
        vlan: vunet_switch::vlan::PortVlan::Untagged,
        vxlan: None,
    };
    Uplink::open(network, &u, 1500)
}

impl Supervisor {
    pub fn new(internal_dir: PathBuf, socket_dir: PathBuf, state_dir: Option<PathBuf>) -> Supervisor {
        Supervisor {
            networks: RwLock::new(Vec::new()),
            internal_dir,
            internal_seq: AtomicU64::new(0),
            socket_dir,
            state_dir,
            configs: Mutex::new(Vec::new()),
            lease_writers: Mutex::new(Vec::new()),
            socknats: Mutex::new(Vec::new()),
        }
    }

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
            return Err(StartError::AlreadyRunning(n.name.clone()));
        }
        let uplink_err = |source| StartError::Uplink { network: n.name.clone(), source };
        let mut taps = HashMap::new();
        for p in &n.ports {
            if let Some(tap) = &p.tap {
                taps.insert(p.name.clone(), Arc::new(open_tap(&n.name, tap).map_err(uplink_err)?));
            }
        }
        let uplink = match &n.uplink {
            Some(u) => Some(Arc::new(Uplink::open(&n.name, u, n.mtu).map_err(uplink_err)?)),
            None => None,
        };
        let built = build::network(n, self.state_dir.as_deref(), &taps)?;
        let net = Arc::new(built.net);
        let mut links: HashMap<usize, Arc<Uplink>> = HashMap::new();
        for port in net.ports.snapshot().iter() {
            if let Some(t) = taps.get(&port.name).filter(|_| port.kind == PortKind::Tap) {
                links.insert(port.id, t.clone());
            }
        }
        if let Some(up) = uplink {
            let vlan = n.uplink.as_ref().map(|u| u.vlan.clone()).unwrap_or_default();
            let port =
                net.ports.add(|id, _| Ok::<_, StartError>(build::uplink_port(id, net.router.is_some(), up.clone(), vlan.clone())))?;
            links.insert(port.id, up);
        }
        if let (Some(gw), Some(dns)) = (net.gateway, built.dns) {
            if let Some(f) = dns.forwarder.clone() {
                let inject = Inject::new(net.clone());
                spawn(format!("dns-{}", net.name), move || f.run(inject, gw))?;
            }
            let (inject, tcp) = (Inject::new(net.clone()), dns.tcp.clone());
            spawn(format!("dns-tcp-{}", net.name), move || tcp.run(inject, gw, dns))?;
        }
        if let Some(s) = built.socknat {
            self.socknats.lock().unwrap_or_else(|e| e.into_inner()).push((net.name.clone(), s.clone()));
            let inject = Inject::new(net.clone());
            spawn(format!("socknat-{}", net.name), move || s.run(inject))?;
        }
        if let Some(s) = built.ndp {
            let inject = Inject::new(net.clone());
            spawn(format!("ra-{}", net.name), move || s.run(inject))?;
        }
        let ports = net.ports.snapshot().to_vec();
        let mut listeners = listeners.into_iter();
        for port in ports {
            match links.remove(&port.id) {
                Some(link) => self.run_link(&net, port, link)?,
                None => self.serve(&net, port, listeners.next().flatten())?,
            }
        }
        // Last, so a network that failed to start leaves no writer behind.
        if let Some(w) = built.leases {
            let net2 = net.clone();
            let w2 = w.clone();
            spawn(format!("leases-{}", net.name), move || w2.run(net2.dhcp.as_ref(), net2.dhcp6.as_deref(), &net2.stopped))?;
            self.lease_writers.lock().unwrap_or_else(|e| e.into_inner()).push((net.name.clone(), w));
        }
        self.networks.write().unwrap_or_else(|e| e.into_inner()).push(net.clone());
        self.configs.lock().unwrap_or_else(|e| e.into_inner()).push(n.clone());
        Ok(net)
    }

    /// Starts the receive thread of an uplink or tap port.
    fn run_link(&self, net: &Arc<Network>, port: Arc<Port>, link: Arc<Uplink>) -> Result<(), StartError> {
        self.start_shaper(net, &port)?;
        let inject = Inject::new(net.clone());
        spawn(format!("uplink-{}", port.name), move || uplink::run(inject, port, link))
    }

    /// Starts the network's shaper thread if `port` has an inbound rate limit and the thread
    /// does not run yet.
    fn start_shaper(&self, net: &Arc<Network>, port: &Port) -> Result<(), StartError> {
        if port.rx_limit.is_none() || net.shaper_started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let net2 = net.clone();
        spawn(format!("shaper-{}", net.name), move || run_shaper(net2))
    }

    /// Starts serving a guest port's connections on a thread of its own.
    fn serve(&self, net: &Arc<Network>, port: Arc<Port>, listener: Option<UnixListener>) -> Result<(), StartError> {
        self.start_shaper(net, &port)?;
        let internal_path = self.internal_dir.join(format!("c{}.sock", self.internal_seq.fetch_add(1, Ordering::Relaxed)));
        let internal = Listener::new(&internal_path, true)
            .map_err(|e| StartError::Host(format!("internal socket {}: {e}", internal_path.display())))?;
        let net2 = net.clone();
        spawn(format!("port-{}", port.name), move || serve_port(net2, port, listener, internal, internal_path))
    }

    /// Adds a guest or tap port to a running network (control socket `port-add`, reload).
    pub fn add_port(&self, net: &Arc<Network>, mut p: PortConfig) -> Result<Arc<Port>, PortError> {
        if p.socket.as_os_str().is_empty() && p.tap.is_none() {
            p.socket = self.socket_dir.join(format!("{}-{}.sock", net.name, p.name));
        }
        // A port added at run time gets its network's socket_mode and socket_group.
        if p.tap.is_none() && p.mode == PortMode::Server {
            if let Some(nc) = self.configs.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.name == net.name) {
                p.socket_mode = p.socket_mode.or(nc.socket_mode);
                p.socket_group = p.socket_group.or(nc.socket_group);
            }
        }
        let duplicate = || PortError::Duplicate { network: net.name.clone(), port: p.name.clone() };
        if net.port(&p.name).is_some() {
            return Err(duplicate());
        }
        if p.tap.is_none() && self.networks().iter().flat_map(|n| n.live_ports()).any(|q| q.kind == PortKind::Vhost && q.socket == p.socket)
        {
            return Err(PortError::SocketTaken(p.socket.clone()));
        }
        // The tap or socket is opened before the port is listed, outside the port list's
        // writers' lock: nothing a sender waits for is held across a system call.
        let tap = match &p.tap {
            Some(tap) => Some(Arc::new(open_tap(&net.name, tap)?)),
            None => None,
        };
        let listener = if p.tap.is_none() && p.mode == PortMode::Server { Some(bind_socket(&p)?) } else { None };
        let added = net.ports.add(|id, ports| {
            if ports.iter().any(|q| q.name == p.name && !q.removed.load(Ordering::Acquire)) {
                return Err(duplicate());
            }
            Ok(build::guest_port(id, &p, net, tap.clone()))
        });
        let port = match added {
            Ok(port) => port,
            Err(e) => {
                // Another add of the same name won the race: what was opened for this one goes.
                if listener.is_some() {
                    let _ = std::fs::remove_file(&p.socket);
                }
                return Err(e);
            }
        };
        match tap {
            Some(up) => {
                self.run_link(net, port.clone(), up)?;
                info!(network = %net.name, port = %p.name, "tap port added");
            }
            None => {
                self.serve(net, port.clone(), listener)?;
                info!(network = %net.name, port = %p.name, socket = %p.socket.display(), "port added");
            }
        }
        Ok(port)
    }

    /// Removes a port: its guest is disconnected, its socket removed; other ports go on.
    pub fn remove_port(&self, net: &Network, name: &str) -> Result<(), PortError> {
        let port = net.port(name).ok_or_else(|| PortError::NoPort { network: net.name.clone(), port: name.to_string() })?;
        if port.kind == PortKind::Uplink {
            return Err(PortError::IsUplink(name.to_string()));
        }
        self.take_out(net, &port);
        info!(network = %net.name, port = %name, "port removed");
        Ok(())
    }

    /// Takes a port out of its network: the guest is disconnected, the socket removed, the
    /// port's thread ends.
    fn take_out(&self, net: &Network, port: &Port) {
        if port.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(link) = &port.link {
            link.close();
        }
        for (_, c) in port.conn.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if port.kind == PortKind::Vhost && port.mode == PortMode::Server {
            // Wakes the port's thread in accept(); it sees `removed` and ends.
            let _ = UnixStream::connect(&port.socket);
            let _ = std::fs::remove_file(&port.socket);
        }
        port.connected.store(false, Ordering::Release);
        // Frees the MAC the port pinned: a guest coming back on another port may use it.
        net.macs.lock().unwrap_or_else(|e| e.into_inner()).remove_port(port.id);
        net.ports.retire(port.id);
    }

    /// The socket NAT of a running network, if it has one.
    pub fn socket_nat(&self, network: &str) -> Option<Arc<SocketNat>> {
        self.socknats.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(n, _)| n == network).map(|(_, s)| s.clone())
    }

    /// Stops a network: every port removed, its threads told to end.
    pub fn stop_network(&self, name: &str) -> Result<(), PortError> {
        let net = self.network(name).ok_or_else(|| PortError::NoNetwork(name.to_string()))?;
        self.networks.write().unwrap_or_else(|e| e.into_inner()).retain(|n| n.name != name);
        self.socknats.lock().unwrap_or_else(|e| e.into_inner()).retain(|(n, _)| n != name);
        net.stopped.store(true, Ordering::Release);
        // Its leases are saved now (a network of that name started again reads them), then its
        // writer sees `stopped` and ends.
        let mine: Vec<Arc<LeaseWriter>> = {
            let mut writers = self.lease_writers.lock().unwrap_or_else(|e| e.into_inner());
            let mine = writers.iter().filter(|(n, _)| n == name).map(|(_, w)| w.clone()).collect();
            writers.retain(|(n, _)| n != name);
            mine
        };
        for w in mine {
            if let Err(e) = w.write_if_changed(net.dhcp.as_ref(), net.dhcp6.as_deref()) {
                tracing::warn!(network = %name, file = %w.path.display(), "cannot save DHCP leases: {}", crate::config::io_reason(&e));
            }
        }
        for p in net.live_ports() {
            self.take_out(&net, &p);
        }
        info!(network = %name, "network stopped");
        Ok(())
    }

    /// Saves every network's leases that are not saved yet (at exit: the writers' threads
    /// may be between two writes). One line per lease file that could not be written.
    pub fn save_leases(&self) -> Vec<String> {
        let writers = self.lease_writers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut errors = Vec::new();
        for (name, w) in writers {
            let Some(net) = self.network(&name) else { continue };
            if let Err(e) = w.write_if_changed(net.dhcp.as_ref(), net.dhcp6.as_deref()) {
                errors.push(format!("lease file {}: cannot write it: {}", w.path.display(), crate::config::io_reason(&e)));
            }
        }
        errors
    }

    /// Applies a re-read configuration (SIGHUP): networks and ports that were added are
    /// started, those removed are stopped; untouched networks and ports keep running with their
    /// guests. Other changes to a running network are reported, and apply at the next start.
    /// Returns one line per thing done or refused.
    pub fn apply(self: &Arc<Self>, new: &Config) -> Vec<String> {
        let mut log = Vec::new();
        for net in self.networks() {
            if !new.networks.iter().any(|n| n.name == net.name) {
                match self.stop_network(&net.name) {
                    Ok(()) => log.push(format!("network {}: removed", net.name)),
                    Err(e) => log.push(format!("network {}: {e}", net.name)),
                }
                self.configs.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.name != net.name);
            }
        }
        for nc in &new.networks {
            let old = self.configs.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.name == nc.name).cloned();
            let Some(old) = old else {
                match bind_sockets(nc).and_then(|l| self.start_network(nc, l)) {
                    Ok(_) => log.push(format!("network {}: added", nc.name)),
                    Err(e) => log.push(format!("network {}: cannot start: {e}", nc.name)),
                }
                continue;
            };
            let Some(net) = self.network(&nc.name) else { continue };
            let settings = |c: &NetworkConfig| NetworkConfig { ports: Vec::new(), ..c.clone() };
            if settings(&old) != settings(nc) {
                log.push(format!("network {}: changes other than ports apply when vunet restarts", nc.name));
            }
            for p in old.ports.iter().filter(|p| !nc.ports.contains(p)) {
                match self.remove_port(&net, &p.name) {
                    Ok(()) => log.push(format!("network {}: port {} removed", nc.name, p.name)),
                    Err(e) => log.push(format!("network {}: {e}", nc.name)),
                }
            }
            for p in nc.ports.iter().filter(|p| !old.ports.contains(p)) {
                match self.add_port(&net, p.clone()) {
                    Ok(_) => log.push(format!("network {}: port {} added", nc.name, p.name)),
                    Err(e) => log.push(format!("network {}: port {}: {e}", nc.name, p.name)),
                }
            }
            let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = configs.iter_mut().find(|c| c.name == nc.name) {
                c.ports = nc.ports.clone();
            }
        }
        log
    }
}
