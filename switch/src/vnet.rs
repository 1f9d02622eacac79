//! The virtio-net header (virtio 1.x §5.1.6) that precedes every frame on a virtqueue, and the
//! checks a frame from an untrusted guest must pass before it is forwarded anywhere.

use crate::DropReason;

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// Length of the header with VERSION_1 or MRG_RXBUF (it then carries `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Length of the legacy header without MRG_RXBUF.
pub const HDR_LEN_LEGACY: usize = 10;
/// The smallest MSS a GSO frame may carry: Linux's own floor (TCP_MIN_MSS). Below it, one
/// 64 KiB frame would become up to 65,000 segments when a receiver needs them in software.
pub const MIN_GSO_SIZE: u16 = 88;

/// The header fields, decoded (little-endian on the wire for VERSION_1, and for legacy on the
/// little-endian hosts vunet runs on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHeader {
    /// Decodes the first 10 or 12 bytes of `b` (missing bytes read as zero).
    #[inline]
    pub fn parse(b: &[u8]) -> VnetHeader {
        // The whole header (the usual case) is read as a fixed-size array: no copy call.
        let h: [u8; HDR_LEN] = match b.first_chunk::<HDR_LEN>() {
            Some(h) => *h,
            None => {
                let mut h = [0u8; HDR_LEN];
                let n = b.len().min(HDR_LEN);
                h[..n].copy_from_slice(&b[..n]);
                h
            }
        };
        let w = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        VnetHeader { flags: h[0], gso_type: h[1], hdr_len: w(2), gso_size: w(4), csum_start: w(6), csum_offset: w(8), num_buffers: w(10) }
    }

    /// The 12-byte encoding (a 10-byte legacy header is its first 10 bytes).
    #[inline]
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let [a, b] = self.hdr_len.to_le_bytes();
        let [c, d] = self.gso_size.to_le_bytes();
        let [e, f] = self.csum_start.to_le_bytes();
        let [g, h] = self.csum_offset.to_le_bytes();
        let [i, j] = self.num_buffers.to_le_bytes();
        [self.flags, self.gso_type, a, b, c, d, e, f, g, h, i, j]
    }

    /// Encodes into `out` (10 or 12 bytes, the length of `out` decides).
    #[inline]
    pub fn write(&self, out: &mut [u8]) {
        let h = self.to_bytes();
        let n = out.len().min(HDR_LEN);
        out[..n].copy_from_slice(&h[..n]);
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }

    /// Checks a header received from a guest's TX queue against the frame it describes and the
    /// network's MTU. vunet offers HOST_TSO4/6 and CSUM, never HOST_UFO or HOST_ECN, so
    /// anything else is a guest bug or an attack. A frame that is not a GSO frame must fit the
    /// MTU (plus Ethernet header and one VLAN tag); a GSO frame's segments must.
    pub fn validate_tx(&self, frame_len: usize, mtu: usize) -> Result<(), DropReason> {
        if self.gso_type == GSO_NONE && frame_len > mtu + 18 {
            return Err(DropReason::Oversize);
        }
        if self.flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
            return Err(DropReason::BadHeader);
        }
        if self.needs_csum() {
            let start = self.csum_start as usize;
            // The checksum field itself (2 bytes) must lie inside the frame, after Ethernet.
            if start < crate::MIN_FRAME_LEN || start + self.csum_offset as usize + 2 > frame_len {
                return Err(DropReason::BadHeader);
            }
        }
        match self.gso_type {
            GSO_NONE => Ok(()),
            GSO_TCPV4 | GSO_TCPV6 => {
                if !self.needs_csum() || self.gso_size == 0 || self.gso_size as usize > mtu {
                    Err(DropReason::BadHeader)
                } else if self.gso_size < MIN_GSO_SIZE {
                    Err(DropReason::GsoTooSmall)
                } else {
                    Ok(())
                }
            }
            _ => Err(DropReason::BadHeader),
        }
    }
}

/// What a receiving port negotiated, as far as delivery is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxCaps {
    /// VIRTIO_NET_F_GUEST_CSUM: accepts partially checksummed frames.
    pub csum: bool,
    /// VIRTIO_NET_F_GUEST_TSO4.
    pub tso4: bool,
    /// VIRTIO_NET_F_GUEST_TSO6.
    pub tso6: bool,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive buffers.
    pub mrg_rxbuf: bool,
    /// Header length on this port's queues: 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub hdr_len: usize,
}

impl RxCaps {
    /// A receiver that accepts every offload vunet can pass through.
    pub const FULL: RxCaps = RxCaps { csum: true, tso4: true, tso6: true, mrg_rxbuf: true, hdr_len: HDR_LEN };
    /// A receiver that takes only complete, checksummed frames of at most the MTU.
    pub const NONE: RxCaps = RxCaps { csum: false, tso4: false, tso6: false, mrg_rxbuf: false, hdr_len: HDR_LEN };
}

