//! The data path: frames leave a guest's TX ring and land in the receivers' RX rings with
//! exactly one copy, done by the sender's worker thread. No intermediate buffer, no allocation
//! per frame in steady state: descriptor addresses are resolved into host pointers once, and
//! bytes move straight from the sender's guest memory into the receiver's.
//!
//! Only when a receiver cannot take the sender's offloads (no GUEST_CSUM, no GUEST_TSO) is the
//! frame gathered into a reusable scratch buffer, completed or segmented, and then copied in.
//!
//! Locks: a sender holds its own TX vring and takes one receiver's RX lock at a time, so two
//! guests sending to each other never wait on each other in a cycle.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vunet_switch::offload::{complete_checksum, segment_tcp};
use vunet_switch::port_security;
use vunet_switch::router::{Side, Verdict};
use vunet_switch::vnet::{delivery, rx_header, Delivery, RxCaps, VnetHeader, HDR_LEN};
use vunet_switch::{dst_mac, is_multicast, src_mac, Decision, DropReason, PortId, MAX_FRAME_LEN, MIN_FRAME_LEN};

use crate::network::{GuestPort, Network};
use crate::uplink::Uplink;
use crate::vhost_port::Vring;
use vhost_user_backend::VringT;

pub type Mem = GuestMemoryMmap<()>;

/// Frames taken from a TX ring per round before the used ring is published and receivers are
/// notified. Bounds the latency one busy sender adds to the others.
pub const TX_BATCH: usize = 128;

