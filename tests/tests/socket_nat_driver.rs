//! Socket NAT driven segment by segment: a simulated guest (no VM) hand-crafts TCP to the
//! gateway's address with `host_loopback` on, so its connections reach servers this test runs
//! on the host's 127.0.0.1; the test checks what those servers read and what the guest gets
//! back, sequence numbers, windows, resets and drop counters included.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vunet_switch::checksum::{finish, pseudo_v4, sum};
use vunet_switch::gateway::gateway_mac;
use vunet_switch::vnet::F_NEEDS_CSUM;
use vunet_tests::*;

const NET: &str = "snat";
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const T: Duration = Duration::from_secs(10);
const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0x0d, 1];
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0x0d, 2];
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// An in-process vunet with one socket NAT network (gateway 10.0.0.1/24, `host_loopback` on,
/// `nat` more `[network.nat]` keys) and `ports` guest ports without port security.
fn start(dir: &Path, ports: usize, nat: &str) -> (vunet::Daemon, Vec<PathBuf>) {
    let mut toml =
        format!("[[network]]\nname = \"{NET}\"\nmode = \"nat\"\ngateway = \"10.0.0.1/24\"\n[network.nat]\nhost_loopback = true\n{nat}");
    for i in 0..ports {
        toml.push_str(&format!("[[network.port]]\nname = \"p{i}\"\nsocket = \"p{i}.sock\"\nport_security = false\n"));
    }
    let cfg = vunet::Config::parse(&toml, "test.toml", dir).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    (d, (0..ports).map(|i| dir.join(format!("p{i}.sock"))).collect())
}

/// `net-list`'s `socket_nat` object for the network, as the control socket answers it.
fn socket_nat(d: &vunet::Daemon) -> serde_json::Value {
    let nets = vunet::control::answer(vunet::control::Request::NetList, &d.shared).expect("net-list");
    nets.as_array().unwrap().iter().find(|n| n["name"] == NET).expect("the network")["socket_nat"].clone()
}

/// A drop counter of `net-list` (absent: zero).
fn drops(d: &vunet::Daemon, why: &str) -> u64 {
    socket_nat(d)["drops"][why].as_u64().unwrap_or(0)
}

fn ipv4_frame(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&gateway_mac(NET));
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = finish(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    // Ethernet's minimum, as a NIC pads: the parser must go by the IP total length.
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// A TCP segment (header, options, payload) with a correct checksum.
#[allow(clippy::too_many_arguments)]
fn tcp_segment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    opts: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(opts.len().is_multiple_of(4));
    let hl = 20 + opts.len();
    let mut t = vec![0u8; hl];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((hl / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&window.to_be_bytes());
    t[20..].copy_from_slice(opts);
    t.extend_from_slice(payload);
    let c = finish(sum(&t, pseudo_v4(&src.octets(), &dst.octets(), 6, t.len() as u16)));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A TCP segment vunet sent to a guest.
struct Seg {
    src: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

impl std::fmt::Debug for Seg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} -> :{} seq {} ack {} flags {:#04x} window {} mss {:?}, {} bytes",
            self.src,
            self.sport,
            self.dport,
            self.seq,
            self.ack,
            self.flags,
            self.window,
            self.mss,
            self.payload.len()
        )
    }
}

impl Seg {
    fn has(&self, f: u8) -> bool {
        self.flags & f == f
    }
}

/// Parses a frame to the guest `mac`/`ip` as IPv4 TCP, checking every header and the TCP
/// checksum (the simulated guest takes no checksum offload, so vunet must complete it).
fn parse_seg(mac: [u8; 6], ip: Ipv4Addr, needs_csum: bool, f: &[u8]) -> Option<Seg> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ipb = &f[14..];
    if ipb[9] != 6 {
        return None;
    }
    assert_eq!(&f[0..6], &mac, "to the guest's MAC");
    assert_eq!(&f[6..12], &gateway_mac(NET), "from the gateway's MAC");
    let ihl = (ipb[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ipb[2], ipb[3]]) as usize;
    assert!(ipb[0] >> 4 == 4 && ihl >= 20 && total <= ipb.len() && total >= ihl + 20, "a sound IPv4 header: {f:02x?}");
    assert_eq!(finish(sum(&ipb[..ihl], 0)), 0, "IPv4 header checksum");
    let src = Ipv4Addr::new(ipb[12], ipb[13], ipb[14], ipb[15]);
    assert_eq!(Ipv4Addr::new(ipb[16], ipb[17], ipb[18], ipb[19]), ip, "to the guest's address");
    let t = &ipb[ihl..total];
    let doff = (t[12] >> 4) as usize * 4;
    assert!(doff >= 20 && doff <= t.len(), "a sound TCP header");
    assert!(!needs_csum, "no partial checksums for a guest without GUEST_CSUM");
    assert_eq!(finish(sum(t, pseudo_v4(&src.octets(), &ip.octets(), 6, t.len() as u16))), 0, "TCP checksum");
    let mut mss = None;
    let mut o = &t[20..doff];
    while let Some(&kind) = o.first() {
        match kind {
            0 => break,
            1 => o = &o[1..],
            _ => {
                let len = *o.get(1).unwrap_or(&0) as usize;
                assert!(len >= 2 && len <= o.len(), "sound TCP options");
                if kind == 2 && len == 4 {
                    mss = Some(u16::from_be_bytes([o[2], o[3]]));
                }
                o = &o[len..];
            }
        }
    }
    let be32 = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    Some(Seg {
        src,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: be32(4),
        ack: be32(8),
        flags: t[13],
        window: u16::from_be_bytes([t[14], t[15]]),
        mss,
        payload: t[doff..].to_vec(),
    })
}

/// A simulated guest at a fixed MAC and address.
struct Guest {
    vm: VmSim,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

impl Guest {
    fn connect(sock: &Path, mac: [u8; 6], ip: Ipv4Addr) -> Guest {
        let mut vm = VmSim::connect(sock, SimOptions::no_offloads()).expect("vhost-user");
        vm.post_rx(QUEUE_SIZE);
        Guest { vm, mac, ip }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_tcp(&mut self, sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, opts: &[u8], payload: &[u8]) {
        let t = tcp_segment(self.ip, GW, sport, dport, seq, ack, flags, window, opts, payload);
        self.send_ip(GW, 6, &t);
    }

    fn send_ip(&mut self, dst: Ipv4Addr, proto: u8, l4: &[u8]) {
        let f = ipv4_frame(self.mac, self.ip, dst, proto, l4);
        self.vm.send(&f);
        assert!(self.vm.wait_tx_all(T), "vunet took the frame");
    }

    /// The next TCP segment to this guest, from any flow.
    fn recv_any(&mut self, timeout: Duration) -> Option<Seg> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (hdr, f) = self.vm.recv(left)?;
            if let Some(s) = parse_seg(self.mac, self.ip, hdr.flags & F_NEEDS_CSUM != 0, &f) {
                return Some(s);
            }
        }
    }

