//! The TCP splice driven as a guest would: guest segments built with etherparse, every frame
//! the flow emits parsed with etherparse and its checksum verified; the host socket is a fake
//! that keeps received data until discarded, as a kernel socket does.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};

use super::tcp::{HostIo, HostOp, State, TcpConfig};
use super::*;
use crate::checksum::{finish, pseudo_v4, sum};
use crate::offload::complete_checksum;
use crate::vnet::{RxCaps, VnetHeader, F_NEEDS_CSUM, GSO_TCPV4};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const GW_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 1];
const GUEST_IP: [u8; 4] = [192, 168, 122, 10];
const REMOTE_IP: [u8; 4] = [10, 1, 2, 3];
const GPORT: u16 = 40000;
const RPORT: u16 = 80;
const GISN: u32 = 1000;

fn remote() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(REMOTE_IP), RPORT))
}

/// The host socket: what the guest wrote, what the remote sent (still in the receive buffer).
#[derive(Default)]
struct Sock {
    written: Vec<u8>,
    writes: Vec<usize>,
    /// Bytes the send buffer still takes.
    space: usize,
    rx: Vec<u8>,
    peeks: Vec<usize>,
}

impl HostIo for Sock {
    fn write(&mut self, d: &[u8]) -> usize {
        let n = d.len().min(self.space);
        self.space -= n;
        self.written.extend_from_slice(&d[..n]);
        self.writes.push(n);
        n
    }
    fn peek(&mut self, off: usize, buf: &mut [u8]) -> usize {
        self.peeks.push(off);
        if off >= self.rx.len() {
            return 0;
        }
        let n = buf.len().min(self.rx.len() - off);
        buf[..n].copy_from_slice(&self.rx[off..off + n]);
        n
    }
}

/// A frame from the flow, parsed.
#[derive(Debug, Clone)]
struct Out {
    seq: u32,
    ack: u32,
    syn: bool,
    fin: bool,
    rst: bool,
    window: u16,
    payload: Vec<u8>,
    vnet: VnetHeader,
    mss: Option<u16>,
    wscale: Option<u8>,
    icmp: Option<(u8, u8)>,
}

/// Parses a frame to the guest with etherparse and checks its checksums (completing a partial
/// one first, as the guest would).
fn parse_out(frame: &[u8], vnet: VnetHeader) -> Out {
    let mut f = frame.to_vec();
    if vnet.flags & F_NEEDS_CSUM != 0 {
        complete_checksum(&mut f, vnet.csum_start as usize, vnet.csum_offset as usize).unwrap();
    }
    assert_eq!(finish(sum(&f[14..34], 0)), 0, "IP header checksum");
    let p = SlicedPacket::from_ethernet(&f).expect("etherparse parses the frame");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    let (src, dst) = (ip.header().source(), ip.header().destination());
    assert_eq!(dst, GUEST_IP);
    assert_eq!(&f[0..6], &GUEST_MAC);
    assert_eq!(&f[6..12], &GW_MAC);
    match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            assert_eq!(src, REMOTE_IP);
            let l4 = &f[34..];
            assert_eq!(finish(sum(l4, pseudo_v4(&src, &dst, 6, l4.len() as u16))), 0, "TCP checksum");
            let (mut mss, mut wscale) = (None, None);
            for o in t.options_iterator() {
                match o.unwrap() {
                    TcpOptionElement::MaximumSegmentSize(m) => mss = Some(m),
                    TcpOptionElement::WindowScale(w) => wscale = Some(w),
                    _ => {}
                }
            }
            assert_eq!(t.source_port(), RPORT);
            Out {
                seq: t.sequence_number(),
                ack: t.acknowledgment_number(),
                syn: t.syn(),
                fin: t.fin(),
                rst: t.rst(),
                window: t.window_size(),
                payload: t.payload().to_vec(),
                vnet,
                mss,
                wscale,
                icmp: None,
            }
        }
        Some(TransportSlice::Icmpv4(i)) => {
            assert_eq!(finish(sum(&f[34..], 0)), 0, "ICMP checksum");
            let b = i.slice();
            Out {
                seq: 0,
                ack: 0,
                syn: false,
                fin: false,
                rst: false,
                window: 0,
                payload: b[8..].to_vec(),
                vnet,
                mss: None,
                wscale: None,
                icmp: Some((b[0], b[1])),
            }
        }
        _ => panic!("unexpected transport"),
    }
}

/// A guest segment.
#[derive(Clone, Copy, Default)]
struct G {
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    window: u16,
    opts: bool,
    sport: u16,
    src: Option<[u8; 4]>,
}

fn gframe(g: G, payload: &[u8]) -> Vec<u8> {
    let src = g.src.unwrap_or(GUEST_IP);
    let sport = if g.sport == 0 { GPORT } else { g.sport };
    let mut b = PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv4(src, REMOTE_IP, 64).tcp(sport, RPORT, g.seq, g.window);
    if g.syn {
        b = b.syn();
    }
    if g.fin {
        b = b.fin();
    }
    if g.rst {
        b = b.rst();
    }
    if let Some(a) = g.ack {
        b = b.ack(a);
    }
    if g.opts {
        b = b.options(&[TcpOptionElement::MaximumSegmentSize(1460), TcpOptionElement::Noop, TcpOptionElement::WindowScale(7)]).unwrap();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

struct H {
    table: TcpTable,
    id: FlowId,
    sock: Sock,
    caps: RxCaps,
    now: u64,
    ops: Vec<HostOp>,
    buf: Vec<u8>,
    /// Our next sequence number as the guest, and what we acknowledged.
    gseq: u32,
}

impl H {
    fn new(caps: RxCaps) -> H {
        H::with(caps, TcpTableConfig::default())
    }

    fn with(caps: RxCaps, cfg: TcpTableConfig) -> H {
        H {
            table: TcpTable::new(cfg, 0x1234_5678),
            id: usize::MAX,
            sock: Sock::default(),
            caps,
            now: 1000,
            ops: Vec::new(),
            buf: vec![0; 65536 + 64],
            gseq: GISN + 1,
        }
    }

    fn flow(&mut self) -> &mut tcp::TcpFlow {
        self.table.flow_mut(self.id).unwrap()
    }

    /// Sends a guest frame; returns the frames that came back.
    fn send(&mut self, frame: &[u8], vnet: &VnetHeader) -> Vec<Out> {
        let mut out = vec![0u8; 128];
        let mut res = Vec::new();
        match self.table.input(frame, vnet, self.now, &mut out) {
            Input::Segment(id, seg) => {
                self.id = id;
                let mut sock = std::mem::take(&mut self.sock);
                self.table.flow_mut(id).unwrap().on_segment(&seg, self.now, &mut sock);
                self.sock = sock;
            }
            Input::Opened(id) => self.id = id,
            Input::Reply(n, _) => res.push(parse_out(&out[..n], VnetHeader::default())),
            Input::Dropped(_) => {}
        }
        res.extend(self.drain());
        res
    }

    fn seg(&mut self, g: G, payload: &[u8]) -> Vec<Out> {
        let f = gframe(g, payload);
        self.send(&f, &VnetHeader::default())
    }

    /// Guest data at its next sequence number, acknowledging `ack`.
    fn data(&mut self, ack: u32, payload: &[u8]) -> Vec<Out> {
        self.seg(G { seq: self.gseq, ack: Some(ack), window: 1000, ..G::default() }, payload)
    }

    /// A pure ACK from the guest with window field `wnd` (scaled by 7).
    fn ack(&mut self, ack: u32, wnd: u16) -> Vec<Out> {
        self.seg(G { seq: self.gseq, ack: Some(ack), window: wnd, ..G::default() }, &[])
    }

    /// Drains host operations (applying discards to the socket) and frames.
    fn drain(&mut self) -> Vec<Out> {
        let mut res = Vec::new();
        let Some(f) = self.table.flow_mut(self.id) else { return res };
        while let Some(op) = f.poll_host() {
            if let HostOp::Discard(n) = op {
                assert!(n <= self.sock.rx.len(), "discard {n} of {}", self.sock.rx.len());
                self.sock.rx.drain(..n);
            }
            self.ops.push(op);
        }
        loop {
            let mut sock = std::mem::take(&mut self.sock);
            let r = self.table.flow_mut(self.id).unwrap().poll_frame(self.now, &self.caps, &mut self.buf, &mut sock);
            self.sock = sock;
            match r {
                Some(t) => res.push(parse_out(&self.buf[..t.len], t.vnet)),
                None => break,
            }
            assert!(res.len() < 1000, "runaway output");
        }
        res
    }

    fn tick(&mut self, dt: u64) -> Vec<Out> {
        self.now += dt;
        let now = self.now;
        self.flow().tick(now);
        self.drain()
    }

    fn take_ops(&mut self) -> Vec<HostOp> {
        std::mem::take(&mut self.ops)
    }

    /// SYN, connect, SYN-ACK, ACK: an established flow with this send space; returns our ISN.
    fn establish(&mut self, space: usize) -> u32 {
        let out = self.seg(G { seq: GISN, syn: true, window: 64240, opts: true, ..G::default() }, &[]);
        assert!(out.is_empty());
        assert_eq!(self.take_ops(), vec![HostOp::Connect(remote())]);
        self.sock.space = space;
        self.flow().set_host_send_space(space);
        let now = self.now;
        self.flow().connected(now);
        let out = self.drain();
        assert_eq!(out.len(), 1);
        let sa = &out[0];
        assert!(sa.syn && !sa.rst);
        assert_eq!(sa.ack, GISN + 1);
        let iss = sa.seq;
        let out = self.ack(iss + 1, 2000);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(self.flow().state(), State::Established);
        iss + 1
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn handshake_waits_for_the_host_connect() {
    let mut h = H::new(RxCaps::NONE);
    let out = h.seg(G { seq: GISN, syn: true, window: 64240, opts: true, ..G::default() }, &[]);
    assert!(out.is_empty(), "no SYN-ACK before the host connects");
    assert_eq!(h.take_ops(), vec![HostOp::Connect(remote())]);
    // The guest resends its SYN: no second connect, still silence.
    assert!(h.seg(G { seq: GISN, syn: true, window: 64240, opts: true, ..G::default() }, &[]).is_empty());
    assert!(h.take_ops().is_empty());
    h.flow().set_host_send_space(200_000);
    let now = h.now;
    h.flow().connected(now);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    let sa = &out[0];
    assert!(sa.syn && !sa.fin && !sa.rst);
    assert_eq!(sa.ack, GISN + 1);
    assert_eq!(sa.mss, Some(1460));
    assert_eq!(sa.wscale, Some(tcp::WSCALE));
    // A SYN's window is never scaled.
    assert_eq!(sa.window, 65535);
    // The SYN-ACK is lost: the guest's SYN again brings it back.
    let again = h.seg(G { seq: GISN, syn: true, window: 64240, opts: true, ..G::default() }, &[]);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].seq, sa.seq);
    assert!(h.ack(sa.seq + 1, 2000).is_empty());
    assert_eq!(h.flow().state(), State::Established);
}

#[test]
fn synack_retransmitted_on_timeout() {
    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 64240, opts: true, ..G::default() }, &[]);
    let now = h.now;
    h.flow().connected(now);
    let first = h.drain();
    assert_eq!(first.len(), 1);
    assert!(h.tick(999).is_empty());
    let again = h.tick(1);
    assert_eq!(again.len(), 1);
    assert!(again[0].syn);
    assert_eq!(again[0].seq, first[0].seq);
}

