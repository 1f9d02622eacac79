//! Guest ports over vhost-user: the device (`device`: features, rings, the TX and RX kicks
//! into the data path), the connection loop (`conn`), and the relay that sits between the
//! VMM and the vhost-user daemon (`relay`).

pub mod conn;
pub mod device;
pub(crate) mod relay;
