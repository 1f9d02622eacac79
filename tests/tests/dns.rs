//! DNS on the gateway, seen from simulated guests: local names from DHCP and configuration,
//! reverse lookups, NXDOMAIN, and forwarding to an upstream resolver (a fake one on loopback).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vunet_dhcp::dns::{build_query, ip6_arpa, read_answers, read_answers_all, QTYPE_A, QTYPE_AAAA, QTYPE_PTR};
use vunet_dhcp::message::{build_client_message, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, gateway_mac, link_local, slaac, udp_payload};
use vunet_switch::udp6::udp6_datagram;
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// A fake upstream resolver on loopback: answers every A query with 192.0.2.1 until told to
/// stop (not until an idle time passes, which a slow run could exceed before the one query
/// comes); its thread returns how many queries it answered.
fn fake_upstream() -> (u16, Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Only how often the thread looks at the stop flag.
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let port = s.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut served = 0;
        loop {
            // Stops once told to and nothing more is waiting in the socket.
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                if stopped.load(Ordering::Acquire) {
                    break;
                }
                continue;
            };
            let mut r = buf[..n].to_vec();
            r[2] |= 0x80; // response
            r[7] = 1; // one answer
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
            served += 1;
            s.send_to(&r, from).unwrap();
        }
        served
    });
    (port, stop, h)
}

fn query(vm: &mut VmSim, src_ip: Ipv4Addr, id: u16, name: &str, qtype: u16) -> (u16, Vec<Ipv4Addr>, Vec<String>) {
    query_from(vm, A, src_ip, id, name, qtype)
}

fn query_from(vm: &mut VmSim, mac: [u8; 6], src_ip: Ipv4Addr, id: u16, name: &str, qtype: u16) -> (u16, Vec<Ipv4Addr>, Vec<String>) {
    let mut f = Vec::new();
    build_udp(&mut f, mac, gateway_mac("test"), src_ip, GW, 40000, 53, &build_query(id, name, qtype));
    vm.send(&f);
    loop {
        let (_, f) = vm.recv(T).unwrap_or_else(|| panic!("no answer for {name}"));
        if let Some((src, payload)) = udp_payload(&f, 40000) {
            assert_eq!(src, GW);
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), id, "the client's id");
            return read_answers(payload).expect("well-formed answer");
        }
    }
}