/// A resolved, bounds-checked piece of guest memory (or of a scratch buffer).
#[derive(Clone, Copy)]
pub struct Seg {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a Seg is only dereferenced while the memory guard it was resolved from is alive,
// within one call on one thread; storing it in a struct that crosses threads between calls is
// harmless because stale Segs are cleared before reuse.
unsafe impl Send for Seg {}

impl Seg {
    /// A read-only source segment over a byte slice.
    fn of_slice(b: &[u8]) -> Seg {
        Seg { ptr: b.as_ptr() as *mut u8, len: b.len() }
    }
    /// A destination segment over a mutable byte slice.
    fn of_mut(b: &mut [u8]) -> Seg {
        Seg { ptr: b.as_mut_ptr(), len: b.len() }
    }
}

/// Copies `len` bytes from the scatter list `src` (starting `src_off` bytes in) into the
/// scatter list `dst` (starting `dst_off` bytes in). The caller guarantees both lists hold
/// enough bytes.
fn copy_segs(dst: &[Seg], mut dst_off: usize, src: &[Seg], mut src_off: usize, mut len: usize) {
    let (mut di, mut si) = (0, 0);
    while di < dst.len() && dst_off >= dst[di].len {
        dst_off -= dst[di].len;
        di += 1;
    }
    while si < src.len() && src_off >= src[si].len {
        src_off -= src[si].len;
        si += 1;
    }
    while len > 0 && di < dst.len() && si < src.len() {
        let n = len.min(dst[di].len - dst_off).min(src[si].len - src_off);
        // SAFETY: both ranges were resolved from live mappings (guest memory regions held by a
        // memory guard for the duration of this call, or a scratch Vec borrowed by the caller)
        // and `n` stays within each segment. Source and destination are different buffers
        // (different guests, or a scratch buffer), so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src[si].ptr.add(src_off), dst[di].ptr.add(dst_off), n) };
        len -= n;
        dst_off += n;
        src_off += n;
        if dst_off == dst[di].len {
            di += 1;
            dst_off = 0;
        }
        if src_off == src[si].len {
            si += 1;
            src_off = 0;
        }
    }
}

/// Gathers up to `out.len()` bytes starting at `off` of a scatter list; returns how many.
fn gather(src: &[Seg], off: usize, out: &mut [u8]) -> usize {
    let total: usize = src.iter().map(|s| s.len).sum();
    let n = out.len().min(total.saturating_sub(off));
    copy_segs(&[Seg::of_mut(out)], 0, src, off, n);
    n
}

/// Resolves `len` bytes at `addr` into one or more segments (a buffer may straddle regions).
fn resolve(mem: &Mem, addr: vm_memory::GuestAddress, len: usize, out: &mut Vec<Seg>) -> Result<(), DropReason> {
    if len == 0 {
        return Ok(());
    }
    if let Ok(s) = mem.get_slice(addr, len) {
        out.push(Seg { ptr: s.ptr_guard_mut().as_ptr(), len });
        return Ok(());
    }
    for s in mem.get_slices(addr, len) {
        let s = s.map_err(|_| DropReason::BadAddress)?;
        out.push(Seg { ptr: s.ptr_guard_mut().as_ptr(), len: s.len() });
    }
    Ok(())
}

/// Walks a descriptor chain, resolving every descriptor that the device may read (TX,
/// `writable == false`) or write (RX, `writable == true`). Returns the total length.
/// A chain that ends while still flagged NEXT was cut short by the queue-size bound (a loop)
/// or by an unreadable descriptor table, and is refused.
fn collect_chain(chain: DescriptorChain<&Mem>, mem: &Mem, writable: bool, limit: usize, out: &mut Vec<Seg>) -> Result<usize, DropReason> {
    let mut total = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut err = None;
    for d in chain {
        count += 1;
        last_has_next = d.has_next();
        if d.is_write_only() != writable {
            err = err.or(Some(DropReason::BadDescriptor));
            continue;
        }
        total += d.len() as usize;
        if total > limit {
            err = err.or(Some(DropReason::Oversize));
            continue;
        }
        if err.is_none() {
            if let Err(e) = resolve(mem, d.addr(), d.len() as usize, out) {
                err = Some(e);
            }
        }
    }
    if last_has_next {
        return Err(DropReason::ChainLoop);
    }
    if count == 0 {
        return Err(DropReason::ShortFrame);
    }
    match err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Per-worker reusable buffers, so the steady state never allocates.
#[derive(Default)]
pub struct TxScratch {
    tx_segs: Vec<Seg>,
    rx_segs: Vec<Seg>,
    rx_chains: Vec<(u16, usize)>,
    frame: Vec<u8>,
    segment: Vec<u8>,
    gw_in: Vec<u8>,
    gw_out: Vec<u8>,
    notify: Vec<PortId>,
    /// Frames for uplinks gathered during a TX batch, sent with one `sendmmsg` per uplink
    /// when the batch ends (they still point into the sender's guest memory, so the batch's
    /// TX buffers are returned to the guest only after that).
    uplink_sends: Vec<UplinkSend>,
    uplink_segs: Vec<Seg>,
    batching: bool,
}

/// One frame waiting in the TX batch for its uplink.
struct UplinkSend {
    port: PortId,
    len: usize,
    hdr: [u8; HDR_LEN],
    hdr_len: usize,
    segs: std::ops::Range<usize>,
}

/// Frames waiting for a receiver whose ring was full, like a tap device's queue: a TCP
/// burst into a momentarily slow guest is held (one extra copy) instead of dropped, and the
/// sender never waits. Bounded in frames and bytes; beyond that, frames are dropped and counted.
#[derive(Default)]
pub struct Backlog {
    frames: VecDeque<(VnetHeader, Vec<u8>)>,
    bytes: usize,
    pool: Vec<Vec<u8>>,
}

pub const BACKLOG_MAX_FRAMES: usize = 1024;
pub const BACKLOG_MAX_BYTES: usize = 4 << 20;

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, hdr: VnetHeader, src: &[Seg], off: usize, len: usize) -> Result<(), DropReason> {
        if self.frames.len() >= BACKLOG_MAX_FRAMES || self.bytes + len > BACKLOG_MAX_BYTES {
            return Err(DropReason::NoRxBuffer);
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.resize(len, 0);
        gather(src, off, &mut buf);
        self.bytes += len;
        self.frames.push_back((hdr, buf));
        Ok(())
    }

    fn pop_front(&mut self) {
        if let Some((_, buf)) = self.frames.pop_front() {
            self.bytes -= buf.len();
            if self.pool.len() < 64 {
                self.pool.push(buf);
            }
        }
    }
}

/// Writes as much of the backlog as the receiver's ring takes. Returns true if it emptied.
fn flush_backlog(
    dest: &GuestPort,
    backlog: &mut Backlog,
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    caps: &RxCaps,
    cx: &mut TxScratch,
) -> bool {
    while let Some((h, data)) = backlog.frames.front() {
        match write_rx(q, mem, caps, *h, &[Seg::of_slice(data)], 0, data.len(), cx) {
            Ok(()) => dest.counters.delivered(data.len()),
            Err(DropReason::NoRxBuffer) => return false,
            Err(e) => dest.counters.dropped(e),
        }
        backlog.pop_front();
    }
    true
}

/// Called when the receiving guest posts buffers (its RX kick): drain what waited for them.
pub fn flush_pending(port: &GuestPort, cx: &mut TxScratch) {
    if !port.backlogged.load(Ordering::Acquire) {
        return;
    }
    let mut target = port.rx.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = target.as_mut() else { return };
    if t.backlog.is_empty() {
        return;
    }
    let dmem = t.mem.memory();
    let mut vs = t.vring.get_mut();
    if !vs.get_queue().ready() || !vs.is_enabled() {
        return;
    }
    let caps = t.caps;
    let q = vs.get_queue_mut();
    let mut moved = false;
    for _ in 0..4 {
        let before = t.backlog.frames.len();
        let done = flush_backlog(port, &mut t.backlog, q, &dmem, &caps, cx);
        moved |= t.backlog.frames.len() != before;
        if done {
            // Nothing waits any more: no kicks needed until the ring is full again.
            let _ = q.disable_notification(&*dmem);
            break;
        }
        // Still waiting: ask for a kick when more buffers come; if some came meanwhile, retry.
        if !q.enable_notification(&*dmem).unwrap_or(false) {
            break;
        }
    }
    port.backlogged.store(!t.backlog.is_empty(), Ordering::Release);
    if moved && vs.needs_notification().unwrap_or(true) {
        let _ = vs.signal_used_queue();
    }
}

/// Delivers `len` bytes from `src` with header `hdr` into a receiver: straight into its ring,
/// or behind frames already waiting in its backlog, or into the backlog if the ring is full.
#[allow(clippy::too_many_arguments)]
fn deliver_or_queue(
    dest: &GuestPort,
    backlog: &mut Backlog,
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    caps: &RxCaps,
    hdr: VnetHeader,
    src: &[Seg],
    off: usize,
    len: usize,
    cx: &mut TxScratch,
) -> Result<(), DropReason> {
    if !backlog.is_empty() && !flush_backlog(dest, backlog, q, mem, caps, cx) {
        return backlog.push(hdr, src, off, len);
    }
    match write_rx(q, mem, caps, hdr, src, off, len, cx) {
        Err(DropReason::NoRxBuffer) => {
            backlog.push(hdr, src, off, len)?;
            // Publish "something waits" before asking for the kick, so the kick's handler
            // cannot miss it.
            dest.backlogged.store(true, Ordering::SeqCst);
            // Ask the guest to kick when it posts buffers; if it already did, flush now.
            if q.enable_notification(mem).unwrap_or(false) {
                flush_backlog(dest, backlog, q, mem, caps, cx);
            }
            Ok(())
        }
        r => r.map(|()| dest.counters.delivered(len)),
    }
}

/// A frame from a TX chain, validated, still in the sender's memory.
struct TxFrame<'a> {
    segs: &'a [Seg],
    /// Offset of the Ethernet header within `segs` (the sender's virtio-net header length).
    offset: usize,
    len: usize,
    hdr: VnetHeader,
}

