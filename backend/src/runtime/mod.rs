//! Run-time supervision: networks and ports while vunet runs. `build` turns a network's
//! configuration into the data path's state, its host links and its gateway services;
//! `supervisor` starts and stops networks and ports (at start, `port-add`/`port-del`, SIGHUP
//! reload) and owns their threads.

mod build;
pub mod error;
mod supervisor;

pub use error::{PortError, StartError};
pub use supervisor::{bind_sockets, private_dir, spawn, Supervisor};
