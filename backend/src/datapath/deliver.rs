//! Delivery: one frame into one receiver, with exactly one copy from the sender's memory.
//! A guest receiver gets it in its RX ring (or behind a bounded backlog while its ring is
//! full); a host link gets it with one `writev`, or queued for one batched send per TX batch.
//! Only a receiver that cannot take the sender's offloads makes the frame go through a
//! scratch buffer, completed or segmented in software.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vunet_switch::offload::{complete_checksum, segment_tcp};
use vunet_switch::vlan::{self, Edit, Ingress};
use vunet_switch::vnet::{delivery, rx_header, Delivery, RxCaps, VnetHeader, HDR_LEN};
use vunet_switch::{DecisionCache, DropReason, PortId};

use super::backlog::Backlog;
use super::link::HostLink;
use super::port::{Port, RxTarget, SHAPER_QUEUE_BYTES};
use super::ring::{gather, window, Seg};
use super::split::{write_rx, MemMap, RingCache, RxQueue, RxScratch};

/// Per-worker reusable buffers, so the steady state never allocates.
pub struct TxScratch {
    pub(super) tx_segs: Vec<Seg>,
    /// Each frame of a TX batch as it is delivered: its checked head (below) followed by the
    /// rest of its bytes in the sender's memory.
    pub(super) view: Vec<Seg>,
    /// The head of each frame of a TX batch (virtio-net header, Ethernet, IP, the start of
    /// L4), copied once out of the sender's memory. Port security and the MAC table decide
    /// on these bytes, and these bytes are what receivers get: a guest rewriting its TX
    /// buffer after the check changes nothing. TX_BATCH of them, boxed, never resized: batched
    /// sends point into it until the batch ends (a burst takes it out meanwhile, so switching
    /// reads a frame's head in place, beside the rest of the scratch).
    pub(super) heads: Box<[[u8; HEAD_LEN]]>,
    pub(super) rx: RxScratch,
    frame: Vec<u8>,
    segment: Vec<u8>,
    pub(super) gw_in: Vec<u8>,
    pub(super) gw_out: Vec<u8>,
    /// Receivers (port, queue pair) that got frames in this batch, to interrupt once.
    notify: Vec<(PortId, usize)>,
    /// Multi-queue receivers met in this TX batch and a mask of their running queue pairs
    /// (`pick_pair`); emptied when the batch ends.
    pub(super) running: Vec<(PortId, u8)>,
    /// The latest unicast decisions of the network's MAC table, for frames of one
    /// conversation to pass without its lock.
    pub(super) decisions: DecisionCache,
    /// Frames for uplinks gathered during a TX batch, sent with one `sendmmsg` per uplink
    /// when the batch ends (they still point into the sender's guest memory, so the batch's
    /// TX buffers are returned to the guest only after that).
    link_sends: Vec<LinkSend>,
    link_segs: Vec<Seg>,
    /// Frames for guest receivers gathered during a TX batch, written when the batch ends:
    /// each receiver's ring is locked, read and published once for all the frames it gets
    /// (they point into the sender's memory like `link_sends`).
    guest_sends: Vec<GuestSend>,
    guest_segs: Vec<Seg>,
    /// The bytes of those frames.
    guest_bytes: usize,
    /// The pieces of a frame whose VLAN tag is inserted, stripped or rewritten for one
    /// receiver: its new head, then the rest of the sender's bytes.
    retag: Vec<Seg>,
    pub(super) batching: bool,
    /// Frames and bytes taken from the sender during a TX batch, counted when it ends.
    pub(super) received: (u64, u64),
    /// Set by the shaper thread: these frames already waited for their port's inbound limit.
    pub(super) shaped: bool,
}

/// The bytes of a frame's head that are checked and delivered from one copy.
pub const HEAD_LEN: usize = HDR_LEN + vunet_switch::port_security::HEADER_BYTES;

/// Frames taken from a TX ring per round before the used ring is published and receivers are
/// notified. Bounds the latency one busy sender adds to the others.
pub const TX_BATCH: usize = 128;

