//! Socket NAT's I/O half: a `nat` network without an uplink reaches the outside through the
//! host's own sockets, as an ordinary user (docs/socket-nat.md).
//!
//! The pure state machines (`vunet_switch::socknat`) decide; this service owns the sockets.
//! Guest frames for the outside come in through `GatewayService::handle` on the sending
//! port's worker thread: a TCP segment's data is written to its socket right there, and the
//! ACK goes back at once. Everything the host side starts (a connect finishing, data
//! arriving, a socket's buffer draining, timers) is handled by one thread per network
//! (`run`), woken by epoll. Both hold the one lock of the network's flow tables.

mod host;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vunet_switch::gateway::{Gateway, Gateway6};
use vunet_switch::socknat::icmp::{IcmpConfig, IcmpOp, IcmpTable};
use vunet_switch::socknat::tcp::{HostIo, HostOp, TcpConfig};
use vunet_switch::socknat::udp::{UdpConfig, UdpOp, UdpTable};
use vunet_switch::socknat::wire::{self, Link, UDP_FRAME_HDR};
use vunet_switch::socknat::{FlowId, Input, TcpTable, TcpTableConfig};
use vunet_switch::vnet::{RxCaps, VnetHeader};
use vunet_switch::PortId;

use self::host::{ConnectError, ForwardSocket, HostPing, HostTcp, HostUdp};
use crate::config::{SocketForward, SocketNatConfig};
use crate::datapath::{deliver_made, GatewayCx, GatewayService, Handled, Inject, Network, Port, TxScratch};

/// How often the timers run (retransmissions start at 1 s; idle time-outs are minutes).
const TICK_MS: u64 = 50;
/// Room for the largest frame to a guest: a 64 KiB TSO segment and its headers.
const FRAME_BUF: usize = wire::MAX_IP_PACKET + wire::ETH_LEN;

/// Socket NAT's counters beyond the flow tables' own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// New flows refused because no socket could be made (out of file descriptors).
    pub no_socket: u64,
    /// Datagrams from the host larger than the network's MTU allows (no IP fragmentation).
    pub udp_too_big: u64,
    /// Frames for addresses socket NAT does not reach (broadcast, multicast, loopback, the
    /// guests' own subnet).
    pub unroutable: u64,
    /// Guest datagrams a full socket buffer dropped.
    pub udp_send_failed: u64,
    /// Echo requests dropped because `net.ipv4.ping_group_range` does not let this process
    /// open ping sockets.
    pub icmp_not_permitted: u64,
    /// Connections and datagrams on forwarded ports refused: their guest is not on the
    /// network (no lease, not connected), or its flow table is full.
    pub forward_refused: u64,
    /// Connections accepted on forwarded ports.
    pub forward_accepted: u64,
    /// IPv6 flows the host could not carry: no IPv6 sockets (`EAFNOSUPPORT`), no IPv6 address
    /// (`EADDRNOTAVAIL`) or no route (`ENETUNREACH`). The guest hears "unreachable" (said once
    /// in the log).
    pub no_ipv6: u64,
}

/// What `net-list` and the metrics say about a network's socket NAT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatSummary {
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub icmp_flows: usize,
    /// Of those, the flows over IPv6 (TCP, UDP, ICMPv6 echo).
    pub tcp6_flows: usize,
    pub udp6_flows: usize,
    pub icmp6_flows: usize,
    /// Guest connections the host refused (RST to the guest) and those it could not reach.
    pub refused: u64,
    pub unreachable: u64,
    pub forward_accepted: u64,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    /// Drops by reason: the state machines' and the host side's (`no_socket`, ...).
    pub drops: Vec<(&'static str, u64)>,
}

/// A flow as `port-list`/`net-list` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub proto: &'static str,
    pub port: PortId,
    pub guest: SocketAddr,
    pub remote: SocketAddr,
    pub state: &'static str,
}

struct TcpSock {
    host: Option<HostTcp>,
    port: PortId,
    serial: u32,
    connecting: bool,
}

/// A UDP flow's socket: its own, connected to the remote; or, for a flow a forwarded port
/// started, that port's socket, which the guest's answers leave from.
enum UdpHost {
    Connected(HostUdp),
    Forward { listener: usize, peer: SocketAddr },
}

struct UdpSock {
    host: UdpHost,
    port: PortId,
}

struct PingSock {
    host: HostPing,
    port: PortId,
}

/// A forwarded host port: its socket and where it leads.
struct Listener {
    sock: ForwardSocket,
    tcp: bool,
    guest: SocketAddr,
}

struct State {
    tcp: TcpTable,
    udp: UdpTable,
    tcp_socks: Vec<Option<TcpSock>>,
    udp_socks: Vec<Option<UdpSock>>,
    icmp: IcmpTable,
    ping_socks: Vec<Option<PingSock>>,
    /// Frames to guests are built here.
    frame: Vec<u8>,
    out: TxScratch,
    serial: u32,
    host: HostCounters,
}

