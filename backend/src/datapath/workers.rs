//! The network's workers: the threads that move frames out of guests' TX rings.
//!
//! Every guest queue pair has a thread of its own, sleeping on the pair's kicks (the epoll of
//! vhost-user-backend), but at most `workers` threads of a network move frames at once. A
//! kicked thread that finds them all busy hands its ring to them and goes back to sleep; a
//! worker serves every ring it holds a burst at a time in turn, and keeps them without kicks
//! (the guests post without a syscall, their threads stay asleep) until all of them are
//! quiet; then it asks for kicks again, lets the rings go and sleeps.
//!
//! Why: a thread that serves only its own ring takes turns with the others at every empty
//! ring when they share a core — two ports forwarding to each other cost a context switch on
//! each side per burst, which was a third of vunet's time on the DPDK virtio-user bench.
//! DPDK's vhost PMD serves all its ports from one polling loop; this is that loop, woken by
//! kicks instead of spinning.
//!
//! Who serves a ring: its `owned` flag is set while a worker holds it or it waits for one, so
//! at most one thread takes frames from it. A worker lets a ring go only after asking for
//! kicks on it and looking once more, so a frame posted meanwhile either shows in that look
//! or kicks the ring's own thread, which takes it up.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::VringT;
use vm_memory::GuestAddressSpace;

use super::deliver::{flush_pending, TxScratch};
use super::network::Network;
use super::port::Port;
use super::split::{MemMap, Ring};
use super::switch::{arm_tx, tx_burst, Look, TxBurst};
use super::txring::{TxRing, TxWorkers};

