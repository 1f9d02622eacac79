//! Split virtqueues read and written straight through host pointers, a burst at a time.
//!
//! virtio-queue's accessors translate every descriptor, ring entry and index through
//! vm-memory's region search and publish the used index once per element; at small frames that
//! was a fifth of a worker's time. Here the few regions of the current memory table are listed
//! once per burst (`MemMap`, last hit first), the ring's three areas are translated once
//! (`Ring`), the avail index is read once per burst, and used elements are written as they
//! come and published with one release store per burst. virtio-queue's `Queue` stays the
//! owner of the ring's state (`next_avail`, `next_used`, addresses, EVENT_IDX): it is read at
//! the start of a burst and updated at its end, so the vhost-user daemon (GET_VRING_BASE,
//! notification arming) sees the same ring as before.
//!
//! Every index and address read here comes from the guest and is checked before use:
//! descriptor indices against the queue size, addresses against the regions, chain lengths
//! against a budget.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vunet_switch::vnet::{RxCaps, VnetHeader};
use vunet_switch::DropReason;

use super::ring::{copy_segs, log_dirty, window, Mem, Seg};

/// Most descriptors the data path walks for one TX frame (a queue's size). Linux sends a frame
/// in at most 19 (MAX_SKB_FRAGS + 2), directly or in an indirect table.
pub const MAX_FRAME_DESCS: usize = 1024;

/// Most descriptors walked to write one frame into a receiver, over all the chains it fills
/// (and the broken ones handed back on the way). Linux posts one descriptor per mergeable
/// buffer (44 for a 64 KiB frame) or up to 19 in big-packet mode; a receiver posting mazes of
/// tiny descriptors costs each sender this much per frame, no more.
pub const MAX_RX_DESCS: usize = 256;

/// Most receive chains one frame may fill with MRG_RXBUF. Linux posts mergeable buffers of at
/// least 1518 bytes (44 for a 64 KiB frame); a guest posting tiny ones gets the frame dropped
/// as `RxBufferTooSmall`, not written across thousands of chains.
pub const MAX_RX_CHAINS: usize = 128;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// Most chains asked for ahead of a burst: more lines than this in flight gain nothing.
pub const PREFETCH_MAX: usize = 32;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Most regions a memory table is expected to have; more are looked up in the slow path.
const MAX_REGIONS: usize = 8;

/// The regions of one memory table as (guest start, length, host start). Plain data: valid
/// while the memory table it was read from is held.
#[derive(Clone, Copy)]
pub struct Regions {
    list: [(u64, u64, *mut u8); MAX_REGIONS],
    count: usize,
}

impl Regions {
    pub fn of(mem: &Mem) -> Regions {
        let mut list = [(0, 0, std::ptr::null_mut()); MAX_REGIONS];
        let mut count = 0;
        for r in mem.iter() {
            if count == MAX_REGIONS {
                break;
            }
            if let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) {
                list[count] = (r.start_addr().0, r.len(), host);
                count += 1;
            }
        }
        Regions { list, count }
    }
}

/// Translation of guest addresses through the regions of one memory table, without a search.
/// Valid while the memory guard it was built from is held.
pub struct MemMap<'a> {
    regions: Regions,
    /// The region the last lookup hit: buffers of a burst mostly sit in the same one.
    last: std::cell::Cell<usize>,
    mem: &'a Mem,
}

