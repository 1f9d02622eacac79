//! Forwarding over UDP: names outside the network go to upstream resolvers (the configured
//! `forwarders`, else the host's /etc/resolv.conf), with a bounded table of outstanding
//! queries that expire. Answers come back on the forwarder's own thread and enter the data
//! path through `Inject`.
//!
//! Against forged answers (RFC 5452): each query leaves under a random id from one of a few
//! sockets on random ports, replaced after a while; an answer counts only if it comes from
//! the resolver the query went to, to the socket it left from, with its id and its question.
//! Against one guest crowding out the others: a port has at most a quarter of the table, and
//! at its share its own oldest query makes room.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vunet_dhcp::dns::{parse_question, PORT as DNS_PORT};
use vunet_switch::gateway::{build_udp, Gateway};
use vunet_switch::udp6::build_udp6;
use vunet_switch::{Mac, PortId};

use crate::datapath::Inject;

/// At most this many queries wait for upstream answers per network.
pub const MAX_PENDING: usize = 512;
/// At most this many of them from one port; at its share a port's own oldest query is dropped
/// to make room (its client retries), never another port's.
pub const PORT_SHARE: usize = MAX_PENDING / 4;
/// An upstream answer later than this is dropped.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Sockets queries leave from at once, each on a port the kernel picks at random.
const SOCKETS: usize = 4;
/// A socket is replaced (on a new random port) after this many queries or this long.
const ROTATE_AFTER_QUERIES: u32 = 32;
const ROTATE_AFTER: Duration = Duration::from_secs(30);

struct Pending {
    orig_id: [u8; 2],
    port: PortId,
    client_mac: Mac,
    /// The gateway address the query was sent to (IPv4, or one of its IPv6 addresses): the
    /// answer comes back from it, to the client's address of the same family.
    server_ip: IpAddr,
    client_ip: IpAddr,
    client_port: u16,
    sent: Instant,
    /// Where the query went: the answer must come from there, to that socket.
    upstream: SocketAddr,
    socket: u64,
    /// The question as sent (name, type, class): the answer must carry it.
    question: Vec<u8>,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<u16, Pending>,
    /// Every pending id, oldest first (for expiry).
    order: VecDeque<u16>,
    /// Each port's pending ids, oldest first (for its share).
    by_port: HashMap<PortId, VecDeque<u16>>,
}

