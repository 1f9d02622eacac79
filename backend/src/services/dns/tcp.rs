//! DNS over TCP on the gateway (RFC 7766). A client whose UDP answer came back truncated
//! (TC set: it did not fit the MTU) asks again over TCP. The TCP endpoint is smoltcp's, fed
//! only with the frames guests send to the gateway's port 53; local names are answered from
//! the network's zone, other names are asked upstream over TCP by a small pool of worker
//! threads, so a slow resolver never holds up the service's own thread and a guest opening
//! connection after connection never makes more threads.
//!
//! Shares: a port holds at most `PORT_CONNECTIONS` of the `CONNECTIONS` sockets (a SYN beyond
//! is reset) and has at most as many queries upstream; a query beyond, or beyond the pool's
//! queue, is answered SERVFAIL at once.
//!
//! With `gateway6` the endpoint also listens on the gateway's IPv6 addresses (global and
//! link-local).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use vunet_dhcp::dns::{DnsAction, PORT as DNS_PORT};
use vunet_switch::checksum::{finish, pseudo_v6, sum};
use vunet_switch::gateway::{Gateway, Gateway6};
use vunet_switch::proto::{ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};
use vunet_switch::{Mac, PortId};

use super::{DnsService, QUERY_TIMEOUT};
use crate::datapath::{GatewayCx, GatewayService, Handled, Inject, Network, Port};

/// Connections served at once; a SYN beyond these is answered with a reset.
pub const CONNECTIONS: usize = 8;
/// Connections one port may hold at once, and queries it may have upstream; a SYN beyond is
/// answered with a reset, a query beyond with SERVFAIL.
pub const PORT_CONNECTIONS: usize = 2;
/// Threads asking upstream resolvers over TCP (started at the first query that needs one).
pub const WORKERS: usize = 4;
/// Queries waiting for a worker; a query beyond is answered SERVFAIL.
const JOBS: usize = 8;
/// A connection with no query for this long is closed (RFC 7766 §6.2.3 asks for seconds).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for the service thread; more are dropped (TCP resends them).
const QUEUE: usize = 256;
/// DNS queries are small; a longer one is not a query.
const MAX_QUERY: usize = 4096;

enum Event {
    Frame(PortId, Vec<u8>),
    /// A worker is done with a query of `port`: the answer, or None if the connection it
    /// was for had gone before the worker came to it.
    Answer {
        slot: usize,
        generation: u64,
        port: PortId,
        message: Option<Vec<u8>>,
    },
}

/// A query for the workers.
struct Job {
    slot: usize,
    generation: u64,
    port: PortId,
    query: Vec<u8>,
}

/// The handle the data path holds: frames for the gateway's TCP port 53 go in here.
pub struct DnsTcp {
    events: SyncSender<Event>,
    receiver: Mutex<Option<Receiver<Event>>>,
    /// Frames dropped because the service thread was behind.
    pub dropped: AtomicU64,
    /// Connections refused because their port held its share.
    pub refused: AtomicU64,
    /// Queries answered SERVFAIL because their port had its share upstream or the workers'
    /// queue was full.
    pub busy: AtomicU64,
}