impl<'a> MemMap<'a> {
    pub fn new(mem: &'a Mem) -> MemMap<'a> {
        MemMap::with(Regions::of(mem), mem)
    }

    /// A map over `regions`, which were read from `mem`.
    pub fn with(regions: Regions, mem: &'a Mem) -> MemMap<'a> {
        MemMap { regions, last: std::cell::Cell::new(0), mem }
    }

    /// The memory table this map lists.
    pub fn mem(&self) -> &'a Mem {
        self.mem
    }

    /// The host address of `len` bytes at `gpa` when they lie in one region.
    #[inline]
    pub fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let hit = |&(start, size, host): &(u64, u64, *mut u8)| {
            let off = gpa.checked_sub(start)?;
            (off.checked_add(len as u64)? <= size).then(|| {
                // SAFETY: `off + len` is within the region's mapping.
                unsafe { host.add(off as usize) }
            })
        };
        let (list, count) = (&self.regions.list, self.regions.count);
        let last = self.last.get();
        if let Some(p) = list.get(last).filter(|_| last < count).and_then(hit) {
            return Some(p);
        }
        for (i, r) in list[..count].iter().enumerate() {
            if let Some(p) = hit(r) {
                self.last.set(i);
                return Some(p);
            }
        }
        None
    }

    /// Marks the pages under host bytes `ptr..ptr + len` (within one region) dirty in the
    /// migration log.
    pub fn log(&self, ptr: *const u8, len: usize) {
        log_dirty(self.mem, ptr, len);
    }

    /// Resolves `len` bytes at `gpa` into segments (a buffer may straddle regions). Inlined
    /// into the chain walks: a buffer within one region, the case of nearly every one, is a
    /// range check and a push.
    #[inline(always)]
    pub fn resolve(&self, gpa: u64, len: usize, out: &mut Vec<Seg>) -> Result<(), DropReason> {
        if let Some(ptr) = self.host(gpa, len) {
            out.push(Seg { ptr, len });
            return Ok(());
        }
        self.resolve_across(gpa, len, out)
    }

    /// A buffer across regions, or outside guest memory: vm-memory's search.
    #[cold]
    #[inline(never)]
    fn resolve_across(&self, gpa: u64, len: usize, out: &mut Vec<Seg>) -> Result<(), DropReason> {
        super::ring::resolve(self.mem, vm_memory::GuestAddress(gpa), len, out)
    }
}

/// One descriptor as the guest wrote it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A split virtqueue's three areas, translated once.
#[derive(Clone, Copy)]
pub struct Ring {
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    pub size: u16,
}

impl Ring {
    /// The ring of `q` in `map`, or None if an area lies outside guest memory (the guest's
    /// setup is broken: its queue is left alone).
    pub fn new<Q: virtio_queue::QueueT>(q: &Q, map: &MemMap) -> Option<Ring> {
        let size = q.size();
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = size as usize;
        Some(Ring {
            desc: map.host(q.desc_table(), 16 * n)?,
            // flags, idx, ring[size], used_event
            avail: map.host(q.avail_ring(), 6 + 2 * n)?,
            // flags, idx, ring[size] of (id, len), avail_event
            used: map.host(q.used_ring(), 6 + 8 * n)?,
            size,
        })
    }

    /// Ring position `i`'s slot. The size is a power of two (`new` checks): a mask, not the
    /// division `%` compiles to for a size known only at run time (two of them per frame on
    /// each ring).
    #[inline(always)]
    fn slot(&self, i: u16) -> usize {
        (i & (self.size - 1)) as usize
    }

