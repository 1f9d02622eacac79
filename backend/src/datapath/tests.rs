//! Unit tests of the data path on its own, as smoltcp tests its stack over a loopback device:
//! ports on fake host links that keep what they are sent, and guest rings laid out by hand in
//! plain memory. They cover delivery, flooding, the receive backlog, offload fix-ups, the
//! batched link path, and the gateway's service and router dispatch.
//!
//! Like the rest of the data path, this imports only the data path, `config` and the pure
//! crates: no port kind, no service, no run-time layer.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use vhost_user_backend::{VringMutex, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vunet_switch::arp::{self, Arp, OP_REPLY, OP_REQUEST};
use vunet_switch::firewall::Action;
use vunet_switch::gateway::{gateway_mac, Gateway};
use vunet_switch::nat::NatConfig;
use vunet_switch::router::{RouteMode, Router, RouterConfig};
use vunet_switch::vlan::PortVlan;
use vunet_switch::vnet::{RxCaps, VnetHeader, F_NEEDS_CSUM, GSO_TCPV4, HDR_LEN};
use vunet_switch::{DropReason, Mac, PortId};

use super::split::MAX_RX_CHAINS;
use super::{
    flush_pending, process_tx, tx_kick, GatewayCx, GatewayService, GuestMem, Handled, Home, HostLink, Inject, Negotiated, Network, Port,
    PortKind, RxTarget, TxRing, TxScratch, Vring, BACKLOG_MAX_FRAMES,
};
use crate::config::Mode;

// ---------------------------------------------------------------------------------------------
// A fake host link.

/// What a link was handed for one frame: the virtio-net header (when the link takes one) and
/// the frame.
#[derive(Clone, Debug)]
struct Sent {
    hdr: VnetHeader,
    frame: Vec<u8>,
}

/// A host link that keeps every frame it is sent, like smoltcp's loopback device.
struct FakeLink {
    caps: Option<RxCaps>,
    batches: bool,
    sent: Mutex<Vec<Sent>>,
    /// How many frames each `send_batch` call carried.
    batch_sizes: Mutex<Vec<usize>>,
}

impl FakeLink {
    fn with(caps: Option<RxCaps>, batches: bool) -> Arc<FakeLink> {
        Arc::new(FakeLink { caps, batches, sent: Mutex::new(Vec::new()), batch_sizes: Mutex::new(Vec::new()) })
    }

    /// A link with a virtio-net header that takes every offload (a tap or af-packet with
    /// PACKET_VNET_HDR).
    fn offloading() -> Arc<FakeLink> {
        FakeLink::with(Some(RxCaps::FULL), false)
    }

    /// A link without a virtio-net header: complete, checksummed, MTU-sized frames only.
    fn plain() -> Arc<FakeLink> {
        FakeLink::with(Some(RxCaps { hdr_len: 0, ..RxCaps::NONE }), false)
    }

    /// Takes what the link was sent so far.
    fn take(&self) -> Vec<Sent> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }

    /// Takes the frames the link was sent so far, without their headers.
    fn frames(&self) -> Vec<Vec<u8>> {
        self.take().into_iter().map(|s| s.frame).collect()
    }
}

impl HostLink for FakeLink {
    fn caps(&self) -> Option<RxCaps> {
        self.caps
    }

    fn send(&self, iov: &[libc::iovec]) -> Result<(), DropReason> {
        let mut bytes = Vec::new();
        for v in iov.iter().filter(|v| v.iov_len > 0) {
            // SAFETY: the data path hands a link iovecs over memory that is live for the call.
            bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        let hdr_len = self.caps.map_or(0, |c| c.hdr_len);
        let hdr = VnetHeader::parse(&bytes[..hdr_len]);
        self.sent.lock().unwrap().push(Sent { hdr, frame: bytes[hdr_len..].to_vec() });
        Ok(())
    }

    fn batches(&self) -> bool {
        self.batches
    }

    fn send_batch(&self, iov: &mut [libc::iovec], spans: &[Range<usize>]) -> Vec<(usize, DropReason)> {
        self.batch_sizes.lock().unwrap().push(spans.len());
        spans.iter().enumerate().filter_map(|(i, r)| self.send(&iov[r.clone()]).err().map(|e| (i, e))).collect()
    }

    fn close(&self) {}

    fn describe(&self) -> (&'static str, String) {
        ("fake", "fake0".into())
    }
}

// ---------------------------------------------------------------------------------------------
// A fake guest ring: a split virtqueue (virtio 1.x §2.7) in plain memory, the driver's side
// written by hand.

const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Descriptor `i` always points at the buffer `BUFFERS + i * BUFFER_LEN`.
const BUFFERS: u64 = 0x1_0000;
const BUFFER_LEN: u32 = 2048;
const VRING_DESC_F_WRITE: u16 = 2;

/// One virtqueue of a fake guest, with its own memory.
struct GuestRing {
    mem: GuestMem,
    vring: Vring,
    /// The driver's avail index (also the next descriptor to use, modulo the queue size).
    avail_idx: u16,
    /// The used index up to which `used` has read.
    used_seen: u16,
}

impl GuestRing {
    fn new() -> GuestRing {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let vring: Vring = VringMutex::new(mem.clone(), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring.set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        GuestRing { mem, vring, avail_idx: 0, used_seen: 0 }
    }

    fn buffer(desc: u16) -> GuestAddress {
        GuestAddress(BUFFERS + desc as u64 * BUFFER_LEN as u64)
    }

    /// Makes one single-descriptor chain over the next buffer available to the device.
    fn offer(&mut self, len: u32, flags: u16) {
        let m = self.mem.memory();
        let desc = self.avail_idx % QUEUE_SIZE;
        let d = DESC_TABLE + desc as u64 * 16;
        m.write_obj(Self::buffer(desc).0, GuestAddress(d)).unwrap();
        m.write_obj(len, GuestAddress(d + 8)).unwrap();
        m.write_obj(flags, GuestAddress(d + 12)).unwrap();
        m.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        m.write_obj(desc, GuestAddress(AVAIL_RING + 4 + 2 * (self.avail_idx % QUEUE_SIZE) as u64)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
    }

    /// Posts `n` empty receive buffers.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.offer(BUFFER_LEN, VRING_DESC_F_WRITE);
        }
    }

    /// Posts a frame to send, behind a virtio-net header.
    fn post_tx(&mut self, hdr: VnetHeader, frame: &[u8]) {
        let bytes = with_header(hdr, frame);
        let desc = self.avail_idx % QUEUE_SIZE;
        self.mem.memory().write_slice(&bytes, Self::buffer(desc)).unwrap();
        self.offer(bytes.len() as u32, 0);
    }

    /// The device's used index.
    fn used_idx(&self) -> u16 {
        self.mem.memory().read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// The used entries (descriptor, length) the device added since the last call.
    fn used(&mut self) -> Vec<(u16, u32)> {
        let m = self.mem.memory();
        let mut out = Vec::new();
        while self.used_seen != self.used_idx() {
            let e = USED_RING + 4 + 8 * (self.used_seen % QUEUE_SIZE) as u64;
            let id: u32 = m.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// What the device wrote into the receive buffers it used since the last call.
    fn received(&mut self) -> Vec<Sent> {
        let m = self.mem.memory();
        self.used()
            .into_iter()
            .map(|(desc, len)| {
                let mut b = vec![0u8; len as usize];
                m.read_slice(&mut b, Self::buffer(desc)).unwrap();
                Sent { hdr: VnetHeader::parse(&b[..HDR_LEN]), frame: b[HDR_LEN..].to_vec() }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Networks, ports, frames.

const A: Mac = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: Mac = [0x52, 0x54, 0, 0, 0, 0x0b];
const C: Mac = [0x52, 0x54, 0, 0, 0, 0x0c];
const NOBODY: Mac = [0x52, 0x54, 0, 0, 0, 0x99];
const BROADCAST: Mac = [0xff; 6];
const IP_A: [u8; 4] = [192, 168, 122, 10];
const IP_B: [u8; 4] = [192, 168, 122, 11];
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);

/// The gateway of the test network "t".
fn gateway() -> Gateway {
    Gateway { mac: gateway_mac("t"), ip: GATEWAY_IP, prefix: 24 }
}

/// Network "t" with its gateway, no services yet.
fn with_gateway(mode: Mode) -> Network {
    let mut net = Network::new("t", mode, 1500);
    net.gateway = Some(gateway());
    net
}

/// A port on a fake host link, connected.
fn link_port(id: PortId, kind: PortKind, link: &Arc<FakeLink>) -> Port {
    let mut p = Port::new(id, format!("p{id}"), kind);
    p.link = Some(link.clone());
    p.connected.store(true, Ordering::Relaxed);
    p
}

/// A guest port whose receive ring is `ring`, connected.
fn guest_port(id: PortId, ring: &GuestRing, caps: RxCaps) -> Port {
    let p = Port::new(id, format!("p{id}"), PortKind::Vhost);
    *p.queues[0].rx.lock().unwrap() =
        Some(RxTarget { vring: ring.vring.clone(), mem: ring.mem.clone(), caps, backlog: Default::default(), signalled: 0, cache: None });
    p.connected.store(true, Ordering::Relaxed);
    p
}

/// A network with its ports (their ids are their places in the list), and an `Inject` into it
/// that frames from host links come in through.
struct Lan {
    net: Arc<Network>,
    inject: Inject,
}

impl Lan {
    fn new(mut net: Network, ports: Vec<Port>) -> Lan {
        for (i, p) in ports.iter().enumerate() {
            assert_eq!(p.id, i, "a port's id is its place in the list");
        }
        net.ports = ports.into_iter().map(Arc::new).collect::<Vec<_>>().into();
        let net = Arc::new(net);
        Lan { inject: Inject::new(net.clone()), net }
    }

    /// A plain switch (no gateway) over `ports`.
    fn switch(ports: Vec<Port>) -> Lan {
        Lan::new(Network::new("t", Mode::Isolated, 1500), ports)
    }

    fn port(&self, id: PortId) -> Arc<Port> {
        self.net.port_by_id(id).unwrap()
    }

    /// Port `from`'s host link reads `frame`, without offloads.
    fn send(&mut self, from: PortId, frame: &[u8]) {
        self.send_with(from, VnetHeader::default(), frame);
    }

    /// Port `from`'s host link reads `frame` behind the virtio-net header `hdr`.
    fn send_with(&mut self, from: PortId, hdr: VnetHeader, frame: &[u8]) {
        let port = self.port(from);
        self.inject.switch_from_link(&port, &[(&with_header(hdr, frame), false)], HDR_LEN);
    }

    /// The routed uplink `from` reads `frame` (a nat or route network).
    fn route(&mut self, from: PortId, frame: &[u8]) {
        let port = self.port(from);
        let mut buf = with_header(VnetHeader::default(), frame);
        self.inject.route_from_link(&port, &mut [&mut buf[..]], HDR_LEN);
    }
}

fn with_header(hdr: VnetHeader, frame: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HDR_LEN];
    hdr.write(&mut b);
    b.extend_from_slice(frame);
    b
}

/// A UDP datagram between two guests' addresses, checksums complete.
fn udp(src: Mac, dst: Mac, payload: &[u8]) -> Vec<u8> {
    udp_ip(src, dst, IP_A, IP_B, 5000, 6000, payload)
}

fn udp_ip(src: Mac, dst: Mac, src_ip: [u8; 4], dst_ip: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst).ipv4(src_ip, dst_ip, 64).udp(sport, dport).write(&mut f, payload).unwrap();
    f
}

fn tcp(src: Mac, dst: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst).ipv4(IP_A, IP_B, 64).tcp(40000, 5201, 1000, 64000).psh().write(&mut f, payload).unwrap();
    f
}

/// Frame number `n` of a sequence: a UDP datagram carrying `n`.
fn numbered(src: Mac, dst: Mac, n: u32) -> Vec<u8> {
    udp(src, dst, &n.to_be_bytes())
}

/// The number a `numbered` frame carries.
fn number(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[42..46].try_into().unwrap())
}

/// An ARP request from `(mac, ip)` for `target`.
fn arp_request(mac: Mac, ip: [u8; 4], target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    arp::build(&mut f, &Arp { op: OP_REQUEST, sender_mac: mac, sender_ip: ip.into(), target_mac: [0; 6], target_ip: target });
    f
}

/// The folded one's-complement sum of `data` (RFC 1071), not complemented.
fn ones_sum(data: &[u8], initial: u64) -> u16 {
    let mut acc = initial + data.chunks(2).map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u64).sum::<u64>();
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 pseudo-header sum of an Ethernet/IPv4 frame's TCP or UDP part.
fn pseudo_sum(frame: &[u8]) -> u16 {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0xf) as usize * 4;
    let l4_len = u16::from_be_bytes([ip[2], ip[3]]) - ihl as u16;
    let mut p = ip[12..20].to_vec();
    p.extend_from_slice(&[0, ip[9]]);
    p.extend_from_slice(&l4_len.to_be_bytes());
    ones_sum(&p, 0)
}

/// Whether an Ethernet/IPv4 frame's IP header checksum and its TCP or UDP checksum are right.
fn checksums_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0xf) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    ones_sum(&ip[..ihl], 0) == 0xffff && ones_sum(&ip[ihl..total], pseudo_sum(frame) as u64) == 0xffff
}

