//! The VXLAN uplink's tunnel: a UDP socket bound to `local:port` that receives the remotes'
//! datagrams (one per address and port in the daemon, shared by the networks that use it and
//! demultiplexed by VNI), a few more bound to `local` on ports the kernel picks that send them (the
//! sending socket is chosen by a hash of the inner flow, so the underlay's ECMP and RSS see
//! several outer source ports, as RFC 7348 asks, without a raw socket's privileges), and the
//! table of which remote each inner MAC is behind. The encapsulation is an iovec in front of
//! the frame's own: frames are not copied on the way out.
//!
//! Every network's receive thread polls the shared socket (through a descriptor of its own, a
//! `dup`): whichever reads a datagram of another network's VNI queues a copy for that network
//! and wakes its thread; one of no network's VNI is counted (`vxlan_unknown_vni`) by the
//! reader.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vunet_switch::offload::{complete_checksum, segment_tcp_append};
use vunet_switch::vnet::VnetHeader;
use vunet_switch::vxlan::{self, Decap, Table, Target};
use vunet_switch::{format_mac, DropReason};

use super::{check, setsockopt_int, Io};
use crate::config::VxlanConfig;
use crate::datapath::TunnelInfo;

/// Sockets the outer source ports are spread over.
const SENDERS: usize = 8;
/// Learned entries of one tunnel, and of one remote.
const CAPACITY: usize = 4096;
const QUOTA: usize = 1024;
/// The bytes of an inner frame its flow hash looks at (Ethernet, a VLAN tag, IPv6, ports).
const HASH_BYTES: usize = 14 + 4 + 40 + 4;
/// A frame's iovecs sent without an allocation (the data path gives at most 64).
const STACK_IOVS: usize = 64;
/// Datagrams queued for a network by the others' threads, at most.
const QUEUE: usize = 1024;

/// The receiving socket of one (local, port) and the networks (by VNI) that share it.
struct Shared {
    fd: OwnedFd,
    members: Mutex<HashMap<u32, Arc<Member>>>,
}

/// What other networks' threads hand one network: datagrams of its VNI they read.
struct Member {
    queue: Mutex<VecDeque<(Vec<u8>, Ipv4Addr)>>,
    wake: EventFd,
    /// Datagrams lost to a full queue, counted on the network's uplink when it next reads.
    overflow: AtomicU64,
}

/// A shared socket's address and port.
type Endpoint = (Ipv4Addr, u16);

/// The shared sockets of this process (dropped with their last network).
static SHARED: Mutex<Vec<(Endpoint, Weak<Shared>)>> = Mutex::new(Vec::new());

/// Joins (or opens) the receiving socket of `ip:port` for VNI `vni`; refused if another
/// network of the daemon has that VNI there.
fn join(ip: Ipv4Addr, port: u16, vni: u32, member: &Arc<Member>) -> io::Result<Arc<Shared>> {
    let mut all = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(_, w)| w.strong_count() > 0);
    let shared = match all.iter().find(|(k, _)| *k == (ip, port)).and_then(|(_, w)| w.upgrade()) {
        Some(s) => s,
        None => {
            let fd = udp_socket(ip, port, 4 << 20)?;
            // Datagrams of one flow come merged, one read for up to 64 KiB of them (the
            // sender's UDP GSO, or the kernel's GRO): fewer reads; `recv` splits them.
            let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1);
            let s = Arc::new(Shared { fd, members: Mutex::new(HashMap::new()) });
            all.push(((ip, port), Arc::downgrade(&s)));
            s
        }
    };
    let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
    match members.get(&vni) {
        Some(m) if !Arc::ptr_eq(m, member) => {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("VNI {vni} on {ip}:{port} is another network's")))
        }
        _ => members.insert(vni, member.clone()),
    };
    drop(members);
    Ok(shared)
}