#[test]
fn refused_connect_resets_the_guest() {
    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 64240, ..G::default() }, &[]);
    h.take_ops();
    h.flow().refused();
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(out[0].ack, GISN + 1, "the RST acknowledges the SYN, so SYN-SENT takes it");
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: false }]);
    assert!(h.flow().is_done());
    let id = h.id;
    h.table.remove(id).unwrap();
    assert!(h.table.is_empty());
    assert_eq!(h.table.counters().refused, 1);
}

#[test]
fn unreachable_is_icmp_or_silence_as_the_io_layer_says() {
    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 64240, ..G::default() }, &[]);
    h.flow().unreachable(Some(1));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].icmp, Some((3, 1)));
    // The quote: the guest's IP header to the remote, then its ports and ISN.
    let q = &out[0].payload;
    assert_eq!(&q[12..16], &GUEST_IP);
    assert_eq!(&q[16..20], &REMOTE_IP);
    assert_eq!(u16::from_be_bytes([q[20], q[21]]), GPORT);
    assert_eq!(u32::from_be_bytes([q[24], q[25], q[26], q[27]]), GISN);
    assert!(h.flow().is_done());

    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 64240, ..G::default() }, &[]);
    h.take_ops();
    h.flow().unreachable(None);
    assert!(h.drain().is_empty());
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: false }]);

    // Our own connect time-out: silence too, and the socket goes.
    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 64240, ..G::default() }, &[]);
    h.take_ops();
    assert!(h.tick(TcpConfig::default().connect_timeout_ms - 1).is_empty());
    assert!(h.take_ops().is_empty());
    assert!(h.tick(1).is_empty());
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }]);
    assert!(h.flow().is_done());
    assert_eq!(h.table.counters().connect_timeouts, 1);
}

#[test]
fn guest_data_goes_to_the_host_and_is_acked_for_what_the_socket_took() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    let d = pattern(1000);
    let out = h.data(iss, &d);
    assert_eq!(h.sock.written, d);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, GISN + 1 + 1000);
    h.gseq += 1000;
    // The socket takes only 300 of the next 1000: only 300 are acknowledged.
    h.sock.space = 300;
    let d2 = pattern(1000);
    let out = h.data(iss, &d2);
    assert_eq!(h.sock.written.len(), 1300);
    assert_eq!(out.last().unwrap().ack, GISN + 1 + 1300);
    // The socket drains; the window update comes with three duplicates, so the guest resends
    // the 700 bytes at once instead of on its RTO.
    h.sock.space = 100_000;
    h.flow().set_host_send_space(100_000);
    let out = h.drain();
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(out.iter().all(|o| o.ack == GISN + 1 + 1300 && o.payload.is_empty()));
    assert_eq!(out[0].window as u32, 100_000 >> tcp::WSCALE);
    // The guest resends from the ACK: the rest goes through.
    h.gseq += 300;
    h.data(iss, &d2[300..]);
    assert_eq!(h.sock.written[1000..], d2[..]);
}

#[test]
fn window_follows_the_host_send_space() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(50_000);
    let out = h.data(iss, &pattern(10));
    assert_eq!(out[0].window as u32, (50_000 - 10) >> tcp::WSCALE);
    h.gseq += 10;
    // The socket's buffer fills: the window closes.
    h.sock.space = 0;
    h.flow().set_host_send_space(0);
    let out = h.data(iss, &pattern(100));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].window, 0, "zero window");
    assert_eq!(h.sock.written.len(), 10, "nothing more written");
    // The guest's zero-window probe: taken by nobody, answered with the same ACK.
    let out = h.data(iss, &[1]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, GISN + 1 + 10);
    assert_eq!(out[0].window, 0);
    assert_eq!(h.sock.written.len(), 10);
    // Space again: the guest hears at once.
    h.sock.space = 80_000;
    h.flow().set_host_send_space(80_000);
    let out = h.drain();
    assert!(!out.is_empty());
    assert_eq!(out[0].window as u32, 80_000 >> tcp::WSCALE);
    h.data(iss, &pattern(100));
    assert_eq!(h.sock.written.len(), 110);
}

#[test]
fn data_beyond_the_offered_window_is_cut_and_counted() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(1000);
    // The SYN-ACK offered 1000 bytes (a SYN's window is not scaled).
    h.sock.space = 100_000;
    let out = h.data(iss, &pattern(2000));
    assert_eq!(h.sock.written.len(), 1000);
    assert_eq!(out.last().unwrap().ack, GISN + 1 + 1000);
    assert_eq!(out.last().unwrap().window, 0);
    assert_eq!(h.table.counters().dropped(Drop::BeyondWindow), 1);
    // Entirely past the edge: nothing taken, the same ACK again.
    h.gseq += 1000;
    let out = h.data(iss, &pattern(10));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, GISN + 1 + 1000);
    assert_eq!(h.sock.written.len(), 1000);
    assert_eq!(h.table.counters().dropped(Drop::BeyondWindow), 2);
}