    fn u16_at(p: *mut u8) -> &'static AtomicU16 {
        // SAFETY: the ring areas were translated with their full length, ring fields are
        // 2-aligned as the virtio spec requires of the driver (an unaligned guest address
        // only makes the guest's own ring misbehave on x86), and the mapping outlives the
        // burst. The 'static lifetime never escapes the accessors below.
        unsafe { &*(p as *const AtomicU16) }
    }

    /// The driver's avail index (acquire: the entries before it are visible).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: within the avail area.
        Self::u16_at(unsafe { self.avail.add(2) }).load(Ordering::Acquire)
    }

    #[inline]
    pub fn avail_flags(&self) -> u16 {
        Self::u16_at(self.avail).load(Ordering::Relaxed)
    }

    /// The head descriptor index in avail slot `i`.
    #[inline]
    pub fn avail_entry(&self, i: u16) -> u16 {
        let slot = self.slot(i);
        // SAFETY: slot < size, within the avail area.
        Self::u16_at(unsafe { self.avail.add(4 + 2 * slot) }).load(Ordering::Relaxed)
    }

    /// The driver's `used_event` (EVENT_IDX): interrupt once the used index passes it.
    #[inline]
    pub fn used_event(&self) -> u16 {
        // SAFETY: the field after the avail ring, within the translated area.
        Self::u16_at(unsafe { self.avail.add(4 + 2 * self.size as usize) }).load(Ordering::Relaxed)
    }

    /// Asks for the lines of `heads`' descriptors, then of what each names (the first
    /// `PREFETCH_SPAN` bytes of its buffer, or its indirect table), `write` if the buffers are
    /// to be written. These lines were last written by the guest's core; asked for together,
    /// their misses overlap instead of coming one after another as the burst walks them. Only
    /// hints: nothing is read that the walk does not check again.
    pub fn prefetch(&self, map: &MemMap, heads: impl Iterator<Item = u16> + Clone, write: bool) {
        for h in heads.clone() {
            prefetch_line((self.desc as *const u8).wrapping_add(16 * self.slot(h)), false);
        }
        for h in heads {
            if let Some(d) = self.desc(h) {
                let indirect = d.flags & DESC_F_INDIRECT != 0;
                let span = if indirect { 1 } else { (d.len as usize).clamp(1, PREFETCH_SPAN) };
                if let Some(p) = map.host(d.addr, span) {
                    prefetch_lines(p, span, write && !indirect);
                }
            }
        }
    }

    /// Asks for the used ring's lines that elements `from..from + n` go to, for writing: the
    /// driver last read them, so each would otherwise cost a miss when the burst writes it.
    pub fn prefetch_used(&self, from: u16, n: usize) {
        let size = self.size as usize;
        let start = self.slot(from);
        let first = n.min(size - start);
        // SAFETY: offsets within the used area (4 + 8 * size bytes from its start).
        unsafe {
            prefetch_lines(self.used.add(4 + 8 * start), 8 * first, true);
            if n > first {
                prefetch_lines(self.used.add(4), 8 * (n - first).min(size), true);
            }
        }
    }

    /// Descriptor `i` of the ring's table (None if `i` is out of range).
    #[inline]
    pub fn desc(&self, i: u16) -> Option<Desc> {
        if i >= self.size {
            return None;
        }
        // SAFETY: i < size, within the descriptor table.
        Some(unsafe { read_desc(self.desc.add(16 * i as usize)) })
    }

    /// Asks the driver not to kick while a worker drains the ring: the used ring's NO_NOTIFY
    /// flag, written only if it is not set yet (a burst after a burst writes nothing). With
    /// EVENT_IDX nothing is written: the avail event is simply not moved. virtio-queue's
    /// `disable_notification` stored the flag through vm-memory each burst (a region search
    /// and a dirty-log check, ~2 % of a worker at 64 B); the flag is the device's alone, and
    /// virtio-queue keeps no copy of it, so writing it here leaves its `enable_notification`
    /// (which clears it before a worker sleeps) as it was.
    #[inline]
    pub fn suppress_kicks(&self, map: &MemMap, event_idx: bool, log: bool) {
        if event_idx {
            return;
        }
        let flags = Self::u16_at(self.used);
        if flags.load(Ordering::Relaxed) & USED_F_NO_NOTIFY == 0 {
            flags.store(USED_F_NO_NOTIFY, Ordering::Relaxed);
            if log {
                map.log(self.used, 2);
            }
        }
    }

    /// Writes used element `at` (a ring position, not yet published).
    #[inline]
    pub fn write_used(&self, at: u16, id: u16, len: u32) {
        let slot = self.slot(at);
        // SAFETY: slot < size, within the used area; 4-byte fields of the used element.
        unsafe {
            let e = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(e as *mut [u8; 4], (id as u32).to_le_bytes());
            std::ptr::write_volatile(e.add(4) as *mut [u8; 4], len.to_le_bytes());
        }
    }

    /// Publishes the used index: every element written before is the driver's.
    #[inline]
    pub fn publish_used(&self, idx: u16) {
        // SAFETY: within the used area.
        Self::u16_at(unsafe { self.used.add(2) }).store(idx, Ordering::Release);
    }

    /// Marks used elements `old..new` (ring positions) and the used index dirty in the
    /// migration log: what `write_used` and `publish_used` wrote.
    pub fn log_used(&self, map: &MemMap, old: u16, new: u16) {
        let n = (new.wrapping_sub(old) as usize).min(self.size as usize);
        if n == 0 {
            return;
        }
        let size = self.size as usize;
        let start = self.slot(old);
        let first = n.min(size - start);
        // SAFETY: all offsets stay within the used area translated with 6 + 8 * size bytes.
        unsafe {
            map.log(self.used.add(2), 2);
            map.log(self.used.add(4 + 8 * start), 8 * first);
            if n > first {
                map.log(self.used.add(4), 8 * (n - first));
            }
        }
    }

    /// Whether the driver wants an interrupt for used entries `old..new` (EVENT_IDX's
    /// window, or the NO_INTERRUPT flag without it).
    pub fn wants_interrupt(&self, event_idx: bool, old: u16, new: u16) -> bool {
        if old == new {
            return false;
        }
        // The used index store must be visible before the driver's event is read.
        fence(Ordering::SeqCst);
        if event_idx {
            let event = self.used_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.avail_flags() & AVAIL_F_NO_INTERRUPT == 0
        }
    }
}