/// Drains `port`'s TX ring: validate, switch, deliver. Called on every TX kick.
pub fn process_tx(net: &Network, port: &GuestPort, vring: &Vring, mem: &Mem, hdr_len: usize, event_idx: bool, cx: &mut TxScratch) {
    let ports = net.ports.read().unwrap_or_else(|e| e.into_inner());
    // One read of the guest's avail index per batch, not one per frame: that cache line is
    // the one the guest keeps writing.
    let mut chains: Vec<DescriptorChain<&Mem>> = Vec::with_capacity(TX_BATCH);
    loop {
        let mut vs = vring.get_mut();
        if !vs.get_queue().ready() || !vs.is_enabled() {
            return;
        }
        if event_idx {
            let _ = vs.disable_notification();
        }
        let now = net.now_ms();
        chains.clear();
        match vs.get_queue_mut().iter(mem) {
            Ok(it) => chains.extend(it.take(TX_BATCH)),
            // An avail index more than a ring ahead: the guest's ring is corrupt. Leave it
            // alone; the guest's reset will set it up again.
            Err(_) => {
                port.counters.dropped(DropReason::BadDescriptor);
                return;
            }
        }
        let n = chains.len();
        let mut heads = [0u16; TX_BATCH];
        cx.batching = true;
        for (i, chain) in chains.drain(..).enumerate() {
            let head = chain.head_index();
            heads[i] = head;
            cx.tx_segs.clear();
            match collect_chain(chain, mem, false, hdr_len + MAX_FRAME_LEN, &mut cx.tx_segs) {
                Ok(total) => {
                    let segs = std::mem::take(&mut cx.tx_segs);
                    if let Err(r) = switch_frame(net, &ports, port, &segs, total, hdr_len, now, cx) {
                        port.counters.dropped(r);
                        net.log_drop(port, r);
                    }
                    cx.tx_segs = segs;
                }
                Err(r) => {
                    port.counters.dropped(r);
                    net.log_drop(port, r);
                }
            }
        }
        cx.batching = false;
        flush_uplinks(&ports, cx);
        // TX buffers are returned with length 0 whatever happened to the frame, and only now:
        // the uplink sends above read from them.
        for &head in &heads[..n] {
            if vs.get_queue_mut().add_used(mem, head, 0).is_err() {
                break;
            }
        }
        notify_receivers(&ports, cx);
        if vs.needs_notification().unwrap_or(true) {
            let _ = vs.signal_used_queue();
        }
        if n == TX_BATCH {
            continue;
        }
        if event_idx && vs.enable_notification().unwrap_or(false) {
            continue;
        }
        return;
    }
}

