//! Receive coalescing of TCP segments ("GRO") for frames that arrive one MTU at a time, as
//! VXLAN decapsulation hands them over: consecutive segments of one TCP flow in a batch become
//! one GSO frame (a partial checksum and `gso_size` = the segments' size), so a receiving guest
//! with GUEST_TSO takes one 64 KiB frame where it would take forty-five, which is most of what
//! a guest's receive costs. Receivers without TSO get the frame segmented again on delivery.
//!
//! Only what is certain to be one byte stream is merged, the way Linux's GRO decides it: IPv4
//! (not fragmented) or IPv6 (TCP right after the fixed header), no VLAN tag; every header byte
//! equal to the run's first except the IP length, IPv4 id and checksum, the TCP sequence number
//! and checksum; flags ACK (PSH ends a run); sequence numbers contiguous; all segments of the
//! first's size but the last, which may be shorter and ends the run. Each segment's TCP
//! checksum is verified before it joins (the outer UDP checksum of VXLAN is zero: this is the
//! only integrity check, and the merged frame's checksum is left for the receiver to trust).
//! Pure: frames in, frames out through a callback; one scratch buffer, reused.

use crate::checksum::{finish, pseudo_v4, pseudo_v6, sum};
use crate::proto::{ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};
use crate::vnet::{VnetHeader, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, MIN_GSO_SIZE};

const ETH: usize = 14;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Most segments in one merged frame (Linux: 64, MAX_SKB_FRAGS + headers' room).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes of one merged IP packet (the IPv4 and IPv6 length fields' limit).
const MAX_IP_LEN: usize = 65535;

/// A TCP segment that may be merged: where its headers end and what they say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    v6: bool,
    /// Offset of the TCP header in the frame.
    l4: usize,
    /// Offset of the payload.
    data: usize,
    seq: u32,
    flags: u8,
}

/// The segment `f` is, if it can take part in coalescing (see the module's rules; the
/// checksum is checked too).
fn segment(f: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (v6, l4) = match ethertype {
        ETH_P_IPV4 => {
            let ip = f.get(ETH..ETH + 20)?;
            let ihl = (ip[0] & 0xf) as usize * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if ip[0] >> 4 != 4 || ihl < 20 || frag & 0x3fff != 0 || ip[9] != IPPROTO_TCP || total != f.len() - ETH {
                return None;
            }
            (false, ETH + ihl)
        }
        ETH_P_IPV6 => {
            let ip = f.get(ETH..ETH + 40)?;
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP || payload != f.len() - ETH - 40 {
                return None;
            }
            (true, ETH + 40)
        }
        _ => return None,
    };
    let tcp = f.get(l4..l4 + 20)?;
    let data = l4 + (tcp[12] >> 4) as usize * 4;
    let flags = tcp[13];
    if data < l4 + 20 || data >= f.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let seg = Segment { v6, l4, data, seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), flags };
    (finish(sum(&f[l4..], pseudo(f, &seg, (f.len() - l4) as u32))) == 0).then_some(seg)
}

/// The pseudo-header sum of the frame's TCP segment of `len` bytes.
fn pseudo(f: &[u8], s: &Segment, len: u32) -> u64 {
    if s.v6 {
        let (src, dst) = (f[ETH + 8..ETH + 24].try_into().unwrap_or([0; 16]), f[ETH + 24..ETH + 40].try_into().unwrap_or([0; 16]));
        pseudo_v6(&src, &dst, IPPROTO_TCP, len)
    } else {
        let (src, dst) = (f[ETH + 12..ETH + 16].try_into().unwrap_or([0; 4]), f[ETH + 16..ETH + 20].try_into().unwrap_or([0; 4]));
        pseudo_v4(&src, &dst, IPPROTO_TCP, len as u16)
    }
}

/// Whether headers `a` and `b` (up to the payload) are the same but for the fields that
/// differ between segments of one stream (PSH may differ only on a run's last segment, which
/// the caller sees to).
fn same_headers(a: &[u8], b: &[u8], s: &Segment) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (v4, v6) = (
        [(ETH + 2, ETH + 6), (ETH + 10, ETH + 12), (s.l4 + 4, s.l4 + 8), (s.l4 + 13, s.l4 + 14), (s.l4 + 16, s.l4 + 18)],
        [(ETH + 4, ETH + 6), (s.l4 + 4, s.l4 + 8), (s.l4 + 13, s.l4 + 14), (s.l4 + 16, s.l4 + 18)],
    );
    // The byte ranges allowed to differ, in order.
    let skip: &[(usize, usize)] = if s.v6 { &v6 } else { &v4 };
    let mut at = 0;
    for &(from, to) in skip {
        if a[at..from] != b[at..from] {
            return false;
        }
        at = to;
    }
    a[at..] == b[at..] && a[s.l4 + 13] & !TCP_PSH == b[s.l4 + 13] & !TCP_PSH
}

