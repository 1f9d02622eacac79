//! 802.1Q VLANs with Open vSwitch's port modes: which VLAN a frame a port sent belongs to
//! (ingress), and how it must look on each port it goes out of (egress). Pure: a port's mode
//! and a frame's first bytes in, a verdict out.
//!
//! Inside the switch a frame belongs to one VLAN, a [`Vid`]; VLAN 0 is the network's untagged
//! VLAN, where the gateway and its services are. Frames are not rewritten on ingress: the tag
//! (if the port mode gave it a meaning) stays in the frame, and each receiver gets it stripped,
//! inserted or rewritten for its own mode ([`egress`], [`retag_head`]).
//!
//! Only the outer tag counts (an inner tag, QinQ's customer tag, is payload), and only TPID
//! 0x8100: an 802.1ad (0x88a8) frame is an untagged frame of another EtherType.

use crate::vnet::VnetHeader;
use crate::DropReason;

/// The 802.1Q tag protocol identifier.
pub const TPID: u16 = 0x8100;
/// Bytes of an 802.1Q tag.
pub const TAG_LEN: usize = 4;
/// The largest VLAN ID a port may carry (4095 is reserved, 0 means "priority tag only").
pub const MAX_VID: Vid = 4094;

/// A VLAN within the switch: 1..=4094, or 0 for the network's untagged VLAN.
pub type Vid = u16;

/// A set of VLAN IDs (a bitmap of 4096 bits: membership is one load per frame; boxed, so a
/// port mode stays small).
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet(Box<[u64; 64]>);

impl Default for VlanSet {
    fn default() -> Self {
        VlanSet(Box::new([0; 64]))
    }
}

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl VlanSet {
    pub fn insert(&mut self, vid: Vid) {
        let v = (vid & 0xfff) as usize;
        self.0[v / 64] |= 1 << (v % 64);
    }
    pub fn contains(&self, vid: Vid) -> bool {
        let v = (vid & 0xfff) as usize;
        vid <= 0xfff && self.0[v / 64] & (1 << (v % 64)) != 0
    }
    pub fn iter(&self) -> impl Iterator<Item = Vid> + '_ {
        (0..4096u16).filter(|&v| self.contains(v))
    }
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
}

impl FromIterator<Vid> for VlanSet {
    fn from_iter<I: IntoIterator<Item = Vid>>(it: I) -> Self {
        let mut s = VlanSet::default();
        for v in it {
            s.insert(v);
        }
        s
    }
}

/// A port's VLAN mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PortVlan {
    /// No VLAN configuration (as before VLANs existed): every frame is the network's untagged
    /// VLAN 0, whatever tags it carries (they are payload, passed on as they are).
    #[default]
    Untagged,
    /// An access port: untagged frames on the port, VLAN `0` inside the switch. Tagged frames
    /// from the guest are dropped, even ones tagged with this VLAN (OVS does the same).
    Access(Vid),
    /// A trunk: frames tagged with one of `vids` belong to that VLAN. Untagged frames belong to
    /// `native`, or to the network's untagged VLAN 0 without one. Native-VLAN frames leave
    /// untagged (OVS `native-untagged`), or tagged with `native_tagged` (OVS `native-tagged`).
    /// The native VLAN is carried whether or not `vids` lists it.
    Trunk { vids: VlanSet, native: Option<Vid>, native_tagged: bool },
    /// An uplink that is VLAN `0` of the LAN (`vlan = N` on `[network.uplink]`): the network's
    /// untagged VLAN leaves tagged with it, and only frames tagged with it come in (untagged).
    Outer(Vid),
}

impl PortVlan {
    /// The VLAN of the port's untagged frames (where its guest's own address lives), if it
    /// has untagged frames.
    pub fn home(&self) -> Option<Vid> {
        match self {
            PortVlan::Untagged => Some(0),
            PortVlan::Access(v) => Some(*v),
            PortVlan::Trunk { native, .. } => Some(native.unwrap_or(0)),
            PortVlan::Outer(_) => None,
        }
    }

