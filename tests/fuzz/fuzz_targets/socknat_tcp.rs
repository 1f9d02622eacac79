//! Guest frames and host socket events, in any order, through the socket-NAT TCP table and its
//! flows. Most segments are built from a template with sequence and acknowledgment numbers
//! near what the flow last sent, so the fuzzer reaches the data paths, not only the parser.
//! Nothing may panic; the table stays within its bounds; a flow never asks to discard more
//! than the host socket holds, nor peeks past it. Raw frames also go through the UDP and ICMP
//! tables (with their IP and ICMP checksums repaired when the input asks, so the fuzzer gets
//! past them), and the host side opens inbound flows (port forwards) on the template's ports.
#![no_main]
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use vunet_switch::checksum::{finish, pseudo_v4, pseudo_v6, sum};
use vunet_switch::socknat::icmp::{IcmpConfig, IcmpOp, IcmpTable};
use vunet_switch::socknat::tcp::{HostIo, HostOp, TcpConfig};
use vunet_switch::socknat::udp::{UdpConfig, UdpOp, UdpTable};
use vunet_switch::socknat::{wire, FlowId, Input, TcpTable, TcpTableConfig};
use vunet_switch::vnet::{RxCaps, VnetHeader, F_NEEDS_CSUM, GSO_TCPV4};

const GUEST: [u8; 4] = [192, 168, 122, 10];
const REMOTE: [u8; 4] = [10, 0, 0, 1];

#[derive(Default)]
struct Sock {
    rx: Vec<u8>,
    space: usize,
}

impl HostIo for Sock {
    fn write(&mut self, d: &[u8]) -> usize {
        let n = d.len().min(self.space);
        self.space -= n;
        n
    }
    fn peek(&mut self, off: usize, buf: &mut [u8]) -> usize {
        assert!(off <= self.rx.len(), "peek at {off} past {} bytes", self.rx.len());
        let n = buf.len().min(self.rx.len() - off);
        buf[..n].copy_from_slice(&self.rx[off..off + n]);
        n
    }
}

/// What the guest last heard on a port: (next seq it should send, ack it should send).
type Heard = HashMap<u16, (u32, u32)>;