#[test]
fn host_data_is_peeked_and_discarded_when_the_guest_acks() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    let data = pattern(5000);
    h.sock.peeks.clear();
    h.sock.rx = data.clone();
    let out = h.drain();
    // MSS-sized segments (the guest's MSS, 1460) until the socket is empty.
    let sizes: Vec<usize> = out.iter().map(|o| o.payload.len()).collect();
    assert_eq!(sizes, vec![1460, 1460, 1460, 620]);
    assert!(out.iter().all(|o| o.vnet == VnetHeader::default()), "complete checksums, no GSO");
    let got: Vec<u8> = out.iter().flat_map(|o| o.payload.clone()).collect();
    assert_eq!(got, data);
    assert_eq!(out[1].seq, iss + 1460);
    assert_eq!(&h.sock.peeks[..4], &[0, 1460, 2920, 4380]);
    assert_eq!(h.flow().peek_offset(), 5000);
    // Nothing was consumed from the socket before the guest acknowledged it.
    assert_eq!(h.sock.rx.len(), 5000);
    h.ack(iss + 2920, 2000);
    assert_eq!(h.take_ops(), vec![HostOp::Discard(2920)]);
    assert_eq!(h.sock.rx.len(), 2080);
    assert_eq!(h.flow().peek_offset(), 2080);
    h.ack(iss + 5000, 2000);
    assert_eq!(h.take_ops(), vec![HostOp::Discard(2080)]);
    assert!(h.sock.rx.is_empty());
    assert_eq!(h.flow().peek_offset(), 0);
}

#[test]
fn host_data_stops_at_the_guest_window() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    // A window of 3000 bytes (scaled by the guest's shift of 7: field 23 = 2944 bytes).
    h.ack(iss, 23);
    h.sock.rx = pattern(10_000);
    let out = h.drain();
    let total: usize = out.iter().map(|o| o.payload.len()).sum();
    assert_eq!(total, 23 << 7);
    assert!(!h.flow().wants_host_data());
    let out = h.ack(iss + 1460, 23);
    let more: usize = out.iter().map(|o| o.payload.len()).sum();
    assert_eq!(more, 1460, "the window slid by what was acknowledged");
}

#[test]
fn fast_retransmit_after_three_duplicate_acks() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.sock.rx = pattern(4 * 1460);
    let out = h.drain();
    assert_eq!(out.len(), 4);
    // The second segment is lost: the guest acknowledges the first, then repeats that ACK.
    assert!(h.ack(iss + 1460, 2000).is_empty());
    assert!(h.ack(iss + 1460, 2000).is_empty());
    assert!(h.ack(iss + 1460, 2000).is_empty());
    let out = h.ack(iss + 1460, 2000);
    assert!(!out.is_empty(), "third duplicate retransmits");
    assert_eq!(out[0].seq, iss + 1460);
    assert_eq!(out[0].payload, pattern(4 * 1460)[1460..2920]);
    assert_eq!(out.len(), 3, "go-back-N: everything after the hole again");
    assert_eq!(h.table.counters().fast_retransmits, 1);
    // More duplicates of the same ACK do not start another round.
    assert!(h.ack(iss + 1460, 2000).is_empty());
    assert!(h.ack(iss + 1460, 2000).is_empty());
    assert!(h.ack(iss + 1460, 2000).is_empty());
    h.ack(iss + 4 * 1460, 2000);
    assert_eq!(h.sock.rx.len(), 0);
}

#[test]
fn retransmission_on_rto_with_backoff() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.sock.rx = pattern(1000);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert!(h.tick(999).is_empty());
    let out = h.tick(1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].seq, iss);
    assert_eq!(out[0].payload, pattern(1000));
    // Backed off: the next one after 2 s, not 1 s.
    assert!(h.tick(1999).is_empty());
    assert_eq!(h.tick(1).len(), 1);
    assert_eq!(h.table.counters().rto_retransmits, 2);
    // Progress ends it.
    h.ack(iss + 1000, 2000);
    assert!(h.tick(10_000).is_empty());
}

#[test]
fn retries_exhausted_reset_both_sides() {
    let mut h =
        H::with(RxCaps::NONE, TcpTableConfig { tcp: TcpConfig { max_retries: 2, ..TcpConfig::default() }, ..TcpTableConfig::default() });
    h.establish(100_000);
    h.sock.rx = pattern(100);
    h.drain();
    assert_eq!(h.tick(1000).len(), 1);
    assert_eq!(h.tick(2000).len(), 1);
    let out = h.tick(4000);
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }]);
}

#[test]
fn zero_window_from_the_guest_persists_then_resumes() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.ack(iss, 0);
    h.sock.rx = pattern(3000);
    assert!(h.drain().is_empty(), "no data into a zero window");
    assert!(!h.flow().wants_host_data());
    let probe = h.tick(1000);
    assert_eq!(probe.len(), 1);
    assert!(probe[0].payload.is_empty());
    assert_eq!(probe[0].seq, iss.wrapping_sub(1), "a probe below the window makes the guest answer");
    // The guest answers, still closed; the next probe backs off.
    h.ack(iss, 0);
    assert!(h.tick(1999).is_empty());
    assert_eq!(h.tick(1).len(), 1);
    assert_eq!(h.table.counters().persist_probes, 2);
    // The window opens: data flows.
    let out = h.ack(iss, 2000);
    let total: usize = out.iter().map(|o| o.payload.len()).sum();
    assert_eq!(total, 3000);
}

#[test]
fn out_of_order_guest_data_gets_a_duplicate_ack_and_goes_nowhere() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    let out = h.seg(G { seq: GISN + 1 + 500, ack: Some(iss), window: 1000, ..G::default() }, &pattern(100));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, GISN + 1, "duplicate ACK for the hole");
    assert!(h.sock.written.is_empty());
    assert_eq!(h.table.counters().dropped(Drop::OutOfOrder), 1);
}

#[test]
fn retransmitted_guest_data_is_acked_again_not_written_twice() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    let d = pattern(800);
    h.data(iss, &d);
    let out = h.data(iss, &d);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, GISN + 1 + 800);
    assert_eq!(h.sock.written, d);
    assert_eq!(h.table.counters().guest_retransmits, 1);
    // A partial overlap: only the new tail goes to the socket.
    let mut more = d[400..].to_vec();
    more.extend_from_slice(&pattern(200));
    h.seg(G { seq: GISN + 1 + 400, ack: Some(iss), window: 1000, ..G::default() }, &more);
    assert_eq!(h.sock.written.len(), 1000);
    assert_eq!(h.sock.written[800..], pattern(200)[..]);
}

#[test]
fn guest_fin_half_closes_then_host_finishes() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.gseq += 0;
    let out = h.seg(G { seq: h.gseq, ack: Some(iss), fin: true, window: 1000, ..G::default() }, &pattern(10));
    assert_eq!(h.sock.written.len(), 10);
    assert_eq!(out.last().unwrap().ack, GISN + 1 + 11, "data and FIN acknowledged");
    assert_eq!(h.take_ops(), vec![HostOp::ShutdownWrite]);
    // The host side still talks.
    h.sock.rx = pattern(300);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload.len(), 300);
    // The remote closes: our FIN follows the data at once (no wait for the guest's delayed
    // ACK of it).
    h.flow().host_eof();
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert!(out[0].fin);
    assert_eq!(out[0].seq, iss + 300);
    h.gseq += 11;
    // The guest acknowledges the data first: those bytes go from the socket.
    h.ack(iss + 300, 2000);
    assert_eq!(h.take_ops(), vec![HostOp::Discard(300)]);
    assert_eq!(h.flow().peek_offset(), 0);
    // Then our FIN: over, no TIME_WAIT here.
    h.ack(iss + 301, 2000);
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: false }]);
    assert!(h.flow().is_done());
}

#[test]
fn host_fin_first_then_guest_keeps_sending() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.sock.rx = pattern(100);
    h.flow().host_eof();
    let out = h.drain();
    assert_eq!(out.len(), 2, "the data, then our FIN right behind it");
    assert!(!out[0].fin && out[0].payload.len() == 100);
    assert!(out[1].fin && out[1].seq == iss + 100);
    // One ACK for both: the data's bytes are discarded, the FIN is no byte of the socket.
    h.ack(iss + 101, 2000);
    assert_eq!(h.take_ops(), vec![HostOp::Discard(100)]);
    assert_eq!(h.flow().peek_offset(), 0, "our FIN, acknowledged, is no byte of the socket");
    // Half-closed the other way: the guest still sends.
    let out = h.data(iss + 101, &pattern(50));
    assert_eq!(h.sock.written.len(), 50);
    assert_eq!(out[0].ack, GISN + 1 + 50);
    h.gseq += 50;
    // The lost FIN is resent on the RTO... it was acknowledged, so nothing goes out.
    assert!(h.tick(5000).is_empty());
    h.seg(G { seq: h.gseq, ack: Some(iss + 101), fin: true, window: 1000, ..G::default() }, &[]);
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: false }]);
    assert!(h.flow().is_done());
}

