use etherparse::PacketBuilder;

use super::*;
use crate::offload::segment_tcp;

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

/// A TCP segment of `len` payload bytes at `seq` (payload bytes are the stream offset, mod 251).
fn seg4(sport: u16, seq: u32, len: usize, psh: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| ((seq as usize + i) % 251) as u8).collect();
    let mut f = Vec::new();
    let tcp = PacketBuilder::ethernet2(A, B).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).tcp(sport, 80, seq, 1000).ack(77);
    let tcp = if psh { tcp.psh() } else { tcp };
    tcp.write(&mut f, &payload).unwrap();
    f
}

fn seg6(seq: u32, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| ((seq as usize + i) % 251) as u8).collect();
    let mut f = Vec::new();
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    PacketBuilder::ethernet2(A, B).ipv6(src, dst, 64).tcp(5000, 80, seq, 1000).ack(77).write(&mut f, &payload).unwrap();
    f
}

fn run(frames: &[Vec<u8>]) -> Vec<(VnetHeader, Vec<u8>)> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    coalesce(frames.iter().map(|f| f.as_slice()), &mut scratch, |h, f| out.push((*h, f.to_vec())));
    out
}

/// Segments a merged frame again (what delivery does for a receiver without TSO).
fn resegment(h: &VnetHeader, f: &[u8]) -> Vec<Vec<u8>> {
    let mut segs = Vec::new();
    let mut scratch = Vec::new();
    segment_tcp(f, h, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
    segs
}

#[test]
fn a_burst_of_one_flow_becomes_one_gso_frame_that_segments_back_into_the_same_bytes() {
    let mut frames: Vec<Vec<u8>> = (0..10).map(|i| seg4(5000, 1 + i * 1400, 1400, false)).collect();
    frames.push(seg4(5000, 1 + 10 * 1400, 500, true));
    let out = run(&frames);
    assert_eq!(out.len(), 1);
    let (h, merged) = &out[0];
    assert_eq!((h.gso_type, h.gso_size, h.flags, h.csum_start, h.csum_offset), (GSO_TCPV4, 1400, F_NEEDS_CSUM, 34, 16));
    assert_eq!(h.hdr_len, 54);
    assert_eq!(merged.len(), 54 + 10 * 1400 + 500);
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&merged[14..]).unwrap();
    assert_eq!(ip.total_len() as usize, merged.len() - 14);
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
    assert_eq!(merged[47] & 0x08, 0x08, "the last segment's PSH is kept");
    // Segmented again, the frames are the ones that came (payload, sequence numbers, checksums).
    let back = resegment(h, merged);
    assert_eq!(back.len(), frames.len());
    for (b, f) in back.iter().zip(&frames) {
        let (pb, pf) = (etherparse::SlicedPacket::from_ethernet(b).unwrap(), etherparse::SlicedPacket::from_ethernet(f).unwrap());
        let (Some(etherparse::TransportSlice::Tcp(tb)), Some(etherparse::TransportSlice::Tcp(tf))) = (pb.transport, pf.transport) else {
            panic!("not TCP")
        };
        assert_eq!((tb.sequence_number(), tb.payload()), (tf.sequence_number(), tf.payload()));
        assert!(segment(b).is_some(), "a valid checksum");
    }
}

#[test]
fn ipv6_segments_merge_too() {
    let frames: Vec<Vec<u8>> = (0..4).map(|i| seg6(100 + i * 1200, 1200)).collect();
    let out = run(&frames);
    assert_eq!(out.len(), 1);
    let (h, merged) = &out[0];
    assert_eq!((h.gso_type, h.gso_size, h.csum_start), (GSO_TCPV6, 1200, 54));
    assert_eq!(u16::from_be_bytes([merged[18], merged[19]]) as usize, merged.len() - 54);
    assert_eq!(resegment(h, merged), frames);
}