    /// The next TCP segment to local port `port` (others are not expected: a test fails on them).
    fn recv(&mut self, port: u16, timeout: Duration) -> Option<Seg> {
        let s = self.recv_any(timeout)?;
        assert_eq!(s.dport, port, "a segment of another flow: {s:?}");
        Some(s)
    }

    fn expect(&mut self, port: u16, what: &str) -> Seg {
        self.recv(port, T).unwrap_or_else(|| panic!("no segment from vunet: {what}"))
    }
}

/// MSS 1460, as a guest with a 1500-byte MTU offers it; no window scaling.
const MSS_OPT: [u8; 4] = [2, 4, 0x05, 0xb4];

/// One guest connection, from the guest's side.
struct Conn {
    lport: u16,
    rport: u16,
    /// Next sequence number the guest sends.
    snd_nxt: u32,
    /// Next sequence number the guest expects from vunet.
    rcv_nxt: u32,
}

impl Conn {
    /// Sends the SYN (ISS `iss`, window `window`).
    fn syn(g: &mut Guest, lport: u16, rport: u16, iss: u32, window: u16) -> Conn {
        g.send_tcp(lport, rport, iss, 0, SYN, window, &MSS_OPT, &[]);
        Conn { lport, rport, snd_nxt: iss.wrapping_add(1), rcv_nxt: 0 }
    }

    /// Takes vunet's SYN-ACK and acknowledges it.
    fn finish_handshake(&mut self, g: &mut Guest, window: u16) -> Seg {
        let sa = g.expect(self.lport, "SYN-ACK");
        assert!(sa.has(SYN | ACK) && !sa.has(RST), "SYN-ACK: {sa:?}");
        assert_eq!((sa.src, sa.sport), (GW, self.rport), "from the address and port the guest called");
        assert_eq!(sa.ack, self.snd_nxt, "acknowledges the guest's SYN");
        assert_eq!(sa.mss, Some(1460), "our MSS from the MTU");
        self.rcv_nxt = sa.seq.wrapping_add(1);
        self.send(g, ACK, window, &[]);
        sa
    }

    /// A segment at snd_nxt acknowledging rcv_nxt; advances snd_nxt past payload and FIN.
    fn send(&mut self, g: &mut Guest, flags: u8, window: u16, payload: &[u8]) {
        g.send_tcp(self.lport, self.rport, self.snd_nxt, self.rcv_nxt, flags, window, &[], payload);
        self.snd_nxt = self.snd_nxt.wrapping_add(payload.len() as u32 + u32::from(flags & (FIN | SYN) != 0));
    }

    /// Waits for vunet's ACK of everything sent so far (skipping nothing: data from the host
    /// arriving meanwhile fails the test).
    fn expect_ack(&mut self, g: &mut Guest, what: &str) -> Seg {
        let s = g.expect(self.lport, what);
        assert!(s.has(ACK) && !s.has(RST), "{what}: an ACK: {s:?}");
        assert_eq!(s.ack, self.snd_nxt, "{what}: acknowledges all the guest sent");
        assert_eq!(s.seq, self.rcv_nxt, "{what}: at vunet's next sequence number");
        s
    }

    /// Receives at least `n` bytes of host data, in order, without acknowledging them; no more
    /// than `window` may come.
    fn recv_data_no_ack(&mut self, g: &mut Guest, n: usize, window: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let s = g.expect(self.lport, "host data");
            assert!(!s.has(RST), "data, not a reset: {s:?}");
            assert_eq!(s.seq, self.rcv_nxt, "in order, no gap or overlap");
            self.rcv_nxt = self.rcv_nxt.wrapping_add(s.payload.len() as u32);
            got.extend_from_slice(&s.payload);
        }
        assert!(got.len() <= window, "{} bytes: no more than the window of {window}", got.len());
        got
    }

    /// Receives host data until `n` bytes arrived, in order, ACKing each segment.
    fn recv_data(&mut self, g: &mut Guest, n: usize, window: u16) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let s = g.expect(self.lport, "host data");
            assert!(!s.has(RST), "data, not a reset: {s:?}");
            assert_eq!(s.seq, self.rcv_nxt, "in order, no gap or overlap");
            assert_eq!(s.ack, self.snd_nxt, "acknowledging all the guest sent");
            assert!(s.payload.len() <= 1460, "within the guest's MSS");
            self.rcv_nxt = self.rcv_nxt.wrapping_add(s.payload.len() as u32);
            got.extend_from_slice(&s.payload);
            if !s.payload.is_empty() {
                self.send(g, ACK, window, &[]);
            }
        }
        assert_eq!(got.len(), n, "no more than was written");
        got
    }
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    (l, p)
}

/// Accepts one connection (waiting up to `T`) and checks it came from vunet over loopback.
fn accept(l: &TcpListener) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let mut got = None;
    assert!(
        wait_until(T, || match l.accept() {
            Ok(c) => {
                got = Some(c);
                true
            }
            Err(_) => false,
        }),
        "vunet connected to the host server"
    );
    let (s, peer) = got.unwrap();
    assert!(peer.ip().is_loopback(), "connected over loopback: {peer}");
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: SO_LINGER reads one struct linger from a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of_val(&l) as u32,
        )
    };
    assert_eq!(r, 0);
}

/// What the host server has for it right now, waiting at most `wait` (nothing: empty).
fn read_now(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 4096];
    let r = match s.read(&mut b) {
        Ok(n) => b[..n].to_vec(),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Vec::new(),
        Err(e) => panic!("host read: {e}"),
    };
    s.set_read_timeout(Some(T)).unwrap();
    r
}

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("the host server reads the guest's bytes");
    b
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn ready(d: &vunet::Daemon) {
    wait_network_ready(d, NET);
}