impl Table {
    /// A random query id that is not in use.
    fn next_id(&self) -> u16 {
        loop {
            let id = rand::random::<u16>();
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    fn remove(&mut self, id: u16) -> Option<Pending> {
        let p = self.by_id.remove(&id)?;
        self.order.retain(|&x| x != id);
        if let Some(q) = self.by_port.get_mut(&p.port) {
            q.retain(|&x| x != id);
            if q.is_empty() {
                self.by_port.remove(&p.port);
            }
        }
        Some(p)
    }

    /// Makes room for one more query from `port`: its own oldest at its share; else, with
    /// the table full, the oldest of the port holding the most.
    fn make_room(&mut self, port: PortId) -> bool {
        let victim = if self.by_port.get(&port).is_some_and(|q| q.len() >= PORT_SHARE) {
            Some(port)
        } else if self.by_id.len() >= MAX_PENDING {
            self.by_port.iter().max_by_key(|(_, q)| q.len()).map(|(&p, _)| p)
        } else {
            None
        };
        let Some(victim) = victim else { return false };
        match self.by_port.get(&victim).and_then(|q| q.front().copied()) {
            Some(old) => self.remove(old).is_some(),
            None => false,
        }
    }
}

/// A socket queries leave from.
struct Sock {
    serial: u64,
    socket: Arc<UdpSocket>,
    queries: u32,
    opened: Instant,
}

#[derive(Default)]
struct Sockets {
    live: Vec<Sock>,
    /// Replaced sockets, still read until their queries' answers are late.
    retiring: VecDeque<(Sock, Instant)>,
    next_serial: u64,
}

impl Sockets {
    fn open(&mut self) -> std::io::Result<Sock> {
        // Port 0: Linux picks a free ephemeral port at random for UDP.
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_nonblocking(true)?;
        self.next_serial += 1;
        Ok(Sock { serial: self.next_serial, socket: Arc::new(socket), queries: 0, opened: Instant::now() })
    }
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    table: Mutex<Table>,
    sockets: Mutex<Sockets>,
    /// Queries dropped to make room for newer ones.
    pub evicted: AtomicU64,
    /// Datagrams on the forwarding sockets that are not an answer to a pending query (wrong
    /// sender, id or question): dropped.
    pub bad_answers: AtomicU64,
}

/// Upstream resolvers from resolv.conf text (IPv4 only: the forwarding sockets are IPv4).
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::new(ip.into(), DNS_PORT))
        .collect()
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>) -> std::io::Result<Option<Forwarder>> {
        let upstreams: Vec<SocketAddr> = upstreams.into_iter().filter(|a| a.is_ipv4()).collect();
        if upstreams.is_empty() {
            return Ok(None);
        }
        let mut sockets = Sockets::default();
        for _ in 0..SOCKETS {
            let s = sockets.open()?;
            sockets.live.push(s);
        }
        Ok(Some(Forwarder {
            upstreams,
            table: Mutex::new(Table::default()),
            sockets: Mutex::new(sockets),
            evicted: AtomicU64::new(0),
            bad_answers: AtomicU64::new(0),
        }))
    }

    /// Sends a guest's query upstream under a new id, remembering where the answer goes:
    /// `(server_ip, client_ip)` are the query's destination (a gateway address) and source.
    pub fn forward(&self, query: &[u8], port: PortId, client_mac: Mac, (server_ip, client_ip): (IpAddr, IpAddr), client_port: u16) {
        let Some(q) = parse_question(query) else { return };
        let (serial, socket) = {
            let mut s = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
            let n = s.live.len();
            if n == 0 {
                return;
            }
            let sock = &mut s.live[rand::random_range(0..n)];
            sock.queries += 1;
            (sock.serial, sock.socket.clone())
        };
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        while t.make_room(port) {
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = t.next_id();
        let mut msg = query.to_vec();
        msg[0..2].copy_from_slice(&id.to_be_bytes());
        // The first resolver that takes the datagram is the one the answer must come from.
        let Some(&upstream) = self.upstreams.iter().find(|up| socket.send_to(&msg, up).is_ok()) else { return };
        let question = query[12..q.end].to_vec();
        let pending = Pending {
            orig_id: [query[0], query[1]],
            port,
            client_mac,
            server_ip,
            client_ip,
            client_port,
            sent: Instant::now(),
            upstream,
            socket: serial,
            question,
        };
        t.by_id.insert(id, pending);
        t.order.push_back(id);
        t.by_port.entry(port).or_default().push_back(id);
    }

    /// Receives upstream answers and hands them to the guests that asked. Runs for the life
    /// of the network on its own thread.
    pub fn run(self: Arc<Self>, mut inject: Inject, gw: Gateway) {
        let (mut frame, mut buf) = (Vec::new(), vec![0u8; 65536]);
        let mtu = inject.network().mtu as usize;
        while !inject.stopped() {
            self.rotate();
            self.receive(Duration::from_secs(1), &mut buf, &mut |p, answer| {
                // No IP fragmentation here: an answer that does not fit the MTU goes back
                // truncated (TC set, header and question only) so the client knows.
                let max = mtu.saturating_sub(if p.client_ip.is_ipv4() { 28 } else { 48 });
                let len = if answer.len() > max { truncate(answer) } else { answer.len() };
                let built = match (p.server_ip, p.client_ip) {
                    (IpAddr::V4(_), IpAddr::V4(client)) => {
                        build_udp(&mut frame, gw.mac, p.client_mac, gw.ip, client, DNS_PORT, p.client_port, &answer[..len])
                    }
                    (IpAddr::V6(server), IpAddr::V6(client)) => {
                        build_udp6(&mut frame, gw.mac, p.client_mac, server, client, DNS_PORT, p.client_port, &answer[..len])
                    }
                    _ => false,
                };
                if built {
                    inject.send_to_port(p.port, &frame);
                }
            });
            self.expire();
        }
    }

    /// Waits up to `timeout` for answers on the forwarding sockets (read into `buf`); each
    /// that answers a pending query goes to `deliver` with the client's id put back.
    fn receive(&self, timeout: Duration, buf: &mut [u8], deliver: &mut dyn FnMut(Pending, &mut [u8])) {
        let socks: Vec<(u64, Arc<UdpSocket>)> = {
            let s = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
            s.live.iter().chain(s.retiring.iter().map(|(r, _)| r)).map(|s| (s.serial, s.socket.clone())).collect()
        };
        let mut fds: Vec<libc::pollfd> =
            socks.iter().map(|(_, s)| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: `fds` is a valid array of pollfd for its length; the sockets outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.as_millis() as libc::c_int) };
        if n <= 0 {
            return;
        }
        for ((serial, socket), fd) in socks.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            // A bounded number per wakeup, so one busy socket does not starve the others.
            for _ in 0..64 {
                let Ok((n, from)) = socket.recv_from(buf) else { break };
                match self.take(*serial, from, &buf[..n]) {
                    Some(p) => {
                        let answer = &mut buf[..n];
                        answer[0..2].copy_from_slice(&p.orig_id);
                        deliver(p, answer);
                    }
                    None => {
                        self.bad_answers.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// The pending query `answer` (received on socket `serial` from `from`) answers, taken
    /// out of the table; None if it answers none.
    fn take(&self, serial: u64, from: SocketAddr, answer: &[u8]) -> Option<Pending> {
        if answer.len() < 12 || answer[2] & 0x80 == 0 {
            return None;
        }
        let q = parse_question(answer)?;
        let id = u16::from_be_bytes([answer[0], answer[1]]);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let p = t.by_id.get(&id)?;
        if p.socket != serial || p.upstream != from || !p.question.eq_ignore_ascii_case(&answer[12..q.end]) {
            return None;
        }
        t.remove(id)
    }

    /// Replaces sockets that have served long enough with new ones on new random ports; the
    /// old ones are read until their answers would be late, then closed.
    fn rotate(&self) {
        let mut s = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while s.retiring.front().is_some_and(|(_, since)| now.duration_since(*since) > QUERY_TIMEOUT) {
            s.retiring.pop_front();
        }
        for i in 0..s.live.len() {
            let old = &s.live[i];
            if old.queries < ROTATE_AFTER_QUERIES && old.opened.elapsed() < ROTATE_AFTER {
                continue;
            }
            let Ok(new) = s.open() else { continue };
            let old = std::mem::replace(&mut s.live[i], new);
            s.retiring.push_back((old, now));
        }
        // Bounded: under a flood the oldest replaced sockets close early (their queries are
        // then answered by the client's retry).
        while s.retiring.len() > 2 * SOCKETS {
            s.retiring.pop_front();
        }
    }

    fn expire(&self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&old) = t.order.front() {
            if t.by_id.get(&old).is_some_and(|p| p.sent.elapsed() < QUERY_TIMEOUT) {
                break;
            }
            if t.remove(old).is_none() {
                t.order.pop_front();
            }
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).by_id.len()
    }

    #[cfg(test)]
    fn pending_of(&self, port: PortId) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).by_id.values().filter(|p| p.port == port).count()
    }
}

