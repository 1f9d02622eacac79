//! An uplink's receive thread: reads frames from the host interface in batches and hands
//! them to the data path through `Inject` (switched at L2 in bridge and isolated networks,
//! routed in nat and route networks); runs the router's timers and the DHCP client that
//! leases a routed uplink's address; watches the interface and reopens it when it returns.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vunet_switch::gro::Frame;
use vunet_switch::Mac;

use super::{Uplink, BATCH, BUF_LEN, WATCH};
use crate::config::UplinkKind;
use crate::datapath::{HostLink, Inject, Port, PortKind};

/// Reads frames from the uplink and switches them, for the life of the network.
pub fn run(mut inject: Inject, port: Arc<Port>, up: Arc<Uplink>) {
    let net = inject.network().clone();
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF_LEN]).collect();
    let mut lens = [0usize; BATCH];
    // Where each frame starts in its buffer (a packet socket's frames leave room in front for
    // a VLAN tag to be put back).
    let mut starts = [0usize; BATCH];
    let mut outgoing = [false; BATCH];
    // A VXLAN tunnel's frames after coalescing, each behind a vnet header (reused buffers).
    let mut tunnel_frames: Vec<Vec<u8>> = Vec::new();
    let mut tunnel_slices: Vec<(usize, usize, usize)> = Vec::new();
    let mut gro_scratch = Vec::new();
    let mut last_watch = Instant::now();
    let mut announced = false;
    // The uplink of a nat or route network feeds the router and runs its timers; a tap port
    // is a port like a guest's (its frames are switched, and routed by the gateway only when
    // they are addressed to it), whatever the network's mode.
    let routes = net.router.is_some() && port.kind == PortKind::Uplink;
    // A routed network with `address = "dhcp"` leases its uplink address here.
    let mut dhcp = net.router.as_ref().filter(|_| net.uplink_dhcp && routes).map(|r| {
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
        // The RX thread's own reference to the descriptor: no lock is held across `poll` or
        // the router's work, so `close` and the senders never wait for this thread.
        let Some(io) = up.io.load_full() else {
            std::thread::sleep(WATCH);
            continue;
        };
        let fd = io.fd.as_raw_fd();
        let hdr_len = io.hdr_len;
        // A VXLAN tunnel is also woken by the networks it shares its socket with.
        let handed = up.tunnel.as_ref().map(|t| t.wake_fd());
        let mut pfd = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: up.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: handed.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: io.group.as_ref().map_or(-1, |g| g.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        // A router has timers (ARP retries, expiry) to run between frames.
        let timeout = if routes { ROUTER_TICK } else { WATCH };
        // SAFETY: four pollfds (a negative fd is ignored).
        let ready = unsafe { libc::poll(pfd.as_mut_ptr(), 4, timeout.as_millis() as i32) };
        if pfd[1].revents != 0 {
            // `close` asks for the descriptor: let go of it and look at why.
            let _ = up.wake.read();
            continue;
        }
        if routes {
            if !announced {
                announced = true;
                announce(&mut inject);
            }
            inject.router_tick();
            if let Some((_, c)) = dhcp.as_mut() {
                let (out, event) = c.poll(net.now_ms());
                dhcp_event(&mut inject, event);
                if let Some(o) = out {
                    dhcp_send(&mut inject, o);
                }
            }
        }
        if ready <= 0 || (pfd[0].revents == 0 && pfd[2].revents == 0 && pfd[3].revents == 0) {
            continue;
        }
        let got = match (up.kind, &up.tunnel) {
            (UplinkKind::Vxlan, Some(t)) => {
                // The group's socket when only it has datagrams; the next round reads the other.
                let from = if pfd[0].revents == 0 && pfd[2].revents == 0 { pfd[3].fd } else { fd };
                super::vxlan::recv(from, t, &mut bufs, &mut tunnel_slices, &port.counters)
            }
            (UplinkKind::AfPacket, _) => recv_packets(fd, hdr_len, &mut bufs, &mut starts, &mut lens, &mut outgoing),
            _ => read_frames(fd, &mut bufs, &mut lens).inspect(|_| starts = [0; BATCH]),
        };
        drop(io);
        if let (Ok(_), Some(_)) = (&got, &up.tunnel) {
            // What came through the tunnel one MTU at a time is merged back into GSO frames
            // (the kernel's GRO does this for its own vxlan devices): a receiving guest takes
            // one 64 KiB frame instead of forty-five.
            let m = coalesce_tunnel(&bufs, &tunnel_slices, &mut gro_scratch, &mut tunnel_frames);
            if routes {
                let mut frames: Vec<&mut [u8]> = tunnel_frames[..m].iter_mut().map(|b| b.as_mut_slice()).collect();
                if let Some(c) = dhcp.as_mut() {
                    frames.retain_mut(|f| !dhcp_reply(&mut inject, c, f, TUNNEL_HDR));
                }
                inject.route_from_link(&port, &mut frames, TUNNEL_HDR);
            } else {
                let frames: Vec<(&[u8], bool)> = tunnel_frames[..m].iter().map(|b| (b.as_slice(), false)).collect();
                inject.switch_from_link(&port, &frames, TUNNEL_HDR);
            }
            continue;
        }
        match got {
            Ok(n) if routes => {
                // The host's own transmissions on the interface are not for the router.
                let mut frames: Vec<&mut [u8]> = bufs[..n]
                    .iter_mut()
                    .zip(lens[..n].iter().zip(&starts[..n]))
                    .zip(&outgoing[..n])
                    .filter(|((_, (&l, _)), &o)| l > 0 && !o)
                    .map(|((b, (&l, &at)), _)| &mut b[at..at + l])
                    .collect();
                if let Some(c) = dhcp.as_mut() {
                    frames.retain_mut(|f| !dhcp_reply(&mut inject, c, f, hdr_len));
                }
                inject.route_from_link(&port, &mut frames, hdr_len);
            }
            Ok(n) => {
                let frames: Vec<(&[u8], bool)> =
                    (0..n).filter(|&i| lens[i] > 0).map(|i| (&bufs[i][starts[i]..starts[i] + lens[i]], outgoing[i])).collect();
                inject.switch_from_link(&port, &frames, hdr_len);
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
                up.io.store(None);
            }
        }
    }
}

const ROUTER_TICK: Duration = Duration::from_millis(100);

/// The vnet header in front of a tunnel's frames as they are handed to the data path.
const TUNNEL_HDR: usize = vunet_switch::vnet::HDR_LEN_LEGACY;

/// Coalesces the frames a tunnel received (`bufs[b][start..][..len]` for each slice) into
/// `out`, each behind a `TUNNEL_HDR`-byte vnet header; returns how many.
fn coalesce_tunnel(bufs: &[Vec<u8>], slices: &[(usize, usize, usize)], scratch: &mut Vec<u8>, out: &mut Vec<Vec<u8>>) -> usize {
    let frames = slices.iter().map(|&(b, at, l)| &bufs[b][at..at + l]);
    let mut m = 0;
    vunet_switch::gro::coalesce_with_room(frames, TUNNEL_HDR, scratch, |h, f| {
        if out.len() == m {
            out.push(Vec::new());
        }
        let b = &mut out[m];
        match f {
            // Merged in the scratch buffer behind the header's room: taken, not copied (the
            // old buffer becomes the next scratch).
            Frame::Merged(v) => std::mem::swap(b, v),
            Frame::Plain(f) => {
                b.clear();
                b.resize(TUNNEL_HDR, 0);
                b.extend_from_slice(f);
            }
        }
        h.write(&mut b[..TUNNEL_HDR]);
        m += 1;
    });
    m
}

/// Hands a DHCP reply for the router's uplink address (UDP to port 68, to its MAC or
/// broadcast) to the client; true if the frame was one.
fn dhcp_reply(inject: &mut Inject, c: &mut (Mac, vunet_dhcp::client::DhcpClient), buf: &mut [u8], hdr_len: usize) -> bool {
    let net = inject.network().clone();
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
    dhcp_event(inject, event);
    if let Some(o) = out {
        dhcp_send(inject, o);
    }
    true
}

fn dhcp_event(inject: &mut Inject, event: Option<vunet_dhcp::client::ClientEvent>) {
    let net = inject.network().clone();
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
    inject.router_frames(emit);
}

/// Sends a DHCP client message out the uplink (broadcast, or to the server's MAC when it is
/// a known neighbor).
fn dhcp_send(inject: &mut Inject, o: vunet_dhcp::client::Outgoing) {
    let net = inject.network().clone();
    let Some(router) = net.router.as_ref() else { return };
    let (mac, dst_mac) = {
        let r = router.lock().unwrap_or_else(|e| e.into_inner());
        let dst = if o.dst.is_broadcast() { None } else { r.outside_neighbor(o.dst, net.now_ms()) };
        (r.cfg.outside_mac, dst.unwrap_or([0xff; 6]))
    };
    let mut frame = Vec::new();
    let built = vunet_switch::gateway::build_udp(
        &mut frame,
        mac,
        dst_mac,
        o.src,
        o.dst,
        vunet_dhcp::message::CLIENT_PORT,
        vunet_dhcp::message::SERVER_PORT,
        &o.payload,
    );
    if !built {
        return;
    }
    inject.router_frames(vec![vunet_switch::router::Emit { to: vunet_switch::router::Side::Uplink, hdr: Default::default(), frame }]);
}

/// Announces a static uplink address with a gratuitous ARP when the uplink starts.
fn announce(inject: &mut Inject) {
    let net = inject.network().clone();
    let Some(router) = net.router.as_ref() else { return };
    let mut emit = Vec::new();
    {
        let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
        let (addr, next_hop) = (r.outside(), r.cfg.next_hop);
        if addr.is_some() {
            r.set_outside(addr, next_hop, &mut emit);
        }
    }
    inject.router_frames(emit);
}

/// One `recvmmsg` of up to BATCH frames; `outgoing[i]` marks frames this host sent out the
/// interface (the kernel shows them to packet sockets too). Each frame (behind its `hdr_len`
/// bytes of virtio-net header) is `bufs[i][starts[i]..][..lens[i]]`, with the VLAN tag the
/// kernel took out put back.
fn recv_packets(
    fd: RawFd,
    hdr_len: usize,
    bufs: &mut [Vec<u8>],
    starts: &mut [usize],
    lens: &mut [usize],
    outgoing: &mut [bool],
) -> io::Result<usize> {
    const TAG: usize = vunet_switch::vlan::TAG_LEN;
    // Received TAG bytes in: a tag is put back by moving the header and MACs to the front.
    let mut iovs: Vec<libc::iovec> =
        bufs.iter_mut().map(|b| libc::iovec { iov_base: b[TAG..].as_mut_ptr().cast(), iov_len: b.len() - TAG }).collect();
    // Room for one cmsg of auxdata per frame (u64s: aligned as cmsghdr wants).
    let mut controls = vec![[0u64; 8]; bufs.len()];
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
            m.msg_hdr.msg_control = controls[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of_val(&controls[i]) as _;
            m
        })
        .collect();
    // SAFETY: every mmsghdr points at a live iovec, buffer, address and control of this frame.
    let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT | libc::MSG_TRUNC, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        let len = msgs[i].msg_len as usize;
        outgoing[i] = addrs[i].sll_pkttype == libc::PACKET_OUTGOING;
        starts[i] = TAG;
        // A frame longer than the buffer (MSG_TRUNC gives its real length) is dropped whole.
        lens[i] = if len > bufs[i].len() - TAG { 0 } else { len };
        if lens[i] < hdr_len + 12 {
            continue;
        }
        if let Some(tag) = vlan_of(&msgs[i].msg_hdr) {
            let b = &mut bufs[i];
            b.copy_within(TAG..TAG + hdr_len + 12, 0);
            b[hdr_len + 12..hdr_len + 16].copy_from_slice(&tag);
            if hdr_len > 0 {
                // The offsets in the virtio-net header move with the data behind the tag.
                let h = vunet_switch::VnetHeader::parse(&b[..hdr_len]);
                match vunet_switch::vlan::shift_header(&h, TAG as isize) {
                    Some(h) => h.write(&mut b[..hdr_len]),
                    None => {
                        lens[i] = 0;
                        continue;
                    }
                }
            }
            starts[i] = 0;
            lens[i] += TAG;
        }
    }
    Ok(n)
}

