//! The switching step: frames leave a guest's TX ring (or come from a host link) and are
//! validated, checked against port security, learned, and switched: to one port, flooded, to
//! the router of a nat or route network, or to the gateway's services.
//!
//! Locks: a sender holds its own TX vring and takes one receiver's RX lock at a time, so two
//! guests sending to each other never wait on each other in a cycle.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vunet_switch::gateway::is_ipv6_multicast;
use vunet_switch::offload::complete_checksum;
use vunet_switch::port_security;
use vunet_switch::router::{Emit, Side, Verdict};
use vunet_switch::vlan::{self, Ingress};
use vunet_switch::vnet::VnetHeader;
use vunet_switch::{dst_mac, is_multicast, src_mac, Decision, DropReason, Flow, MAX_FRAME_LEN, MIN_FRAME_LEN};

use super::deliver::{capture, deliver, flush_guests, flush_links, notify_receivers, TxFrame, TxScratch, HEAD_LEN, TX_BATCH};
use super::network::Network;
use super::port::Port;
use super::ring::{copy_segs, gather, push_tail, Mem, Seg, Vring};
use super::service::{GatewayCx, Handled};
use super::split::{walk_chain, MemMap, Ring, MAX_FRAME_DESCS, PREFETCH_MAX};

/// Drains `port`'s TX ring `vring` on its own worker: validate, switch, deliver; then looks a
/// while for more and sleeps until the next kick. Returns how many frames it took. Used for
/// ports with an outbound rate limit (their waits are slept here, holding up no other port)
/// and by tests; the others are served by the network's workers (`workers.rs`).
pub fn process_tx(net: &Network, port: &Port, vring: &Vring, mem: &Mem, hdr_len: usize, event_idx: bool, cx: &mut TxScratch) -> usize {
    let mut taken = 0;
    let map = MemMap::new(mem);
    loop {
        let (n, burst) = tx_burst(net, port, vring, &map, hdr_len, event_idx, cx);
        taken += n;
        let (ring, next) = match burst {
            TxBurst::Stopped => return taken,
            TxBurst::More => continue,
            TxBurst::Throttled(wait) => {
                // Over the outbound limit: the guest's frames wait in its ring (it stops when
                // the ring fills: backpressure, nothing dropped) until the bucket has paid its
                // debt. Slept here, on this port's own worker, without the ring's lock.
                std::thread::sleep(std::time::Duration::from_nanos(wait.min(50_000_000)));
                continue;
            }
            TxBurst::Empty { ring, next } => (ring, next),
        };
        // Empty: look a while before sleeping (`Look::after`).
        if Look::after(net, taken).watch(&[(ring, next)], || false) {
            continue;
        }
        // Ask for kicks again, and look once more, for what came meanwhile.
        if arm_tx(vring) {
            continue;
        }
        return taken;
    }
}

/// What a TX burst left behind.
pub enum TxBurst {
    /// The ring is empty: `ring` as translated for the burst, `next` the avail index the
    /// next frame will have (for a look at the ring without its lock).
    Empty { ring: Ring, next: u16 },
    /// A whole burst was taken: more may wait.
    More,
    /// The port's outbound limit stopped the burst: its bucket is in debt this many ns.
    Throttled(u64),
    /// The ring is not running (stopped, reset, or not in guest memory): leave it.
    Stopped,
}

/// Asks the guest for kicks on `vring` again (EVENT_IDX's avail event, or clearing
/// NO_NOTIFY) and looks once more: true if frames came meanwhile (serve them: no kick comes).
pub fn arm_tx(vring: &Vring) -> bool {
    let mut vs = vring.get_mut();
    if !vs.get_queue().ready() || !vs.is_enabled() {
        return false;
    }
    vs.enable_notification().unwrap_or(false)
}