/// Turns a complete TCP or UDP frame into what a guest with checksum offload sends: the
/// checksum field holds only the pseudo-header sum, and the header says where to finish it.
fn partial(frame: &[u8]) -> (Vec<u8>, VnetHeader) {
    let mut f = frame.to_vec();
    let csum_offset = if f[14 + 9] == 6 { 16 } else { 6 };
    let at = 34 + csum_offset;
    let p = pseudo_sum(&f);
    f[at..at + 2].copy_from_slice(&p.to_be_bytes());
    (f, VnetHeader { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: csum_offset as u16, ..VnetHeader::default() })
}

/// A TCP frame of `payload_len` bytes of payload as a guest with TSO sends it (MSS 1448).
fn tso(payload_len: usize) -> (Vec<u8>, VnetHeader, Vec<u8>) {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
    let (f, h) = partial(&tcp(A, B, &payload));
    (f, VnetHeader { gso_type: GSO_TCPV4, gso_size: 1448, hdr_len: 54, ..h }, payload)
}

/// Checks segments of a `tso` frame: each a complete, MTU-sized IPv4/TCP frame with right
/// lengths and checksums, in sequence, together carrying `payload`.
fn assert_segments_of(segments: &[Vec<u8>], payload: &[u8]) {
    assert_eq!(segments.len(), payload.len().div_ceil(1448));
    let mut joined = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        assert!(s.len() <= 14 + 1500, "segment {i} fits the MTU: {} bytes", s.len());
        assert_eq!(u16::from_be_bytes([s[16], s[17]]) as usize, s.len() - 14, "IP total length of segment {i}");
        assert!(checksums_ok(s), "checksums of segment {i}");
        let p = SlicedPacket::from_ethernet(s).unwrap();
        let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("segment {i} is not TCP") };
        assert_eq!(t.sequence_number(), 1000 + (i * 1448) as u32);
        joined.extend_from_slice(t.payload());
    }
    assert_eq!(joined, payload);
}

// ---------------------------------------------------------------------------------------------
// Delivery and flooding.

#[test]
fn unicast_to_a_learned_mac_reaches_only_its_port() {
    let links = [FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading()];
    let mut lan = Lan::switch(vec![
        link_port(0, PortKind::Tap, &links[0]),
        link_port(1, PortKind::Tap, &links[1]),
        link_port(2, PortKind::Tap, &links[2]),
    ]);
    lan.send(1, &udp(B, BROADCAST, b"hello, I am B"));
    links.iter().for_each(|l| drop(l.take()));

    let f = udp(A, B, b"for B");
    lan.send(0, &f);

    assert_eq!(links[1].frames(), vec![f.clone()]);
    assert!(links[0].take().is_empty() && links[2].take().is_empty(), "nobody else gets it");
    let (a, b, c) = (lan.port(0).counters.snapshot(), lan.port(1).counters.snapshot(), lan.port(2).counters.snapshot());
    assert_eq!((a.rx_frames, a.rx_bytes), (1, f.len() as u64), "counted received on the sender");
    assert_eq!((b.rx_frames, b.tx_frames, b.tx_bytes), (1, 1, f.len() as u64), "counted delivered on the receiver");
    assert_eq!(c.tx_frames, 1, "C got B's broadcast only");
    assert_eq!(a.total_drops() + b.total_drops() + c.total_drops(), 0);
}

#[test]
fn a_frame_with_no_offloads_reaches_a_link_behind_an_empty_header() {
    let (from, to) = (FakeLink::offloading(), FakeLink::offloading());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &from), link_port(1, PortKind::Uplink, &to)]);
    let f = udp(A, B, b"x");
    lan.send(0, &f);
    let sent = to.take();
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].hdr, &sent[0].frame), (VnetHeader::default(), &f));
}

#[test]
fn broadcast_floods_every_port_but_the_sender_and_a_routed_uplink() {
    let links = [FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading()];
    let mut routed = link_port(3, PortKind::Uplink, &links[3]);
    routed.routed = true;
    let mut lan = Lan::switch(vec![
        link_port(0, PortKind::Tap, &links[0]),
        link_port(1, PortKind::Tap, &links[1]),
        link_port(2, PortKind::Uplink, &links[2]),
        routed,
    ]);
    let f = udp(A, BROADCAST, b"everyone");
    lan.send(0, &f);
    assert_eq!(links[1].frames(), vec![f.clone()]);
    assert_eq!(links[2].frames(), vec![f.clone()], "an uplink that is not routed is on the segment");
    assert!(links[0].take().is_empty(), "not back to the sender");
    assert!(links[3].take().is_empty(), "a routed uplink is not on the guests' segment");
}

#[test]
fn unknown_unicast_floods_every_port_but_the_sender_and_a_routed_uplink() {
    let links = [FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading()];
    let mut routed = link_port(3, PortKind::Uplink, &links[3]);
    routed.routed = true;
    let mut lan = Lan::switch(vec![
        link_port(0, PortKind::Tap, &links[0]),
        link_port(1, PortKind::Tap, &links[1]),
        link_port(2, PortKind::Tap, &links[2]),
        routed,
    ]);
    let f = udp(A, NOBODY, b"who?");
    lan.send(0, &f);
    assert_eq!(links[1].frames(), vec![f.clone()]);
    assert_eq!(links[2].frames(), vec![f.clone()]);
    assert!(links[0].take().is_empty() && links[3].take().is_empty());
}

#[test]
fn a_frame_for_a_mac_learned_on_its_own_port_goes_nowhere() {
    let (a, b) = (FakeLink::offloading(), FakeLink::offloading());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Uplink, &a), link_port(1, PortKind::Tap, &b)]);
    lan.send(0, &udp(C, BROADCAST, b"C lives behind the uplink"));
    drop(b.take());
    lan.send(0, &udp(A, C, b"A to C, both behind the uplink"));
    assert!(a.take().is_empty() && b.take().is_empty());
}

#[test]
fn a_link_that_is_down_counts_port_down() {
    let (a, down) = (FakeLink::offloading(), FakeLink::with(None, false));
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), link_port(1, PortKind::Uplink, &down)]);
    lan.send(0, &udp(A, BROADCAST, b"x"));
    assert!(down.take().is_empty());
    let s = lan.port(1).counters.snapshot();
    assert_eq!((s.tx_frames, s.drop_count(DropReason::PortDown)), (0, 1));
}

#[test]
fn invalid_frames_are_dropped_and_counted_on_the_sender() {
    let (a, b) = (FakeLink::offloading(), FakeLink::offloading());
    let mut lan = Lan::new(with_gateway(Mode::Isolated), vec![link_port(0, PortKind::Tap, &a), link_port(1, PortKind::Tap, &b)]);
    lan.send(0, &udp([0x01, 0, 0x5e, 0, 0, 1], B, b"multicast source"));
    lan.send(0, &udp(gateway().mac, B, b"the gateway's source"));
    lan.send(0, &udp(A, B, b"")[..13]);
    lan.send(0, &udp(A, B, &[0; 1500]));
    lan.send_with(0, VnetHeader { flags: 0x80, ..VnetHeader::default() }, &udp(A, B, b"bad header"));
    assert!(b.take().is_empty(), "none of them is forwarded");
    let s = lan.port(0).counters.snapshot();
    assert_eq!(s.drop_count(DropReason::BadSourceMac), 2);
    assert_eq!(s.drop_count(DropReason::ShortFrame), 1);
    assert_eq!(s.drop_count(DropReason::Oversize), 1);
    assert_eq!(s.drop_count(DropReason::BadHeader), 1);
    assert_eq!(s.rx_frames, 0, "a dropped frame is not counted as received");
}

// ---------------------------------------------------------------------------------------------
// A guest receiver and its backlog.

#[test]
fn a_frame_for_a_guest_lands_in_its_rx_ring() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, RxCaps::FULL)]);
    ring.post_rx(4);
    let f = udp(A, B, b"into the ring");
    lan.send(0, &f);
    let got = ring.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, f);
    assert_eq!(got[0].hdr, VnetHeader { num_buffers: 1, ..VnetHeader::default() }, "MRG_RXBUF: one buffer");
    assert_eq!(lan.port(1).counters.snapshot().tx_frames, 1);
    assert!(!lan.port(1).backlogged());
}

