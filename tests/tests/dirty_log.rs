//! Dirty page logging for live migration, driven by simulated guests: while the VMM logs
//! (VHOST_F_LOG_ALL), every guest page vunet writes through its own pointers (receive
//! buffers, the used ring) is marked at bit `gpa / 4096` of the log, and nothing else; once
//! logging stops (a cancelled migration) the data path marks nothing more.

use std::collections::BTreeSet;
use std::time::Duration;

use vunet_tests::*;

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const T: Duration = Duration::from_secs(10);

fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    gpa / 4096..=(gpa + len - 1) / 4096
}

#[test]
fn received_frames_mark_exactly_their_buffer_and_used_ring_pages_while_logging() {
    let dir = TempDir::new("dirtylog");
    let (d, socks) = start_network(dir.path(), 2);
    let mut a = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    let mut b = VmSim::connect(&socks[1], SimOptions::full()).unwrap();
    a.post_rx(QUEUE_SIZE);
    b.post_rx(QUEUE_SIZE);
    assert!(b.has(PROTOCOL_FEATURES));
    wait_network_ready(&d, "test");
    // B is known to the switch before logging starts (its first frame floods nothing to A).
    b.send(&eth_frame(A, B, 0x0800, 60, 1));
    assert!(a.recv(T).is_some());
    // A can see the frame before B's TX chain is returned (receivers are shown their burst
    // first), and B's TX worker writes its ring once more when it re-arms kicks (EVENT_IDX's
    // avail_event) before it sleeps: written after logging starts, that page would be
    // rightly marked. Logging starts once B's TX ring is quiet.
    assert!(b.wait_tx_all(T), "B's TX chain is returned");
    assert!(b.wait_tx_rearmed(T), "B's TX worker re-arms kicks");

    let log = b.start_dirty_log().unwrap();
    log.clear();
    let before: u16 = b.rx_used();
    // Fits one 2048-byte buffer with its header.
    let len = 1000u64;
    a.send(&eth_frame(B, A, 0x0800, len as usize, 7));
    let (_, f) = b.recv(T).expect("B receives");
    // The payload behind a 14-byte Ethernet header.
    let flen = f.len() as u64;
    assert_eq!(flen, len + 14);
    // The frame went into buffer `before` (the ring's next: buffer i is descriptor i), behind
    // a 12-byte virtio-net header; the used element and index went into the used ring.
    let mut want: BTreeSet<u64> = pages(b.rx_buf_gpa(before), flen + 12).collect();
    want.extend(pages(b.rx_used_gpa(), 4 + 8 * (before as u64 % QUEUE_SIZE as u64 + 1)));
    let got = log.pages();
    assert_eq!(got, want, "exactly the pages vunet wrote are dirty");

    // Logging ends (the migration was cancelled): received frames mark no buffer any more.
    b.stop_dirty_log().unwrap();
    log.clear();
    let next = b.rx_used();
    a.send(&eth_frame(B, A, 0x0800, len as usize, 8));
    assert!(b.recv(T).is_some());
    let bufs: BTreeSet<u64> = pages(b.rx_buf_gpa(next), flen + 12).collect();
    assert!(log.pages().is_disjoint(&bufs), "no buffer page is logged after LOG_ALL is cleared: {:?}", log.pages());
}
