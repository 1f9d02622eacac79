//! The data path: the bottom layer of the backend. It holds the state that frames are
//! switched with (networks, ports, the seams to host links and gateway services) and moves
//! frames from a guest's TX ring to the receivers' RX rings with exactly one copy, done by the
//! sender's worker thread: descriptor addresses are resolved into host pointers once, and bytes
//! move straight from the sender's guest memory into the receiver's.
//!
//! It imports only `config` and the pure crates below it (`vunet-switch`, `vunet-dhcp`); port
//! kinds (`ports/`) and gateway services (`services/`) plug in through `HostLink`,
//! `GatewayService` and `Inject` (a test in backend/tests/layers.rs keeps that true).
//!
//! - `network`: `Network`; `port`: `Port`, `PortKind`, `RxTarget`
//! - `link`: trait `HostLink`; `service`: trait `GatewayService`
//! - `ring`: guest memory segments and copies; `split`: split virtqueues through host pointers,
//!   a burst at a time (descriptor chains, RX writes, used ring, interrupts); `backlog`: frames
//!   waiting for a full ring
//! - `deliver`: one frame into one receiver, notification, link sends
//! - `switch`: the switching step (`process_tx`), the router, service dispatch
//! - `txring`: a guest TX ring as workers serve it, the network's record of its workers
//! - `workers`: the network's workers, which serve every guest's TX ring with frames waiting
//!   from at most `workers` threads at once
//! - `inject`: the door for frames vunet makes or reads from host links

mod backlog;
mod deliver;
mod inject;
mod link;
mod network;
mod port;
mod ring;
mod service;
mod split;
mod switch;
#[cfg(test)]
mod tests;
mod txring;
mod workers;

/// The guest-facing ring parsers, reachable from the fuzz targets (tests/fuzz) through
/// `vunet::fuzzing`. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::ring::{Mem, Seg};
    pub use super::split::{walk_chain, write_rx, MemMap, Ring, RxQueue, RxScratch, MAX_FRAME_DESCS};

    /// The host bytes a segment names: (address, length).
    pub fn seg_span(s: &Seg) -> (usize, usize) {
        (s.ptr as usize, s.len)
    }

    /// A segment over `b`.
    pub fn seg_of(b: &[u8]) -> Seg {
        Seg::of_slice(b)
    }
}

pub use backlog::BACKLOG_MAX_FRAMES;
pub use deliver::{deliver_made, flush_pending, run_shaper, signal_if_wanted, TxScratch};
pub use inject::Inject;
pub use link::{HostLink, TunnelInfo};
pub use network::Network;
pub use port::{unix_now, CaptureBudget, Captured, Port, PortKind, RxShaper, RxTarget, MAX_QUEUE_PAIRS, VHOST_F_LOG_ALL};
pub use ring::{GuestMem, Vring};
pub use service::{GatewayCx, GatewayService, Handled};
pub use switch::process_tx;
pub use txring::{Negotiated, TxRing};
pub use workers::{tx_kick, Home};