impl Default for TxScratch {
    fn default() -> Self {
        TxScratch {
            tx_segs: Vec::new(),
            view: Vec::new(),
            heads: vec![[0; HEAD_LEN]; TX_BATCH].into_boxed_slice(),
            rx: RxScratch::default(),
            frame: Vec::new(),
            segment: Vec::new(),
            gw_in: Vec::new(),
            gw_out: Vec::new(),
            notify: Vec::new(),
            running: Vec::new(),
            decisions: DecisionCache::default(),
            link_sends: Vec::new(),
            link_segs: Vec::new(),
            guest_sends: Vec::new(),
            guest_segs: Vec::new(),
            guest_bytes: 0,
            retag: Vec::new(),
            batching: false,
            received: (0, 0),
            shaped: false,
        }
    }
}

/// One frame waiting in the TX batch for its uplink.
struct LinkSend {
    port: PortId,
    len: usize,
    hdr: [u8; HDR_LEN],
    hdr_len: usize,
    segs: std::ops::Range<usize>,
}

/// Frames gathered for guest receivers before they are written (`flush_guests`): DPDK's
/// burst size.
const GUEST_BURST: usize = 32;
/// Bytes gathered for guest receivers before they are written: a large frame's copy costs far
/// more than the ring updates a burst saves, and its receiver should start on it at once.
const GUEST_BURST_BYTES: usize = 32 * 1024;

impl TxScratch {
    /// Whether the frames gathered for guest receivers make a burst.
    pub(super) fn guest_burst_full(&self) -> bool {
        self.guest_sends.len() >= GUEST_BURST || self.guest_bytes >= GUEST_BURST_BYTES
    }
}

/// One frame waiting in the TX batch for a guest receiver's queue pair.
struct GuestSend {
    port: PortId,
    pair: usize,
    hdr: VnetHeader,
    len: usize,
    segs: std::ops::Range<usize>,
}

impl GuestSend {
    fn frame<'a>(&self, segs: &'a [Seg]) -> TxFrame<'a> {
        TxFrame { segs: &segs[self.segs.clone()], offset: 0, len: self.len, hdr: self.hdr, vlan: Ingress::default() }
    }
}

/// Writes as much of the backlog as the receiver's ring takes. Returns true if it emptied.
fn flush_backlog(dest: &Port, backlog: &mut Backlog, rxq: &mut RxQueue, cx: &mut TxScratch) -> bool {
    while let Some((h, data)) = backlog.frames.front() {
        match write_rx(rxq, *h, &[Seg::of_slice(data)], 0, data.len(), &mut cx.rx) {
            Ok(()) => dest.counters.delivered(data.len()),
            Err(DropReason::NoRxBuffer) => {
                backlog.stalled = std::mem::take(&mut rxq.maze);
                return false;
            }
            Err(e) => dest.counters.dropped(e),
        }
        backlog.pop_front();
    }
    true
}

/// Called when the receiving guest posts buffers (its RX kick): drain what waited for them.
pub fn flush_pending(port: &Port, pair: usize, cx: &mut TxScratch) {
    let Some(slot) = port.queues.get(pair) else { return };
    if !slot.backlogged.load(Ordering::Acquire) {
        return;
    }
    let mut target = slot.rx.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = target.as_mut() else { return };
    if t.backlog.is_empty() {
        return;
    }
    let dmem = t.mem.memory();
    let mut vs = t.vring.get_mut();
    if !vs.get_queue().ready() || !vs.is_enabled() {
        return;
    }
    let Some((regions, ring)) = RingCache::get(&mut t.cache, &dmem, vs.get_queue()) else { return };
    let mut rxq = RxQueue::new(vs.get_queue_mut(), ring, MemMap::with(regions, &dmem), t.caps, port.dirty_logging());
    // The guest kicked: it posted buffers; look at its ring again.
    t.backlog.stalled = false;
    let mut moved = false;
    for _ in 0..4 {
        let before = t.backlog.frames.len();
        let done = flush_backlog(port, &mut t.backlog, &mut rxq, cx);
        moved |= t.backlog.frames.len() != before;
        if done {
            // Nothing waits any more: no kicks needed until the ring is full again.
            let _ = rxq.q.disable_notification(&*dmem);
            break;
        }
        // Still waiting: ask for a kick when more buffers come; if some came meanwhile, retry.
        if !rxq.q.enable_notification(&*dmem).unwrap_or(false) {
            break;
        }
    }
    slot.backlogged.store(!t.backlog.is_empty(), Ordering::Release);
    drop(rxq);
    drop(vs);
    if moved {
        signal_if_wanted(t);
    }
}

