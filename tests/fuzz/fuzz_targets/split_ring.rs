//! A hostile guest's split virtqueue through vunet's ring walker (`datapath/split.rs`): the
//! avail ring, descriptor table (direct and indirect chains, loops, wrong directions, lengths
//! and addresses) and ring indices all come from the input; `walk_chain` walks every posted
//! chain as TX and as RX, and `write_rx` writes a frame into the ring.
//!
//! Input: `[log2 size][next_avail: u16 LE][next_used: u16 LE][caps][frame length: u16 LE]`,
//! then bytes copied into guest memory from address 0 (avail ring at 0, descriptor table at
//! 0x210, used ring at 0x1400). Guest memory: 0..0x3000 and 0x3000..0x4000 (adjacent, so
//! buffers straddle regions) and 0x8000..0x9000 (after a hole).
//! Checks: no panic; every segment the walker returns lies inside one region's mapping and
//! the segments add up to the length it reports; the used ring only names descriptors of the
//! table, with lengths no larger than what was written, and moves by at most a ring.
#![no_main]
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vunet::fuzzing::{seg_of, seg_span, walk_chain, write_rx, Mem, MemMap, Ring, RxQueue, RxScratch, MAX_FRAME_DESCS};
use vunet_switch::vnet::{RxCaps, VnetHeader};

const AVAIL: u64 = 0;
// The avail ring of 256 entries ends at 0x206, the table of 256 descriptors at 0x1210.
const DESC: u64 = 0x210;
const USED: u64 = 0x1400;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let next_avail = u16::from_le_bytes([data[1], data[2]]);
    let next_used = u16::from_le_bytes([data[3], data[4]]);
    let caps = RxCaps { mrg_rxbuf: data[5] & 1 != 0, hdr_len: if data[5] & 2 != 0 { 12 } else { 10 }, ..RxCaps::default() };
    let frame_len = u16::from_le_bytes([data[6], data[7]]) as usize;
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x3000), (GuestAddress(0x3000), 0x1000), (GuestAddress(0x8000), 0x1000)]).unwrap();
    let image = &data[8..data.len().min(8 + 0x3000)];
    mem.write_slice(image, GuestAddress(0)).unwrap();
    let regions: Vec<(usize, usize)> =
        mem.iter().map(|r| (r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize, r.len() as usize)).collect();
    let inside = |(p, n): (usize, usize)| regions.iter().any(|&(h, len)| p >= h && p + n <= h + len);

    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q.set_next_avail(next_avail);
    q.set_next_used(next_used);
    let map = MemMap::new(&mem);
    let Some(ring) = Ring::new(&q, &map) else { return };

    // Every posted chain, walked as the TX path and as the RX path would.
    let posted = ring.avail_idx().wrapping_sub(next_avail).min(size);
    ring.prefetch(&map, (0..posted).map(|i| ring.avail_entry(next_avail.wrapping_add(i))), frame_len % 3 == 0);
    let mut segs = Vec::new();
    for i in 0..posted {
        let head = ring.avail_entry(next_avail.wrapping_add(i));
        for writable in [false, true] {
            segs.clear();
            let mut budget = MAX_FRAME_DESCS;
            if let Ok(total) = walk_chain(&ring, &map, head, writable, 65562, &mut budget, &mut segs) {
                assert!(total <= 65562);
                assert_eq!(segs.iter().map(|s| seg_span(s).1).sum::<usize>(), total);
            }
            // Even a chain that failed half-way resolved only guest memory.
            for s in &segs {
                assert!(inside(seg_span(s)), "a segment outside guest memory: {:x?}", seg_span(s));
            }
        }
    }

    // A frame into the ring as a receiver.
    let frame: Vec<u8> = (0..frame_len).map(|i| i as u8).collect();
    let src = [seg_of(&frame)];
    let mut scratch = RxScratch::default();
    // Half the inputs with the dirty log on: its marking walks the written segments and used
    // entries (the memory has no log attached, so nothing is marked, but nothing may fault).
    let mut rxq = RxQueue::new(&mut q, ring, map, caps, frame_len % 2 == 1);
    // Asking ahead for the chains the guest posted reads only what the walk checks again.
    rxq.prefetch(frame_len % 40);
    let r = write_rx(&mut rxq, VnetHeader::default(), &src, 0, frame_len, &mut scratch);
    rxq.publish();
    let new_used = rxq.q.next_used();
    let moved = new_used.wrapping_sub(next_used);
    assert!(moved <= size, "used index moved by {moved} on a ring of {size}");
    if r.is_ok() {
        assert!(moved >= 1);
    }
    let mut written = 0usize;
    for k in 0..moved {
        let at = USED + 4 + 8 * (next_used.wrapping_add(k) % size) as u64;
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        assert!(id < size as u32, "used element names descriptor {id} of {size}");
        written += len as usize;
    }
    assert!(written <= caps.hdr_len + frame_len);
    if r.is_ok() {
        assert_eq!(written, caps.hdr_len + frame_len);
    }
    let published: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert!(moved == 0 || published == new_used);
});
