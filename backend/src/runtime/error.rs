//! Typed errors of the run-time layer. Each prints as the one line a user sees (the CLI, the
//! control socket's answer, a reload's log), naming the object it is about.

use std::path::PathBuf;

use thiserror::Error;

use crate::ports::uplink::UplinkError;
use crate::ports::vhost::conn::BindError;
use crate::services::dhcp::LeaseFileUnreadable;

/// A failure to start that a user can fix: printed as one line.
#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
    #[error("socket_dir {}: {reason}", path.display())]
    SocketDir { path: PathBuf, reason: String },
    #[error("state_dir {path}: {reason}")]
    StateDir { path: PathBuf, reason: String },
    #[error(transparent)]
    Leases(#[from] LeaseFileUnreadable),
    #[error("network {network}: {source}")]
    Uplink { network: String, source: UplinkError },
    #[error("network {0} already runs")]
    AlreadyRunning(String),
    /// A failure of the host (threads, the private socket directory), not of the config.
    #[error("{0}")]
    Host(String),
}

/// Why a port or network could not be added or removed at run time (`port-add`, `port-del`,
/// a reload).
#[derive(Debug, Error)]
pub enum PortError {
    #[error("no network named {0:?}")]
    NoNetwork(String),
    #[error("network {network:?} has no port named {port:?}")]
    NoPort { network: String, port: String },
    #[error("network {network:?} already has a port named {port:?}")]
    Duplicate { network: String, port: String },
    #[error("socket {} is used by another port", .0.display())]
    SocketTaken(PathBuf),
    #[error("{0:?} is the network's uplink, not a port")]
    IsUplink(String),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error(transparent)]
    Start(#[from] StartError),
}