/// Delivers `len` bytes from `src` with header `hdr` into a receiver: straight into its ring
/// (true: the caller counts it), or behind frames already waiting in its backlog, or into the
/// backlog if the ring is full (false: counted when the backlog is flushed).
#[allow(clippy::too_many_arguments)]
fn deliver_or_queue(
    dest: &Port,
    backlogged: &AtomicBool,
    backlog: &mut Backlog,
    rxq: &mut RxQueue,
    hdr: VnetHeader,
    src: &[Seg],
    off: usize,
    len: usize,
    cx: &mut TxScratch,
) -> Result<bool, DropReason> {
    if backlog.stalled || (!backlog.is_empty() && !flush_backlog(dest, backlog, rxq, cx)) {
        return backlog.push(hdr, src, off, len).map(|()| false);
    }
    match write_rx(rxq, hdr, src, off, len, &mut cx.rx) {
        Err(DropReason::NoRxBuffer) => {
            backlog.stalled = std::mem::take(&mut rxq.maze);
            backlog.push(hdr, src, off, len)?;
            // Publish "something waits" before asking for the kick, so the kick's handler
            // cannot miss it.
            backlogged.store(true, Ordering::SeqCst);
            // Ask the guest to kick when it posts buffers; if it already did, flush now.
            if rxq.q.enable_notification(rxq.map.mem()).unwrap_or(false) {
                flush_backlog(dest, backlog, rxq, cx);
            }
            Ok(false)
        }
        r => r.map(|()| true),
    }
}

/// A frame from a TX chain, validated, still in the sender's memory.
pub(super) struct TxFrame<'a> {
    pub(super) segs: &'a [Seg],
    /// Offset of the Ethernet header within `segs` (the sender's virtio-net header length).
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) hdr: VnetHeader,
    /// Its VLAN, and whether bytes 12..16 are the tag that gave it (see `vlan::Ingress`).
    pub(super) vlan: Ingress,
}

/// Hands a frame made by vunet itself (a gateway answer from another thread, such as an
/// upstream DNS answer) to a port, and interrupts its guest if it wants that.
pub fn deliver_made(port: &Port, hdr: &VnetHeader, frame: &[u8], cx: &mut TxScratch) {
    let f = TxFrame { segs: &[Seg::of_slice(frame)], offset: 0, len: frame.len(), hdr: *hdr, vlan: Ingress::default() };
    deliver(port, &f, cx);
    for (_, pair) in cx.notify.drain(..) {
        if let Some(t) = port.queues[pair].rx.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            signal_if_wanted(t);
        }
    }
}

/// Copies a frame for the port's captures (only while somebody captures).
pub(super) fn capture(port: &Port, f: &TxFrame, cx: &mut TxScratch) {
    let mut frame = std::mem::take(&mut cx.frame);
    frame.resize(f.len, 0);
    gather(f.segs, f.offset, &mut frame);
    port.capture(&frame);
    cx.frame = frame;
}

/// Most iovecs one frame is written with; a frame in more pieces is gathered first.
const MAX_IOV: usize = 64;

/// Sends `len` bytes of `src` from `off` on, behind a vnet header when the uplink takes one.
fn send_link(
    up: &dyn HostLink,
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
    for piece in window(src, off, len) {
        if n == MAX_IOV {
            // Too many pieces: one contiguous copy instead.
            gathered.resize(len, 0);
            gather(src, off, gathered);
            n = caps.hdr_len.min(1);
            iov[n] = libc::iovec { iov_base: gathered.as_mut_ptr().cast(), iov_len: len };
            return up.send(&iov[..n + 1]);
        }
        iov[n] = libc::iovec { iov_base: piece.ptr.cast(), iov_len: piece.len };
        n += 1;
    }
    up.send(&iov[..n])
}

/// Adds a frame to the batch's uplink sends: its header, and its bytes as segments of the
/// sender's memory (no copy).
fn queue_link(port: PortId, caps: &RxCaps, hdr: &VnetHeader, src: &[Seg], off: usize, len: usize, cx: &mut TxScratch) {
    let mut h = [0u8; HDR_LEN];
    hdr.write(&mut h[..caps.hdr_len]);
    let start = cx.link_segs.len();
    // The pieces stay live until the batch is flushed.
    cx.link_segs.extend(window(src, off, len));
    cx.link_sends.push(LinkSend { port, len, hdr: h, hdr_len: caps.hdr_len, segs: start..cx.link_segs.len() });
}