#[test]
fn handshake_data_both_ways_half_close_and_resets() {
    let dir = TempDir::new("snat-drv-basic");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);

    // The host's accept queue is full (backlog 0 and one connection waiting): the kernel drops
    // vunet's SYN, so vunet's connect() is pending and the guest must hear nothing yet.
    let (l, port) = listener();
    // SAFETY: listen() on our own listening socket only changes its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let filler = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut c = Conn::syn(&mut g, 40001, port, 1000, 65535);
    assert!(g.recv(c.lport, Duration::from_millis(400)).is_none(), "no SYN-ACK before the host side connected");
    // Room in the queue: the kernel's retransmitted SYN gets through, and only then the guest
    // gets its SYN-ACK.
    let (first, _) = l.accept().unwrap();
    assert_eq!(first.peer_addr().unwrap(), filler.local_addr().unwrap());
    c.finish_handshake(&mut g, 65535);
    let mut h = accept(&l);

    // Guest → host.
    c.send(&mut g, ACK | PSH, 65535, b"hello from the guest");
    let ack = c.expect_ack(&mut g, "ACK of the guest's data");
    assert!(ack.window > 1000, "the host socket has room, so the window is open: {ack:?}");
    assert_eq!(read_exact(&mut h, 20), b"hello from the guest");

    // Host → guest.
    h.write_all(b"hello from the host").unwrap();
    assert_eq!(c.recv_data(&mut g, 19, 65535), b"hello from the host");

    // The guest half-closes: the host reads end of file, and its data still reaches the guest.
    c.send(&mut g, FIN | ACK, 65535, &[]);
    c.expect_ack(&mut g, "ACK of the guest's FIN");
    let mut b = [0u8; 16];
    assert_eq!(h.read(&mut b).expect("EOF, not an error"), 0, "the host server reads end of file");
    let more = pattern(5000);
    h.write_all(&more).unwrap();
    assert_eq!(c.recv_data(&mut g, more.len(), 65535), more, "host data after the guest's FIN");
    // The host closes: FIN to the guest once everything was acknowledged.
    drop(h);
    let fin = g.expect(c.lport, "FIN");
    assert!(fin.has(FIN | ACK) && !fin.has(RST), "{fin:?}");
    assert_eq!((fin.seq, fin.ack), (c.rcv_nxt, c.snd_nxt));
    c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
    c.send(&mut g, ACK, 65535, &[]);
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 0), "the flow is gone once both FINs are acknowledged: {}", socket_nat(&d));

    // A guest RST: vunet closes abortively, the host peer sees a reset.
    let (l, port) = listener();
    let mut c = Conn::syn(&mut g, 40002, port, 5000, 65535);
    c.finish_handshake(&mut g, 65535);
    let mut h = accept(&l);
    c.send(&mut g, ACK | PSH, 65535, b"x");
    c.expect_ack(&mut g, "ACK before the RST");
    assert_eq!(read_exact(&mut h, 1), b"x");
    c.send(&mut g, RST, 0, &[]);
    let r = h.read(&mut b);
    assert_eq!(r.as_ref().map_err(|e| e.kind()).err(), Some(ErrorKind::ConnectionReset), "the host peer sees ECONNRESET: {r:?}");
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 0), "the flow is gone after the guest's RST");

    // A host RST (closed with linger 0): the guest gets RST.
    let (l, port) = listener();
    let mut c = Conn::syn(&mut g, 40003, port, 9000, 65535);
    c.finish_handshake(&mut g, 65535);
    let h = accept(&l);
    set_linger_zero(&h);
    drop(h);
    let rst = g.expect(c.lport, "RST after the host's reset");
    assert!(rst.has(RST), "{rst:?}");
    assert_eq!(rst.seq, c.rcv_nxt, "in the guest's window");
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 0), "the flow is gone after the host's reset");
    assert!(g.recv_any(Duration::from_millis(200)).is_none(), "nothing more");
}

#[test]
fn a_closed_host_port_is_refused_at_once() {
    let dir = TempDir::new("snat-drv-refused");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    let (l, port) = listener();
    drop(l);
    let t0 = Instant::now();
    let c = Conn::syn(&mut g, 40010, port, 77, 65535);
    let s = g.expect(c.lport, "RST+ACK for a closed port");
    assert!(s.has(RST | ACK) && !s.has(SYN), "RST+ACK: {s:?}");
    assert_eq!(s.ack, 78, "acknowledges the SYN");
    assert_eq!((s.src, s.sport), (GW, port));
    assert!(t0.elapsed() < Duration::from_secs(2), "at once, not after a time-out: {:?}", t0.elapsed());
    assert!(wait_until(T, || socket_nat(&d)["refused"] == 1), "counted as refused: {}", socket_nat(&d));
    assert_eq!(socket_nat(&d)["tcp_flows"], 0);
}

#[test]
fn a_zero_window_stops_the_data_until_the_guest_reopens_it() {
    let dir = TempDir::new("snat-drv-zwnd");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    let (l, port) = listener();
    // A window of two segments: vunet sends those, then must wait for the guest.
    const SMALL: u16 = 2 * 1460;
    let mut c = Conn::syn(&mut g, 40020, port, 100, SMALL);
    c.finish_handshake(&mut g, SMALL);
    let h = accept(&l);
    let data = pattern(100_000);
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        let mut h = h;
        h.write_all(&to_send).unwrap();
        h
    });

    // The first window's worth, then the guest's buffer is full: ACK with window 0.
    let mut got = Vec::new();
    while got.len() < SMALL as usize {
        let s = g.expect(c.lport, "data in the first window");
        assert_eq!(s.seq, c.rcv_nxt, "in order");
        c.rcv_nxt = c.rcv_nxt.wrapping_add(s.payload.len() as u32);
        got.extend_from_slice(&s.payload);
    }
    assert_eq!(got.len(), SMALL as usize, "no byte beyond the window the guest offered");
    c.send(&mut g, ACK, 0, &[]);

    // Nothing new while the window is closed; vunet probes (a segment below the window, no
    // data), and the guest answers each probe with its window, still 0.
    let closed_at = Instant::now();
    let mut probes = 0;
    while closed_at.elapsed() < Duration::from_millis(2500) || probes == 0 {
        assert!(closed_at.elapsed() < T, "no window probe within {T:?}");
        let Some(s) = g.recv(c.lport, Duration::from_millis(200)) else { continue };
        assert!(s.payload.is_empty(), "no data into a zero window: {s:?}");
        assert!(!s.has(RST) && !s.has(FIN), "{s:?}");
        assert_eq!(s.seq, c.rcv_nxt.wrapping_sub(1), "a probe just below the window");
        probes += 1;
        c.send(&mut g, ACK, 0, &[]);
    }
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 1), "the flow lives on");

    // The window opens: the rest arrives, intact and in order.
    c.send(&mut g, ACK, 65535, &[]);
    got.extend(c.recv_data(&mut g, data.len() - got.len(), 65535));
    assert!(got == data, "all {} bytes in order", data.len());
    drop(writer.join().unwrap());
}