pub(super) struct Tunnel {
    pub cfg: VxlanConfig,
    decap: Decap,
    table: Mutex<Table>,
    senders: Vec<OwnedFd>,
    /// The same for UDP GSO sends (TSO frames): the kernel refuses UDP_SEGMENT on a socket
    /// with SO_NO_CHECK, so these send with outer checksums (offloaded where the NIC can).
    gso_senders: Vec<OwnedFd>,
    epoch: Instant,
    member: Arc<Member>,
    /// The receiving socket while open.
    shared: Mutex<Option<Arc<Shared>>>,
    /// The kernel refused UDP_SEGMENT once: TSO segments go one `sendmsg` each.
    no_udp_gso: AtomicBool,
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
    let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    a.sin_family = libc::AF_INET as libc::sa_family_t;
    a.sin_port = port.to_be();
    a.sin_addr.s_addr = u32::from(ip).to_be();
    a
}

/// A non-blocking UDP socket bound to `ip:port` (0: a port the kernel picks).
fn udp_socket(ip: Ipv4Addr, port: u16, rcvbuf: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0))?)
    };
    let raw = fd.as_raw_fd();
    // Like the kernel's vxlan device by default: no DF bit, the underlay may fragment.
    setsockopt_int(raw, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT)?;
    for (force, plain, size) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, rcvbuf), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 4 << 20)] {
        if setsockopt_int(raw, libc::SOL_SOCKET, force, size).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, size);
        }
    }
    let a = sockaddr(ip, port);
    // SAFETY: binding to a valid sockaddr_in of its size.
    check(unsafe { libc::bind(raw, (&a as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) })?;
    Ok(fd)
}

/// A socket bound to `group:port` that joined the group on `local`'s interface: what the
/// other endpoints flood to the group.
fn group_socket(group: Ipv4Addr, port: u16, local: Ipv4Addr) -> io::Result<OwnedFd> {
    let fd = udp_socket(group, port, 4 << 20)?;
    let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1);
    let m = libc::ip_mreq {
        imr_multiaddr: libc::in_addr { s_addr: u32::from(group).to_be() },
        imr_interface: libc::in_addr { s_addr: u32::from(local).to_be() },
    };
    // SAFETY: IP_ADD_MEMBERSHIP takes an ip_mreq of its size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_ADD_MEMBERSHIP,
            (&m as *const libc::ip_mreq).cast(),
            std::mem::size_of::<libc::ip_mreq>() as u32,
        )
    })?;
    Ok(fd)
}