/// Takes up to a burst (TX_BATCH) of frames from `port`'s TX ring `vring`: validate, switch,
/// deliver, return the buffers with one used-index store. Kicks stay off meanwhile; returns
/// how many frames it took and what is left.
pub fn tx_burst(
    net: &Network,
    port: &Port,
    vring: &Vring,
    map: &MemMap,
    hdr_len: usize,
    event_idx: bool,
    cx: &mut TxScratch,
) -> (usize, TxBurst) {
    // The ports as they are for this burst: a port added meanwhile is seen by the next.
    let ports = net.ports.snapshot();
    let mut vs = vring.get_mut();
    if !vs.get_queue().ready() || !vs.is_enabled() {
        return (0, TxBurst::Stopped);
    }
    let now = net.now_ms();
    let Some(ring) = Ring::new(vs.get_queue(), map) else {
        // The guest's rings are not in its memory: leave them alone until it sets them up.
        port.counters.dropped(DropReason::BadAddress);
        return (0, TxBurst::Stopped);
    };
    // No kicks while this worker drains the ring: the guest posts without a syscall meanwhile.
    ring.suppress_kicks(map, vs.get_queue().event_idx_enabled(), port.dirty_logging());
    // One read of the guest's avail index per burst, not one per frame: that cache line
    // is the one the guest keeps writing.
    let (next, used) = (vs.get_queue().next_avail(), vs.get_queue().next_used());
    let posted = ring.avail_idx().wrapping_sub(next);
    if posted > ring.size {
        // An avail index more than a ring ahead: the guest's ring is corrupt. Leave it
        // alone; the guest's reset will set it up again.
        port.counters.dropped(DropReason::BadDescriptor);
        return (0, TxBurst::Stopped);
    }
    let mut n = (posted as usize).min(TX_BATCH);
    // Prefetching pays when misses can overlap: a lone frame is walked right away.
    let prefetching = n > 1;
    if prefetching {
        // The used elements this burst will write at its end, asked for now (for writing).
        ring.prefetch_used(used, n);
    }
    let mut chains = [0u16; TX_BATCH];
    // Out of the scratch for the burst (the frames' checked heads, which receivers are handed
    // until the batch is flushed), back once it is.
    let mut heads = std::mem::take(&mut cx.heads);
    // Set when the port's outbound limit stops the burst: the rest waits in the ring.
    let mut throttled = None;
    cx.batching = true;
    for (i, head) in chains.iter_mut().enumerate().take(n) {
        if prefetching && i % PREFETCH_MAX == 0 {
            let upto = n.min(i + PREFETCH_MAX);
            ring.prefetch(map, (i..upto).map(|j| ring.avail_entry(next.wrapping_add(j as u16))), false);
        }
        *head = ring.avail_entry(next.wrapping_add(i as u16));
        cx.tx_segs.clear();
        let mut budget = MAX_FRAME_DESCS;
        match walk_chain(&ring, map, *head, false, hdr_len + MAX_FRAME_LEN, &mut budget, &mut cx.tx_segs) {
            Ok(total)
                if port.tx_limit.as_ref().is_some_and(|l| {
                    let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                    match l.take(total.saturating_sub(hdr_len), net.now_ns()) {
                        Ok(()) => false,
                        Err(wait) => {
                            throttled = Some(wait);
                            true
                        }
                    }
                }) =>
            {
                n = i;
                break;
            }
            Ok(total) => {
                let segs = std::mem::take(&mut cx.tx_segs);
                if let Err(r) = switch_frame(net, &ports, port, &segs, total, hdr_len, now, &mut heads[i], cx) {
                    port.counters.dropped(r);
                    net.log_drop(port, r);
                }
                cx.tx_segs = segs;
                // Receivers get a burst at a time: fewer ring updates than one per frame,
                // and the first frames reach them while the rest are switched.
                if cx.guest_burst_full() {
                    flush_guests(&ports, cx);
                }
            }
            Err(r) => {
                port.counters.dropped(r);
                net.log_drop(port, r);
            }
        }
    }
    cx.batching = false;
    cx.running.clear();
    let (frames, bytes) = std::mem::take(&mut cx.received);
    port.counters.received_many(frames, bytes);
    flush_guests(&ports, cx);
    flush_links(&ports, cx);
    // TX buffers are returned with length 0 whatever happened to the frame, all at once
    // and only now: the link sends above read from them. A head outside the table is not
    // returned (it names no buffer).
    let mut new_used = used;
    cx.heads = heads;
    for &head in chains[..n].iter().filter(|&&h| h < ring.size) {
        ring.write_used(new_used, head, 0);
        new_used = new_used.wrapping_add(1);
    }
    // Marked before the index is published, as for receivers (split.rs `publish`).
    if port.dirty_logging() {
        ring.log_used(map, used, new_used);
    }
    ring.publish_used(new_used);
    let q = vs.get_queue_mut();
    q.set_next_avail(next.wrapping_add(n as u16));
    q.set_next_used(new_used);
    notify_receivers(&ports, cx);
    if ring.wants_interrupt(event_idx, used, new_used) {
        let _ = vs.signal_used_queue();
    }
    if let Some(wait) = throttled {
        (n, TxBurst::Throttled(wait))
    } else if n == TX_BATCH {
        (n, TxBurst::More)
    } else {
        (n, TxBurst::Empty { ring, next: next.wrapping_add(n as u16) })
    }
}