/// How much of a buffer a burst asks for ahead (`Ring::prefetch`): a virtio-net header and a
/// small frame, which the frontend's headroom may place across three lines.
const PREFETCH_SPAN: usize = 128;

/// Prefetch hints for the lines of `p..p + len` (see `prefetch_line`).
#[inline(always)]
fn prefetch_lines(p: *const u8, len: usize, write: bool) {
    let first = p as usize & !63;
    let end = p as usize + len.max(1);
    // Which hint, asked once for all the lines.
    let write = write && has_prefetchw();
    let mut line = first;
    while line < end {
        prefetch_line(line as *const u8, write);
        line += 64;
    }
}

/// A cache-line prefetch hint; never faults. For writing (only where the CPU has PREFETCHW:
/// `prefetch_lines` asks), the line is asked for exclusively: the guest's core holds it, and
/// a plain prefetch would bring it shared, leaving the store to wait for a second transfer.
#[inline(always)]
fn prefetch_line(p: *const u8, write: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        if write {
            // `_MM_HINT_ET0` becomes PREFETCHW only where the whole build targets CPUs that
            // have it; this one is chosen at run time.
            std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, write);
}

/// Whether this CPU has PREFETCHW (CPUID 0x8000_0001, ECX bit 8), asked once.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_prefetchw() -> bool {
    use std::sync::atomic::AtomicU8;
    // 0: not asked yet, 1: no, 2: yes.
    static HAS: AtomicU8 = AtomicU8::new(0);
    match HAS.load(Ordering::Relaxed) {
        0 => {
            // The extended leaf is asked only if the CPU lists it.
            use std::arch::x86_64::__cpuid;
            let yes = __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0;
            HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        v => v == 2,
    }
}

/// # Safety
/// `p` points at 16 readable bytes.
#[inline(always)]
unsafe fn read_desc(p: *const u8) -> Desc {
    // Read once (volatile: the guest may rewrite it; what is checked is this copy), as two
    // words when aligned, as drivers place tables; byte by byte otherwise.
    let (lo, hi) = if (p as usize).is_multiple_of(8) {
        (std::ptr::read_volatile(p as *const u64), std::ptr::read_volatile(p.add(8) as *const u64))
    } else {
        let b: [u8; 16] = std::ptr::read_volatile(p as *const [u8; 16]);
        let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = b;
        (u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]), u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]))
    };
    let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
    Desc { addr: lo, len: hi as u32, flags: (hi >> 32) as u16, next: (hi >> 48) as u16 }
}