#[test]
fn local_names_reverse_lookups_nxdomain_and_forwarding() {
    let (up_port, stop_upstream, upstream) = fake_upstream();
    let dir = TempDir::new("dns");
    let extra = format!(
        "[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\nhosts = [{{ mac = \"52:54:00:00:00:10\", ip = \"10.0.0.10\", name = \"web\" }}]\n[network.dns]\ndomain = \"lab\"\nhosts = [{{ name = \"files\", ip = \"10.0.0.50\" }}]\nforwarders = [\"127.0.0.1:{up_port}\"]\n"
    );
    let (d, socks) = start_network_with(dir.path(), 1, "", &extra);
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");

    // The guest takes a lease under the name "alpha".
    let mut ip = None;
    for (t, req) in [(MessageType::Discover, false), (MessageType::Request, true)] {
        let msg = build_client_message(t, A, 9, if req { ip } else { None }, req.then_some(GW), Some("alpha"));
        let mut f = Vec::new();
        build_udp(&mut f, A, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
        vm.send(&f);
        let reply = std::iter::from_fn(|| vm.recv(T)).find_map(|(_, f)| udp_payload(&f, CLIENT_PORT).map(|(_, p)| p.to_vec())).unwrap();
        ip = reply_yiaddr(&reply);
    }
    let me = ip.unwrap();

    assert_eq!(query(&mut vm, me, 1, "alpha", QTYPE_A), (0, vec![me], vec![]), "a DHCP client's name");
    assert_eq!(query(&mut vm, me, 2, "alpha.lab", QTYPE_A), (0, vec![me], vec![]));
    assert_eq!(query(&mut vm, me, 3, "web.lab", QTYPE_A), (0, vec![Ipv4Addr::new(10, 0, 0, 10)], vec![]), "a static DHCP host");
    assert_eq!(query(&mut vm, me, 4, "files", QTYPE_A), (0, vec![Ipv4Addr::new(10, 0, 0, 50)], vec![]), "a dns.hosts entry");
    assert_eq!(query(&mut vm, me, 5, "nosuch", QTYPE_A).0, 3, "NXDOMAIN");
    assert_eq!(query(&mut vm, me, 6, "nosuch.lab", QTYPE_A).0, 3, "NXDOMAIN");
    let o = me.octets();
    let rev = format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
    assert_eq!(query(&mut vm, me, 7, &rev, QTYPE_PTR), (0, vec![], vec!["alpha.lab".to_string()]));
    // Not ours: forwarded upstream, answered under the client's own id.
    assert_eq!(query(&mut vm, me, 0x4242, "example.org", QTYPE_A), (0, vec![Ipv4Addr::new(192, 0, 2, 1)], vec![]));
    // Stop vunet first, so nothing it could still send upstream is missed.
    drop(d);
    stop_upstream.store(true, Ordering::Release);
    assert_eq!(upstream.join().unwrap(), 1, "exactly the one outside name went upstream");
}

/// DISCOVER and REQUEST from `mac` under host name `name`; the address leased.
fn lease(vm: &mut VmSim, mac: [u8; 6], name: &str) -> Ipv4Addr {
    let mut ip = None;
    for (t, req) in [(MessageType::Discover, false), (MessageType::Request, true)] {
        let msg = build_client_message(t, mac, 9, if req { ip } else { None }, req.then_some(GW), Some(name));
        let mut f = Vec::new();
        build_udp(&mut f, mac, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
        vm.send(&f);
        let reply = std::iter::from_fn(|| vm.recv(T)).find_map(|(_, f)| udp_payload(&f, CLIENT_PORT).map(|(_, p)| p.to_vec())).unwrap();
        ip = reply_yiaddr(&reply);
    }
    ip.unwrap()
}

#[test]
fn guests_cannot_take_configured_reserved_or_taken_names() {
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
    const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xc];
    let dir = TempDir::new("dns-names");
    let extra = "[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\nhosts = [{ mac = \"52:54:00:00:00:10\", ip = \"10.0.0.10\", name = \"web\" }]\n[network.dns]\nhosts = [{ name = \"files\", ip = \"10.0.0.50\" }]\nforwarders = []\n";
    let (d, socks) = start_network_with(dir.path(), 3, "", extra);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    for vm in &mut vms {
        vm.post_rx(QUEUE_SIZE);
    }
    wait_network_ready(&d, "test");
    let [a, b, c] = &mut vms[..] else { unreachable!() };
    let ip_a = lease(a, A, "alpha");
    let ip_b = lease(b, B, "alpha");
    let ip_c = lease(c, C, "files");
    assert_eq!(query_from(a, A, ip_a, 1, "alpha", QTYPE_A), (0, vec![ip_a], vec![]), "the first holder keeps its name");
    assert_eq!(query_from(c, C, ip_c, 2, "files", QTYPE_A), (0, vec![Ipv4Addr::new(10, 0, 0, 50)], vec![]), "dns.hosts wins");
    let o = ip_b.octets();
    let rev = format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
    assert_eq!(query_from(b, B, ip_b, 3, &rev, QTYPE_PTR).0, 3, "the second guest has no name");
    // Names that steer others' traffic, and the static host's.
    for (i, name) in ["wpad", "isatap", "web"].iter().enumerate() {
        let ip = lease(c, C, name);
        assert!(!query_from(c, C, ip, 10 + i as u16, name, QTYPE_A).1.contains(&ip), "{name}");
    }
}

/// A query over UDP/IPv6 from `src` (MAC A) to the gateway address `to`; the answer's
/// (rcode, AAAA, PTR), checked to come from `to` over IPv6 under the client's id.
fn query6(vm: &mut VmSim, src: Ipv6Addr, to: Ipv6Addr, id: u16, name: &str, qtype: u16) -> (u16, Vec<Ipv6Addr>, Vec<String>) {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(A, gateway_mac("test"))
        .ipv6(src.octets(), to.octets(), 64)
        .udp(40000, 53)
        .write(&mut f, &build_query(id, name, qtype))
        .unwrap();
    vm.send(&f);
    loop {
        let (_, f) = vm.recv(T).unwrap_or_else(|| panic!("no answer for {name}"));
        if let Some(d) = udp6_datagram(&f, 40000) {
            assert_eq!((d.src, d.dst, d.sport), (to, src, 53));
            assert_eq!(u16::from_be_bytes([d.payload[0], d.payload[1]]), id, "the client's id");
            let (rcode, _, aaaa, ptr) = read_answers_all(d.payload).expect("well-formed answer");
            return (rcode, aaaa, ptr);
        }
    }
}

#[test]
fn over_ipv6_local_names_answer_aaaa_and_outside_names_are_forwarded() {
    let (up_port, stop_upstream, upstream) = fake_upstream();
    let dir = TempDir::new("dns6");
    let toml = format!(
        "[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\ngateway6 = \"fd00:7675:1::1/64\"\n\
         [[network.port]]\nname = \"p0\"\nsocket = \"p0.sock\"\n[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\n\
         [network.dns]\ndomain = \"lab\"\nhosts = [{{ name = \"six\", ip = \"fd00:7675:1::66\" }}]\nforwarders = [\"127.0.0.1:{up_port}\"]\n"
    );
    let d = vunet::Daemon::start(&vunet::Config::parse(&toml, "test.toml", dir.path()).expect("config")).expect("start");
    let mut vm = VmSim::connect(&dir.path().join("p0.sock"), SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");
    lease(&mut vm, A, "alpha");
    let gw6 = d.network("test").unwrap().gateway6.expect("gateway6");
    let me = slaac(Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0), &A);
    for to in [gw6.ip, gw6.link_local] {
        let src = if to.is_unicast_link_local() { link_local(&A) } else { me };
        assert_eq!(query6(&mut vm, src, to, 1, "alpha.lab", QTYPE_AAAA), (0, vec![me], vec![]), "a DHCP client at its SLAAC address");
        assert_eq!(query6(&mut vm, src, to, 2, "six", QTYPE_AAAA).1, vec!["fd00:7675:1::66".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(query6(&mut vm, src, to, 3, &ip6_arpa(me), QTYPE_PTR), (0, vec![], vec!["alpha.lab".to_string()]));
        assert_eq!(query6(&mut vm, src, to, 4, "nosuch", QTYPE_AAAA).0, 3);
    }
    // Forwarded, and the answer comes back over IPv6 from the address asked.
    let (rcode, ..) = query6(&mut vm, link_local(&A), gw6.link_local, 0x4343, "example.org", QTYPE_A);
    assert_eq!(rcode, 0);
    // Over TCP too, on both addresses.
    for (src, to) in [(me, gw6.ip), (link_local(&A), gw6.link_local)] {
        let mut msg = Vec::new();
        let q = build_query(9, "alpha", QTYPE_AAAA);
        msg.extend_from_slice(&(q.len() as u16).to_be_bytes());
        msg.extend_from_slice(&q);
        let a = TcpClient::exchange_with(&mut vm, src.into(), to.into(), 5300, &msg).expect("an answer over TCP");
        assert_eq!(read_answers_all(&a).map(|(r, _, aaaa, _)| (r, aaaa)), Some((0, vec![me])), "TCP to {to}");
    }
    drop(d);
    stop_upstream.store(true, Ordering::Release);
    assert_eq!(upstream.join().unwrap(), 1, "the one outside name went upstream");
}

#[test]
fn without_an_upstream_outside_names_are_refused() {
    let dir = TempDir::new("dns-refused");
    let (d, socks) = start_network_with(dir.path(), 1, "", "[network.dns]\nforwarders = []\n");
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");
    assert_eq!(query(&mut vm, Ipv4Addr::new(10, 0, 0, 7), 1, "example.org", QTYPE_A).0, 5, "REFUSED");
}

/// A minimal TCP client for one DNS exchange, built on raw frames so the test sees exactly
/// what the gateway sends: handshake, one length-prefixed query, the answer (possibly in
/// several segments), then FIN.
struct TcpClient {
    mac: [u8; 6],
    ip: IpAddr,
    /// The gateway address it talks to (GW unless over IPv6).
    gw: IpAddr,
    port: u16,
    seq: u32,
    ack: u32,
}

impl TcpClient {
    fn segment(&self, vm: &mut VmSim, flags: &str, payload: &[u8]) {
        let eth = etherparse::PacketBuilder::ethernet2(self.mac, gateway_mac("test"));
        let ip = match (self.ip, self.gw) {
            (IpAddr::V6(me), IpAddr::V6(gw)) => eth.ipv6(me.octets(), gw.octets(), 64),
            (IpAddr::V4(me), IpAddr::V4(gw)) => eth.ipv4(me.octets(), gw.octets(), 64),
            _ => unreachable!("one family"),
        };
        let mut b = ip.tcp(self.port, 53, self.seq, 64000);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('A') {
            b = b.ack(self.ack);
        }
        if flags.contains('F') {
            b = b.fin();
        }
        if flags.contains('R') {
            b = b.rst();
        }
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        vm.send(&f);
    }

    /// The next TCP segment from the gateway to this client: (syn, fin, rst, seq, payload).
    fn next(&self, vm: &mut VmSim) -> Option<(bool, bool, bool, u32, Vec<u8>)> {
        loop {
            let (_, f) = vm.recv(T)?;
            let Ok(p) = etherparse::SlicedPacket::from_ethernet(&f) else { continue };
            if let Some(etherparse::TransportSlice::Tcp(t)) = p.transport {
                if t.destination_port() == self.port {
                    return Some((t.syn(), t.fin(), t.rst(), t.sequence_number(), t.payload().to_vec()));
                }
            }
        }
    }

    /// Opens a connection from `mac`: None if the gateway answers the SYN with a reset.
    fn open(vm: &mut VmSim, mac: [u8; 6], ip: Ipv4Addr, port: u16) -> Option<TcpClient> {
        let mut c = TcpClient { mac, ip: ip.into(), gw: GW.into(), port, seq: 1000, ack: 0 };
        c.segment(vm, "S", &[]);
        let (syn, _, rst, seq, _) = c.next(vm).expect("an answer to the SYN");
        if rst {
            return None;
        }
        assert!(syn, "SYN-ACK");
        (c.seq, c.ack) = (c.seq + 1, seq.wrapping_add(1));
        c.segment(vm, "A", &[]);
        Some(c)
    }

    /// Sends one length-prefixed query on an open connection.
    fn send_query(&mut self, vm: &mut VmSim, query: &[u8]) {
        let mut msg = (query.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(query);
        self.segment(vm, "A", &msg);
        self.seq += msg.len() as u32;
    }

    /// Connects, sends `query`, reads one answer and closes. None if the gateway reset the
    /// connection.
    fn exchange(vm: &mut VmSim, ip: Ipv4Addr, port: u16, query: &[u8]) -> Option<Vec<u8>> {
        let mut msg = (query.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(query);
        TcpClient::exchange_raw(vm, ip, port, &msg)
    }

    /// As `exchange`, with the bytes sent as they are (no length prefix added).
    fn exchange_raw(vm: &mut VmSim, ip: Ipv4Addr, port: u16, msg: &[u8]) -> Option<Vec<u8>> {
        TcpClient::exchange_with(vm, ip.into(), GW.into(), port, msg)
    }

    /// As `exchange_raw`, from `ip` to the gateway's address `gw` (IPv4 or IPv6).
    fn exchange_with(vm: &mut VmSim, ip: IpAddr, gw: IpAddr, port: u16, msg: &[u8]) -> Option<Vec<u8>> {
        let mut c = TcpClient { mac: A, ip, gw, port, seq: 1000, ack: 0 };
        c.segment(vm, "S", &[]);
        let (syn, _, rst, seq, _) = c.next(vm).expect("SYN-ACK");
        assert!(syn && !rst, "the gateway accepts the connection");
        (c.seq, c.ack) = (c.seq + 1, seq.wrapping_add(1));
        c.segment(vm, "A", msg);
        c.seq += msg.len() as u32;
        let mut stream = Vec::new();
        let mut gateway_closed = false;
        loop {
            let (_, fin, rst, seq, payload) = c.next(vm).expect("the answer arrives");
            if rst {
                return None;
            }
            if seq == c.ack && !payload.is_empty() {
                stream.extend_from_slice(&payload);
                c.ack = c.ack.wrapping_add(payload.len() as u32);
                c.segment(vm, "A", &[]);
            }
            if fin {
                c.ack = c.ack.wrapping_add(1);
                gateway_closed = true;
                break;
            }
            if stream.len() >= 2 && stream.len() >= 2 + u16::from_be_bytes([stream[0], stream[1]]) as usize {
                break;
            }
        }
        c.segment(vm, "AF", &[]);
        c.seq += 1;
        // The gateway closes its side in turn: acknowledge that as a real client does, so the
        // connection is gone at once (a half-closed one still counts to the port's share).
        while !gateway_closed {
            let Some((_, fin, rst, seq, payload)) = c.next(vm) else { break };
            if rst {
                break;
            }
            if fin {
                c.ack = seq.wrapping_add(payload.len() as u32).wrapping_add(1);
                c.segment(vm, "A", &[]);
                gateway_closed = true;
            }
        }
        assert!(stream.len() >= 2, "a length-prefixed answer");
        let len = u16::from_be_bytes([stream[0], stream[1]]) as usize;
        assert_eq!(stream.len(), 2 + len, "exactly one message");
        Some(stream[2..].to_vec())
    }
}

/// A fake upstream on loopback, on the same port over UDP and TCP, whose A answers hold 120
/// addresses: about 2 KB, more than one datagram on a 1500-byte MTU.
fn big_upstream() -> u16 {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
            break (udp, tcp);
        }
    };
    fn answer(q: &[u8]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[6..8].copy_from_slice(&120u16.to_be_bytes());
        for i in 0..120u8 {
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, i]);
        }
        r
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&answer(&buf[..n]), from);
        }
    });
    let port = tcp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in tcp.incoming().flatten() {
            let mut len = [0u8; 2];
            let _ = s.read_exact(&mut len);
            let mut q = vec![0; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut q).is_ok() {
                let a = answer(&q);
                let mut m = (a.len() as u16).to_be_bytes().to_vec();
                m.extend_from_slice(&a);
                let _ = s.write_all(&m);
            }
        }
    });
    port
}

