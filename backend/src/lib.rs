//! vunet: a userspace virtual network for virtual machines. Each guest NIC is a vhost-user-net
//! device served from the guest's shared memory; frames are switched between guests by the
//! pure logic of `vunet-switch`, with one copy from the sender's TX descriptors into the
//! receiver's RX descriptors.
//!
//! This crate owns every file descriptor and thread: vhost-user sockets, worker threads, the
//! configuration file and the CLI.

pub mod capture;
pub mod config;
pub mod control;
pub mod datapath;
pub mod dns_service;
pub mod dns_tcp;
pub mod libvirt;
pub mod metrics;
pub mod netlink;
pub mod network;
pub mod proxy;
pub mod uplink;
pub mod vhost_port;

pub use config::{Config, ConfigError, Mode, PortMode};
pub use network::{Daemon, GuestPort, Network, StartError};