#[test]
fn out_of_order_and_repeated_guest_segments_reach_the_host_once_in_order() {
    let dir = TempDir::new("snat-drv-ooo");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    let (l, port) = listener();
    let mut c = Conn::syn(&mut g, 40030, port, 0xffff_ff00, 65535);
    c.finish_handshake(&mut g, 65535);
    let mut h = accept(&l);
    let data = pattern(300);
    let (a, b, z) = (&data[..100], &data[100..200], &data[200..]);
    let base = c.snd_nxt; // ISS+1; the sequence space wraps within this connection

    // b after a hole: not written, answered with a duplicate ACK of `base`.
    g.send_tcp(c.lport, c.rport, base.wrapping_add(100), c.rcv_nxt, ACK | PSH, 65535, &[], b);
    let dup = g.expect(c.lport, "duplicate ACK");
    assert_eq!((dup.ack, dup.seq, dup.payload.len()), (base, c.rcv_nxt, 0), "a duplicate ACK of the last in-order byte");
    assert!(read_now(&mut h, Duration::from_millis(200)).is_empty(), "nothing after a hole reaches the host");
    assert!(wait_until(T, || drops(&d, "out_of_order") == 1), "counted out_of_order: {}", socket_nat(&d));

    // a, then b again: both written, in order.
    c.send(&mut g, ACK | PSH, 65535, a);
    c.expect_ack(&mut g, "ACK of a");
    c.send(&mut g, ACK | PSH, 65535, b);
    c.expect_ack(&mut g, "ACK of b");
    // a once more (our ACK "was lost"): acknowledged again, not written twice.
    g.send_tcp(c.lport, c.rport, base, c.rcv_nxt, ACK | PSH, 65535, &[], a);
    let again = g.expect(c.lport, "ACK of a repeated segment");
    assert_eq!(again.ack, c.snd_nxt, "acknowledges all the guest sent, again");
    // A segment overlapping the acknowledged part: only its new tail is written.
    g.send_tcp(c.lport, c.rport, base.wrapping_add(150), c.rcv_nxt, ACK | PSH, 65535, &[], &data[150..250]);
    c.snd_nxt = base.wrapping_add(250);
    c.expect_ack(&mut g, "ACK of an overlapping segment");
    c.send(&mut g, ACK | PSH, 65535, &z[50..]);
    c.expect_ack(&mut g, "ACK of the rest");
    c.send(&mut g, FIN | ACK, 65535, &[]);
    c.expect_ack(&mut g, "ACK of FIN");
    let mut all = Vec::new();
    h.read_to_end(&mut all).unwrap();
    assert!(all == data, "the host reads each byte once, in order: {} bytes", all.len());
    assert_eq!(socket_nat(&d)["bytes_to_host"], 300);
}

#[test]
fn a_syn_flood_over_the_guests_share_is_refused_and_other_guests_still_connect() {
    let dir = TempDir::new("snat-drv-flood");
    let (d, socks) = start(dir.path(), 2, "max_connections = 16\nmax_per_guest = 4\n");
    let mut a = Guest::connect(&socks[0], MAC_A, IP_A);
    let mut b = Guest::connect(&socks[1], MAC_B, IP_B);
    ready(&d);
    let (l, port) = listener();
    const FLOOD: u16 = 12;
    for i in 0..FLOOD {
        a.send_tcp(41000 + i, port, 1000 * i as u32, 0, SYN, 65535, &MSS_OPT, &[]);
    }
    let (mut synacks, mut rsts) = (Vec::new(), Vec::new());
    while synacks.len() + rsts.len() < FLOOD as usize {
        let s = a.recv_any(T).expect("an answer to every SYN");
        assert!((41000..41000 + FLOOD).contains(&s.dport), "{s:?}");
        assert_eq!(s.ack, 1000 * (s.dport - 41000) as u32 + 1, "acknowledges that SYN");
        if s.has(RST) {
            rsts.push(s.dport);
        } else {
            assert!(s.has(SYN | ACK), "{s:?}");
            synacks.push(s.dport);
            // Completes the handshake, so no SYN-ACK comes again later.
            a.send_tcp(s.dport, port, s.ack, s.seq.wrapping_add(1), ACK, 65535, &[], &[]);
        }
    }
    assert_eq!((synacks.len(), rsts.len()), (4, 8), "the guest's share, then RST: {synacks:?} {rsts:?}");
    assert_eq!(drops(&d, "share_exceeded"), 8, "counted: {}", socket_nat(&d));

    // Guest B still connects and talks.
    let mut c = Conn::syn(&mut b, 42000, port, 555, 65535);
    c.finish_handshake(&mut b, 65535);
    c.send(&mut b, ACK | PSH, 65535, b"from B");
    c.expect_ack(&mut b, "B's data");
    // The host has A's four and B's: B's is the one that says something.
    l.set_nonblocking(true).unwrap();
    let mut conns = Vec::new();
    assert!(
        wait_until(T, || {
            while let Ok((s, _)) = l.accept() {
                conns.push(s);
            }
            conns.len() == 5
        }),
        "five connections reached the host, got {}",
        conns.len()
    );
    let mut from_b = None;
    assert!(
        wait_until(T, || {
            for s in conns.iter_mut() {
                s.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 16];
                if let Ok(n) = s.read(&mut buf) {
                    assert_eq!(&buf[..n], b"from B");
                    from_b = Some(s.try_clone().unwrap());
                }
            }
            from_b.is_some()
        }),
        "B's bytes reached the host"
    );
    let mut hb = from_b.unwrap();
    hb.set_nonblocking(false).unwrap();
    hb.write_all(b"to B").unwrap();
    assert_eq!(c.recv_data(&mut b, 4, 65535), b"to B");
    assert!(a.recv_any(Duration::from_millis(200)).is_none(), "nothing for A from B's flow");
    assert_eq!(socket_nat(&d)["tcp_flows"], 5);
}