/// The socket NAT of one network.
pub struct SocketNat {
    network: String,
    gw: Gateway,
    /// The gateway's IPv6 side (`gateway6`): its address is the host's `::1` with
    /// `host_loopback`, its prefix is the guests' own.
    gw6: Option<Gateway6>,
    host_loopback: bool,
    mtu: u16,
    epoch: Instant,
    epoll: Epoll,
    state: Mutex<State>,
    listeners: Vec<Listener>,
    said_no_socket: AtomicBool,
    said_no_ping: AtomicBool,
    said_no_ipv6: AtomicBool,
}

const KIND_TCP: u64 = 0;
const KIND_UDP: u64 = 1;
const KIND_PING: u64 = 2;
const KIND_LISTEN: u64 = 3;

/// epoll's data word: the kind, a serial (a slot reused by a new flow must not take the
/// events of the old one's socket) and the flow's id.
fn token(kind: u64, serial: u32, id: FlowId) -> u64 {
    kind << 60 | ((serial as u64) & 0x0fff_ffff) << 32 | (id as u64 & 0xffff_ffff)
}

fn untoken(t: u64) -> (u64, u32, FlowId) {
    (t >> 60, ((t >> 32) & 0x0fff_ffff) as u32, (t & 0xffff_ffff) as FlowId)
}