impl Default for DnsTcp {
    fn default() -> Self {
        let (events, receiver) = sync_channel(QUEUE);
        DnsTcp {
            events,
            receiver: Mutex::new(Some(receiver)),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }
}

/// Whether `frame` is TCP to port 53 of the gateway (unicast to its MAC and IP, or one of its
/// IPv6 addresses with `gw6`; IPv6 without extension headers).
pub fn is_for_dns_tcp(gw: &Gateway, gw6: Option<&Gateway6>, frame: &[u8]) -> bool {
    if frame.len() < 14 + 20 + 20 || frame[0..6] != gw.mac {
        return false;
    }
    if u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IPV6 {
        let Some(gw6) = gw6 else { return false };
        let ip = &frame[14..];
        let dst: [u8; 16] = ip.get(24..40).and_then(|d| d.try_into().ok()).unwrap_or([0; 16]);
        return ip.len() >= 40 + 20
            && ip[0] >> 4 == 6
            && ip[6] == IPPROTO_TCP
            && gw6.is_mine(&Ipv6Addr::from(dst))
            && ip[42..44] == DNS_PORT.to_be_bytes();
    }
    if u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV4 {
        return false;
    }
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    ip[0] >> 4 == 4
        && ihl >= 20
        && ip.len() >= ihl + 20
        && ip[9] == IPPROTO_TCP
        && ip[16..20] == gw.ip.octets()
        && ip[ihl + 2..ihl + 4] == DNS_PORT.to_be_bytes()
}

impl DnsTcp {
    /// Queues a frame for the service thread; never blocks the data path.
    pub fn input(&self, port: PortId, frame: &[u8]) {
        match self.events.try_send(Event::Frame(port, frame.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Runs the service for the life of the network on its own thread; `names` answers for
    /// the network's own names.
    pub fn run(self: Arc<Self>, mut inject: Inject, gw: Gateway, names: Arc<DnsService>) {
        let Some(rx) = self.receiver.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let net = inject.network().clone();
        let mut svc = Service::new(&gw, net.gateway6.as_ref(), net.mtu, names.upstreams.clone(), self.events.clone());
        while !inject.stopped() {
            svc.counters(&self);
            let delay = svc.poll_delay().min(Duration::from_secs(1));
            match rx.recv_timeout(delay) {
                Ok(ev) => svc.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(ev) = rx.try_recv() {
                svc.handle(ev);
            }
            svc.poll(&net, &gw, &names);
            svc.send_out(&mut inject);
        }
    }
}

/// TCP to port 53 of the gateway goes to the service thread; the data path never waits on it.
impl GatewayService for DnsTcp {
    fn handle(&self, cx: &GatewayCx, port: &Port, frame: &[u8], _reply: &mut Vec<u8>) -> Handled {
        if !is_for_dns_tcp(cx.gateway, cx.gateway6, frame) {
            return Handled::NotMine;
        }
        self.input(port.id, frame);
        Handled::Consumed
    }
}

/// The frames between smoltcp and the switch.
struct Frames {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    mtu: usize,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push(frame);
        r
    }
}

impl Device for Frames {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: NetInstant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: NetInstant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}

/// One of the listening sockets and the query it is reading.
struct Conn {
    handle: SocketHandle,
    /// Bumped whenever the socket starts over, so a late upstream answer for an earlier
    /// connection is not sent on this one.
    generation: u64,
    buf: Vec<u8>,
    waiting_upstream: bool,
    last_active: NetInstant,
}

struct Service {
    dev: Frames,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    /// Which port each client MAC spoke from (bounded: cleared when full).
    ports: HashMap<Mac, PortId>,
    upstreams: Vec<SocketAddr>,
    events: SyncSender<Event>,
    /// The workers' queue (None until the first query for upstream).
    jobs: Option<SyncSender<Job>>,
    /// Each slot's current generation, for the workers to skip queries of gone connections.
    generations: Arc<Vec<AtomicU64>>,
    /// Queries of each port queued or with a worker.
    upstream_of: HashMap<PortId, usize>,
    /// The port each admitted client endpoint came from (bounded: pruned to live
    /// connections when it grows).
    owners: HashMap<(IpAddr, u16), PortId>,
    /// Endpoints admitted since the last poll (smoltcp has not made them a connection yet).
    fresh: HashSet<(IpAddr, u16)>,
    /// Counted here, added to `DnsTcp`'s counters by the loop.
    refused: u64,
    busy: u64,
}

fn now() -> NetInstant {
    NetInstant::now()
}

impl Service {
    fn new(gw: &Gateway, gw6: Option<&Gateway6>, mtu: u16, upstreams: Vec<SocketAddr>, events: SyncSender<Event>) -> Service {
        let mut dev = Frames { rx: VecDeque::new(), tx: Vec::new(), mtu: mtu as usize };
        let mut config = Config::new(EthernetAddress(gw.mac).into());
        config.random_seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
        let mut iface = Interface::new(config, &mut dev, now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(gw.ip), gw.prefix));
            if let Some(g) = gw6 {
                let _ = a.push(IpCidr::new(IpAddress::Ipv6(g.ip), g.prefix));
                let _ = a.push(IpCidr::new(IpAddress::Ipv6(g.link_local), 64));
            }
        });
        let mut sockets = SocketSet::new(Vec::new());
        let conns = (0..CONNECTIONS)
            .map(|_| {
                let rx = tcp::SocketBuffer::new(vec![0; MAX_QUERY + 2]);
                let tx = tcp::SocketBuffer::new(vec![0; 65535 + 2]);
                let mut s = tcp::Socket::new(rx, tx);
                s.set_timeout(Some(smoltcp::time::Duration::from_secs(QUERY_TIMEOUT.as_secs() * 2)));
                let _ = s.listen(DNS_PORT);
                Conn { handle: sockets.add(s), generation: 0, buf: Vec::new(), waiting_upstream: false, last_active: now() }
            })
            .collect();
        Service {
            dev,
            iface,
            sockets,
            conns,
            ports: HashMap::new(),
            upstreams,
            events,
            jobs: None,
            generations: Arc::new((0..CONNECTIONS).map(|_| AtomicU64::new(0)).collect()),
            upstream_of: HashMap::new(),
            owners: HashMap::new(),
            fresh: HashSet::new(),
            refused: 0,
            busy: 0,
        }
    }