#[test]
fn gaps_other_flows_and_bad_checksums_end_a_run_and_order_is_kept() {
    let a1 = seg4(5000, 1, 1000, false);
    let a2 = seg4(5000, 1001, 1000, false);
    let gap = seg4(5000, 3001, 1000, false);
    let other = seg4(5001, 1, 1000, false);
    let mut bad = seg4(5000, 4001, 1000, false);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let a4 = seg4(5000, 5001, 1000, false);
    let out = run(&[a1.clone(), a2.clone(), gap.clone(), other.clone(), bad.clone(), a4.clone()]);
    let sizes: Vec<(u8, usize)> = out.iter().map(|(h, f)| (h.gso_type, f.len())).collect();
    assert_eq!(sizes, vec![(GSO_TCPV4, 54 + 2000), (0, gap.len()), (0, other.len()), (0, bad.len()), (0, a4.len())]);
    assert_eq!(out[3].1, bad, "a corrupt segment passes unchanged (the receiver drops it)");
}

#[test]
fn only_plain_acks_merge_and_small_or_pushed_starts_do_not() {
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(A, B).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).tcp(5000, 80, 1, 1000).syn().write(&mut syn, &[]).unwrap();
    let mut fin = Vec::new();
    PacketBuilder::ethernet2(A, B)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(5000, 80, 1, 1000)
        .ack(77)
        .fin()
        .write(&mut fin, &[1; 1000])
        .unwrap();
    let pushed = seg4(5000, 1001, 1000, true);
    let tiny = seg4(5000, 2001, 40, false);
    let tiny2 = seg4(5000, 2041, 40, false);
    let mut udp = Vec::new();
    PacketBuilder::ethernet2(A, B).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, 2).write(&mut udp, &[0; 1000]).unwrap();
    let frames = vec![syn, fin, pushed, tiny, tiny2, udp];
    let out = run(&frames);
    assert!(out.iter().all(|(h, _)| h.gso_type == 0));
    assert_eq!(out.into_iter().map(|(_, f)| f).collect::<Vec<_>>(), frames);
}

#[test]
fn runs_stop_at_the_segment_limit_and_the_ip_length_limit() {
    let frames: Vec<Vec<u8>> = (0..(MAX_SEGMENTS as u32 + 5)).map(|i| seg4(5000, 1 + i * 100, 100, false)).collect();
    let out = run(&frames);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.len(), 54 + MAX_SEGMENTS * 100);
    let big: Vec<Vec<u8>> = (0..50).map(|i| seg4(5000, 1 + i * 8000, 8000, false)).collect();
    let out = run(&big);
    assert!(out.iter().all(|(_, f)| f.len() - 14 <= MAX_IP_LEN));
    assert_eq!(out.iter().map(|(_, f)| f.len() - 54).sum::<usize>(), 50 * 8000);
}

#[test]
fn garbage_passes_through_unchanged_and_never_panics() {
    let good = seg4(5000, 1, 1000, false);
    let mut frames = Vec::new();
    for cut in 0..good.len().min(120) {
        frames.push(good[..cut].to_vec());
    }
    let mut x = good.clone();
    for i in 0..x.len().min(120) {
        x[i] = x[i].wrapping_mul(31).wrapping_add(i as u8);
        frames.push(x.clone());
    }
    let out = run(&frames);
    assert_eq!(out.len(), frames.len());
}

#[test]
fn room_in_front_of_merged_frames_changes_nothing_else() {
    let mut frames: Vec<Vec<u8>> = (0..6).map(|i| seg4(5000, 1 + i * 1400, 1400, false)).collect();
    frames.push(seg4(7000, 1, 100, false));
    let plain = run(&frames);
    let mut with_room = Vec::new();
    let mut scratch = Vec::new();
    coalesce_with_room(frames.iter().map(|f| f.as_slice()), 10, &mut scratch, |h, f| {
        let bytes = match f {
            Frame::Plain(f) => f.to_vec(),
            Frame::Merged(v) => {
                assert_eq!(v[..10], [0; 10], "the room is left zeroed");
                v[10..].to_vec()
            }
        };
        with_room.push((*h, bytes));
    });
    assert_eq!(with_room, plain);
    assert_eq!(plain.len(), 2);
}