#[test]
fn frames_for_a_full_ring_wait_in_the_backlog_and_arrive_in_order() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, RxCaps::FULL)]);
    let guest = lan.port(1);
    for n in 0..5 {
        lan.send(0, &numbered(A, B, n));
    }
    assert!(ring.used().is_empty(), "no buffers, nothing written");
    assert!(guest.backlogged());
    let s = guest.counters.snapshot();
    assert_eq!((s.tx_frames, s.total_drops()), (0, 0), "waiting, neither delivered nor dropped");

    ring.post_rx(3);
    flush_pending(&guest, 0, &mut TxScratch::default());
    assert_eq!(ring.received().iter().map(|r| number(&r.frame)).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(guest.backlogged(), "two still wait");

    ring.post_rx(10);
    flush_pending(&guest, 0, &mut TxScratch::default());
    assert_eq!(ring.received().iter().map(|r| number(&r.frame)).collect::<Vec<_>>(), [3, 4]);
    assert!(!guest.backlogged());
    let s = guest.counters.snapshot();
    assert_eq!((s.tx_frames, s.total_drops()), (5, 0));
}

#[test]
fn waiting_frames_written_ahead_of_a_frame_that_fails_still_interrupt_the_guest() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: a dup of a live eventfd, owned by the File.
    ring.vring.set_call(Some(unsafe { std::fs::File::from_raw_fd(libc::dup(call.as_raw_fd())) }));
    // A guest without mergeable buffers: a frame must fit one buffer.
    let caps = RxCaps { mrg_rxbuf: false, ..RxCaps::NONE };
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, caps)]);
    for n in 0..2 {
        lan.send(0, &numbered(A, B, n));
    }
    assert!(lan.port(1).backlogged());
    // Three small buffers come; before their kick is handled a frame too big for them does:
    // the two waiting frames are written ahead of it, and it is dropped.
    for _ in 0..3 {
        ring.offer(200, VRING_DESC_F_WRITE);
    }
    lan.send(0, &udp(A, B, &[7u8; 600]));
    assert_eq!(ring.received().iter().map(|r| number(&r.frame)).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(lan.port(1).counters.snapshot().drop_count(DropReason::RxBufferTooSmall), 1);
    assert_eq!(call.read().ok(), Some(1), "the guest hears of the two frames");
}

#[test]
fn a_new_frame_for_a_guest_goes_behind_the_waiting_ones() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, RxCaps::FULL)]);
    for n in 0..3 {
        lan.send(0, &numbered(A, B, n));
    }
    // Buffers come, but the sender gets there before the guest's kick is handled.
    ring.post_rx(10);
    lan.send(0, &numbered(A, B, 3));
    assert_eq!(ring.received().iter().map(|r| number(&r.frame)).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(!lan.port(1).backlogged());
}

#[test]
fn a_full_backlog_drops_further_frames_as_no_rx_buffer() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, RxCaps::FULL)]);
    let guest = lan.port(1);
    let total = BACKLOG_MAX_FRAMES as u32 + 3;
    for n in 0..total {
        lan.send(0, &numbered(A, B, n));
    }
    let s = guest.counters.snapshot();
    assert_eq!((s.tx_frames, s.drop_count(DropReason::NoRxBuffer)), (0, 3));

    // The guest drains it a ring at a time: every frame that was kept arrives, in order.
    let mut got = Vec::new();
    let mut cx = TxScratch::default();
    while guest.backlogged() {
        ring.post_rx(QUEUE_SIZE as usize);
        flush_pending(&guest, 0, &mut cx);
        got.extend(ring.received().iter().map(|r| number(&r.frame)));
        assert!(got.len() <= BACKLOG_MAX_FRAMES, "flushing must end");
    }
    assert_eq!(got, (0..BACKLOG_MAX_FRAMES as u32).collect::<Vec<_>>());
    let s = guest.counters.snapshot();
    assert_eq!((s.tx_frames, s.drop_count(DropReason::NoRxBuffer)), (BACKLOG_MAX_FRAMES as u64, 3));
}

// ---------------------------------------------------------------------------------------------
// Offload fix-ups.

#[test]
fn a_partial_checksum_is_completed_for_a_link_without_checksum_offload() {
    for complete in [udp(A, B, b"finish my checksum"), tcp(A, B, b"finish my checksum")] {
        let (from, to) = (FakeLink::offloading(), FakeLink::plain());
        let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &from), link_port(1, PortKind::Uplink, &to)]);
        let (f, hdr) = partial(&complete);
        assert!(!checksums_ok(&f), "the test frame's checksum is partial");
        lan.send_with(0, hdr, &f);
        assert_eq!(to.frames(), vec![complete]);
    }
}

#[test]
fn a_partial_checksum_passes_through_to_a_link_with_checksum_offload() {
    let (from, to) = (FakeLink::offloading(), FakeLink::offloading());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &from), link_port(1, PortKind::Uplink, &to)]);
    let (f, hdr) = partial(&udp(A, B, b"the kernel finishes it"));
    lan.send_with(0, hdr, &f);
    let sent = to.take();
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].hdr, &sent[0].frame), (hdr, &f), "untouched, header and all");
}

#[test]
fn a_partial_checksum_is_completed_for_a_guest_without_checksum_offload() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let no_offloads = RxCaps { mrg_rxbuf: true, ..RxCaps::NONE };
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, no_offloads)]);
    ring.post_rx(4);
    let complete = tcp(A, B, b"finish my checksum");
    let (f, hdr) = partial(&complete);
    lan.send_with(0, hdr, &f);
    let got = ring.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, complete);
    assert!(!got[0].hdr.needs_csum());
}

#[test]
fn a_tso_frame_is_segmented_for_a_link_without_tso() {
    let (from, to) = (FakeLink::offloading(), FakeLink::plain());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &from), link_port(1, PortKind::Uplink, &to)]);
    let (f, hdr, payload) = tso(60_000);
    lan.send_with(0, hdr, &f);
    assert_segments_of(&to.frames(), &payload);
    let s = lan.port(1).counters.snapshot();
    assert_eq!(s.total_drops(), 0);
    // Each segment is a frame on the link, counted as for a guest receiver.
    assert_eq!(s.tx_frames, payload.len().div_ceil(1448) as u64, "each segment counted");
}

#[test]
fn a_tso_frame_passes_whole_to_a_link_with_tso() {
    let (from, to) = (FakeLink::offloading(), FakeLink::offloading());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &from), link_port(1, PortKind::Uplink, &to)]);
    let (f, hdr, _) = tso(60_000);
    lan.send_with(0, hdr, &f);
    let sent = to.take();
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].hdr, &sent[0].frame), (hdr, &f));
}

#[test]
fn a_tso_frame_is_segmented_into_a_guest_ring_without_tso() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let no_offloads = RxCaps { mrg_rxbuf: true, ..RxCaps::NONE };
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, no_offloads)]);
    ring.post_rx(64);
    let (f, hdr, payload) = tso(60_000);
    lan.send_with(0, hdr, &f);
    let got = ring.received();
    assert!(got.iter().all(|r| !r.hdr.is_gso() && !r.hdr.needs_csum()), "plain frames");
    assert_segments_of(&got.into_iter().map(|r| r.frame).collect::<Vec<_>>(), &payload);
    assert_eq!(lan.port(1).counters.snapshot().tx_frames, payload.len().div_ceil(1448) as u64, "each segment counted");
}

// ---------------------------------------------------------------------------------------------
// A guest's TX ring and the batched link path.

#[test]
fn frames_from_a_guest_tx_ring_reach_a_batching_link_in_one_batch() {
    let up = FakeLink::with(Some(RxCaps::FULL), true);
    let mut tx = GuestRing::new();
    let lan = Lan::switch(vec![Port::new(0, "guest", PortKind::Vhost), link_port(1, PortKind::Uplink, &up)]);
    let frames: Vec<Vec<u8>> = (0..5).map(|n| numbered(A, NOBODY, n)).collect();
    for f in &frames {
        tx.post_tx(VnetHeader::default(), f);
    }
    let guest = lan.port(0);
    process_tx(&lan.net, &guest, &tx.vring, &tx.mem.memory(), HDR_LEN, false, &mut TxScratch::default());

    assert_eq!(*up.batch_sizes.lock().unwrap(), [5], "one send_batch for the TX batch");
    assert_eq!(up.frames(), frames);
    assert_eq!(tx.used(), (0..5).map(|d| (d, 0)).collect::<Vec<_>>());
    assert_eq!((guest.counters.snapshot().rx_frames, lan.port(1).counters.snapshot().tx_frames), (5, 5));
}

#[test]
fn a_guest_frame_needing_a_fix_up_is_not_batched_but_still_sent() {
    let up = FakeLink::with(Some(RxCaps { hdr_len: 0, ..RxCaps::NONE }), true);
    let mut tx = GuestRing::new();
    let lan = Lan::switch(vec![Port::new(0, "guest", PortKind::Vhost), link_port(1, PortKind::Uplink, &up)]);
    let complete = udp(A, NOBODY, b"partial");
    let (f, hdr) = partial(&complete);
    tx.post_tx(hdr, &f);
    tx.post_tx(VnetHeader::default(), &numbered(A, NOBODY, 1));
    process_tx(&lan.net, &lan.port(0), &tx.vring, &tx.mem.memory(), HDR_LEN, false, &mut TxScratch::default());
    assert_eq!(*up.batch_sizes.lock().unwrap(), [1], "only the pass-through frame is batched");
    let got = up.frames();
    assert!(got.contains(&complete) && got.contains(&numbered(A, NOBODY, 1)), "both went out");
    assert_eq!(tx.used().len(), 2);
}

/// Within one TX batch a frame that needs a software fix-up does not overtake pass-through
/// frames queued before it for the same link: those are sent first.
#[test]
fn frames_from_a_guest_to_one_batching_link_keep_their_order() {
    let up = FakeLink::with(Some(RxCaps { hdr_len: 0, ..RxCaps::NONE }), true);
    let mut tx = GuestRing::new();
    let lan = Lan::switch(vec![Port::new(0, "guest", PortKind::Vhost), link_port(1, PortKind::Uplink, &up)]);
    let first = numbered(A, NOBODY, 1);
    let complete = udp(A, NOBODY, b"partial");
    let (second, hdr) = partial(&complete);
    tx.post_tx(VnetHeader::default(), &first);
    tx.post_tx(hdr, &second);
    process_tx(&lan.net, &lan.port(0), &tx.vring, &tx.mem.memory(), HDR_LEN, false, &mut TxScratch::default());
    assert_eq!(up.frames(), vec![first, complete]);
}