#[test]
fn our_fin_is_retransmitted() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.flow().host_eof();
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert!(out[0].fin);
    let out = h.tick(1000);
    assert_eq!(out.len(), 1);
    assert!(out[0].fin);
    assert_eq!(out[0].seq, iss);
}

#[test]
fn guest_rst_aborts_the_socket_and_a_blind_one_is_ignored() {
    let mut h = H::new(RxCaps::NONE);
    h.establish(100_000);
    h.seg(G { seq: GISN + 1 + 10_000_000, rst: true, ..G::default() }, &[]);
    assert!(h.take_ops().is_empty());
    assert_eq!(h.table.counters().dropped(Drop::BadRst), 1);
    h.seg(G { seq: GISN + 1, rst: true, ..G::default() }, &[]);
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }]);
    assert!(h.flow().is_done());
}

#[test]
fn host_reset_resets_the_guest() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.establish(100_000);
    h.flow().host_reset();
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(out[0].seq, iss);
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: false }]);
    assert!(h.flow().is_done());
}

#[test]
fn idle_flows_are_reset() {
    let mut h = H::new(RxCaps::NONE);
    h.establish(100_000);
    let out = h.tick(TcpConfig::default().idle_timeout_ms);
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }]);
    assert_eq!(h.table.counters().idle_timeouts, 1);
}

#[test]
fn a_64k_tso_segment_from_the_guest_is_one_write() {
    let mut h = H::new(RxCaps::FULL);
    let iss = h.establish(1 << 20);
    let d = pattern(64_000);
    let mut f = gframe(G { seq: h.gseq, ack: Some(iss), window: 1000, ..G::default() }, &d);
    // As a guest kernel hands a TSO frame over: a stale total length is allowed.
    f[16..18].copy_from_slice(&[0, 0]);
    let vnet = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let out = h.send(&f, &vnet);
    assert_eq!(h.sock.writes, vec![64_000]);
    assert_eq!(h.sock.written, d);
    assert_eq!(out.last().unwrap().ack, GISN + 1 + 64_000);
}

#[test]
fn host_data_to_a_tso_guest_goes_as_64k_frames() {
    let mut h = H::new(RxCaps::FULL);
    let iss = h.establish(100_000);
    h.ack(iss, 8192); // 1 MiB window
    let data = pattern(200_000);
    h.sock.rx = data.clone();
    let out = h.drain();
    let sizes: Vec<usize> = out.iter().map(|o| o.payload.len()).collect();
    assert_eq!(sizes, vec![65495, 65495, 65495, 3515]);
    for o in &out {
        assert_eq!(o.vnet.gso_type, GSO_TCPV4);
        assert_eq!(o.vnet.gso_size, 1460);
        assert_eq!(o.vnet.hdr_len, 54);
        assert_eq!(o.vnet.flags, F_NEEDS_CSUM);
    }
    let got: Vec<u8> = out.iter().flat_map(|o| o.payload.clone()).collect();
    assert_eq!(got, data);
}

#[test]
fn host_data_to_a_csum_only_guest_is_mss_sized_with_partial_checksums() {
    let caps = RxCaps { tso4: false, tso6: false, ..RxCaps::FULL };
    let mut h = H::new(caps);
    let iss = h.establish(100_000);
    h.ack(iss, 8192);
    h.sock.rx = pattern(10_000);
    let out = h.drain();
    assert!(out.iter().all(|o| o.payload.len() <= 1460 && o.vnet.gso_type == 0 && o.vnet.flags == F_NEEDS_CSUM));
    assert_eq!(out.iter().map(|o| o.payload.len()).sum::<usize>(), 10_000);
}

#[test]
fn share_per_guest_bounds_syn_floods_without_evicting() {
    let cfg = TcpTableConfig { max_connections: 6, max_per_guest: 4, tcp: TcpConfig::default() };
    let mut h = H::with(RxCaps::NONE, cfg);
    for p in 0..4 {
        let out = h.seg(G { seq: 1, syn: true, window: 100, sport: 1000 + p, ..G::default() }, &[]);
        assert!(out.is_empty());
    }
    // The fifth SYN of this guest: RST, counted.
    let mut out = vec![0u8; 128];
    let f = gframe(G { seq: 77, syn: true, window: 100, sport: 2000, ..G::default() }, &[]);
    match h.table.input(&f, &VnetHeader::default(), h.now, &mut out) {
        Input::Reply(n, Drop::ShareExceeded) => {
            let r = parse_out(&out[..n], VnetHeader::default());
            assert!(r.rst);
            assert_eq!(r.ack, 78);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.table.len(), 4);
    assert_eq!(h.table.counters().dropped(Drop::ShareExceeded), 1);
    // Another guest still gets in, up to the network's bound.
    let other = [192, 168, 122, 11];
    for p in 0..2 {
        let f = gframe(G { seq: 1, syn: true, window: 100, sport: 3000 + p, src: Some(other), ..G::default() }, &[]);
        assert!(matches!(h.table.input(&f, &VnetHeader::default(), h.now, &mut out), Input::Opened(_)));
    }
    let f = gframe(G { seq: 1, syn: true, window: 100, sport: 3002, src: Some(other), ..G::default() }, &[]);
    assert!(matches!(h.table.input(&f, &VnetHeader::default(), h.now, &mut out), Input::Reply(_, Drop::TableFull)));
    assert_eq!(h.table.len(), 6);
    assert_eq!(h.table.guest_flows(std::net::IpAddr::V4(Ipv4Addr::from(GUEST_IP))), 4);
    // A flow that ends frees its place in both bounds.
    let id = h.table.get(&FlowKey { guest: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), 1000)), remote: remote() }).unwrap();
    h.table.remove(id);
    assert!(matches!(h.table.input(&f, &VnetHeader::default(), h.now, &mut out), Input::Opened(_)));
}

#[test]
fn segments_for_no_flow_get_rst() {
    let mut h = H::new(RxCaps::NONE);
    let out = h.seg(G { seq: 5, ack: Some(999), window: 100, ..G::default() }, &pattern(10));
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(out[0].seq, 999);
    // Never a RST for a RST.
    assert!(h.seg(G { seq: 5, rst: true, ..G::default() }, &[]).is_empty());
    assert_eq!(h.table.counters().dropped(Drop::NoFlow), 2);
}