/// Sends a link's queued frames (`sends`, all for `dest`, in order) with one batched send,
/// and counts them.
fn send_queued(dest: &Port, up: &dyn HostLink, sends: &mut [LinkSend], segs: &[Seg]) {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(segs.len() + 2 * sends.len());
    let mut spans = Vec::with_capacity(sends.len());
    for s in sends.iter_mut() {
        let start = iov.len();
        if s.hdr_len > 0 {
            iov.push(libc::iovec { iov_base: s.hdr.as_mut_ptr().cast(), iov_len: s.hdr_len });
        }
        for seg in &segs[s.segs.clone()] {
            iov.push(libc::iovec { iov_base: seg.ptr.cast(), iov_len: seg.len });
        }
        spans.push(start..iov.len());
    }
    let failed = up.send_batch(&mut iov, &spans);
    for (k, s) in sends.iter().enumerate() {
        match failed.iter().find(|(at, _)| *at == k) {
            Some(&(_, e)) => dest.counters.dropped(e),
            None => dest.counters.delivered(s.len),
        }
    }
}

/// Sends the batch's link frames: one batched send (`sendmmsg`) per link for all of its
/// frames, in the order they were queued.
pub(super) fn flush_links(ports: &[Arc<Port>], cx: &mut TxScratch) {
    if cx.link_sends.is_empty() {
        return;
    }
    let mut sends = std::mem::take(&mut cx.link_sends);
    // Stable: each link's frames keep their order.
    sends.sort_by_key(|s| s.port);
    for group in sends.chunk_by_mut(|a, b| a.port == b.port) {
        if let Some(dest) = ports.get(group[0].port) {
            if let Some(up) = dest.link.as_deref() {
                send_queued(dest, up, group, &cx.link_segs);
            }
        }
    }
    sends.clear();
    cx.link_sends = sends;
    cx.link_segs.clear();
}

/// Sends now what waits in the batch for `dest`: a frame about to go to it outside the batch
/// (one that needs a fix-up, or a routed frame) must not overtake them.
fn flush_link(dest: &Port, up: &dyn HostLink, cx: &mut TxScratch) {
    if !cx.link_sends.iter().any(|s| s.port == dest.id) {
        return;
    }
    let mut sends = std::mem::take(&mut cx.link_sends);
    // Stable: `dest`'s frames to the front, in their order; the others keep theirs.
    sends.sort_by_key(|s| s.port != dest.id);
    let n = sends.iter().take_while(|s| s.port == dest.id).count();
    send_queued(dest, up, &mut sends[..n], &cx.link_segs);
    sends.drain(..n);
    cx.link_sends = sends;
}