#[allow(clippy::too_many_arguments)]
fn switch_frame(
    net: &Network,
    ports: &[std::sync::Arc<GuestPort>],
    port: &GuestPort,
    segs: &[Seg],
    total: usize,
    hdr_len: usize,
    now: u64,
    cx: &mut TxScratch,
) -> Result<(), DropReason> {
    if total < hdr_len + MIN_FRAME_LEN {
        return Err(DropReason::ShortFrame);
    }
    let len = total - hdr_len;
    // The virtio-net header and enough of the frame for the switch and port security.
    let mut head = [0u8; HDR_LEN + port_security::HEADER_BYTES];
    let seen = hdr_len + port_security::HEADER_BYTES.min(len);
    gather(segs, 0, &mut head[..seen]);
    let hdr = VnetHeader::parse(&head[..hdr_len]);
    hdr.validate_tx(len, net.mtu as usize)?;
    let eth = &head[hdr_len..hdr_len + 14];
    let (src, dst) = (src_mac(eth), dst_mac(eth));
    if is_multicast(&src) || net.gateway.is_some_and(|g| g.mac == src) {
        return Err(DropReason::BadSourceMac);
    }
    if port.security {
        let mac = port.lock_mac(src, net);
        match port_security::check(&head[hdr_len..seen], &mac, port.leased_ip()) {
            Err(DropReason::SpoofedIp) if routes_behind(net, port, &head[hdr_len..seen]) => {}
            r => r?,
        }
    }
    port.counters.received(len);
    let frame = TxFrame { segs, offset: hdr_len, len, hdr };
    if port.capturing.load(Ordering::Relaxed) {
        capture(port, &frame, cx);
    }
    let to_gateway = net.gateway.is_some_and(|g| g.wants(&dst));
    let decision = {
        let mut macs = net.macs.lock().unwrap_or_else(|e| e.into_inner());
        if net.gateway.is_some_and(|g| g.mac == dst) {
            // For the gateway alone: learn the sender, forward nowhere.
            macs.learn(src, port.id, now);
            Decision::Discard
        } else {
            macs.forward(src, dst, port.id, now)
        }
    };
    if to_gateway {
        answer_gateway(net, ports, port, &frame, cx);
    }
    match decision {
        Decision::Unicast(to) => {
            if let Some(dest) = ports.get(to) {
                deliver(dest, &frame, cx);
            }
        }
        Decision::Flood => {
            // A routed uplink is not on the guests' L2 segment.
            for dest in ports.iter().filter(|p| p.id != port.id && !p.routed) {
                deliver(dest, &frame, cx);
            }
        }
        Decision::Discard => {}
    }
    Ok(())
}

/// Whether an IPv4 packet comes from a network the port's guest routes for (it is the `via`
/// of a `[[network.route]]` holding the source): a router guest may send from there.
fn routes_behind(net: &Network, port: &GuestPort, frame: &[u8]) -> bool {
    let (Some(router), Some(me)) = (net.router.as_ref(), port.leased_ip()) else { return false };
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let src = std::net::Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    let r = router.lock().unwrap_or_else(|e| e.into_inner());
    r.cfg.routes.iter().any(|rt| rt.via == me && vunet_switch::ipv4::in_subnet(src, rt.net, rt.prefix))
}

/// Hands a frame made by vunet itself (a gateway answer from another thread, such as an
/// upstream DNS answer) to a port, and interrupts its guest if it wants that.
pub fn deliver_frame(port: &GuestPort, frame: &[u8], cx: &mut TxScratch) {
    let f = TxFrame { segs: &[Seg::of_slice(frame)], offset: 0, len: frame.len(), hdr: VnetHeader::default() };
    deliver(port, &f, cx);
    cx.notify.clear();
    let target = port.rx.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = target.as_ref() {
        let mut vs = t.vring.get_mut();
        if vs.needs_notification().unwrap_or(true) {
            let _ = vs.signal_used_queue();
        }
    }
}

/// Lets the gateway see a frame addressed to it (or broadcast) and sends its answer, if any,
/// back to the sending port. TSO frames are not for the gateway (it speaks ARP and ICMP).
fn answer_gateway(net: &Network, ports: &[std::sync::Arc<GuestPort>], port: &GuestPort, f: &TxFrame, cx: &mut TxScratch) {
    let Some(gw) = net.gateway.as_ref() else {
        return;
    };
    if f.hdr.is_gso() && net.router.is_none() {
        return;
    }
    let mut input = std::mem::take(&mut cx.gw_in);
    let mut reply = std::mem::take(&mut cx.gw_out);
    input.resize(f.len, 0);
    gather(f.segs, f.offset, &mut input);
    if let Some(router) = net.router.as_ref() {
        let routed = input.len() >= 34 && input[0..6] == gw.mac && input[12..14] == [0x08, 0x00] && input[30..34] != gw.ip.octets();
        if routed || input[12..14] == [0x08, 0x06] {
            let mut emit = Vec::new();
            let verdict = {
                let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
                if routed {
                    r.from_guest(&mut input, &f.hdr, net.now_ms(), &mut emit)
                } else {
                    r.guest_arp(&input, net.now_ms(), &mut emit);
                    Ok(Verdict::NotMine)
                }
            };
            match verdict {
                Ok(Verdict::Forward(side)) => send_routed(net, ports, side, &f.hdr, &input, cx),
                Ok(_) => {}
                Err(r) => {
                    port.counters.dropped(r);
                    net.log_drop(port, r);
                }
            }
            for e in emit {
                send_routed(net, ports, e.to, &e.hdr, &e.frame, cx);
            }
            if routed || f.hdr.is_gso() {
                cx.gw_in = input;
                cx.gw_out = reply;
                return;
            }
        }
    }
    if f.hdr.is_gso() {
        cx.gw_in = input;
        cx.gw_out = reply;
        return;
    }
    let complete = !f.hdr.needs_csum() || complete_checksum(&mut input, f.hdr.csum_start as usize, f.hdr.csum_offset as usize).is_ok();
    if let Some(dns) = net.dns.as_ref().filter(|_| complete && crate::dns_tcp::is_for_dns_tcp(gw, &input)) {
        dns.tcp.input(port.id, &input);
    } else if complete
        && (gw.handle(&input, &mut reply) || net.serve_dhcp(port, gw, &input, &mut reply) || net.serve_dns(port, gw, &input, &mut reply))
    {
        let answer = TxFrame { segs: &[Seg::of_slice(&reply)], offset: 0, len: reply.len(), hdr: VnetHeader::default() };
        deliver(port, &answer, cx);
    }
    cx.gw_in = input;
    cx.gw_out = reply;
}

