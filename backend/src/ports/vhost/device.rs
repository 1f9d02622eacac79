//! One guest port as a vhost-user-net device. A `PortDevice` lives for one vhost-user
//! connection: a fresh one (with fresh exit events) is built for every connection, because a
//! vhost-user-backend daemon's workers cannot be reused after an exit (reference §6 P9).
//!
//! With `queues = N` the device has N queue pairs (VIRTIO_NET_F_MQ; QEMU handles the control
//! queue itself) served by up to `workers` threads: pair p by thread p % threads, so one
//! busy pair never holds up another thread's.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vunet_switch::vnet::{RxCaps, HDR_LEN, HDR_LEN_LEGACY};

use crate::datapath::{
    flush_pending, process_tx, signal_if_wanted, tx_kick, GuestMem, Home, Negotiated, Network, Port, RxTarget, TxRing, TxScratch, Vring,
    VHOST_F_LOG_ALL,
};

pub const QUEUE_SIZE: usize = 1024;
/// Most rings a device has: RX and TX of each of MAX_QUEUE_PAIRS pairs.
pub const MAX_QUEUES: usize = 2 * crate::datapath::MAX_QUEUE_PAIRS;

/// The virtio feature bits vunet offers. UFO/USO and ECN are not offered: the switch does not
/// segment them in software, so it must not accept them. IN_ORDER is offered because every
/// ring is served in order already (TX buffers return in the order they came, receive chains
/// are filled or handed back in the order they were posted; `datapath/tests.rs` checks it),
/// and a driver that has it takes cheaper paths: DPDK's virtio PMD its in-order TX and RX
/// functions (no free list, sequential descriptors), as with DPDK's own vhost backend.
pub const OFFERED_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_F_IN_ORDER;

/// What a negotiated feature set means for receiving frames.
pub fn rx_caps(features: u64) -> RxCaps {
    let has = |b: u32| features & (1 << b) != 0;
    RxCaps {
        csum: has(VIRTIO_NET_F_GUEST_CSUM),
        tso4: has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: has(VIRTIO_NET_F_GUEST_TSO6),
        mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
        hdr_len: hdr_len(features),
    }
}

/// 12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10.
pub fn hdr_len(features: u64) -> usize {
    if features & (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        HDR_LEN
    } else {
        HDR_LEN_LEGACY
    }
}

/// The vhost-user backend of one guest port for one connection.
pub struct PortDevice {
    net: Arc<Network>,
    port: Arc<Port>,
    mem: GuestMem,
    /// Which of the port's connections this is.
    conn: u64,
    acked: AtomicU64,
    event_idx: AtomicBool,
    /// The same, for the network's workers serving this connection's TX rings.
    negotiated: Arc<Negotiated>,
    /// Per pair: its TX ring as the network's workers serve it (made when the ring first runs).
    tx: Vec<OnceLock<Arc<TxRing>>>,
    /// Worker threads; pair p is served by thread p % threads.
    threads: usize,
    /// Per ring: set until the ring runs (then its RX ring is published for senders and its
    /// used index taken from guest memory), and again when the VMM stops it.
    fresh: Vec<AtomicBool>,
    /// Per thread: its exit event (one each, so every thread sees its own).
    exit: Vec<(EventConsumer, EventNotifier)>,
    /// Per thread: the scratch buffers its TX rings are drained with.
    scratch: Vec<Mutex<TxScratch>>,
}

