//! Uplinks: the switch port that leads out of the virtual network to a host interface.
//!
//! - `af-packet`: a raw packet socket bound to an existing interface (a NIC, a veth, a kernel
//!   bridge such as br0), promiscuous, with a virtio-net header on every frame
//!   (PACKET_VNET_HDR) so checksum offload and TSO pass between guests and the kernel as they
//!   are. Received frames come in batches of up to `BATCH` per `recvmmsg`.
//! - `macvtap`: vunet makes a macvtap on a parent interface (or reuses one of that name) and
//!   opens its `/dev/tapN` with a vnet header and offloads.
//! - `tap`: vunet makes a tap on the host with a vnet header and offloads; the host can address
//!   it, route it or put it in a kernel bridge.
//! - `vxlan`: a VXLAN tunnel (RFC 7348) over UDP sockets to remote endpoints: no interface and
//!   no privileges; frames are encapsulated on the way out and decapsulated on the way in
//!   ([`vxlan`], docs/vxlan.md).
//!
//! Every uplink is watched: if its interface goes away (deleted, or re-created with a new index)
//! the uplink closes, logs once, and reopens when the interface is back; a link that goes down
//! and up is logged once each way. Guest ports and other networks never wait on an uplink.

mod netlink;
mod rx;
mod vxlan;

pub use rx::run;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use tracing::{info, warn};
use vunet_switch::vnet::{RxCaps, HDR_LEN_LEGACY};
use vunet_switch::{DropReason, Mac};

use crate::config::{UplinkConfig, UplinkKind};
use crate::datapath::HostLink;

/// Frames read per batch.
pub const BATCH: usize = 32;
/// `PACKET_AUXDATA` (linux/if_packet.h), not in the libc crate.
const PACKET_AUXDATA: libc::c_int = 8;
/// A receive buffer holds the largest GSO frame the kernel hands over, with its header.
const BUF_LEN: usize = 65536 + HDR_LEN_LEGACY + 64;
/// How often an idle uplink checks its interface.
const WATCH: Duration = Duration::from_secs(1);

/// The longest `close` waits for the RX thread to let go of the descriptor.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

const MACVLAN_MODE_BRIDGE: u32 = 4;
const MACVLAN_MODE_PASSTHRU: u32 = 8;

/// An open uplink descriptor.
pub(super) struct Io {
    pub(super) fd: OwnedFd,
    /// 10 when every frame carries a virtio-net header, 0 when none does.
    pub(super) hdr_len: usize,
    /// The index of the interface it is bound to, to notice a re-created interface.
    ifindex: u32,
    /// A VXLAN tunnel's multicast group socket, read like `fd`.
    pub(super) group: Option<OwnedFd>,
}

pub struct Uplink {
    pub kind: UplinkKind,
    /// The interface frames go through: the one given (af-packet), the macvtap, the tap.
    pub ifname: String,
    /// The macvtap's parent.
    parent: Option<String>,
    mac: Option<Mac>,
    /// macvtap mode: passthru (all of the parent's frames, for bridged guests) or bridge.
    macvtap_mode: u32,
    /// The open descriptor, None while closed. Taken without a lock: the RX thread keeps
    /// its own reference across `poll`, a sender for one write, and neither ever waits for
    /// the other or for `close` (a lock held across `poll` made `close` wait behind the RX
    /// thread, and a send from the RX thread's router tick then wait behind `close`).
    pub(super) io: ArcSwapOption<Io>,
    /// Written by `close` to wake the RX thread out of `poll`, so it lets go of the descriptor.
    pub(super) wake: EventFd,
    pub(super) link_up: AtomicBool,
    /// kind = "vxlan": the tunnel (the receiving socket is `io`).
    tunnel: Option<vxlan::Tunnel>,
}

/// Why an uplink could not start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink interface {0:?} does not exist")]
    NoInterface(String),
    #[error("uplink {name:?}: {reason}")]
    Open { name: String, reason: String },
    #[error("vxlan uplink: local address {0} is not an address of this host")]
    NoLocalAddress(std::net::Ipv4Addr),
}

/// How long a link seen going down is given before it is reported as down (`Uplink::watch`).
const DOWN_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `struct ifreq` with the flags member (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq { name: [0; 16], flags, _pad: [0; 22] };
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }
}