/// Switches frames read from an uplink (each with a virtio-net header of `hdr_len` bytes) as
/// if the uplink were a guest sending them, then interrupts the guests that got any.
/// Frames the host itself sent out the uplink's interface (`outgoing`) are taken too, so the
/// host can reach guests through a bridge, unless their source is one of our own ports (an
/// echo of what vunet sent).
pub fn switch_from_uplink(net: &Network, port: &GuestPort, frames: &[(&[u8], bool)], hdr_len: usize, cx: &mut TxScratch) {
    let ports = net.ports.read().unwrap_or_else(|e| e.into_inner());
    let now = net.now_ms();
    for &(frame, outgoing) in frames {
        if outgoing && frame.len() >= hdr_len + 12 {
            let src: vunet_switch::Mac = frame[hdr_len + 6..hdr_len + 12].try_into().unwrap_or([0; 6]);
            let home = net.macs.lock().unwrap_or_else(|e| e.into_inner()).port_of(&src, now);
            if home.is_some_and(|p| p != port.id) {
                continue;
            }
        }
        if let Err(r) = switch_frame(net, &ports, port, &[Seg::of_slice(frame)], frame.len(), hdr_len, now, cx) {
            port.counters.dropped(r);
            net.log_drop(port, r);
        }
    }
    notify_receivers(&ports, cx);
}

/// Sends a frame the router forwarded or made: to the uplink, or to the guest its
/// destination MAC names (every guest for broadcast or an unknown MAC).
fn send_routed(net: &Network, ports: &[std::sync::Arc<GuestPort>], side: Side, hdr: &VnetHeader, frame: &[u8], cx: &mut TxScratch) {
    if frame.len() < MIN_FRAME_LEN {
        return;
    }
    let f = TxFrame { segs: &[Seg::of_slice(frame)], offset: 0, len: frame.len(), hdr: *hdr };
    // The frame lives in a scratch buffer that the next frame reuses: no batching.
    let batching = std::mem::replace(&mut cx.batching, false);
    match side {
        Side::Uplink => {
            if let Some(up) = ports.iter().find(|p| p.routed) {
                deliver(up, &f, cx);
            }
        }
        Side::Guests => {
            let dst = dst_mac(frame);
            let to =
                (!is_multicast(&dst)).then(|| net.macs.lock().unwrap_or_else(|e| e.into_inner()).port_of(&dst, net.now_ms())).flatten();
            match to.and_then(|id| ports.get(id)) {
                Some(dest) => deliver(dest, &f, cx),
                None => {
                    for dest in ports.iter().filter(|p| !p.routed && !p.removed.load(Ordering::Relaxed)) {
                        deliver(dest, &f, cx);
                    }
                }
            }
        }
    }
    cx.batching = batching;
}

/// Routes frames read from a nat or route network's uplink (each behind a virtio-net header
/// of `hdr_len` bytes, rewritten in place), then interrupts the guests that got any.
pub fn route_from_uplink(net: &Network, port: &GuestPort, frames: &mut [&mut [u8]], hdr_len: usize, cx: &mut TxScratch) {
    let Some(router) = net.router.as_ref() else { return };
    let ports = net.ports.read().unwrap_or_else(|e| e.into_inner());
    let now = net.now_ms();
    let mut emit = Vec::new();
    for buf in frames.iter_mut() {
        if buf.len() < hdr_len + MIN_FRAME_LEN {
            continue;
        }
        let (h, frame) = buf.split_at_mut(hdr_len);
        let hdr = VnetHeader::parse(h);
        let verdict = router.lock().unwrap_or_else(|e| e.into_inner()).from_uplink(frame, &hdr, now, &mut emit);
        match verdict {
            Ok(Verdict::NotMine) => continue,
            Ok(Verdict::Forward(side)) => {
                port.counters.received(frame.len());
                if port.capturing.load(Ordering::Relaxed) {
                    port.capture(frame);
                }
                send_routed(net, &ports, side, &hdr, frame, cx);
            }
            Ok(Verdict::Consumed) => port.counters.received(frame.len()),
            Err(r) => {
                port.counters.received(frame.len());
                port.counters.dropped(r);
                net.log_drop(port, r);
            }
        }
        for e in emit.drain(..) {
            send_routed(net, &ports, e.to, &e.hdr, &e.frame, cx);
        }
    }
    notify_receivers(&ports, cx);
}