fn segment(sport: u16, seq: u32, ack: u32, flags: u8, window: u16, opts: &[u8], payload: &[u8]) -> Vec<u8> {
    let opts = &opts[..opts.len() / 4 * 4];
    let l4 = 20 + opts.len() + payload.len();
    let mut f = vec![0u8; 34 + l4];
    f[0..6].copy_from_slice(&[2, 0x76, 0x75, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[8, 0]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + l4) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&GUEST);
    f[30..34].copy_from_slice(&REMOTE);
    let c = finish(sum(&f[14..34], 0));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let t = &mut f[34..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = (((20 + opts.len()) / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&window.to_be_bytes());
    t[20..20 + opts.len()].copy_from_slice(opts);
    t[20 + opts.len()..].copy_from_slice(payload);
    let c = finish(sum(t, pseudo_v4(&GUEST, &REMOTE, 6, l4 as u16)));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    f
}

/// The send space an inbound flow starts with, from the event's argument.
fn arg_space(e: &[u8]) -> usize {
    u16::from_be_bytes([e[2], e[3]]) as usize * 16
}

fuzz_target!(|data: &[u8]| {
    let cfg = TcpTableConfig { max_connections: 8, max_per_guest: 6, tcp: TcpConfig { max_retries: 3, ..TcpConfig::default() } };
    let mut table = TcpTable::new(cfg, 7);
    let mut udp = UdpTable::new(UdpConfig { max_flows: 4, max_per_guest: 3, ..UdpConfig::default() });
    let mut icmp = IcmpTable::new(IcmpConfig { max_flows: 4, max_per_guest: 3, ..IcmpConfig::default() });
    let mut socks: HashMap<FlowId, Sock> = HashMap::new();
    let mut heard: Heard = HashMap::new();
    let mut buf = vec![0u8; 65536 + 64];
    let mut out = [0u8; 128];
    let mut now = 0u64;
    let caps = [RxCaps::NONE, RxCaps::FULL, RxCaps { tso4: false, tso6: false, ..RxCaps::FULL }];
    let mut rest = data;
    // The next `n` input bytes, padded with zeros at the end of the input.
    let take = |rest: &mut &[u8], n: usize| -> Vec<u8> {
        let (a, b) = rest.split_at(n.min(rest.len()));
        *rest = b;
        let mut v = a.to_vec();
        v.resize(n, 0);
        v
    };
    while !rest.is_empty() {
        let op = take(&mut rest, 1)[0];
        let cap = caps[(op >> 6) as usize % 3];
        match op & 3 {
            0 | 1 => {
                let frame;
                let mut vnet = VnetHeader::default();
                if op & 3 == 0 {
                    // [port][flags][dseq][dack][window 2][olen][plen 2] then options, payload
                    let h = take(&mut rest, 9);
                    let sport = 1000 + (h[0] % 4) as u16;
                    let (nseq, nack) = heard.get(&sport).copied().unwrap_or((u32::from(h[2]) << 8, 0));
                    let seq = nseq.wrapping_add((h[2] as i8) as u32);
                    let ack = nack.wrapping_add((h[3] as i8) as u32);
                    let opts = take(&mut rest, (h[6] % 41) as usize);
                    let plen = u16::from_be_bytes([h[7], h[8]]) as usize;
                    let big = plen > 2000;
                    let payload = vec![0xab; if big { plen.min(65000) } else { plen }];
                    frame = segment(sport, seq, ack, h[1], u16::from_be_bytes([h[4], h[5]]), &opts, &payload);
                    if big {
                        vnet = VnetHeader {
                            flags: F_NEEDS_CSUM,
                            gso_type: GSO_TCPV4,
                            hdr_len: 54,
                            gso_size: 1448,
                            csum_start: 34,
                            csum_offset: 16,
                            num_buffers: 0,
                        };
                    }
                } else {
                    let l = take(&mut rest, 2);
                    let len = u16::from_be_bytes([l[0], l[1]]) as usize % 2048;
                    let hdr = take(&mut rest, 12);
                    vnet = VnetHeader::parse(&hdr);
                    let mut f = take(&mut rest, len);
                    if op & 4 != 0 && f.len() >= 34 {
                        // Repair the IP header checksum (a 20-byte header) and the ICMP one.
                        f[24..26].copy_from_slice(&[0, 0]);
                        let c = finish(sum(&f[14..34], 0));
                        f[24..26].copy_from_slice(&c.to_be_bytes());
                        if f.len() >= 38 {
                            f[36..38].copy_from_slice(&[0, 0]);
                            let c = finish(sum(&f[34..], 0));
                            f[36..38].copy_from_slice(&c.to_be_bytes());
                        }
                    }
                    frame = f;
                    match icmp.input(&frame, &vnet, now) {
                        Ok(IcmpOp::Open { id, message, .. }) | Ok(IcmpOp::Send { id, message }) => {
                            let key = icmp.key(id).expect("a live flow");
                            let v6 = key.remote.is_ipv6();
                            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
                            assert!(message.len() >= 8 && message[0] == request && message[1] == 0);
                            // The remote answers (the kernel puts its own identifier in), or,
                            // with op bit 3, the socket hands back something else.
                            let mut m = message.to_vec();
                            if op & 8 == 0 {
                                m[0] = reply;
                                m[4..6].copy_from_slice(&[0x12, 0x34]);
                            }
                            let at = wire::icmp_frame_hdr(key.remote);
                            buf[at..at + m.len()].copy_from_slice(&m);
                            let r = icmp.reply(id, m.len(), &mut buf, now);
                            assert_eq!(r.is_some(), op & 8 == 0, "an echo reply to a live flow fits");
                            if let Some(n) = r {
                                assert_eq!(n, at + m.len());
                                assert_eq!(&buf[at + 4..at + 6], &message[4..6], "the guest's identifier");
                                let pseudo = match (key.remote, key.guest) {
                                    (IpAddr::V6(r), IpAddr::V6(g)) => pseudo_v6(&r.octets(), &g.octets(), 58, (n - at) as u32),
                                    _ => 0,
                                };
                                assert_eq!(finish(sum(&buf[at..n], pseudo)), 0, "the ICMP checksum");
                            }
                        }
                        Err(_) => {}
                    }
                    assert!(icmp.len() <= 4);
                    match udp.input(&frame, &vnet, now) {
                        Ok(UdpOp::Open { id, payload, .. }) | Ok(UdpOp::Send { id, payload }) => {
                            // Echo it back, as a remote would.
                            let at = wire::udp_frame_hdr(udp.key(id).expect("a live flow").guest.ip());
                            let n = payload.len().min(buf.len() - at);
                            let p = payload[..n].to_vec();
                            buf[at..at + n].copy_from_slice(&p);
                            let len = udp.reply(id, n, &mut buf, now).expect("a reply to a live flow fits");
                            assert_eq!(len, at + n);
                            assert!(udp.unreachable(id, 3, &mut buf).is_some());
                        }
                        Err(_) => {}
                    }
                    assert!(udp.len() <= 4);
                }
                match table.input(&frame, &vnet, now, &mut out) {
                    Input::Segment(id, seg) => {
                        let s = socks.entry(id).or_default();
                        table.flow_mut(id).unwrap().on_segment(&seg, now, s);
                    }
                    Input::Opened(id) => {
                        socks.insert(id, Sock::default());
                    }
                    Input::Reply(n, _) => assert!(n >= 54 && n <= out.len()),
                    Input::Dropped(_) => {}
                }
            }
            2 => {
                // [flow][event][arg 2]
                let e = take(&mut rest, 4);
                if e[1] % 9 == 8 {
                    // The host accepted a connection for a guest port of the template.
                    let link = wire::Link { guest_mac: [0x52, 0x54, 0, 0, 0, 1], gw_mac: [2, 0x76, 0x75, 0, 0, 1] };
                    let guest = SocketAddr::from((GUEST, 1000 + (e[0] % 4) as u16));
                    if let Ok(id) = table.open_inbound(link, guest, SocketAddr::from((REMOTE, 80)), now) {
                        let s = Sock { rx: Vec::new(), space: arg_space(&e) };
                        let f = table.flow_mut(id).unwrap();
                        f.set_host_send_space(s.space);
                        socks.insert(id, s);
                    }
                    assert!(table.len() <= 8);
                } else if let Some(id) = {
                    let ids: Vec<FlowId> = table.iter().map(|(id, _)| id).collect();
                    (!ids.is_empty()).then(|| ids[e[0] as usize % ids.len()])
                } {
                    let arg = u16::from_be_bytes([e[2], e[3]]) as usize;
                    let s = socks.entry(id).or_default();
                    let f = table.flow_mut(id).unwrap();
                    match e[1] % 9 {
                        0 => f.connected(now),
                        1 => f.refused(),
                        2 => f.unreachable(if arg & 1 == 0 { Some((arg >> 1) as u8 & 15) } else { None }),
                        3 => f.host_eof(),
                        4 => f.host_reset(),
                        5 => {
                            s.space = arg * 16;
                            f.set_host_send_space(arg * 16);
                        }
                        _ => s.rx.extend(std::iter::repeat(e[1]).take(arg * 4)),
                    }
                }
            }
            _ => {
                let d = take(&mut rest, 2);
                now += u16::from_be_bytes([d[0], d[1]]) as u64 * 10;
                table.tick(now);
                udp.tick(now, |_| {});
                icmp.tick(now, |_| {});
            }
        }
        // Drain every flow, as the I/O layer does after each event.
        let ids: Vec<FlowId> = table.iter().map(|(id, _)| id).collect();
        for id in ids {
            let s = socks.entry(id).or_default();
            let f = table.flow_mut(id).unwrap();
            while let Some(op) = f.poll_host() {
                if let HostOp::Discard(n) = op {
                    assert!(n <= s.rx.len(), "discard {n} of {}", s.rx.len());
                    s.rx.drain(..n);
                }
            }
            assert!(f.peek_offset() <= s.rx.len(), "peek offset {} past {} bytes", f.peek_offset(), s.rx.len());
            // Each data frame carries at least one new byte of the socket; control frames are
            // few (RST, SYN-ACK, FIN, probe, ACK, three duplicate ACKs).
            let limit = s.rx.len() + 8;
            let mut frames = 0;
            while let Some(t) = f.poll_frame(now, &cap, &mut buf, s) {
                assert!(t.len >= 54 && t.len <= buf.len());
                if t.vnet.gso_type != 0 {
                    assert!((cap.tso4 || cap.tso6) && t.vnet.gso_size >= 88);
                }
                // What the guest heard: its next seq is our ack, its ack our seq + length.
                if buf[23] == 6 {
                    let tcp = &buf[34..t.len];
                    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
                    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
                    let plen = (t.len - 54) as u32 + (tcp[13] & 3 != 0) as u32;
                    heard.insert(u16::from_be_bytes([tcp[2], tcp[3]]), (ack, seq.wrapping_add(plen)));
                }
                frames += 1;
                assert!(frames <= limit, "a flow that never stops sending");
            }
            if f.is_done() {
                table.remove(id);
                socks.remove(&id);
            }
        }
        assert!(table.len() <= 8);
    }
});