    /// Whether frames of VLAN `vid` go out of this port.
    pub fn carries(&self, vid: Vid) -> bool {
        match self {
            PortVlan::Untagged | PortVlan::Outer(_) => vid == 0,
            PortVlan::Access(v) => vid == *v,
            PortVlan::Trunk { vids, native, .. } => match native {
                Some(n) => vid == *n || (vid != 0 && vids.contains(vid)),
                None => vid == 0 || vids.contains(vid),
            },
        }
    }

    /// How a frame of VLAN `vid` leaves this port: `None` if the port does not carry it.
    pub fn egress(&self, vid: Vid) -> Option<Out> {
        if !self.carries(vid) {
            return None;
        }
        Some(match self {
            PortVlan::Untagged | PortVlan::Access(_) => Out::Untagged,
            PortVlan::Outer(v) => Out::Tagged(*v),
            PortVlan::Trunk { native, native_tagged, .. } => {
                if vid == 0 || (Some(vid) == *native && !native_tagged) {
                    Out::Untagged
                } else {
                    Out::Tagged(vid)
                }
            }
        })
    }

    /// A short description for listings: `untagged`, `access 10`, `trunk 10,20 native 10`,
    /// `vlan 100 of the LAN`.
    pub fn describe(&self) -> String {
        match self {
            PortVlan::Untagged => "untagged".into(),
            PortVlan::Access(v) => format!("access {v}"),
            PortVlan::Trunk { vids, native, native_tagged } => {
                let list = vids.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
                let mut s = format!("trunk {list}");
                if let Some(n) = native {
                    s += &format!(" native {n}{}", if *native_tagged { " tagged" } else { "" });
                }
                s
            }
            PortVlan::Outer(v) => format!("vlan {v} of the LAN"),
        }
    }
}

/// How a frame leaves a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    Untagged,
    Tagged(Vid),
}

/// What a frame a port sent is, VLAN-wise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingress {
    /// The VLAN it belongs to in the switch (0: the network's untagged VLAN).
    pub vlan: Vid,
    /// Whether its bytes 12..16 are the 802.1Q tag that gave it the VLAN (or a priority tag):
    /// receivers get that tag stripped or rewritten. False for a port without VLAN
    /// configuration, whose tags are payload.
    pub tagged: bool,
}

/// The outer 802.1Q tag of a frame: `Ok(None)` untagged, `Ok(Some(tci))` tagged, an error
/// for a tag cut short by the frame's end.
pub fn outer_tag(frame: &[u8]) -> Result<Option<u16>, DropReason> {
    if frame.len() < 14 || u16::from_be_bytes([frame[12], frame[13]]) != TPID {
        return Ok(None);
    }
    match frame.get(14..18) {
        Some(t) => Ok(Some(u16::from_be_bytes([t[0], t[1]]))),
        None => Err(DropReason::BadVlanTag),
    }
}

/// Classifies a frame sent by a port in mode `mode` (`frame`: at least its first 18 bytes
/// when it has them). Errors: [`DropReason::BadVlanTag`] for a truncated tag or VID 4095,
/// [`DropReason::VlanNotAllowed`] for a VLAN the port does not carry (or a tag on an access
/// port, or an untagged frame on an uplink that is one VLAN of the LAN).
pub fn ingress(mode: &PortVlan, frame: &[u8]) -> Result<Ingress, DropReason> {
    if *mode == PortVlan::Untagged {
        return Ok(Ingress { vlan: 0, tagged: false });
    }
    let tci = outer_tag(frame)?;
    let vid = tci.map(|t| t & 0xfff);
    if vid == Some(0xfff) {
        return Err(DropReason::BadVlanTag);
    }
    let tagged = tci.is_some();
    // A priority tag (VID 0) is an untagged frame with a priority.
    let vlan = match (mode, vid) {
        (PortVlan::Untagged, _) => 0,
        (PortVlan::Access(v), None | Some(0)) => *v,
        (PortVlan::Access(_), Some(_)) => return Err(DropReason::VlanNotAllowed),
        (PortVlan::Trunk { native, .. }, None | Some(0)) => native.unwrap_or(0),
        (PortVlan::Trunk { .. }, Some(v)) if mode.carries(v) => v,
        (PortVlan::Trunk { .. }, Some(_)) => return Err(DropReason::VlanNotAllowed),
        (PortVlan::Outer(o), Some(v)) if v == *o => 0,
        (PortVlan::Outer(_), _) => return Err(DropReason::VlanNotAllowed),
    };
    Ok(Ingress { vlan, tagged })
}