/// The VLAN tag (TPID and TCI) the kernel took out of a received frame, from its
/// `PACKET_AUXDATA`.
fn vlan_of(m: &libc::msghdr) -> Option<[u8; 4]> {
    // SAFETY: the control buffer is the one recvmmsg filled, of the length it set.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(m) };
    while !c.is_null() {
        // SAFETY: `c` points at a cmsghdr within the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let h = unsafe { &*c };
        let want = std::mem::size_of::<libc::tpacket_auxdata>();
        // SAFETY: as above; CMSG_LEN is arithmetic.
        if h.cmsg_level == libc::SOL_PACKET
            && h.cmsg_type == super::PACKET_AUXDATA
            && h.cmsg_len as usize >= unsafe { libc::CMSG_LEN(want as u32) } as usize
        {
            // SAFETY: the data holds a tpacket_auxdata (length checked above); it may be unaligned.
            let aux: libc::tpacket_auxdata = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                return None;
            }
            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 { aux.tp_vlan_tpid } else { vunet_switch::vlan::TPID };
            let (p, t) = (tpid.to_be_bytes(), aux.tp_vlan_tci.to_be_bytes());
            return Some([p[0], p[1], t[0], t[1]]);
        }
        // SAFETY: as above.
        c = unsafe { libc::CMSG_NXTHDR(m, c) };
    }
    None
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
