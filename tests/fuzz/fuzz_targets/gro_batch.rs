//! Any bytes as a batch of frames (each behind a 2-byte length) coalesced by `gro`: never a
//! panic, order kept, and every merged frame, segmented again as delivery would for a
//! receiver without TSO, gives back exactly the frames it was made of (but for the IPv4 ids and
//! header checksums, which segmentation renumbers).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vunet_switch::gro::coalesce;
use vunet_switch::offload::segment_tcp;

fuzz_target!(|data: &[u8]| {
    let mut frames = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && frames.len() < 80 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        frames.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    let mut back: Vec<Vec<u8>> = Vec::new();
    let mut scratch = Vec::new();
    let mut seg_scratch = Vec::new();
    coalesce(frames.iter().copied(), &mut scratch, |h, f| {
        if h.is_gso() {
            let n = segment_tcp(f, h, &mut seg_scratch, |s| back.push(s.to_vec())).expect("a merged frame segments");
            assert!(n >= 2);
        } else {
            back.push(f.to_vec());
        }
    });
    assert_eq!(back.len(), frames.len());
    for (b, f) in back.iter().zip(&frames) {
        let mut b = b.clone();
        let mut f = f.to_vec();
        if f.len() >= 26 && f[12..14] == [0x08, 0x00] && b.len() == f.len() {
            // IPv4 id and header checksum.
            for i in [18, 19, 24, 25] {
                b[i] = 0;
                f[i] = 0;
            }
        }
        assert_eq!(b, f);
    }
});