/// Takes one burst from `r`; None when the ring is to be let go (stopped or gone), else how many
/// frames, and the ring to look at when it is empty (with the memory guard it needs).
fn burst(r: &TxRing, net: &Network, cx: &mut TxScratch) -> Option<(usize, Burst)> {
    if !r.serviceable() {
        return None;
    }
    let mem = r.mem.memory();
    let map = MemMap::new(&mem);
    let hdr_len = r.negotiated.hdr_len.load(Ordering::Acquire);
    let event_idx = r.negotiated.event_idx.load(Ordering::Acquire);
    let (n, b) = tx_burst(net, &r.port, &r.vring, &map, hdr_len, event_idx, cx);
    if n > 0 {
        if let Some(q) = r.port.queues.get(r.pair) {
            q.from_guest.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let b = match b {
        TxBurst::Stopped => return None,
        TxBurst::More => Burst::More,
        // Ports with an outbound limit are served on their own thread (`process_tx`),
        // never here; should one come, it is looked at like an empty ring.
        TxBurst::Throttled(_) => Burst::Empty(None),
        TxBurst::Empty { ring, next } => Burst::Empty(Some((ring, next, mem))),
    };
    Some((n, b))
}

enum Burst {
    More,
    /// Empty: the ring as the burst translated it, the avail index of its next frame, and
    /// the memory it lies in (held while it is looked at).
    Empty(Option<(Ring, u16, vm_memory::GuestMemoryLoadGuard<super::ring::Mem>)>),
}

/// The thread a worker runs on, and what of its own it must still do while it serves others.
pub struct Home<'a> {
    /// Its port: frames waiting in the port's receive backlogs are flushed between bursts (the
    /// RX kick that would flush them waits in this thread's epoll until the worker returns).
    pub port: &'a Port,
    /// Whether the thread must stop (its connection ended and it is told to exit): the worker
    /// then hands every ring back to its own thread and returns. Checked now and then, not
    /// per burst (it may cost a syscall).
    pub leaving: &'a dyn Fn() -> bool,
}

/// How many rounds a worker serves between looks at whether its thread must stop.
const ROUNDS_PER_LEAVE_CHECK: u32 = 64;

/// A kick on `ring`, on the ring's own thread. If a worker holds the ring, nothing to do; if
/// the network's workers are all busy, the ring waits for one of them; else this thread
/// becomes one and serves until every ring it holds is quiet. Returns the frames this
/// thread took, from any ring.
pub fn tx_kick(net: &Network, ring: &Arc<TxRing>, home: &Home, cx: &mut TxScratch) -> usize {
    if !ring.serviceable() || ring.owned.swap(true, Ordering::SeqCst) {
        return 0;
    }
    {
        let mut st = net.tx_workers.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.active >= net.workers.max(1) {
            st.waiting.push(ring.clone());
            net.tx_workers.waiting.store(true, Ordering::Release);
            net.tx_workers.handoffs.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        st.active += 1;
    }
    let mut held = vec![ring.clone()];
    serve(net, &mut held, home, cx)
}

/// Lets `ring` go and wakes its own thread as a kick would (writing its kick eventfd), so the
/// ring is served without waiting for a kick its guest will not send (it was never re-armed).
fn hand_back(ring: &TxRing) {
    ring.owned.store(false, Ordering::SeqCst);
    let vs = ring.vring.get_ref();
    if let Some(kick) = vs.get_kick() {
        use std::os::fd::AsRawFd;
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the ring's kick eventfd, which `vs` keeps open.
        let _ = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// This worker's thread must stop: every ring it holds and every ring waiting for a worker
/// goes back to its own thread, which takes it up (as a worker, or waiting for one).
fn leave(workers: &TxWorkers, held: &mut Vec<Arc<TxRing>>) {
    let waiting = {
        let mut st = workers.state.lock().unwrap_or_else(|e| e.into_inner());
        st.active -= 1;
        workers.waiting.store(false, Ordering::Release);
        std::mem::take(&mut st.waiting)
    };
    for r in held.drain(..).chain(waiting) {
        hand_back(&r);
    }
}

/// The worker's loop: bursts from every held ring in turn until all are empty, a look, then
/// letting quiet rings go; returns (and stops being a worker) when it holds none and none wait.
fn serve(net: &Network, held: &mut Vec<Arc<TxRing>>, home: &Home, cx: &mut TxScratch) -> usize {
    let workers = &net.tx_workers;
    let mut taken = 0;
    let mut looks = Vec::new();
    let mut rounds = 0u32;
    loop {
        workers.adopt(held);
        // Rounds of one burst per ring, until a round finds every ring empty.
        loop {
            for pair in 0..home.port.queues.len() {
                flush_pending(home.port, pair, cx);
            }
            // The first round of a wake-up looks too: a thread told to exit is not kept.
            if rounds.is_multiple_of(ROUNDS_PER_LEAVE_CHECK) && (home.leaving)() {
                leave(workers, held);
                return taken;
            }
            rounds = rounds.wrapping_add(1);
            looks.clear();
            let mut more = false;
            held.retain(|r| match burst(r, net, cx) {
                None => {
                    r.owned.store(false, Ordering::SeqCst);
                    false
                }
                Some((n, b)) => {
                    taken += n;
                    match b {
                        Burst::More => more = true,
                        Burst::Empty(look) => looks.extend(look),
                    }
                    true
                }
            });
            if !more {
                break;
            }
            workers.adopt(held);
        }
        if !held.is_empty() {
            // All empty: look a while before sleeping, at every ring and at rings waiting.
            let rings: Vec<(Ring, u16)> = looks.iter().map(|(r, next, _)| (*r, *next)).collect();
            if Look::after(net, taken).watch(&rings, || workers.waiting.load(Ordering::Relaxed)) {
                continue;
            }
            looks.clear();
            // Quiet: ask for kicks on each ring and let it go, unless frames came meanwhile.
            held.retain(|r| {
                if arm_tx(&r.vring) {
                    return true;
                }
                r.owned.store(false, Ordering::SeqCst);
                // A kick that came between arming and letting go found the ring owned and was
                // dropped: look once more, and take the ring back if nobody else did.
                r.posted() && r.serviceable() && !r.owned.swap(true, Ordering::SeqCst)
            });
            if !held.is_empty() {
                continue;
            }
        }
        let mut st = workers.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.waiting.is_empty() {
            st.active -= 1;
            return taken;
        }
        held.append(&mut st.waiting);
        workers.waiting.store(false, Ordering::Release);
    }
}