#[test]
fn large_answers_come_truncated_over_udp_and_whole_over_tcp() {
    let up_port = big_upstream();
    let dir = TempDir::new("dns-tcp");
    let extra = format!(
        "[network.dns]\ndomain = \"lab\"\nhosts = [{{ name = \"files\", ip = \"10.0.0.50\" }}]\nforwarders = [\"127.0.0.1:{up_port}\"]\n"
    );
    let (d, socks) = start_network_with(dir.path(), 1, "", &extra);
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");
    let me = Ipv4Addr::new(10, 0, 0, 7);

    // Over UDP the 2 KB answer does not fit: TC set, no records.
    let mut f = Vec::new();
    build_udp(&mut f, A, gateway_mac("test"), me, GW, 40000, 53, &build_query(9, "big.example", QTYPE_A));
    vm.send(&f);
    let udp_answer = std::iter::from_fn(|| vm.recv(T)).find_map(|(_, f)| udp_payload(&f, 40000).map(|(_, p)| p.to_vec())).unwrap();
    assert_ne!(udp_answer[2] & 0x02, 0, "TC: truncated");
    assert!(read_answers(&udp_answer).unwrap().1.is_empty());

    // Over TCP the client gets all of it (forwarded upstream over TCP), in several segments.
    let whole = TcpClient::exchange(&mut vm, me, 41000, &build_query(10, "big.example", QTYPE_A)).expect("answer over TCP");
    assert_eq!(u16::from_be_bytes([whole[0], whole[1]]), 10, "the client's id");
    let (rcode, addrs, _) = read_answers(&whole).unwrap();
    assert_eq!(rcode, 0);
    assert_eq!(addrs.len(), 120);
    assert_eq!(addrs[119], Ipv4Addr::new(198, 51, 100, 119));

    // Local names are answered over TCP too, and several connections in a row work.
    for (i, port) in (41001..41004).enumerate() {
        let a = TcpClient::exchange(&mut vm, me, port, &build_query(20 + i as u16, "files.lab", QTYPE_A)).expect("local answer");
        assert_eq!(read_answers(&a).unwrap(), (0, vec![Ipv4Addr::new(10, 0, 0, 50)], vec![]));
    }

    // Garbage in a DNS-sized message gets an error answer under its id, not a crash.
    let junk = TcpClient::exchange(&mut vm, me, 41010, b"GET / HTTP/1.0\r\n\r\n").expect("an error answer");
    assert_eq!(&junk[0..2], b"GE");
    assert_ne!(junk[3] & 0x0f, 0, "an error rcode");
    // Something that is not DNS at all (an HTTP request read as a 18 KB length): reset.
    assert_eq!(TcpClient::exchange_raw(&mut vm, me, 41011, b"GET / HTTP/1.0\r\n\r\n"), None);
    // And the service still answers afterwards.
    assert!(TcpClient::exchange(&mut vm, me, 41012, &build_query(30, "files", QTYPE_A)).is_some());
}

