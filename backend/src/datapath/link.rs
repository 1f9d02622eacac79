//! The seam between the data path and a host-side link: the af-packet, macvtap, tap and
//! VXLAN uplinks and tap ports. The data path
//! sends through this trait and never names a link type; frames a link receives come in
//! through `Inject`.

use std::ops::Range;

use vunet_switch::vnet::RxCaps;
use vunet_switch::DropReason;

/// A link to the host's network that a port sends through.
pub trait HostLink: Send + Sync {
    /// What the link accepts as a receiver: offloads, and the virtio-net header it wants in
    /// front of each frame (`hdr_len` 0: none). None while the link is down.
    fn caps(&self) -> Option<RxCaps>;

    /// Sends one frame given as an iovec list (the vnet header first when `caps().hdr_len`
    /// is not 0). Never blocks: a full queue drops the frame.
    fn send(&self, iov: &[libc::iovec]) -> Result<(), DropReason>;

    /// Whether the link sends many frames in one call (`send_batch`) cheaper than one by one.
    fn batches(&self) -> bool {
        false
    }

    /// Sends several frames; `spans` are each frame's iovecs within `iov`. Returns the frames
    /// (by index in `spans`) that did not go, and why.
    fn send_batch(&self, iov: &mut [libc::iovec], spans: &[Range<usize>]) -> Vec<(usize, DropReason)> {
        spans.iter().enumerate().filter_map(|(i, r)| self.send(&iov[r.clone()]).err().map(|e| (i, e))).collect()
    }

    /// Closes the link for good (its port or network was removed).
    fn close(&self);

    /// What `port-list` and `net-list` show: the link's kind ("af-packet", "macvtap", "tap")
    /// and its host interface.
    fn describe(&self) -> (&'static str, String);

    /// A tunnel's endpoints, for `port-list` (None for a link that is not a tunnel).
    fn tunnel(&self) -> Option<TunnelInfo> {
        None
    }
}

/// What `port-list` shows of a tunnel (a VXLAN uplink).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelInfo {
    pub vni: u32,
    /// `address:port` it sends from and listens on.
    pub local: String,
    /// The flood list.
    pub remotes: Vec<String>,
    /// The multicast group flooded to as well.
    pub group: Option<String>,
    /// Learned inner MACs: (MAC, remote, seconds since last seen).
    pub learned: Vec<(String, String, u64)>,
    /// Learned entries replaced to keep the table within its bounds.
    pub evicted: u64,
}
