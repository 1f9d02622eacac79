//! Guest memory as the data path touches it: bounds-checked host segments (`Seg`) of guest
//! buffers or scratch buffers, and copies between scatter lists. Nothing here knows about
//! rings, switching or ports.

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringMutex;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vunet_switch::DropReason;

/// A guest's memory as the data path reads it. Each region carries the dirty log of a live
/// migration (empty until the VMM sends SET_LOG_BASE): writes through vm-memory mark it
/// themselves, the data path's raw copies mark it with `log_dirty`.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// The memory of the guest connected to a port right now (swapped on each connection).
pub type GuestMem = GuestMemoryAtomic<Mem>;
/// One virtqueue of a guest port, with its own lock.
pub type Vring = VringMutex<GuestMem>;

/// A resolved, bounds-checked piece of guest memory (or of a scratch buffer).
#[derive(Clone, Copy)]
pub struct Seg {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: a Seg is only dereferenced while the memory guard it was resolved from is alive,
// within one call on one thread; storing it in a struct that crosses threads between calls is
// harmless because stale Segs are cleared before reuse.
unsafe impl Send for Seg {}

impl Seg {
    /// A read-only source segment over a byte slice.
    pub(super) fn of_slice(b: &[u8]) -> Seg {
        Seg { ptr: b.as_ptr() as *mut u8, len: b.len() }
    }
    /// A destination segment over a mutable byte slice.
    pub(super) fn of_mut(b: &mut [u8]) -> Seg {
        Seg { ptr: b.as_mut_ptr(), len: b.len() }
    }
}

/// Copies `len` bytes from the scatter list `src` (starting `src_off` bytes in) into the
/// scatter list `dst` (starting `dst_off` bytes in). The caller guarantees both lists hold
/// enough bytes.
pub(super) fn copy_segs(dst: &[Seg], mut dst_off: usize, src: &[Seg], mut src_off: usize, mut len: usize) {
    // The common case, a small frame: both ranges inside the first segments, one copy.
    if let (Some(d), Some(s)) = (dst.first(), src.first()) {
        if dst_off + len <= d.len && src_off + len <= s.len {
            // SAFETY: as below, both ranges within their first segment.
            unsafe { std::ptr::copy_nonoverlapping(s.ptr.add(src_off), d.ptr.add(dst_off), len) };
            return;
        }
    }
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

/// The pieces of the scatter list `src` that hold its bytes `off..off + len` (no copy).
pub(super) fn window(src: &[Seg], off: usize, len: usize) -> impl Iterator<Item = Seg> + '_ {
    let (mut skip, mut left) = (off, len);
    src.iter().filter_map(move |s| {
        if left == 0 {
            return None;
        }
        if skip >= s.len {
            skip -= s.len;
            return None;
        }
        let take = (s.len - skip).min(left);
        // SAFETY: `skip + take` is within the segment, which stays as live as `src`'s.
        let piece = Seg { ptr: unsafe { s.ptr.add(skip) }, len: take };
        left -= take;
        skip = 0;
        Some(piece)
    })
}

/// Appends to `out` the pieces of `src` from byte `off` on (no copy).
pub(super) fn push_tail(src: &[Seg], off: usize, out: &mut Vec<Seg>) {
    out.extend(window(src, off, usize::MAX));
}

/// Gathers up to `out.len()` bytes starting at `off` of a scatter list; returns how many.
pub(super) fn gather(src: &[Seg], off: usize, out: &mut [u8]) -> usize {
    let total: usize = src.iter().map(|s| s.len).sum();
    let n = out.len().min(total.saturating_sub(off));
    copy_segs(&[Seg::of_mut(out)], 0, src, off, n);
    n
}

/// Marks the guest pages under `len` bytes at host address `ptr` (inside one region of `mem`)
/// dirty in the migration log. Called only while the VMM logs (VHOST_F_LOG_ALL acked): the
/// region search happens then, never on the plain data path.
pub(super) fn log_dirty(mem: &Mem, ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let p = ptr as usize;
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else { continue };
        let off = p.wrapping_sub(host as usize);
        if p >= host as usize && (off as u64) < r.len() {
            // The region's bitmap turns region offsets into log bits (guest address / 4096).
            r.bitmap().mark_dirty(off, len.min(r.len() as usize - off));
            return;
        }
    }
}

/// Resolves `len` bytes at `addr` into one or more segments (a buffer may straddle regions).
pub(super) fn resolve(mem: &Mem, addr: vm_memory::GuestAddress, len: usize, out: &mut Vec<Seg>) -> Result<(), DropReason> {
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
