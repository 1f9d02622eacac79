//! One guest TCP connection spliced onto one host stream socket, without a TCP stack and
//! without buffering data in vunet.
//!
//! The guest speaks TCP to this state machine; the host side is an ordinary connected socket
//! that the kernel runs. Instead of keeping a send and a receive buffer per connection (what a
//! user-space stack such as libslirp does, 128 KiB each way), both directions use the host
//! socket's own buffers:
//!
//! - Guest to host: an in-order segment is written to the socket at once, and the guest is
//!   acknowledged only for the bytes the socket took. The window offered to the guest is the
//!   free space of the socket's send buffer, as the I/O layer last reported it, so a guest that
//!   respects it never sends more than the socket takes. Nothing is ever queued here: what the
//!   socket did not take, the guest still has and will send again.
//! - Host to guest: data stays in the socket's receive buffer until the guest acknowledges it.
//!   The I/O layer reads with `MSG_PEEK` at [`TcpFlow::peek_offset`] (bytes sent but not yet
//!   acknowledged), and a guest ACK turns into [`HostOp::Discard`] for the bytes it covered.
//!   Retransmission is a peek again from an earlier offset.
//!
//! The machine is pure: no fds, no clock, no allocation. The I/O layer moves bytes through the
//! [`HostIo`] trait (one write, one peek, both synchronous and non-blocking), reports socket
//! events by calling methods (`connected`, `refused`, `host_eof`, ...), and after each event
//! drains [`TcpFlow::poll_host`] (socket operations) and [`TcpFlow::poll_frame`] (frames to the
//! guest, built in its buffers) until both return None. Timers run from [`TcpFlow::tick`].
//!
//! Not done, as in passt: SACK, timestamps, RTT measurement (the RTO starts at a fixed value
//! and backs off), urgent data.

use std::net::SocketAddr;

use super::wire::{self, Csum, Link, TcpOut, TcpSegment, ACK, FIN, PSH, RST, SYN};
use super::{Counters, Drop, FlowKey};
use crate::proto::IPPROTO_TCP;
use crate::vnet::{RxCaps, VnetHeader};

/// Our window scale shift: windows up to 8 MiB, more than Linux's default `tcp_wmem` maximum
/// (4 MiB), which bounds the send space the window follows.
pub const WSCALE: u8 = 7;
/// The MSS assumed when a guest's SYN has none (RFC 9293).
pub const DEFAULT_MSS: u16 = 536;
/// Linux's floor for an MSS; a guest asking for less gets this (a tiny MSS would make a 64 KiB
/// window into a thousand frames).
pub const MIN_MSS: u16 = 88;
/// SYNs sent to a guest for an inbound connection (port forward) before giving up: the first
/// and 5 retransmissions, 1 + 2 + 4 + 8 + 16 + 32 s with the default RTO, about what Linux's
/// `tcp_syn_retries` allows a client.
pub const SYN_RETRIES: u32 = 5;
/// Duplicate ACKs that make a fast retransmission (RFC 5681).
const DUPACK_THRESHOLD: u8 = 3;

/// Timers and limits of a TCP flow. All times in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// The IP MTU of the guest's network: our MSS is this less 40 (IPv4) or 60 (IPv6).
    pub mtu: u16,
    /// First retransmission timeout, and the value it returns to after progress. There is no
    /// RTT measurement: the guest is on the same host, so any sane fixed value works.
    pub rto_ms: u64,
    pub rto_max_ms: u64,
    /// Retransmissions (or persist probes) without progress before the flow is reset.
    pub max_retries: u32,
    /// How long a host `connect()` may take before the flow is dropped silently.
    pub connect_timeout_ms: u64,
    /// No segment from the guest for this long: both sides are reset.
    pub idle_timeout_ms: u64,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig { mtu: 1500, rto_ms: 1000, rto_max_ms: 60_000, max_retries: 12, connect_timeout_ms: 75_000, idle_timeout_ms: 7_200_000 }
    }
}

/// What the I/O layer must do to the host socket. Polled with [`TcpFlow::poll_host`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    /// Open a non-blocking stream socket and `connect()` it here; then report `connected`,
    /// `refused` or `unreachable`.
    Connect(SocketAddr),
    /// The guest acknowledged this many more bytes: drop them from the receive buffer
    /// (`recv` with `MSG_TRUNC`, or into a scratch buffer).
    Discard(usize),
    /// The guest sent FIN: `shutdown(SHUT_WR)`.
    ShutdownWrite,
    /// The flow is over: close the socket; `reset` asks for an abortive close (`SO_LINGER`
    /// zero), so the remote end sees RST as the guest meant it. Then remove the flow.
    Close { reset: bool },
}

/// How the state machine moves bytes through the host socket. Both calls are non-blocking and
/// return at once.
pub trait HostIo {
    /// Writes guest data; returns how many bytes the socket took (0 when its buffer is full).
    fn write(&mut self, data: &[u8]) -> usize;
    /// Copies received data starting `offset` bytes past the oldest byte still in the socket
    /// into `buf`, without consuming it (`MSG_PEEK` with `SO_PEEK_OFF`); returns the bytes
    /// copied, 0 when there are none (yet).
    fn peek(&mut self, offset: usize, buf: &mut [u8]) -> usize;
}