    fn counters(&mut self, t: &DnsTcp) {
        t.refused.fetch_add(std::mem::take(&mut self.refused), Ordering::Relaxed);
        t.busy.fetch_add(std::mem::take(&mut self.busy), Ordering::Relaxed);
    }

    /// The worker pool's queue, started on first use; None if no worker could be started.
    fn jobs(&mut self) -> Option<&SyncSender<Job>> {
        if self.jobs.is_none() {
            let (tx, rx) = sync_channel::<Job>(JOBS);
            let rx = Arc::new(Mutex::new(rx));
            let mut started = 0;
            for i in 0..WORKERS {
                let (rx, events, upstreams, generations) =
                    (rx.clone(), self.events.clone(), self.upstreams.clone(), self.generations.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("dns-tcp-worker{i}"))
                    .spawn(move || worker(&rx, &events, &upstreams, &generations));
                started += spawned.is_ok() as usize;
            }
            if started == 0 {
                return None;
            }
            self.jobs = Some(tx);
        }
        self.jobs.as_ref()
    }

    /// Connections of `port` now: open ones it owns, and SYNs admitted since the last poll.
    fn connections_of(&self, port: PortId) -> usize {
        let open = self
            .conns
            .iter()
            .filter(|c| {
                let s = self.sockets.get::<tcp::Socket>(c.handle);
                s.is_open() && s.state() != tcp::State::Listen && self.owner(s) == Some(port)
            })
            .count();
        open + self.fresh.iter().filter(|e| self.owners.get(e) == Some(&port)).count()
    }

    fn owner(&self, s: &tcp::Socket) -> Option<PortId> {
        let e = s.remote_endpoint()?;
        self.owners.get(&(ip_of(e.addr), e.port)).copied()
    }

    /// Whether a frame from `port` may go to smoltcp: anything but a new connection beyond
    /// the port's share, which is answered with a reset here instead.
    fn admit(&mut self, port: PortId, frame: &[u8]) -> bool {
        let Some(syn) = parse_syn(frame) else { return true };
        let endpoint = (syn.src_ip, syn.src_port);
        let known = self.fresh.contains(&endpoint)
            || self.conns.iter().any(|c| {
                let s = self.sockets.get::<tcp::Socket>(c.handle);
                s.state() != tcp::State::Listen
                    && s.remote_endpoint().is_some_and(|e| ip_of(e.addr) == syn.src_ip && e.port == syn.src_port)
            });
        if known {
            return true; // a retransmitted SYN
        }
        if self.connections_of(port) >= PORT_CONNECTIONS {
            self.refused += 1;
            let reset = reset_for(frame, &syn);
            if !reset.is_empty() {
                self.dev.tx.push(reset);
            }
            return false;
        }
        if self.owners.len() >= 4 * CONNECTIONS {
            let live: HashSet<(IpAddr, u16)> = self
                .conns
                .iter()
                .filter_map(|c| self.sockets.get::<tcp::Socket>(c.handle).remote_endpoint())
                .map(|e| (ip_of(e.addr), e.port))
                .chain(self.fresh.iter().copied())
                .collect();
            self.owners.retain(|e, _| live.contains(e));
        }
        self.owners.insert(endpoint, port);
        self.fresh.insert(endpoint);
        true
    }