/// Walks the chain that starts at descriptor `head`, resolving every buffer the device may
/// read (TX, `writable == false`) or write (RX, `writable == true`) into `out`; returns the
/// total length. Indirect tables are followed (one level, as the spec allows). Stops at the
/// first fault: a descriptor index out of range, a buffer of the wrong direction or of
/// length zero, more descriptors than `budget` has left (each one walked is taken from it,
/// which also ends loops), more bytes than `limit`, an address outside guest memory.
pub fn walk_chain(
    ring: &Ring,
    map: &MemMap,
    head: u16,
    writable: bool,
    limit: usize,
    budget: &mut usize,
    out: &mut Vec<Seg>,
) -> Result<usize, DropReason> {
    let mut d = ring.desc(head).ok_or(DropReason::ChainLoop)?;
    // A chain of one buffer (a small frame, a mergeable receive buffer): checked as the loop
    // below would, without its bookkeeping.
    if d.flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
        if *budget == 0 {
            return Err(DropReason::ChainLoop);
        }
        *budget -= 1;
        if (d.flags & DESC_F_WRITE != 0) != writable || d.len == 0 {
            return Err(DropReason::BadDescriptor);
        }
        if d.len as usize > limit {
            return Err(DropReason::Oversize);
        }
        map.resolve(d.addr, d.len as usize, out)?;
        return Ok(d.len as usize);
    }
    let mut total = 0usize;
    // A chain in the main table longer than the table loops.
    let mut direct_left = ring.size;
    // (table, entries) of the indirect table being walked, if any.
    let mut indirect: Option<(*const u8, u16)> = None;
    loop {
        if *budget == 0 || (indirect.is_none() && direct_left == 0) {
            return Err(DropReason::ChainLoop);
        }
        *budget -= 1;
        if indirect.is_none() {
            direct_left -= 1;
        }
        if d.flags & DESC_F_INDIRECT != 0 {
            // An indirect descriptor: only in the main table, alone at the chain's end.
            let n = d.len / 16;
            if indirect.is_some() || d.flags & DESC_F_NEXT != 0 || d.len % 16 != 0 || n == 0 || n > u16::MAX as u32 {
                return Err(DropReason::BadDescriptor);
            }
            let table = map.host(d.addr, d.len as usize).ok_or(DropReason::BadAddress)?;
            indirect = Some((table, n as u16));
            // SAFETY: the table was translated with `n * 16` bytes.
            d = unsafe { read_desc(table) };
            continue;
        }
        if (d.flags & DESC_F_WRITE != 0) != writable || d.len == 0 {
            return Err(DropReason::BadDescriptor);
        }
        total += d.len as usize;
        if total > limit {
            return Err(DropReason::Oversize);
        }
        map.resolve(d.addr, d.len as usize, out)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(total);
        }
        d = match indirect {
            Some((table, n)) if d.next < n => {
                // SAFETY: next < n entries of the translated table.
                unsafe { read_desc(table.add(16 * d.next as usize)) }
            }
            Some(_) => return Err(DropReason::ChainLoop),
            None => ring.desc(d.next).ok_or(DropReason::ChainLoop)?,
        };
    }
}

/// A receiver's ring as translated for its current memory table and ring addresses, kept
/// between deliveries: the translation is redone only when the VMM changes either.
pub struct RingCache {
    /// Holds the memory table the pointers below point into, so it stays mapped (and its
    /// address cannot be reused by another table) while cached.
    mem: std::sync::Arc<Mem>,
    /// desc, avail, used, size.
    key: (u64, u64, u64, u16),
    regions: Regions,
    ring: Ring,
}

