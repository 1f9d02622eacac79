//! A DHCPv4 server as pure logic (RFC 2131/2132): bytes of a client's message and the current
//! time in, bytes of the answer out. No sockets, no clock, no files: `backend` owns those. That
//! keeps the state machine testable and fuzzable on its own.
//!
//! - [`message`]: parsing and building DHCP messages, defensively.
//! - [`server`]: address assignment, leases, the DISCOVER/REQUEST/RELEASE/DECLINE/INFORM
//!   state machine.
//! - [`lease_file`]: the text format leases persist in.

pub mod client;
pub mod dns;
pub mod lease_file;
pub mod message;
pub mod server;
pub mod v6;

pub use message::{DhcpMessage, MessageType};
pub use server::{DhcpServer, Holders, Lease, Reply, ServerConfig, StaticHost};

/// An Ethernet MAC address.
pub type Mac = [u8; 6];