#[test]
fn malformed_frames_are_counted_never_panic() {
    let mut t = TcpTable::new(TcpTableConfig::default(), 1);
    let mut out = vec![0u8; 128];
    let good = gframe(G { seq: 1, syn: true, window: 100, opts: true, ..G::default() }, &[]);
    let none = VnetHeader::default();
    let mut cases: Vec<(Vec<u8>, Drop)> = Vec::new();
    cases.push((good[..20].to_vec(), Drop::ShortFrame));
    let mut f = good.clone();
    f[12] = 0x86;
    cases.push((f, Drop::NotIp));
    let mut f = good.clone();
    f[14] = 0x44; // IHL 16 bytes
    cases.push((f, Drop::BadIpHeader));
    let mut f = good.clone();
    f[16..18].copy_from_slice(&9000u16.to_be_bytes()); // total length past the frame
    cases.push((f, Drop::BadIpHeader));
    let mut f = good.clone();
    f[20] = 0x20; // more fragments (the header checksum is fixed below)
    cases.push((f, Drop::Fragment));
    let mut f = good.clone();
    f[23] = 17;
    cases.push((f, Drop::NotTcp));
    let mut f = good.clone();
    f[34 + 12] = 0xf0; // data offset 60, past the segment
    cases.push((f, Drop::BadTcpHeader));
    let mut f = good.clone();
    f[34 + 12] = 0x40; // data offset 16
    cases.push((f, Drop::BadTcpHeader));
    let mut f = good.clone();
    f[54] = 2;
    f[55] = 40; // MSS option running past the options
    cases.push((f, Drop::BadOptions));
    let mut f = good.clone();
    f[54] = 2;
    f[55] = 3; // MSS option of the wrong length
    cases.push((f, Drop::BadOptions));
    let mut f = good.clone();
    f[54] = 9;
    f[55] = 1; // unknown option of length 1
    cases.push((f, Drop::BadOptions));
    let mut f = good.clone();
    let n = f.len();
    f[n - 1] = 30; // option kind with no length byte (last option byte after NOP padding)
    f[n - 2] = 1;
    f[n - 3] = 1;
    f[n - 4] = 1;
    f[n - 5] = 1;
    f[n - 6] = 1;
    f[n - 7] = 1;
    f[n - 8] = 1;
    cases.push((f, Drop::BadOptions));
    for (i, (mut f, why)) in cases.into_iter().enumerate() {
        if f.len() >= 34 && why != Drop::BadIpHeader {
            // Keep the IP header checksum right so the case tests what it says.
            f[24..26].copy_from_slice(&[0, 0]);
            let c = finish(sum(&f[14..34], 0));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        assert_eq!(t.input(&f, &none, 0, &mut out), Input::Dropped(why), "case {i}");
    }
    assert!(t.is_empty());
    // Garbage of every length, and single-byte mutations of a good frame: no panic.
    let mut x = 0x9e37_79b9u32;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for len in 0..200 {
        let f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        let _ = t.input(&f, &none, 0, &mut out);
    }
    for i in 0..good.len() {
        for v in [0u8, 0xff, 0x5f] {
            let mut f = good.clone();
            f[i] = v;
            if let Input::Opened(id) = t.input(&f, &none, 0, &mut out) {
                t.remove(id);
            }
        }
    }
    assert!(t.counters().drops.iter().sum::<u64>() > 0);
}

#[test]
fn data_before_the_handshake_and_without_ack_is_dropped() {
    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 100, ..G::default() }, &[]);
    h.seg(G { seq: GISN + 1, ack: Some(1), window: 100, ..G::default() }, &pattern(10));
    assert!(h.sock.written.is_empty());
    assert_eq!(h.table.counters().dropped(Drop::BadState), 1);
    let iss = {
        let now = h.now;
        h.flow().set_host_send_space(1000);
        h.flow().connected(now);
        h.drain()[0].seq
    };
    // A wrong ACK of the SYN-ACK does not establish.
    h.ack(iss + 7, 100);
    assert_eq!(h.flow().state(), State::SynAckSent);
    h.ack(iss + 1, 100);
    assert_eq!(h.flow().state(), State::Established);
    // An ACK of data never sent: answered, not believed.
    let out = h.ack(iss + 5000, 100);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].seq, iss + 1);
    assert!(h.take_ops().iter().all(|o| !matches!(o, HostOp::Discard(_))));
    h.seg(G { seq: h.gseq, window: 100, ..G::default() }, &pattern(10));
    assert_eq!(h.table.counters().dropped(Drop::NoAck), 1);
}

#[test]
fn space_reported_late_is_announced_when_the_handshake_completes() {
    let mut h = H::new(RxCaps::NONE);
    h.seg(G { seq: GISN, syn: true, window: 64240, opts: true, ..G::default() }, &[]);
    let now = h.now;
    h.flow().connected(now);
    let sa = h.drain();
    assert_eq!(sa[0].window, 0, "no space reported yet");
    h.flow().set_host_send_space(1 << 20);
    assert!(h.drain().is_empty(), "nothing to say before the handshake completes");
    let out = h.ack(sa[0].seq + 1, 2000);
    assert_eq!(out.len(), 1, "a window update right after the handshake");
    assert_eq!(out[0].window as u32, (1 << 20) >> tcp::WSCALE);
}

#[test]
fn a_new_syn_replaces_a_finished_flow_on_the_same_ports() {
    let mut h = H::new(RxCaps::NONE);
    h.establish(100_000);
    h.seg(G { seq: GISN + 1, rst: true, ..G::default() }, &[]);
    assert!(h.flow().is_done());
    // The I/O layer has not removed it yet; the guest connects again from the same port.
    let old = h.id;
    let out = h.seg(G { seq: 50_000, syn: true, window: 64240, ..G::default() }, &[]);
    assert!(out.is_empty());
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }, HostOp::Connect(remote())]);
    assert_eq!(h.id, old, "the slot is reused");
    assert_eq!(h.flow().state(), State::Connecting);
    assert_eq!(h.table.len(), 1);
}

#[test]
fn a_window_closed_over_data_in_flight_is_probed_not_aborted() {
    let mut h =
        H::with(RxCaps::NONE, TcpTableConfig { tcp: TcpConfig { max_retries: 2, ..TcpConfig::default() }, ..TcpTableConfig::default() });
    let iss = h.establish(100_000);
    h.sock.rx = pattern(3000);
    assert_eq!(h.drain().len(), 3);
    // The guest takes nothing more: its window closes with all of it unacknowledged.
    h.ack(iss, 0);
    let mut dt = 1000;
    for _ in 0..6 {
        let out = h.tick(dt);
        assert_eq!(out.len(), 1, "a probe, not a RST");
        assert!(!out[0].rst && out[0].payload.is_empty());
        h.ack(iss, 0);
        dt = (dt * 2).min(60_000);
    }
    assert!(h.take_ops().is_empty());
    // The window opens: everything goes again from the socket.
    let out = h.ack(iss, 2000);
    assert_eq!(out.iter().map(|o| o.payload.len()).sum::<usize>(), 3000);
    assert_eq!(out[0].seq, iss);
}

// ---- Inbound flows (port forwards) -------------------------------------------------------

fn guest_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), GPORT))
}

fn link() -> wire::Link {
    wire::Link { guest_mac: GUEST_MAC, gw_mac: GW_MAC }
}

impl H {
    /// The host accepted a connection for the guest's GPORT from REMOTE:RPORT; returns our SYN.
    fn inbound(&mut self, space: usize) -> Out {
        self.id = self.table.open_inbound(link(), guest_addr(), remote(), self.now).unwrap();
        self.sock.space = space;
        self.flow().set_host_send_space(space);
        let out = self.drain();
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(self.take_ops().is_empty(), "the socket is connected already");
        out[0].clone()
    }

    /// The guest's SYN-ACK to our SYN.
    fn synack(&mut self, iss: u32, opts: bool, window: u16) -> Vec<Out> {
        self.seg(G { seq: GISN, ack: Some(iss + 1), syn: true, window, opts, ..G::default() }, &[])
    }
}

#[test]
fn inbound_handshake_then_data_both_ways() {
    let mut h = H::new(RxCaps::NONE);
    let syn = h.inbound(200_000);
    assert!(syn.syn && !syn.rst && !syn.fin);
    assert_eq!(syn.ack, 0);
    assert_eq!(syn.mss, Some(1460));
    assert_eq!(syn.wscale, Some(tcp::WSCALE));
    assert_eq!(syn.window, 65535, "a SYN's window is never scaled");
    assert_eq!(h.flow().state(), State::SynSent);
    assert!(h.flow().is_inbound());
    // Host data that arrives before the guest accepted waits in the socket.
    h.sock.rx = pattern(3000);
    assert!(h.drain().is_empty());
    assert!(!h.flow().wants_host_data());
    let iss = syn.seq;
    // The SYN-ACK (MSS 1460, scale 7, window 1000 unscaled): our ACK, then the data.
    let out = h.synack(iss, true, 1000);
    assert_eq!(h.flow().state(), State::Established);
    assert!(!out[0].syn && !out[0].rst);
    assert_eq!(out[0].ack, GISN + 1);
    assert_eq!(out[0].window as u32, 200_000 >> tcp::WSCALE, "our window, scaled from now on");
    let data: Vec<u8> = out.iter().flat_map(|o| o.payload.clone()).collect();
    assert_eq!(data.len(), 1000, "the SYN-ACK's window is not scaled: 1000 bytes");
    assert_eq!(out[0].seq, iss + 1);
    assert!(out.iter().all(|o| o.payload.len() <= 1460));
    // The guest acknowledges with a scaled window: the rest goes.
    let out = h.ack(iss + 1 + 1000, 100);
    assert_eq!(h.take_ops(), vec![HostOp::Discard(1000)]);
    assert_eq!(out.iter().map(|o| o.payload.len()).sum::<usize>(), 2000);
    // Guest to host.
    let d = pattern(500);
    let out = h.data(iss + 3001, &d);
    assert_eq!(h.sock.written, d);
    assert_eq!(out[0].ack, GISN + 1 + 500);
    h.gseq += 500;
    // The guest closes its side: half-close, as for outbound flows.
    h.seg(G { seq: h.gseq, ack: Some(iss + 3001), fin: true, window: 100, ..G::default() }, &[]);
    assert_eq!(h.take_ops(), vec![HostOp::Discard(2000), HostOp::ShutdownWrite]);
}

