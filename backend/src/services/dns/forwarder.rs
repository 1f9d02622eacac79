//! Forwarding over UDP: names outside the network go to upstream resolvers (the configured
//! `forwarders`, else the host's /etc/resolv.conf), with a bounded table of outstanding
//! queries that expire. Answers come back on the forwarder's own thread and enter the data
//! path through `Inject`.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vunet_dhcp::dns::PORT as DNS_PORT;
use vunet_switch::gateway::{build_udp, Gateway};
use vunet_switch::{Mac, PortId};

use crate::datapath::Inject;

/// At most this many queries wait for upstream answers per network; the oldest is dropped
/// to make room (its client retries).
pub const MAX_PENDING: usize = 512;
/// An upstream answer later than this is dropped.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

struct Pending {
    orig_id: [u8; 2],
    port: PortId,
    client_mac: Mac,
    client_ip: Ipv4Addr,
    client_port: u16,
    sent: Instant,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<u16, Pending>,
    order: VecDeque<u16>,
    seed: u64,
}

impl Table {
    /// A fresh, unpredictable-enough query id that is not in use.
    fn next_id(&mut self) -> u16 {
        loop {
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            let id = (self.seed >> 24) as u16;
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }
}

pub struct Forwarder {
    socket: UdpSocket,
    upstreams: Vec<SocketAddr>,
    table: Mutex<Table>,
}

/// Upstream resolvers from resolv.conf text (IPv4 only: the forwarding socket is IPv4).
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
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x9e37) | 1;
        Ok(Some(Forwarder { socket, upstreams, table: Mutex::new(Table { seed, ..Default::default() }) }))
    }

    /// Sends a guest's query upstream under a new id, remembering where the answer goes.
    pub fn forward(&self, query: &[u8], port: PortId, client_mac: Mac, client_ip: Ipv4Addr, client_port: u16) {
        if query.len() < 12 {
            return;
        }
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        while t.by_id.len() >= MAX_PENDING {
            match t.order.pop_front() {
                Some(old) => {
                    t.by_id.remove(&old);
                }
                None => break,
            }
        }
        let id = t.next_id();
        t.by_id.insert(id, Pending { orig_id: [query[0], query[1]], port, client_mac, client_ip, client_port, sent: Instant::now() });
        t.order.push_back(id);
        drop(t);
        let mut q = query.to_vec();
        q[0..2].copy_from_slice(&id.to_be_bytes());
        for up in &self.upstreams {
            if self.socket.send_to(&q, up).is_ok() {
                return;
            }
        }
    }

    /// Receives upstream answers and hands them to the guests that asked. Runs for the life
    /// of the network on its own thread.
    pub fn run(self: Arc<Self>, mut inject: Inject, gw: Gateway) {
        let mut buf = vec![0u8; 65536];
        let mut frame = Vec::new();
        let mtu = inject.network().mtu as usize;
        while !inject.stopped() {
            let got = self.socket.recv_from(&mut buf);
            self.expire();
            let Ok((n, from)) = got else { continue };
            if n < 12 || !self.upstreams.contains(&from) {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let Some(p) = self.take(id) else { continue };
            let answer = &mut buf[..n];
            answer[0..2].copy_from_slice(&p.orig_id);
            // No IP fragmentation here: an answer that does not fit the MTU goes back
            // truncated (TC set, header and question only) so the client knows.
            let max = mtu - 28;
            let len = if n > max { truncate(answer) } else { n };
            if build_udp(&mut frame, gw.mac, p.client_mac, gw.ip, p.client_ip, DNS_PORT, p.client_port, &answer[..len]) {
                inject.send_to_port(p.port, &frame);
            }
        }
    }

    fn take(&self, id: u16) -> Option<Pending> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let p = t.by_id.remove(&id)?;
        t.order.retain(|&x| x != id);
        Some(p)
    }

    fn expire(&self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&old) = t.order.front() {
            if t.by_id.get(&old).is_some_and(|p| p.sent.elapsed() < QUERY_TIMEOUT) {
                break;
            }
            t.order.pop_front();
            t.by_id.remove(&old);
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).by_id.len()
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

    #[test]
    fn resolv_conf_parsing() {
        let t = "# comment\nnameserver 10.0.0.53\nnameserver  fe80::1\nsearch lab\nnameserver 127.0.0.53\n";
        assert_eq!(resolv_conf_servers(t), vec!["10.0.0.53:53".parse().unwrap(), "127.0.0.53:53".parse().unwrap()]);
    }

    #[test]
    fn outstanding_queries_are_bounded() {
        // An upstream on loopback that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = Forwarder::new(vec![silent.local_addr().unwrap()]).unwrap().unwrap();
        let q = vunet_dhcp::dns::build_query(1, "example.org", 1);
        for i in 0..2000u16 {
            f.forward(&q, 0, [2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 0, 0, 7), 1000 + i);
        }
        assert_eq!(f.pending(), MAX_PENDING);
        // Every query went upstream under an id of vunet's choosing.
        let mut buf = [0u8; 512];
        silent.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let (n, _) = silent.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[2..n], &q[2..]);
        assert!(Forwarder::new(vec![]).unwrap().is_none(), "no upstream, no forwarder");
    }
}