    fn poll_delay(&mut self) -> Duration {
        self.iface.poll_delay(now(), &self.sockets).map(|d| Duration::from_micros(d.total_micros())).unwrap_or(IDLE_TIMEOUT)
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Frame(port, frame) => {
                if self.dev.rx.len() >= QUEUE {
                    return;
                }
                let mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
                if self.ports.len() >= 1024 && !self.ports.contains_key(&mac) {
                    self.ports.clear();
                }
                self.ports.insert(mac, port);
                if !self.admit(port, &frame) {
                    return;
                }
                // smoltcp learns neighbours only from ARP and ND; the sender's address pair is
                // known (and was checked by port security), so tell it in an ARP reply or a
                // neighbour advertisement of our own instead of making it ask and wait.
                self.dev.rx.push_back(if frame[12..14] == ETH_P_IPV6.to_be_bytes() { na_from(&frame) } else { arp_reply_from(&frame) });
                self.dev.rx.push_back(frame);
            }
            Event::Answer { slot, generation, port, message } => {
                if let Some(n) = self.upstream_of.get_mut(&port) {
                    *n -= 1;
                    if *n == 0 {
                        self.upstream_of.remove(&port);
                    }
                }
                let Some(c) = self.conns.get_mut(slot) else { return };
                let Some(message) = message.filter(|_| c.generation == generation) else { return };
                c.waiting_upstream = false;
                let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
                send_message(s, &message);
            }
        }
    }

    /// Runs the TCP machinery and serves every socket until nothing more happens.
    fn poll(&mut self, net: &Network, gw: &Gateway, names: &DnsService) {
        for _ in 0..4 {
            self.iface.poll(now(), &mut self.dev, &mut self.sockets);
            if !self.serve_sockets(net, gw, names) {
                break;
            }
        }
        // smoltcp has taken the admitted SYNs (or reset them, all sockets busy).
        self.fresh.clear();
    }