/// Keeps the header and the question of a DNS message, sets TC and zeroes the other counts.
fn truncate(m: &mut [u8]) -> usize {
    let end = vunet_dhcp::dns::parse_question(m).map(|q| q.end).unwrap_or(12);
    m[2] |= 0x02;
    m[6..12].copy_from_slice(&[0; 6]);
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [2, 0, 0, 0, 0, 1];
    /// The gateway address asked, and the client's.
    const CLIENT: (IpAddr, IpAddr) = (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));

    /// An upstream on loopback that never answers by itself.
    fn silent() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    #[test]
    fn resolv_conf_parsing() {
        let t = "# comment\nnameserver 10.0.0.53\nnameserver  fe80::1\nsearch lab\nnameserver 127.0.0.53\n";
        assert_eq!(resolv_conf_servers(t), vec!["10.0.0.53:53".parse().unwrap(), "127.0.0.53:53".parse().unwrap()]);
        assert!(Forwarder::new(vec![]).unwrap().is_none(), "no upstream, no forwarder");
    }

    #[test]
    fn one_port_cannot_evict_another_ports_queries() {
        let up = silent();
        let f = Forwarder::new(vec![up.local_addr().unwrap()]).unwrap().unwrap();
        let q = vunet_dhcp::dns::build_query(1, "example.org", 1);
        for i in 0..3 {
            f.forward(&q, 1, MAC, CLIENT, 1000 + i);
        }
        // Port 0 floods: it only ever pushes out its own queries.
        for i in 0..2000u16 {
            f.forward(&q, 0, MAC, CLIENT, 2000 + i);
        }
        assert_eq!(f.pending_of(1), 3, "the other port's queries are still waiting");
        assert_eq!(f.pending_of(0), PORT_SHARE);
        // Many busy ports: the table stays bounded, and each port within its share.
        for i in 0..3000u16 {
            f.forward(&q, 2 + (i % 6) as usize, MAC, CLIENT, i);
        }
        assert!(f.pending() <= MAX_PENDING, "{}", f.pending());
        assert!((0..8).all(|p| f.pending_of(p) <= PORT_SHARE));
        // Every query went upstream under an id of vunet's choosing, the rest unchanged.
        let mut buf = [0u8; 512];
        let (n, _) = up.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[2..n], &q[2..]);
    }

    #[test]
    fn queries_leave_from_random_rotating_ports_under_random_ids() {
        let up = silent();
        let f = Forwarder::new(vec![up.local_addr().unwrap()]).unwrap().unwrap();
        let q = vunet_dhcp::dns::build_query(7, "example.org", 1);
        let (mut ports, mut ids) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        let mut buf = [0u8; 512];
        for i in 0..400u16 {
            f.forward(&q, 0, MAC, CLIENT, i);
            if i % 10 == 0 {
                f.rotate();
            }
            let (_, from) = up.recv_from(&mut buf).unwrap();
            ports.insert(from.port());
            ids.insert(u16::from_be_bytes([buf[0], buf[1]]));
        }
        // Four sockets at a time, each replaced after 32 queries (about 15 ports in all; four
        // without the rotation, one before it).
        assert!(ports.len() >= 8, "source ports: {ports:?}");
        assert!(ids.len() >= 390, "ids repeat: {} distinct of 400", ids.len());
        assert!(f.sockets.lock().unwrap().retiring.len() <= 2 * SOCKETS, "replaced sockets are closed");
    }

    #[test]
    fn answers_count_only_from_the_resolver_and_socket_the_query_went_to() {
        let (up, other) = (silent(), silent());
        let f = Forwarder::new(vec![up.local_addr().unwrap(), other.local_addr().unwrap()]).unwrap().unwrap();
        let q = vunet_dhcp::dns::build_query(0x4242, "example.org", 1);
        f.forward(&q, 3, MAC, CLIENT, 5353);
        let mut buf = [0u8; 512];
        let (n, source) = up.recv_from(&mut buf).unwrap();
        let mut answer = buf[..n].to_vec();
        answer[2] |= 0x80;
        let got = |f: &Forwarder| {
            let mut out = Vec::new();
            f.receive(Duration::from_millis(300), &mut [0; 65536], &mut |p, a| out.push((p.client_port, a.to_vec())));
            out
        };
        // The right id and question, from another resolver (also a configured one).
        other.send_to(&answer, source).unwrap();
        assert!(got(&f).is_empty());
        // From the right resolver, with another question.
        let mut wrong = vunet_dhcp::dns::build_query(0, "example.net", 1);
        wrong[0..2].copy_from_slice(&answer[0..2]);
        wrong[2] |= 0x80;
        up.send_to(&wrong, source).unwrap();
        assert!(got(&f).is_empty());
        // From the right resolver to another of vunet's sockets.
        let sockets: Vec<Arc<UdpSocket>> = f.sockets.lock().unwrap().live.iter().map(|s| s.socket.clone()).collect();
        for s in sockets.iter().filter(|s| s.local_addr().unwrap().port() != source.port()) {
            up.send_to(&answer, ("127.0.0.1", s.local_addr().unwrap().port())).unwrap();
        }
        assert!(got(&f).is_empty());
        assert_eq!(f.bad_answers.load(Ordering::Relaxed), 2 + (SOCKETS as u64 - 1));
        // The real answer still finds its client, under the client's id.
        up.send_to(&answer, source).unwrap();
        let out = got(&f);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, &out[0].1[0..2]), (5353, &[0x42, 0x42][..]));
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn an_ipv6_client_gets_its_answer_from_the_address_it_asked() {
        let up = silent();
        let f = Forwarder::new(vec![up.local_addr().unwrap()]).unwrap().unwrap();
        let server: IpAddr = "fe80::76:75ff:fe00:1".parse().unwrap();
        let client: IpAddr = "fd00:7675:1::20".parse().unwrap();
        let q = vunet_dhcp::dns::build_query(9, "example.org", 28);
        f.forward(&q, 2, MAC, (server, client), 4000);
        let mut buf = [0u8; 512];
        let (n, source) = up.recv_from(&mut buf).unwrap();
        let mut answer = buf[..n].to_vec();
        answer[2] |= 0x80;
        up.send_to(&answer, source).unwrap();
        let mut out = Vec::new();
        f.receive(Duration::from_millis(1000), &mut [0; 65536], &mut |p, _| out.push((p.server_ip, p.client_ip, p.client_port, p.port)));
        assert_eq!(out, vec![(server, client, 4000, 2)]);
    }
}