/// A frame built in the caller's buffer: its length and the virtio-net header to send it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFrame {
    pub len: usize,
    pub vnet: VnetHeader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The guest's SYN arrived; the host `connect()` is under way. The guest hears nothing yet.
    Connecting,
    /// The host connected; our SYN-ACK is out, waiting for the guest's ACK.
    SynAckSent,
    /// Inbound (a port forward): the host accepted a connection; our SYN is out to the guest,
    /// waiting for its SYN-ACK.
    SynSent,
    /// Data both ways (including half-closed: see [`TcpFlow::guest_sent_fin`], [`TcpFlow::host_at_eof`]).
    Established,
    /// Over. The flow goes once [`TcpFlow::is_done`].
    Closed,
}

/// The largest MSS for an MTU: less the IP and TCP headers of the flow's IP version.
fn max_mss(mtu: u16, a: SocketAddr) -> u16 {
    let headers = (wire::ip_len(a.ip()) + wire::TCP_LEN) as u16;
    mtu.saturating_sub(headers).max(MIN_MSS)
}

/// `a < b` in sequence space.
fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// One spliced connection.
#[derive(Clone, Debug)]
pub struct TcpFlow {
    cfg: TcpConfig,
    link: Link,
    guest: SocketAddr,
    remote: SocketAddr,
    state: State,

    // Guest to host.
    /// The guest's initial sequence number.
    irs: u32,
    /// Next sequence number expected from the guest: everything before it went to the socket.
    rcv_nxt: u32,
    /// Whether the guest offered window scaling (then both sides scale).
    scaling: bool,
    /// Free space in the host socket's send buffer, as last reported, less what was written
    /// since.
    host_space: u32,
    /// The right edge of the window last advertised: data beyond it is not accepted.
    rcv_adv: u32,
    /// The last window advertised, in bytes.
    adv_wnd: u32,
    /// A write took less than offered: the guest holds data it will only resend on its RTO.
    short_write: bool,
    guest_fin: bool,

    // Host to guest.
    iss: u32,
    /// Oldest byte the guest has not acknowledged (the first byte in the socket).
    snd_una: u32,
    /// Next byte to send.
    snd_nxt: u32,
    /// Highest sequence number sent (snd_nxt goes back on retransmission; this does not).
    snd_max: u32,
    /// The guest's window, scaled.
    snd_wnd: u32,
    snd_shift: u8,
    mss: u16,
    /// The sequence number our FIN took, once sent.
    fin_seq: Option<u32>,
    fin_acked: bool,
    host_eof: bool,
    dupacks: u8,
    /// No new fast retransmission until snd_una passes this (one per window of data).
    recover: u32,

    /// Opened from the host side (a port forward): we sent the SYN.
    inbound: bool,

    // Pending output.
    synack_pending: bool,
    /// Our SYN to the guest (inbound flows).
    syn_pending: bool,
    /// A bare RST with this sequence number: the answer to an unacceptable ACK while our SYN
    /// is out (RFC 9293 3.10.7.3), which clears a stale connection the guest still has on
    /// these ports so our next SYN gets through.
    reset_seq: Option<u32>,
    ack_pending: bool,
    /// Extra identical ACKs to send so the guest's fast retransmission resends what a short
    /// write left behind, instead of waiting for its RTO.
    dupacks_to_send: u8,
    rst_pending: bool,
    icmp_pending: Option<u8>,
    probe_pending: bool,
    connect_pending: bool,
    shutdown_pending: bool,
    close_pending: Option<bool>,
    discard_pending: usize,

    // Timers (absolute ms).
    rto: u64,
    retries: u32,
    rto_at: Option<u64>,
    persist_at: Option<u64>,
    connect_until: u64,
    idle_until: u64,
    ip_id: u16,

    pub counters: Counters,
}

impl TcpFlow {
    /// A flow for the guest's SYN `syn`, with our initial sequence number `iss` (the caller's
    /// choice). Its first host operation is [`HostOp::Connect`].
    pub fn new(cfg: TcpConfig, syn: &TcpSegment, iss: u32, now: u64) -> TcpFlow {
        let mss = syn.mss.unwrap_or(DEFAULT_MSS).clamp(MIN_MSS, max_mss(cfg.mtu, syn.src));
        TcpFlow {
            cfg,
            link: syn.link,
            guest: syn.src,
            remote: syn.dst,
            state: State::Connecting,
            irs: syn.seq,
            rcv_nxt: syn.seq.wrapping_add(1),
            scaling: syn.wscale.is_some(),
            host_space: 0,
            rcv_adv: syn.seq.wrapping_add(1),
            adv_wnd: 0,
            short_write: false,
            guest_fin: false,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            // A SYN's window is never scaled (RFC 7323).
            snd_wnd: syn.window as u32,
            snd_shift: syn.wscale.unwrap_or(0).min(14),
            mss,
            fin_seq: None,
            fin_acked: false,
            host_eof: false,
            dupacks: 0,
            recover: iss,
            inbound: false,
            synack_pending: false,
            syn_pending: false,
            reset_seq: None,
            ack_pending: false,
            dupacks_to_send: 0,
            rst_pending: false,
            icmp_pending: None,
            probe_pending: false,
            connect_pending: true,
            shutdown_pending: false,
            close_pending: None,
            discard_pending: 0,
            rto: cfg.rto_ms,
            retries: 0,
            rto_at: None,
            persist_at: None,
            connect_until: now.saturating_add(cfg.connect_timeout_ms),
            idle_until: now.saturating_add(cfg.idle_timeout_ms),
            ip_id: 0,
            counters: Counters::default(),
        }
    }

