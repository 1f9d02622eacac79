//! One guest port as a vhost-user-net device. A `PortDevice` lives for one vhost-user
//! connection: a fresh one (with a fresh exit event) is built for every connection, because a
//! vhost-user-backend daemon's workers cannot be reused after an exit (reference §6 P9).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vunet_switch::vnet::{RxCaps, HDR_LEN, HDR_LEN_LEGACY};

use crate::datapath::{flush_pending, process_tx, GuestMem, Network, Port, RxTarget, TxScratch, Vring};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: usize = 1024;

/// The virtio feature bits vunet offers. UFO/USO and ECN are not offered: the switch does not
/// segment them in software, so it must not accept them.
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
    | 1 << VIRTIO_NET_F_STATUS;

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
    acked: AtomicU64,
    event_idx: AtomicBool,
    published: AtomicBool,
    exit: (EventConsumer, EventNotifier),
    scratch: Mutex<TxScratch>,
}

impl PortDevice {
    pub fn new(net: Arc<Network>, port: Arc<Port>, mem: GuestMem) -> io::Result<Self> {
        Ok(PortDevice {
            net,
            port,
            mem,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            published: AtomicBool::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            scratch: Mutex::new(TxScratch::default()),
        })
    }

    /// Makes this connection's RX ring reachable for the other ports' senders.
    fn publish_rx(&self, rx: &Vring) {
        // Senders write into this ring whenever it has buffers; a kick is only wanted while
        // frames wait in the backlog (the data path turns it on then). Without EVENT_IDX this
        // sets VRING_USED_F_NO_NOTIFY, saving the guest an exit per refill.
        let _ = rx.disable_notification();
        let caps = rx_caps(self.acked.load(Ordering::Acquire));
        *self.port.rx.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(RxTarget { vring: rx.clone(), mem: self.mem.clone(), caps, backlog: Default::default(), signalled: 0, cache: None });
        self.published.store(true, Ordering::Release);
    }

    /// Tells the worker thread to exit (after a disconnect).
    pub fn notify_exit(&self) {
        let _ = self.exit.1.notify();
    }
}

impl VhostUserBackend for PortDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // The MAC is offered only when the port has one configured: a VMM that takes the
        // backend's MAC (cloud-hypervisor) must not get the same made-up one for every guest.
        let mac = if self.port.mac.is_some() { 1 << VIRTIO_NET_F_MAC } else { 0 };
        OFFERED_FEATURES | mac | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(port = %self.port.name, features = format_args!("{features:#x}"), "features acked");
        self.acked.store(features, Ordering::Release);
        self.port.features.store(features, Ordering::Relaxed);
        // A renegotiation (guest driver reload) changes what the receiver accepts.
        if let Some(t) = self.port.rx.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            t.caps = rx_caps(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.port.mac.unwrap_or([0x52, 0x54, 0, 0, 0, 0]));
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.net.mtu.to_le_bytes());
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize).saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic we share with it; every batch loads it anew.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], _thread: usize) -> io::Result<()> {
        // Never return an error for anything a guest did: an error ends the worker thread.
        tracing::trace!(port = %self.port.name, device_event, "event");
        if evset != EventSet::IN || vrings.len() < NUM_QUEUES {
            return Ok(());
        }
        if !self.published.load(Ordering::Acquire) {
            self.publish_rx(&vrings[RX_QUEUE as usize]);
        }
        match device_event {
            // New receive buffers: senders write straight into them; only frames that found
            // the ring full wait in the backlog for this moment.
            RX_QUEUE => {
                let mut cx = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                flush_pending(&self.port, &mut cx);
                Ok(())
            }
            TX_QUEUE => {
                let mem = self.mem.memory();
                let features = self.acked.load(Ordering::Acquire);
                let mut cx = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                process_tx(
                    &self.net,
                    &self.port,
                    &vrings[TX_QUEUE as usize],
                    &mem,
                    hdr_len(features),
                    self.event_idx.load(Ordering::Acquire),
                    &mut cx,
                );
                Ok(())
            }
            _ => Ok(()),
        }
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
    ];
    NAMES.iter().filter(|(b, _)| bits & (1u64 << b) != 0).map(|&(_, n)| n).collect()
}