/// Runs the router's timers (ARP retries, expiry) and sends what they produce.
pub fn router_tick(net: &Network, cx: &mut TxScratch) {
    let Some(router) = net.router.as_ref() else { return };
    let mut emit = Vec::new();
    router.lock().unwrap_or_else(|e| e.into_inner()).tick(net.now_ms(), &mut emit);
    send_router_frames(net, emit, cx);
}

/// Sends frames the router made outside of any frame's handling (timers, a new address).
pub fn send_router_frames(net: &Network, emit: Vec<vunet_switch::router::Emit>, cx: &mut TxScratch) {
    if emit.is_empty() {
        return;
    }
    let ports = net.ports.read().unwrap_or_else(|e| e.into_inner());
    for e in emit {
        send_routed(net, &ports, e.to, &e.hdr, &e.frame, cx);
    }
    notify_receivers(&ports, cx);
}

/// Copies a frame for the port's captures (only while somebody captures).
fn capture(port: &GuestPort, f: &TxFrame, cx: &mut TxScratch) {
    let mut frame = std::mem::take(&mut cx.frame);
    frame.resize(f.len, 0);
    gather(f.segs, f.offset, &mut frame);
    port.capture(&frame);
    cx.frame = frame;
}

/// Most iovecs one frame is written with; a frame in more pieces is gathered first.
const MAX_IOV: usize = 64;

/// Sends `len` bytes of `src` from `off` on, behind a vnet header when the uplink takes one.
fn send_uplink(
    up: &Uplink,
    caps: &RxCaps,
    hdr: &VnetHeader,
    src: &[Seg],
    off: usize,
    len: usize,
    gathered: &mut Vec<u8>,
) -> Result<(), DropReason> {
    let mut h = [0u8; HDR_LEN];
    hdr.write(&mut h[..caps.hdr_len]);
    let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
    let mut iov = [empty; MAX_IOV];
    let mut n = 0;
    if caps.hdr_len > 0 {
        iov[0] = libc::iovec { iov_base: h.as_mut_ptr().cast(), iov_len: caps.hdr_len };
        n = 1;
    }
    let (mut skip, mut left) = (off, len);
    for s in src {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        if n == MAX_IOV {
            // Too many pieces: one contiguous copy instead.
            gathered.resize(len, 0);
            gather(src, off, gathered);
            n = caps.hdr_len.min(1);
            iov[n] = libc::iovec { iov_base: gathered.as_mut_ptr().cast(), iov_len: len };
            return up.send(&iov[..n + 1]);
        }
        let take = (s.len - skip).min(left);
        // SAFETY: within the segment, which is live for this call.
        iov[n] = libc::iovec { iov_base: unsafe { s.ptr.add(skip) }.cast(), iov_len: take };
        n += 1;
        left -= take;
        skip = 0;
    }
    up.send(&iov[..n])
}

/// Adds a frame to the batch's uplink sends: its header, and its bytes as segments of the
/// sender's memory (no copy).
fn queue_uplink(port: PortId, caps: &RxCaps, hdr: &VnetHeader, src: &[Seg], off: usize, len: usize, cx: &mut TxScratch) {
    let mut h = [0u8; HDR_LEN];
    hdr.write(&mut h[..caps.hdr_len]);
    let start = cx.uplink_segs.len();
    let (mut skip, mut left) = (off, len);
    for s in src {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(left);
        // SAFETY: within the segment, which stays live until the batch is flushed.
        cx.uplink_segs.push(Seg { ptr: unsafe { s.ptr.add(skip) }, len: take });
        left -= take;
        skip = 0;
    }
    cx.uplink_sends.push(UplinkSend { port, len, hdr: h, hdr_len: caps.hdr_len, segs: start..cx.uplink_segs.len() });
}

/// Sends the batch's uplink frames: one `sendmmsg` per uplink for all of its frames.
fn flush_uplinks(ports: &[std::sync::Arc<GuestPort>], cx: &mut TxScratch) {
    if cx.uplink_sends.is_empty() {
        return;
    }
    let mut sends = std::mem::take(&mut cx.uplink_sends);
    sends.sort_by_key(|s| s.port);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(cx.uplink_segs.len() + sends.len());
    let mut spans = Vec::with_capacity(sends.len());
    for s in sends.iter_mut() {
        let start = iov.len();
        if s.hdr_len > 0 {
            iov.push(libc::iovec { iov_base: s.hdr.as_mut_ptr().cast(), iov_len: s.hdr_len });
        }
        for seg in &cx.uplink_segs[s.segs.clone()] {
            iov.push(libc::iovec { iov_base: seg.ptr.cast(), iov_len: seg.len });
        }
        spans.push(start..iov.len());
    }
    let mut i = 0;
    while i < sends.len() {
        let port = sends[i].port;
        let j = sends[i..].iter().position(|s| s.port != port).map_or(sends.len(), |k| i + k);
        if let Some(dest) = ports.get(port) {
            if let Some(up) = dest.uplink.as_deref() {
                let failed = up.send_batch(&mut iov, &spans[i..j]);
                for (k, s) in sends[i..j].iter().enumerate() {
                    match failed.iter().find(|(at, _)| *at == k) {
                        Some(&(_, e)) => dest.counters.dropped(e),
                        None => dest.counters.delivered(s.len),
                    }
                }
            }
        }
        i = j;
    }
    sends.clear();
    cx.uplink_sends = sends;
    cx.uplink_segs.clear();
}