    /// Reads queries and answers them; true if anything was sent or changed.
    fn serve_sockets(&mut self, net: &Network, gw: &Gateway, names: &DnsService) -> bool {
        let t = now();
        let mut progress = false;
        let mut upstream = Vec::new();
        for (slot, c) in self.conns.iter_mut().enumerate() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                // Closed (or in TIME-WAIT): listen again for the next client.
                c.generation += 1;
                self.generations[slot].store(c.generation, Ordering::Relaxed);
                c.buf.clear();
                c.waiting_upstream = false;
                let _ = s.listen(DNS_PORT);
                continue;
            }
            if s.state() == tcp::State::Listen || s.state() == tcp::State::SynReceived {
                c.last_active = t;
                continue;
            }
            while s.can_recv() && c.buf.len() < MAX_QUERY + 2 {
                let mut chunk = [0u8; 1024];
                let want = chunk.len().min(MAX_QUERY + 2 - c.buf.len());
                match s.recv_slice(&mut chunk[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.buf.extend_from_slice(&chunk[..n]);
                        c.last_active = t;
                    }
                }
            }
            if !c.waiting_upstream && c.buf.len() >= 2 {
                let len = u16::from_be_bytes([c.buf[0], c.buf[1]]) as usize;
                if len > MAX_QUERY {
                    s.abort();
                    progress = true;
                    continue;
                }
                if c.buf.len() >= 2 + len {
                    let query: Vec<u8> = c.buf.drain(..2 + len).skip(2).collect();
                    progress = true;
                    match names.zone(net.dhcp.as_ref(), gw, net.gateway6.as_ref()).respond(&query) {
                        Some(DnsAction::Answer(a)) => send_message(s, &a),
                        Some(DnsAction::Forward) if !self.upstreams.is_empty() => {
                            c.waiting_upstream = true;
                            upstream.push((slot, c.generation, query));
                        }
                        Some(DnsAction::Forward) => send_message(s, &vunet_dhcp::dns::refused(&query)),
                        // Not a DNS query: RFC 7766 lets the server close the connection.
                        None => s.abort(),
                    }
                    continue;
                }
            }
            if c.waiting_upstream {
                continue;
            }
            let idle = t - c.last_active > smoltcp::time::Duration::from_millis(IDLE_TIMEOUT.as_millis() as u64);
            // The client is done (FIN) or silent too long: close after what is queued is sent.
            if (!s.may_recv() || idle) && s.state() != tcp::State::Closing && s.may_send() {
                s.close();
                progress = true;
            }
        }
        for (slot, generation, query) in upstream {
            self.ask_upstream(slot, generation, query);
        }
        progress
    }

    /// Hands a query to the workers, or answers SERVFAIL if its port has its share upstream
    /// or the workers' queue is full.
    fn ask_upstream(&mut self, slot: usize, generation: u64, query: Vec<u8>) {
        let handle = self.conns[slot].handle;
        let port = self.owner(self.sockets.get::<tcp::Socket>(handle));
        let query = match port.filter(|p| self.upstream_of.get(p).copied().unwrap_or(0) < PORT_CONNECTIONS) {
            Some(port) => match self.jobs().map(|jobs| jobs.try_send(Job { slot, generation, port, query })) {
                Some(Ok(())) => {
                    *self.upstream_of.entry(port).or_default() += 1;
                    return;
                }
                Some(Err(TrySendError::Full(job) | TrySendError::Disconnected(job))) => job.query,
                None => return self.servfail(slot, None),
            },
            None => query,
        };
        self.servfail(slot, Some(&query));
    }

    fn servfail(&mut self, slot: usize, query: Option<&[u8]>) {
        self.busy += 1;
        let c = &mut self.conns[slot];
        c.waiting_upstream = false;
        let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
        match query {
            Some(q) => send_message(s, &vunet_dhcp::dns::servfail(q)),
            None => s.abort(),
        }
    }

    /// Hands what smoltcp sent to the guests it is for.
    fn send_out(&mut self, inject: &mut Inject) {
        for frame in self.dev.tx.drain(..) {
            let dst: Mac = frame[0..6].try_into().unwrap_or([0; 6]);
            if let Some(&id) = self.ports.get(&dst) {
                inject.send_to_port(id, &frame);
            }
        }
    }
}

/// A worker of the pool: asks upstream for each query whose connection is still there,
/// until the service (the queue's sender) or its event queue is gone.
fn worker(jobs: &Mutex<Receiver<Job>>, events: &SyncSender<Event>, upstreams: &[SocketAddr], generations: &[AtomicU64]) {
    loop {
        let Ok(job) = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() else { return };
        let current = generations[job.slot].load(Ordering::Relaxed) == job.generation;
        let message = current.then(|| ask_upstream(upstreams, &job.query).unwrap_or_else(|| vunet_dhcp::dns::servfail(&job.query)));
        if events.send(Event::Answer { slot: job.slot, generation: job.generation, port: job.port, message }).is_err() {
            return;
        }
    }
}

fn ip_of(a: IpAddress) -> IpAddr {
    match a {
        IpAddress::Ipv4(ip) => IpAddr::V4(ip),
        IpAddress::Ipv6(ip) => IpAddr::V6(ip),
    }
}

/// The parts of a SYN (without ACK) that a reset to it needs.
struct Syn {
    src_ip: IpAddr,
    /// The gateway address it was sent to.
    dst_ip: IpAddr,
    src_port: u16,
    seq: u32,
}