impl SocketNat {
    /// The socket NAT of network `network` (with `gw6` when it has `gateway6`: guests' IPv6
    /// flows go out through AF_INET6 sockets), with its forwarded ports bound (an error names
    /// the forward that could not be).
    pub fn new(network: &str, gw: Gateway, gw6: Option<Gateway6>, mtu: u16, cfg: &SocketNatConfig) -> Result<SocketNat, String> {
        let tcp = TcpTableConfig {
            max_connections: cfg.max_connections,
            max_per_guest: cfg.max_per_guest,
            tcp: TcpConfig { mtu, idle_timeout_ms: cfg.tcp_idle_secs.saturating_mul(1000), ..TcpConfig::default() },
        };
        let udp = UdpConfig {
            max_flows: cfg.max_connections,
            max_per_guest: cfg.max_per_guest,
            idle_ms: cfg.udp_idle_secs.saturating_mul(1000),
            ..UdpConfig::default()
        };
        let epoll = Epoll::new().map_err(|e| format!("cannot create an epoll instance: {e}"))?;
        let listeners = bind_forwards(&cfg.forwards)?;
        for (i, l) in listeners.iter().enumerate() {
            epoll
                .ctl(ControlOperation::Add, l.sock.fd(), EpollEvent::new(EventSet::IN, token(KIND_LISTEN, 0, i)))
                .map_err(|e| format!("cannot watch a forwarded port: {e}"))?;
        }
        if !host::tcp_peek_offset_supported() {
            warn!(network = %network, "socket NAT: this kernel has no TCP peek offset (Linux 6.9+); retransmissions cost a copy");
        }
        Ok(SocketNat {
            network: network.to_string(),
            gw,
            gw6,
            host_loopback: cfg.host_loopback,
            mtu,
            epoch: Instant::now(),
            epoll,
            listeners,
            state: Mutex::new(State {
                tcp: TcpTable::new(tcp, rand::random()),
                udp: UdpTable::new(udp),
                tcp_socks: Vec::new(),
                udp_socks: Vec::new(),
                icmp: IcmpTable::new(IcmpConfig {
                    max_flows: cfg.max_connections.min(4096),
                    max_per_guest: cfg.max_per_guest.min(1024),
                    ..IcmpConfig::default()
                }),
                ping_socks: Vec::new(),
                frame: vec![0; FRAME_BUF],
                out: TxScratch::default(),
                serial: 0,
                host: HostCounters::default(),
            }),
            said_no_socket: AtomicBool::new(false),
            said_no_ping: AtomicBool::new(false),
            said_no_ipv6: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a guest packet to `dst` goes out through a host socket: not to the guests'
    /// own subnet (that is the switch's), the gateway only with `host_loopback`, nothing that
    /// is not a unicast address somewhere else.
    fn reaches(&self, dst: Ipv4Addr) -> bool {
        if dst == self.gw.ip {
            return self.host_loopback;
        }
        let in_subnet = vunet_switch::ipv4::in_subnet(dst, self.gw.ip, self.gw.prefix);
        !(in_subnet || dst.is_broadcast() || dst.is_multicast() || dst.is_loopback() || dst.is_unspecified() || dst.octets()[0] == 0)
    }

    /// Whether a guest IPv6 packet to `dst` goes out through a host socket: the gateway's own
    /// addresses only with `host_loopback` (its global one; the link-local is never carried),
    /// never the guests' own prefix, link-local, multicast, loopback, unspecified, or an
    /// IPv4-mapped/-compatible address (an AF_INET6 socket would reach IPv4 with it, past the
    /// IPv4 rules, 127.0.0.1 included).
    fn reaches6(&self, gw6: &Gateway6, dst: Ipv6Addr) -> bool {
        if dst == gw6.ip {
            return self.host_loopback;
        }
        let seg0 = dst.segments()[0];
        let link_local = seg0 & 0xffc0 == 0xfe80;
        let v4ish = dst.to_ipv4_mapped().is_some() || dst.octets()[..12] == [0; 12];
        !(gw6.on_link(&dst) || gw6.is_mine(&dst) || link_local || dst.is_multicast() || v4ish)
    }

    /// Where a flow to `remote` (as the guest named it) connects on the host: the gateway's
    /// address is the host's loopback (`127.0.0.1`, or `::1` for its IPv6 address).
    fn host_addr(&self, remote: SocketAddr) -> SocketAddr {
        match remote {
            SocketAddr::V4(a) if *a.ip() == self.gw.ip => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, a.port())),
            SocketAddr::V6(a) if self.gw6.is_some_and(|g| *a.ip() == g.ip) => {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, a.port(), 0, 0))
            }
            other => other,
        }
    }

    /// Counts an IPv6 flow the host could not carry (`host::no_ipv6`), said once.
    fn no_ipv6(&self, st: &mut State, remote: IpAddr, e: &std::io::Error) {
        if !remote.is_ipv6() || !host::no_ipv6(e) {
            return;
        }
        st.host.no_ipv6 += 1;
        if !self.said_no_ipv6.swap(true, Ordering::Relaxed) {
            warn!(network = %self.network, "socket NAT: the host cannot carry guests' IPv6 flows ({e}); they are answered as unreachable (said once; counted as no_ipv6)");
        }
    }

    /// Flow counts and drop/refusal counters, for `net-list` and the metrics.
    pub fn summary(&self) -> NatSummary {
        let st = self.lock();
        let (tcp, udp, icmp) = (st.tcp.counters(), st.udp.counters, st.icmp.counters);
        let mut drops: Vec<(&'static str, u64)> = Vec::new();
        for why in vunet_switch::socknat::Drop::ALL {
            let n = tcp.dropped(why) + udp.dropped(why) + icmp.dropped(why);
            drops.push((why.name(), n));
        }
        let h = st.host;
        drops.extend([
            ("no_socket", h.no_socket),
            ("udp_too_big", h.udp_too_big),
            ("unroutable", h.unroutable),
            ("udp_send_failed", h.udp_send_failed),
            ("icmp_not_permitted", h.icmp_not_permitted),
            ("forward_refused", h.forward_refused),
            ("no_ipv6", h.no_ipv6),
        ]);
        let tcp6_flows = st.tcp.iter().filter(|(_, f)| f.guest().is_ipv6()).count();
        let udp6_flows = (0..st.udp_socks.len()).filter(|&id| st.udp.key(id).is_some_and(|k| k.guest.is_ipv6())).count();
        let icmp6_flows = (0..st.ping_socks.len()).filter(|&id| st.icmp.key(id).is_some_and(|k| k.guest.is_ipv6())).count();
        NatSummary {
            tcp_flows: st.tcp.len(),
            udp_flows: st.udp.len(),
            icmp_flows: st.icmp.len(),
            tcp6_flows,
            udp6_flows,
            icmp6_flows,
            refused: tcp.refused,
            unreachable: tcp.unreachable + udp.unreachable,
            forward_accepted: h.forward_accepted,
            bytes_to_host: tcp.bytes_to_host + udp.bytes_to_host,
            bytes_to_guest: tcp.bytes_to_guest + udp.bytes_to_guest,
            drops,
        }
    }

    /// The live flows, for the listings.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let st = self.lock();
        let mut v = Vec::new();
        for (id, f) in st.tcp.iter() {
            let Some(s) = st.tcp_socks.get(id).and_then(Option::as_ref) else { continue };
            let state = match f.state() {
                vunet_switch::socknat::tcp::State::Connecting => "connecting",
                vunet_switch::socknat::tcp::State::SynSent => "syn-sent",
                vunet_switch::socknat::tcp::State::SynAckSent => "syn-ack-sent",
                vunet_switch::socknat::tcp::State::Established if f.guest_sent_fin() || f.host_at_eof() => "closing",
                vunet_switch::socknat::tcp::State::Established => "established",
                vunet_switch::socknat::tcp::State::Closed => "closed",
            };
            v.push(FlowInfo { proto: "tcp", port: s.port, guest: f.guest(), remote: f.remote(), state });
        }
        for (id, s) in st.udp_socks.iter().enumerate() {
            let (Some(s), Some(key)) = (s, st.udp.key(id)) else { continue };
            let state = if matches!(s.host, UdpHost::Forward { .. }) { "forwarded" } else { "open" };
            v.push(FlowInfo { proto: "udp", port: s.port, guest: key.guest, remote: key.remote, state });
        }
        for (id, s) in st.ping_socks.iter().enumerate() {
            let (Some(s), Some(key)) = (s, st.icmp.key(id)) else { continue };
            let (guest, remote) = (SocketAddr::new(key.guest, key.ident), SocketAddr::new(key.remote, 0));
            v.push(FlowInfo { proto: "icmp", port: s.port, guest, remote, state: "echo" });
        }
        v
    }

    fn no_socket(&self, st: &mut State, e: &std::io::Error) {
        st.host.no_socket += 1;
        if !self.said_no_socket.swap(true, Ordering::Relaxed) {
            warn!(network = %self.network, "socket NAT: cannot open a host socket ({e}); new flows are refused until there are file descriptors again (said once)");
        }
    }

    // ---- Guest frames ----------------------------------------------------------------

    fn tcp_from_guest(&self, port: &Port, frame: &[u8], hdr: &VnetHeader) {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        match st.tcp.input(frame, hdr, now, &mut st.frame) {
            Input::Dropped(_) => {}
            Input::Reply(n, _) => deliver_made(port, &VnetHeader::default(), &st.frame[..n], &mut st.out),
            Input::Opened(id) => {
                st.serial = st.serial.wrapping_add(1);
                set_slot(&mut st.tcp_socks, id, TcpSock { host: None, port: port.id, serial: st.serial, connecting: false });
                self.drive_tcp(st, id, port, now);
            }
            Input::Segment(id, seg) => {
                let (flow, sock) = (st.tcp.flow_mut(id), st.tcp_socks.get_mut(id).and_then(Option::as_mut));
                if let Some(flow) = flow {
                    let carries = !seg.payload.is_empty();
                    match sock.and_then(|s| s.host.as_mut()) {
                        Some(host) => {
                            flow.on_segment(&seg, now, host);
                            if carries && !host.failed {
                                // The window the guest sees follows the socket's free room.
                                let space = host.send_space();
                                flow.set_host_send_space(space);
                                if space < 64 * 1024 {
                                    // Ask to hear when it drains (re-arming makes the kernel
                                    // note that somebody waits for room).
                                    let _ = self.epoll.ctl(
                                        ControlOperation::Modify,
                                        host.fd(),
                                        EpollEvent::new(
                                            tcp_events(),
                                            token(KIND_TCP, st.tcp_socks[id].as_ref().map_or(0, |s| s.serial), id),
                                        ),
                                    );
                                }
                            }
                        }
                        None => flow.on_segment(&seg, now, &mut FlowIo(None)),
                    }
                    self.drive_tcp(st, id, port, now);
                }
            }
        }
    }

    fn udp_from_guest(&self, port: &Port, frame: &[u8], hdr: &VnetHeader) {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        match st.udp.input(frame, hdr, now) {
            Err(_) => {}
            Ok(UdpOp::Send { id, payload }) => {
                let sent = match st.udp_socks.get(id).and_then(Option::as_ref).map(|s| &s.host) {
                    Some(UdpHost::Connected(h)) => h.send(payload),
                    Some(UdpHost::Forward { listener, peer }) => self.listeners[*listener].sock.send_to(payload, *peer),
                    None => true,
                };
                if !sent {
                    st.host.udp_send_failed += 1;
                }
            }
            Ok(UdpOp::Open { id, remote, payload }) => {
                let opened = HostUdp::connect(self.host_addr(remote)).and_then(|h| {
                    self.epoll.ctl(
                        ControlOperation::Add,
                        h.fd(),
                        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token(KIND_UDP, 0, id)),
                    )?;
                    Ok(h)
                });
                match opened {
                    Ok(h) => {
                        if !h.send(payload) {
                            st.host.udp_send_failed += 1;
                        }
                        set_slot(&mut st.udp_socks, id, UdpSock { host: UdpHost::Connected(h), port: port.id });
                    }
                    Err(e) => {
                        self.no_ipv6(st, remote.ip(), &e);
                        // Said to the guest as the host's routing said it, then forgotten.
                        match ConnectError::toward(remote.ip(), &e) {
                            ConnectError::NoResources => self.no_socket(st, &e),
                            ConnectError::Unreachable(Some(code)) => {
                                if let Some(len) = st.udp.unreachable(id, code, &mut st.frame) {
                                    deliver_made(port, &VnetHeader::default(), &st.frame[..len], &mut st.out);
                                }
                            }
                            _ => st.host.unroutable += 1,
                        }
                        st.udp.remove(id);
                    }
                }
            }
        }
    }

    // ---- Driving a TCP flow ------------------------------------------------------------

    /// Runs a flow's pending work: socket operations, frames to its guest, what the socket's
    /// reads found (end of file, a failure); removes it once done.
    fn drive_tcp(&self, st: &mut State, id: FlowId, port: &Port, now: u64) {
        let caps = port.rx_caps().unwrap_or(RxCaps { csum: false, tso4: false, tso6: false, mrg_rxbuf: false, hdr_len: 12 });
        loop {
            let mut progressed = false;
            while let Some(op) = st.tcp.flow_mut(id).and_then(|f| f.poll_host()) {
                progressed = true;
                self.host_op(st, id, op, now);
            }
            let (Some(flow), Some(sock)) = (st.tcp.flow_mut(id), st.tcp_socks.get_mut(id).and_then(Option::as_mut)) else {
                break;
            };
            while let Some(f) = flow.poll_frame(now, &caps, &mut st.frame, &mut FlowIo(sock.host.as_mut())) {
                progressed = true;
                deliver_made(port, &f.vnet, &st.frame[..f.len], &mut st.out);
            }
            if let Some(h) = sock.host.as_mut() {
                if h.failed {
                    h.failed = false;
                    flow.host_reset();
                    progressed = true;
                } else if h.eof && !flow.host_at_eof() {
                    flow.host_eof();
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        if st.tcp.flow(id).is_some_and(|f| f.is_done()) {
            st.tcp.remove(id);
            if let Some(s) = st.tcp_socks.get_mut(id).and_then(Option::take) {
                if let Some(h) = s.host {
                    h.close(true);
                }
            }
        }
    }

    fn host_op(&self, st: &mut State, id: FlowId, op: HostOp, now: u64) {
        let Some(sock) = st.tcp_socks.get_mut(id).and_then(Option::as_mut) else { return };
        match op {
            HostOp::Connect(remote) => {
                let dst = self.host_addr(remote);
                let serial = sock.serial;
                let r = HostTcp::connect(dst).and_then(|(h, done)| {
                    self.epoll.ctl(ControlOperation::Add, h.fd(), EpollEvent::new(tcp_events(), token(KIND_TCP, serial, id)))?;
                    Ok((h, done))
                });
                match r {
                    Ok((h, done)) => {
                        let space = h.send_space();
                        sock.host = Some(h);
                        sock.connecting = !done;
                        if let Some(flow) = st.tcp.flow_mut(id) {
                            flow.set_host_send_space(space);
                            if done {
                                flow.connected(now);
                            }
                        }
                    }
                    Err(e) => self.connect_failed(st, id, &e),
                }
            }
            HostOp::Discard(n) => {
                if let Some(h) = sock.host.as_mut() {
                    h.discard(n);
                }
            }
            HostOp::ShutdownWrite => {
                if let Some(h) = sock.host.as_ref() {
                    h.shutdown_write();
                }
            }
            HostOp::Close { reset } => {
                if let Some(h) = sock.host.take() {
                    h.close(reset);
                }
            }
        }
    }

    fn connect_failed(&self, st: &mut State, id: FlowId, e: &std::io::Error) {
        let remote = st.tcp.flow(id).map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |f| f.remote().ip());
        self.no_ipv6(st, remote, e);
        let err = ConnectError::toward(remote, e);
        if err == ConnectError::NoResources {
            self.no_socket(st, e);
        }
        if let Some(s) = st.tcp_socks.get_mut(id).and_then(Option::as_mut) {
            s.connecting = false;
            if let Some(h) = s.host.take() {
                h.close(false);
            }
        }
        let Some(flow) = st.tcp.flow_mut(id) else { return };
        match err {
            ConnectError::Refused | ConnectError::NoResources => flow.refused(),
            ConnectError::Unreachable(code) => flow.unreachable(code),
        }
    }

    // ---- Host events -------------------------------------------------------------------

    /// Serves the host side until the network stops: socket events and timers.
    pub fn run(self: Arc<Self>, inject: Inject) {
        let mut events = vec![EpollEvent::default(); 256];
        let mut next_tick = self.now() + TICK_MS;
        info!(network = %self.network, "socket NAT: guests reach the outside through this process's sockets");
        while !inject.stopped() {
            let now = self.now();
            let timeout = next_tick.saturating_sub(now).min(TICK_MS) as i32;
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    warn!(network = %self.network, "socket NAT: epoll failed ({e}); the service stops");
                    return;
                }
            };
            let net = inject.network();
            for ev in &events[..n] {
                let (kind, serial, id) = untoken(ev.data());
                let set = ev.event_set();
                match kind {
                    KIND_TCP => self.tcp_event(id, serial, set, |p| net.port_by_id(p)),
                    KIND_UDP => self.udp_event(id, |p| net.port_by_id(p)),
                    KIND_PING => self.ping_event(id, |p| net.port_by_id(p)),
                    KIND_LISTEN => self.forward_event(id, net),
                    _ => {}
                }
            }
            let now = self.now();
            if now >= next_tick {
                next_tick = now + TICK_MS;
                // One look at the port list per tick, not one per flow.
                let ports = net.ports.snapshot();
                self.tick(now, |p| ports.get(p).filter(|p| !p.removed.load(Ordering::Relaxed)).cloned());
            }
        }
    }

    fn tcp_event(&self, id: FlowId, serial: u32, set: EventSet, port_of: impl Fn(PortId) -> Option<Arc<Port>>) {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(sock) = st.tcp_socks.get_mut(id).and_then(Option::as_mut).filter(|s| s.serial == serial) else { return };
        let Some(port) = port_of(sock.port) else { return };
        let Some(host) = sock.host.as_mut() else { return };
        if sock.connecting {
            if !set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                return;
            }
            match host.connect_result() {
                Ok(()) => {
                    sock.connecting = false;
                    let space = host.send_space();
                    if let Some(flow) = st.tcp.flow_mut(id) {
                        flow.set_host_send_space(space);
                        flow.connected(now);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => return,
                Err(e) => self.connect_failed(st, id, &e),
            }
        } else {
            if set.contains(EventSet::ERROR) && host.take_error().is_some() {
                host.failed = true;
            }
            if set.contains(EventSet::OUT) {
                let space = host.send_space();
                if let Some(flow) = st.tcp.flow_mut(id) {
                    flow.set_host_send_space(space);
                }
            }
            if set.contains(EventSet::HANG_UP) && !set.contains(EventSet::IN) {
                host.eof = true;
            }
        }
        self.drive_tcp(st, id, &port, now);
    }

    fn udp_event(&self, id: FlowId, port_of: impl Fn(PortId) -> Option<Arc<Port>>) {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(sock) = st.udp_socks.get(id).and_then(Option::as_ref) else { return };
        let Some(port) = port_of(sock.port) else { return };
        let Some(key) = st.udp.key(id) else { return };
        let at = wire::udp_frame_hdr(key.guest.ip());
        // A datagram larger than this does not fit one frame of the network's MTU.
        let max = (self.mtu as usize).saturating_sub(at - wire::ETH_LEN);
        loop {
            let Some(UdpHost::Connected(sock)) = st.udp_socks.get(id).and_then(Option::as_ref).map(|s| &s.host) else { return };
            let r = sock.recv(&mut st.frame[at..]);
            match r {
                Ok(None) => break,
                Ok(Some(n)) if n > max => st.host.udp_too_big += 1,
                Ok(Some(n)) => {
                    if let Some(len) = st.udp.reply(id, n, &mut st.frame, now) {
                        deliver_made(&port, &VnetHeader::default(), &st.frame[..len], &mut st.out);
                    }
                }
                Err(e) => {
                    let code = match e.raw_os_error() {
                        Some(libc::ECONNREFUSED) => Some(3),
                        Some(libc::EHOSTUNREACH) => Some(1),
                        Some(libc::ENETUNREACH) => Some(0),
                        _ => None,
                    };
                    if let Some(len) = code.and_then(|c| st.udp.unreachable(id, c, &mut st.frame)) {
                        deliver_made(&port, &VnetHeader::default(), &st.frame[..len], &mut st.out);
                    }
                }
            }
        }
    }

    // ---- ICMP echo ---------------------------------------------------------------------

    fn ping_from_guest(&self, port: &Port, frame: &[u8], hdr: &VnetHeader) {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        match st.icmp.input(frame, hdr, now) {
            Err(_) => {}
            Ok(IcmpOp::Send { id, message }) => {
                if let Some(s) = st.ping_socks.get(id).and_then(Option::as_ref) {
                    s.host.send(message);
                }
            }
            Ok(IcmpOp::Open { id, remote, message }) => {
                let opened = HostPing::connect(remote).and_then(|h| {
                    self.epoll.ctl(
                        ControlOperation::Add,
                        h.fd(),
                        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token(KIND_PING, 0, id)),
                    )?;
                    Ok(h)
                });
                match opened {
                    Ok(h) => {
                        h.send(message);
                        set_slot(&mut st.ping_socks, id, PingSock { host: h, port: port.id });
                    }
                    Err(e) => {
                        st.icmp.remove(id);
                        self.no_ipv6(st, remote, &e);
                        if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) {
                            st.host.icmp_not_permitted += 1;
                            if !self.said_no_ping.swap(true, Ordering::Relaxed) {
                                // SAFETY: plain getter.
                                let gid = unsafe { libc::getegid() };
                                warn!(network = %self.network, "socket NAT: guests' pings are dropped: net.ipv4.ping_group_range does not include this process's group {gid} (said once; counted as icmp_not_permitted)");
                            }
                        } else if ConnectError::of(&e) == ConnectError::NoResources {
                            self.no_socket(st, &e);
                        } else if !(remote.is_ipv6() && host::no_ipv6(&e)) {
                            st.host.unroutable += 1;
                        }
                    }
                }
            }
        }
    }

    fn ping_event(&self, id: FlowId, port_of: impl Fn(PortId) -> Option<Arc<Port>>) {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(port) = st.ping_socks.get(id).and_then(Option::as_ref).and_then(|s| port_of(s.port)) else { return };
        let Some(key) = st.icmp.key(id) else { return };
        let at = wire::icmp_frame_hdr(key.remote);
        loop {
            let Some(sock) = st.ping_socks.get(id).and_then(Option::as_ref) else { return };
            match sock.host.recv(&mut st.frame[at..]) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    if let Some(len) = st.icmp.reply(id, n, &mut st.frame, now) {
                        deliver_made(&port, &VnetHeader::default(), &st.frame[..len], &mut st.out);
                    }
                }
                // An ICMP error about an echo request: the guest's ping times out, as the
                // host's would have without one.
                Err(_) => continue,
            }
        }
    }

    // ---- Port forwards -----------------------------------------------------------------

    /// Where a host peer appears to the (IPv4) guest of a forward: itself, or the gateway for
    /// the host's own loopback (the guest cannot reach 127.0.0.1 through its gateway) and for
    /// an IPv6 peer of a forward that listens on an IPv6 address (an IPv4 guest cannot see an
    /// IPv6 address; its answers go back through the gateway, to the peer's socket).
    fn as_seen_by_guest(&self, peer: SocketAddr) -> SocketAddr {
        let gw = SocketAddr::V4(SocketAddrV4::new(self.gw.ip, peer.port()));
        match peer {
            SocketAddr::V4(a) if a.ip().is_loopback() => gw,
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) if !v4.is_loopback() => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
                _ => gw,
            },
            other => other,
        }
    }

    /// A forwarded port is readable: connections to accept (TCP), datagrams to pass (UDP).
    fn forward_event(&self, idx: usize, net: &Network) {
        let Some(l) = self.listeners.get(idx) else { return };
        let now = self.now();
        let SocketAddr::V4(guest) = l.guest else { return };
        loop {
            if l.tcp {
                let Some((sock, peer)) = l.sock.accept() else { return };
                let target = net.guest_at(*guest.ip());
                let mut guard = self.lock();
                let st = &mut *guard;
                let Some((mac, port)) = target else {
                    st.host.forward_refused += 1;
                    HostTcp::wrap(sock).close(true);
                    continue;
                };
                let link = Link { guest_mac: mac, gw_mac: self.gw.mac };
                let host = HostTcp::wrap(sock);
                let id = match st.tcp.open_inbound(link, l.guest, self.as_seen_by_guest(peer), now) {
                    Ok(id) => id,
                    Err(_) => {
                        st.host.forward_refused += 1;
                        host.close(true);
                        continue;
                    }
                };
                st.serial = st.serial.wrapping_add(1);
                let serial = st.serial;
                if self.epoll.ctl(ControlOperation::Add, host.fd(), EpollEvent::new(tcp_events(), token(KIND_TCP, serial, id))).is_err() {
                    st.tcp.remove(id);
                    host.close(true);
                    continue;
                }
                st.host.forward_accepted += 1;
                let space = host.send_space();
                set_slot(&mut st.tcp_socks, id, TcpSock { host: Some(host), port: port.id, serial, connecting: false });
                if let Some(f) = st.tcp.flow_mut(id) {
                    f.set_host_send_space(space);
                }
                self.drive_tcp(st, id, &port, now);
            } else {
                let mut guard = self.lock();
                let st = &mut *guard;
                let Some((n, peer)) = l.sock.recv_from(&mut st.frame[UDP_FRAME_HDR..]) else { return };
                if n > self.mtu as usize - 28 {
                    st.host.udp_too_big += 1;
                    continue;
                }
                let Some((mac, port)) = net.guest_at(*guest.ip()) else {
                    st.host.forward_refused += 1;
                    continue;
                };
                let link = Link { guest_mac: mac, gw_mac: self.gw.mac };
                let Ok(id) = st.udp.open_inbound(link, l.guest, self.as_seen_by_guest(peer), now) else {
                    st.host.forward_refused += 1;
                    continue;
                };
                if st.udp_socks.get(id).is_none_or(Option::is_none) {
                    set_slot(&mut st.udp_socks, id, UdpSock { host: UdpHost::Forward { listener: idx, peer }, port: port.id });
                }
                if let Some(len) = st.udp.reply(id, n, &mut st.frame, now) {
                    deliver_made(&port, &VnetHeader::default(), &st.frame[..len], &mut st.out);
                }
            }
        }
    }

    /// Timers: TCP retransmissions, persist probes and time-outs of the flows that have one
    /// due; UDP and ICMP flows idle too long; flows of ports that are gone (`port_of` finds
    /// live ports only).
    fn tick(&self, now: u64, port_of: impl Fn(PortId) -> Option<Arc<Port>>) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let due: Vec<FlowId> = st.tcp.iter().filter(|(_, f)| f.next_deadline().is_some_and(|t| t <= now)).map(|(id, _)| id).collect();
        for id in due {
            let Some(port) = st.tcp_socks.get(id).and_then(Option::as_ref).and_then(|s| port_of(s.port)) else { continue };
            if let Some(f) = st.tcp.flow_mut(id) {
                f.tick(now);
            }
            self.drive_tcp(st, id, &port, now);
        }
        let socks = &mut st.udp_socks;
        st.udp.tick(now, |id| {
            if let Some(s) = socks.get_mut(id) {
                *s = None;
            }
        });
        let pings = &mut st.ping_socks;
        st.icmp.tick(now, |id| {
            if let Some(s) = pings.get_mut(id) {
                *s = None;
            }
        });
        // A flow whose port was removed has nobody to talk to: close it.
        let live = |port: PortId| port_of(port).is_some();
        for id in orphans(&st.tcp_socks, |s| s.port, live) {
            st.tcp.remove(id);
            if let Some(h) = st.tcp_socks[id].take().and_then(|s| s.host) {
                h.close(true);
            }
        }
        for id in orphans(&st.udp_socks, |s| s.port, live) {
            st.udp.remove(id);
            st.udp_socks[id] = None;
        }
        for id in orphans(&st.ping_socks, |s| s.port, live) {
            st.icmp.remove(id);
            st.ping_socks[id] = None;
        }
    }
}