// ---------------------------------------------------------------------------------------------
// The gateway's services.

/// What the fake services were asked, in order: the service's name and the frame.
type Asked = Arc<Mutex<Vec<(&'static str, Vec<u8>)>>>;

/// A gateway service that writes down that it was asked and answers as it was told to.
struct FakeService {
    name: &'static str,
    answer: Handled,
    asked: Asked,
}

impl GatewayService for FakeService {
    fn handle(&self, cx: &GatewayCx, _port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        assert_eq!((cx.network, cx.gateway), ("t", &gateway()));
        self.asked.lock().unwrap().push((self.name, frame.to_vec()));
        if self.answer == Handled::Reply {
            reply.extend_from_slice(&reply_from(self.name, frame));
        }
        self.answer
    }
}

/// The reply service `name` makes for `frame`.
fn reply_from(name: &str, frame: &[u8]) -> Vec<u8> {
    udp(gateway().mac, frame[6..12].try_into().unwrap(), name.as_bytes())
}

/// The gateway's own ARP answer, as the ARP/ICMP service gives it.
struct GatewayArp;

impl GatewayService for GatewayArp {
    fn handle(&self, cx: &GatewayCx, _port: &Port, frame: &[u8], reply: &mut Vec<u8>) -> Handled {
        if cx.gateway.handle(frame, reply) {
            Handled::Reply
        } else {
            Handled::NotMine
        }
    }
}

/// A network with a gateway running `services` (named fakes answering as given), over three
/// host-link ports.
fn gateway_lan(services: &[(&'static str, Handled)]) -> (Lan, [Arc<FakeLink>; 3], Asked) {
    let asked = Asked::default();
    let services = services
        .iter()
        .map(|&(name, answer)| Arc::new(FakeService { name, answer, asked: asked.clone() }) as Arc<dyn GatewayService>)
        .collect();
    let (lan, links) = gateway_lan_with(services);
    (lan, links, asked)
}

fn gateway_lan_with(services: Vec<Arc<dyn GatewayService>>) -> (Lan, [Arc<FakeLink>; 3]) {
    let links = [FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading()];
    let mut net = with_gateway(Mode::Isolated);
    net.services = services;
    let lan = Lan::new(
        net,
        vec![link_port(0, PortKind::Tap, &links[0]), link_port(1, PortKind::Tap, &links[1]), link_port(2, PortKind::Tap, &links[2])],
    );
    (lan, links)
}

fn names(asked: &Asked) -> Vec<&'static str> {
    asked.lock().unwrap().iter().map(|a| a.0).collect()
}

#[test]
fn services_are_asked_in_order_until_one_takes_the_frame() {
    let (mut lan, links, asked) = gateway_lan(&[("a", Handled::NotMine), ("b", Handled::Consumed), ("c", Handled::Reply)]);
    let f = udp(A, gateway().mac, b"for the gateway");
    lan.send(0, &f);
    assert_eq!(names(&asked), ["a", "b"], "c is not asked once b took it");
    assert!(asked.lock().unwrap().iter().all(|(_, seen)| *seen == f));
    assert!(links.iter().all(|l| l.take().is_empty()), "consumed: nothing sent, the gateway's MAC is not flooded");
}

#[test]
fn a_service_reply_goes_back_to_the_sending_port_only() {
    let (mut lan, links, asked) = gateway_lan(&[("a", Handled::NotMine), ("b", Handled::Reply), ("c", Handled::Consumed)]);
    let f = udp(A, gateway().mac, b"ask b");
    lan.send(1, &f);
    assert_eq!(names(&asked), ["a", "b"]);
    assert_eq!(links[1].frames(), vec![reply_from("b", &f)]);
    assert!(links[0].take().is_empty() && links[2].take().is_empty());
    assert_eq!(lan.port(1).counters.snapshot().tx_frames, 1);
}

#[test]
fn frames_not_for_the_gateway_are_not_offered_to_its_services() {
    let (mut lan, links, asked) = gateway_lan(&[("a", Handled::NotMine)]);
    lan.send(1, &udp(B, NOBODY, b"B is learned"));
    lan.send(0, &udp(A, B, b"to a guest"));
    lan.send(0, &udp(A, NOBODY, b"to nobody known"));
    assert!(names(&asked).is_empty(), "unicast between guests, known or not, is not the gateway's");
    lan.send(0, &udp(A, BROADCAST, b"broadcast is"));
    assert_eq!(names(&asked), ["a"]);
    assert!(links[1].frames().iter().any(|f| f == &udp(A, BROADCAST, b"broadcast is")), "and flooded as well");
}

#[test]
fn services_see_frames_with_their_checksums_completed() {
    let (mut lan, _links, asked) = gateway_lan(&[("a", Handled::Consumed)]);
    let complete = udp(A, gateway().mac, b"check me");
    let (f, hdr) = partial(&complete);
    lan.send_with(0, hdr, &f);
    assert_eq!(asked.lock().unwrap().clone(), [("a", complete)]);
}

#[test]
fn tso_frames_are_not_offered_to_services_without_a_router() {
    let (mut lan, _links, asked) = gateway_lan(&[("a", Handled::Consumed)]);
    let (mut f, hdr, _) = tso(10_000);
    f[0..6].copy_from_slice(&gateway().mac);
    lan.send_with(0, hdr, &f);
    assert!(names(&asked).is_empty());
}

#[test]
fn the_gateway_answers_arp_for_its_address_to_the_asker_only() {
    let (mut lan, links) = gateway_lan_with(vec![Arc::new(GatewayArp)]);
    let req = arp_request(A, IP_A, GATEWAY_IP);
    lan.send(0, &req);
    let got = links[0].frames();
    assert_eq!(got.len(), 1);
    let a = arp::parse(&got[0]).expect("an ARP reply");
    assert_eq!((&got[0][0..6], &got[0][6..12]), (&A[..], &gateway().mac[..]));
    assert_eq!((a.op, a.sender_mac, a.sender_ip, a.target_mac, a.target_ip), (OP_REPLY, gateway().mac, GATEWAY_IP, A, IP_A.into()));
    assert_eq!(links[1].frames(), vec![req.clone()], "the others see the broadcast request, not the reply");
    assert_eq!(links[2].frames(), vec![req]);
}

// ---------------------------------------------------------------------------------------------
// The router of a nat network.

const OUTSIDE_MAC: Mac = [0x02, 0x76, 0x75, 0, 0, 0x0e];
const OUTSIDE_IP: [u8; 4] = [10, 0, 0, 50];
const LAN_ROUTER: [u8; 4] = [10, 0, 0, 1];
const LAN_ROUTER_MAC: Mac = [0x52, 0x54, 0, 0, 1, 1];
const FAR: [u8; 4] = [8, 8, 8, 8];

/// A nat network as the run-time layer builds one with a static uplink address: a guest-side
/// port (0) and the routed uplink (1).
fn nat_lan() -> (Lan, Arc<FakeLink>, Arc<FakeLink>) {
    let cfg = RouterConfig {
        mode: RouteMode::Nat,
        inside: gateway(),
        outside_mac: OUTSIDE_MAC,
        next_hop: None,
        routes: Vec::new(),
        proxy_arp: false,
        nat: NatConfig::default(),
        firewall: Vec::new(),
        firewall_default: Action::Allow,
    };
    let mut router = Router::new(cfg, None);
    router.set_outside(Some((OUTSIDE_IP.into(), 24)), Some(LAN_ROUTER.into()), &mut Vec::new());
    let mut net = with_gateway(Mode::Nat);
    net.router = Some(Mutex::new(router));
    let (guest, up) = (FakeLink::offloading(), FakeLink::offloading());
    let mut uplink = link_port(1, PortKind::Uplink, &up);
    uplink.routed = true;
    (Lan::new(net, vec![link_port(0, PortKind::Tap, &guest), uplink]), guest, up)
}

/// The guest sends a datagram to the far host through the gateway; the router asks for its
/// next hop on the uplink, the LAN router answers, and the datagram goes out. Returns it.
fn guest_datagram_goes_out(lan: &mut Lan, up: &FakeLink) -> Vec<u8> {
    lan.send(0, &udp_ip(A, gateway().mac, IP_A, FAR, 40000, 53, b"query"));
    let asked = up.frames();
    assert_eq!(asked.len(), 1, "first an ARP request for the next hop: {asked:?}");
    let a = arp::parse(&asked[0]).expect("ARP");
    assert_eq!((a.op, a.sender_mac, a.sender_ip, a.target_ip), (OP_REQUEST, OUTSIDE_MAC, OUTSIDE_IP.into(), LAN_ROUTER.into()));

    let mut answer = Vec::new();
    let reply = Arp {
        op: OP_REPLY,
        sender_mac: LAN_ROUTER_MAC,
        sender_ip: LAN_ROUTER.into(),
        target_mac: OUTSIDE_MAC,
        target_ip: OUTSIDE_IP.into(),
    };
    arp::build(&mut answer, &reply);
    lan.route(1, &answer);
    let out = up.frames();
    assert_eq!(out.len(), 1, "the waiting datagram goes out");
    out.into_iter().next().unwrap()
}

#[test]
fn a_nat_network_masquerades_guest_traffic_out_of_the_uplink_once_arp_answers() {
    let (mut lan, guest, up) = nat_lan();
    let out = guest_datagram_goes_out(&mut lan, &up);
    assert_eq!((&out[0..6], &out[6..12]), (&LAN_ROUTER_MAC[..], &OUTSIDE_MAC[..]));
    let ip = &out[14..];
    assert_eq!((&ip[12..16], &ip[16..20], ip[8]), (&OUTSIDE_IP[..], &FAR[..], 63), "masqueraded, TTL decremented");
    assert!(checksums_ok(&out));
    assert_eq!(&out[42..], b"query");
    assert!(guest.take().is_empty(), "nothing comes back to the guest side");
    assert_eq!(lan.port(1).counters.snapshot().tx_frames, 2, "the ARP request and the datagram");
}

#[test]
fn a_nat_reply_from_outside_is_translated_back_to_the_guest() {
    let (mut lan, guest, up) = nat_lan();
    let out = guest_datagram_goes_out(&mut lan, &up);
    let sport = u16::from_be_bytes([out[34], out[35]]);
    lan.route(1, &udp_ip(LAN_ROUTER_MAC, OUTSIDE_MAC, FAR, OUTSIDE_IP, 53, sport, b"answer"));
    let back = guest.frames();
    assert_eq!(back.len(), 1);
    let f = &back[0];
    assert_eq!((&f[0..6], &f[6..12]), (&A[..], &gateway().mac[..]));
    assert_eq!((&f[26..30], &f[30..34], u16::from_be_bytes([f[36], f[37]])), (&FAR[..], &IP_A[..], 40000));
    assert!(checksums_ok(f));
    assert!(up.take().is_empty());
}

#[test]
fn frames_between_guests_of_a_nat_network_stay_off_the_uplink() {
    let (mut lan, guest, up) = nat_lan();
    lan.send(0, &udp(A, BROADCAST, b"guests only"));
    lan.send(0, &udp(A, NOBODY, b"unknown guest"));
    assert!(up.take().is_empty());
    assert!(guest.take().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Bounded work per frame.

#[test]
fn a_frame_is_not_written_across_hundreds_of_tiny_receive_buffers() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, RxCaps::FULL)]);
    let guest = lan.port(1);
    // 8-byte buffers: a 1,400-byte frame would need 177 of them.
    for _ in 0..200 {
        ring.offer(8, VRING_DESC_F_WRITE);
    }
    lan.send(0, &udp(A, B, &[7; 1358]));
    // The chains one frame may fill went back to the guest empty; the frame waits.
    let used = ring.used();
    assert_eq!(used.len(), MAX_RX_CHAINS);
    assert!(used.iter().all(|&(_, len)| len == 0), "nothing written into them");
    assert_eq!(guest.counters.snapshot().tx_frames, 0);
    assert!(guest.backlogged());
    // Until the guest kicks, senders queue without walking its ring again.
    lan.send(0, &udp(A, B, &[8; 100]));
    assert!(ring.used().is_empty(), "the ring was not walked again");
    // The guest posts real buffers and kicks: both frames arrive (the first across the 72
    // tiny buffers left and a real one).
    ring.post_rx(4);
    flush_pending(&guest, 0, &mut TxScratch::default());
    let s = guest.counters.snapshot();
    assert_eq!((s.tx_frames, s.total_drops()), (2, 0));
    assert!(!guest.backlogged());
}

