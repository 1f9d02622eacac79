//! A guest TX ring as the network's workers serve it, and the network's record of its workers
//! (how many move frames, which rings wait for one). State only: the workers' loop is
//! `workers.rs`; kept apart so `Network` holds this without depending on that loop.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::port::Port;
use super::ring::{GuestMem, Vring};
use super::split::{MemMap, Ring};

/// What the guest's driver negotiated that a TX burst depends on; the device keeps it current.
#[derive(Default)]
pub struct Negotiated {
    pub hdr_len: AtomicUsize,
    pub event_idx: AtomicBool,
}

/// One guest TX ring (of one vhost-user connection), as the network's workers serve it.
pub struct TxRing {
    pub port: Arc<Port>,
    pub pair: usize,
    pub vring: Vring,
    pub mem: GuestMem,
    pub negotiated: Arc<Negotiated>,
    /// Set while a worker holds the ring or it waits for one.
    pub(super) owned: AtomicBool,
    /// Set between the VMM stopping the ring and its own thread seeing it restarted (the
    /// restart reads where the used ring stands): no worker touches it meanwhile.
    pub(super) stopped: AtomicBool,
    /// Set when its connection ended.
    pub(super) gone: AtomicBool,
}

impl TxRing {
    pub fn new(port: Arc<Port>, pair: usize, vring: Vring, mem: GuestMem, negotiated: Arc<Negotiated>) -> TxRing {
        TxRing {
            port,
            pair,
            vring,
            mem,
            negotiated,
            owned: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        }
    }

    /// The VMM stopped the ring (GET_VRING_BASE).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// The ring's own thread saw it start again.
    pub fn restart(&self) {
        self.stopped.store(false, Ordering::SeqCst);
    }

    /// Whether a worker may take frames from it.
    pub(super) fn serviceable(&self) -> bool {
        !self.stopped.load(Ordering::Acquire) && !self.gone.load(Ordering::Acquire)
    }

    /// Whether frames wait in the ring (read under its lock).
    pub(super) fn posted(&self) -> bool {
        let mem = self.mem.memory();
        let map = MemMap::new(&mem);
        let vs = self.vring.get_mut();
        let q = vs.get_queue();
        q.ready() && Ring::new(q, &map).is_some_and(|r| r.avail_idx() != q.next_avail())
    }
}

/// The network's workers: how many move frames now, and the rings waiting for one of them.
#[derive(Default)]
pub struct TxWorkers {
    pub(super) state: Mutex<WorkerState>,
    /// Set while rings wait: read by busy workers between bursts, without the lock.
    pub(super) waiting: AtomicBool,
    /// Kicks that found every worker busy and left their ring to one of them.
    pub(super) handoffs: AtomicU64,
}

#[derive(Default)]
pub(super) struct WorkerState {
    pub(super) active: usize,
    /// At most one entry per ring (its `owned` flag is set while it is here).
    pub(super) waiting: Vec<Arc<TxRing>>,
}

impl TxWorkers {
    /// How many kicks left their ring to a busy worker since the network started.
    pub fn handoffs(&self) -> u64 {
        self.handoffs.load(Ordering::Relaxed)
    }

    /// Moves the rings waiting for a worker into `held`.
    pub(super) fn adopt(&self, held: &mut Vec<Arc<TxRing>>) {
        if self.waiting.load(Ordering::Acquire) {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            held.append(&mut st.waiting);
            self.waiting.store(false, Ordering::Release);
        }
    }

    /// A connection ended: its rings are served no more.
    pub fn forget(&self, ring: &Arc<TxRing>) {
        ring.gone.store(true, Ordering::SeqCst);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.retain(|r| !Arc::ptr_eq(r, ring));
    }

    /// Rings waiting for a worker, and workers moving frames, now (for tests).
    #[cfg(test)]
    pub fn now(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (st.waiting.len(), st.active)
    }

    /// Counts `n` more workers as busy (a test stands in for workers elsewhere).
    #[cfg(test)]
    pub fn occupy(&self, n: isize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.active = st.active.checked_add_signed(n).expect("workers below zero");
    }
}