/// The flows in `socks` whose port is no longer live.
fn orphans<T>(socks: &[Option<T>], port: impl Fn(&T) -> PortId, live: impl Fn(PortId) -> bool) -> Vec<FlowId> {
    socks.iter().enumerate().filter(|(_, s)| s.as_ref().is_some_and(|s| !live(port(s)))).map(|(id, _)| id).collect()
}

/// Binds every forwarded host port: one socket per port of each range, on the forward's
/// address or all of the host's IPv4 addresses.
fn bind_forwards(forwards: &[SocketForward]) -> Result<Vec<Listener>, String> {
    let mut out = Vec::new();
    for f in forwards {
        let tcp = f.proto == 6;
        for ext in f.external.0..=f.external.1 {
            let ip = f.listen.unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let at = SocketAddr::new(ip, ext);
            let sock = ForwardSocket::bind(tcp, at).map_err(|e| {
                format!("port_forward {} {at}: cannot listen: {}", if tcp { "tcp" } else { "udp" }, crate::config::io_reason(&e))
            })?;
            let guest = SocketAddr::V4(SocketAddrV4::new(f.guest, f.guest_port + (ext - f.external.0)));
            out.push(Listener { sock, tcp, guest });
        }
    }
    Ok(out)
}

const IPPROTO_ICMPV6: u8 = 58;