impl PortDevice {
    /// The device of connection `conn` (the port's connection count when it came).
    pub fn new(net: Arc<Network>, port: Arc<Port>, mem: GuestMem, conn: u64) -> io::Result<Self> {
        let threads = port.queues.len().min(net.workers.max(1));
        let rings = 2 * port.queues.len();
        let pairs = port.queues.len();
        Ok(PortDevice {
            net,
            port,
            mem,
            conn,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            negotiated: Arc::default(),
            tx: (0..pairs).map(|_| OnceLock::new()).collect(),
            threads,
            fresh: (0..rings).map(|_| AtomicBool::new(true)).collect(),
            exit: (0..threads).map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK)).collect::<io::Result<_>>()?,
            scratch: (0..threads).map(|_| Mutex::new(TxScratch::default())).collect(),
        })
    }

    /// The port's pair that a thread's `local` pair is (its pairs in ring order).
    fn pair_of(&self, thread: usize, local: usize) -> usize {
        thread + local * self.threads
    }

    /// Makes pair `pair`'s RX ring of this connection reachable for the other ports' senders.
    fn publish_rx(&self, pair: usize, rx: &Vring) {
        // Senders write into this ring whenever it has buffers; a kick is only wanted while
        // frames wait in the backlog (the data path turns it on then). Without EVENT_IDX this
        // sets VRING_USED_F_NO_NOTIFY, saving the guest an exit per refill.
        let _ = rx.disable_notification();
        let caps = rx_caps(self.acked.load(Ordering::Acquire));
        if let Some(q) = self.port.queues.get(pair) {
            *q.rx.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(RxTarget { vring: rx.clone(), mem: self.mem.clone(), caps, backlog: Default::default(), signalled: 0, cache: None });
        }
    }

    /// Pair `pair`'s TX ring for the network's workers.
    fn tx_ring(&self, pair: usize, vring: &Vring) -> Option<&Arc<TxRing>> {
        let slot = self.tx.get(pair)?;
        Some(slot.get_or_init(|| Arc::new(TxRing::new(self.port.clone(), pair, vring.clone(), self.mem.clone(), self.negotiated.clone()))))
    }

    /// The connection ended: the network's workers let its TX rings go.
    pub fn forget_rings(&self) {
        for r in self.tx.iter().filter_map(|t| t.get()) {
            self.net.tx_workers.forget(r);
        }
    }

    /// Tells the worker threads to exit (after a disconnect).
    pub fn notify_exit(&self) {
        for (_, notifier) in &self.exit {
            let _ = notifier.notify();
        }
    }
}