impl Tunnel {
    /// The tunnel of `cfg` for a network of MTU `mtu`; its senders are bound at once (an
    /// address that is not this host's fails here, with the reason).
    pub fn new(cfg: &VxlanConfig, mtu: u16) -> io::Result<Tunnel> {
        // The receiving socket is `open_io`'s; these only send, and take nothing in.
        let senders = (0..SENDERS).map(|_| udp_socket(cfg.local, 0, 4096)).collect::<io::Result<Vec<_>>>()?;
        let gso_senders = (0..SENDERS).map(|_| udp_socket(cfg.local, 0, 4096)).collect::<io::Result<Vec<_>>>()?;
        for s in &senders {
            // RFC 7348: the outer UDP checksum SHOULD be zero over IPv4 (the inner frame has its
            // own), as the kernel's vxlan device sends by default; no checksum pass either.
            setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1)?;
        }
        if cfg.group.is_some() {
            for s in senders.iter().chain(&gso_senders) {
                let raw = s.as_raw_fd();
                // Out of `local`'s interface, one hop (the kernel's vxlan default for a group),
                // and not back to this host's own sockets.
                let ifaddr = libc::in_addr { s_addr: u32::from(cfg.local).to_be() };
                // SAFETY: IP_MULTICAST_IF takes an in_addr of its size.
                check(unsafe {
                    libc::setsockopt(
                        raw,
                        libc::IPPROTO_IP,
                        libc::IP_MULTICAST_IF,
                        (&ifaddr as *const libc::in_addr).cast(),
                        std::mem::size_of::<libc::in_addr>() as u32,
                    )
                })?;
                setsockopt_int(raw, libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, 1)?;
                setsockopt_int(raw, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, 0)?;
            }
        }
        Ok(Tunnel {
            cfg: cfg.clone(),
            // The inner frame: the MTU, an Ethernet header and one VLAN tag.
            decap: Decap { vni: cfg.vni, max_inner: mtu as usize + 14 + 4 },
            table: Mutex::new(Table::new(vunet_switch::mac_table::DEFAULT_AGING_MS, CAPACITY, QUOTA)),
            senders,
            gso_senders,
            epoch: Instant::now(),
            member: Arc::new(Member { queue: Mutex::new(VecDeque::new()), wake: EventFd::new(EFD_NONBLOCK)?, overflow: AtomicU64::new(0) }),
            shared: Mutex::new(None),
            no_udp_gso: AtomicBool::new(false),
        })
    }

    /// Written when another network's thread queued a datagram for this one.
    pub fn wake_fd(&self) -> RawFd {
        self.member.wake.as_raw_fd()
    }

    /// Leaves the shared socket (the uplink closed): its VNI is free for another network, and
    /// the socket closes with its last network.
    pub fn leave(&self) {
        let Some(shared) = self.shared.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        if members.get(&self.cfg.vni).is_some_and(|m| Arc::ptr_eq(m, &self.member)) {
            members.remove(&self.cfg.vni);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The receiving socket, bound to `local:port` (shared with the daemon's other networks
    /// there): a descriptor of its own for this network's thread.
    pub fn open(&self) -> io::Result<Io> {
        let shared = join(self.cfg.local, self.cfg.port, self.cfg.vni, &self.member)?;
        // SAFETY: dup(2) of a descriptor we hold; the copy is owned at once.
        let fd = unsafe { OwnedFd::from_raw_fd(check(libc::fcntl(shared.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0))?) };
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared);
        let group = self.cfg.group.map(|g| group_socket(g, self.cfg.port, self.cfg.local)).transpose()?;
        // Frames come with a vnet header: whole TSO frames (UDP GSO sends them) and partial
        // checksums.
        Ok(Io { fd, hdr_len: HDR, ifindex: 0, group })
    }

    /// Hands datagram `d` of VNI `vni` to the network of the shared socket that has it; false
    /// if none has.
    fn hand_over(&self, vni: u32, d: &[u8], from: Ipv4Addr) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(m) = shared.and_then(|s| s.members.lock().unwrap_or_else(|e| e.into_inner()).get(&vni).cloned()) else { return false };
        let mut q = m.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= QUEUE {
            m.overflow.fetch_add(1, Ordering::Relaxed);
        } else {
            q.push_back((d.to_vec(), from));
        }
        drop(q);
        let _ = m.wake.write(1);
        true
    }

    /// Forgets learned entries past their age (once a second, from the RX thread).
    pub fn expire(&self) {
        let now = self.now_ms();
        self.table.lock().unwrap_or_else(|e| e.into_inner()).expire(now);
    }

    /// Checks datagram `d` from `from` and learns its inner source: the inner frame's offset
    /// and length.
    pub fn input(&self, d: &[u8], from: Ipv4Addr) -> Result<(usize, usize), DropReason> {
        let now = self.now_ms();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        self.decap.input(d, from, &mut t, now)
    }

    /// Sends the frame in `iov`, behind its vnet header of [`HDR`] bytes (the data path hands
    /// a tunnel whole TSO frames and partial checksums): a TSO frame is segmented into one
    /// buffer of encapsulated segments that leaves in one `sendmsg` with UDP_SEGMENT (the
    /// kernel cuts the datagrams, as its own vxlan device's GSO does); a partial checksum is
    /// completed; anything else goes out as it is, without a copy.
    pub fn send(&self, iov: &[libc::iovec]) -> Result<(), DropReason> {
        let mut head = [0u8; HDR];
        if gather(iov, &mut head) < HDR {
            return Err(DropReason::ShortFrame);
        }
        let hdr = VnetHeader::parse(&head);
        if !hdr.is_gso() && !hdr.needs_csum() {
            let mut rest = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; STACK_IOVS];
            return match skip(iov, HDR, &mut rest) {
                Some(n) => self.send_frame(&rest[..n]),
                None => {
                    let mut heap = Vec::new();
                    skip_into(iov, HDR, &mut heap);
                    self.send_frame(&heap)
                }
            };
        }
        SCRATCH.with(|cell| {
            let mut bufs = cell.borrow_mut();
            let (frame, out) = &mut *bufs;
            frame.clear();
            for v in iov {
                // SAFETY: the caller's iovecs point at live memory of their length.
                frame.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
            }
            let frame = &mut frame[HDR..];
            if !hdr.is_gso() {
                complete_checksum(frame, hdr.csum_start as usize, hdr.csum_offset as usize)?;
                let one = [libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: frame.len() }];
                return self.send_frame(&one);
            }
            self.send_tso(frame, &hdr, out)
        })
    }

    /// Segments TSO frame `frame` and sends the segments encapsulated, a chunk of at most
    /// 64 KiB per `sendmsg` with UDP_SEGMENT, or one `sendmsg` each where the kernel has no
    /// UDP GSO.
    fn send_tso(&self, frame: &[u8], hdr: &VnetHeader, out: &mut Vec<u8>) -> Result<(), DropReason> {
        let vx = vxlan::header(self.cfg.vni);
        out.clear();
        let mut size = 0;
        segment_tcp_append(frame, hdr, out, &vx, |seg| {
            if size == 0 {
                size = vx.len() + seg.len();
            }
        })?;
        if size == 0 {
            return Err(DropReason::SegmentationFailed);
        }
        let dst = vunet_switch::dst_mac(&frame[..frame.len().min(HASH_BYTES)]);
        let target = self.table.lock().unwrap_or_else(|e| e.into_inner()).lookup(self.cfg.vni, &dst, self.now_ms());
        let hash = vxlan::flow_hash(&frame[..frame.len().min(HASH_BYTES)]) as usize;
        let gso = !self.no_udp_gso.load(Ordering::Relaxed);
        let sock = if gso { &self.gso_senders } else { &self.senders }[hash % SENDERS].as_raw_fd();
        let remotes: Vec<Ipv4Addr> = match target {
            Target::One(ip) => vec![ip],
            Target::Flood => self.cfg.group.iter().chain(&self.cfg.remotes).copied().collect(),
        };
        // Whole segments per chunk: at most UDP_MAX_SEGMENTS, and a UDP payload of 64 KiB.
        let per_chunk = if gso { (GSO_MAX_BYTES / size).clamp(1, UDP_MAX_SEGMENTS) } else { 1 };
        let mut result = Ok(());
        for chunk in out.chunks(per_chunk * size) {
            for &ip in &remotes {
                let mut v = [libc::iovec { iov_base: chunk.as_ptr() as *mut libc::c_void, iov_len: chunk.len() }];
                let r = if gso && chunk.len() > size {
                    send_gso(sock, &mut v, ip, self.cfg.port, size as u16)
                } else {
                    send_to(sock, &mut v, ip, self.cfg.port).map_err(Err)
                };
                match r {
                    Ok(()) => {}
                    Err(Err(d)) => result = result.and(Err(d)),
                    Err(Ok(GsoRefused)) => {
                        // No UDP GSO here (an old kernel): every segment on its own from now on.
                        self.no_udp_gso.store(true, Ordering::Relaxed);
                        for one in chunk.chunks(size) {
                            let mut v = [libc::iovec { iov_base: one.as_ptr() as *mut libc::c_void, iov_len: one.len() }];
                            result = result.and(send_to(sock, &mut v, ip, self.cfg.port));
                        }
                    }
                }
            }
        }
        result
    }

    /// Encapsulates the frame in `iov` (no vnet header) and sends it to the remote its
    /// destination was learned behind, or to every remote. Never blocks.
    fn send_frame(&self, iov: &[libc::iovec]) -> Result<(), DropReason> {
        // The head of the frame, gathered: its destination MAC and its flow.
        let mut head = [0u8; HASH_BYTES];
        let mut n = 0;
        for v in iov {
            let take = v.iov_len.min(HASH_BYTES - n);
            if take > 0 {
                // SAFETY: the caller's iovecs point at live memory of their length.
                let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, take) };
                head[n..n + take].copy_from_slice(src);
                n += take;
            }
            if n == HASH_BYTES {
                break;
            }
        }
        if n < vunet_switch::MIN_FRAME_LEN {
            return Err(DropReason::ShortFrame);
        }
        let head = &head[..n];
        let dst = vunet_switch::dst_mac(head);
        let target = self.table.lock().unwrap_or_else(|e| e.into_inner()).lookup(self.cfg.vni, &dst, self.now_ms());
        let sock = self.senders[vxlan::flow_hash(head) as usize % self.senders.len()].as_raw_fd();
        let mut hdr = vxlan::header(self.cfg.vni);
        // The header's iovec in front of the frame's: on the stack for the data path's frames
        // (at most 64 pieces), no allocation per frame.
        let head_iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() };
        let mut stack = [head_iov; 1 + STACK_IOVS];
        let mut heap = Vec::new();
        let all: &mut [libc::iovec] = if iov.len() <= STACK_IOVS {
            stack[1..=iov.len()].copy_from_slice(iov);
            &mut stack[..=iov.len()]
        } else {
            heap.push(head_iov);
            heap.extend_from_slice(iov);
            &mut heap
        };
        match target {
            Target::One(ip) => send_to(sock, all, ip, self.cfg.port),
            Target::Flood => {
                // Delivered if one remote took it; the last error otherwise.
                let mut result = Err(DropReason::PortDown);
                for &ip in self.cfg.group.iter().chain(&self.cfg.remotes) {
                    let r = send_to(sock, all, ip, self.cfg.port);
                    if result.is_err() {
                        result = r;
                    }
                }
                result
            }
        }
    }

    pub fn info(&self) -> TunnelInfo {
        let now = self.now_ms();
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        TunnelInfo {
            vni: self.cfg.vni,
            local: format!("{}:{}", self.cfg.local, self.cfg.port),
            remotes: self.cfg.remotes.iter().map(|r| r.to_string()).collect(),
            group: self.cfg.group.map(|g| g.to_string()),
            learned: t.endpoints(now).iter().map(|e| (format_mac(&e.mac), e.remote.to_string(), e.age_ms / 1000)).collect(),
            evicted: t.evicted,
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.leave();
    }
}

