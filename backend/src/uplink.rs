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
//!
//! Every uplink is watched: if its interface goes away (deleted, or re-created with a new index)
//! the uplink closes, logs once, and reopens when the interface is back; a link that goes down
//! and up is logged once each way. Guest ports and other networks never wait on an uplink.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vunet_switch::vnet::{RxCaps, HDR_LEN_LEGACY};
use vunet_switch::{DropReason, Mac};

use crate::config::{UplinkConfig, UplinkKind};
use crate::datapath::TxScratch;
use crate::network::{GuestPort, Network};

/// Frames read per batch.
pub const BATCH: usize = 32;
/// A receive buffer holds the largest GSO frame the kernel hands over, with its header.
const BUF_LEN: usize = 65536 + HDR_LEN_LEGACY + 64;
/// How often an idle uplink checks its interface.
const WATCH: Duration = Duration::from_secs(1);

const MACVLAN_MODE_BRIDGE: u32 = 4;
const MACVLAN_MODE_PASSTHRU: u32 = 8;

/// An open uplink descriptor.
struct Io {
    fd: OwnedFd,
    /// 10 when every frame carries a virtio-net header, 0 when none does.
    hdr_len: usize,
    /// The index of the interface it is bound to, to notice a re-created interface.
    ifindex: u32,
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
    io: RwLock<Option<Io>>,
    link_up: AtomicBool,
}

/// Why an uplink could not start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink interface {0:?} does not exist")]
    NoInterface(String),
    #[error("uplink {name:?}: {reason}")]
    Open { name: String, reason: String },
}

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
    let flags = if_flags(name)?;
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    // SAFETY: as in if_flags.
    let s = unsafe { OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0))?) };
    let r = IfReq::new(name, flags | libc::IFF_UP as libc::c_short);
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
    Ok(Io { fd, hdr_len, ifindex: index })
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
    Ok(Io { fd, hdr_len: HDR_LEN_LEGACY, ifindex: index })
}