/// What to do to a frame's head for one receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Deliver as it is.
    Keep,
    /// Remove the tag at bytes 12..16.
    Strip,
    /// Insert a tag with this VID after the MAC addresses.
    Insert(Vid),
    /// Set the VID of the tag at bytes 12..16 (its priority bits stay).
    Rewrite(Vid),
}

impl Edit {
    /// How the frame's length changes.
    pub fn delta(self) -> isize {
        match self {
            Edit::Strip => -(TAG_LEN as isize),
            Edit::Insert(_) => TAG_LEN as isize,
            Edit::Keep | Edit::Rewrite(_) => 0,
        }
    }
}

/// The edit that makes a frame classified as `from` leave a port as `out`.
pub fn edit(from: Ingress, out: Out) -> Edit {
    match (from.tagged, out) {
        (false, Out::Untagged) => Edit::Keep,
        (false, Out::Tagged(v)) => Edit::Insert(v),
        (true, Out::Untagged) => Edit::Strip,
        (true, Out::Tagged(v)) => Edit::Rewrite(v),
    }
}

/// Writes into `out` the head of the edited frame, from the original's first bytes `head`
/// (at least 16 of them for a tag to strip or rewrite, 12 to insert one). Returns how many
/// bytes of `out` are the new head and from which offset of the original the rest follows
/// unchanged; `None` if `head` is too short for the edit.
pub fn retag_head(head: &[u8], e: Edit, out: &mut [u8; 16]) -> Option<(usize, usize)> {
    match e {
        Edit::Keep => Some((0, 0)),
        Edit::Strip => {
            out[..12].copy_from_slice(head.get(..12)?);
            head.get(12..16)?;
            Some((12, 16))
        }
        Edit::Insert(v) => {
            out[..12].copy_from_slice(head.get(..12)?);
            out[12..14].copy_from_slice(&TPID.to_be_bytes());
            out[14..16].copy_from_slice(&(v & 0xfff).to_be_bytes());
            Some((16, 12))
        }
        Edit::Rewrite(v) => {
            out.copy_from_slice(head.get(..16)?);
            let tci = (u16::from_be_bytes([out[14], out[15]]) & 0xf000) | (v & 0xfff);
            out[14..16].copy_from_slice(&tci.to_be_bytes());
            Some((16, 16))
        }
    }
}