/// How long a worker without `busy_poll_us` watches a ring that just gave it frames before it
/// sleeps. On the DPDK virtio-user bench, 5 µs moved a third more frames than none, 20 µs
/// two thirds more (benches/dpdk-virtio-user.sh, README).
const POLL_AFTER_WORK_US: u32 = 20;

/// How a worker looks at its empty rings before it sleeps.
#[derive(Clone, Copy)]
pub enum Look {
    /// Not at all: arm the rings and sleep.
    None,
    /// Up to this many µs, yielding the core between looks (another worker on it runs).
    Yield(u32),
    /// Up to this many µs, spinning (`busy_poll_us`).
    Spin(u32),
}

impl Look {
    /// How a worker that took `taken` frames since its wake-up looks before it sleeps. With
    /// busy polling it spins `busy_poll_us`: under load the next frames come without a kick.
    /// Without, a wake-up that moved frames is likely followed by more within microseconds (a
    /// peer turning a burst around), and a sleep costs a kick and a context switch on each
    /// side: it looks 20 µs, yielding its core. An idle ring is not looked at.
    pub fn after(net: &Network, taken: usize) -> Look {
        if net.busy_poll_us > 0 {
            Look::Spin(net.busy_poll_us)
        } else if taken > 0 {
            Look::Yield(POLL_AFTER_WORK_US)
        } else {
            Look::None
        }
    }

