//! `vunet capture`: the frames of one port, both directions, as pcap, streamed over the
//! control socket while traffic flows (tcpdump -i vnet0, without root or a kernel interface).
//!
//! The data path copies a frame only while somebody captures on that port (one relaxed
//! atomic load per frame otherwise). Frames go to each capture through a queue bounded in
//! frames and in bytes; a capture that cannot keep up loses frames (counted, logged at its
//! end) rather than slowing the port or growing. A reader that stops reading is dropped once
//! a write to it has waited `WRITE_TIMEOUT`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use pcap_file::pcap::{PcapPacket, PcapWriter};
use tracing::info;

use crate::datapath::{CaptureBudget, Captured, Port};

/// Frames queued per capture before new ones are dropped.
pub const QUEUE: usize = 4096;
/// Bytes queued per capture before new frames are dropped.
pub const QUEUE_BYTES: usize = 4 << 20;
/// How long a write to the client may wait before the capture is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// pcap's usual snapshot length; longer (TSO) frames are cut, with their real length kept.
pub const SNAPLEN: usize = 65535;

/// Streams the port's frames to `conn` as pcap until the client hangs up, stops reading, or
/// the port goes.
pub fn stream(conn: UnixStream, port: &Port) {
    stream_with(conn, port, WRITE_TIMEOUT, QUEUE_BYTES)
}

fn stream_with(mut conn: UnixStream, port: &Port, write_timeout: Duration, queue_bytes: usize) {
    let (tx, rx) = sync_channel::<Captured>(QUEUE);
    let budget = Arc::new(CaptureBudget::new(queue_bytes));
    // The socket stays blocking, with a timeout: a reader that stops makes a write fail.
    if conn.set_write_timeout(Some(write_timeout)).is_err() {
        return;
    }
    port.add_capture(tx, budget.clone());
    let (written, why) = pump(&mut conn, port, &rx, &budget);
    // The data path forgets this capture at its next frame; queued frames go with `rx`.
    budget.closed.store(true, Ordering::Release);
    let dropped = budget.dropped.load(Ordering::Relaxed);
    info!(port = %port.name, "capture ended ({why}) after {written} frames, {dropped} dropped (the reader did not keep up)");
}

/// Copies frames from the queue to the client; returns how many, and why it stopped.
fn pump(conn: &mut UnixStream, port: &Port, rx: &std::sync::mpsc::Receiver<Captured>, budget: &CaptureBudget) -> (u64, &'static str) {
    if conn.write_all(format!("{}\n", serde_json::json!({ "ok": { "capture": port.name } })).as_bytes()).is_err() {
        return (0, "the client went away");
    }
    info!(port = %port.name, "capture started");
    let Ok(out) = conn.try_clone() else { return (0, "no second handle on the connection") };
    let Ok(mut w) = PcapWriter::new(out) else { return (0, "the client went away") };
    let mut written = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((ts, frame)) => {
                budget.taken(frame.len());
                let n = frame.len().min(SNAPLEN);
                if w.write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame[..n])).is_err() {
                    return (written, "the client stopped reading or went away");
                }
                written += 1;
            }
            Err(RecvTimeoutError::Timeout) => {
                if hung_up(conn) {
                    return (written, "the client hung up");
                }
                if port.removed.load(Ordering::Acquire) {
                    return (written, "the port was removed");
                }
            }
            Err(RecvTimeoutError::Disconnected) => return (written, "the port was removed"),
        }
    }
}

/// The client sends nothing: a peek that reads end-of-file means it hung up. Without making
/// the socket non-blocking (that would make the writes fail at a momentarily full buffer).
fn hung_up(conn: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: the fd is open for the call; the buffer is valid for 1 byte.
    let n = unsafe { libc::recv(conn.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n == 0
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Instant;

    use super::*;
    use crate::datapath::PortKind;

    #[test]
    fn a_capture_holds_at_most_its_bytes_and_counts_the_frames_it_drops() {
        let port = Port::new(0, "p", PortKind::Vhost);
        let (tx, rx) = sync_channel::<Captured>(QUEUE);
        let budget = Arc::new(CaptureBudget::new(QUEUE_BYTES));
        port.add_capture(tx, budget.clone());
        // A reader that does not keep up: 200 TSO-sized frames, 12.5 MiB.
        let frame = vec![0x5au8; 64 << 10];
        let start = Instant::now();
        for _ in 0..200 {
            port.capture(&frame);
        }
        assert!(start.elapsed() < Duration::from_secs(2), "the data path never waits for a capture");
        let queued: Vec<Captured> = rx.try_iter().collect();
        assert_eq!(queued.len(), QUEUE_BYTES / frame.len(), "4 MiB of frames queued");
        assert_eq!(budget.dropped.load(Ordering::Relaxed), 200 - queued.len() as u64);
        // Taken by the reader: room again.
        for (_, f) in &queued {
            budget.taken(f.len());
        }
        port.capture(&frame);
        assert_eq!(rx.try_iter().count(), 1);
        // A reader that ended is forgotten.
        budget.closed.store(true, Ordering::Release);
        port.capture(&frame);
        assert!(!port.capturing.load(Ordering::Acquire));
    }

    #[test]
    fn a_reader_that_stops_reading_is_dropped_and_one_that_reads_slowly_is_not() {
        let port = Port::new(0, "p", PortKind::Vhost);
        let frame = vec![0x5au8; 1500];
        std::thread::scope(|s| {
            // Reads the answer line, then pauses (a busy tcpdump), then reads everything.
            let (server, mut client) = UnixStream::pair().unwrap();
            let streamer = s.spawn(|| stream_with(server, &port, Duration::from_secs(2), QUEUE_BYTES));
            let reader = s.spawn(move || {
                let mut line = [0u8; 1];
                while client.read(&mut line).unwrap() == 1 && line[0] != b'\n' {}
                std::thread::sleep(Duration::from_millis(500));
                let mut all = Vec::new();
                let _ = client.read_to_end(&mut all);
                all.len()
            });
            while !port.capturing.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            // More than a socket buffer while the reader pauses.
            for _ in 0..2000 {
                port.capture(&frame);
                std::thread::sleep(Duration::from_micros(200));
            }
            port.removed.store(true, Ordering::Release);
            streamer.join().unwrap();
            assert!(reader.join().unwrap() > 1000 * frame.len(), "the slow reader got its frames");
        });

        // A client that never reads: dropped after the write timeout, the port not slowed.
        let port = Port::new(0, "p", PortKind::Vhost);
        let (server, _client) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            let streamer = s.spawn(|| stream_with(server, &port, Duration::from_millis(300), QUEUE_BYTES));
            while !port.capturing.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !streamer.is_finished() && Instant::now() < deadline {
                let t = Instant::now();
                port.capture(&frame);
                assert!(t.elapsed() < Duration::from_millis(100), "the data path waited for the capture");
            }
            assert!(streamer.is_finished(), "the capture of a reader that stopped was dropped");
            port.capture(&frame);
            assert!(!port.capturing.load(Ordering::Acquire), "and forgotten by the port");
        });
    }
}