fn open_macvtap(parent: &str, name: &str, mac: Option<Mac>, mode: u32) -> io::Result<Io> {
    let parent_index = ifindex(parent).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    if ifindex(name).is_none() {
        crate::netlink::create_macvtap(parent_index, name, mac, mode)?;
    }
    set_up(name)?;
    let index = ifindex(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let fd = open_file(&format!("/dev/tap{index}"))?;
    tap_setup(&fd, name)?;
    Ok(Io { fd, hdr_len: HDR_LEN_LEGACY, ifindex: index })
}

impl Uplink {
    /// Opens the uplink of network `network`; a missing interface is the caller's error.
    pub fn open(network: &str, cfg: &UplinkConfig) -> Result<Uplink, UplinkError> {
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
            io: RwLock::new(None),
            link_up: AtomicBool::new(true),
        };
        let lower = up.parent.as_deref().unwrap_or(&up.ifname);
        if cfg.kind != UplinkKind::Tap && ifindex(lower).is_none() {
            return Err(UplinkError::NoInterface(lower.to_string()));
        }
        let io = up.open_io().map_err(|e| UplinkError::Open { name: up.ifname.clone(), reason: crate::config::io_reason(&e) })?;
        info!(network = %network, "uplink {} {} ready ({})", cfg.kind.name(), up.ifname, if io.hdr_len > 0 { "offloads on" } else { "no vnet header: TSO segmented in software" });
        *up.io.write().unwrap_or_else(|e| e.into_inner()) = Some(io);
        Ok(up)
    }

    fn open_io(&self) -> io::Result<Io> {
        match self.kind {
            UplinkKind::AfPacket => open_af_packet(&self.ifname),
            UplinkKind::Tap => open_tap(&self.ifname),
            UplinkKind::Macvtap => open_macvtap(self.parent.as_deref().unwrap_or_default(), &self.ifname, self.mac, self.macvtap_mode),
        }
    }

    /// What the uplink accepts, as a receiver: everything with a vnet header (the kernel
    /// segments what it must), complete frames of at most the MTU without. None while closed.
    pub fn caps(&self) -> Option<RxCaps> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let hdr_len = io.as_ref()?.hdr_len;
        let offloads = hdr_len > 0;
        Some(RxCaps { csum: offloads, tso4: offloads, tso6: offloads, mrg_rxbuf: false, hdr_len })
    }

    /// Sends one frame given as an iovec list (the vnet header first when the uplink has
    /// one). Never blocks: a full socket buffer drops the frame.
    pub fn send(&self, iov: &[libc::iovec]) -> Result<(), DropReason> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let Some(io) = io.as_ref() else { return Err(DropReason::PortDown) };
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
    pub fn batches(&self) -> bool {
        self.kind == UplinkKind::AfPacket
    }

    /// Sends several frames with `sendmmsg`; `spans` are each frame's iovecs within `iov`.
    /// Returns the frames (by index in `spans`) that did not go, and why.
    pub fn send_batch(&self, iov: &mut [libc::iovec], spans: &[std::ops::Range<usize>]) -> Vec<(usize, DropReason)> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
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
    pub fn close(&self) {
        *self.io.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether the uplink's interface is still the one it opened; logs changes once.
    fn watch(&self, network: &str) -> bool {
        let current = self.io.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|io| io.ifindex);
        let Some(index) = current else { return false };
        if ifindex(&self.ifname) != Some(index) {
            warn!(network = %network, "uplink {}: the interface is gone; waiting for it to come back", self.ifname);
            *self.io.write().unwrap_or_else(|e| e.into_inner()) = None;
            return false;
        }
        let running = if_flags(&self.ifname).map(|f| f & (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short != 0).unwrap_or(false);
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
    fn try_reopen(&self, network: &str) {
        let lower = self.parent.as_deref().unwrap_or(&self.ifname);
        if self.kind != UplinkKind::Tap && ifindex(lower).is_none() {
            return;
        }
        match self.open_io() {
            Ok(io) => {
                info!(network = %network, "uplink {}: back", self.ifname);
                self.link_up.store(true, Ordering::Relaxed);
                *self.io.write().unwrap_or_else(|e| e.into_inner()) = Some(io);
            }
            Err(e) => warn!(network = %network, "uplink {}: cannot reopen yet: {e}", self.ifname),
        }
    }
}

/// The macvtap vunet makes for a network: `vu` + the network name, within 15 characters.
pub fn macvtap_name(network: &str) -> String {
    let mut n = format!("vu{network}");
    n.truncate(15);
    n
}

/// Reads frames from the uplink and switches them, for the life of the network.
pub fn run(net: Arc<Network>, port: Arc<GuestPort>, up: Arc<Uplink>) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF_LEN]).collect();
    let mut lens = [0usize; BATCH];
    let mut outgoing = [false; BATCH];
    let mut cx = TxScratch::default();
    let mut last_watch = Instant::now();
    let mut announced = false;
    // A routed network with `address = "dhcp"` leases its uplink address here.
    let mut dhcp = net.router.as_ref().filter(|_| net.uplink_dhcp).map(|r| {
        let mac = r.lock().unwrap_or_else(|e| e.into_inner()).cfg.outside_mac;
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.subsec_nanos()) ^ std::process::id();
        (mac, vunet_dhcp::client::DhcpClient::new(mac, seed))
    });
    loop {
        if port.removed.load(Ordering::Acquire) || net.stopped.load(Ordering::Acquire) {
            up.close();
            return;
        }
        if last_watch.elapsed() >= WATCH {
            last_watch = Instant::now();
            if !up.watch(&net.name) {
                up.try_reopen(&net.name);
            }
        }
        let guard = up.io.read().unwrap_or_else(|e| e.into_inner());
        let Some(io) = guard.as_ref() else {
            drop(guard);
            std::thread::sleep(WATCH);
            continue;
        };
        let fd = io.fd.as_raw_fd();
        let hdr_len = io.hdr_len;
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // A router has timers (ARP retries, expiry) to run between frames.
        let timeout = if net.router.is_some() { ROUTER_TICK } else { WATCH };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if net.router.is_some() {
            if !announced {
                announced = true;
                announce(&net, &mut cx);
            }
            crate::datapath::router_tick(&net, &mut cx);
            if let Some((_, c)) = dhcp.as_mut() {
                let (out, event) = c.poll(net.now_ms());
                dhcp_event(&net, event, &mut cx);
                if let Some(o) = out {
                    dhcp_send(&net, o, &mut cx);
                }
            }
        }
        if ready <= 0 {
            continue;
        }
        let got = match up.kind {
            UplinkKind::AfPacket => recv_packets(fd, &mut bufs, &mut lens, &mut outgoing),
            _ => read_frames(fd, &mut bufs, &mut lens),
        };
        drop(guard);
        match got {
            Ok(n) if net.router.is_some() => {
                // The host's own transmissions on the interface are not for the router.
                let mut frames: Vec<&mut [u8]> = bufs[..n]
                    .iter_mut()
                    .zip(&lens[..n])
                    .zip(&outgoing[..n])
                    .filter(|((_, &l), &o)| l > 0 && !o)
                    .map(|((b, &l), _)| &mut b[..l])
                    .collect();
                if let Some(c) = dhcp.as_mut() {
                    frames.retain_mut(|f| !dhcp_reply(&net, c, f, hdr_len, &mut cx));
                }
                crate::datapath::route_from_uplink(&net, &port, &mut frames, hdr_len, &mut cx);
            }
            Ok(n) => {
                let frames: Vec<(&[u8], bool)> = (0..n).filter(|&i| lens[i] > 0).map(|i| (&bufs[i][..lens[i]], outgoing[i])).collect();
                crate::datapath::switch_from_uplink(&net, &port, &frames, hdr_len, &mut cx);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            // A packet socket reports its link going down once (and again while it stays down);
            // it keeps working when the link comes back. The watch logs the change.
            Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                if up.link_up.load(Ordering::Relaxed) {
                    last_watch = Instant::now() - WATCH;
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => {
                // The interface went away under the socket (ENETDOWN, EBADFD...).
                warn!(network = %net.name, "uplink {}: {e}; reopening when the interface is back", up.ifname);
                *up.io.write().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

const ROUTER_TICK: Duration = Duration::from_millis(100);

/// Hands a DHCP reply for the router's uplink address (UDP to port 68, to its MAC or
/// broadcast) to the client; true if the frame was one.
fn dhcp_reply(net: &Network, c: &mut (Mac, vunet_dhcp::client::DhcpClient), buf: &mut [u8], hdr_len: usize, cx: &mut TxScratch) -> bool {
    let (mac, c) = (c.0, &mut c.1);
    if buf.len() < hdr_len + 14 + 28 {
        return false;
    }
    let (h, frame) = buf.split_at_mut(hdr_len);
    if frame[0..6] != mac && frame[0..6] != [0xff; 6] {
        return false;
    }
    let hdr = vunet_switch::VnetHeader::parse(h);
    // From a host on the same machine the UDP checksum may be left to "hardware".
    if hdr.needs_csum() && vunet_switch::offload::complete_checksum(frame, hdr.csum_start as usize, hdr.csum_offset as usize).is_err() {
        return false;
    }
    let Some((_, payload)) = vunet_switch::gateway::udp_payload(frame, vunet_dhcp::message::CLIENT_PORT) else { return false };
    let (out, event) = c.input(payload, net.now_ms());
    dhcp_event(net, event, cx);
    if let Some(o) = out {
        dhcp_send(net, o, cx);
    }
    true
}

fn dhcp_event(net: &Network, event: Option<vunet_dhcp::client::ClientEvent>, cx: &mut TxScratch) {
    use vunet_dhcp::client::ClientEvent;
    let Some(router) = net.router.as_ref() else { return };
    let mut emit = Vec::new();
    match event {
        None => return,
        Some(ClientEvent::Bound(l)) => {
            let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
            if r.outside() != Some((l.addr, l.prefix)) {
                info!(network = %net.name, "uplink address {}/{} leased from {} (router {}), for {} s", l.addr, l.prefix, l.server, l.router.map_or("none".into(), |r| r.to_string()), l.lease_ms / 1000);
            }
            r.set_outside(Some((l.addr, l.prefix)), l.router, &mut emit);
        }
        Some(ClientEvent::Lost) => {
            warn!(network = %net.name, "uplink address lease lost; asking again");
            router.lock().unwrap_or_else(|e| e.into_inner()).set_outside(None, None, &mut emit);
        }
    }
    crate::datapath::send_router_frames(net, emit, cx);
}

/// Sends a DHCP client message out the uplink (broadcast, or to the server's MAC when it is
/// a known neighbor).
fn dhcp_send(net: &Network, o: vunet_dhcp::client::Outgoing, cx: &mut TxScratch) {
    let Some(router) = net.router.as_ref() else { return };
    let (mac, dst_mac) = {
        let r = router.lock().unwrap_or_else(|e| e.into_inner());
        let dst = if o.dst.is_broadcast() { None } else { r.outside_neighbor(o.dst, net.now_ms()) };
        (r.cfg.outside_mac, dst.unwrap_or([0xff; 6]))
    };
    let mut frame = Vec::new();
    vunet_switch::gateway::build_udp(
        &mut frame,
        mac,
        dst_mac,
        o.src,
        o.dst,
        vunet_dhcp::message::CLIENT_PORT,
        vunet_dhcp::message::SERVER_PORT,
        &o.payload,
    );
    crate::datapath::send_router_frames(
        net,
        vec![vunet_switch::router::Emit { to: vunet_switch::router::Side::Uplink, hdr: Default::default(), frame }],
        cx,
    );
}

/// Announces a static uplink address with a gratuitous ARP when the uplink starts.
fn announce(net: &Network, cx: &mut TxScratch) {
    let Some(router) = net.router.as_ref() else { return };
    let mut emit = Vec::new();
    {
        let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
        let (addr, next_hop) = (r.outside(), r.cfg.next_hop);
        if addr.is_some() {
            r.set_outside(addr, next_hop, &mut emit);
        }
    }
    crate::datapath::send_router_frames(net, emit, cx);
}

/// One `recvmmsg` of up to BATCH frames; `outgoing[i]` marks frames this host sent out the
/// interface (the kernel shows them to packet sockets too).
fn recv_packets(fd: RawFd, bufs: &mut [Vec<u8>], lens: &mut [usize], outgoing: &mut [bool]) -> io::Result<usize> {
    let mut iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    // SAFETY: zeroed sockaddr_ll and mmsghdr are valid initial values.
    let mut addrs: Vec<libc::sockaddr_ll> = (0..bufs.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..bufs.len())
        .map(|i| {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_ll).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            m
        })
        .collect();
    // SAFETY: every mmsghdr points at a live iovec, buffer and address of this frame.
    let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT | libc::MSG_TRUNC, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        let len = msgs[i].msg_len as usize;
        // A frame longer than the buffer (MSG_TRUNC gives its real length) is dropped whole.
        lens[i] = if len > bufs[i].len() { 0 } else { len };
        outgoing[i] = addrs[i].sll_pkttype == libc::PACKET_OUTGOING;
    }
    Ok(n)
}

/// Reads up to BATCH frames from a tap or macvtap (one frame per read).
fn read_frames(fd: RawFd, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> io::Result<usize> {
    let mut n = 0;
    while n < bufs.len() {
        // SAFETY: reading into an owned buffer of its length.
        let r = unsafe { libc::read(fd, bufs[n].as_mut_ptr().cast(), bufs[n].len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if n > 0 && e.kind() == io::ErrorKind::WouldBlock {
                break;
            }
            return Err(e);
        }
        lens[n] = r as usize;
        n += 1;
    }
    Ok(n)
}
