//! The daemon: starts the networks of a configuration under a `Supervisor`, then the control
//! socket and the metrics endpoint over it. The top of the backend's layers; `main.rs` only
//! turns the command line into a call here.

use std::path::Path;
use std::sync::Arc;

use crate::config::{io_reason, Config, PortMode};
use crate::datapath::Network;
use crate::ports::uplink::Uplink;
use crate::ports::vhost::conn::check_socket;
use crate::runtime::{private_dir, spawn, StartError, Supervisor};

/// The running daemon: every network of a configuration, changeable at run time (control
/// socket `port-add`/`port-del`, SIGHUP reload).
pub struct Daemon {
    pub shared: Arc<Supervisor>,
}

impl Daemon {
    /// Starts every network and port of `cfg`. Sockets are checked and bound before this
    /// returns, so a mistake is reported here, not later in a thread.
    pub fn start(cfg: &Config) -> Result<Daemon, StartError> {
        let mut listeners = Vec::new();
        for n in &cfg.networks {
            listeners.push(crate::runtime::bind_sockets(n)?);
        }
        if let Some(dir) = &cfg.state_dir {
            // Made owner-only if vunet makes it: the leases name every guest.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StartError::StateDir { path: dir.clone(), reason: io_reason(&e) })?;
        }
        let internal_dir = private_dir().map_err(|e| {
            StartError::Host(format!("cannot create a private directory in {}: {}", std::env::temp_dir().display(), io_reason(&e)))
        })?;
        // Where `port-add` creates sockets, and the only place it may.
        if let Some(dir) = &cfg.socket_dir {
            std::fs::create_dir_all(dir).map_err(|e| StartError::SocketDir { path: dir.clone(), reason: io_reason(&e) })?;
        }
        let socket_dir = cfg
            .socket_dir
            .clone()
            .or_else(|| cfg.control_socket.as_deref().and_then(|c| c.parent()).filter(|d| !d.as_os_str().is_empty()).map(Path::to_path_buf))
            .or_else(|| cfg.networks.iter().flat_map(|n| &n.ports).find_map(|p| p.socket.parent().map(Path::to_path_buf)))
            .unwrap_or_else(std::env::temp_dir);
        let shared = Arc::new(Supervisor::new(internal_dir, socket_dir, cfg.state_dir.clone()));
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

    /// What `start` would refuse on this host, found without binding or creating anything: a
    /// server socket's directory that does not exist, a socket path taken by another kind of
    /// file, an uplink interface that does not exist, an unknown control group. A socket in use
    /// passes: before a SIGHUP, the running daemon holds it.
    pub fn check(cfg: &Config) -> Result<(), StartError> {
        for n in &cfg.networks {
            for p in n.ports.iter().filter(|p| p.tap.is_none() && p.mode == PortMode::Server) {
                check_socket(p)?;
            }
            if let Some(u) = &n.uplink {
                Uplink::check(u).map_err(|source| StartError::Uplink { network: n.name.clone(), source })?;
            }
        }
        if let (Some(path), Some(group)) = (&cfg.control_socket, &cfg.control_group) {
            crate::config::group_id(group)
                .ok_or_else(|| StartError::Control { path: path.clone(), reason: format!("no group named {group:?}") })?;
        }
        Ok(())
    }

    pub fn network(&self, name: &str) -> Option<Arc<Network>> {
        self.shared.network(name)
    }

    pub fn networks(&self) -> Vec<Arc<Network>> {
        self.shared.networks()
    }

    /// Saves the leases not saved yet (before the process exits); one line per failure.
    pub fn save_leases(&self) -> Vec<String> {
        self.shared.save_leases()
    }

    /// Applies a re-read configuration (SIGHUP); one line per thing done or refused.
    pub fn apply(&self, new: &Config) -> Vec<String> {
        self.shared.apply(new)
    }
}