/// UDP_GRO (linux/udp.h), not in every libc's constants.
const UDP_GRO: libc::c_int = 104;

/// The vnet header in front of the frames the data path gives a tunnel.
pub const HDR: usize = vunet_switch::vnet::HDR_LEN_LEGACY;
/// Most segments in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS).
const UDP_MAX_SEGMENTS: usize = 64;
/// Most bytes of one UDP GSO send's payload.
const GSO_MAX_BYTES: usize = 65507;

thread_local! {
    /// Per sending thread: a frame gathered and its encapsulated segments (grown once to
    /// 64 KiB, then reused).
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Copies the first bytes of `iov` into `out`; how many there were.
fn gather(iov: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut n = 0;
    for v in iov {
        let take = v.iov_len.min(out.len() - n);
        // SAFETY: the caller's iovecs point at live memory of their length.
        out[n..n + take].copy_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, take) });
        n += take;
        if n == out.len() {
            break;
        }
    }
    n
}

/// The iovecs of `iov` past its first `n` bytes, into `out` (None if they do not fit).
fn skip(iov: &[libc::iovec], mut n: usize, out: &mut [libc::iovec]) -> Option<usize> {
    let mut k = 0;
    for v in iov {
        if n >= v.iov_len {
            n -= v.iov_len;
            continue;
        }
        // SAFETY: an offset inside the iovec's own memory.
        let base = unsafe { (v.iov_base as *mut u8).add(n) };
        *out.get_mut(k)? = libc::iovec { iov_base: base.cast(), iov_len: v.iov_len - n };
        n = 0;
        k += 1;
    }
    Some(k)
}

