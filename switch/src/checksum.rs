//! The Internet checksum (RFC 1071), summed 64 bits at a time: this runs once per segment on the
//! software-offload path, so it must not be the bottleneck of a 64 KiB TSO frame.

/// Adds `data` to a running one's-complement sum (not yet folded). `data` is taken as a sequence
/// of big-endian 16-bit words starting at an even offset of the checksummed area.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc: u128 = initial as u128;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc += u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) as u128;
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    acc += u64::from_be_bytes(tail) as u128;
    // Fold 128 -> 64 bits, keeping the end-around carries.
    let mut s = (acc as u64 as u128) + (acc >> 64);
    s = (s as u64 as u128) + (s >> 64);
    s as u64
}

/// Folds a running sum to 16 bits and complements it: the value to store in a header.
pub fn finish(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Checksum of a complete buffer.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

/// Running sum of the TCP/UDP pseudo header for IPv4.
pub fn pseudo_v4(src: &[u8; 4], dst: &[u8; 4], proto: u8, len: u16) -> u64 {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(src);
    b[4..8].copy_from_slice(dst);
    b[9] = proto;
    b[10..12].copy_from_slice(&len.to_be_bytes());
    sum(&b, 0)
}

/// Running sum of the TCP/UDP pseudo header for IPv6.
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u32) -> u64 {
    let mut b = [0u8; 40];
    b[0..16].copy_from_slice(src);
    b[16..32].copy_from_slice(dst);
    b[32..36].copy_from_slice(&len.to_be_bytes());
    b[39] = proto;
    sum(&b, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward 16-bit reference implementation.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
            s += w as u32;
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn matches_reference_for_all_lengths() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7919 % 251) as u8).collect();
        for n in 0..data.len() {
            assert_eq!(checksum(&data[..n]), reference(&data[..n]), "len {n}");
        }
        assert_eq!(checksum(&[0xff; 64]), reference(&[0xff; 64]));
    }

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        // A real IPv4 header (checksum 0xb861 at bytes 10..12).
        let h = [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7];
        assert_eq!(checksum(&h), 0);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(checksum(&z), 0xb861);
    }
}