#[test]
fn malformed_guest_frames_are_dropped_by_reason_and_the_daemon_goes_on() {
    let dir = TempDir::new("snat-drv-bad");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    let (l, port) = listener();
    let outside = Ipv4Addr::new(192, 0, 2, 1);

    // TCP with a data offset beyond the segment (15 words, 20 bytes there).
    let mut t = tcp_segment(IP_A, GW, 40040, port, 1, 0, SYN, 65535, &[], &[]);
    t[12] = 0xf0;
    g.send_ip(GW, 6, &t);
    // A data offset under the header's own 20 bytes.
    let mut t = tcp_segment(IP_A, GW, 40041, port, 1, 0, SYN, 65535, &[], &[]);
    t[12] = 0x20;
    g.send_ip(GW, 6, &t);
    // A TCP header cut short by the IP total length (10 of its 20 bytes).
    let t = tcp_segment(IP_A, GW, 40042, port, 1, 0, SYN, 65535, &[], &[]);
    g.send_ip(GW, 6, &t[..10]);
    // UDP whose length field runs past the datagram.
    let mut u = vec![0u8; 8 + 4];
    u[0..2].copy_from_slice(&40043u16.to_be_bytes());
    u[2..4].copy_from_slice(&9u16.to_be_bytes());
    u[4..6].copy_from_slice(&200u16.to_be_bytes());
    g.send_ip(outside, 17, &u);
    // ICMP shorter than an echo header.
    g.send_ip(outside, 1, &[8, 0, 0xf7, 0xff]);

    let want = [("bad_tcp_header", 3), ("bad_udp_header", 1), ("bad_icmp", 1)];
    assert!(wait_until(T, || want.iter().all(|(k, n)| drops(&d, k) == *n)), "each dropped and counted by reason: {}", socket_nat(&d));
    let sn = socket_nat(&d);
    assert_eq!(
        (sn["tcp_flows"].as_u64(), sn["udp_flows"].as_u64(), sn["icmp_flows"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "no flow: {sn}"
    );
    assert!(g.recv_any(Duration::from_millis(200)).is_none(), "no answer to a malformed frame");
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_err(), "nothing reached the host");

    // A sound connection afterwards works.
    let mut c = Conn::syn(&mut g, 40044, port, 42, 65535);
    c.finish_handshake(&mut g, 65535);
    let mut h = accept(&l);
    c.send(&mut g, ACK | PSH, 65535, b"still here");
    c.expect_ack(&mut g, "ACK after the bad frames");
    assert_eq!(read_exact(&mut h, 10), b"still here");
    h.write_all(b"yes").unwrap();
    assert_eq!(c.recv_data(&mut g, 3, 65535), b"yes");
}

#[test]
fn a_repeated_syn_makes_no_second_flow_and_a_rst_while_connecting_cancels_the_connect() {
    let dir = TempDir::new("snat-drv-syn");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    let (l, port) = listener();
    // Once connected: the guest's SYN again (its SYN-ACK was "lost") gets the same SYN-ACK.
    let mut c = Conn::syn(&mut g, 40050, port, 500, 65535);
    let sa = g.expect(c.lport, "SYN-ACK");
    g.send_tcp(c.lport, port, 500, 0, SYN, 65535, &MSS_OPT, &[]);
    let again = g.expect(c.lport, "SYN-ACK again");
    assert!(again.has(SYN | ACK) && (again.seq, again.ack) == (sa.seq, 501), "the same SYN-ACK: {sa:?} then {again:?}");
    assert_eq!(socket_nat(&d)["tcp_flows"], 1, "one flow");
    // The handshake's ACK carries data, as Linux's may.
    c.rcv_nxt = sa.seq.wrapping_add(1);
    c.send(&mut g, ACK | PSH, 65535, b"early");
    c.expect_ack(&mut g, "ACK of data on the handshake's ACK");
    let mut h = accept(&l);
    assert_eq!(read_exact(&mut h, 5), b"early");
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_err(), "one connection on the host for two SYNs");

    // While the host's connect is pending (accept queue full): a repeated SYN gets nothing and
    // makes no second flow; the guest's RST ends the flow and its connect.
    let (l, port) = listener();
    // SAFETY: listen() on our own listening socket only changes its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let _filler = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let c = Conn::syn(&mut g, 40051, port, 1000, 65535);
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 2), "{}", socket_nat(&d));
    g.send_tcp(c.lport, port, 1000, 0, SYN, 65535, &MSS_OPT, &[]);
    assert!(g.recv_any(Duration::from_millis(300)).is_none(), "no SYN-ACK while connecting");
    assert_eq!(socket_nat(&d)["tcp_flows"], 2, "still one flow for the connecting SYN");
    g.send_tcp(c.lport, port, 1001, 0, RST, 0, &[], &[]);
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 1), "the RST ended the flow: {}", socket_nat(&d));
    let _first = l.accept().unwrap();
    // The kernel would retry the SYN within about a second, had the socket not been closed.
    std::thread::sleep(Duration::from_millis(1500));
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_err(), "the cancelled connect never reached the host server");
    assert!(g.recv_any(Duration::from_millis(200)).is_none(), "nothing for the guest either");
}

#[test]
fn the_guests_window_scale_bounds_what_vunet_sends() {
    let dir = TempDir::new("snat-drv-wscale");
    let (d, socks) = start(dir.path(), 1, "");
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    let (l, port) = listener();
    // MSS, NOP, window scale 7.
    g.send_tcp(40070, port, 1000, 0, SYN, 65535, &[2, 4, 0x05, 0xb4, 1, 3, 3, 7], &[]);
    let mut c = Conn { lport: 40070, rport: port, snd_nxt: 1001, rcv_nxt: 0 };
    let sa = g.expect(c.lport, "SYN-ACK");
    assert!(sa.has(SYN | ACK), "{sa:?}");
    c.rcv_nxt = sa.seq.wrapping_add(1);
    // 16 << 7: a window of 2048 bytes.
    c.send(&mut g, ACK, 16, &[]);
    let h = accept(&l);
    let data = pattern(50_000);
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        let mut h = h;
        h.write_all(&to_send).unwrap();
        h
    });
    let mut got = c.recv_data_no_ack(&mut g, 2048, 2048);
    assert!(g.recv(c.lport, Duration::from_millis(300)).is_none(), "nothing past the scaled window");
    // 512 << 7 = 64 KiB: the rest comes, more than an unscaled 512 would allow in flight.
    c.send(&mut g, ACK, 512, &[]);
    got.extend(c.recv_data_no_ack(&mut g, 20_000, 512 << 7));
    c.send(&mut g, ACK, 512, &[]);
    got.extend(c.recv_data(&mut g, data.len() - got.len(), 512));
    assert!(got == data, "all {} bytes in order", data.len());
    drop(writer.join().unwrap());
    assert_eq!(socket_nat(&d)["tcp_flows"], 1);
}

/// A frame to a guest with every offload: its TCP header fields and payload, checked against
/// the virtio-net header (a partial checksum is the pseudo-header sum; a GSO frame's segment
/// size is the guest's MSS).
fn parse_offloaded(hdr: &vunet_switch::vnet::VnetHeader, f: &[u8]) -> Option<(u32, u32, u8, u16, Vec<u8>)> {
    if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
        return None;
    }
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    assert_eq!(total + 14, f.len(), "the IPv4 length covers the whole frame");
    let t = &f[34..];
    if hdr.flags & F_NEEDS_CSUM != 0 {
        assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16), "checksum offsets of an IPv4 TCP frame");
        let field = u16::from_be_bytes([t[16], t[17]]);
        assert_eq!(field, !finish(pseudo_v4(&GW.octets(), &IP_A.octets(), 6, t.len() as u16)), "the pseudo-header sum");
    } else {
        assert_eq!(finish(sum(t, pseudo_v4(&GW.octets(), &IP_A.octets(), 6, t.len() as u16))), 0, "a complete TCP checksum");
    }
    let doff = (t[12] >> 4) as usize * 4;
    let be32 = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    Some((be32(4), be32(8), t[13], u16::from_be_bytes([t[14], t[15]]), t[doff..].to_vec()))
}