/// Delivers a frame to an uplink: offloads pass to the kernel with the vnet header; without
/// one, checksums are completed and TSO frames segmented here.
fn deliver_uplink(dest: &GuestPort, up: &Uplink, f: &TxFrame, cx: &mut TxScratch) {
    let Some(caps) = up.caps() else {
        dest.counters.dropped(DropReason::PortDown);
        return;
    };
    let mut frame = std::mem::take(&mut cx.frame);
    let mut seg = std::mem::take(&mut cx.segment);
    let result = match delivery(&f.hdr, &caps) {
        Delivery::PassThrough if cx.batching && up.batches() => {
            // Counted when the batch is sent.
            queue_uplink(dest.id, &caps, &rx_header(&f.hdr, 0), f.segs, f.offset, f.len, cx);
            Ok(0)
        }
        Delivery::PassThrough => send_uplink(up, &caps, &rx_header(&f.hdr, 0), f.segs, f.offset, f.len, &mut frame).map(|()| f.len),
        Delivery::CompleteChecksum => {
            frame.resize(f.len, 0);
            gather(f.segs, f.offset, &mut frame);
            complete_checksum(&mut frame, f.hdr.csum_start as usize, f.hdr.csum_offset as usize)
                .and_then(|_| send_uplink(up, &caps, &VnetHeader::default(), &[Seg::of_slice(&frame)], 0, frame.len(), &mut Vec::new()))
                .map(|()| f.len)
        }
        Delivery::Segment => {
            frame.resize(f.len, 0);
            gather(f.segs, f.offset, &mut frame);
            let mut sent = 0;
            segment_tcp(&frame, &f.hdr, &mut seg, |s| {
                match send_uplink(up, &caps, &VnetHeader::default(), &[Seg::of_slice(s)], 0, s.len(), &mut Vec::new()) {
                    Ok(()) => sent += s.len(),
                    Err(e) => dest.counters.dropped(e),
                }
            })
            .map(|_| sent)
        }
    };
    cx.frame = frame;
    cx.segment = seg;
    match result {
        Ok(0) => {}
        Ok(n) => dest.counters.delivered(n),
        Err(e) => dest.counters.dropped(e),
    }
}

/// Delivers one frame to one receiving port, counting a drop on the receiver if it cannot take
/// it (not connected, ring and backlog full, buffers too small).
fn deliver(dest: &GuestPort, f: &TxFrame, cx: &mut TxScratch) {
    if dest.capturing.load(Ordering::Relaxed) {
        capture(dest, f, cx);
    }
    if let Some(up) = dest.uplink.as_deref() {
        deliver_uplink(dest, up, f, cx);
        return;
    }
    if !dest.connected.load(Ordering::Relaxed) {
        dest.counters.dropped(DropReason::PortDown);
        return;
    }
    let mut target = dest.rx.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = target.as_mut() else {
        dest.counters.dropped(DropReason::PortDown);
        return;
    };
    let dmem = t.mem.memory();
    let mut vs = t.vring.get_mut();
    if !vs.get_queue().ready() || !vs.is_enabled() {
        dest.counters.dropped(DropReason::PortDown);
        return;
    }
    let caps = t.caps;
    let backlog = &mut t.backlog;
    let q = vs.get_queue_mut();
    let result = match delivery(&f.hdr, &caps) {
        Delivery::PassThrough => deliver_or_queue(dest, backlog, q, &dmem, &caps, rx_header(&f.hdr, 0), f.segs, f.offset, f.len, cx),
        Delivery::CompleteChecksum => {
            let mut frame = std::mem::take(&mut cx.frame);
            frame.resize(f.len, 0);
            gather(f.segs, f.offset, &mut frame);
            let r = complete_checksum(&mut frame, f.hdr.csum_start as usize, f.hdr.csum_offset as usize).and_then(|_| {
                deliver_or_queue(dest, backlog, q, &dmem, &caps, VnetHeader::default(), &[Seg::of_slice(&frame)], 0, frame.len(), cx)
            });
            cx.frame = frame;
            r
        }
        Delivery::Segment => {
            let mut frame = std::mem::take(&mut cx.frame);
            let mut seg = std::mem::take(&mut cx.segment);
            frame.resize(f.len, 0);
            gather(f.segs, f.offset, &mut frame);
            let r = segment_tcp(&frame, &f.hdr, &mut seg, |s| {
                if let Err(e) = deliver_or_queue(dest, backlog, q, &dmem, &caps, VnetHeader::default(), &[Seg::of_slice(s)], 0, s.len(), cx)
                {
                    dest.counters.dropped(e);
                }
            });
            cx.frame = frame;
            cx.segment = seg;
            r.map(|_| ())
        }
    };
    dest.backlogged.store(!backlog.is_empty(), Ordering::Release);
    match result {
        Ok(()) => mark_notify(cx, dest.id),
        Err(e) => dest.counters.dropped(e),
    }
}