/// Threads of this process that ask upstream over TCP for the DNS services: named
/// `dns-tcp-…`, except the services' own threads, `dns-tcp-NETWORK` (all networks here are
/// named "test").
fn dns_tcp_helper_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.starts_with("dns-tcp-") && c.trim_end() != "dns-tcp-test")
        .count()
}

#[test]
fn one_port_holds_at_most_two_tcp_connections() {
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
    let dir = TempDir::new("dns-tcp-share");
    let (d, socks) =
        start_network_with(dir.path(), 2, "", "[network.dns]\nhosts = [{ name = \"files\", ip = \"10.0.0.50\" }]\nforwarders = []\n");
    let mut a = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    let mut b = VmSim::connect(&socks[1], SimOptions::full()).unwrap();
    a.post_rx(QUEUE_SIZE);
    b.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 0, 0, 7), Ipv4Addr::new(10, 0, 0, 8));

    let first = TcpClient::open(&mut a, A, ip_a, 42001).expect("a first connection");
    let _second = TcpClient::open(&mut a, A, ip_a, 42002).expect("a second connection");
    assert!(TcpClient::open(&mut a, A, ip_a, 42003).is_none(), "a third connection from the same port is reset");
    assert!(TcpClient::open(&mut a, A, ip_a, 42004).is_none(), "and a fourth");
    // Another port still gets connections, and answers on them.
    let mut c = TcpClient::open(&mut b, B, ip_b, 42010).expect("another port's connection");
    c.send_query(&mut b, &build_query(1, "files", QTYPE_A));
    let (_, _, rst, _, payload) = c.next(&mut b).expect("an answer");
    assert!(!rst);
    assert_eq!(read_answers(&payload[2..]).unwrap().1, vec![Ipv4Addr::new(10, 0, 0, 50)]);
    let _other = TcpClient::open(&mut b, B, ip_b, 42011).expect("its second connection");
    // Once the first port closes one of its connections, it may open another.
    first.segment(&mut a, "RA", &[]);
    let again = std::iter::repeat_with(|| {
        std::thread::sleep(Duration::from_millis(20));
        TcpClient::open(&mut a, A, ip_a, 42005)
    })
    .take(50)
    .find_map(|c| c);
    assert!(again.is_some(), "a connection after closing one");
}