    /// An inbound flow (a port forward): the host accepted a connection from `remote` (as the
    /// guest sees it, on the guest's `guest` address and port), and its socket is connected.
    /// The first frame is our SYN to the guest, with our initial sequence number `iss`; on the
    /// guest's SYN-ACK the flow is Established. `link` names the guest's MAC and ours.
    pub fn new_inbound(cfg: TcpConfig, link: Link, guest: SocketAddr, remote: SocketAddr, iss: u32, now: u64) -> TcpFlow {
        TcpFlow {
            cfg,
            link,
            guest,
            remote,
            state: State::SynSent,
            // Unknown until the guest's SYN-ACK.
            irs: 0,
            rcv_nxt: 0,
            scaling: false,
            host_space: 0,
            rcv_adv: 0,
            adv_wnd: 0,
            short_write: false,
            guest_fin: false,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: 0,
            snd_shift: 0,
            mss: DEFAULT_MSS,
            fin_seq: None,
            fin_acked: false,
            host_eof: false,
            dupacks: 0,
            recover: iss,
            inbound: true,
            synack_pending: false,
            syn_pending: true,
            reset_seq: None,
            ack_pending: false,
            dupacks_to_send: 0,
            rst_pending: false,
            icmp_pending: None,
            probe_pending: false,
            connect_pending: false,
            shutdown_pending: false,
            close_pending: None,
            discard_pending: 0,
            rto: cfg.rto_ms,
            retries: 0,
            rto_at: Some(now.saturating_add(cfg.rto_ms)),
            persist_at: None,
            connect_until: now.saturating_add(cfg.connect_timeout_ms),
            idle_until: now.saturating_add(cfg.idle_timeout_ms),
            ip_id: 0,
            counters: Counters::default(),
        }
    }

    /// Whether the host side opened the flow (a port forward).
    pub fn is_inbound(&self) -> bool {
        self.inbound
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn guest(&self) -> SocketAddr {
        self.guest
    }
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }
    /// The MSS the guest asked for (clamped): the I/O layer may set it as `TCP_MAXSEG`.
    pub fn mss(&self) -> u16 {
        self.mss
    }
    /// The guest sent FIN (its direction is closed).
    pub fn guest_sent_fin(&self) -> bool {
        self.guest_fin
    }
    /// The host socket reached end of file.
    pub fn host_at_eof(&self) -> bool {
        self.host_eof
    }

    /// Where the next `MSG_PEEK` starts: bytes sent to the guest and not yet acknowledged.
    pub fn peek_offset(&self) -> usize {
        if self.state != State::Established {
            return 0;
        }
        // Our FIN takes a sequence number but no byte of the socket: count up to it at most.
        let clip = |s: u32| match self.fin_seq {
            Some(f) if lt(f, s) => f,
            _ => s,
        };
        clip(self.snd_nxt).wrapping_sub(clip(self.snd_una)) as usize
    }

    /// Whether reading the host socket can make progress now: the guest's window has room and
    /// our direction is open. While false, the I/O layer should stop polling the socket for
    /// input, or it spins on data it cannot send.
    pub fn wants_host_data(&self) -> bool {
        self.state == State::Established && self.fin_seq.is_none() && self.send_room() > 0
    }

    /// The flow is closed and has nothing left to say: remove it.
    pub fn is_done(&self) -> bool {
        self.state == State::Closed
            && !self.rst_pending
            && self.reset_seq.is_none()
            && self.icmp_pending.is_none()
            && self.close_pending.is_none()
            && !self.connect_pending
    }