// SAFETY: the raw pointers point into the mappings of `mem`, which the cache keeps alive;
// the cache is only used under the receiver's RX lock.
unsafe impl Send for RingCache {}

impl RingCache {
    /// The translation for `q` in the memory table `guard` holds: the cached one if it still
    /// applies, else a fresh one (None: the ring lies outside guest memory).
    pub fn get<Q: virtio_queue::QueueT>(
        cache: &mut Option<RingCache>,
        guard: &vm_memory::atomic::GuestMemoryLoadGuard<Mem>,
        q: &Q,
    ) -> Option<(Regions, Ring)> {
        let key = (q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
        if let Some(c) = cache.as_ref().filter(|c| c.key == key && std::ptr::eq(&*c.mem, &**guard)) {
            return Some((c.regions, c.ring));
        }
        let regions = Regions::of(guard);
        let ring = Ring::new(q, &MemMap::with(regions, guard))?;
        *cache = Some(RingCache { mem: guard.clone().into_inner(), key, regions, ring });
        Some((regions, ring))
    }
}

/// Reusable lists for one RX write, so the steady state never allocates.
#[derive(Default)]
pub struct RxScratch {
    segs: Vec<Seg>,
    chains: Vec<(u16, usize)>,
}

/// A receiver's RX queue while its lock is held: virtio-queue's state, the ring, the map.
/// Frames written through it are the guest's once it is published: `publish`, or when it is
/// dropped, so a batch of frames for one receiver costs one used-index store (the cache line
/// the guest polls) and one read of its avail index, not one of each per frame.
pub struct RxQueue<'a> {
    pub q: &'a mut virtio_queue::Queue,
    pub ring: Ring,
    pub map: MemMap<'a>,
    pub caps: RxCaps,
    /// Set by `write_rx` when the ring was a maze (more descriptors or chains than a frame may
    /// cost): what it walked was handed back empty, and the receiver should be left alone
    /// until it kicks.
    pub maze: bool,
    /// The VMM logs dirty pages (a live migration): every byte written is marked.
    pub log: bool,
    /// The driver's avail index as last read; read again only once the buffers it showed
    /// are used up.
    avail: u16,
    /// The used index the driver has been shown.
    published: u16,
}

impl<'a> RxQueue<'a> {
    pub fn new(q: &'a mut virtio_queue::Queue, ring: Ring, map: MemMap<'a>, caps: RxCaps, log: bool) -> RxQueue<'a> {
        use virtio_queue::QueueT;
        let (avail, published) = (q.next_avail(), q.next_used());
        RxQueue { q, ring, map, caps, maze: false, log, avail, published }
    }

    /// Asks for the receive chains the next `frames` frames will take (`Ring::prefetch`) and
    /// the used elements they will fill, up to what the guest has posted.
    pub fn prefetch(&mut self, frames: usize) {
        use virtio_queue::QueueT;
        let next = self.q.next_avail();
        if self.avail == next {
            self.avail = self.ring.avail_idx();
        }
        let posted = self.avail.wrapping_sub(next);
        if posted > self.ring.size {
            return;
        }
        let k = posted.min(frames.min(PREFETCH_MAX) as u16);
        let ring = self.ring;
        self.ring.prefetch(&self.map, (0..k).map(|j| ring.avail_entry(next.wrapping_add(j))), true);
        self.ring.prefetch_used(self.q.next_used(), k as usize);
    }

    /// Shows the driver the used elements written since the last time, with one release
    /// store of the used index.
    pub fn publish(&mut self) {
        use virtio_queue::QueueT;
        let used = self.q.next_used();
        if used != self.published {
            // Marked before the index is published: a frontend that sees the index also
            // sees the pages marked (a migration's last sync cannot miss them).
            if self.log {
                self.ring.log_used(&self.map, self.published, used);
            }
            self.ring.publish_used(used);
            self.published = used;
        }
    }
}

