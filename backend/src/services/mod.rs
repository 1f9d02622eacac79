//! Gateway services: what answers frames a guest sends to the network's gateway. Each is one
//! `GatewayService`; the run-time layer lists them per network, in the order they are asked.
//! They import the data path and the pure crates only, never a port kind or each other.

pub mod arp_icmp;
pub mod dhcp;
pub mod dhcp6;
pub mod dns;
pub mod ndp;
pub mod socknat;
