//! The receive backlog of a guest port: frames held (one extra copy) while the guest's RX
//! ring is full, like a tap device's queue, bounded in frames and bytes.

use std::collections::VecDeque;

use vunet_switch::vnet::VnetHeader;
use vunet_switch::DropReason;

use super::ring::{gather, Seg};

/// Frames waiting for a receiver whose ring was full, like a tap device's queue: a TCP
/// burst into a momentarily slow guest is held (one extra copy) instead of dropped, and the
/// sender never waits. Bounded in frames and bytes; beyond that, frames are dropped and counted.
#[derive(Default)]
pub struct Backlog {
    pub(super) frames: VecDeque<(VnetHeader, Vec<u8>)>,
    /// The receiver's ring was a maze: senders queue here without walking it again until the
    /// guest kicks.
    pub(super) stalled: bool,
    bytes: usize,
    pool: Vec<Vec<u8>>,
}

pub const BACKLOG_MAX_FRAMES: usize = 1024;
pub const BACKLOG_MAX_BYTES: usize = 4 << 20;

impl Backlog {
    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub(super) fn push(&mut self, hdr: VnetHeader, src: &[Seg], off: usize, len: usize) -> Result<(), DropReason> {
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

    pub(super) fn pop_front(&mut self) {
        if let Some((_, buf)) = self.frames.pop_front() {
            self.bytes -= buf.len();
            if self.pool.len() < 64 {
                self.pool.push(buf);
            }
        }
    }
}