impl Drop for RxQueue<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// Returns `chains` (and `extra`, a head outside them) to the guest unused, as used elements
/// of length 0 from position `used` on; returns the next position. A head outside the table
/// names no buffer and is not returned.
fn hand_back(ring: &Ring, chains: &[(u16, usize)], extra: Option<u16>, mut used: u16) -> u16 {
    for head in chains.iter().map(|&(h, _)| h).chain(extra).filter(|&h| h < ring.size) {
        ring.write_used(used, head, 0);
        used = used.wrapping_add(1);
    }
    used
}

/// Writes the receive header (`hdr_len` bytes of `hdr`) and `len` bytes of `src` from
/// `src_off` into the receive buffers `dst`, marking what was written in the migration log
/// while the VMM logs.
#[inline]
#[allow(clippy::too_many_arguments)]
fn fill(dst: &[Seg], map: &MemMap, log: bool, hdr: VnetHeader, hdr_len: usize, src: &[Seg], src_off: usize, len: usize) {
    let h = hdr.to_bytes();
    copy_segs(dst, 0, &[Seg::of_slice(&h[..hdr_len])], 0, hdr_len);
    copy_segs(dst, hdr_len, src, src_off, len);
    if log {
        for s in window(dst, 0, hdr_len + len) {
            map.log(s.ptr, s.len);
        }
    }
}

/// `write_rx` for the common case: the next posted receive chain is one writable buffer, in
/// one region, that holds the header and the whole frame (a mergeable buffer, or a big one).
/// The same checks as the walk (index in the table, direction, length, address) on the one
/// descriptor, without its lists; false (nothing written, nothing taken) when the case does
/// not apply, and the walk decides.
#[inline]
fn write_rx_one(rxq: &mut RxQueue, mut hdr: VnetHeader, src: &[Seg], src_off: usize, len: usize) -> bool {
    use virtio_queue::QueueT;
    let (ring, caps) = (&rxq.ring, rxq.caps);
    let need = caps.hdr_len + len;
    let (next, used) = (rxq.q.next_avail(), rxq.q.next_used());
    if rxq.avail == next {
        rxq.avail = ring.avail_idx();
    }
    let posted = rxq.avail.wrapping_sub(next);
    if posted == 0 || posted > ring.size {
        return false;
    }
    let head = ring.avail_entry(next);
    let Some(d) = ring.desc(head) else { return false };
    if d.flags != DESC_F_WRITE || (d.len as usize) < need {
        return false;
    }
    // The whole buffer, as the walk resolves it: one that runs out of guest memory or across
    // regions is the walk's to judge.
    let Some(p) = rxq.map.host(d.addr, d.len as usize) else { return false };
    hdr.num_buffers = 1;
    fill(&[Seg { ptr: p, len: need }], &rxq.map, rxq.log, hdr, caps.hdr_len, src, src_off, len);
    ring.write_used(used, head, need as u32);
    rxq.q.set_next_used(used.wrapping_add(1));
    rxq.q.set_next_avail(next.wrapping_add(1));
    true
}

