//! Rate limits per port (`[network.port.bandwidth]`, libvirt's `<bandwidth>`): a token bucket
//! at the average rate, `burst` deep, and optionally a second at the peak rate one frame deep.
//!
//! Whole frames are charged, TSO segments of 64 KiB included: a frame goes when the bucket is
//! not in debt, and may take it into debt by up to its own size, so a segment larger than the
//! burst is never refused for its size (a policer with a small burst drops every TSO frame,
//! which is what made libvirt's early outbound limits crawl). The average still holds: the
//! next frame waits until the debt is paid. Pure: the caller passes the time.

/// libvirt's units: rates in kilobytes (1000 bytes) per second, burst in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub average_kbs: u64,
    pub peak_kbs: Option<u64>,
    pub burst_kib: Option<u64>,
}

/// One bucket: bytes saved up (negative: debt), refilled at `rate` bytes per second.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Bytes per second.
    rate: u64,
    /// Most bytes saved up.
    depth: i64,
    /// Bytes available now; negative: debt.
    tokens: i64,
    last_ns: u64,
}

impl Bucket {
    fn new(rate: u64, depth: i64, now_ns: u64) -> Bucket {
        Bucket { rate, depth, tokens: depth, last_ns: now_ns }
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        if dt == 0 {
            return;
        }
        let add = (dt as u128 * self.rate as u128 / 1_000_000_000) as i64;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.depth);
            // Keep the remainder of a partial byte: advance only by the time the bytes took.
            self.last_ns += (add as u128 * 1_000_000_000 / self.rate as u128) as u64;
            if self.tokens == self.depth {
                self.last_ns = now_ns;
            }
        }
    }

    /// Nanoseconds until the bucket is out of debt (0: it is).
    fn wait_ns(&self) -> u64 {
        if self.tokens >= 0 {
            0
        } else {
            ((-self.tokens) as u128 * 1_000_000_000).div_ceil(self.rate as u128) as u64
        }
    }
}

/// A port's limit in one direction.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    average: Bucket,
    peak: Option<Bucket>,
}

/// The depth of a bucket whose burst is not given: 100 ms at the average rate, and never less
/// than a 64 KiB TSO frame.
pub const MIN_DEPTH: u64 = 65_536 + 18 + 12;

impl TokenBucket {
    pub fn new(rate: Rate, now_ns: u64) -> TokenBucket {
        let avg = rate.average_kbs.max(1) * 1000;
        let depth = match rate.burst_kib {
            Some(b) => (b * 1024).max(1),
            None => (avg / 10).max(MIN_DEPTH),
        };
        TokenBucket {
            average: Bucket::new(avg, depth as i64, now_ns),
            // The peak bucket holds one frame: back-to-back frames go no faster than the peak.
            peak: rate.peak_kbs.map(|p| Bucket::new(p.max(1) * 1000, MIN_DEPTH as i64, now_ns)),
        }
    }

    /// Charges a frame of `bytes` if the buckets are out of debt: Ok. Else Err(ns to wait
    /// before asking again); nothing is charged.
    pub fn take(&mut self, bytes: usize, now_ns: u64) -> Result<(), u64> {
        self.average.refill(now_ns);
        let mut wait = self.average.wait_ns();
        if let Some(p) = self.peak.as_mut() {
            p.refill(now_ns);
            wait = wait.max(p.wait_ns());
        }
        if wait > 0 {
            return Err(wait);
        }
        self.average.tokens -= bytes as i64;
        if let Some(p) = self.peak.as_mut() {
            p.tokens -= bytes as i64;
        }
        Ok(())
    }

    /// Nanoseconds until a frame may go (0: now).
    pub fn wait_ns(&mut self, now_ns: u64) -> u64 {
        self.average.refill(now_ns);
        let mut wait = self.average.wait_ns();
        if let Some(p) = self.peak.as_mut() {
            p.refill(now_ns);
            wait = wait.max(p.wait_ns());
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn rate(avg: u64, burst: Option<u64>) -> Rate {
        Rate { average_kbs: avg, peak_kbs: None, burst_kib: burst }
    }

    /// Sends as fast as the bucket lets `frame`-byte frames through for `secs` seconds; the
    /// bytes that went.
    fn run(b: &mut TokenBucket, frame: usize, secs: u64) -> u64 {
        let (mut now, mut sent) = (0u64, 0u64);
        while now < secs * 1000 * MS {
            match b.take(frame, now) {
                Ok(()) => sent += frame as u64,
                Err(w) => now += w,
            }
        }
        sent
    }

    #[test]
    fn the_average_holds_for_small_and_tso_frames() {
        // 12500 kB/s = 100 Mbit/s.
        for frame in [1514, 65_536 + 54] {
            let mut b = TokenBucket::new(rate(12_500, None), 0);
            let sent = run(&mut b, frame, 10);
            let want = 12_500_000u64 * 10;
            // Within the burst (the first 100 ms saved up) and one frame of the target.
            assert!(sent >= want && sent <= want + 1_250_000 + 2 * frame as u64, "{frame}-byte frames: {sent} bytes in 10 s");
        }
    }

    #[test]
    fn a_tso_frame_larger_than_the_burst_still_goes() {
        // A 4 KiB burst and a 64 KiB frame: it goes (the bucket goes into debt) and the next
        // waits the debt out.
        let mut b = TokenBucket::new(rate(1000, Some(4)), 0);
        assert_eq!(b.take(65_536, 0), Ok(()));
        let wait = b.take(100, 0).unwrap_err();
        // (65536 - 4096) bytes at 1,000,000 bytes/s: about 61.4 ms.
        assert!((61 * MS..62 * MS).contains(&wait), "{wait}");
        assert_eq!(b.take(100, wait), Ok(()));
    }

    #[test]
    fn a_burst_is_saved_up_while_idle_and_no_more() {
        let mut b = TokenBucket::new(rate(1000, Some(100)), 0);
        // Empty it, then idle 10 s: only the 100 KiB burst comes back.
        assert_eq!(b.take(102_400, 0), Ok(()));
        let now = 10_000 * MS;
        let mut sent = 0;
        while b.take(1000, now).is_ok() {
            sent += 1000;
        }
        assert!((102_400..=103_400).contains(&sent), "{sent}");
    }

    #[test]
    fn the_peak_spaces_frames_out() {
        let mut b = TokenBucket::new(Rate { average_kbs: 100_000, peak_kbs: Some(1000), burst_kib: Some(10_000) }, 0);
        // The average bucket holds 10 MB, but frames go at the 1 MB/s peak after the first 64 KiB.
        let sent = run(&mut b, 1514, 1);
        assert!(sent <= 1_000_000 + MIN_DEPTH + 2 * 1514, "{sent}");
        assert!(sent >= 1_000_000, "{sent}");
    }
}