#[test]
fn inbound_syn_backs_off_then_gives_up() {
    let mut h = H::new(RxCaps::NONE);
    let syn = h.inbound(100_000);
    assert_eq!(h.flow().next_deadline(), Some(h.now + 1000));
    let mut rto = 1000;
    for _ in 0..tcp::SYN_RETRIES {
        assert!(h.tick(rto - 1).is_empty());
        let out = h.tick(1);
        assert_eq!(out.len(), 1);
        assert!(out[0].syn);
        assert_eq!(out[0].seq, syn.seq, "the same SYN again");
        assert!(h.take_ops().is_empty());
        rto *= 2;
    }
    assert!(h.tick(rto - 1).is_empty());
    assert!(h.tick(1).is_empty(), "the guest never answered: it hears nothing more");
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }]);
    assert!(h.flow().is_done());
    assert_eq!(h.table.counters().connect_timeouts, 1);
    assert_eq!(h.table.counters().rto_retransmits, tcp::SYN_RETRIES as u64);
}

#[test]
fn inbound_refused_by_the_guest_resets_the_host_peer() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.inbound(100_000).seq;
    // A RST that does not acknowledge our SYN proves nothing.
    h.seg(G { seq: 0, rst: true, ..G::default() }, &[]);
    h.seg(G { seq: 0, ack: Some(iss + 7), rst: true, ..G::default() }, &[]);
    assert!(h.take_ops().is_empty());
    assert_eq!(h.flow().state(), State::SynSent);
    assert_eq!(h.table.counters().dropped(Drop::BadRst), 1);
    assert_eq!(h.table.counters().dropped(Drop::BadAck), 1);
    // The guest's port is closed: RST+ACK of our SYN.
    let out = h.seg(G { seq: 0, ack: Some(iss + 1), rst: true, ..G::default() }, &[]);
    assert!(out.is_empty(), "never a RST for a RST");
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: true }]);
    assert!(h.flow().is_done());
    assert_eq!(h.table.counters().refused, 1);
}

#[test]
fn inbound_without_guest_options_uses_defaults() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.inbound(100_000).seq;
    h.sock.rx = pattern(5000);
    // No MSS and no window scale in the SYN-ACK: 536-byte segments, no scaling either way.
    let out = h.synack(iss, false, 2000);
    assert_eq!(out[0].window, 65535, "our window unscaled, capped at the field");
    let sizes: Vec<usize> = out.iter().map(|o| o.payload.len()).filter(|&n| n > 0).collect();
    assert_eq!(sizes, vec![536, 536, 536, 392]);
    let out = h.ack(iss + 1 + 2000, 600);
    assert_eq!(out.iter().map(|o| o.payload.len()).sum::<usize>(), 600, "the guest's window is not scaled");
}

#[test]
fn inbound_stale_guest_connection_is_reset_and_syn_goes_again() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.inbound(100_000).seq;
    // The guest still has an old connection on these ports: it answers our SYN with an ACK
    // of that one. A RST from its ACK clears it.
    let out = h.seg(G { seq: 777, ack: Some(123_456), window: 100, ..G::default() }, &[]);
    assert_eq!(out.len(), 1);
    assert!(out[0].rst && !out[0].syn);
    assert_eq!(out[0].seq, 123_456);
    assert_eq!(h.table.counters().dropped(Drop::BadAck), 1);
    assert_eq!(h.flow().state(), State::SynSent);
    let out = h.tick(1000);
    assert_eq!(out.len(), 1);
    assert!(out[0].syn);
    assert_eq!(out[0].seq, iss);
    // An ACK of our SYN without SYN, data, or a SYN of its own: not a SYN-ACK.
    h.seg(G { seq: GISN, ack: Some(iss + 1), window: 100, ..G::default() }, &pattern(10));
    h.seg(G { seq: GISN, syn: true, window: 100, ..G::default() }, &[]);
    assert_eq!(h.table.counters().dropped(Drop::BadState), 2);
    assert!(h.sock.written.is_empty());
    assert_eq!(h.flow().state(), State::SynSent);
    assert!(h.take_ops().is_empty());
}

#[test]
fn inbound_lost_ack_is_sent_again_and_host_reset_before_accept_is_quiet() {
    let mut h = H::new(RxCaps::NONE);
    let iss = h.inbound(100_000).seq;
    assert_eq!(h.synack(iss, true, 100).len(), 1);
    // Our ACK was lost: the guest's SYN-ACK again gets it again.
    let out = h.synack(iss, true, 100);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].seq, out[0].ack), (iss + 1, GISN + 1));
    assert_eq!(h.table.counters().challenge_acks, 0);

    let mut h = H::new(RxCaps::NONE);
    h.inbound(100_000);
    h.flow().host_reset();
    assert!(h.drain().is_empty(), "the guest never accepted: nothing to reset");
    assert_eq!(h.take_ops(), vec![HostOp::Close { reset: false }]);
    assert!(h.flow().is_done());
}

#[test]
fn inbound_flows_are_bounded_like_outbound_ones() {
    let cfg = TcpTableConfig { max_connections: 3, max_per_guest: 2, tcp: TcpConfig::default() };
    let mut t = TcpTable::new(cfg, 9);
    let peer = |p: u16| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(REMOTE_IP), p));
    let other = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 168, 122, 11), 22));
    let a = t.open_inbound(link(), guest_addr(), peer(1), 0).unwrap();
    assert_eq!(t.open_inbound(link(), guest_addr(), peer(1), 0), Err(Drop::FlowExists));
    t.open_inbound(link(), guest_addr(), peer(2), 0).unwrap();
    assert_eq!(t.open_inbound(link(), guest_addr(), peer(3), 0), Err(Drop::ShareExceeded));
    t.open_inbound(link(), other, peer(1), 0).unwrap();
    assert_eq!(t.open_inbound(link(), other, peer(2), 0), Err(Drop::TableFull));
    let v6: SocketAddr = "[fd00::1]:22".parse().unwrap();
    assert_eq!(t.open_inbound(link(), v6, peer(4), 0), Err(Drop::NotIp));
    let c = t.counters();
    assert_eq!([Drop::FlowExists, Drop::ShareExceeded, Drop::TableFull, Drop::NotIp].map(|d| c.dropped(d)), [1, 1, 1, 1]);
    // A guest SYN counts against the same bounds.
    let mut out = vec![0u8; 128];
    let f = gframe(G { seq: 1, syn: true, window: 100, sport: 5000, ..G::default() }, &[]);
    assert!(matches!(t.input(&f, &VnetHeader::default(), 0, &mut out), Input::Reply(_, Drop::TableFull)));
    // A flow that is over makes room for a new one on the same addresses.
    t.flow_mut(a).unwrap().host_reset();
    while t.flow_mut(a).unwrap().poll_host().is_some() {}
    assert!(t.flow(a).unwrap().is_done());
    assert!(t.open_inbound(link(), guest_addr(), peer(1), 0).is_ok());
    assert_eq!(t.len(), 3);
}

#[test]
fn drop_names_are_distinct_and_indexed() {
    let mut names: Vec<&str> = Drop::ALL.iter().map(|d| d.name()).collect();
    for (i, d) in Drop::ALL.iter().enumerate() {
        assert_eq!(*d as usize, i);
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Drop::COUNT);
}

/// IPv6 flows: the same state machines, IPv6 frames both ways, every checksum checked by
/// etherparse over the IPv6 pseudo-header.
mod v6 {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    use etherparse::{Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};

    use super::super::icmp::{IcmpConfig, IcmpOp, IcmpTable};
    use super::super::tcp::{HostOp, State};
    use super::super::udp::{UdpConfig, UdpOp, UdpTable};
    use super::super::wire::{self, Link};
    use super::super::*;
    use super::{Sock, GUEST_MAC, GW_MAC};
    use crate::offload::complete_checksum;
    use crate::vnet::{RxCaps, VnetHeader, F_NEEDS_CSUM, GSO_TCPV6};

    const G6: [u8; 16] = [0xfd, 0, 0x76, 0x75, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const R6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];