fn skip_into(iov: &[libc::iovec], n: usize, out: &mut Vec<libc::iovec>) {
    out.resize(iov.len(), libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 });
    let k = skip(iov, n, out).unwrap_or(0);
    out.truncate(k);
}

/// The kernel refused UDP_SEGMENT itself (not a full buffer).
struct GsoRefused;

/// Sends `iov` as datagrams of `size` bytes each (the last may be shorter) with UDP_SEGMENT.
fn send_gso(sock: RawFd, iov: &mut [libc::iovec], ip: Ipv4Addr, port: u16, size: u16) -> Result<(), Result<GsoRefused, DropReason>> {
    let mut to = sockaddr(ip, port);
    // Room for one cmsghdr carrying a u16, aligned as the kernel wants.
    let mut control = [0u64; 4];
    // SAFETY: the msghdr points at the destination, the iovecs and the control buffer, live
    // for this call; CMSG_* walk that buffer within its length.
    let n = unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_name = (&mut to as *mut libc::sockaddr_in).cast();
        m.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        m.msg_iov = iov.as_mut_ptr();
        m.msg_iovlen = iov.len();
        m.msg_control = control.as_mut_ptr().cast();
        m.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::copy_nonoverlapping(size.to_ne_bytes().as_ptr(), libc::CMSG_DATA(c), 2);
        libc::sendmsg(sock, &m, libc::MSG_DONTWAIT)
    };
    if n >= 0 {
        return Ok(());
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Err(Err(DropReason::NoRxBuffer)),
        Some(libc::EINVAL) | Some(libc::ENOPROTOOPT) | Some(libc::EIO) | Some(libc::EOPNOTSUPP) => Err(Ok(GsoRefused)),
        _ => Err(Err(DropReason::PortDown)),
    }
}

