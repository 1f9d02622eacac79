//! The one door into the data path for frames that vunet makes or reads from a host link:
//! an uplink's RX thread, the DNS threads' answers, the router's timers and the uplink's
//! DHCP client all hand their frames to an `Inject`. Guest TX rings come in through
//! `process_tx`, called by the vhost-user port's worker.

use std::sync::Arc;

use vunet_switch::router::Emit;
use vunet_switch::vnet::VnetHeader;
use vunet_switch::PortId;

use super::deliver::{deliver_made, TxScratch};
use super::network::Network;
use super::port::Port;
use super::switch::{route_from_link, router_tick, send_router_frames, switch_from_link};

/// A thread's handle on one network's data path, with the scratch buffers it delivers with.
pub struct Inject {
    net: Arc<Network>,
    cx: TxScratch,
}

impl Inject {
    pub fn new(net: Arc<Network>) -> Inject {
        Inject { net, cx: TxScratch::default() }
    }

    /// The network this handle injects into.
    pub fn network(&self) -> &Arc<Network> {
        &self.net
    }

    /// Whether the network was taken out of the daemon (the injecting thread should end).
    pub fn stopped(&self) -> bool {
        self.net.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Hands a frame vunet made (such as an upstream DNS answer) to port `port`, and
    /// interrupts its guest if it wants that.
    pub fn send_to_port(&mut self, port: PortId, frame: &[u8]) {
        if let Some(p) = self.net.port_by_id(port) {
            deliver_made(&p, &VnetHeader::default(), frame, &mut self.cx);
        }
    }

    /// Switches frames read from a host link (each behind a virtio-net header of `hdr_len`
    /// bytes) as if `port` sent them. `outgoing`: the host itself sent the frame out of the
    /// link's interface (taken too, so the host reaches guests, unless it echoes one of ours).
    pub fn switch_from_link(&mut self, port: &Port, frames: &[(&[u8], bool)], hdr_len: usize) {
        switch_from_link(&self.net, port, frames, hdr_len, &mut self.cx);
    }

    /// Routes frames read from a nat or route network's uplink (rewritten in place).
    pub fn route_from_link(&mut self, port: &Port, frames: &mut [&mut [u8]], hdr_len: usize) {
        route_from_link(&self.net, port, frames, hdr_len, &mut self.cx);
    }

    /// Runs the router's timers (ARP retries, expiry) and sends what they produce.
    pub fn router_tick(&mut self) {
        router_tick(&self.net, &mut self.cx);
    }

    /// Sends frames the router made outside of any frame's handling (a new address, DHCP).
    pub fn router_frames(&mut self, emit: Vec<Emit>) {
        send_router_frames(&self.net, emit, &mut self.cx);
    }
}