/// The run being merged in the scratch buffer.
struct Run {
    seg: Segment,
    /// Payload bytes of each full segment.
    mss: usize,
    next_seq: u32,
    segments: usize,
}

/// A frame [`coalesce_with_room`] hands over.
pub enum Frame<'a> {
    /// As it came, in the caller's buffer.
    Plain(&'a [u8]),
    /// Merged in the scratch buffer, behind the room asked for; the caller may take the
    /// buffer (swap it for an empty one) rather than copy it.
    Merged(&'a mut Vec<u8>),
}

/// Coalesces consecutive TCP segments of `frames` (each a complete Ethernet frame, no vnet
/// header) and calls `out` once per frame to deliver, in order: merged ones with a GSO
/// header, the others unchanged with an empty header. `scratch` holds a merged frame while
/// it grows (reused between calls: no allocation once it has grown to 64 KiB).
pub fn coalesce<'a>(frames: impl IntoIterator<Item = &'a [u8]>, scratch: &mut Vec<u8>, mut out: impl FnMut(&VnetHeader, &[u8])) {
    coalesce_with_room(frames, 0, scratch, |h, f| match f {
        Frame::Plain(f) => out(h, f),
        Frame::Merged(v) => out(h, v),
    })
}

/// As [`coalesce`], with `room` bytes kept in front of a merged frame in `scratch` (for the
/// caller's vnet header), handed over as [`Frame::Merged`].
pub fn coalesce_with_room<'a>(
    frames: impl IntoIterator<Item = &'a [u8]>,
    room: usize,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&VnetHeader, Frame),
) {
    let mut run: Option<Run> = None;
    for f in frames {
        let s = segment(f);
        if let (Some(r), Some(s)) = (run.as_mut(), s.as_ref()) {
            let len = f.len() - s.data;
            let joins = s.seq == r.next_seq
                && r.seg.data == s.data
                && len <= r.mss
                && r.segments < MAX_SEGMENTS
                && scratch.len() - room - ETH + len <= MAX_IP_LEN
                && same_headers(&scratch[room..room + r.seg.data], &f[..s.data], s);
            if joins {
                scratch.extend_from_slice(&f[s.data..]);
                r.next_seq = r.next_seq.wrapping_add(len as u32);
                r.segments += 1;
                if s.flags & TCP_PSH != 0 {
                    scratch[room + r.seg.l4 + 13] |= TCP_PSH;
                }
                if len < r.mss || s.flags & TCP_PSH != 0 {
                    flush(&mut run, room, scratch, &mut out);
                }
                continue;
            }
        }
        flush(&mut run, room, scratch, &mut out);
        match s {
            // A run starts with a full-sized segment that does not end the stream's burst.
            Some(s) if s.flags & TCP_PSH == 0 && f.len() - s.data >= MIN_GSO_SIZE as usize => {
                scratch.clear();
                scratch.resize(room, 0);
                scratch.extend_from_slice(f);
                let mss = f.len() - s.data;
                run = Some(Run { seg: s, mss, next_seq: s.seq.wrapping_add(mss as u32), segments: 1 });
            }
            _ => out(&VnetHeader::default(), Frame::Plain(f)),
        }
    }
    flush(&mut run, room, scratch, &mut out);
}

/// Hands over the run in `scratch` (behind `room` bytes): as it came if it is one segment,
/// else with its lengths fixed, the IPv4 header checksum redone, the TCP checksum left
/// partial (the pseudo-header's sum) and a GSO header.
fn flush(run: &mut Option<Run>, room: usize, scratch: &mut Vec<u8>, out: &mut impl FnMut(&VnetHeader, Frame)) {
    let Some(r) = run.take() else { return };
    if r.segments == 1 {
        out(&VnetHeader::default(), Frame::Merged(scratch));
        return;
    }
    let s = r.seg;
    let f = &mut scratch[room..];
    let l4_len = f.len() - s.l4;
    if s.v6 {
        f[ETH + 4..ETH + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let ihl = s.l4 - ETH;
        f[ETH + 2..ETH + 4].copy_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
        let c = finish(sum(&f[ETH..s.l4], 0));
        f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    }
    // A partial checksum holds the pseudo-header's sum, not complemented.
    let partial = !finish(pseudo(f, &s, l4_len as u32));
    f[s.l4 + 16..s.l4 + 18].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: if s.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: s.data as u16,
        gso_size: r.mss as u16,
        csum_start: s.l4 as u16,
        csum_offset: 16,
        num_buffers: 0,
    };
    out(&hdr, Frame::Merged(scratch));
}

#[cfg(test)]
#[path = "gro_tests.rs"]
mod tests;