/// How a validated frame must be delivered to a given receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Copy header and frame as they are (one copy).
    PassThrough,
    /// Complete the partial checksum in software, deliver with an empty header.
    CompleteChecksum,
    /// Segment the TSO frame in software, each segment fully checksummed.
    Segment,
}

/// Chooses the delivery of a frame with header `h` (already validated) to receiver `rx`.
pub fn delivery(h: &VnetHeader, rx: &RxCaps) -> Delivery {
    match h.gso_type {
        GSO_TCPV4 if rx.tso4 && rx.csum => Delivery::PassThrough,
        GSO_TCPV6 if rx.tso6 && rx.csum => Delivery::PassThrough,
        GSO_NONE if !h.needs_csum() || rx.csum => Delivery::PassThrough,
        GSO_NONE => Delivery::CompleteChecksum,
        _ => Delivery::Segment,
    }
}

/// The header a receiver gets for a pass-through frame: the sender's offload fields, with
/// DATA_VALID cleared (it is a receive-side flag a sender cannot vouch for).
pub fn rx_header(h: &VnetHeader, num_buffers: u16) -> VnetHeader {
    VnetHeader { flags: h.flags & F_NEEDS_CSUM, num_buffers, ..*h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_write_round_trip() {
        let h = VnetHeader { flags: 1, gso_type: 1, hdr_len: 54, gso_size: 1448, csum_start: 34, csum_offset: 16, num_buffers: 3 };
        let mut b = [0u8; 12];
        h.write(&mut b);
        assert_eq!(VnetHeader::parse(&b), h);
        let mut legacy = [0u8; 10];
        h.write(&mut legacy);
        assert_eq!(VnetHeader::parse(&legacy), VnetHeader { num_buffers: 0, ..h });
    }

    #[test]
    fn validation_rejects_garbage() {
        let ok = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        assert_eq!(ok.validate_tx(65000, 1500), Ok(()));
        assert_eq!(VnetHeader::default().validate_tx(60, 1500), Ok(()));
        assert_eq!(VnetHeader::default().validate_tx(1518, 1500), Ok(()));
        assert_eq!(VnetHeader::default().validate_tx(1519, 1500), Err(DropReason::Oversize));
        assert_eq!(VnetHeader::default().validate_tx(9018, 9000), Ok(()));
        assert_eq!(VnetHeader { gso_size: 1501, ..ok }.validate_tx(65000, 1500), Err(DropReason::BadHeader));
        assert_eq!(VnetHeader { gso_size: 8960, ..ok }.validate_tx(65000, 9000), Ok(()));
        // An MSS of 1 would make software segmentation cut one frame into 65,000.
        assert_eq!(VnetHeader { gso_size: 1, ..ok }.validate_tx(65000, 1500), Err(DropReason::GsoTooSmall));
        assert_eq!(VnetHeader { gso_size: MIN_GSO_SIZE - 1, ..ok }.validate_tx(65000, 1500), Err(DropReason::GsoTooSmall));
        assert_eq!(VnetHeader { gso_size: MIN_GSO_SIZE, ..ok }.validate_tx(65000, 1500), Ok(()));
        let bad = [
            VnetHeader { flags: 0x80, ..ok },
            VnetHeader { gso_type: 0x42, ..ok },
            VnetHeader { gso_type: GSO_UDP, ..ok },
            VnetHeader { gso_type: GSO_TCPV4 | GSO_ECN, ..ok },
            VnetHeader { gso_size: 0, ..ok },
            VnetHeader { flags: 0, ..ok },
            VnetHeader { csum_start: 64990, ..ok },
            VnetHeader { csum_offset: 0xffff, ..ok },
            VnetHeader { csum_start: 2, ..ok },
        ];
        for b in bad {
            assert_eq!(b.validate_tx(65000, 1500), Err(DropReason::BadHeader), "{b:?}");
        }
    }

    #[test]
    fn delivery_follows_receiver_features() {
        let tso =
            VnetHeader { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 1448, csum_start: 34, csum_offset: 16, ..Default::default() };
        let partial = VnetHeader { gso_type: GSO_NONE, ..tso };
        let full = VnetHeader::default();
        assert_eq!(delivery(&tso, &RxCaps::FULL), Delivery::PassThrough);
        assert_eq!(delivery(&tso, &RxCaps::NONE), Delivery::Segment);
        assert_eq!(delivery(&tso, &RxCaps { tso4: false, ..RxCaps::FULL }), Delivery::Segment);
        assert_eq!(delivery(&VnetHeader { gso_type: GSO_TCPV6, ..tso }, &RxCaps { tso6: false, ..RxCaps::FULL }), Delivery::Segment);
        assert_eq!(delivery(&partial, &RxCaps::FULL), Delivery::PassThrough);
        assert_eq!(delivery(&partial, &RxCaps::NONE), Delivery::CompleteChecksum);
        assert_eq!(delivery(&full, &RxCaps::NONE), Delivery::PassThrough);
        assert_eq!(rx_header(&VnetHeader { flags: 3, ..tso }, 2).flags, F_NEEDS_CSUM);
    }
}
