//! Software fall-backs for offloads a receiver did not negotiate: completing a partial
//! checksum (`NEEDS_CSUM`) and segmenting a TCP segmentation offload frame into MSS-sized,
//! fully checksummed frames. Both work on a contiguous copy of the frame; the backend only
//! takes this path when the one-copy pass-through is impossible.

use crate::checksum::{finish, pseudo_v4, pseudo_v6, sum};
use crate::proto::{ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};
use crate::vnet::VnetHeader;
use crate::DropReason;
use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice, TcpHeaderSlice};

/// Most segments one GSO frame is cut into in software: bounds the work a single frame can
/// cost (a guest's 64 KiB frame at a 1500-byte MTU is 45; at 576, 123).
pub const MAX_SEGMENTS: usize = 256;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Completes the checksum of a frame whose header said `NEEDS_CSUM`: the one's-complement sum
/// from `csum_start` to the end, stored at `csum_start + csum_offset` (the field already holds
/// the pseudo-header sum, as the sender left it).
pub fn complete_checksum(frame: &mut [u8], csum_start: usize, csum_offset: usize) -> Result<(), DropReason> {
    let at = csum_start + csum_offset;
    if csum_start > frame.len() || at + 2 > frame.len() {
        return Err(DropReason::BadHeader);
    }
    let mut c = finish(sum(&frame[csum_start..], 0));
    if c == 0 {
        // 0 means "no checksum" for UDP; 0xffff is the same value in one's complement.
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Where the layers of a TCP frame start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLayout {
    pub l3: usize,
    pub l4: usize,
    /// Ethernet + IP + TCP headers, i.e. where the payload starts.
    pub headers: usize,
    pub ipv6: bool,
}

/// Parses Ethernet (with at most one VLAN tag), IPv4 or IPv6 (no extension headers) and TCP.
pub fn tcp_layout(frame: &[u8]) -> Option<TcpLayout> {
    if frame.len() < 14 {
        return None;
    }
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == ETH_P_8021Q {
        if frame.len() < 18 {
            return None;
        }
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    let (l4, ipv6) = match ethertype {
        ETH_P_IPV4 => {
            let ip = Ipv4HeaderSlice::from_slice(&frame[l3..]).ok()?;
            if ip.protocol().0 != IPPROTO_TCP || ip.is_fragmenting_payload() {
                return None;
            }
            (l3 + ip.slice().len(), false)
        }
        ETH_P_IPV6 => {
            let ip = Ipv6HeaderSlice::from_slice(&frame[l3..]).ok()?;
            if ip.next_header().0 != IPPROTO_TCP {
                return None;
            }
            (l3 + 40, true)
        }
        _ => return None,
    };
    let tcp = TcpHeaderSlice::from_slice(frame.get(l4..)?).ok()?;
    Some(TcpLayout { l3, l4, headers: l4 + tcp.slice().len(), ipv6 })
}

/// Splits a TSO frame into segments of at most `hdr.gso_size` payload bytes. Each segment is
/// built in `scratch` (reused, so steady state does not allocate) and handed to `emit`, with
/// correct IP lengths, IPv4 IDs and header checksums, TCP sequence numbers, flags and checksums.
/// Returns the number of segments.
pub fn segment_tcp(frame: &[u8], hdr: &VnetHeader, scratch: &mut Vec<u8>, emit: impl FnMut(&[u8])) -> Result<usize, DropReason> {
    segment(frame, hdr, scratch, None, emit)
}

/// As [`segment_tcp`], but each segment is appended to `out` behind `prefix` (a tunnel's
/// header) and stays there: a whole TSO frame's segments in one buffer, built in place (one
/// copy of the payload). `emit` sees each segment as built.
pub fn segment_tcp_append(
    frame: &[u8],
    hdr: &VnetHeader,
    out: &mut Vec<u8>,
    prefix: &[u8],
    emit: impl FnMut(&[u8]),
) -> Result<usize, DropReason> {
    segment(frame, hdr, out, Some(prefix), emit)
}

fn segment(
    frame: &[u8],
    hdr: &VnetHeader,
    buf: &mut Vec<u8>,
    prefix: Option<&[u8]>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, DropReason> {
    let lay = tcp_layout(frame).ok_or(DropReason::SegmentationFailed)?;
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return Err(DropReason::BadHeader);
    }
    let payload = &frame[lay.headers..];
    let seq0 = u32::from_be_bytes(frame[lay.l4 + 4..lay.l4 + 8].try_into().unwrap_or([0; 4]));
    let ip_id0 = u16::from_be_bytes([frame[lay.l3 + 4], frame[lay.l3 + 5]]);
    let orig_flags = frame[lay.l4 + 13];
    let n = payload.len().div_ceil(mss).max(1);
    if n > MAX_SEGMENTS {
        return Err(DropReason::SegmentationFailed);
    }
    // The first segment is the largest: if its IP length does not fit in 16 bits (an MSS
    // near 64 KiB), refuse the frame before emitting anything rather than write a wrapped one.
    let first = lay.headers + mss.min(payload.len());
    if ip_len(first, &lay).is_none() {
        return Err(DropReason::SegmentationFailed);
    }
    for i in 0..n {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let base = match prefix {
            None => {
                buf.clear();
                0
            }
            Some(p) => {
                buf.extend_from_slice(p);
                buf.len()
            }
        };
        buf.extend_from_slice(&frame[..lay.headers]);
        buf.extend_from_slice(chunk);
        let seg = &mut buf[base..];
        let l4_len = seg.len() - lay.l4;
        let len = ip_len(seg.len(), &lay).ok_or(DropReason::SegmentationFailed)?;
        if lay.ipv6 {
            seg[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&len.to_be_bytes());
        } else {
            seg[lay.l3 + 2..lay.l3 + 4].copy_from_slice(&len.to_be_bytes());
            seg[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&ip_id0.wrapping_add(i as u16).to_be_bytes());
            seg[lay.l3 + 10..lay.l3 + 12].copy_from_slice(&[0, 0]);
            let ihl = lay.l4 - lay.l3;
            let c = finish(sum(&seg[lay.l3..lay.l3 + ihl], 0));
            seg[lay.l3 + 10..lay.l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = orig_flags;
        if i + 1 < n {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[lay.l4 + 13] = flags;
        seg[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&[0, 0]);
        let pseudo = if lay.ipv6 {
            let src: [u8; 16] = seg[lay.l3 + 8..lay.l3 + 24].try_into().unwrap_or([0; 16]);
            let dst: [u8; 16] = seg[lay.l3 + 24..lay.l3 + 40].try_into().unwrap_or([0; 16]);
            pseudo_v6(&src, &dst, IPPROTO_TCP, l4_len as u32)
        } else {
            let src: [u8; 4] = seg[lay.l3 + 12..lay.l3 + 16].try_into().unwrap_or([0; 4]);
            let dst: [u8; 4] = seg[lay.l3 + 16..lay.l3 + 20].try_into().unwrap_or([0; 4]);
            // Shorter than the IP total length, which fits.
            pseudo_v4(&src, &dst, IPPROTO_TCP, l4_len as u16)
        };
        let c = finish(sum(&seg[lay.l4..], pseudo));
        seg[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
    }
    Ok(n)
}

/// The IP length field of a segment `seg_len` bytes long (IPv4 total length, IPv6 payload
/// length), or None if it does not fit in 16 bits.
fn ip_len(seg_len: usize, lay: &TcpLayout) -> Option<u16> {
    let fixed = if lay.ipv6 { 40 } else { 0 };
    u16::try_from(seg_len - lay.l3 - fixed).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::checksum;
    use crate::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp_v4(payload_len: usize, flags_fin_psh: bool) -> Vec<u8> {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 5201, 1000, 64000)
            .ack(77);
        if flags_fin_psh {
            b = b.psh().fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    }

    #[test]
    fn complete_checksum_matches_full_computation() {
        let mut f = tcp_v4(1000, false);
        let good = f.clone();
        // Leave only the pseudo header sum in the field, as a sender with CSUM offload does.
        let lay = tcp_layout(&f).unwrap();
        let l4_len = (f.len() - lay.l4) as u16;
        let p = pseudo_v4(&[10, 0, 0, 1], &[10, 0, 0, 2], 6, l4_len);
        let partial = !finish(p);
        f[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&partial.to_be_bytes());
        complete_checksum(&mut f, lay.l4, 16).unwrap();
        assert_eq!(f, good);
        let end = f.len();
        assert_eq!(complete_checksum(&mut f, end - 10, 16), Err(DropReason::BadHeader));
        assert_eq!(complete_checksum(&mut f, 2000, 0), Err(DropReason::BadHeader));
    }

    fn check_segments(frame: &[u8], hdr: VnetHeader, ipv6: bool) {
        let lay = tcp_layout(frame).unwrap();
        let payload = &frame[lay.headers..];
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let mut scratch = Vec::new();
        let n = segment_tcp(frame, &hdr, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, payload.len().div_ceil(hdr.gso_size as usize));
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let p = SlicedPacket::from_ethernet(s).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = p.transport else { panic!("not tcp") };
            assert!(tcp.payload().len() <= hdr.gso_size as usize);
            assert_eq!(tcp.sequence_number(), 1000 + (i * hdr.gso_size as usize) as u32);
            assert_eq!(tcp.fin(), i + 1 == n, "FIN only on the last segment");
            assert_eq!(tcp.psh(), i + 1 == n);
            // Verify the TCP checksum as a receiver would.
            let l4_len = s.len() - lay.l4;
            let pseudo = if ipv6 {
                pseudo_v6(s[lay.l3 + 8..lay.l3 + 24].try_into().unwrap(), s[lay.l3 + 24..lay.l3 + 40].try_into().unwrap(), 6, l4_len as u32)
            } else {
                assert_eq!(checksum(&s[lay.l3..lay.l4]), 0, "IPv4 header checksum");
                let tot = u16::from_be_bytes([s[lay.l3 + 2], s[lay.l3 + 3]]) as usize;
                assert_eq!(tot, s.len() - lay.l3);
                pseudo_v4(
                    s[lay.l3 + 12..lay.l3 + 16].try_into().unwrap(),
                    s[lay.l3 + 16..lay.l3 + 20].try_into().unwrap(),
                    6,
                    l4_len as u16,
                )
            };
            assert_eq!(finish(sum(&s[lay.l4..], pseudo)), 0, "TCP checksum of segment {i}");
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn segments_a_64k_ipv4_tso_frame() {
        let f = tcp_v4(65000, true);
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            hdr_len: 66,
            num_buffers: 0,
        };
        check_segments(&f, hdr, false);
    }

    #[test]
    fn segments_an_ipv6_tso_frame() {
        let payload: Vec<u8> = (0..20000).map(|i| (i % 13) as u8).collect();
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([1; 16], [2; 16], 64)
            .tcp(40000, 5201, 1000, 64000)
            .psh()
            .fin()
            .write(&mut f, &payload)
            .unwrap();
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
            hdr_len: 74,
            num_buffers: 0,
        };
        check_segments(&f, hdr, true);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let hdr = VnetHeader { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 1000, ..Default::default() };
        let mut scratch = Vec::new();
        let good = tcp_v4(3000, false);
        for cut in 0..60 {
            let r = segment_tcp(&good[..cut], &hdr, &mut scratch, |_| {});
            assert!(r.is_err() || cut >= 54, "cut {cut}");
        }
        let mut udp = good.clone();
        udp[23] = 17;
        assert!(segment_tcp(&udp, &hdr, &mut scratch, |_| {}).is_err());
        let zero = VnetHeader { gso_size: 0, ..hdr };
        assert_eq!(segment_tcp(&good, &zero, &mut scratch, |_| {}), Err(DropReason::BadHeader));
    }

    #[test]
    fn segments_per_frame_are_bounded() {
        let mut scratch = Vec::new();
        let big = tcp_v4(60000, false);
        let tiny = VnetHeader { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 100, ..Default::default() };
        let mut emitted = 0;
        assert_eq!(segment_tcp(&big, &tiny, &mut scratch, |_| emitted += 1), Err(DropReason::SegmentationFailed));
        assert_eq!(emitted, 0, "refused before any work");
        let fits = VnetHeader { gso_size: (60000usize.div_ceil(MAX_SEGMENTS)) as u16, ..tiny };
        assert!(segment_tcp(&big, &fits, &mut scratch, |_| emitted += 1).is_ok());
        assert!(emitted <= MAX_SEGMENTS && emitted > 200, "{emitted}");
    }

    #[test]
    fn an_ip_length_over_64k_is_refused_not_wrapped() {
        // The largest frame a port may send, cut with an MSS of 65535: its one segment would
        // be 65539 bytes of IPv4, a total length of 3 once wrapped.
        let mut big = tcp_v4(1000, false);
        big.resize(crate::MAX_FRAME_LEN, 0x5a);
        let hdr = VnetHeader { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 65535, ..Default::default() };
        let (mut scratch, mut emitted) = (Vec::new(), 0);
        assert_eq!(segment_tcp(&big, &hdr, &mut scratch, |_| emitted += 1), Err(DropReason::SegmentationFailed));
        assert_eq!(emitted, 0);
        // At the largest MTU a network may have, every segment's length is exact.
        let hdr = VnetHeader { gso_size: crate::MAX_MTU, ..hdr };
        segment_tcp(&big, &hdr, &mut scratch, |s| {
            assert_eq!(u16::from_be_bytes([s[16], s[17]]) as usize, s.len() - 14);
            emitted += 1;
        })
        .unwrap();
        assert_eq!(emitted, 2);
    }
}