#[test]
fn tso_guests_send_and_receive_whole_segments() {
    use vunet_switch::vnet::{VnetHeader, GSO_NONE, GSO_TCPV4};
    let dir = TempDir::new("snat-drv-tso");
    let (d, socks) = start(dir.path(), 1, "");
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).expect("vhost-user");
    vm.post_rx(QUEUE_SIZE);
    ready(&d);
    let (l, port) = listener();
    let send = |vm: &mut VmSim, seq: u32, ack: u32, flags: u8, window: u16, opts: &[u8], payload: &[u8]| {
        vm.send(&ipv4_frame(MAC_A, IP_A, GW, 6, &tcp_segment(IP_A, GW, 40080, port, seq, ack, flags, window, opts, payload)));
        assert!(vm.wait_tx_all(T));
    };
    let recv = |vm: &mut VmSim| loop {
        let (hdr, f) = vm.recv(T).expect("a frame from vunet");
        if let Some(s) = parse_offloaded(&hdr, &f) {
            return (hdr, s);
        }
    };
    // MSS 1460 and window scale 7.
    send(&mut vm, 1000, 0, SYN, 65535, &[2, 4, 0x05, 0xb4, 1, 3, 3, 7], &[]);
    let (_, (iss, _, flags, _, _)) = recv(&mut vm);
    assert_eq!(flags & (SYN | ACK), SYN | ACK);
    let mut rcv_nxt = iss.wrapping_add(1);
    let mut snd_nxt = 1001u32;
    // A receive window of 1024 << 7 = 128 KiB.
    send(&mut vm, snd_nxt, rcv_nxt, ACK, 1024, &[], &[]);
    let mut h = accept(&l);

    // Host to guest: 256 KiB come as TSO segments larger than the MSS, intact and in order.
    let data = pattern(256 * 1024);
    let to_send = data.clone();
    let mut writer_side = h.try_clone().unwrap();
    let writer = std::thread::spawn(move || writer_side.write_all(&to_send).unwrap());
    let (mut got, mut largest, mut gso_frames, mut window) = (Vec::new(), 0usize, 0usize, 0usize);
    while got.len() < data.len() {
        let (hdr, (seq, _, _, w, payload)) = recv(&mut vm);
        window = (w as usize) << 7;
        assert_eq!(seq, rcv_nxt, "in order");
        if payload.len() > 1460 {
            assert_eq!((hdr.gso_type, hdr.gso_size), (GSO_TCPV4, 1460), "a segment past the MSS is a TSO frame of the guest's MSS");
            gso_frames += 1;
        } else {
            assert_eq!(hdr.gso_type, GSO_NONE);
        }
        largest = largest.max(payload.len());
        rcv_nxt = rcv_nxt.wrapping_add(payload.len() as u32);
        got.extend_from_slice(&payload);
        send(&mut vm, snd_nxt, rcv_nxt, ACK, 1024, &[], &[]);
    }
    writer.join().unwrap();
    assert!(got == data, "all {} bytes, intact", data.len());
    assert!(
        gso_frames > 0 && largest > 16 * 1460,
        "whole segments, not MSS-sized frames: largest {largest} bytes, {gso_frames} TSO frames"
    );

    // Guest to host: one TSO frame as large as the window vunet offers goes to the socket in
    // one piece and is acknowledged whole.
    // (The window is the one vunet's last segment offered: the socket's free room.)
    let n = window.min(60_000);
    assert!(n > 4 * 1460, "a window worth a TSO frame: {window}");
    let payload = pattern(n);
    let mut seg = tcp_segment(IP_A, GW, 40080, port, snd_nxt, rcv_nxt, ACK | PSH, 1024, &[], &payload);
    let partial = !finish(pseudo_v4(&IP_A.octets(), &GW.octets(), 6, seg.len() as u16));
    seg[16..18].copy_from_slice(&partial.to_be_bytes());
    let frame = ipv4_frame(MAC_A, IP_A, GW, 6, &seg);
    let hdr = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    vm.send_with(&hdr, &frame, false);
    assert!(vm.wait_tx_all(T));
    snd_nxt = snd_nxt.wrapping_add(n as u32);
    let (_, (_, ack, _, _, _)) = recv(&mut vm);
    assert_eq!(ack, snd_nxt, "the whole {n}-byte segment acknowledged at once");
    assert!(read_exact(&mut h, n) == payload, "the host reads it intact");
}

// ---- IPv6 -------------------------------------------------------------------------------
//
// The same network with `gateway6`: a simulated guest at fd00:7675:5::10 speaks IPv6 to the
// gateway's IPv6 address (the host's ::1 with `host_loopback`) and to the host's own global
// address. Frames are built and parsed with etherparse, which checks the checksums over the
// IPv6 pseudo-header.

const GW6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x7675, 5, 0, 0, 0, 0, 1);
const IP6_A: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x7675, 5, 0, 0, 0, 0, 0x10);

fn start6(dir: &Path) -> (vunet::Daemon, PathBuf) {
    let toml = format!(
        "[[network]]\nname = \"{NET}\"\nmode = \"nat\"\ngateway = \"10.0.0.1/24\"\ngateway6 = \"{GW6}/64\"\n[network.nat]\nhost_loopback = true\n[[network.port]]\nname = \"p0\"\nsocket = \"p0.sock\"\nport_security = false\n"
    );
    let cfg = vunet::Config::parse(&toml, "test.toml", dir).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    (d, dir.join("p0.sock"))
}

/// What an IPv6 frame to the guest carries, its addresses and checksum checked.
#[derive(Debug)]
enum In6 {
    Tcp { src: std::net::SocketAddr, dport: u16, seq: u32, ack: u32, syn: bool, rst: bool, fin: bool, mss: Option<u16>, payload: Vec<u8> },
    Udp { src: std::net::SocketAddr, dport: u16, payload: Vec<u8> },
    Icmp { src: std::net::Ipv6Addr, ty: u8, code: u8 },
}

struct Guest6 {
    vm: VmSim,
}

impl Guest6 {
    fn connect(sock: &Path) -> Guest6 {
        let mut vm = VmSim::connect(sock, SimOptions::no_offloads()).expect("vhost-user");
        vm.post_rx(QUEUE_SIZE);
        Guest6 { vm }
    }

    fn frame(&mut self, f: Vec<u8>) {
        self.vm.send(&f);
        assert!(self.vm.wait_tx_all(T), "vunet took the frame");
    }