#[test]
fn zero_length_receive_buffers_are_handed_back_empty() {
    let a = FakeLink::offloading();
    let mut ring = GuestRing::new();
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), guest_port(1, &ring, RxCaps::FULL)]);
    for _ in 0..3 {
        ring.offer(0, VRING_DESC_F_WRITE);
    }
    ring.post_rx(1);
    let f = udp(A, B, b"after the broken ones");
    lan.send(0, &f);
    let used = ring.used();
    assert_eq!(used.iter().map(|&(_, len)| len).collect::<Vec<_>>(), vec![0, 0, 0, (HDR_LEN + f.len()) as u32]);
    // The frame is in the one real buffer alone, not spread over the empty ones.
    let mut b = vec![0u8; HDR_LEN + f.len()];
    ring.mem.memory().read_slice(&mut b, GuestRing::buffer(used[3].0)).unwrap();
    assert_eq!((VnetHeader::parse(&b[..HDR_LEN]).num_buffers, &b[HDR_LEN..]), (1, &f[..]));
    assert_eq!(lan.port(1).counters.snapshot().tx_frames, 1);
}

#[test]
fn a_gso_size_below_the_floor_is_refused_and_counted() {
    let (a, b) = (FakeLink::offloading(), FakeLink::plain());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), link_port(1, PortKind::Uplink, &b)]);
    let (f, hdr, _) = tso(60_000);
    lan.send_with(0, VnetHeader { gso_size: 1, ..hdr }, &f);
    assert!(b.take().is_empty(), "not segmented into 60,000 frames, not sent at all");
    assert_eq!(lan.port(0).counters.snapshot().drop_count(DropReason::GsoTooSmall), 1);
}

#[test]
fn a_removed_port_gets_no_flooded_frames() {
    let (a, b, c) = (FakeLink::offloading(), FakeLink::offloading(), FakeLink::with(None, false));
    let gone = link_port(2, PortKind::Tap, &c);
    gone.removed.store(true, Ordering::Release);
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), link_port(1, PortKind::Tap, &b), gone]);
    lan.send(0, &udp(A, BROADCAST, b"to all"));
    assert_eq!(b.take().len(), 1);
    assert_eq!(lan.port(2).counters.snapshot().total_drops(), 0, "not offered, so not counted as port_down");
}

// ---------------------------------------------------------------------------------------------
// Several queue pairs.

/// A guest port with one receive ring per queue pair.
fn multiqueue_port(id: PortId, rings: &[&GuestRing]) -> Port {
    let p = Port::new(id, format!("p{id}"), PortKind::Vhost).with_queues(rings.len());
    for (q, ring) in p.queues.iter().zip(rings) {
        *q.rx.lock().unwrap() = Some(RxTarget {
            vring: ring.vring.clone(),
            mem: ring.mem.clone(),
            caps: RxCaps::FULL,
            backlog: Default::default(),
            signalled: 0,
            cache: None,
        });
    }
    p.connected.store(true, Ordering::Relaxed);
    p
}

#[test]
fn flows_spread_over_a_guests_queue_pairs_and_each_flow_keeps_its_queue() {
    let a = FakeLink::offloading();
    let (mut r0, mut r1) = (GuestRing::new(), GuestRing::new());
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), multiqueue_port(1, &[&r0, &r1])]);
    r0.post_rx(200);
    r1.post_rx(200);
    // 64 flows (source ports two apart, as parallel streams get them), two frames each.
    for round in 0..2u8 {
        for sport in 0..64u16 {
            lan.send(0, &udp_ip(A, B, IP_A, IP_B, 10_000 + 2 * sport, 53, &[round]));
        }
    }
    let sport = |f: &Sent| u16::from_be_bytes([f.frame[34], f.frame[35]]);
    let (got0, got1) = (r0.received(), r1.received());
    assert_eq!(got0.len() + got1.len(), 128);
    assert!(got0.len() >= 32 && got1.len() >= 32, "both queues used evenly enough: {} and {}", got0.len(), got1.len());
    let on0: std::collections::HashSet<u16> = got0.iter().map(sport).collect();
    assert!(got1.iter().all(|f| !on0.contains(&sport(f))), "a flow never splits over two queues");
    let port = lan.port(1);
    let counted: Vec<u64> = port.queues.iter().map(|q| q.to_guest.load(Ordering::Relaxed)).collect();
    assert_eq!(counted, vec![got0.len() as u64, got1.len() as u64]);
}

#[test]
fn frames_go_to_the_running_pairs_only() {
    let a = FakeLink::offloading();
    let (mut r0, r1) = (GuestRing::new(), GuestRing::new());
    // The guest enabled one pair of two.
    r1.vring.set_enabled(false);
    let mut lan = Lan::switch(vec![link_port(0, PortKind::Tap, &a), multiqueue_port(1, &[&r0, &r1])]);
    r0.post_rx(100);
    for sport in 0..32u16 {
        lan.send(0, &udp_ip(A, B, IP_A, IP_B, 20_000 + sport, 53, b"x"));
    }
    assert_eq!(r0.received().len(), 32, "every flow on the running pair");
    assert_eq!(lan.port(1).counters.snapshot().total_drops(), 0);
}

// ---------------------------------------------------------------------------------------------
// A sender stuck in a host link's send holds up nobody.