#[test]
fn tcp_queries_upstream_take_a_bounded_pool_of_threads() {
    // An upstream that accepts connections and never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = hung.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().flatten() {
            held.push(s);
        }
    });
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xc];
    let dir = TempDir::new("dns-tcp-pool");
    let extra = format!("[network.dns]\nhosts = [{{ name = \"files\", ip = \"10.0.0.50\" }}]\nforwarders = [\"127.0.0.1:{up_port}\"]\n");
    let (d, socks) = start_network_with(dir.path(), 2, "", &extra);
    let mut a = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    let mut b = VmSim::connect(&socks[1], SimOptions::full()).unwrap();
    a.post_rx(QUEUE_SIZE);
    b.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");
    let me = Ipv4Addr::new(10, 0, 0, 7);

    // A guest asks for outside names over connection after connection, resetting each once
    // the gateway has its query: every query waits on the silent resolver (5 s).
    let (mut most, mut servfails) = (0, 0);
    for i in 0..60u16 {
        let mut c = TcpClient::open(&mut a, A, me, 43000 + i).unwrap_or_else(|| panic!("connection {i}"));
        c.send_query(&mut a, &build_query(i, &format!("n{i}.example"), QTYPE_A));
        // Its ACK, or at once an answer: SERVFAIL when the port has its share upstream.
        let (_, _, _, _, payload) = c.next(&mut a).expect("the gateway takes the query");
        if payload.len() > 2 && read_answers(&payload[2..]).is_some_and(|(rcode, _, _)| rcode == 2) {
            servfails += 1;
        }
        c.segment(&mut a, "RA", &[]);
        most = most.max(dns_tcp_helper_threads());
    }
    // At most two pools of four workers (this test's and the large-answer test's, which may
    // run at the same time), however many queries.
    assert!(most <= 2 * 4, "{most} threads asking upstream over TCP");
    assert!(servfails > 0, "queries beyond the port's share are answered SERVFAIL at once");
    // The service still answers another port at once.
    let mut c = TcpClient::open(&mut b, B, Ipv4Addr::new(10, 0, 0, 8), 43100).expect("another port's connection");
    c.send_query(&mut b, &build_query(1, "files", QTYPE_A));
    let (_, _, rst, _, payload) = c.next(&mut b).expect("an answer");
    assert!(!rst);
    assert_eq!(read_answers(&payload[2..]).unwrap().1, vec![Ipv4Addr::new(10, 0, 0, 50)]);
    drop(d);
}