/// Delivers a frame to an uplink: offloads pass to the kernel with the vnet header; without
/// one, checksums are completed and TSO frames segmented here.
fn deliver_link(dest: &Port, up: &dyn HostLink, f: &TxFrame, cx: &mut TxScratch) {
    let Some(caps) = up.caps() else {
        dest.counters.dropped(DropReason::PortDown);
        return;
    };
    let how = delivery(&f.hdr, &caps);
    if how == Delivery::PassThrough && cx.batching && up.batches() {
        // Counted when the batch is sent.
        queue_link(dest.id, &caps, &rx_header(&f.hdr, 0), f.segs, f.offset, f.len, cx);
        return;
    }
    flush_link(dest, up, cx);
    let mut frame = std::mem::take(&mut cx.frame);
    let mut seg = std::mem::take(&mut cx.segment);
    let result = match how {
        Delivery::PassThrough => send_link(up, &caps, &rx_header(&f.hdr, 0), f.segs, f.offset, f.len, &mut frame).map(|()| f.len),
        Delivery::CompleteChecksum => {
            frame.resize(f.len, 0);
            gather(f.segs, f.offset, &mut frame);
            complete_checksum(&mut frame, f.hdr.csum_start as usize, f.hdr.csum_offset as usize)
                .and_then(|_| send_link(up, &caps, &VnetHeader::default(), &[Seg::of_slice(&frame)], 0, frame.len(), &mut Vec::new()))
                .map(|()| f.len)
        }
        Delivery::Segment => {
            frame.resize(f.len, 0);
            gather(f.segs, f.offset, &mut frame);
            // Each segment is a frame on the link, counted as one (as for a guest receiver).
            segment_tcp(&frame, &f.hdr, &mut seg, |s| {
                match send_link(up, &caps, &VnetHeader::default(), &[Seg::of_slice(s)], 0, s.len(), &mut Vec::new()) {
                    Ok(()) => dest.counters.delivered(s.len()),
                    Err(e) => dest.counters.dropped(e),
                }
            })
            .map(|_| 0)
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
/// it (not connected, ring and backlog full, buffers too small). A port that does not carry
/// the frame's VLAN never gets it; one that wants it tagged differently gets it retagged.
pub(super) fn deliver(dest: &Port, f: &TxFrame, cx: &mut TxScratch) {
    let Some(out) = dest.vlan.egress(f.vlan.vlan) else { return };
    match vlan::edit(f.vlan, out) {
        Edit::Keep => deliver_as_is(dest, f, cx),
        e => deliver_retagged(dest, f, e, cx),
    }
}

/// Delivers a frame with its tag inserted, stripped or rewritten: a new head of at most 16
/// bytes in front of the rest of the sender's bytes (no copy of the payload), and the
/// virtio-net header's offsets moved with the data.
fn deliver_retagged(dest: &Port, f: &TxFrame, e: Edit, cx: &mut TxScratch) {
    let mut first = [0u8; 16];
    let got = gather(f.segs, f.offset, &mut first[..16.min(f.len)]);
    let mut head = [0u8; 16];
    let Some((n, rest)) = vlan::retag_head(&first[..got], e, &mut head) else {
        dest.counters.dropped(DropReason::BadVlanTag);
        return;
    };
    let Some(hdr) = vlan::shift_header(&f.hdr, e.delta()) else {
        dest.counters.dropped(DropReason::BadHeader);
        return;
    };
    let mut segs = std::mem::take(&mut cx.retag);
    segs.clear();
    segs.push(Seg::of_slice(&head[..n]));
    segs.extend(window(f.segs, f.offset + rest, f.len - rest));
    let tagged = !matches!(e, Edit::Strip);
    let g = TxFrame { segs: &segs, offset: 0, len: n + f.len - rest, hdr, vlan: Ingress { vlan: f.vlan.vlan, tagged } };
    // The new head lives on this stack frame: nothing may keep pointing at it (a batched
    // link send would), so this frame is sent now.
    let batching = std::mem::replace(&mut cx.batching, false);
    deliver_as_is(dest, &g, cx);
    cx.batching = batching;
    segs.clear();
    cx.retag = segs;
}

fn deliver_as_is(dest: &Port, f: &TxFrame, cx: &mut TxScratch) {
    if let Some(shaper) = dest.rx_limit.as_ref().filter(|_| !cx.shaped) {
        let mut sh = shaper.lock().unwrap_or_else(|e| e.into_inner());
        let now = sh.now_ns();
        // In order: while frames wait, a new one waits behind them.
        if !(sh.queue.is_empty() && sh.bucket.take(f.len, now).is_ok()) {
            if sh.queued_bytes + f.len > SHAPER_QUEUE_BYTES {
                dest.counters.dropped(DropReason::RateLimited);
                return;
            }
            let mut frame = vec![0u8; f.len];
            gather(f.segs, f.offset, &mut frame);
            sh.queued_bytes += f.len;
            sh.queue.push_back((f.hdr, frame));
            if sh.queue.len() == 1 {
                sh.wake.notify();
            }
            return;
        }
    }
    if dest.capturing.load(Ordering::Relaxed) {
        capture(dest, f, cx);
    }
    if let Some(up) = dest.link.as_deref() {
        deliver_link(dest, up, f, cx);
        return;
    }
    if !dest.connected.load(Ordering::Relaxed) {
        dest.counters.dropped(DropReason::PortDown);
        return;
    }
    let pair = pick_pair(dest, f, cx);
    if cx.batching {
        // Written with the batch's other frames for this receiver when the batch ends.
        let start = cx.guest_segs.len();
        cx.guest_segs.extend(window(f.segs, f.offset, f.len));
        cx.guest_sends.push(GuestSend { port: dest.id, pair, hdr: f.hdr, len: f.len, segs: start..cx.guest_segs.len() });
        cx.guest_bytes += f.len;
        return;
    }
    // Frames the batch holds for this receiver go first.
    flush_guest(dest, cx);
    write_guest(dest, pair, std::iter::once(TxFrame { segs: f.segs, offset: f.offset, len: f.len, hdr: f.hdr, vlan: f.vlan }), cx);
}

/// Writes frames into one receiver's queue pair under one hold of its lock: its memory, ring
/// translation and avail index are looked up once, and its used index published once.
fn write_guest<'f>(dest: &Port, pair: usize, frames: impl ExactSizeIterator<Item = TxFrame<'f>>, cx: &mut TxScratch) {
    let slot = &dest.queues[pair];
    let mut target = slot.rx.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = target.as_mut() else {
        frames.for_each(|_| dest.counters.dropped(DropReason::PortDown));
        return;
    };
    let dmem = t.mem.memory();
    let mut vs = t.vring.get_mut();
    if !vs.get_queue().ready() || !vs.is_enabled() {
        frames.for_each(|_| dest.counters.dropped(DropReason::PortDown));
        return;
    }
    let caps = t.caps;
    let Some((regions, ring)) = RingCache::get(&mut t.cache, &dmem, vs.get_queue()) else {
        frames.for_each(|_| dest.counters.dropped(DropReason::BadAddress));
        return;
    };
    let rxq = &mut RxQueue::new(vs.get_queue_mut(), ring, MemMap::with(regions, &dmem), caps, dest.dirty_logging());
    if frames.len() > 1 && t.backlog.is_empty() {
        rxq.prefetch(frames.len());
    }
    let backlog = &mut t.backlog;
    // Where the used ring stood: frames of the backlog written ahead of a new one, and broken
    // chains handed back, are used entries too, and want their interrupt even if every new
    // frame failed.
    let used_before = rxq.q.next_used();
    // Frames (and bytes) that reached the ring now, counted once for the burst.
    let (mut written, mut frames_in, mut bytes_in) = (0, 0u64, 0u64);
    for f in frames {
        let mut count = |r: Result<bool, DropReason>, len: usize| {
            if r == Ok(true) {
                frames_in += 1;
                bytes_in += len as u64;
            }
            r.map(|_| ())
        };
        let result = match delivery(&f.hdr, &caps) {
            Delivery::PassThrough => {
                count(deliver_or_queue(dest, &slot.backlogged, backlog, rxq, rx_header(&f.hdr, 0), f.segs, f.offset, f.len, cx), f.len)
            }
            Delivery::CompleteChecksum => {
                let mut frame = std::mem::take(&mut cx.frame);
                frame.resize(f.len, 0);
                gather(f.segs, f.offset, &mut frame);
                let r = complete_checksum(&mut frame, f.hdr.csum_start as usize, f.hdr.csum_offset as usize).and_then(|_| {
                    count(
                        deliver_or_queue(
                            dest,
                            &slot.backlogged,
                            backlog,
                            rxq,
                            VnetHeader::default(),
                            &[Seg::of_slice(&frame)],
                            0,
                            frame.len(),
                            cx,
                        ),
                        frame.len(),
                    )
                });
                cx.frame = frame;
                r
            }
            Delivery::Segment => {
                let mut frame = std::mem::take(&mut cx.frame);
                let mut seg = std::mem::take(&mut cx.segment);
                frame.resize(f.len, 0);
                gather(f.segs, f.offset, &mut frame);
                // Each segment is a frame for the receiver, counted as one.
                let r = segment_tcp(&frame, &f.hdr, &mut seg, |s| {
                    let r =
                        deliver_or_queue(dest, &slot.backlogged, backlog, rxq, VnetHeader::default(), &[Seg::of_slice(s)], 0, s.len(), cx);
                    if let Err(e) = count(r, s.len()) {
                        dest.counters.dropped(e);
                    }
                });
                cx.frame = frame;
                cx.segment = seg;
                r.map(|_| ())
            }
        };
        match result {
            Ok(()) => written += 1,
            Err(e) => dest.counters.dropped(e),
        }
    }
    dest.counters.delivered_many(frames_in, bytes_in);
    // One used-index store for every frame written above.
    rxq.publish();
    slot.backlogged.store(!backlog.is_empty(), Ordering::Release);
    if written > 0 {
        slot.to_guest.fetch_add(written, Ordering::Relaxed);
    }
    if written > 0 || rxq.q.next_used() != used_before {
        mark_notify(cx, dest.id, pair);
    }
}

/// Writes the frames the TX batch gathered for guest receivers: one `write_guest` per
/// receiver queue pair, each pair's frames in the order they came.
pub(super) fn flush_guests(ports: &[Arc<Port>], cx: &mut TxScratch) {
    if cx.guest_sends.is_empty() {
        return;
    }
    let mut sends = std::mem::take(&mut cx.guest_sends);
    let mut segs = std::mem::take(&mut cx.guest_segs);
    // Stable: each pair's frames keep their order. A burst mostly goes to one receiver:
    // already in order then, which one pass tells.
    if !sends.is_sorted_by_key(|s| (s.port, s.pair)) {
        sends.sort_by_key(|s| (s.port, s.pair));
    }
    for group in sends.chunk_by(|a, b| (a.port, a.pair) == (b.port, b.pair)) {
        if let Some(dest) = ports.get(group[0].port) {
            write_guest(dest, group[0].pair, group.iter().map(|s| s.frame(&segs)), cx);
        }
    }
    sends.clear();
    segs.clear();
    cx.guest_sends = sends;
    cx.guest_segs = segs;
    cx.guest_bytes = 0;
}

/// Writes now what the batch holds for `dest`: a frame about to go to it outside the batch (a
/// gateway answer, a routed or retagged frame) must not overtake them.
fn flush_guest(dest: &Port, cx: &mut TxScratch) {
    if !cx.guest_sends.iter().any(|s| s.port == dest.id) {
        return;
    }
    let mut sends = std::mem::take(&mut cx.guest_sends);
    let segs = std::mem::take(&mut cx.guest_segs);
    // Stable: `dest`'s frames to the front by pair, in their order; the others keep theirs.
    sends.sort_by_key(|s| (s.port != dest.id, s.pair));
    let n = sends.iter().take_while(|s| s.port == dest.id).count();
    for group in sends[..n].chunk_by(|a, b| a.pair == b.pair) {
        write_guest(dest, group[0].pair, group.iter().map(|s| s.frame(&segs)), cx);
    }
    sends.drain(..n);
    cx.guest_bytes = sends.iter().map(|s| s.len).sum();
    cx.guest_sends = sends;
    cx.guest_segs = segs;
}

fn mark_notify(cx: &mut TxScratch, id: PortId, pair: usize) {
    if !cx.notify.contains(&(id, pair)) {
        cx.notify.push((id, pair));
    }
}

/// The queue pair a frame goes to on a guest with several: by a hash of its flow (addresses
/// and ports), so one TCP or UDP flow stays on one queue; the next running pair if that one is
/// not (the guest enabled fewer pairs than it has).
fn pick_pair(dest: &Port, f: &TxFrame, cx: &mut TxScratch) -> usize {
    let n = dest.queues.len();
    if n == 1 {
        return 0;
    }
    let mut head = [0u8; 14 + 40 + 4];
    let got = gather(f.segs, f.offset, &mut head);
    // The hash scaled to 0..n (no division per frame).
    let first = ((flow_hash(&head[..got]) as u64 * n as u64) >> 32) as usize;
    // Which pairs run is asked once per receiver per TX batch (each ask takes two locks); a
    // pair stopped meanwhile drops what the batch sends it (`write_guest`), as it would have.
    let running = match cx.running.iter().find(|(id, _)| *id == dest.id) {
        Some(&(_, mask)) => mask,
        None => {
            let mask = running_pairs(dest);
            if cx.batching {
                cx.running.push((dest.id, mask));
            }
            mask
        }
    };
    (0..n).map(|k| if first + k < n { first + k } else { first + k - n }).find(|&pair| running & (1 << pair) != 0).unwrap_or(0)
}

/// A mask of `dest`'s queue pairs whose RX queue the guest has set up and enabled.
fn running_pairs(dest: &Port) -> u8 {
    let mut mask = 0u8;
    for (pair, q) in dest.queues.iter().enumerate().take(8) {
        let running = q.rx.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|t| {
            let vs = t.vring.get_ref();
            vs.get_queue().ready() && vs.is_enabled()
        });
        mask |= (running as u8) << pair;
    }
    mask
}

/// A hash of a frame's flow: IPv4 or IPv6 addresses with TCP/UDP ports, else the MACs.
fn flow_hash(frame: &[u8]) -> u32 {
    let fnv = |data: &[u8], mut h: u32| {
        for &b in data {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        h
    };
    // FNV-1a's low bits follow the inputs' low bits; the queue is chosen by the low bits, so
    // the sum is mixed (murmur3's finalizer) first.
    let mix = |mut h: u32| {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    };
    let h = 0x811c_9dc5;
    if frame.len() < 14 {
        return mix(fnv(frame, h));
    }
    let ports = |at: usize| frame.get(at..at + 4).unwrap_or(&[]);
    match (u16::from_be_bytes([frame[12], frame[13]]), frame.get(14).map(|v| v >> 4)) {
        (0x0800, Some(4)) if frame.len() >= 34 => {
            let ihl = (frame[14] & 0x0f) as usize * 4;
            let l4 = if matches!(frame[23], 6 | 17) { ports(14 + ihl) } else { &[] };
            mix(fnv(l4, fnv(&frame[26..34], h)))
        }
        (0x86dd, Some(6)) if frame.len() >= 54 => {
            let l4 = if matches!(frame[20], 6 | 17) { ports(54) } else { &[] };
            mix(fnv(l4, fnv(&frame[22..54], h)))
        }
        _ => mix(fnv(&frame[0..12], h)),
    }
}

/// One interrupt per receiver per batch (and none when EVENT_IDX says the guest is not
/// waiting).
pub(super) fn notify_receivers(ports: &[Arc<Port>], cx: &mut TxScratch) {
    for (id, pair) in cx.notify.drain(..) {
        let Some(slot) = ports.get(id).and_then(|p| p.queues.get(pair)) else { continue };
        if let Some(t) = slot.rx.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            signal_if_wanted(t);
        }
    }
}

/// Interrupts the guest behind `t` if it asked to hear about the used entries added since the
/// last time anyone looked (EVENT_IDX's window, or NO_INTERRUPT without it). Also called when
/// the VMM stops the ring (device.rs): senders publish a batch under the receiver's lock and
/// signal after the whole burst, under it again, and a stop in between would leave the
/// guest's last frames without their interrupt.
pub fn signal_if_wanted(t: &mut RxTarget) {
    let dmem = t.mem.memory();
    let vs = t.vring.get_mut();
    let q = vs.get_queue();
    let new = q.next_used();
    if let Some((_, ring)) = RingCache::get(&mut t.cache, &dmem, q) {
        if ring.wants_interrupt(q.event_idx_enabled(), t.signalled, new) {
            let _ = vs.signal_used_queue();
        }
    }
    t.signalled = new;
}

/// The shaper thread of a network with inbound rate limits: releases queued frames at their
/// ports' rates until the network stops.
pub fn run_shaper(net: Arc<super::network::Network>) {
    let mut cx = TxScratch::default();
    while !net.stopped.load(Ordering::Acquire) {
        let ports = net.ports.snapshot();
        let next = release_shaped(&ports, &mut cx);
        drop(ports);
        // Sleep until the next frame may go, or a queue fills, or a second passes (to see
        // `stopped`).
        net.shaper.wait(std::time::Duration::from_nanos(next.unwrap_or(1_000_000_000)));
    }
}

/// Releases the frames rate-limited ports' inbound queues hold, as their buckets allow;
/// returns how long until the next one may go (None: nothing waits).
pub fn release_shaped(ports: &[Arc<Port>], cx: &mut TxScratch) -> Option<u64> {
    let mut next: Option<u64> = None;
    cx.shaped = true;
    for port in ports.iter().filter(|p| p.rx_limit.is_some()) {
        let Some(shaper) = port.rx_limit.as_ref() else { continue };
        loop {
            let (hdr, frame) = {
                let mut sh = shaper.lock().unwrap_or_else(|e| e.into_inner());
                let now = sh.now_ns();
                let Some(len) = sh.queue.front().map(|(_, f)| f.len()) else { break };
                if let Err(wait) = sh.bucket.take(len, now) {
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                    break;
                }
                sh.queued_bytes -= len;
                sh.queue.pop_front().expect("front")
            };
            // Already tagged for this port: straight to its ring.
            let f = TxFrame { segs: &[Seg::of_slice(&frame)], offset: 0, len: frame.len(), hdr, vlan: Ingress { vlan: 0, tagged: false } };
            deliver_as_is(port, &f, cx);
        }
    }
    cx.shaped = false;
    notify_receivers(ports, cx);
    next
}