/// A host link whose `send` blocks until the test opens its gate: a sender stuck in a slow
/// system call.
struct GateLink {
    entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl HostLink for GateLink {
    fn caps(&self) -> Option<RxCaps> {
        Some(RxCaps::FULL)
    }

    fn send(&self, _iov: &[libc::iovec]) -> Result<(), DropReason> {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        Ok(())
    }

    fn batches(&self) -> bool {
        false
    }

    fn send_batch(&self, iov: &mut [libc::iovec], spans: &[Range<usize>]) -> Vec<(usize, DropReason)> {
        spans.iter().enumerate().filter_map(|(i, r)| self.send(&iov[r.clone()]).err().map(|e| (i, e))).collect()
    }

    fn close(&self) {}

    fn describe(&self) -> (&'static str, String) {
        ("gate", "gate0".into())
    }
}

/// Issue 12 point 4: a guest whose frame is stuck in a slow link send must not keep a port
/// from being added, nor (through that waiting add) every other guest from sending.
#[test]
fn a_sender_stuck_in_a_link_send_blocks_neither_a_port_add_nor_the_other_senders() {
    use std::sync::mpsc::channel;
    use std::time::Duration;
    let (entered_tx, entered) = channel();
    let gate = Arc::new(GateLink { entered: Mutex::new(Some(entered_tx)), open: Mutex::new(false), opened: Default::default() });
    let mut rx_c = GuestRing::new();
    rx_c.post_rx(8);
    let mut link = Port::new(1, "slow", PortKind::Uplink);
    link.link = Some(gate.clone());
    link.connected.store(true, Ordering::Relaxed);
    let lan =
        Lan::switch(vec![Port::new(0, "a", PortKind::Vhost), link, Port::new(2, "b", PortKind::Vhost), guest_port(3, &rx_c, RxCaps::FULL)]);
    lan.net.macs.lock().unwrap().learn(C, 3, lan.net.now_ms()).unwrap();

    // Guest A floods a frame: the slow link's send takes it and does not return.
    let mut tx_a = GuestRing::new();
    tx_a.post_tx(VnetHeader::default(), &numbered(A, NOBODY, 1));
    let net = lan.net.clone();
    let stuck = std::thread::spawn(move || {
        let a = net.port_by_id(0).unwrap();
        process_tx(&net, &a, &tx_a.vring, &tx_a.mem.memory(), HDR_LEN, false, &mut TxScratch::default());
    });
    entered.recv_timeout(Duration::from_secs(10)).expect("guest A's frame reaches the slow link");

    // The control socket adds a port meanwhile.
    let (added_tx, added) = channel();
    let net = lan.net.clone();
    std::thread::spawn(move || {
        let p = net.ports.add(|id, _| Ok::<_, ()>(Port::new(id, "new", PortKind::Vhost))).unwrap();
        let _ = added_tx.send(p.id);
    });
    assert_eq!(added.recv_timeout(Duration::from_secs(10)), Ok(4), "the port add waits for nobody");

    // Guest B sends to guest C meanwhile.
    let mut tx_b = GuestRing::new();
    tx_b.post_tx(VnetHeader::default(), &numbered(B, C, 2));
    let (sent_tx, sent) = channel();
    let net = lan.net.clone();
    std::thread::spawn(move || {
        let b = net.port_by_id(2).unwrap();
        let _ = sent_tx.send(process_tx(&net, &b, &tx_b.vring, &tx_b.mem.memory(), HDR_LEN, false, &mut TxScratch::default()));
    });
    assert_eq!(sent.recv_timeout(Duration::from_secs(10)), Ok(1), "guest B's sending waits for nobody");
    let got = rx_c.received();
    assert!(got.iter().any(|s| s.frame == numbered(B, C, 2)), "guest C got B's frame");

    *gate.open.lock().unwrap() = true;
    gate.opened.notify_all();
    stuck.join().unwrap();
    assert!(lan.net.port("new").is_some(), "the added port is listed");
}

/// Issue 12 soak: a port added and removed every second must not cost a port's memory each
/// time. A retired port's slot keeps a shared placeholder that takes no frames.
#[test]
fn a_retired_port_is_let_go_and_its_slot_takes_no_frames() {
    let mut rx = GuestRing::new();
    rx.post_rx(4);
    let mut lan = Lan::switch(vec![Port::new(0, "sender", PortKind::Vhost), guest_port(1, &rx, RxCaps::FULL)]);
    let gone = Arc::downgrade(&lan.port(1));
    lan.port(1).removed.store(true, Ordering::Release);
    lan.net.ports.retire(1);
    assert!(gone.upgrade().is_none(), "nothing holds the removed port any more");
    assert!(lan.net.port_by_id(1).is_some_and(|p| p.removed.load(Ordering::Acquire)), "its id still names a removed port");
    // A frame still addressed to it (a stale MAC entry) is dropped, not delivered anywhere.
    lan.net.macs.lock().unwrap().learn(B, 1, lan.net.now_ms()).unwrap();
    lan.send(0, &numbered(A, B, 1));
    assert!(rx.received().is_empty());
    // A port that is not removed is never retired.
    lan.net.ports.retire(0);
    assert_eq!(lan.port(0).name, "sender");
}

// ---------------------------------------------------------------------------------------------
// Port security against other guests.

/// A network with a gateway and a DHCP server where B leases 192.168.122.11 (IP_B) and C has
/// the reservation 192.168.122.12, over three host-link ports with port security, and a fourth
/// port without it (a bridged uplink).
fn secured_lan() -> (Lan, [Arc<FakeLink>; 4]) {
    secured_lan_with(|_| {})
}

/// [`secured_lan`], with `edit` applied to the network before it starts.
fn secured_lan_with(edit: impl FnOnce(&mut Network)) -> (Lan, [Arc<FakeLink>; 4]) {
    use vunet_dhcp::{DhcpServer, Lease, ServerConfig, StaticHost};
    let links = [FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading(), FakeLink::offloading()];
    let mut net = with_gateway(Mode::Isolated);
    let mut dhcp = DhcpServer::new(ServerConfig {
        server_ip: GATEWAY_IP,
        prefix: 24,
        range: (Ipv4Addr::new(192, 168, 122, 2), Ipv4Addr::new(192, 168, 122, 254)),
        hosts: vec![StaticHost { mac: C, ip: Ipv4Addr::new(192, 168, 122, 12), name: None }],
        lease_secs: 3600,
        router: false,
        dns: None,
        domain: None,
        mtu: None,
    });
    assert_eq!(dhcp.restore(&[Lease { mac: B, ip: IP_B.into(), expires: u64::MAX, hostname: None }], super::unix_now()), 1);
    net.dhcp = Some(Mutex::new(dhcp));
    let secured = |id| {
        let mut p = link_port(id, PortKind::Tap, &links[id]);
        p.security = true;
        p
    };
    let ports = vec![secured(0), secured(1), secured(2), link_port(3, PortKind::Uplink, &links[3])];
    edit(&mut net);
    (Lan::new(net, ports), links)
}

fn arp_reply(mac: Mac, ip: [u8; 4], to: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    arp::build(&mut f, &Arp { op: OP_REPLY, sender_mac: mac, sender_ip: ip.into(), target_mac: to, target_ip: Ipv4Addr::from(IP_A) });
    f
}

#[test]
fn a_guest_without_a_lease_cannot_use_the_gateways_or_another_guests_address() {
    let (mut lan, links) = secured_lan();
    let gw = GATEWAY_IP.octets();
    let c_reserved = [192, 168, 122, 12];
    // Port 0's guest (A) has no lease: it never used DHCP.
    lan.send(0, &arp_reply(A, gw, BROADCAST));
    lan.send(0, &arp_request(A, gw, Ipv4Addr::from(IP_B)));
    lan.send(0, &arp_reply(A, IP_B, BROADCAST));
    lan.send(0, &arp_reply(A, c_reserved, BROADCAST));
    lan.send(0, &udp_ip(A, BROADCAST, gw, IP_B, 5000, 6000, b"as the gateway"));
    lan.send(0, &udp_ip(A, BROADCAST, IP_B, [192, 168, 122, 255], 5000, 6000, b"as B"));
    lan.send(0, &udp_ip(A, BROADCAST, c_reserved, [192, 168, 122, 255], 5000, 6000, b"as C"));
    assert!(links[1].take().is_empty() && links[3].take().is_empty(), "none of them reaches anyone");
    assert_eq!(lan.port(0).counters.snapshot().drop_count(DropReason::SpoofedIp), 7);
    // What a guest without a lease needs still passes: DHCP from 0.0.0.0, an ARP probe, and an
    // address nobody holds (a static configuration), twice (the second from the cache).
    lan.send(0, &udp_ip(A, BROADCAST, [0; 4], [255; 4], 68, 67, b"discover"));
    lan.send(0, &arp_request(A, [0; 4], Ipv4Addr::new(192, 168, 122, 50)));
    lan.send(0, &arp_reply(A, [192, 168, 122, 50], BROADCAST));
    lan.send(0, &udp_ip(A, BROADCAST, [192, 168, 122, 50], [192, 168, 122, 255], 5000, 6000, b"static"));
    lan.send(0, &udp_ip(A, BROADCAST, [192, 168, 122, 50], [192, 168, 122, 255], 5000, 6000, b"static"));
    assert_eq!(links[3].take().len(), 5);
    assert_eq!(lan.port(0).counters.snapshot().drop_count(DropReason::SpoofedIp), 7);
    // B and C use their own addresses.
    lan.send(1, &arp_reply(B, IP_B, BROADCAST));
    lan.send(2, &udp_ip(C, BROADCAST, c_reserved, [192, 168, 122, 255], 5000, 6000, b"C"));
    assert_eq!(links[3].take().len(), 2);
    // An address that changes holder is refused at once, whatever the cache said before.
    lan.net.dhcp.as_ref().unwrap().lock().unwrap().restore(
        &[vunet_dhcp::Lease { mac: B, ip: Ipv4Addr::new(192, 168, 122, 60), expires: u64::MAX, hostname: None }],
        super::unix_now(),
    );
    lan.send(0, &udp_ip(A, BROADCAST, [192, 168, 122, 50], [192, 168, 122, 255], 5000, 6000, b"static"));
    assert_eq!(links[3].take().len(), 1);
    lan.send(2, &udp_ip(C, BROADCAST, [192, 168, 122, 60], [192, 168, 122, 255], 5000, 6000, b"B's new one"));
    assert!(links[3].take().is_empty());
    assert_eq!(lan.port(2).counters.snapshot().drop_count(DropReason::SpoofedIp), 1);
}

#[test]
fn a_port_cannot_take_a_mac_another_port_holds() {
    let (mut lan, links) = secured_lan();
    // Port 0's guest uses A first; port 1's guest then tries A.
    lan.send(0, &udp_ip(A, BROADCAST, IP_A, [192, 168, 122, 255], 5000, 6000, b"I am A"));
    drop(links[3].take());
    lan.send(1, &udp_ip(A, BROADCAST, IP_A, [192, 168, 122, 255], 5000, 6000, b"me too"));
    assert!(links[0].take().is_empty() && links[3].take().is_empty());
    assert_eq!(lan.port(1).counters.snapshot().drop_count(DropReason::MacInUse), 1);
    assert_eq!(lan.port(1).locked_mac(), None, "port 1 did not lock to A");
    // Port 2's guest tries B's MAC before B's port ever sent: it holds no port yet, so port 2
    // gets it (and B's lease with it); B's own port is then refused it.
    lan.send(2, &udp_ip(B, BROADCAST, IP_B, [192, 168, 122, 255], 5000, 6000, b"B"));
    assert_eq!(lan.port(2).leased_ip(), Some(Ipv4Addr::from(IP_B)));
    lan.send(1, &udp_ip(B, BROADCAST, IP_B, [192, 168, 122, 255], 5000, 6000, b"the real B"));
    assert_eq!(lan.port(1).counters.snapshot().drop_count(DropReason::MacInUse), 2);
    assert_eq!(lan.port(1).leased_ip(), None, "no lease inherited through a refused MAC");
    links.iter().for_each(|l| drop(l.take()));
    // The bridged uplink cannot re-learn A and pull its traffic: dropped, counted, and frames
    // for A still go to port 0.
    lan.send(3, &udp(A, BROADCAST, b"A is here now"));
    assert!(links[0].take().is_empty() && links[1].take().is_empty());
    assert_eq!(lan.port(3).counters.snapshot().drop_count(DropReason::MacInUse), 1);
    lan.send(2, &udp_ip(B, A, IP_B, IP_A, 5000, 6000, b"for A"));
    assert_eq!(links[0].take().len(), 1);
    assert!(links[3].take().is_empty());
    // The port's removal frees its MAC (what the run-time layer does on port-del).
    lan.port(0).removed.store(true, Ordering::Release);
    lan.net.macs.lock().unwrap().remove_port(0);
    lan.send(1, &udp_ip(A, BROADCAST, IP_A, [192, 168, 122, 255], 5000, 6000, b"A, moved"));
    assert_eq!(lan.port(1).locked_mac(), Some(A));
    assert_eq!(links[3].take().len(), 1);
}

/// A UDP datagram over IPv6 from `src` (to all nodes), as a guest would send it.
fn udp6(mac: Mac, src: std::net::Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let dst = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    PacketBuilder::ethernet2(mac, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(5000, 6000)
        .write(&mut f, payload)
        .unwrap();
    f
}

#[test]
fn ipv6_addresses_are_first_come_across_ports() {
    use std::net::Ipv6Addr;
    use vunet_switch::gateway::{link_local, slaac, Gateway6};
    let prefix = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0);
    let gw6 = Gateway6::new(gateway_mac("t"), Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 1), 64);
    let (mut lan, links) = secured_lan_with(|net| {
        net.gateway6 = Some(gw6);
        net.reserved6 = vec![(Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x30), C)];
    });
    let privacy = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0x1111, 0x2222, 0x3333, 0x4444);
    // B locks its MAC; A uses its EUI-64 addresses and claims a privacy address.
    lan.send(1, &udp_ip(B, BROADCAST, IP_B, [192, 168, 122, 255], 5000, 6000, b"B"));
    lan.send(0, &udp6(A, link_local(&A), b"ll"));
    lan.send(0, &udp6(A, slaac(prefix, &A), b"slaac"));
    lan.send(0, &udp6(A, privacy, b"privacy"));
    lan.send(0, &udp6(A, privacy, b"privacy again"));
    assert_eq!(links[3].take().len(), 5);
    assert_eq!(lan.port(0).ipv6_addresses(), vec![link_local(&A), slaac(prefix, &A), privacy]);
    links.iter().for_each(|l| drop(l.take()));
    // B may take none of them, nor the gateway's, nor C's reservation, nor A's EUI-64 under
    // another prefix; C may use its reservation.
    let a_elsewhere = slaac(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), &A);
    for src in [privacy, gw6.ip, gw6.link_local, Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x30), a_elsewhere] {
        lan.send(1, &udp6(B, src, b"not mine"));
    }
    assert!(links[0].take().is_empty() && links[3].take().is_empty());
    assert_eq!(lan.port(1).counters.snapshot().drop_count(DropReason::SpoofedIp), 5);
    lan.send(2, &udp6(C, Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x30), b"C's reservation"));
    assert_eq!(links[3].take().len(), 1);
    // A router advertisement from A (behind a destination-options header) reaches nobody.
    links.iter().for_each(|l| drop(l.take()));
    let mut ra = Vec::new();
    PacketBuilder::ethernet2(A, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(link_local(&A).octets(), [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 255)
        .udp(1, 1)
        .write(&mut ra, &[])
        .unwrap();
    ra.truncate(14 + 40);
    ra[14 + 4..14 + 6].copy_from_slice(&24u16.to_be_bytes());
    ra[14 + 6] = 60;
    ra.extend_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0, 134, 0, 0, 0, 64, 0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
    lan.send(0, &ra);
    assert!(links.iter().all(|l| l.take().is_empty()));
    assert_eq!(lan.port(0).counters.snapshot().drop_count(DropReason::RogueRouterAdvert), 1);
    // Once A's guest leaves, its claims go with it: B may take the address.
    lan.port(0).forget_guest();
    lan.send(1, &udp6(B, privacy, b"mine now"));
    assert_eq!(links[3].take().len(), 1);
    assert_eq!(lan.port(1).ipv6_addresses(), vec![privacy]);
}

#[test]
fn a_dhcpv6_lease_outranks_a_first_come_claim() {
    use std::net::Ipv6Addr;
    use vunet_dhcp::v6::{Dhcp6Server, Lease6, Server6Config};
    use vunet_switch::gateway::Gateway6;
    let at = |n: u16| Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, n);
    let server = Arc::new(Mutex::new(Dhcp6Server::new(Server6Config {
        server_mac: gateway_mac("t"),
        gateway: at(1),
        prefix: 64,
        range: Some((at(0x100), at(0x1ff))),
        hosts: Vec::new(),
        lease_secs: 3600,
        dns: None,
        domain: None,
    })));
    let (mut lan, links) = secured_lan_with(|net| {
        net.gateway6 = Some(Gateway6::new(gateway_mac("t"), at(1), 64));
        net.dhcp6 = Some(server.clone());
    });
    // A's guest takes ::150 first (by using it) while nobody has leased it.
    lan.send(0, &udp6(A, at(0x150), b"first"));
    assert_eq!(links[3].take().len(), 1);
    links.iter().for_each(|l| drop(l.take()));
    // Then the DHCPv6 server leases ::150 to C (what the DHCPv6 service does, revision bumped).
    let lease =
        Lease6 { mac: C, ip: at(0x150), expires: u64::MAX, hostname: None, duid: vec![0, 3, 0, 1, 0x52, 0x54, 0, 0, 0, 0x0c], iaid: 1 };
    assert_eq!(server.lock().unwrap().restore(&[lease], super::unix_now()), 1);
    lan.net.leases6_rev.fetch_add(1, Ordering::Release);
    // C uses its lease at once although A's port claimed the address first...
    lan.send(2, &udp6(C, at(0x150), b"leased to me"));
    assert_eq!(links[3].take().len(), 1, "the leaseholder's frame passes");
    links.iter().for_each(|l| drop(l.take()));
    // ...and A's guest may no longer send from it, nor may B's (no lease of its own).
    lan.send(0, &udp6(A, at(0x150), b"still mine?"));
    lan.send(1, &udp6(B, at(0x150), b"mine?"));
    let got: Vec<usize> = links.iter().map(|l| l.take().len()).collect();
    assert_eq!(got, [0, 0, 0, 0]);
    assert_eq!(lan.port(0).counters.snapshot().drop_count(DropReason::SpoofedIp), 1);
    assert_eq!(lan.port(1).counters.snapshot().drop_count(DropReason::SpoofedIp), 1);
    assert!(!lan.port(0).ipv6_addresses().contains(&at(0x150)));
    assert!(lan.port(2).ipv6_addresses().contains(&at(0x150)));
    // An address nobody leased stays first come: A claims ::151, C is refused it.
    lan.send(0, &udp6(A, at(0x151), b"unleased"));
    lan.send(2, &udp6(C, at(0x151), b"mine?"));
    assert_eq!(links[3].take().len(), 1);
    assert_eq!(lan.port(2).counters.snapshot().drop_count(DropReason::SpoofedIp), 1);
}