/// The virtio-net header of a frame whose head grew or shrank by `delta` bytes (a tag inserted
/// or stripped): the checksum start and the header length of a TSO frame move with the data.
/// `None` if they would leave the frame's Ethernet header or overflow.
pub fn shift_header(hdr: &VnetHeader, delta: isize) -> Option<VnetHeader> {
    let mut h = *hdr;
    let moved = |x: u16| -> Option<u16> {
        let v = x as isize + delta;
        (crate::MIN_FRAME_LEN as isize..=u16::MAX as isize).contains(&v).then_some(v as u16)
    };
    if h.needs_csum() {
        h.csum_start = moved(h.csum_start)?;
    }
    if h.hdr_len != 0 {
        h.hdr_len = moved(h.hdr_len).unwrap_or(0);
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnet::{F_NEEDS_CSUM, GSO_TCPV4};

    fn frame(tags: &[u16]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend([0x52, 0x54, 0, 0, 0, 1]);
        for t in tags {
            f.extend(TPID.to_be_bytes());
            f.extend(t.to_be_bytes());
        }
        f.extend([0x08, 0x00]);
        f.extend([0x45; 20]);
        f
    }

    fn trunk(vids: &[Vid], native: Option<Vid>, native_tagged: bool) -> PortVlan {
        PortVlan::Trunk { vids: vids.iter().copied().collect(), native, native_tagged }
    }

    const fn ing(vlan: Vid, tagged: bool) -> Result<Ingress, DropReason> {
        Ok(Ingress { vlan, tagged })
    }

    #[test]
    fn untagged_port_ignores_tags() {
        let m = PortVlan::Untagged;
        assert_eq!(ingress(&m, &frame(&[])), ing(0, false));
        assert_eq!(ingress(&m, &frame(&[10])), ing(0, false));
        assert_eq!(ingress(&m, &frame(&[0xfff])), ing(0, false));
        assert_eq!(ingress(&m, &frame(&[10])[..16]), ing(0, false));
        assert_eq!(m.egress(0), Some(Out::Untagged));
        assert_eq!(m.egress(10), None);
    }

    #[test]
    fn access_mode_matrix() {
        let m = PortVlan::Access(10);
        assert_eq!(ingress(&m, &frame(&[])), ing(10, false));
        // A priority tag is an untagged frame: it belongs to the port's VLAN and the tag goes.
        assert_eq!(ingress(&m, &frame(&[0x6000])), ing(10, true));
        // Any VID, even the port's own, is refused.
        assert_eq!(ingress(&m, &frame(&[10])), Err(DropReason::VlanNotAllowed));
        assert_eq!(ingress(&m, &frame(&[20])), Err(DropReason::VlanNotAllowed));
        assert_eq!(ingress(&m, &frame(&[0xfff])), Err(DropReason::BadVlanTag));
        assert_eq!(ingress(&m, &frame(&[10])[..16]), Err(DropReason::BadVlanTag));
        assert_eq!(m.egress(10), Some(Out::Untagged));
        assert_eq!(m.egress(0), None);
        assert_eq!(m.egress(20), None);
        assert_eq!(m.home(), Some(10));
    }

    #[test]
    fn trunk_mode_matrix() {
        let m = trunk(&[10, 20], None, false);
        assert_eq!(ingress(&m, &frame(&[])), ing(0, false));
        assert_eq!(ingress(&m, &frame(&[0])), ing(0, true));
        assert_eq!(ingress(&m, &frame(&[10])), ing(10, true));
        // Priority bits do not change the VLAN.
        assert_eq!(ingress(&m, &frame(&[0xe000 | 20])), ing(20, true));
        assert_eq!(ingress(&m, &frame(&[30])), Err(DropReason::VlanNotAllowed));
        assert_eq!(ingress(&m, &frame(&[4095])), Err(DropReason::BadVlanTag));
        assert_eq!(ingress(&m, &frame(&[20])[..15]), Err(DropReason::BadVlanTag));
        // Double tags: the outer one decides, the inner one is payload.
        assert_eq!(ingress(&m, &frame(&[10, 30])), ing(10, true));
        assert_eq!(ingress(&m, &frame(&[30, 10])), Err(DropReason::VlanNotAllowed));
        // 802.1ad is not a tag here.
        let mut ad = frame(&[10]);
        ad[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
        assert_eq!(ingress(&m, &ad), ing(0, false));
        assert_eq!(m.egress(0), Some(Out::Untagged));
        assert_eq!(m.egress(10), Some(Out::Tagged(10)));
        assert_eq!(m.egress(30), None);
    }

    #[test]
    fn native_vlan_untagged_and_tagged() {
        let m = trunk(&[20], Some(10), false);
        assert_eq!(ingress(&m, &frame(&[])), ing(10, false));
        assert_eq!(ingress(&m, &frame(&[0])), ing(10, true));
        // The native VLAN is carried even though the list does not name it.
        assert_eq!(ingress(&m, &frame(&[10])), ing(10, true));
        assert_eq!(ingress(&m, &frame(&[20])), ing(20, true));
        assert_eq!(m.egress(10), Some(Out::Untagged));
        assert_eq!(m.egress(20), Some(Out::Tagged(20)));
        // With a native VLAN, the network's untagged VLAN is not on the port.
        assert_eq!(m.egress(0), None);
        let t = trunk(&[20], Some(10), true);
        assert_eq!(t.egress(10), Some(Out::Tagged(10)));
        assert_eq!(ingress(&t, &frame(&[])), ing(10, false));
    }

    #[test]
    fn outer_vlan_of_an_uplink() {
        let m = PortVlan::Outer(100);
        assert_eq!(ingress(&m, &frame(&[100])), ing(0, true));
        assert_eq!(ingress(&m, &frame(&[])), Err(DropReason::VlanNotAllowed));
        assert_eq!(ingress(&m, &frame(&[101])), Err(DropReason::VlanNotAllowed));
        assert_eq!(m.egress(0), Some(Out::Tagged(100)));
        assert_eq!(m.egress(100), None);
        assert_eq!(m.home(), None);
    }

    #[test]
    fn edits_strip_insert_rewrite() {
        let tagged = frame(&[0xa000 | 10]);
        let plain = frame(&[]);
        let mut out = [0; 16];
        assert_eq!(edit(Ingress { vlan: 10, tagged: true }, Out::Untagged), Edit::Strip);
        let (n, rest) = retag_head(&tagged, Edit::Strip, &mut out).unwrap();
        let mut f = out[..n].to_vec();
        f.extend(&tagged[rest..]);
        assert_eq!(f, plain);

        assert_eq!(edit(Ingress { vlan: 10, tagged: false }, Out::Tagged(10)), Edit::Insert(10));
        let (n, rest) = retag_head(&plain, Edit::Insert(10), &mut out).unwrap();
        let mut f = out[..n].to_vec();
        f.extend(&plain[rest..]);
        assert_eq!(f, frame(&[10]));

        // A rewrite keeps the priority bits.
        let (n, rest) = retag_head(&tagged, Edit::Rewrite(20), &mut out).unwrap();
        let mut f = out[..n].to_vec();
        f.extend(&tagged[rest..]);
        assert_eq!(f, frame(&[0xa000 | 20]));

        assert_eq!(retag_head(&tagged[..14], Edit::Strip, &mut out), None);
        assert_eq!(edit(Ingress { vlan: 0, tagged: false }, Out::Untagged), Edit::Keep);
    }

    #[test]
    fn header_offsets_follow_the_tag() {
        let h = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 58,
            gso_size: 1448,
            csum_start: 38,
            csum_offset: 16,
            num_buffers: 0,
        };
        let s = shift_header(&h, 4).unwrap();
        assert_eq!((s.csum_start, s.hdr_len, s.gso_size, s.csum_offset), (42, 62, 1448, 16));
        let s = shift_header(&h, -4).unwrap();
        assert_eq!((s.csum_start, s.hdr_len), (34, 54));
        // A checksum start inside the Ethernet header cannot move further up.
        let bad = VnetHeader { csum_start: 16, ..h };
        assert_eq!(shift_header(&bad, -4), None);
        let plain = VnetHeader::default();
        assert_eq!(shift_header(&plain, -4), Some(plain));
    }

    #[test]
    fn vlan_set() {
        let s: VlanSet = [1, 64, 4094].into_iter().collect();
        assert!(s.contains(1) && s.contains(64) && s.contains(4094));
        assert!(!s.contains(0) && !s.contains(2) && !s.contains(4095) && !s.contains(u16::MAX));
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![1, 64, 4094]);
        assert_eq!(trunk(&[10, 20], Some(10), true).describe(), "trunk 10,20 native 10 tagged");
    }
}