/// A SYN opening a connection, from an IPv4 or IPv6 TCP frame (checked by `is_for_dns_tcp`).
fn parse_syn(frame: &[u8]) -> Option<Syn> {
    let ip = frame.get(14..)?;
    let (src_ip, dst_ip, tcp) = if frame.get(12..14)? == ETH_P_IPV6.to_be_bytes() {
        let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
        let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
        (IpAddr::from(src), IpAddr::from(dst), ip.get(40..60)?)
    } else {
        let ihl = (*ip.first()? & 0x0f) as usize * 4;
        let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
        let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
        (IpAddr::from(src), IpAddr::from(dst), ip.get(ihl..ihl + 20)?)
    };
    let flags = tcp[13];
    // SYN set; ACK and RST not.
    if flags & 0x16 != 0x02 {
        return None;
    }
    Some(Syn { src_ip, dst_ip, src_port: u16::from_be_bytes([tcp[0], tcp[1]]), seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]) })
}

/// The reset refusing `syn` (RFC 9293 §3.10.7.1: RST|ACK, acknowledging the SYN).
fn reset_for(frame: &[u8], syn: &Syn) -> Vec<u8> {
    let (client_mac, gw_mac): (Mac, Mac) = (frame[6..12].try_into().unwrap_or([0; 6]), frame[0..6].try_into().unwrap_or([0; 6]));
    let eth = etherparse::PacketBuilder::ethernet2(gw_mac, client_mac);
    let ip = match (syn.dst_ip, syn.src_ip) {
        (IpAddr::V4(gw), IpAddr::V4(client)) => eth.ipv4(gw.octets(), client.octets(), 64),
        (IpAddr::V6(gw), IpAddr::V6(client)) => eth.ipv6(gw.octets(), client.octets(), 64),
        _ => return Vec::new(),
    };
    let mut out = Vec::with_capacity(74);
    let built = ip.tcp(DNS_PORT, syn.src_port, 0, 0).rst().ack(syn.seq.wrapping_add(1)).write(&mut out, &[]);
    if built.is_err() {
        out.clear();
    }
    out
}

/// A DNS message on a TCP stream: a two-byte length, then the message.
fn send_message(s: &mut tcp::Socket, message: &[u8]) {
    if message.is_empty() || message.len() > 65535 || s.send_capacity() - s.send_queue() < message.len() + 2 {
        s.abort();
        return;
    }
    let _ = s.send_slice(&(message.len() as u16).to_be_bytes());
    let _ = s.send_slice(message);
}

/// An ARP reply to the gateway saying that the sender of `frame` (an IPv4 frame) has its
/// source MAC.
fn arp_reply_from(frame: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(42);
    a.extend_from_slice(&frame[0..6]);
    a.extend_from_slice(&frame[6..12]);
    a.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    a.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    a.extend_from_slice(&frame[6..12]);
    a.extend_from_slice(&frame[26..30]);
    a.extend_from_slice(&frame[0..6]);
    a.extend_from_slice(&frame[30..34]);
    a
}

/// A neighbour advertisement to the gateway saying that the sender of `frame` (an IPv6 frame)
/// has its source MAC: from its source address, for itself, with a target link-layer option.
fn na_from(frame: &[u8]) -> Vec<u8> {
    let (src, dst): ([u8; 16], [u8; 16]) = (frame[22..38].try_into().unwrap_or([0; 16]), frame[38..54].try_into().unwrap_or([0; 16]));
    let mut body = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    body.extend_from_slice(&src);
    body.extend_from_slice(&[2, 1]);
    body.extend_from_slice(&frame[6..12]);
    let mut f = Vec::with_capacity(14 + 40 + body.len());
    f.extend_from_slice(&frame[0..12]);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    let c = finish(sum(&body, pseudo_v6(&src, &dst, 58, body.len() as u32)));
    body[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&body);
    f
}

/// Asks the upstream resolvers in turn over TCP; the first answer wins.
fn ask_upstream(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    let mut msg = (query.len() as u16).to_be_bytes().to_vec();
    msg.extend_from_slice(query);
    upstreams.iter().find_map(|up| {
        let mut s = TcpStream::connect_timeout(up, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(QUERY_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(QUERY_TIMEOUT)).ok()?;
        s.write_all(&msg).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut answer = vec![0; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut answer).ok()?;
        (answer.len() >= 12 && answer[0..2] == query[0..2]).then_some(answer)
    })
}