#[test]
fn a_migrated_guests_mac_and_lease_move_on_the_vmms_request_only_once_its_old_port_was_stopped() {
    let (mut lan, links) = secured_lan();
    // B's guest runs on port 1 and holds its lease there.
    lan.send(1, &arp_reply(B, IP_B, BROADCAST));
    assert_eq!(links[3].take().len(), 1);
    assert_eq!(lan.port(1).leased_ip(), Some(Ipv4Addr::from(IP_B)));
    // While port 1's rings run, neither a guest nor the VMM of another port takes B's MAC.
    lan.send(2, &arp_reply(B, IP_B, BROADCAST));
    assert!(links[3].take().is_empty());
    assert_eq!(lan.port(2).counters.snapshot().drop_count(DropReason::MacInUse), 1);
    assert!(!lan.net.take_migrated_mac(&lan.port(2), B));
    // The guest also claimed an IPv6 address on port 1.
    let ip6: std::net::Ipv6Addr = "fd00::b".parse().unwrap();
    lan.port(1).claims6.lock().unwrap().insert(ip6);
    // Port 1's VMM stops its rings (GET_VRING_BASE: the guest migrates away). A guest frame
    // on port 2 still does not move the MAC: only the VMM's request (SEND_RARP) does.
    lan.port(1).vmm_stopped.store(true, Ordering::Release);
    lan.send(2, &arp_reply(B, IP_B, BROADCAST));
    assert!(links[3].take().is_empty());
    assert_eq!(lan.port(2).counters.snapshot().drop_count(DropReason::MacInUse), 2);
    assert!(lan.net.take_migrated_mac(&lan.port(2), B), "SEND_RARP on port 2 moves it");
    lan.send(2, &arp_reply(B, IP_B, BROADCAST));
    assert_eq!(links[3].take().len(), 1, "the guest's frames pass on its new port");
    assert!(lan.port(2).holds_mac(&B));
    assert_eq!(lan.port(2).leased_ip(), Some(Ipv4Addr::from(IP_B)), "the lease followed the MAC");
    assert!(lan.port(2).claims6.lock().unwrap().contains(&ip6), "its IPv6 claim too");
    assert!(!lan.port(1).holds_mac(&B) && lan.port(1).leased_ip().is_none(), "the old port keeps nothing");
    assert!(!lan.port(1).claims6.lock().unwrap().contains(&ip6));
    // Frames for B reach its new port only (what the broadcasts above flooded is set aside).
    for l in &links {
        l.take();
    }
    lan.send(3, &udp(A, B, b"to B"));
    assert_eq!(links[2].take().len(), 1);
    assert!(links[1].take().is_empty());
    // Port 2 runs: B's MAC does not move on from it.
    assert!(!lan.net.take_migrated_mac(&lan.port(0), B));
    lan.send(0, &arp_reply(B, IP_B, BROADCAST));
    assert!(links[3].take().is_empty());
    assert!(lan.port(2).holds_mac(&B));
}

#[test]
fn send_rarp_moves_a_mac_whose_old_port_was_stopped_and_then_left() {
    let (mut lan, links) = secured_lan();
    lan.send(1, &arp_reply(B, IP_B, BROADCAST));
    assert_eq!(links[3].take().len(), 1);
    // The source QEMU stops its rings and quits before the destination's SEND_RARP comes: its
    // port forgets the guest (as the connection loop does), the MAC stays pinned to it.
    lan.port(1).vmm_stopped.store(true, Ordering::Release);
    lan.port(1).forget_guest();
    lan.net.macs.lock().unwrap().forget_port(1);
    lan.send(2, &arp_reply(B, IP_B, BROADCAST));
    assert!(links[3].take().is_empty(), "still pinned to port 1");
    assert!(lan.net.take_migrated_mac(&lan.port(2), B));
    lan.send(2, &arp_reply(B, IP_B, BROADCAST));
    assert_eq!(links[3].take().len(), 1);
    assert!(lan.port(2).holds_mac(&B));
    assert_eq!(lan.port(2).leased_ip(), Some(Ipv4Addr::from(IP_B)));
}

// ---------------------------------------------------------------------------------------------
// A guest's TX ring into guest receivers, a burst at a time.

/// More frames than a receiver burst (32) and than a TX batch (128) from one sender: the
/// receiver gets every one, in order, each burst's used elements published.
#[test]
fn frames_from_a_guest_tx_ring_reach_a_guest_complete_and_in_order_across_bursts() {
    let mut tx = GuestRing::new();
    let mut rx = GuestRing::new();
    rx.post_rx(200);
    let lan = Lan::switch(vec![Port::new(0, "a", PortKind::Vhost), guest_port(1, &rx, RxCaps::FULL)]);
    for n in 0..200 {
        tx.post_tx(VnetHeader::default(), &numbered(A, B, n));
    }
    let sender = lan.port(0);
    let taken = process_tx(&lan.net, &sender, &tx.vring, &tx.mem.memory(), HDR_LEN, false, &mut TxScratch::default());
    assert_eq!(taken, 200);
    let got: Vec<u32> = rx.received().iter().map(|s| number(&s.frame)).collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
    let (s, r) = (sender.counters.snapshot(), lan.port(1).counters.snapshot());
    assert_eq!((s.rx_frames, r.tx_frames, r.tx_bytes), (200, 200, 200 * numbered(A, B, 0).len() as u64));
    assert_eq!(lan.port(1).queues[0].to_guest.load(Ordering::Relaxed), 200);
}

