//! The gateway's own endpoint: answers ARP for its address and ping to it (the pure logic is
//! `vunet_switch::gateway::Gateway::handle`).

use vunet_switch::gateway::Gateway;

use crate::datapath::{GatewayService, Handled, Network, Port};

pub struct ArpIcmp;

impl GatewayService for ArpIcmp {
    fn handle(&self, _net: &Network, gw: &Gateway, _port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        if gw.handle(frame, reply) {
            Handled::Reply
        } else {
            Handled::NotMine
        }
    }
}
