//! `vunet capture`: the frames of one port, both directions, as pcap, streamed over the
//! control socket while traffic flows (tcpdump -i vnet0, without root or a kernel interface).
//!
//! The data path copies a frame only while somebody captures on that port (one relaxed
//! atomic load per frame otherwise). Frames go to each capture through a bounded queue; a
//! capture that cannot keep up loses frames rather than slowing the port.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::Duration;

use pcap_file::pcap::{PcapPacket, PcapWriter};
use tracing::info;

use crate::datapath::{Captured, Port};

/// Frames queued per capture before new ones are dropped.
pub const QUEUE: usize = 4096;
/// pcap's usual snapshot length; longer (TSO) frames are cut, with their real length kept.
pub const SNAPLEN: usize = 65535;

/// Streams the port's frames to `conn` as pcap until the client hangs up or the port goes.
pub fn stream(mut conn: UnixStream, port: &Port) {
    let (tx, rx) = sync_channel::<Captured>(QUEUE);
    port.add_capture(tx);
    if conn.write_all(format!("{}\n", serde_json::json!({ "ok": { "capture": port.name } })).as_bytes()).is_err() {
        return;
    }
    info!(port = %port.name, "capture started");
    let Ok(mut hangup) = conn.try_clone() else { return };
    let _ = hangup.set_nonblocking(true);
    let Ok(mut w) = PcapWriter::new(conn) else { return };
    let mut written = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((ts, frame)) => {
                let n = frame.len().min(SNAPLEN);
                if w.write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame[..n])).is_err() {
                    break;
                }
                written += 1;
            }
            Err(RecvTimeoutError::Timeout) => {
                // The client sends nothing: a read of 0 bytes means it hung up.
                if matches!(hangup.read(&mut [0u8; 1]), Ok(0)) || port.removed.load(Ordering::Acquire) {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    info!(port = %port.name, "capture ended after {written} frames");
    // Dropping `rx` makes the data path forget this capture at its next frame.
}
