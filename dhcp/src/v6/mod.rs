//! A stateful DHCPv6 server (RFC 8415) as pure logic: a client's message, the sender's MAC and
//! the time in, the answer out. The message codec is `dhcproto`'s; this module decides.
//!
//! - [`frame`]: UDP over IPv6 in Ethernet frames, checksums checked.
//! - [`server`]: IA_NA addresses (range or static hosts by MAC), leases, and the
//!   Solicit/Request/Renew/Rebind/Release/Decline/Confirm/Information-request state machine.

pub mod frame;
pub mod server;

/// The message codec, for callers that build or read messages (tests, clients).
pub use dhcproto;
pub use server::{client_duid_mac, duid_mac, Dhcp6Server, Lease6, Server6Config, StaticHost6};

/// UDP port DHCPv6 clients listen on.
pub const CLIENT_PORT: u16 = 546;
/// UDP port DHCPv6 servers listen on.
pub const SERVER_PORT: u16 = 547;
/// All_DHCP_Relay_Agents_and_Servers, where clients send.
pub const ALL_SERVERS: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