/// Writes a virtio-net header and `len` bytes from `src` (from `src_off` on) into the
/// receiver's RX ring: one chain, or with MRG_RXBUF as many as needed (`num_buffers`); the
/// queue publishes them (`RxQueue::publish`, or when dropped). On failure the chains taken are left on the ring untouched, except broken
/// ones met first, which are handed back empty so the guest gets them back.
#[allow(clippy::too_many_arguments)]
pub fn write_rx(
    rxq: &mut RxQueue,
    mut hdr: VnetHeader,
    src: &[Seg],
    src_off: usize,
    len: usize,
    rx: &mut RxScratch,
) -> Result<(), DropReason> {
    use virtio_queue::QueueT;
    let caps = rxq.caps;
    let need = caps.hdr_len + len;
    if write_rx_one(rxq, hdr, src, src_off, len) {
        return Ok(());
    }
    let (ring, map) = (&rxq.ring, &rxq.map);
    rx.segs.clear();
    rx.chains.clear();
    let mut avail = rxq.avail;
    let (mut next, mut used) = (rxq.q.next_avail(), rxq.q.next_used());
    // Where the chains of this frame start (after any broken ones handed back).
    let mut first = next;
    let mut cap = 0usize;
    let mut budget = MAX_RX_DESCS;
    let result = loop {
        if cap >= need {
            break Ok(());
        }
        // The buffers seen at the last read are used up: look again (once per batch while
        // the guest keeps up).
        if avail == next {
            avail = ring.avail_idx();
            rxq.avail = avail;
        }
        // Nothing posted, or an avail index more than a ring ahead (corrupt): no buffer.
        let posted = avail.wrapping_sub(next);
        if posted == 0 || posted > ring.size {
            break Err(DropReason::NoRxBuffer);
        }
        // The receiver's ring is a maze of tiny or broken chains: this frame is not written,
        // what it walked goes back empty (so the ring moves on), and the receiver waits for
        // its next kick: a sender pays this walk once, not once per frame.
        if budget == 0 || rx.chains.len() == MAX_RX_CHAINS {
            used = hand_back(ring, &rx.chains, None, used);
            rx.chains.clear();
            first = next;
            rxq.maze = true;
            break Err(DropReason::NoRxBuffer);
        }
        let head = ring.avail_entry(next);
        next = next.wrapping_add(1);
        let start = rx.segs.len();
        match walk_chain(ring, map, head, true, usize::MAX >> 1, &mut budget, &mut rx.segs) {
            Ok(c) => {
                rx.chains.push((head, c));
                cap += c;
            }
            Err(_) if budget == 0 => {
                used = hand_back(ring, &rx.chains, Some(head), used);
                rx.chains.clear();
                first = next;
                rxq.maze = true;
                break Err(DropReason::NoRxBuffer);
            }
            Err(_) if rx.chains.is_empty() => {
                // A broken receive buffer is handed back empty so the guest gets it back.
                rx.segs.truncate(start);
                used = hand_back(ring, &[], Some(head), used);
                first = next;
                continue;
            }
            Err(e) => break Err(e),
        }
        if !caps.mrg_rxbuf && cap < need {
            break Err(DropReason::RxBufferTooSmall);
        }
    };
    if result.is_ok() {
        hdr.num_buffers = rx.chains.len() as u16;
        fill(&rx.segs, map, rxq.log, hdr, caps.hdr_len, src, src_off, len);
        let mut left = need;
        for &(head, c) in &rx.chains {
            let n = c.min(left);
            left -= n;
            ring.write_used(used, head, n as u32);
            used = used.wrapping_add(1);
        }
        first = next;
    }
    rxq.q.set_next_used(used);
    rxq.q.set_next_avail(first);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_reads_the_same_at_any_alignment() {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        d[8..12].copy_from_slice(&1514u32.to_le_bytes());
        d[12..14].copy_from_slice(&(DESC_F_NEXT | DESC_F_WRITE).to_le_bytes());
        d[14..].copy_from_slice(&513u16.to_le_bytes());
        let mut buf = [0u64; 5];
        let base = buf.as_mut_ptr() as *mut u8;
        for off in [0usize, 1, 3, 8] {
            // SAFETY: 16 bytes from `off` (at most 8) lie within the 40-byte buffer.
            let got = unsafe {
                std::ptr::copy_nonoverlapping(d.as_ptr(), base.add(off), 16);
                read_desc(base.add(off))
            };
            assert_eq!((got.addr, got.len, got.flags, got.next), (0x1122_3344_5566_7788, 1514, 3, 513), "at offset {off}");
        }
    }
}