/// The interface's flags (IFF_UP, IFF_RUNNING...).
fn if_flags(name: &str) -> io::Result<libc::c_short> {
    // SAFETY: a plain datagram socket used only for the ioctl below.
    let s = unsafe { OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0))?) };
    let mut r = IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS reads into an ifreq-sized buffer.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r) })?;
    Ok(r.flags)
}

/// `ip link set NAME up`.
fn set_up(name: &str) -> io::Result<()> {
    set_flags(name, libc::IFF_UP as libc::c_short)
}

/// Sets `want` (IFF_UP, IFF_ALLMULTI) on interface `name`, if not set yet.
fn set_flags(name: &str, want: libc::c_short) -> io::Result<()> {
    let flags = if_flags(name)?;
    if flags & want == want {
        return Ok(());
    }
    // SAFETY: as in if_flags.
    let s = unsafe { OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0))?) };
    let r = IfReq::new(name, flags | want);
    // SAFETY: SIOCSIFFLAGS reads an ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &r) })?;
    Ok(())
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: an int option of the right size.
    check(unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), 4) }).map(|_| ())
}

fn open_af_packet(name: &str) -> io::Result<Io> {
    let index = ifindex(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto as i32))?)
    };
    let raw = fd.as_raw_fd();
    // Offload metadata in and out; without it TSO frames are segmented in software.
    let hdr_len = if setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1).is_ok() { HDR_LEN_LEGACY } else { 0 };
    // The kernel takes VLAN tags out of received frames before packet sockets see them and
    // says what they were in the auxiliary data: asked for, so the tags can be put back.
    setsockopt_int(raw, libc::SOL_PACKET, PACKET_AUXDATA, 1)?;
    // Room for bursts; the FORCE variants work for root, the plain ones cap at the sysctl.
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        if setsockopt_int(raw, libc::SOL_SOCKET, force, 4 << 20).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, 4 << 20);
        }
    }
    // SAFETY: a zeroed sockaddr_ll with family, protocol and index set is a valid bind address.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        check(libc::bind(raw, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32))?;
        // Promiscuous membership: the guests' MACs are not the interface's.
        let mut mreq: libc::packet_mreq = std::mem::zeroed();
        mreq.mr_ifindex = index as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        check(libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as u32,
        ))?;
    }
    Ok(Io { fd, hdr_len, ifindex: index, group: None })
}

/// Sets up a tap-like descriptor (a tun/tap or macvtap file): vnet header, offloads.
fn tap_setup(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let r = IfReq::new(name, (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short);
    // SAFETY: TUNSETIFF takes an ifreq; the others take an int.
    unsafe {
        check(libc::ioctl(raw, libc::TUNSETIFF, &r))?;
        let sz: libc::c_int = HDR_LEN_LEGACY as libc::c_int;
        check(libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &sz))?;
        check(libc::ioctl(raw, libc::TUNSETOFFLOAD, (libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6) as libc::c_ulong))?;
    }
    Ok(())
}

fn open_file(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) with a valid path; the descriptor is owned at once.
    Ok(unsafe { OwnedFd::from_raw_fd(check(libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC))?) })
}