/// Where the transport header of an IPv6 frame starts and its protocol, past the extension
/// headers a host may send (hop-by-hop, destination options, routing); a fragment header
/// ends the walk with protocol 44. None for a chain too long or truncated (the state machines
/// check it all again, and count).
fn ipv6_transport(frame: &[u8]) -> Option<(usize, u8)> {
    let (mut next, mut off) = (*frame.get(20)?, 54usize);
    for _ in 0..5 {
        match next {
            0 | 43 | 60 => {
                let h = frame.get(off..off + 2)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            proto => return Some((off, proto)),
        }
    }
    None
}

fn tcp_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

fn set_slot<T>(v: &mut Vec<Option<T>>, id: usize, x: T) {
    if v.len() <= id {
        v.resize_with(id + 1, || None);
    }
    v[id] = Some(x);
}

/// A flow's host side: its socket, or none (its connect failed; it takes and holds nothing).
struct FlowIo<'a>(Option<&'a mut HostTcp>);

impl HostIo for FlowIo<'_> {
    fn write(&mut self, data: &[u8]) -> usize {
        self.0.as_mut().map_or(0, |h| h.write(data))
    }
    fn peek(&mut self, offset: usize, buf: &mut [u8]) -> usize {
        self.0.as_mut().map_or(0, |h| h.peek(offset, buf))
    }
}