fn send_to(sock: RawFd, iov: &mut [libc::iovec], ip: Ipv4Addr, port: u16) -> Result<(), DropReason> {
    let mut to = sockaddr(ip, port);
    // SAFETY: a zeroed msghdr is valid; it points at the destination and the iovecs, live
    // for this call.
    let n = unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_name = (&mut to as *mut libc::sockaddr_in).cast();
        m.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        m.msg_iov = iov.as_mut_ptr();
        m.msg_iovlen = iov.len();
        libc::sendmsg(sock, &m, libc::MSG_DONTWAIT)
    };
    if n >= 0 {
        return Ok(());
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Err(DropReason::NoRxBuffer),
        _ => Err(DropReason::PortDown),
    }
}

/// One `recvmmsg` of up to a batch of reads from the receiving socket, decapsulated: each
/// inner frame is `bufs[b][start..][..len]` for `(b, start, len)` in `out` (a read of merged
/// datagrams, UDP_GRO, holds several). Dropped datagrams are counted on `counters`.
pub(super) fn recv(
    fd: RawFd,
    tunnel: &Tunnel,
    bufs: &mut [Vec<u8>],
    out: &mut Vec<(usize, usize, usize)>,
    counters: &vunet_switch::PortCounters,
) -> io::Result<usize> {
    out.clear();
    // First what the other networks' threads queued for this one.
    let _ = tunnel.member.wake.read();
    for _ in 0..tunnel.member.overflow.swap(0, Ordering::Relaxed) {
        counters.dropped(DropReason::NoRxBuffer);
    }
    let mut queued = 0;
    {
        let mut q = tunnel.member.queue.lock().unwrap_or_else(|e| e.into_inner());
        while queued < bufs.len() {
            let Some((d, from)) = q.pop_front() else { break };
            let n = d.len().min(bufs[queued].len());
            bufs[queued][..n].copy_from_slice(&d[..n]);
            match tunnel.input(&bufs[queued][..n], from) {
                Ok((at, l)) => out.push((queued, at, l)),
                Err(r) => counters.dropped(r),
            }
            queued += 1;
        }
        if !q.is_empty() {
            // More than a batch: come back for the rest.
            let _ = tunnel.member.wake.write(1);
        }
    }
    let rest = &mut bufs[queued..];
    if rest.is_empty() {
        return Ok(out.len());
    }
    let mut iovs: Vec<libc::iovec> = rest.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    // SAFETY: zeroed sockaddr_in and mmsghdr are valid initial values.
    let mut addrs: Vec<libc::sockaddr_in> = (0..rest.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
    // Room for the UDP_GRO control message (an int) of each read.
    let mut control = vec![[0u64; 4]; rest.len()];
    let mut msgs: Vec<libc::mmsghdr> = (0..rest.len())
        .map(|i| {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_control = control[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 4]>();
            m
        })
        .collect();
    // SAFETY: every mmsghdr points at a live iovec, buffer, address and control buffer.
    let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT | libc::MSG_TRUNC, std::ptr::null_mut()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // Another network's thread may have read what woke this one.
        return if queued > 0 && e.kind() == io::ErrorKind::WouldBlock { Ok(out.len()) } else { Err(e) };
    }
    for (i, m) in msgs.iter().enumerate().take(n as usize) {
        let len = m.msg_len as usize;
        let from = Ipv4Addr::from(u32::from_be(addrs[i].sin_addr.s_addr));
        // A read longer than the buffer (MSG_TRUNC gives its real length) is dropped.
        if len > rest[i].len() || m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            counters.dropped(DropReason::Oversize);
            continue;
        }
        // Merged datagrams are each `size` bytes but the last.
        let size = gro_size(&m.msg_hdr).unwrap_or(len).max(1);
        let mut at = 0;
        while at < len {
            let d = &rest[i][at..len.min(at + size)];
            let dlen = d.len();
            // Another network's VNI on the shared socket: its thread takes it from here.
            let theirs = matches!(vxlan::parse(d, usize::MAX), Ok((vni, _)) if vni != tunnel.cfg.vni && tunnel.hand_over(vni, d, from));
            if !theirs {
                match tunnel.input(d, from) {
                    Ok((start, l)) => out.push((queued + i, at + start, l)),
                    Err(r) => counters.dropped(r),
                }
            }
            at += dlen;
        }
    }
    Ok(out.len())
}