fn open_tap(name: &str) -> io::Result<Io> {
    let fd = open_file("/dev/net/tun")?;
    tap_setup(&fd, name)?;
    set_up(name)?;
    let index = ifindex(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    Ok(Io { fd, hdr_len: HDR_LEN_LEGACY, ifindex: index, group: None })
}

fn open_macvtap(parent: &str, name: &str, mac: Option<Mac>, mode: u32) -> io::Result<Io> {
    let parent_index = ifindex(parent).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    if ifindex(name).is_none() {
        netlink::create_macvtap(parent_index, name, mac, mode)?;
    }
    // A routed network's macvtap (bridge mode, the router's own MAC) passes only the multicast
    // groups the host joined on it: all of it, so the router hears neighbour solicitations
    // for its IPv6 addresses (and, with ND proxy, the guests') on their solicited-node groups.
    let allmulti = if mode == MACVLAN_MODE_BRIDGE { libc::IFF_ALLMULTI as libc::c_short } else { 0 };
    set_flags(name, libc::IFF_UP as libc::c_short | allmulti)?;
    let index = ifindex(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let fd = open_file(&format!("/dev/tap{index}"))?;
    tap_setup(&fd, name)?;
    Ok(Io { fd, hdr_len: HDR_LEN_LEGACY, ifindex: index, group: None })
}

impl Uplink {
    /// What `open` would refuse for a missing interface, found without opening or creating
    /// anything (a tap is made by vunet; the other kinds attach to an interface that exists).
    pub fn check(cfg: &UplinkConfig) -> Result<(), UplinkError> {
        if let Some(v) = &cfg.vxlan {
            if crate::config::interface_of_address(v.local).is_none() {
                return Err(UplinkError::NoLocalAddress(v.local));
            }
        }
        if !matches!(cfg.kind, UplinkKind::Tap | UplinkKind::Vxlan) && ifindex(&cfg.interface).is_none() {
            return Err(UplinkError::NoInterface(cfg.interface.clone()));
        }
        Ok(())
    }

    /// Opens the uplink of network `network` (of MTU `mtu`); a missing interface is the
    /// caller's error.
    pub fn open(network: &str, cfg: &UplinkConfig, mtu: u16) -> Result<Uplink, UplinkError> {
        let open_err = |e: io::Error| match (e.raw_os_error(), &cfg.vxlan) {
            (Some(libc::EADDRNOTAVAIL), Some(v)) => UplinkError::NoLocalAddress(v.local),
            _ => UplinkError::Open { name: cfg.interface.clone(), reason: crate::config::io_reason(&e) },
        };
        let tunnel = cfg.vxlan.as_ref().map(|v| vxlan::Tunnel::new(v, mtu)).transpose().map_err(open_err)?;
        let (ifname, parent) = match cfg.kind {
            UplinkKind::Macvtap => (cfg.name.clone().unwrap_or_else(|| macvtap_name(network)), Some(cfg.interface.clone())),
            _ => (cfg.interface.clone(), None),
        };
        let up = Uplink {
            kind: cfg.kind,
            ifname,
            parent,
            mac: cfg.mac,
            macvtap_mode: if cfg.own_mac { MACVLAN_MODE_BRIDGE } else { MACVLAN_MODE_PASSTHRU },
            io: ArcSwapOption::empty(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|e| UplinkError::Open { name: cfg.interface.clone(), reason: e.to_string() })?,
            link_up: AtomicBool::new(true),
            tunnel,
        };
        let lower = up.parent.as_deref().unwrap_or(&up.ifname);
        if !matches!(cfg.kind, UplinkKind::Tap | UplinkKind::Vxlan) && ifindex(lower).is_none() {
            return Err(UplinkError::NoInterface(lower.to_string()));
        }
        let io = up.open_io().map_err(|e| UplinkError::Open { name: up.ifname.clone(), reason: crate::config::io_reason(&e) })?;
        match &up.tunnel {
            Some(t) => {
                info!(network = %network, "uplink vxlan: VNI {} on {}:{} to {:?} (group {:?}) ready", t.cfg.vni, t.cfg.local, t.cfg.port, t.cfg.remotes, t.cfg.group)
            }
            None => {
                info!(network = %network, "uplink {} {} ready ({})", cfg.kind.name(), up.ifname, if io.hdr_len > 0 { "offloads on" } else { "no vnet header: TSO segmented in software" })
            }
        }
        up.io.store(Some(Arc::new(io)));
        Ok(up)
    }

    fn open_io(&self) -> io::Result<Io> {
        match self.kind {
            UplinkKind::AfPacket => open_af_packet(&self.ifname),
            UplinkKind::Tap => open_tap(&self.ifname),
            UplinkKind::Macvtap => open_macvtap(self.parent.as_deref().unwrap_or_default(), &self.ifname, self.mac, self.macvtap_mode),
            UplinkKind::Vxlan => self.tunnel.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?.open(),
        }
    }

    /// Whether the uplink's interface is still the one it opened; logs changes once.
    pub(super) fn watch(&self, network: &str) -> bool {
        let current = self.io.load().as_ref().map(|io| io.ifindex);
        let Some(index) = current else { return false };
        if let Some(t) = &self.tunnel {
            // A socket, no interface to watch; the learned endpoints age here.
            t.expire();
            return true;
        }
        let gone = || {
            warn!(network = %network, "uplink {}: the interface is gone; waiting for it to come back", self.ifname);
            self.io.store(None);
            false
        };
        if ifindex(&self.ifname) != Some(index) {
            return gone();
        }
        let running = if_flags(&self.ifname).map(|f| f & (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short != 0).unwrap_or(false);
        if !running && self.link_up.load(Ordering::Relaxed) {
            // An interface being deleted is closed first (its packet sockets see ENETDOWN,
            // which brings this look forward) and unlisted right after: looked at again a
            // moment later, it is reported as gone alone, not as down and then gone.
            std::thread::sleep(DOWN_SETTLE);
            if ifindex(&self.ifname) != Some(index) {
                return gone();
            }
        }
        if running != self.link_up.swap(running, Ordering::Relaxed) {
            if running {
                info!(network = %network, "uplink {}: link is up again", self.ifname);
            } else {
                warn!(network = %network, "uplink {}: link is down", self.ifname);
            }
        }
        true
    }

    /// Reopens a closed uplink once its interface is back.
    pub(super) fn try_reopen(&self, network: &str) {
        let lower = self.parent.as_deref().unwrap_or(&self.ifname);
        if !matches!(self.kind, UplinkKind::Tap | UplinkKind::Vxlan) && ifindex(lower).is_none() {
            return;
        }
        match self.open_io() {
            Ok(io) => {
                info!(network = %network, "uplink {}: back", self.ifname);
                self.link_up.store(true, Ordering::Relaxed);
                self.io.store(Some(Arc::new(io)));
            }
            Err(e) => warn!(network = %network, "uplink {}: cannot reopen yet: {e}", self.ifname),
        }
    }
}

impl HostLink for Uplink {
    /// What the uplink accepts, as a receiver: everything with a vnet header (the kernel
    /// segments what it must), complete frames of at most the MTU without. None while closed.
    /// A VXLAN tunnel takes the same (it segments TSO frames itself, for UDP GSO).
    fn caps(&self) -> Option<RxCaps> {
        let hdr_len = self.io.load().as_ref()?.hdr_len;
        let offloads = hdr_len > 0;
        Some(RxCaps { csum: offloads, tso4: offloads, tso6: offloads, mrg_rxbuf: false, hdr_len })
    }

    /// Sends one frame given as an iovec list (the vnet header first when the uplink has
    /// one). Never blocks: a full socket buffer drops the frame.
    fn send(&self, iov: &[libc::iovec]) -> Result<(), DropReason> {
        let io = self.io.load();
        let Some(io) = io.as_ref() else { return Err(DropReason::PortDown) };
        if let Some(t) = &self.tunnel {
            return t.send(iov);
        }
        // SAFETY: the iovecs point at memory the caller keeps alive for this call.
        let n = unsafe { libc::writev(io.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(());
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Err(DropReason::NoRxBuffer),
            _ => Err(DropReason::PortDown),
        }
    }

    /// Whether frames for this uplink are sent in batches (`sendmmsg`, packet sockets) rather
    /// than one write each (taps and macvtaps take one frame per write).
    fn batches(&self) -> bool {
        self.kind == UplinkKind::AfPacket
    }

    /// Sends several frames with `sendmmsg`; `spans` are each frame's iovecs within `iov`.
    /// Returns the frames (by index in `spans`) that did not go, and why.
    fn send_batch(&self, iov: &mut [libc::iovec], spans: &[std::ops::Range<usize>]) -> Vec<(usize, DropReason)> {
        let io = self.io.load();
        let Some(io) = io.as_ref() else { return (0..spans.len()).map(|i| (i, DropReason::PortDown)).collect() };
        let mut msgs: Vec<libc::mmsghdr> = spans
            .iter()
            .map(|r| {
                // SAFETY: a zeroed mmsghdr is valid; it is pointed at this frame's iovecs.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov[r.clone()].as_mut_ptr();
                m.msg_hdr.msg_iovlen = r.len();
                m
            })
            .collect();
        let mut done = 0;
        let mut failed = Vec::new();
        while done < msgs.len() {
            // SAFETY: every message points at iovecs over memory the caller keeps alive.
            let n = unsafe { libc::sendmmsg(io.fd.as_raw_fd(), msgs[done..].as_mut_ptr(), (msgs.len() - done) as u32, libc::MSG_DONTWAIT) };
            if n > 0 {
                done += n as usize;
                continue;
            }
            // The first frame of the rest failed: count it and go on with the others.
            let why = match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => DropReason::NoRxBuffer,
                _ => DropReason::PortDown,
            };
            failed.push((done, why));
            done += 1;
        }
        failed
    }

    /// Closes the uplink for good (its port or network was removed); a tap vunet made goes
    /// away with its descriptor.
    fn close(&self) {
        if let Some(t) = &self.tunnel {
            t.leave();
        }
        let Some(io) = self.io.swap(None) else { return };
        let _ = self.wake.write(1);
        // The descriptor closes when its last holder lets go: the RX thread (woken above, it
        // drops its reference at once) and a sender in the middle of one write. Waiting for
        // them, briefly, makes closing synchronous: the same tap can be made again at once.
        let until = std::time::Instant::now() + CLOSE_WAIT;
        while Arc::strong_count(&io) > 1 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn describe(&self) -> (&'static str, String) {
        (self.kind.name(), self.ifname.clone())
    }

    fn tunnel(&self) -> Option<crate::datapath::TunnelInfo> {
        self.tunnel.as_ref().map(|t| t.info())
    }
}

/// The macvtap vunet makes for a network: `vu` + the network name, within 15 characters.
pub fn macvtap_name(network: &str) -> String {
    let mut n = format!("vu{network}");
    n.truncate(15);
    n
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::mpsc::channel;

    use crate::ports::uplink::*;

    /// A tap-kind uplink over one end of a socket pair; the other end is returned.
    fn over_socketpair() -> (Arc<Uplink>, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors we then own.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let up = Uplink {
            kind: UplinkKind::Tap,
            ifname: "test0".into(),
            parent: None,
            mac: None,
            macvtap_mode: MACVLAN_MODE_BRIDGE,
            io: ArcSwapOption::from_pointee(Io { fd: ours, hdr_len: 0, ifindex: 0, group: None }),
            wake: EventFd::new(EFD_NONBLOCK).unwrap(),
            link_up: AtomicBool::new(true),
            tunnel: None,
        };
        (Arc::new(up), theirs)
    }

    fn frame_iov(frame: &[u8]) -> [libc::iovec; 1] {
        [libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() }]
    }

    /// Issue 12 point 5: the RX thread holds the descriptor across `poll` and then sends (its
    /// router's timers do) while `close` is waiting; nothing may wait in a cycle. Before, the
    /// RX thread held the read lock across `poll`, `close` queued for the write lock, and the
    /// RX thread's own send queued behind `close`: a deadlock.
    #[test]
    fn close_and_a_send_from_the_rx_thread_never_wait_on_each_other() {
        let (up, peer) = over_socketpair();
        // What the RX thread holds while it polls.
        let held = up.io.load_full().unwrap();
        let (closed_tx, closed) = channel();
        let closer = up.clone();
        std::thread::spawn(move || {
            closer.close();
            let _ = closed_tx.send(());
        });
        // Wait until `close` took the descriptor out (it then waits for the holder).
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while up.io.load().is_some() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The RX thread's router tick sends now: it must return, not wait for `close`.
        let (sent_tx, sent) = channel();
        let sender = up.clone();
        std::thread::spawn(move || {
            let f = [0u8; 60];
            let _ = sent_tx.send(sender.send(&frame_iov(&f)));
        });
        assert_eq!(sent.recv_timeout(Duration::from_secs(10)), Ok(Err(DropReason::PortDown)), "a send while closing returns");
        // `close` woke the RX thread; it lets go, and `close` returns with the descriptor closed.
        let mut v = 0u64;
        // SAFETY: reading 8 bytes from our eventfd into a u64.
        assert_eq!(unsafe { libc::read(up.wake.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) }, 8, "close woke the RX thread");
        drop(held);
        closed.recv_timeout(Duration::from_secs(10)).expect("close returns once the RX thread let go");
        let mut b = [0u8; 1];
        // SAFETY: a one-byte read into our buffer; the peer's end sees the close as end of file.
        let n = unsafe { libc::recv(peer.as_raw_fd(), b.as_mut_ptr() as *mut libc::c_void, 1, libc::MSG_DONTWAIT) };
        assert_eq!(n, 0, "the descriptor is closed when close returns");
    }
}