    /// The earliest time [`TcpFlow::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.state == State::Closed {
            return None;
        }
        let base = if self.state == State::Connecting { self.connect_until } else { self.idle_until };
        [self.rto_at, self.persist_at].into_iter().flatten().min().map_or(Some(base), |t| Some(t.min(base)))
    }

    fn send_room(&self) -> u32 {
        let right = self.snd_una.wrapping_add(self.snd_wnd);
        if lt(self.snd_nxt, right) {
            right.wrapping_sub(self.snd_nxt)
        } else {
            0
        }
    }

    fn close(&mut self, reset: bool) {
        self.state = State::Closed;
        self.rto_at = None;
        self.persist_at = None;
        self.connect_pending = false;
        self.close_pending = Some(reset);
    }

    /// Resets both sides: RST to the guest, abortive close of the socket.
    fn abort(&mut self) {
        self.rst_pending = true;
        self.counters.aborts += 1;
        self.close(true);
    }

    // ---- Host events -------------------------------------------------------------------

    /// The host `connect()` succeeded: the guest gets its SYN-ACK.
    pub fn connected(&mut self, now: u64) {
        if self.state == State::Connecting {
            self.state = State::SynAckSent;
            self.synack_pending = true;
            self.rto_at = Some(now.saturating_add(self.rto));
            self.idle_until = now.saturating_add(self.cfg.idle_timeout_ms);
        }
    }

    /// The host `connect()` was refused (`ECONNREFUSED`): the guest gets RST, as the remote
    /// host would have sent it.
    pub fn refused(&mut self) {
        if self.state == State::Connecting {
            self.counters.refused += 1;
            self.rst_pending = true;
            self.close(false);
        }
    }

    /// The host `connect()` failed otherwise. With `Some(code)` the guest gets an ICMP
    /// destination unreachable with that code (`EHOSTUNREACH` → 1, `ENETUNREACH` → 0, ...),
    /// with None nothing at all: the guest times out as the host did (`ETIMEDOUT`).
    pub fn unreachable(&mut self, icmp_code: Option<u8>) {
        if self.state == State::Connecting {
            self.counters.unreachable += 1;
            self.icmp_pending = icmp_code;
            self.close(false);
        }
    }

    /// The host socket reached end of file (the remote end shut down its side). The guest gets
    /// FIN once it has acknowledged everything before it.
    pub fn host_eof(&mut self) {
        self.host_eof = true;
    }

    /// The host socket was reset (`ECONNRESET`, or any fatal socket error): the guest gets RST.
    pub fn host_reset(&mut self) {
        match self.state {
            State::Connecting => self.refused(),
            State::Closed => {}
            State::SynSent => {
                // The guest never accepted: nothing to reset on its side. A late SYN-ACK
                // finds no flow and gets the table's RST.
                self.counters.host_resets += 1;
                self.close(false);
            }
            _ => {
                self.counters.host_resets += 1;
                self.rst_pending = true;
                self.close(false);
            }
        }
    }

    /// Free space in the host socket's send buffer (`SO_SNDBUF` less `SIOCOUTQ`). The window
    /// offered to the guest follows it; when it opens enough, the guest hears at once.
    pub fn set_host_send_space(&mut self, bytes: usize) {
        let old = self.host_space;
        self.host_space = bytes.min(u32::MAX as usize) as u32;
        if self.state != State::Established || self.guest_fin {
            return;
        }
        let opened = self.window_now().saturating_sub(self.adv_wnd);
        if opened > 0 && (self.adv_wnd < self.mss as u32 || opened >= 2 * self.mss as u32) && self.host_space > old {
            self.ack_pending = true;
            if self.short_write {
                self.short_write = false;
                self.dupacks_to_send = DUPACK_THRESHOLD;
            }
        }
    }

    // ---- Guest segments ----------------------------------------------------------------

    /// A segment from the guest for this flow. Data goes to the socket through `io.write`.
    pub fn on_segment(&mut self, seg: &TcpSegment, now: u64, io: &mut impl HostIo) {
        if self.state == State::Closed {
            self.counters.drop(Drop::FlowClosed);
            return;
        }
        self.idle_until = now.saturating_add(self.cfg.idle_timeout_ms);
        if self.state == State::SynSent {
            return self.syn_sent_segment(seg, now);
        }
        if seg.has(RST) {
            return self.guest_rst(seg);
        }
        if seg.has(SYN) {
            return self.guest_syn(seg);
        }
        if self.state == State::Connecting {
            // Nothing but a SYN (again) or RST is valid before our SYN-ACK.
            self.counters.drop(Drop::BadState);
            return;
        }
        if !seg.has(ACK) {
            self.counters.drop(Drop::NoAck);
            return;
        }
        if !self.guest_ack(seg, now) {
            return;
        }
        self.guest_data(seg, io);
        if self.guest_fin && self.fin_acked && self.state != State::Closed {
            self.close(false);
        }
    }

    /// A guest segment while our SYN is out (RFC 9293 3.10.7.3, SYN-SENT). Only a SYN-ACK of
    /// our SYN establishes; a RST that acknowledges it means the guest's port is closed.
    fn syn_sent_segment(&mut self, seg: &TcpSegment, now: u64) {
        let ack_ok = seg.has(ACK) && seg.ack == self.iss.wrapping_add(1);
        if seg.has(ACK) && !ack_ok {
            // Not about our SYN: a stale connection of the guest on these ports. A RST with its
            // ACK as sequence number clears it (never a RST for a RST).
            self.counters.drop(Drop::BadAck);
            if !seg.has(RST) {
                self.reset_seq = Some(seg.ack);
            }
            return;
        }
        if seg.has(RST) {
            if !ack_ok {
                // Without an ACK of our SYN a RST proves nothing (a blind one must guess it).
                self.counters.drop(Drop::BadRst);
                return;
            }
            // Nothing listens on the port in the guest: the host peer sees a reset.
            self.counters.refused += 1;
            self.close(true);
            return;
        }
        if !seg.has(SYN) || !ack_ok {
            // A bare ACK of our SYN, data, or a SYN of its own (simultaneous open, which the
            // guest cannot mean on a port we connect to): not a SYN-ACK.
            self.counters.drop(Drop::BadState);
            return;
        }
        // The SYN-ACK: its options decide MSS and scaling; its window is never scaled.
        self.irs = seg.seq;
        self.rcv_nxt = seg.seq.wrapping_add(1);
        self.rcv_adv = self.rcv_nxt;
        self.adv_wnd = 0;
        self.scaling = seg.wscale.is_some();
        self.snd_shift = if self.scaling { seg.wscale.unwrap_or(0).min(14) } else { 0 };
        self.mss = seg.mss.unwrap_or(DEFAULT_MSS).clamp(MIN_MSS, self.cfg.mtu.saturating_sub(40).max(MIN_MSS));
        self.snd_wnd = seg.window as u32;
        let ack = seg.ack;
        self.snd_una = ack;
        self.snd_nxt = ack;
        self.snd_max = ack;
        self.recover = ack;
        self.state = State::Established;
        self.syn_pending = false;
        self.rto_at = None;
        self.retries = 0;
        self.rto = self.cfg.rto_ms;
        self.idle_until = now.saturating_add(self.cfg.idle_timeout_ms);
        // Any data or FIN on the SYN-ACK is not taken (the guest sends it again); our ACK
        // completes its handshake and carries our first real window.
        self.ack_pending = true;
    }

    fn guest_rst(&mut self, seg: &TcpSegment) {
        // Acceptable when it falls in the window we offered (a blind RST must guess it).
        let ok = match self.state {
            State::Connecting => seg.seq == self.rcv_nxt,
            _ => seg.seq == self.rcv_nxt || (lt(self.rcv_nxt, seg.seq) && lt(seg.seq, self.rcv_adv)),
        };
        if !ok {
            self.counters.drop(Drop::BadRst);
            return;
        }
        self.counters.guest_resets += 1;
        self.close(true);
    }

    fn guest_syn(&mut self, seg: &TcpSegment) {
        match self.state {
            // The guest resends its SYN while the host connects: nothing to do.
            State::Connecting => {}
            // Our SYN-ACK was lost.
            State::SynAckSent if seg.seq == self.irs => self.synack_pending = true,
            // Inbound: the guest's SYN-ACK again, our ACK was lost. Acknowledge it again.
            State::Established if self.inbound && seg.seq == self.irs && seg.has(ACK) => self.ack_pending = true,
            // A SYN inside a connection: answer with an ACK (RFC 5961 challenge ACK); a real
            // new connection will RST after it.
            _ => {
                self.counters.challenge_acks += 1;
                self.ack_pending = true;
            }
        }
    }

    /// The ACK field. False when the segment must go no further.
    fn guest_ack(&mut self, seg: &TcpSegment, now: u64) -> bool {
        let ack = seg.ack;
        if self.state == State::SynAckSent {
            if ack != self.iss.wrapping_add(1) {
                self.counters.drop(Drop::BadAck);
                return false;
            }
            self.state = State::Established;
            self.snd_una = ack;
            self.snd_nxt = ack;
            self.snd_max = ack;
            self.recover = ack;
            self.snd_wnd = (seg.window as u32) << self.snd_shift;
            self.rto_at = None;
            self.retries = 0;
            self.rto = self.cfg.rto_ms;
            // Space reported only after a SYN-ACK that offered less than a segment: tell the
            // guest now, or it waits on its zero-window probes.
            if self.adv_wnd < self.mss as u32 && self.window_now() > self.adv_wnd {
                self.ack_pending = true;
            }
            return true;
        }
        if lt(self.snd_max, ack) {
            // Acknowledges what was never sent: answer with our ACK, take nothing (RFC 9293).
            self.counters.drop(Drop::BadAck);
            self.ack_pending = true;
            return false;
        }
        let wnd = (seg.window as u32) << self.snd_shift;
        if lt(self.snd_una, ack) {
            let data_end = self.fin_seq.unwrap_or(ack);
            let data_acked = if lt(data_end, ack) { data_end } else { ack }.wrapping_sub(self.snd_una);
            self.discard_pending += data_acked as usize;
            if self.fin_seq.is_some_and(|f| ack == f.wrapping_add(1)) {
                self.fin_acked = true;
            }
            self.snd_una = ack;
            if lt(self.snd_nxt, ack) {
                self.snd_nxt = ack;
            }
            self.dupacks = 0;
            self.retries = 0;
            self.rto = self.cfg.rto_ms;
            self.rto_at =
                if self.snd_nxt != self.snd_una || self.snd_max != self.snd_una { Some(now.saturating_add(self.rto)) } else { None };
        } else if ack == self.snd_una && seg.payload.is_empty() && !seg.has(FIN) && wnd == self.snd_wnd && self.snd_max != self.snd_una {
            self.dupacks = self.dupacks.saturating_add(1);
            if self.dupacks == DUPACK_THRESHOLD && le(self.recover, self.snd_una) {
                // Go back and send everything again from the socket.
                self.counters.fast_retransmits += 1;
                self.recover = self.snd_max;
                self.snd_nxt = self.snd_una;
                self.rto_at = Some(now.saturating_add(self.rto));
            }
        }
        if le(self.snd_una, ack) {
            self.snd_wnd = wnd;
            if wnd > 0 {
                self.persist_at = None;
            }
        }
        true
    }

    /// Payload and FIN.
    fn guest_data(&mut self, seg: &TcpSegment, io: &mut impl HostIo) {
        let seq = seg.seq;
        let len = seg.payload.len() as u32;
        let end = seq.wrapping_add(len);
        if len > 0 || seg.has(FIN) {
            if self.guest_fin {
                // Anything after the FIN: the guest repeats itself, or lies.
                if lt(self.rcv_nxt, end) {
                    self.counters.drop(Drop::AfterFin);
                } else {
                    self.counters.guest_retransmits += 1;
                }
                self.ack_pending = true;
                return;
            }
            if lt(self.rcv_nxt, seq) {
                // A hole before it: no reassembly here, the guest resends in order.
                self.counters.drop(Drop::OutOfOrder);
                self.ack_pending = true;
                return;
            }
        }
        if len > 0 {
            if le(end, self.rcv_nxt) {
                // Already acknowledged once (our ACK was lost): acknowledge again.
                self.counters.guest_retransmits += 1;
                self.ack_pending = true;
                if !(seg.has(FIN) && end == self.rcv_nxt) {
                    return;
                }
            } else {
                let skip = self.rcv_nxt.wrapping_sub(seq) as usize;
                let data = &seg.payload[skip..];
                let room = if lt(self.rcv_nxt, self.rcv_adv) { self.rcv_adv.wrapping_sub(self.rcv_nxt) as usize } else { 0 };
                let offer = data.len().min(room);
                self.ack_pending = true;
                if offer == 0 {
                    self.counters.drop(Drop::BeyondWindow);
                    return;
                }
                if offer < data.len() {
                    self.counters.drop(Drop::BeyondWindow);
                }
                let took = io.write(&data[..offer]).min(offer);
                self.counters.bytes_to_host += took as u64;
                self.rcv_nxt = self.rcv_nxt.wrapping_add(took as u32);
                self.host_space = self.host_space.saturating_sub(took as u32);
                if took < offer {
                    // A short write means the send buffer is full, whatever was reported.
                    self.short_write = true;
                    self.host_space = 0;
                }
                if took < data.len() {
                    // The FIN (if any) comes after bytes not taken yet: it waits for them.
                    return;
                }
            }
        }
        if seg.has(FIN) && end == self.rcv_nxt {
            self.guest_fin = true;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.ack_pending = true;
            self.shutdown_pending = true;
        }
    }

    // ---- Timers ------------------------------------------------------------------------

    /// Runs the timers: connect time-out, retransmission, persist probes, idle time-out.
    pub fn tick(&mut self, now: u64) {
        match self.state {
            State::Closed => return,
            State::Connecting => {
                if now >= self.connect_until {
                    // The guest hears nothing, as if the remote host never answered.
                    self.counters.connect_timeouts += 1;
                    self.close(true);
                }
                return;
            }
            _ => {}
        }
        if now >= self.idle_until {
            self.counters.idle_timeouts += 1;
            self.abort();
            return;
        }
        if self.state == State::SynSent {
            if self.rto_at.is_some_and(|t| now >= t) {
                if self.retries >= SYN_RETRIES {
                    // The guest never answered: the host peer sees a reset, the guest nothing.
                    self.counters.connect_timeouts += 1;
                    self.close(true);
                    return;
                }
                self.retries += 1;
                self.counters.rto_retransmits += 1;
                self.syn_pending = true;
                self.rto = self.rto.saturating_mul(2).min(self.cfg.rto_max_ms);
                self.rto_at = Some(now.saturating_add(self.rto));
            }
            return;
        }
        if self.rto_at.is_some_and(|t| now >= t) && self.state == State::Established && self.snd_wnd == 0 {
            // The guest closed its window over data in flight: not a loss but a full receiver.
            // Probe it as in persist, without counting retries (the idle time-out still ends
            // a guest that stopped answering); the data goes again when the window opens.
            self.counters.persist_probes += 1;
            self.probe_pending = true;
            self.snd_nxt = self.snd_una;
            self.rto = self.rto.saturating_mul(2).min(self.cfg.rto_max_ms);
            self.rto_at = Some(now.saturating_add(self.rto));
        } else if self.rto_at.is_some_and(|t| now >= t) {
            self.retries += 1;
            if self.retries > self.cfg.max_retries {
                self.abort();
                return;
            }
            self.counters.rto_retransmits += 1;
            if self.state == State::SynAckSent {
                self.synack_pending = true;
            } else {
                self.snd_nxt = self.snd_una;
                self.recover = self.snd_max;
            }
            self.rto = (self.rto.saturating_mul(2)).min(self.cfg.rto_max_ms);
            self.rto_at = Some(now.saturating_add(self.rto));
        }
        if self.persist_at.is_some_and(|t| now >= t) {
            if self.snd_wnd == 0 {
                // No retry limit: a guest that answers probes is alive (the idle time-out
                // still applies to one that does not).
                self.counters.persist_probes += 1;
                self.probe_pending = true;
                self.rto = (self.rto.saturating_mul(2)).min(self.cfg.rto_max_ms);
                self.persist_at = Some(now.saturating_add(self.rto));
            } else {
                self.persist_at = None;
            }
        }
    }

    // ---- Output ------------------------------------------------------------------------

    /// The next operation on the host socket, if any.
    pub fn poll_host(&mut self) -> Option<HostOp> {
        if self.connect_pending {
            self.connect_pending = false;
            return Some(HostOp::Connect(self.remote));
        }
        if self.discard_pending > 0 {
            let n = std::mem::take(&mut self.discard_pending);
            if self.close_pending.is_none() {
                return Some(HostOp::Discard(n));
            }
        }
        if self.shutdown_pending {
            self.shutdown_pending = false;
            if self.close_pending.is_none() {
                return Some(HostOp::ShutdownWrite);
            }
        }
        self.close_pending.take().map(|reset| HostOp::Close { reset })
    }

    /// The window we can offer now, in bytes: the socket's free send space, up to what the
    /// window field can say.
    fn window_now(&self) -> u32 {
        let max = if self.scaling { 65535u32 << WSCALE } else { 65535 };
        if self.guest_fin {
            return 0;
        }
        self.host_space.min(max)
    }

    fn next_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Header fields for a segment now, recording the window it advertises.
    fn header(&mut self, seq: u32, flags: u8) -> TcpOut {
        let shift = if self.scaling && flags & SYN == 0 { WSCALE } else { 0 };
        let wnd = self.window_now();
        let field = (wnd >> shift).min(65535);
        let wnd = field << shift;
        // Never move the right edge back: data the guest may already send there is accepted.
        let right = self.rcv_nxt.wrapping_add(wnd);
        if lt(self.rcv_adv, right) || self.state != State::Established {
            self.rcv_adv = right;
        }
        self.adv_wnd = wnd;
        self.ack_pending = false;
        TcpOut { from: self.remote, to: self.guest, seq, ack: self.rcv_nxt, flags, window: field as u16 }
    }

    fn control(&mut self, buf: &mut [u8], seq: u32, flags: u8, opts: &[u8]) -> Option<TxFrame> {
        let h = self.header(seq, flags);
        let id = self.next_id();
        wire::write_tcp(buf, &self.link, &h, opts, 0, id, Csum::Full).map(|(len, vnet)| TxFrame { len, vnet })
    }

    /// The next frame to the guest, built in `buf` (which should hold a whole frame: 64 KiB
    /// plus headers for a TSO guest, the MTU plus 14 otherwise; smaller buffers make smaller
    /// segments). `caps` are what the guest negotiated: GUEST_TSO4 (GUEST_TSO6 for an IPv6 flow) gives segments of up to
    /// 64 KiB, GUEST_CSUM partial checksums. Host data is peeked through `io.peek`.
    pub fn poll_frame(&mut self, now: u64, caps: &RxCaps, buf: &mut [u8], io: &mut impl HostIo) -> Option<TxFrame> {
        if self.rst_pending {
            self.rst_pending = false;
            // Before any SYN-ACK the guest is in SYN-SENT: it takes a RST that acknowledges its
            // SYN, whatever the sequence number. After, snd_nxt is in its window.
            let seq = if self.snd_max == self.iss { 0 } else { self.snd_nxt };
            self.counters.resets_sent += 1;
            return self.control(buf, seq, RST | ACK, &[]);
        }
        if let Some(seq) = self.reset_seq.take() {
            self.counters.resets_sent += 1;
            let h = TcpOut { from: self.remote, to: self.guest, seq, ack: 0, flags: RST, window: 0 };
            let id = self.next_id();
            return wire::write_tcp(buf, &self.link, &h, &[], 0, id, Csum::Full).map(|(len, vnet)| TxFrame { len, vnet });
        }
        if let Some(code) = self.icmp_pending.take() {
            let id = self.next_id();
            let vnet = VnetHeader::default();
            return wire::write_icmp_unreach(
                buf,
                &self.link,
                &FlowKey { guest: self.guest, remote: self.remote },
                IPPROTO_TCP,
                self.irs,
                code,
                id,
            )
            .map(|len| TxFrame { len, vnet });
        }
        match self.state {
            State::Connecting | State::Closed => return None,
            State::SynSent => {
                if !self.syn_pending {
                    return None;
                }
                self.syn_pending = false;
                self.snd_nxt = self.iss.wrapping_add(1);
                self.snd_max = self.snd_nxt;
                // We always offer scaling; it applies only if the guest's SYN-ACK offers it too.
                let our_mss = max_mss(self.cfg.mtu, self.guest).to_be_bytes();
                let opts = [2, 4, our_mss[0], our_mss[1], 1, 3, 3, WSCALE];
                let iss = self.iss;
                return self.control(buf, iss, SYN, &opts);
            }
            State::SynAckSent => {
                if !self.synack_pending {
                    return None;
                }
                self.synack_pending = false;
                self.snd_nxt = self.iss.wrapping_add(1);
                self.snd_max = self.snd_nxt;
                if self.rto_at.is_none() {
                    self.rto_at = Some(now.saturating_add(self.rto));
                }
                let our_mss = max_mss(self.cfg.mtu, self.guest).to_be_bytes();
                let mut opts = [2, 4, our_mss[0], our_mss[1], 1, 3, 3, WSCALE];
                let n = if self.scaling { 8 } else { 4 };
                if !self.scaling {
                    opts[4..].fill(0);
                }
                let iss = self.iss;
                return self.control(buf, iss, SYN | ACK, &opts[..n]);
            }
            State::Established => {}
        }
        if let Some(f) = self.data_frame(now, caps, buf, io) {
            return Some(f);
        }
        if self.host_eof && self.want_fin(buf, io) {
            let seq = self.snd_nxt;
            self.fin_seq = Some(seq);
            self.snd_nxt = seq.wrapping_add(1);
            if lt(self.snd_max, self.snd_nxt) {
                self.snd_max = self.snd_nxt;
            }
            if self.rto_at.is_none() {
                self.rto_at = Some(now.saturating_add(self.rto));
            }
            return self.control(buf, seq, FIN | ACK, &[]);
        }
        if self.probe_pending {
            // A segment below the window makes the guest answer with its current window.
            self.probe_pending = false;
            let seq = self.snd_una.wrapping_sub(1);
            return self.control(buf, seq, ACK, &[]);
        }
        if self.ack_pending || self.dupacks_to_send > 0 {
            if !self.ack_pending {
                self.dupacks_to_send -= 1;
            }
            let seq = self.snd_nxt;
            return self.control(buf, seq, ACK, &[]);
        }
        None
    }

    /// FIN goes when the host is at EOF and every byte of the socket was sent to the guest
    /// (nothing more to peek past what is in flight), right behind the last data: waiting for
    /// the guest's ACK of that data first would cost each short connection the guest's delayed
    /// ACK (40 ms in Linux). Not while going back for a retransmission. Once sent, it is resent
    /// when a retransmission brings snd_nxt back to it.
    fn want_fin<I: HostIo>(&mut self, buf: &mut [u8], io: &mut I) -> bool {
        match self.fin_seq {
            Some(f) => f == self.snd_nxt,
            None => {
                let mut probe = [0u8; 1];
                let at = wire::tcp_frame_hdr(self.guest.ip());
                let scratch = buf.get_mut(at..at + 1).unwrap_or(&mut probe[..]);
                let off = self.peek_offset();
                self.snd_nxt == self.snd_max && io.peek(off, scratch) == 0
            }
        }
    }

    fn data_frame(&mut self, now: u64, caps: &RxCaps, buf: &mut [u8], io: &mut impl HostIo) -> Option<TxFrame> {
        if self.fin_seq.is_some_and(|f| !lt(self.snd_nxt, f)) {
            return None;
        }
        let room = self.send_room() as usize;
        if room == 0 {
            // Zero window with nothing in flight: probe until it opens.
            if self.snd_wnd == 0 && self.snd_nxt == self.snd_una && self.persist_at.is_none() {
                self.persist_at = Some(now.saturating_add(self.rto));
            }
            return None;
        }
        let v6 = self.guest.is_ipv6();
        let tso = (if v6 { caps.tso6 } else { caps.tso4 }) && caps.csum;
        let hdr = wire::tcp_frame_hdr(self.guest.ip());
        let seg_max = if tso { wire::MAX_IP_PACKET - 40 } else { self.mss as usize };
        let mut max = room.min(seg_max).min(buf.len().saturating_sub(hdr));
        if let Some(f) = self.fin_seq {
            max = max.min(f.wrapping_sub(self.snd_nxt) as usize);
        }
        if max == 0 {
            return None;
        }
        let off = self.peek_offset();
        let n = io.peek(off, &mut buf[hdr..hdr + max]).min(max);
        if n == 0 {
            return None;
        }
        let seq = self.snd_nxt;
        if lt(seq, self.snd_max) {
            self.counters.retransmitted_bytes += n as u64;
        } else {
            self.counters.bytes_to_guest += n as u64;
        }
        self.snd_nxt = seq.wrapping_add(n as u32);
        if lt(self.snd_max, self.snd_nxt) {
            self.snd_max = self.snd_nxt;
        }
        if self.rto_at.is_none() {
            self.rto_at = Some(now.saturating_add(self.rto));
        }
        let csum = if tso && n > self.mss as usize {
            Csum::Gso(self.mss)
        } else if caps.csum {
            Csum::Partial
        } else {
            Csum::Full
        };
        let h = self.header(seq, ACK | PSH);
        let id = self.next_id();
        wire::write_tcp(buf, &self.link, &h, &[], n, id, csum).map(|(len, vnet)| TxFrame { len, vnet })
    }
}