    /// Watches `rings` (each with the avail index its next frame will have) for the look's
    /// time, and `elsewhere` (work arriving for this worker by another way); true as soon as
    /// either shows work.
    pub fn watch(self, rings: &[(Ring, u16)], mut elsewhere: impl FnMut() -> bool) -> bool {
        let mut work = || rings.iter().any(|(ring, next)| ring.avail_idx() != *next) || elsewhere();
        let (us, spin) = match self {
            Look::None => return false,
            Look::Yield(us) => (us, false),
            Look::Spin(us) => (us, true),
        };
        let until = std::time::Instant::now() + std::time::Duration::from_micros(us as u64);
        loop {
            if spin {
                for _ in 0..64 {
                    if work() {
                        return true;
                    }
                    std::hint::spin_loop();
                }
            } else {
                if work() {
                    return true;
                }
                std::thread::yield_now();
            }
            if std::time::Instant::now() >= until {
                return work();
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn switch_frame(
    net: &Network,
    ports: &[Arc<Port>],
    port: &Port,
    segs: &[Seg],
    total: usize,
    hdr_len: usize,
    now: u64,
    head: &mut [u8; HEAD_LEN],
    cx: &mut TxScratch,
) -> Result<(), DropReason> {
    if total < hdr_len + MIN_FRAME_LEN {
        return Err(DropReason::ShortFrame);
    }
    let len = total - hdr_len;
    // The virtio-net header and enough of the frame for the switch and port security, read
    // once: what is checked below is what is delivered (the view puts it in front of the rest).
    let seen = hdr_len + port_security::HEADER_BYTES.min(len);
    // `segs` hold `total` bytes, more than `seen`.
    copy_segs(&[Seg::of_mut(&mut head[..seen])], 0, segs, 0, seen);
    let mut view = std::mem::take(&mut cx.view);
    view.clear();
    view.push(Seg::of_slice(&head[..seen]));
    push_tail(segs, seen, &mut view);
    let r = decide_and_deliver(net, ports, port, &view, &head[..seen], len, hdr_len, now, cx);
    cx.view = view;
    r
}

/// Validates a frame whose first `head.len()` bytes (checked copy) and whole bytes (`view`)
/// are given, and switches it.
#[allow(clippy::too_many_arguments)]
fn decide_and_deliver(
    net: &Network,
    ports: &[Arc<Port>],
    port: &Port,
    view: &[Seg],
    head: &[u8],
    len: usize,
    hdr_len: usize,
    now: u64,
    cx: &mut TxScratch,
) -> Result<(), DropReason> {
    let seen = head.len();
    let hdr = VnetHeader::parse(&head[..hdr_len]);
    hdr.validate_tx(len, net.mtu as usize)?;
    let eth = &head[hdr_len..hdr_len + 14];
    let (src, dst) = (src_mac(eth), dst_mac(eth));
    if is_multicast(&src) || net.gateway.is_some_and(|g| g.mac == src) {
        return Err(DropReason::BadSourceMac);
    }
    // The frame's VLAN, once, from the checked head (which holds any tag: it is longer than 18).
    let ing = vlan::ingress(&port.vlan, &head[hdr_len..seen])?;
    if port.security {
        let mac = port.lock_mac(src, &net.macs, net.dhcp.as_ref())?;
        let taken = |ip| net.held_by_other(port, &mac, ip);
        match port_security::check(&head[hdr_len..seen], &mac, port.leased_ip(), taken) {
            Err(DropReason::SpoofedIp) if routes_behind(net, port, &head[hdr_len..seen], taken) => {}
            r => r?,
        }
        let eth = &head[hdr_len..seen];
        if eth[12..14] == [0x86, 0xdd] {
            port_security::check_ipv6(eth, &mac, |ip| net.may_use6(port, &mac, ip))?;
            // Passed: the fixed header is all there.
            let src: [u8; 16] = eth[22..38].try_into().unwrap_or_default();
            port.saw_ipv6_source(&mac, src.into());
        }
    }
    if cx.batching {
        cx.received.0 += 1;
        cx.received.1 += len as u64;
    } else {
        port.counters.received(len);
    }
    let frame = TxFrame { segs: view, offset: hdr_len, len, hdr, vlan: ing };
    if port.capturing.load(Ordering::Relaxed) {
        capture(port, &frame, cx);
    }
    // The gateway and its services are on the network's untagged VLAN only (and read
    // untagged frames: a priority-tagged one is not for them).
    let on_gateway_vlan = ing == Ingress::default();
    let to_gateway = on_gateway_vlan && (net.gateway.is_some_and(|g| g.wants(&dst)) || (net.gateway6.is_some() && is_ipv6_multicast(&dst)));
    let decision = if ing.vlan == 0 && net.gateway.is_some_and(|g| g.mac == dst) {
        // For the gateway alone: learn the sender, forward nowhere.
        net.macs.lock().unwrap_or_else(|e| e.into_inner()).learn_in(ing.vlan, src, port.id, now)?;
        Decision::Discard
    } else {
        // Read before the table decides: a change meanwhile makes the remembered decision
        // stale at once.
        let version = net.macs_version.load(Ordering::Acquire);
        let flow = Flow { vlan: ing.vlan, src, dst, port: port.id };
        match cx.decisions.get(&net.macs_version, &flow, now, version) {
            Some(to) => Decision::Unicast(to),
            None => {
                let d = net.macs.lock().unwrap_or_else(|e| e.into_inner()).forward_in(ing.vlan, src, dst, port.id, now)?;
                if let Decision::Unicast(to) = d {
                    cx.decisions.put(&net.macs_version, &flow, now, version, to);
                }
                d
            }
        }
    };
    if to_gateway {
        answer_gateway(net, ports, port, &frame, cx);
    }
    match decision {
        Decision::Unicast(to) => {
            if let Some(dest) = ports.get(to) {
                if port.isolated && dest.isolated {
                    return Err(DropReason::Isolated);
                }
                deliver(dest, &frame, cx);
            }
        }
        Decision::Flood => {
            // A routed uplink is not on the guests' L2 segment; one isolated port's broadcasts
            // reach no other isolated port; within the frame's VLAN only.
            for dest in ports.iter().filter(|p| {
                !(p.id == port.id || p.routed || (port.isolated && p.isolated) || p.removed.load(Ordering::Relaxed))
                    && p.vlan.carries(ing.vlan)
            }) {
                deliver(dest, &frame, cx);
            }
        }
        Decision::Discard => {}
    }
    Ok(())
}

/// Whether an IPv4 packet comes from a network the port's guest routes for (it is the `via`
/// of a `[[network.route]]` holding the source): a router guest may send from there, but
/// never from an address someone else holds (`taken`).
fn routes_behind(net: &Network, port: &Port, frame: &[u8], taken: impl Fn(std::net::Ipv4Addr) -> bool) -> bool {
    let (Some(router), Some(me)) = (net.router.as_ref(), port.leased_ip()) else { return false };
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let src = std::net::Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    if taken(src) {
        return false;
    }
    let r = router.lock().unwrap_or_else(|e| e.into_inner());
    r.cfg.routes.iter().any(|rt| rt.via == me && vunet_switch::ipv4::in_subnet(src, rt.net, rt.prefix))
}

/// Lets the gateway see a frame addressed to it (or broadcast) and sends its answer, if any,
/// back to the sending port. TSO frames are not for the gateway (it speaks ARP and ICMP).
fn answer_gateway(net: &Network, ports: &[Arc<Port>], port: &Port, f: &TxFrame, cx: &mut TxScratch) {
    let Some(gw) = net.gateway.as_ref() else {
        return;
    };
    if f.hdr.is_gso() && net.router.is_none() && !net.services.iter().any(|s| s.takes_offloaded()) {
        return;
    }
    let mut input = std::mem::take(&mut cx.gw_in);
    let mut reply = std::mem::take(&mut cx.gw_out);
    input.resize(f.len, 0);
    gather(f.segs, f.offset, &mut input);
    if route6_from_guest(net, ports, port, gw.mac, f, &mut input, cx) {
        cx.gw_in = input;
        cx.gw_out = reply;
        return;
    }
    if let Some(router) = net.router.as_ref() {
        let routed = input.len() >= 34 && input[0..6] == gw.mac && input[12..14] == [0x08, 0x00] && input[30..34] != gw.ip.octets();
        if routed || input[12..14] == [0x08, 0x06] {
            let mut emit = Vec::new();
            let verdict = {
                let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
                if routed {
                    r.from_guest(port.id, &mut input, &f.hdr, net.now_ms(), &mut emit)
                } else {
                    r.guest_arp(port.id, &input, net.now_ms(), &mut emit);
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
    if f.hdr.is_gso() && net.router.is_some() {
        cx.gw_in = input;
        cx.gw_out = reply;
        return;
    }
    // Services read complete frames: a partial checksum is filled in first. A TSO segment, or
    // a frame whose checksum offsets are bad, goes only to the services that take frames as
    // the guest sent them (socket NAT writes payloads to host sockets and needs neither).
    let complete = !f.hdr.is_gso()
        && (!f.hdr.needs_csum() || complete_checksum(&mut input, f.hdr.csum_start as usize, f.hdr.csum_offset as usize).is_ok());
    let gcx = GatewayCx { network: &net.name, gateway: gw, gateway6: net.gateway6.as_ref(), dhcp: net.dhcp.as_ref(), hdr: &f.hdr };
    // The gateway's services in the order the network lists them; the first that takes the
    // frame ends the search.
    for service in net.services.iter().filter(|s| complete || s.takes_offloaded()) {
        reply.clear();
        match service.handle(&gcx, port, &input, &mut reply) {
            Handled::NotMine => continue,
            Handled::Consumed => break,
            Handled::Reply => {
                let answer = TxFrame {
                    segs: &[Seg::of_slice(&reply)],
                    offset: 0,
                    len: reply.len(),
                    hdr: VnetHeader::default(),
                    vlan: Ingress::default(),
                };
                // The answer lives in a scratch buffer the next frame reuses: not batched.
                let batching = std::mem::replace(&mut cx.batching, false);
                deliver(port, &answer, cx);
                cx.batching = batching;
                break;
            }
        }
    }
    cx.gw_in = input;
    cx.gw_out = reply;
}

/// IPv6 from a guest for the IPv6 router (a network with `address6`): a packet to the
/// gateway's MAC for an address not the gateway's is routed (true: taken); the guests'
/// neighbour solicitations and advertisements teach the router their MACs and go on to the
/// gateway's own ND service (false).
fn route6_from_guest(
    net: &Network,
    ports: &[Arc<Port>],
    port: &Port,
    gw_mac: vunet_switch::Mac,
    f: &TxFrame,
    input: &mut [u8],
    cx: &mut TxScratch,
) -> bool {
    let Some(router) = net.router6.as_ref() else { return false };
    if input.len() < 14 + 40 || input[12..14] != [0x86, 0xdd] {
        return false;
    }
    let dst: [u8; 16] = input[38..54].try_into().unwrap_or_default();
    let dst = std::net::Ipv6Addr::from(dst);
    let routed = input[0..6] == gw_mac && !dst.is_multicast() && !net.gateway6.is_some_and(|g| g.is_mine(&dst));
    // ND right after the fixed header (where RFC 6980 wants it).
    let nd = input[20] == 58 && matches!(input.get(54), Some(135 | 136));
    if !routed && !nd {
        return false;
    }
    let mut emit = Vec::new();
    let verdict = {
        let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
        if routed {
            r.from_guest(port.id, input, &f.hdr, net.now_ms(), &mut emit)
        } else {
            r.guest_nd(port.id, input, net.now_ms(), &mut emit);
            Ok(Verdict::NotMine)
        }
    };
    match verdict {
        Ok(Verdict::Forward(side)) => send_routed(net, ports, side, &f.hdr, input, cx),
        Ok(_) => {}
        Err(r) => {
            port.counters.dropped(r);
            net.log_drop(port, r);
        }
    }
    for e in emit {
        send_routed(net, ports, e.to, &e.hdr, &e.frame, cx);
    }
    routed
}

/// Switches frames read from an uplink (each with a virtio-net header of `hdr_len` bytes) as
/// if the uplink were a guest sending them, then interrupts the guests that got any.
/// Frames the host itself sent out the uplink's interface (`outgoing`) are taken too, so the
/// host can reach guests through a bridge, unless their source is one of our own ports (an
/// echo of what vunet sent).
pub(super) fn switch_from_link(net: &Network, port: &Port, frames: &[(&[u8], bool)], hdr_len: usize, cx: &mut TxScratch) {
    let ports = net.ports.snapshot();
    let now = net.now_ms();
    let mut heads = std::mem::take(&mut cx.heads);
    for &(frame, outgoing) in frames {
        if outgoing && frame.len() >= hdr_len + 12 {
            let src: vunet_switch::Mac = frame[hdr_len + 6..hdr_len + 12].try_into().unwrap_or([0; 6]);
            let vid = vlan::ingress(&port.vlan, &frame[hdr_len..]).map_or(0, |i| i.vlan);
            let home = net.macs.lock().unwrap_or_else(|e| e.into_inner()).port_of_in(vid, &src, now);
            if home.is_some_and(|p| p != port.id) {
                continue;
            }
        }
        // Not batching: slot 0's head is reused for each frame.
        if let Err(r) = switch_frame(net, &ports, port, &[Seg::of_slice(frame)], frame.len(), hdr_len, now, &mut heads[0], cx) {
            port.counters.dropped(r);
            net.log_drop(port, r);
        }
    }
    cx.heads = heads;
    notify_receivers(&ports, cx);
}

/// Sends a frame the router forwarded or made: to the uplink, or to the guest its
/// destination MAC names (every guest for broadcast or an unknown MAC).
fn send_routed(net: &Network, ports: &[Arc<Port>], side: Side, hdr: &VnetHeader, frame: &[u8], cx: &mut TxScratch) {
    if frame.len() < MIN_FRAME_LEN {
        return;
    }
    let f = TxFrame { segs: &[Seg::of_slice(frame)], offset: 0, len: frame.len(), hdr: *hdr, vlan: Ingress::default() };
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
pub(super) fn route_from_link(net: &Network, port: &Port, frames: &mut [&mut [u8]], hdr_len: usize, cx: &mut TxScratch) {
    let Some(router) = net.router.as_ref() else { return };
    let ports = net.ports.snapshot();
    let now = net.now_ms();
    let mut emit = Vec::new();
    for buf in frames.iter_mut() {
        if buf.len() < hdr_len + MIN_FRAME_LEN {
            continue;
        }
        let (h, frame) = buf.split_at_mut(hdr_len);
        let hdr = VnetHeader::parse(h);
        let verdict = match net.router6.as_ref() {
            Some(r6) if frame[12..14] == [0x86, 0xdd] => {
                r6.lock().unwrap_or_else(|e| e.into_inner()).from_uplink(frame, &hdr, now, &mut emit)
            }
            _ => router.lock().unwrap_or_else(|e| e.into_inner()).from_uplink(frame, &hdr, now, &mut emit),
        };
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

/// Runs the routers' timers (ARP and ND retries, expiry) and sends what they produce.
pub(super) fn router_tick(net: &Network, cx: &mut TxScratch) {
    let Some(router) = net.router.as_ref() else { return };
    let mut emit = Vec::new();
    router.lock().unwrap_or_else(|e| e.into_inner()).tick(net.now_ms(), &mut emit);
    if let Some(r6) = net.router6.as_ref() {
        r6.lock().unwrap_or_else(|e| e.into_inner()).tick(net.now_ms(), &mut emit);
    }
    send_router_frames(net, emit, cx);
}

/// Sends frames the router made outside of any frame's handling (timers, a new address).
pub(super) fn send_router_frames(net: &Network, emit: Vec<Emit>, cx: &mut TxScratch) {
    if emit.is_empty() {
        return;
    }
    let ports = net.ports.snapshot();
    for e in emit {
        send_routed(net, &ports, e.to, &e.hdr, &e.frame, cx);
    }
    notify_receivers(&ports, cx);
}
