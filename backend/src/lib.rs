//! vunet: a userspace virtual network for virtual machines. Each guest NIC is a vhost-user-net
//! device served from the guest's shared memory; frames are switched between guests by the
//! pure logic of `vunet-switch`, with one copy from the sender's TX descriptors into the
//! receiver's RX descriptors.
//!
//! This crate owns every file descriptor and thread. Its modules are layers, each importing
//! only those below it (backend/tests/layers.rs checks this):
//!
//! | layer | modules |
//! |---|---|
//! | CLI and daemon | `main.rs`, `daemon` |
//! | control and metrics | `control`, `capture`, `metrics` |
//! | run-time supervision | `runtime` (networks and ports at run time, reload, building a network) |
//! | port kinds, gateway services | `ports` (vhost-user, uplinks), `services` (ARP/ICMP, DHCP, DNS); never each other |
//! | the data path | `datapath` (port state, rings, delivery, the switching step, `Inject`) |
//! | configuration | `config`, `libvirt`; below them the pure crates `vunet-switch`, `vunet-dhcp` |

mod capture;
pub mod config;
pub mod control;
mod daemon;
mod datapath;
pub mod libvirt;
mod metrics;
mod ports;
mod runtime;
mod services;

pub use config::{Config, ConfigError, Mode, PortMode};
pub use daemon::Daemon;
pub use datapath::{Network, Port, PortKind, BACKLOG_MAX_FRAMES};
pub use runtime::{PortError, StartError};

/// The parsers of input from outside (the VMM's vhost-user messages, the guests' rings),
/// reachable from the fuzz targets in tests/fuzz. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::datapath::fuzzing::*;
    pub use crate::ports::vhost::relay::relay_requests;
}