/// VIRTIO_F_IN_ORDER (offered: `ports/vhost/device.rs`) promises that buffers come back in the
/// order they were made available, on both rings, whatever became of them: a frame dropped on
/// the sender, broken receive chains handed back empty, a frame written across several
/// mergeable buffers, frames that waited in the backlog for buffers posted later. (The fake
/// rings place chain `k` at descriptor `k`, as an in-order driver does.)
#[test]
fn every_buffer_comes_back_in_the_order_it_was_made_available() {
    let mut tx = GuestRing::new();
    let mut rx = GuestRing::new();
    let lan = Lan::switch(vec![Port::new(0, "a", PortKind::Vhost), guest_port(1, &rx, RxCaps::FULL)]);
    // Two broken (zero-length) chains, four of 100 bytes, three whole buffers.
    rx.offer(0, VRING_DESC_F_WRITE);
    rx.offer(0, VRING_DESC_F_WRITE);
    for _ in 0..4 {
        rx.offer(100, VRING_DESC_F_WRITE);
    }
    rx.post_rx(3);
    let big = udp(A, B, &[1; 300]);
    tx.post_tx(VnetHeader::default(), &big);
    tx.post_tx(VnetHeader::default(), &[0u8; 10]);
    for n in 0..5 {
        tx.post_tx(VnetHeader::default(), &numbered(A, B, n));
    }
    let sender = lan.port(0);
    process_tx(&lan.net, &sender, &tx.vring, &tx.mem.memory(), HDR_LEN, false, &mut TxScratch::default());
    let ids = |used: Vec<(u16, u32)>| used.iter().map(|&(id, _)| id).collect::<Vec<_>>();
    assert_eq!(ids(tx.used()), (0..7).collect::<Vec<u16>>(), "every TX buffer, the dropped frame's too, in order");
    assert_eq!(sender.counters.snapshot().drop_count(DropReason::ShortFrame), 1);
    // The last two frames wait for buffers: posted, they arrive, and the chains come back
    // after the first nine.
    let guest = lan.port(1);
    assert!(guest.backlogged());
    rx.post_rx(2);
    flush_pending(&guest, 0, &mut TxScratch::default());
    let used = rx.used();
    assert_eq!(ids(used.clone()), (0..11).collect::<Vec<u16>>());
    let lens: Vec<u32> = used.iter().map(|&(_, len)| len).collect();
    assert_eq!(lens[..6], [0, 0, 100, 100, 100, (HDR_LEN + big.len() - 300) as u32]);
    assert_eq!(guest.counters.snapshot().tx_frames, 6);
}

/// A frame that is not written with the burst (its VLAN tag is rewritten for the receiver, so
/// it is delivered at once) does not overtake frames of the same sender that wait in the
/// burst for the same receiver.
#[test]
fn a_retagged_frame_does_not_overtake_frames_waiting_in_a_burst_for_the_same_guest() {
    let mut tx = GuestRing::new();
    let mut rx = GuestRing::new();
    rx.post_rx(8);
    let mut ten = vunet_switch::vlan::VlanSet::default();
    ten.insert(10);
    // On both ports untagged frames are VLAN 20 and pass as they are (written with the burst);
    // VLAN 10 frames are tagged, and their tag is rewritten for the receiver (written at once).
    let trunk = PortVlan::Trunk { vids: ten, native: Some(20), native_tagged: false };
    let mut a = Port::new(0, "a", PortKind::Vhost);
    a.vlan = trunk.clone();
    let mut b = guest_port(1, &rx, RxCaps::FULL);
    b.vlan = trunk;
    let lan = Lan::switch(vec![a, b]);
    let tagged = |n: u32| {
        let mut f = numbered(A, B, n);
        f.splice(12..12, [0x81, 0x00, 0x00, 10]);
        f
    };
    for n in 0..6 {
        let f = if n % 2 == 0 { tagged(n) } else { numbered(A, B, n) };
        tx.post_tx(VnetHeader::default(), &f);
    }
    process_tx(&lan.net, &lan.port(0), &tx.vring, &tx.mem.memory(), HDR_LEN, false, &mut TxScratch::default());
    let got: Vec<(u16, u32)> = rx
        .received()
        .iter()
        .map(|s| match s.frame[12..14] {
            [0x81, 0x00] => (u16::from_be_bytes([s.frame[14], s.frame[15]]) & 0x0fff, number(&s.frame[4..])),
            _ => (20, number(&s.frame)),
        })
        .collect();
    assert_eq!(got, [(10, 0), (20, 1), (10, 2), (20, 3), (10, 4), (20, 5)]);
}

// ---------------------------------------------------------------------------------------------
// The network's workers (issue 11 point 7).

/// Guests A and B each with frames for C in their TX rings, on a network with one worker.
struct TwoSenders {
    lan: Lan,
    rx_c: GuestRing,
    tx_a: GuestRing,
    tx_b: GuestRing,
    ring_a: Arc<TxRing>,
    ring_b: Arc<TxRing>,
}

impl TwoSenders {
    fn new(frames: u32) -> TwoSenders {
        let mut rx_c = GuestRing::new();
        rx_c.post_rx(2 * frames as usize + 4);
        let mut net = Network::new("t", Mode::Isolated, 1500);
        net.workers = 1;
        let lan =
            Lan::new(net, vec![Port::new(0, "a", PortKind::Vhost), Port::new(1, "b", PortKind::Vhost), guest_port(2, &rx_c, RxCaps::FULL)]);
        lan.net.macs.lock().unwrap().learn(C, 2, lan.net.now_ms()).unwrap();
        let (mut tx_a, mut tx_b) = (GuestRing::new(), GuestRing::new());
        for n in 0..frames {
            tx_a.post_tx(VnetHeader::default(), &numbered(A, C, n));
            tx_b.post_tx(VnetHeader::default(), &numbered(B, C, 1000 + n));
        }
        let negotiated = Arc::new(Negotiated::default());
        negotiated.hdr_len.store(HDR_LEN, Ordering::Relaxed);
        let ring = |id: PortId, g: &GuestRing| Arc::new(TxRing::new(lan.port(id), 0, g.vring.clone(), g.mem.clone(), negotiated.clone()));
        let (ring_a, ring_b) = (ring(0, &tx_a), ring(1, &tx_b));
        TwoSenders { lan, rx_c, tx_a, tx_b, ring_a, ring_b }
    }
}

#[test]
fn a_ring_kicked_while_every_worker_is_busy_waits_and_the_next_worker_serves_it_with_its_own() {
    let mut t = TwoSenders::new(20);
    let net = t.lan.net.clone();
    let (a, b) = (t.lan.port(0), t.lan.port(1));
    let stay = || false;
    let mut cx = TxScratch::default();

    // The network's one worker is busy elsewhere: B's kick leaves B's ring waiting for it,
    // and a second kick does not queue it twice.
    net.tx_workers.occupy(1);
    assert_eq!(tx_kick(&net, &t.ring_b, &Home { port: &b, leaving: &stay }, &mut cx), 0);
    assert_eq!(tx_kick(&net, &t.ring_b, &Home { port: &b, leaving: &stay }, &mut cx), 0);
    assert_eq!(net.tx_workers.now(), (1, 1), "one ring waits, once");
    assert_eq!(net.tx_workers.handoffs(), 1);
    assert!(t.rx_c.received().is_empty(), "nothing moved while B waited");
    net.tx_workers.occupy(-1);

    // A's kick makes this thread the worker: it takes B's waiting ring up with A's own.
    let taken = tx_kick(&net, &t.ring_a, &Home { port: &a, leaving: &stay }, &mut cx);
    assert_eq!(taken, 40, "the worker took both rings' frames");
    assert_eq!(net.tx_workers.now(), (0, 0), "no ring waits, no worker left busy");
    let got: Vec<u32> = t.rx_c.received().iter().map(|s| number(&s.frame)).collect();
    let from_a: Vec<u32> = got.iter().copied().filter(|&n| n < 1000).collect();
    let from_b: Vec<u32> = got.iter().copied().filter(|&n| n >= 1000).collect();
    assert_eq!(from_a, (0..20).collect::<Vec<_>>(), "A's frames, complete and in order");
    assert_eq!(from_b, (1000..1020).collect::<Vec<_>>(), "B's frames, complete and in order");
    assert_eq!(t.tx_a.used().len(), 20);
    assert_eq!(t.tx_b.used().len(), 20);
    assert_eq!(a.queues[0].from_guest.load(Ordering::Relaxed), 20);
    assert_eq!(b.queues[0].from_guest.load(Ordering::Relaxed), 20);

    // Both rings were let go: the next kick of either is served at once.
    t.tx_b.post_tx(VnetHeader::default(), &numbered(B, C, 2000));
    assert_eq!(tx_kick(&net, &t.ring_b, &Home { port: &b, leaving: &stay }, &mut cx), 1);
    assert_eq!(t.rx_c.received().iter().map(|s| number(&s.frame)).collect::<Vec<_>>(), [2000]);
}

#[test]
fn a_worker_whose_thread_must_stop_hands_every_ring_back_to_its_own_thread() {
    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};
    let mut t = TwoSenders::new(5);
    let net = t.lan.net.clone();
    let (a, b) = (t.lan.port(0), t.lan.port(1));
    // B's kick eventfd, as the VMM gives it: B's own thread sleeps on it.
    let (kick_b, _) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
    let kick_b_fd = {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a dup of a live eventfd, owned by the File.
        unsafe { std::fs::File::from_raw_fd(libc::dup(kick_b.as_raw_fd())) }
    };
    t.tx_b.vring.set_kick(Some(kick_b_fd));
    let mut cx = TxScratch::default();

    net.tx_workers.occupy(1);
    assert_eq!(tx_kick(&net, &t.ring_b, &Home { port: &b, leaving: &|| false }, &mut cx), 0);
    net.tx_workers.occupy(-1);
    // A's thread becomes the worker but is told to exit: it moves nothing, and B's ring goes
    // back to B's thread with a kick.
    assert_eq!(tx_kick(&net, &t.ring_a, &Home { port: &a, leaving: &|| true }, &mut cx), 0);
    assert_eq!(net.tx_workers.now(), (0, 0));
    assert!(kick_b.consume().is_ok(), "B's thread is kicked");
    assert!(kick_b.consume().is_err(), "once");
    assert!(t.rx_c.received().is_empty());
    // B's thread takes its ring up, and A's ring is free for A's next kick.
    assert_eq!(tx_kick(&net, &t.ring_b, &Home { port: &b, leaving: &|| false }, &mut cx), 5);
    assert_eq!(tx_kick(&net, &t.ring_a, &Home { port: &a, leaving: &|| false }, &mut cx), 5);
    assert_eq!(t.rx_c.received().len(), 10);
}
