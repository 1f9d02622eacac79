//! Port kinds: how frames reach a port and leave it. Each kind imports the data path (and
//! config) only, never another kind or a gateway service.
//!
//! - `vhost`: guest NICs served over vhost-user sockets;
//! - `uplink`: host links (af-packet, macvtap, tap), each a `HostLink` with a receive thread.

pub mod uplink;
pub mod vhost;