    #[allow(clippy::too_many_arguments)]
    fn tcp(&mut self, dst: std::net::Ipv6Addr, sport: u16, dport: u16, seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) {
        let mut b = etherparse::PacketBuilder::ethernet2(MAC_A, gateway_mac(NET))
            .ipv6(IP6_A.octets(), dst.octets(), 64)
            .tcp(sport, dport, seq, 65535);
        if flags & SYN != 0 {
            b = b.syn().options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)]).unwrap();
        }
        if flags & FIN != 0 {
            b = b.fin();
        }
        if flags & RST != 0 {
            b = b.rst();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        self.frame(v);
    }

    fn udp(&mut self, dst: std::net::Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(MAC_A, gateway_mac(NET))
            .ipv6(IP6_A.octets(), dst.octets(), 64)
            .udp(sport, dport)
            .write(&mut v, payload)
            .unwrap();
        self.frame(v);
    }

    /// The next IPv6 TCP/UDP/ICMPv6 frame to the guest (RAs and other gateway chatter skipped).
    fn recv(&mut self, timeout: Duration) -> Option<In6> {
        use etherparse::{NetSlice, SlicedPacket, TransportSlice};
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (hdr, f) = self.vm.recv(left)?;
            assert_eq!(hdr.flags & F_NEEDS_CSUM, 0, "no partial checksums for a guest without GUEST_CSUM");
            let Ok(p) = SlicedPacket::from_ethernet(&f) else { continue };
            let Some(NetSlice::Ipv6(ip)) = &p.net else { continue };
            let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
            if dst != IP6_A {
                continue;
            }
            assert_eq!(&f[0..6], &MAC_A, "to the guest's MAC");
            match &p.transport {
                Some(TransportSlice::Tcp(t)) => {
                    assert_eq!(t.calc_checksum_ipv6(src.octets(), dst.octets()).unwrap(), t.checksum(), "TCP checksum");
                    let mss = t.options_iterator().find_map(|o| match o {
                        Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                        _ => None,
                    });
                    return Some(In6::Tcp {
                        src: std::net::SocketAddr::new(src.into(), t.source_port()),
                        dport: t.destination_port(),
                        seq: t.sequence_number(),
                        ack: t.acknowledgment_number(),
                        syn: t.syn(),
                        rst: t.rst(),
                        fin: t.fin(),
                        mss,
                        payload: t.payload().to_vec(),
                    });
                }
                Some(TransportSlice::Udp(u)) => {
                    let want = u.to_header().calc_checksum_ipv6_raw(src.octets(), dst.octets(), u.payload()).unwrap();
                    assert_eq!(want, u.checksum(), "UDP checksum");
                    return Some(In6::Udp {
                        src: std::net::SocketAddr::new(src.into(), u.source_port()),
                        dport: u.destination_port(),
                        payload: u.payload().to_vec(),
                    });
                }
                Some(TransportSlice::Icmpv6(i)) => {
                    assert!(i.is_checksum_valid(src.octets(), dst.octets()), "ICMPv6 checksum");
                    let b = i.slice();
                    // Router advertisements and the like are the gateway's own chatter.
                    if b[0] >= 128 {
                        continue;
                    }
                    return Some(In6::Icmp { src, ty: b[0], code: b[1] });
                }
                _ => continue,
            }
        }
    }
}

/// The host's own global IPv6 address (not loopback, not link-local), if it has one.
fn host_global_ipv6() -> Option<std::net::Ipv6Addr> {
    let s = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    s.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let hex = w.next()?;
        let scope = w.nth(2)?;
        if scope != "00" || hex.len() != 32 {
            return None;
        }
        let v = u128::from_str_radix(hex, 16).ok()?;
        let ip = std::net::Ipv6Addr::from(v);
        (!ip.is_loopback()).then_some(ip)
    })
}

/// A guest TCP connection over IPv6 to `dst`:`port` (a host server listening on `l`): the
/// handshake, data both ways (`during` runs while the flow is established), both FINs;
/// returns the peer address the server saw.
fn tcp6_round_trip(
    g: &mut Guest6,
    l: &TcpListener,
    dst: std::net::Ipv6Addr,
    port: u16,
    lport: u16,
    during: impl FnOnce(),
) -> std::net::SocketAddr {
    g.tcp(dst, lport, port, 7000, None, SYN, &[]);
    l.set_nonblocking(true).unwrap();
    let mut got = None;
    assert!(wait_until(T, || l.accept().map(|c| got = Some(c)).is_ok()), "vunet connected to the host server over IPv6");
    let (mut s, peer) = got.unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let Some(In6::Tcp { src, dport, seq, ack, syn: true, rst: false, mss, .. }) = g.recv(T) else { panic!("a SYN-ACK") };
    assert_eq!((src, dport, ack), (std::net::SocketAddr::new(dst.into(), port), lport, 7001));
    assert_eq!(mss, Some(1500 - 60), "our MSS: the MTU less IPv6 and TCP headers");
    let mut rcv = seq.wrapping_add(1);
    g.tcp(dst, lport, port, 7001, Some(rcv), ACK, b"hello over v6");
    assert_eq!(read_exact(&mut s, 13), b"hello over v6");
    let Some(In6::Tcp { ack, .. }) = g.recv(T) else { panic!("an ACK") };
    assert_eq!(ack, 7001 + 13);
    let data = pattern(5000);
    s.write_all(&data).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let Some(In6::Tcp { seq, payload, rst: false, .. }) = g.recv(T) else { panic!("host data") };
        assert_eq!(seq, rcv, "in order");
        assert!(payload.len() <= 1440, "within the MSS");
        rcv = rcv.wrapping_add(payload.len() as u32);
        got.extend_from_slice(&payload);
        g.tcp(dst, lport, port, 7014, Some(rcv), ACK, &[]);
    }
    assert_eq!(got, data);
    during();
    g.tcp(dst, lport, port, 7014, Some(rcv), FIN | ACK, &[]);
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the guest's FIN is the server's end of file");
    // The server closes too: its FIN reaches the guest (after the ACK of the guest's FIN).
    drop(s);
    loop {
        let Some(In6::Tcp { seq, fin, rst: false, .. }) = g.recv(T) else { panic!("the server's FIN") };
        if fin {
            assert_eq!(seq, rcv);
            g.tcp(dst, lport, port, 7015, Some(rcv.wrapping_add(1)), ACK, &[]);
            break;
        }
    }
    peer
}

#[test]
fn ipv6_tcp_reaches_the_hosts_loopback_through_the_gateways_ipv6_address_and_its_own_address() {
    let dir = TempDir::new("snat-drv-v6tcp");
    let (d, sock) = start6(dir.path());
    let mut g = Guest6::connect(&sock);
    ready(&d);
    let l = TcpListener::bind("[::1]:0").expect("a server on the host's ::1");
    let port = l.local_addr().unwrap().port();
    let peer = tcp6_round_trip(&mut g, &l, GW6, port, 41000, || {
        // The listings count and show the IPv6 flow while it lives.
        let sn = socket_nat(&d);
        assert_eq!(sn["ipv6_flows"], 1, "net-list counts IPv6 flows: {sn}");
        let ports = vunet::control::answer(vunet::control::Request::PortList { network: NET.into() }, &d.shared).unwrap();
        let flows = ports[0]["nat_flows"]["flows"].to_string();
        assert!(
            flows.contains(&format!("[{IP6_A}]:41000")) && flows.contains(&format!("[{GW6}]:{port}")),
            "port-list shows the IPv6 flow: {flows}"
        );
    });
    assert_eq!(peer.ip(), std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), "the gateway's IPv6 address is the host's ::1");
    assert!(wait_until(T, || socket_nat(&d)["tcp_flows"] == 0), "the flow is gone after both FINs");

    // A closed port on ::1: RST at once, over IPv6.
    let closed = TcpListener::bind("[::1]:0").unwrap();
    let cport = closed.local_addr().unwrap().port();
    drop(closed);
    g.tcp(GW6, 41001, cport, 9000, None, SYN, &[]);
    let Some(In6::Tcp { rst: true, ack, dport: 41001, .. }) = g.recv(T) else { panic!("a RST for the refused port") };
    assert_eq!(ack, 9001);

    // The host's own global address, if it has one.
    match host_global_ipv6() {
        None => println!("skipped the host-global part: this machine has no global IPv6 address"),
        Some(ip) => {
            let l = TcpListener::bind(std::net::SocketAddr::new(ip.into(), 0)).expect("a server on the host's IPv6 address");
            let port = l.local_addr().unwrap().port();
            let peer = tcp6_round_trip(&mut g, &l, ip, port, 41002, || {});
            assert_eq!(peer.ip(), std::net::IpAddr::V6(ip), "vunet's socket came from the host's own address");
        }
    }
}

