//! The gateway's own endpoint: answers ARP for its address and ping to it (the pure logic is
//! `vunet_switch::gateway::Gateway::handle`).

use crate::datapath::{GatewayCx, GatewayService, Handled, Port};

pub struct ArpIcmp;

impl GatewayService for ArpIcmp {
    fn handle(&self, cx: &GatewayCx, _port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        if cx.gateway.handle(frame, reply) {
            Handled::Reply
        } else {
            Handled::NotMine
        }
    }
}