    fn sa(ip: [u8; 16], port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)
    }

    fn syn6(seq: u32, mss: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
            .ipv6(G6, R6, 64)
            .tcp(40000, 443, seq, 64800)
            .syn()
            .options(&[TcpOptionElement::MaximumSegmentSize(mss), TcpOptionElement::Noop, TcpOptionElement::WindowScale(7)])
            .unwrap();
        let mut v = Vec::new();
        b.write(&mut v, &[]).unwrap();
        v
    }

    fn seg6(seq: u32, ack: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv6(G6, R6, 64).tcp(40000, 443, seq, 2000).ack(ack);
        if fin {
            b = b.fin();
        }
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    /// A TCP frame to the guest: (seq, ack, flags SYN/FIN/RST, mss option, payload), its
    /// addresses and checksum checked (a partial checksum completed first, as the guest would).
    fn tcp_out(frame: &[u8], vnet: VnetHeader) -> (u32, u32, [bool; 3], Option<u16>, Vec<u8>) {
        let mut f = frame.to_vec();
        if vnet.flags & F_NEEDS_CSUM != 0 {
            assert_eq!(vnet.csum_start, 54, "the checksum starts after the IPv6 header");
            complete_checksum(&mut f, vnet.csum_start as usize, vnet.csum_offset as usize).unwrap();
        }
        assert_eq!(&f[0..12], &[GUEST_MAC, GW_MAC].concat()[..]);
        let p = SlicedPacket::from_ethernet(&f).expect("etherparse parses the frame");
        let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
        let (src, dst) = (ip.header().source(), ip.header().destination());
        assert_eq!((src, dst), (R6, G6));
        assert_eq!(ip.header().hop_limit(), 64);
        let Some(TransportSlice::Tcp(t)) = &p.transport else { panic!("not TCP") };
        assert_eq!((t.source_port(), t.destination_port()), (443, 40000));
        assert_eq!(t.calc_checksum_ipv6(src, dst).unwrap(), t.checksum(), "TCP checksum over the IPv6 pseudo-header");
        let mss = t.options_iterator().find_map(|o| match o.unwrap() {
            TcpOptionElement::MaximumSegmentSize(m) => Some(m),
            _ => None,
        });
        (t.sequence_number(), t.acknowledgment_number(), [t.syn(), t.fin(), t.rst()], mss, t.payload().to_vec())
    }

    /// An ICMPv6 message to the guest from the remote: (type, code, body after the 8-byte
    /// header), its checksum checked.
    fn icmp6_out(frame: &[u8]) -> (u8, u8, Vec<u8>) {
        let p = SlicedPacket::from_ethernet(frame).expect("etherparse parses the frame");
        let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
        let (src, dst) = (ip.header().source(), ip.header().destination());
        assert_eq!((src, dst), (R6, G6));
        let Some(TransportSlice::Icmpv6(i)) = &p.transport else { panic!("not ICMPv6") };
        assert!(i.is_checksum_valid(src, dst), "ICMPv6 checksum");
        let b = i.slice();
        (b[0], b[1], b[8..].to_vec())
    }

    fn drain(t: &mut TcpTable, id: FlowId, sock: &mut Sock, caps: &RxCaps, now: u64) -> (Vec<HostOp>, Vec<(Vec<u8>, VnetHeader)>) {
        let mut buf = vec![0u8; 65536 + 128];
        let mut ops = Vec::new();
        let f = t.flow_mut(id).unwrap();
        while let Some(op) = f.poll_host() {
            if let HostOp::Discard(n) = op {
                sock.rx.drain(..n);
            }
            ops.push(op);
        }
        let mut frames = Vec::new();
        while let Some(tx) = f.poll_frame(now, caps, &mut buf, sock) {
            frames.push((buf[..tx.len].to_vec(), tx.vnet));
        }
        (ops, frames)
    }

    #[test]
    fn tcp_syn_connects_data_flows_both_ways_and_fin_half_closes() {
        let mut t = TcpTable::new(TcpTableConfig::default(), 7);
        let mut out = vec![0u8; 128];
        let none = VnetHeader::default();
        // The guest offers MSS 1460 (what it would on IPv4): the flow clamps it to 1440.
        let Input::Opened(id) = t.input(&syn6(5000, 1460), &none, 0, &mut out) else { panic!("no flow") };
        let mut sock = Sock { space: 100_000, ..Sock::default() };
        let (ops, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 0);
        assert_eq!(ops, vec![HostOp::Connect(sa(R6, 443))]);
        assert!(frames.is_empty(), "nothing before the host connects");
        assert_eq!(t.flow(id).unwrap().mss(), 1440);
        t.flow_mut(id).unwrap().set_host_send_space(100_000);
        t.flow_mut(id).unwrap().connected(1);
        let (_, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 1);
        let (iss, ack, flags, mss, _) = tcp_out(&frames[0].0, frames[0].1);
        assert_eq!((ack, flags), (5001, [true, false, false]));
        assert_eq!(mss, Some(1500 - 60), "our MSS is the MTU less IPv6 and TCP");
        // The guest's ACK and data: written to the socket, acknowledged.
        let f = seg6(5001, iss + 1, false, b"GET /");
        let Input::Segment(_, s) = t.input(&f, &none, 2, &mut out) else { panic!() };
        t.flow_mut(id).unwrap().on_segment(&s, 2, &mut sock);
        assert_eq!(t.flow(id).unwrap().state(), State::Established);
        assert_eq!(sock.written, b"GET /");
        let (_, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 2);
        assert_eq!(tcp_out(&frames[0].0, frames[0].1).1, 5006);
        // Host data: MSS-sized segments for a guest without TSO6, full checksums.
        sock.rx = (0..3000u32).map(|i| i as u8).collect();
        let (_, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 3);
        let sizes: Vec<usize> = frames.iter().map(|(f, v)| tcp_out(f, *v).4.len()).collect();
        assert_eq!(sizes, vec![1440, 1440, 120]);
        assert!(frames.iter().all(|(_, v)| v.flags == 0));
        let got: Vec<u8> = frames.iter().flat_map(|(f, v)| tcp_out(f, *v).4).collect();
        assert_eq!(got, sock.rx);
        // The guest acknowledges it all: discarded from the socket.
        let f = seg6(5006, iss + 1 + 3000, false, b"");
        let Input::Segment(_, s) = t.input(&f, &none, 4, &mut out) else { panic!() };
        t.flow_mut(id).unwrap().on_segment(&s, 4, &mut sock);
        let (ops, _) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 4);
        assert_eq!(ops, vec![HostOp::Discard(3000)]);
        // A TSO6 guest gets one large GSO_TCPV6 frame with a partial checksum.
        sock.rx = vec![0x5a; 20_000];
        let caps = RxCaps { csum: true, tso6: true, ..RxCaps::NONE };
        let (_, frames) = drain(&mut t, id, &mut sock, &caps, 5);
        let (f, v) = &frames[0];
        assert_eq!((v.gso_type, v.gso_size, v.hdr_len), (GSO_TCPV6, 1440, 74));
        assert_eq!(tcp_out(f, *v).4.len(), 20_000);
        // A TSO4-only guest does not get IPv6 GSO frames.
        let f = seg6(5006, iss + 1 + 23_000, false, b"");
        let Input::Segment(_, s) = t.input(&f, &none, 6, &mut out) else { panic!() };
        t.flow_mut(id).unwrap().on_segment(&s, 6, &mut sock);
        let _ = drain(&mut t, id, &mut sock, &caps, 6);
        sock.rx = vec![1; 3000];
        let tso4 = RxCaps { csum: true, tso4: true, ..RxCaps::NONE };
        let (_, frames) = drain(&mut t, id, &mut sock, &tso4, 7);
        assert!(frames.iter().all(|(_, v)| v.gso_type == 0 && v.flags == F_NEEDS_CSUM));
        assert_eq!(frames.iter().map(|(f, v)| tcp_out(f, *v).4.len()).max(), Some(1440));
        // Guest FIN: half-close on the host.
        let f = seg6(5006, iss + 1 + 26_000, true, b"");
        let Input::Segment(_, s) = t.input(&f, &none, 8, &mut out) else { panic!() };
        t.flow_mut(id).unwrap().on_segment(&s, 8, &mut sock);
        let (ops, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 8);
        assert!(ops.contains(&HostOp::ShutdownWrite), "{ops:?}");
        assert_eq!(tcp_out(&frames[0].0, frames[0].1).1, 5007);
    }

    #[test]
    fn refusal_is_rst_and_unreachable_is_icmpv6() {
        let mut t = TcpTable::new(TcpTableConfig::default(), 7);
        let mut out = vec![0u8; 128];
        let none = VnetHeader::default();
        let Input::Opened(id) = t.input(&syn6(9000, 1440), &none, 0, &mut out) else { panic!() };
        let mut sock = Sock::default();
        let _ = drain(&mut t, id, &mut sock, &RxCaps::NONE, 0);
        t.flow_mut(id).unwrap().refused();
        let (_, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 0);
        let (_, ack, flags, _, _) = tcp_out(&frames[0].0, frames[0].1);
        assert_eq!((ack, flags), (9001, [false, false, true]));
        // Unreachable host: ICMPv6 destination unreachable, address unreachable (3), quoting
        // the guest's SYN (IPv6 header, ports, sequence number).
        t.remove(id);
        let Input::Opened(id) = t.input(&syn6(9000, 1440), &none, 0, &mut out) else { panic!() };
        let _ = drain(&mut t, id, &mut sock, &RxCaps::NONE, 0);
        t.flow_mut(id).unwrap().unreachable(Some(1));
        let (_, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 0);
        let (ty, code, quote) = icmp6_out(&frames[0].0);
        assert_eq!((ty, code), (1, 3));
        assert_eq!(quote.len(), 48);
        assert_eq!((quote[0] >> 4, quote[6]), (6, 6));
        assert_eq!((&quote[8..24], &quote[24..40]), (&G6[..], &R6[..]));
        assert_eq!(u16::from_be_bytes([quote[40], quote[41]]), 40000);
        assert_eq!(u32::from_be_bytes([quote[44], quote[45], quote[46], quote[47]]), 9000);
        // A segment for no flow: RST from the remote, over IPv6.
        assert!(t.flow(id).unwrap().is_done());
        t.remove(id);
        let n = match t.input(&seg6(1, 77, false, b"x"), &none, 0, &mut out) {
            Input::Reply(n, Drop::NoFlow) => n,
            other => panic!("{other:?}"),
        };
        let (seq, _, flags, _, _) = tcp_out(&out[..n], VnetHeader::default());
        assert_eq!((seq, flags), (77, [false, false, true]));
    }

    #[test]
    fn udp_flows_and_port_unreachable() {
        let mut t = UdpTable::new(UdpConfig::default());
        let mut v = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv6(G6, R6, 64).udp(5353, 7).write(&mut v, b"ping").unwrap();
        let Ok(UdpOp::Open { id, remote, payload }) = t.input(&v, &VnetHeader::default(), 0) else { panic!() };
        assert_eq!((remote, payload), (sa(R6, 7), &b"ping"[..]));
        assert_eq!(t.key(id).unwrap().guest, sa(G6, 5353));
        let mut buf = vec![0u8; 2048];
        let at = wire::udp_frame_hdr(remote.ip());
        assert_eq!(at, wire::UDP6_FRAME_HDR);
        buf[at..at + 4].copy_from_slice(b"pong");
        let n = t.reply(id, 4, &mut buf, 1).unwrap();
        let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!() };
        assert_eq!((ip.header().source(), ip.header().destination()), (R6, G6));
        let Some(TransportSlice::Udp(u)) = &p.transport else { panic!() };
        assert_eq!((u.source_port(), u.destination_port(), u.payload()), (7, 5353, &b"pong"[..]));
        assert_eq!(u.to_header().calc_checksum_ipv6_raw(R6, G6, u.payload()).unwrap(), u.checksum());
        drop(p);
        // ECONNREFUSED on the socket: ICMPv6 port unreachable (code 4) quoting the datagram.
        let n = t.unreachable(id, 3, &mut buf).unwrap();
        let (ty, code, quote) = icmp6_out(&buf[..n]);
        assert_eq!((ty, code, quote[6]), (1, 4, 17));
        assert_eq!(u16::from_be_bytes([quote[42], quote[43]]), 7);
    }

    #[test]
    fn icmpv6_echo_through_a_ping_socket() {
        let mut t = IcmpTable::new(IcmpConfig::default());
        let mut v = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv6(G6, R6, 64).icmpv6_echo_request(0x1234, 9).write(&mut v, b"abcdefgh").unwrap();
        let Ok(IcmpOp::Open { id, remote, message }) = t.input(&v, &VnetHeader::default(), 0) else { panic!() };
        assert_eq!(remote, IpAddr::V6(Ipv6Addr::from(R6)));
        assert_eq!((message[0], message.len()), (128, 16));
        // A corrupt checksum (over the pseudo-header) is dropped.
        let mut bad = v.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(t.input(&bad, &VnetHeader::default(), 0), Err(Drop::BadIcmp));
        // An ICMPv4 echo request inside IPv6 is no ICMPv6.
        let mut v4in6 = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv6(G6, R6, 64).icmpv4_echo_request(1, 1).write(&mut v4in6, b"").unwrap();
        assert_eq!(t.input(&v4in6, &VnetHeader::default(), 0), Err(Drop::NotIcmp));
        // The kernel's reply carries its own identifier; the guest gets its own back.
        let mut reply = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv6(R6, G6, 64).icmpv6_echo_reply(0x9999, 9).write(&mut reply, b"abcdefgh").unwrap();
        let msg = &reply[54..];
        let mut buf = vec![0u8; 2048];
        buf[wire::ICMP6_FRAME_HDR..wire::ICMP6_FRAME_HDR + msg.len()].copy_from_slice(msg);
        let n = t.reply(id, msg.len(), &mut buf, 1).unwrap();
        let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(TransportSlice::Icmpv6(i)) = &p.transport else { panic!() };
        assert!(i.is_checksum_valid(R6, G6));
        assert_eq!(i.icmp_type(), Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 0x1234, seq: 9 }));
        drop(p);
        // An ICMPv4 echo reply type on an IPv6 flow is not an echo reply.
        buf[wire::ICMP6_FRAME_HDR] = 0;
        assert_eq!(t.reply(id, msg.len(), &mut buf, 1), None);
    }

    #[test]
    fn extension_headers_fragments_and_bad_lengths() {
        let mut t = UdpTable::new(UdpConfig::default());
        let none = VnetHeader::default();
        let mut v = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv6(G6, R6, 64).udp(5000, 9).write(&mut v, b"data").unwrap();
        // Insert an 8-byte extension header of kind `kind` after the fixed header.
        let with_ext = |kind: u8, third: u8| {
            let mut f = v.clone();
            let next = f[20];
            f[20] = kind;
            f.splice(54..54, [next, 0, 0, third, 0, 0, 0, 0]);
            let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
            f[18..20].copy_from_slice(&plen.to_be_bytes());
            f
        };
        // Hop-by-hop and destination options are walked over.
        assert!(matches!(t.input(&with_ext(0, 0), &none, 0), Ok(UdpOp::Open { payload: b"data", .. })));
        assert!(matches!(t.input(&with_ext(60, 0), &none, 0), Ok(UdpOp::Send { payload: b"data", .. })));
        // A fragment header: nothing reassembles here.
        assert_eq!(t.input(&with_ext(44, 0), &none, 0), Err(Drop::Fragment));
        // A routing header with segments left names another destination.
        assert_eq!(t.input(&with_ext(43, 1), &none, 0), Err(Drop::BadIpHeader));
        assert!(t.input(&with_ext(43, 0), &none, 0).is_ok());
        // A payload length past the frame, and every truncation: counted, no panic.
        let mut f = v.clone();
        f[18..20].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(t.input(&f, &none, 0), Err(Drop::BadIpHeader));
        for len in 0..v.len() {
            assert!(t.input(&v[..len], &none, 0).is_err());
        }
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn inbound_flows_take_ipv6_ends_of_one_version() {
        let mut t = TcpTable::new(TcpTableConfig::default(), 7);
        let link = Link { guest_mac: GUEST_MAC, gw_mac: GW_MAC };
        let id = t.open_inbound(link, sa(G6, 22), sa(R6, 50000), 0).unwrap();
        let mut sock = Sock::default();
        let (_, frames) = drain(&mut t, id, &mut sock, &RxCaps::NONE, 0);
        let p = SlicedPacket::from_ethernet(&frames[0].0).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else { panic!() };
        assert!(tcp.syn());
        assert_eq!(tcp.calc_checksum_ipv6(R6, G6).unwrap(), tcp.checksum());
        let v4: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert_eq!(t.open_inbound(link, sa(G6, 22), v4, 0), Err(Drop::NotIp));
    }
}