#[test]
fn ipv6_udp_echo_port_unreachable_and_what_is_never_carried() {
    let dir = TempDir::new("snat-drv-v6udp");
    let (d, sock) = start6(dir.path());
    let mut g = Guest6::connect(&sock);
    ready(&d);
    let server = std::net::UdpSocket::bind("[::1]:0").unwrap();
    server.set_read_timeout(Some(T)).unwrap();
    let port = server.local_addr().unwrap().port();
    g.udp(GW6, 5300, port, b"ping6");
    let mut b = [0u8; 64];
    let (n, from) = server.recv_from(&mut b).expect("the datagram reached the host's ::1");
    assert_eq!(&b[..n], b"ping6");
    server.send_to(b"pong6", from).unwrap();
    let Some(In6::Udp { src, dport, payload }) = g.recv(T) else { panic!("the answer") };
    assert_eq!((src, dport, payload.as_slice()), (std::net::SocketAddr::new(GW6.into(), port), 5300, &b"pong6"[..]));

    // Nobody on the port: the host's port unreachable comes back as ICMPv6 port unreachable.
    let gone = std::net::UdpSocket::bind("[::1]:0").unwrap();
    let gport = gone.local_addr().unwrap().port();
    drop(gone);
    g.udp(GW6, 5301, gport, b"anyone?");
    let Some(In6::Icmp { src, ty: 1, code: 4 }) = g.recv(T) else { panic!("ICMPv6 port unreachable") };
    assert_eq!(src, GW6);

    // Link-local, multicast and IPv4-mapped destinations are never carried: counted, silent.
    // (An AF_INET6 socket would reach 127.0.0.1 through ::ffff:127.0.0.1: it must not.)
    let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    v4.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let v4port = v4.local_addr().unwrap().port();
    let before = drops(&d, "unroutable");
    for dst in ["fe80::1", "ff0e::1", "::ffff:127.0.0.1"] {
        g.udp(dst.parse().unwrap(), 5302, v4port, b"no");
    }
    assert!(wait_until(T, || drops(&d, "unroutable") == before + 3), "{}", socket_nat(&d));
    assert!(v4.recv_from(&mut b).is_err(), "nothing reached the host's IPv4 loopback");
    assert!(g.recv(Duration::from_millis(300)).is_none(), "nothing comes back");
}

#[test]
fn forwards_listening_on_ipv6_reach_an_ipv4_guest_from_the_gateways_address() {
    let dir = TempDir::new("snat-drv-fwd6");
    let tport = TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
    let uport = std::net::UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap().port();
    let nat = format!(
        "[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.200\"]\nhosts = [{{ mac = \"52:54:00:00:0d:01\", ip = \"{IP_A}\" }}]\n\
         [[network.port_forward]]\nproto = \"tcp\"\nport = {tport}\nlisten = \"::1\"\nto = \"{IP_A}:22\"\n\
         [[network.port_forward]]\nproto = \"udp\"\nport = {uport}\nlisten = \"::1\"\nto = \"{IP_A}:53\"\n"
    );
    let (d, socks) = start(dir.path(), 1, &nat);
    let mut g = Guest::connect(&socks[0], MAC_A, IP_A);
    ready(&d);
    // Any frame tells the switch where the reserved MAC is (a RST: nothing answers it).
    g.send_tcp(40000, 9, 1, 0, RST, 0, &[], &[]);

    // TCP: an IPv6 client on the host's ::1; the IPv4 guest sees the gateway's address.
    let mut client = TcpStream::connect(("::1", tport)).expect("the forward listens on ::1");
    client.set_read_timeout(Some(T)).unwrap();
    let syn = g.expect(22, "the forward's SYN");
    assert!(syn.has(SYN) && !syn.has(ACK), "{syn:?}");
    assert_eq!(syn.src, GW, "an IPv6 peer appears as the gateway's IPv4 address");
    assert_eq!(syn.sport, client.local_addr().unwrap().port(), "with the peer's own port");
    g.send_tcp(22, syn.sport, 500, syn.seq.wrapping_add(1), SYN | ACK, 65535, &MSS_OPT, &[]);
    let ack = g.expect(22, "the ACK of the guest's SYN-ACK");
    assert_eq!(ack.ack, 501);
    client.write_all(b"hi guest").unwrap();
    let data = g.expect(22, "the client's data");
    assert_eq!(data.payload, b"hi guest");
    g.send_tcp(22, syn.sport, 501, data.seq.wrapping_add(8), ACK | PSH, 65535, &[], b"hi v6 client");
    assert_eq!(read_exact(&mut client, 12), b"hi v6 client");

    // UDP: a datagram from ::1 reaches the guest from the gateway; the answer goes back to the
    // client's IPv6 socket.
    let c = std::net::UdpSocket::bind("[::1]:0").unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.send_to(b"query", ("::1", uport)).unwrap();
    let deadline = Instant::now() + T;
    let (from, payload) = loop {
        let (_, f) = g.vm.recv(deadline.saturating_duration_since(Instant::now())).expect("the datagram");
        let Ok(p) = etherparse::SlicedPacket::from_ethernet(&f) else { continue };
        if let Some(etherparse::TransportSlice::Udp(u)) = &p.transport {
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4 to the IPv4 guest") };
            assert_eq!((ip.header().destination_addr(), u.destination_port()), (IP_A, 53));
            break ((ip.header().source_addr(), u.source_port()), u.payload().to_vec());
        }
    };
    assert_eq!(from, (GW, c.local_addr().unwrap().port()));
    assert_eq!(payload, b"query");
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, gateway_mac(NET))
        .ipv4(IP_A.octets(), GW.octets(), 64)
        .udp(53, from.1)
        .write(&mut v, b"answer")
        .unwrap();
    g.vm.send(&v);
    let mut b = [0u8; 64];
    let (n, src) = c.recv_from(&mut b).expect("the guest's answer");
    assert_eq!((&b[..n], src.port()), (&b"answer"[..], uport), "from the forwarded port");
    drop(d);
}