impl VhostUserBackend for PortDevice {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.port.queues.len()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut masks = vec![0u64; self.threads];
        for pair in 0..self.port.queues.len() {
            masks[pair % self.threads] |= 0b11 << (2 * pair);
        }
        masks
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // The MAC is offered only when the port has one configured: a VMM that takes the
        // backend's MAC (cloud-hypervisor) must not get the same made-up one for every guest.
        let mac = if self.port.mac.is_some() { 1 << VIRTIO_NET_F_MAC } else { 0 };
        let mq = if self.port.queues.len() > 1 { 1 << VIRTIO_NET_F_MQ } else { 0 };
        OFFERED_FEATURES | mac | mq | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VHOST_F_LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(port = %self.port.name, features = format_args!("{features:#x}"), "features acked");
        self.acked.store(features, Ordering::Release);
        self.negotiated.hdr_len.store(hdr_len(features), Ordering::Release);
        self.port.features.store(features, Ordering::Relaxed);
        // A renegotiation (guest driver reload) changes what the receiver accepts.
        for q in &self.port.queues {
            if let Some(t) = q.rx.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                t.caps = rx_caps(features);
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD with VHOST_F_LOG_ALL: live migration (the data path marks what it writes
        // in the VMM's log). RARP: the relay takes SEND_RARP after a migration (the vhost
        // crate does not dispatch it) and moves the MAC to this port.
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP;
        // QEMU sends ADD_MEM_REG once per queue pair (it is not one of its one-time requests),
        // and vhost-user-backend refuses the second copy of a region: with several pairs, the
        // memory table comes whole with SET_MEM_TABLE, which QEMU sends once.
        if self.port.queues.len() == 1 {
            f | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        } else {
            f
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
        self.negotiated.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.port.mac.unwrap_or([0x52, 0x54, 0, 0, 0, 0]));
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&(self.port.queues.len() as u16).to_le_bytes());
        cfg[10..12].copy_from_slice(&self.net.mtu.to_le_bytes());
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize).saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic we share with it; every batch loads it anew.
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the daemon has marked the ring not ready under its lock, so a burst
        // in flight finished (its frames written whole and used) and no new one starts. Senders
        // lose this RX ring; frames waiting in its backlog are dropped and counted.
        let pair = index as usize / 2;
        // Only this connection's own rings: the port's RX targets may be another connection's
        // (the other end of a migration on the same port).
        if index.is_multiple_of(2) && self.port.rx_owner.load(Ordering::Acquire) == self.conn {
            if let Some(q) = self.port.queues.get(pair) {
                if let Some(mut t) = q.rx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    for _ in 0..t.backlog.len() {
                        self.port.counters.dropped(vunet_switch::DropReason::PortDown);
                    }
                    // Frames a sender published and has not signalled yet (it signals after
                    // its burst, and found the ring gone): their interrupt goes now, through
                    // the call eventfd the VMM still holds. Without it a guest that used up
                    // its receive buffers waits for an interrupt that never comes, and the
                    // ring (migrated with it) stays full: the guest is cut off.
                    signal_if_wanted(&mut t);
                }
                q.backlogged.store(false, Ordering::Release);
            }
        }
        if let Some(f) = self.fresh.get(index as usize) {
            f.store(true, Ordering::Release);
        }
        if index % 2 == 1 {
            // No worker takes frames from it until its own thread sees it run again.
            if let Some(r) = self.tx.get(pair).and_then(|t| t.get()) {
                r.stop();
            }
        }
        self.port.vmm_stopped.store(true, Ordering::Release);
        tracing::debug!(port = %self.port.name, index, "ring stopped by the VMM");
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], thread: usize) -> io::Result<()> {
        // Never return an error for anything a guest did: an error ends the worker thread.
        // `vrings` are this thread's: its pairs' RX and TX rings, in order.
        tracing::trace!(port = %self.port.name, device_event, thread, "event");
        let local = device_event as usize / 2;
        if evset != EventSet::IN || thread >= self.threads || 2 * local + 1 >= vrings.len() {
            return Ok(());
        }
        for (k, rings) in vrings.chunks_exact(2).enumerate() {
            let pair = self.pair_of(thread, k);
            for (r, vring) in rings.iter().enumerate() {
                let Some(fresh) = self.fresh.get(2 * pair + r) else { continue };
                if !fresh.load(Ordering::Acquire) {
                    continue;
                }
                let mut vs = vring.get_mut();
                if !vs.get_queue().ready() {
                    continue;
                }
                // The ring (re)started: a migrated guest's ring carries on where the source
                // stopped. SET_VRING_BASE gave next_avail; everything before it was used
                // (the source finished its bursts), so used entries continue from the used
                // index in guest memory.
                let mem = self.mem.memory();
                if let Ok(idx) = vs.get_queue().used_idx(&*mem, Ordering::Acquire) {
                    vs.get_queue_mut().set_next_used(idx.0);
                    // Used entries from before the start (a migration's source, a backend
                    // that restarted): whether their interrupt reached the guest is not known
                    // here, and a guest waiting for it would wait for good if the ring is
                    // full. One interrupt, as QEMU's own device after a migration (it
                    // forgets which used index it signalled); a driver that saw them all
                    // finds nothing new.
                    if idx.0 != 0 {
                        let _ = vs.signal_used_queue();
                    }
                }
                drop(vs);
                fresh.store(false, Ordering::Release);
                if r == 0 {
                    self.publish_rx(pair, vring);
                    self.port.rx_owner.store(self.conn, Ordering::Release);
                } else if let Some(t) = self.tx_ring(pair, vring) {
                    t.restart();
                }
                self.port.vmm_stopped.store(false, Ordering::Release);
            }
        }
        let pair = self.pair_of(thread, local);
        let mut cx = self.scratch[thread].lock().unwrap_or_else(|e| e.into_inner());
        if device_event.is_multiple_of(2) {
            // New receive buffers: senders write straight into them; only frames that found
            // the ring full wait in the backlog for this moment.
            flush_pending(&self.port, pair, &mut cx);
        } else if self.port.tx_limit.is_none() {
            // Served by the network's workers: this thread becomes one, or hands the ring to
            // one that is busy (workers.rs).
            if let Some(ring) = self.tx_ring(pair, &vrings[2 * local + 1]) {
                let exit = self.exit[thread].0.as_raw_fd();
                let leaving = || {
                    let mut p = libc::pollfd { fd: exit, events: libc::POLLIN, revents: 0 };
                    // SAFETY: one pollfd on the stack, no wait; the exit eventfd lives as long as `self`.
                    unsafe { libc::poll(&mut p, 1, 0) > 0 }
                };
                tx_kick(&self.net, ring, &Home { port: &self.port, leaving: &leaving }, &mut cx);
            }
        } else {
            // An outbound limit's waits are slept on the port's own thread, never a worker's.
            let mem = self.mem.memory();
            let features = self.acked.load(Ordering::Acquire);
            let taken = process_tx(
                &self.net,
                &self.port,
                &vrings[2 * local + 1],
                &mem,
                hdr_len(features),
                self.event_idx.load(Ordering::Acquire),
                &mut cx,
            );
            if let Some(q) = self.port.queues.get(pair) {
                q.from_guest.fetch_add(taken as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// The names of the virtio-net features in `bits` that vunet knows, for `port-list`.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    const NAMES: &[(u32, &str)] = &[
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_NET_F_MTU, "MTU"),
        (VIRTIO_NET_F_STATUS, "STATUS"),
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_F_IN_ORDER, "IN_ORDER"),
        (26, "LOG_ALL"),
    ];
    NAMES.iter().filter(|(b, _)| bits & (1u64 << b) != 0).map(|&(_, n)| n).collect()
}