/// The segment size of a read of merged datagrams (the UDP_GRO control message), if any.
fn gro_size(m: &libc::msghdr) -> Option<usize> {
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO && (*c).cmsg_len as usize >= libc::CMSG_LEN(4) as usize {
                let mut v = [0u8; 4];
                std::ptr::copy_nonoverlapping(libc::CMSG_DATA(c), v.as_mut_ptr(), 4);
                return usize::try_from(i32::from_ne_bytes(v)).ok().filter(|&s| s > 0);
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tunnel on loopback whose only remote is itself: what it sends, it receives.
    fn cfg(port: u16) -> VxlanConfig {
        VxlanConfig { vni: 42, local: Ipv4Addr::LOCALHOST, port, remotes: vec![Ipv4Addr::LOCALHOST], group: None }
    }

    fn free_port() -> u16 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    }

    /// A frame sent through one tunnel arrives at the receiving socket with the VXLAN header
    /// in front, from one of the senders; decapsulating it learns its source behind loopback,
    /// and the next frame to that MAC goes to it alone.
    #[test]
    fn frames_are_encapsulated_sent_and_decapsulated_with_learning() {
        let port = free_port();
        let c = cfg(port);
        let t = Tunnel::new(&c, 1500).unwrap();
        let rx = t.open().unwrap();
        let mut frame = vec![0u8; 60];
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 7]);
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut none = [0u8; HDR];
        let iov = [
            libc::iovec { iov_base: none.as_mut_ptr().cast(), iov_len: HDR },
            libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: 60 },
        ];
        t.send(&iov).unwrap();
        let mut pfd = libc::pollfd { fd: rx.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "the datagram arrives");
        let mut bufs = vec![vec![0u8; 2048]; 4];
        let mut out = Vec::new();
        let counters = vunet_switch::PortCounters::default();
        let n = recv(rx.fd.as_raw_fd(), &t, &mut bufs, &mut out, &counters).unwrap();
        assert_eq!(n, 1);
        assert_eq!(&bufs[0][..8], &vxlan::header(42), "the VXLAN header with VNI 42 and the I flag");
        let (b, at, l) = out[0];
        assert_eq!(&bufs[b][at..at + l], &frame[..], "the inner frame, whole");
        assert_eq!(t.info().learned, vec![("52:54:00:00:00:07".to_string(), "127.0.0.1".to_string(), 0)]);
        // A datagram of another VNI is counted, not delivered.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut d = vxlan::header(43).to_vec();
        d.extend_from_slice(&frame);
        other.send_to(&d, ("127.0.0.1", port)).unwrap();
        other.send_to(&[0x08, 0, 0], ("127.0.0.1", port)).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let n = recv(rx.fd.as_raw_fd(), &t, &mut bufs, &mut out, &counters).unwrap();
        assert_eq!(n, 0, "both dropped");
        let c = counters.snapshot();
        assert_eq!((c.drop_count(DropReason::VxlanUnknownVni), c.drop_count(DropReason::VxlanShort)), (1, 1));
    }

    /// A TSO frame leaves as encapsulated MSS-sized segments (one UDP GSO send, cut by the
    /// kernel), each a complete frame with its own checksums; a partial checksum is completed.
    #[test]
    fn tso_frames_leave_as_encapsulated_segments_and_partial_checksums_are_completed() {
        let port = free_port();
        let t = Tunnel::new(&cfg(port), 1500).unwrap();
        let rx = t.open().unwrap();
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([0x52, 0x54, 0, 0, 0, 7], [0x52, 0x54, 0, 0, 0, 8])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(5000, 80, 1, 1000)
            .ack(1)
            .write(&mut frame, &payload)
            .unwrap();
        // As a guest sends it: the TCP checksum holds the pseudo-header's sum only.
        let tcp_sum = 14 + 20 + 16;
        let ph = vunet_switch::checksum::pseudo_v4(&[10, 0, 0, 1], &[10, 0, 0, 2], 6, (frame.len() - 34) as u16);
        frame[tcp_sum..tcp_sum + 2].copy_from_slice(&(!vunet_switch::checksum::finish(ph)).to_be_bytes());
        let hdr = VnetHeader { flags: 1, gso_type: 1, hdr_len: 54, gso_size: 1000, csum_start: 34, csum_offset: 16, num_buffers: 0 };
        let mut h = [0u8; HDR];
        hdr.write(&mut h);
        let iov = [
            libc::iovec { iov_base: h.as_mut_ptr().cast(), iov_len: HDR },
            libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: frame.len() },
        ];
        t.send(&iov).unwrap();
        let mut got = Vec::new();
        // Room for a read of merged datagrams (UDP_GRO).
        let mut bufs = vec![vec![0u8; 65600]; 8];
        let mut out = Vec::new();
        let counters = vunet_switch::PortCounters::default();
        let mut pfd = libc::pollfd { fd: rx.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        while got.len() < 5 && unsafe { libc::poll(&mut pfd, 1, 5000) } == 1 {
            recv(rx.fd.as_raw_fd(), &t, &mut bufs, &mut out, &counters).unwrap();
            got.extend(out.iter().map(|&(b, at, l)| bufs[b][at..at + l].to_vec()));
        }
        assert_eq!(got.len(), 5, "five segments of 1000 bytes");
        assert!(!t.no_udp_gso.load(Ordering::Relaxed), "sent with UDP GSO");
        let mut stream = Vec::new();
        for g in &got {
            let p = etherparse::SlicedPacket::from_ethernet(g).unwrap();
            let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else { panic!("not TCP") };
            let ip = etherparse::Ipv4HeaderSlice::from_slice(&g[14..]).unwrap();
            assert_eq!(tcp.to_header().calc_checksum_ipv4(&ip.to_header(), tcp.payload()).unwrap(), tcp.checksum());
            assert_eq!(tcp.sequence_number() as usize, 1 + stream.len());
            stream.extend_from_slice(tcp.payload());
        }
        assert_eq!(stream, payload);
        // A frame with a partial checksum alone: completed before it leaves.
        let mut small = frame[..54 + 100].to_vec();
        small[16..18].copy_from_slice(&(154u16 - 14).to_be_bytes());
        let ph = vunet_switch::checksum::pseudo_v4(&[10, 0, 0, 1], &[10, 0, 0, 2], 6, 120);
        small[tcp_sum..tcp_sum + 2].copy_from_slice(&(!vunet_switch::checksum::finish(ph)).to_be_bytes());
        let hdr = VnetHeader { flags: 1, csum_start: 34, csum_offset: 16, ..VnetHeader::default() };
        hdr.write(&mut h);
        let iov = [
            libc::iovec { iov_base: h.as_mut_ptr().cast(), iov_len: HDR },
            libc::iovec { iov_base: small.as_mut_ptr().cast(), iov_len: small.len() },
        ];
        t.send(&iov).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        let n = recv(rx.fd.as_raw_fd(), &t, &mut bufs, &mut out, &counters).unwrap();
        assert_eq!(n, 1);
        let (b, at, l) = out[0];
        let g = &bufs[b][at..at + l];
        let p = etherparse::SlicedPacket::from_ethernet(g).unwrap();
        let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else { panic!("not TCP") };
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&g[14..]).unwrap();
        assert_eq!(tcp.to_header().calc_checksum_ipv4(&ip.to_header(), tcp.payload()).unwrap(), tcp.checksum(), "completed");
    }
}