/// Guest frames to the gateway's MAC for an address outside: TCP and UDP go to host sockets,
/// ICMP (ICMPv6) echo to ping sockets; IPv4, and IPv6 when the network has `gateway6`. TCP to
/// the gateway itself without `host_loopback` is refused (RST), as a host with no such
/// service would.
impl GatewayService for SocketNat {
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        if frame.len() < 34 || frame[0..6] != self.gw.mac {
            return Handled::NotMine;
        }
        let (dst, proto, reaches, is_gw) = match ([frame[12], frame[13]], self.gw6.as_ref()) {
            ([0x08, 0x00], _) => {
                let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
                (IpAddr::V4(dst), frame[23], self.reaches(dst), dst == self.gw.ip)
            }
            ([0x86, 0xdd], Some(gw6)) => {
                let Some(dst) = frame.get(38..54).and_then(|b| <[u8; 16]>::try_from(b).ok()).map(Ipv6Addr::from) else {
                    return Handled::NotMine;
                };
                let Some((_, proto)) = ipv6_transport(frame) else {
                    self.lock().tcp.count(vunet_switch::socknat::Drop::BadIpHeader);
                    return Handled::Consumed;
                };
                // ICMPv6 to the gateway's own addresses is the ND service's (echo, ND).
                if gw6.is_mine(&dst) && proto == IPPROTO_ICMPV6 {
                    return Handled::NotMine;
                }
                (IpAddr::V6(dst), proto, self.reaches6(gw6, dst), gw6.is_mine(&dst))
            }
            _ => return Handled::NotMine,
        };
        if !reaches {
            if is_gw && proto == 6 {
                if let Ok(seg) = wire::parse_tcp(frame, cx.hdr) {
                    if !seg.has(wire::RST) {
                        reply.resize(wire::tcp_frame_hdr(dst), 0);
                        if let Some(n) = wire::write_rst_reply(reply, &seg, 0) {
                            reply.truncate(n);
                            return Handled::Reply;
                        }
                    }
                }
                return Handled::Consumed;
            }
            if !is_gw {
                self.lock().host.unroutable += 1;
                return Handled::Consumed;
            }
            return Handled::NotMine;
        }
        match proto {
            6 => self.tcp_from_guest(port, frame, cx.hdr),
            17 => self.udp_from_guest(port, frame, cx.hdr),
            1 if dst.is_ipv4() => self.ping_from_guest(port, frame, cx.hdr),
            IPPROTO_ICMPV6 if dst.is_ipv6() => self.ping_from_guest(port, frame, cx.hdr),
            // A fragment: nothing here reassembles (counted as for IPv4).
            44 if dst.is_ipv6() => self.lock().tcp.count(vunet_switch::socknat::Drop::Fragment),
            _ => return Handled::NotMine,
        }
        Handled::Consumed
    }

    fn takes_offloaded(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for SocketNat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketNat").field("network", &self.network).finish()
    }
}