impl Drop for PortDevice {
    fn drop(&mut self) {
        self.forget_rings();
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    use vhost_user_backend::VringMutex;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::config::Mode;
    use crate::datapath::PortKind;

    const SIZE: u16 = 256;
    const USED_RING: u64 = 0x3000;

    /// A ring in `mem` (desc 0x0, avail 0x1000, used 0x3000), running, whose call eventfd
    /// is returned: what the guest's interrupt would be.
    fn ring(mem: &GuestMem) -> (Vring, EventFd) {
        let vring: Vring = VringMutex::new(mem.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring.set_queue_info(0, 0x1000, USED_RING).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: a dup of a live eventfd, owned by the File.
        vring.set_call(Some(unsafe { File::from_raw_fd(libc::dup(call.as_raw_fd())) }));
        (vring, call)
    }

    fn device() -> (PortDevice, Arc<Port>, GuestMem) {
        let net = Arc::new(Network::new("t", Mode::Isolated, 1500));
        let port = Arc::new(Port::new(0, "vm1", PortKind::Vhost));
        let mem: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        (PortDevice::new(net, port.clone(), mem.clone(), 1).unwrap(), port, mem)
    }

    #[test]
    fn a_ring_stopped_between_a_senders_write_and_its_signal_interrupts_the_guest() {
        let (dev, port, mem) = device();
        let (rx, call) = ring(&mem);
        port.rx_owner.store(1, Ordering::Release);
        // The ring as senders see it, last signalled at used index `signalled`.
        let target = |signalled| RxTarget {
            vring: rx.clone(),
            mem: mem.clone(),
            caps: rx_caps(0),
            backlog: Default::default(),
            signalled,
            cache: None,
        };
        // A sender wrote three frames into the guest and published them; its interrupt comes
        // after its whole burst, and the VMM stops the ring (GET_VRING_BASE) before that.
        rx.get_mut().get_queue_mut().set_next_used(3);
        *port.queues[0].rx.lock().unwrap() = Some(target(0));
        dev.stop_vring(0).unwrap();
        assert!(port.queues[0].rx.lock().unwrap().is_none(), "senders lose the ring");
        assert_eq!(call.read().ok(), Some(1), "the guest hears of the three frames");
        // A ring stopped with nothing published since its last interrupt gets none.
        *port.queues[0].rx.lock().unwrap() = Some(target(3));
        dev.stop_vring(0).unwrap();
        assert!(call.read().is_err(), "nothing new, no interrupt");
        // One more frame published meanwhile: its interrupt goes at the stop.
        rx.get_mut().get_queue_mut().set_next_used(4);
        *port.queues[0].rx.lock().unwrap() = Some(target(3));
        dev.stop_vring(0).unwrap();
        assert_eq!(call.read().ok(), Some(1));
    }

    #[test]
    fn a_ring_that_starts_with_used_entries_interrupts_the_guest_once() {
        // A fresh guest: nothing used yet, no interrupt.
        let (dev, _port, mem) = device();
        let (rx, rx_call) = ring(&mem);
        let (tx, tx_call) = ring(&GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()));
        dev.handle_event(0, EventSet::IN, &[rx, tx], 0).unwrap();
        assert!(rx_call.read().is_err() && tx_call.read().is_err());
        // A migrated guest: its receive ring comes with 700 used entries, whose interrupt the
        // source may not have sent; the ring starts with one.
        let (dev, _port, mem) = device();
        mem.memory().write_obj(700u16, GuestAddress(USED_RING + 2)).unwrap();
        let (rx, rx_call) = ring(&mem);
        let (tx, _) = ring(&GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()));
        dev.handle_event(0, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
        assert_eq!(rx_call.read().ok(), Some(1));
        assert_eq!(rx.get_ref().get_queue().next_used(), 700, "used entries continue from guest memory");
        // Once only: the next event is an ordinary one.
        dev.handle_event(0, EventSet::IN, &[rx, tx], 0).unwrap();
        assert!(rx_call.read().is_err());
    }
}