fn mark_notify(cx: &mut TxScratch, id: PortId) {
    if !cx.notify.contains(&id) {
        cx.notify.push(id);
    }
}

/// One interrupt per receiver per batch (and none when EVENT_IDX says the guest is not
/// waiting).
fn notify_receivers(ports: &[std::sync::Arc<GuestPort>], cx: &mut TxScratch) {
    for id in cx.notify.drain(..) {
        let Some(dest) = ports.get(id) else { continue };
        let target = dest.rx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = target.as_ref() {
            let mut vs = t.vring.get_mut();
            if vs.needs_notification().unwrap_or(true) {
                let _ = vs.signal_used_queue();
            }
        }
    }
}

/// Writes a virtio-net header and `len` bytes from `src` (from `src_off` on) into the
/// receiver's RX ring: one chain, or with MRG_RXBUF as many as needed (`num_buffers`).
/// On failure every chain taken is put back untouched.
#[allow(clippy::too_many_arguments)]
fn write_rx(
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    caps: &RxCaps,
    mut hdr: VnetHeader,
    src: &[Seg],
    src_off: usize,
    len: usize,
    cx: &mut TxScratch,
) -> Result<(), DropReason> {
    let need = caps.hdr_len + len;
    cx.rx_segs.clear();
    cx.rx_chains.clear();
    let mut cap = 0usize;
    let rollback = |q: &mut virtio_queue::Queue, n: usize| {
        for _ in 0..n {
            q.go_to_previous_position();
        }
    };
    while cap < need {
        // Not pop_descriptor_chain: it logs every failure, and a guest with a corrupt avail
        // index would turn each frame sent to it into a log line.
        let next = match q.iter(mem) {
            Ok(mut it) => it.next(),
            Err(_) => None,
        };
        let Some(chain) = next else {
            rollback(q, cx.rx_chains.len());
            return Err(DropReason::NoRxBuffer);
        };
        let head = chain.head_index();
        let start = cx.rx_segs.len();
        match collect_chain(chain, mem, true, usize::MAX >> 1, &mut cx.rx_segs) {
            Ok(c) => {
                cx.rx_chains.push((head, c));
                cap += c;
            }
            Err(_) if cx.rx_chains.is_empty() => {
                // A broken receive buffer is handed back empty so the guest gets it back.
                cx.rx_segs.truncate(start);
                let _ = q.add_used(mem, head, 0);
                continue;
            }
            Err(e) => {
                rollback(q, cx.rx_chains.len() + 1);
                return Err(e);
            }
        }
        if !caps.mrg_rxbuf && cap < need {
            rollback(q, 1);
            return Err(DropReason::RxBufferTooSmall);
        }
    }
    hdr.num_buffers = cx.rx_chains.len() as u16;
    let mut h = [0u8; HDR_LEN];
    hdr.write(&mut h[..caps.hdr_len]);
    copy_segs(&cx.rx_segs, 0, &[Seg::of_slice(&h[..caps.hdr_len])], 0, caps.hdr_len);
    copy_segs(&cx.rx_segs, caps.hdr_len, src, src_off, len);
    let mut left = need;
    for &(head, c) in &cx.rx_chains {
        let used = c.min(left);
        left -= used;
        let _ = q.add_used(mem, head, used as u32);
    }
    Ok(())
}

/// Milliseconds since `epoch`, the switch's clock.
pub fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_across_uneven_segments() {
        let src_a: Vec<u8> = (0..10).collect();
        let src_b: Vec<u8> = (10..25).collect();
        let mut d1 = vec![0u8; 7];
        let mut d2 = vec![0u8; 3];
        let mut d3 = vec![0u8; 20];
        let src = [Seg::of_slice(&src_a), Seg::of_slice(&src_b)];
        let dst = [Seg::of_mut(&mut d1), Seg::of_mut(&mut d2), Seg::of_mut(&mut d3)];
        copy_segs(&dst, 2, &src, 3, 20);
        let mut all = d1.clone();
        all.extend(&d2);
        all.extend(&d3);
        let want: Vec<u8> = [vec![0, 0], (3..23).collect::<Vec<u8>>(), vec![0; 8]].concat();
        assert_eq!(all, want);
        let mut out = [0u8; 30];
        assert_eq!(gather(&src, 20, &mut out), 5);
        assert_eq!(&out[..5], &[20, 21, 22, 23, 24]);
        d1.clear();
        d2.clear();
        d3.clear();
    }
}
