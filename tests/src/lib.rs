//! A vhost-user-net frontend for tests and benchmarks: it connects to vunet exactly like a VMM
//! does (memfd guest memory, split virtqueues in that memory, kick and call eventfds) and plays
//! the guest driver's part on the rings. No VM: fast, deterministic, and able to hand vunet the
//! malformed descriptors a hostile guest could.
//!
//! Guest-physical layout of the 64 MiB memfd:
//! `0x0000_0000` RX rings, `0x0010_0000` TX rings, `0x0100_0000` RX buffers,
//! `0x0200_0000` TX buffers.

pub mod guest;
pub mod netns;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vunet_switch::vnet::VnetHeader;

pub use vunet_switch;

pub const MEM_SIZE: usize = 64 << 20;
pub const QUEUE_SIZE: u16 = 256;
const RX_RINGS: u64 = 0x0000_0000;
const TX_RINGS: u64 = 0x0010_0000;
const RX_BUFS: u64 = 0x0100_0000;
const TX_BUFS: u64 = 0x0200_0000;
/// One TX slot holds a header and the largest frame, rounded up.
pub const TX_SLOT: u64 = 0x1_1000;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

pub const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Feature bits (virtio-net) the tests refer to.
pub mod feat {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const MTU: u64 = 1 << 3;
    pub const STATUS: u64 = 1 << 16;
    /// Everything this driver implements (split rings only: never RING_PACKED, IN_ORDER,
    /// ACCESS_PLATFORM or NOTIFICATION_DATA, whatever a device offers).
    pub const DRIVER: u64 = CSUM
        | GUEST_CSUM
        | MAC
        | MTU
        | GUEST_TSO4
        | GUEST_TSO6
        | HOST_TSO4
        | HOST_TSO6
        | MRG_RXBUF
        | STATUS
        | INDIRECT_DESC
        | EVENT_IDX
        | VERSION_1;
}

/// How the simulated VMM talks to vunet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// QEMU's order: SET_MEM_TABLE, per-queue setup, enable.
    Qemu,
    /// cloud-hypervisor's order (reference §3.5): protocol features MQ, REPLY_ACK,
    /// CONFIGURE_MEM_SLOTS and CONFIG, NEED_REPLY on every message, GET_QUEUE_NUM, GET_CONFIG,
    /// memory through ADD_MEM_REG, all SET_VRING_NUM first, then ADDR/BASE/CALL/KICK per queue,
    /// then SET_VRING_ENABLE for all.
    CloudHypervisor,
}

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Features the simulated guest is willing to accept (ANDed with what vunet offers).
    pub accept_features: u64,
    /// Size of each receive buffer posted.
    pub rx_buf_size: u32,
    pub handshake: Handshake,
}

impl SimOptions {
    /// A modern Linux guest: every offload, mergeable receive buffers of 2 KiB.
    pub fn full() -> Self {
        SimOptions { accept_features: feat::DRIVER & !feat::EVENT_IDX, rx_buf_size: 2048, handshake: Handshake::Qemu }
    }
    /// A guest without receive offloads (`guest_tso4=off,guest_csum=off`, no MRG_RXBUF).
    pub fn no_offloads() -> Self {
        SimOptions {
            accept_features: feat::DRIVER & !(feat::GUEST_CSUM | feat::GUEST_TSO4 | feat::GUEST_TSO6 | feat::MRG_RXBUF | feat::EVENT_IDX),
            rx_buf_size: 2048,
            handshake: Handshake::Qemu,
        }
    }
}

/// The driver's side of one split virtqueue.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn at(base: u64) -> Self {
        let q = QUEUE_SIZE as u64;
        let desc = base;
        let avail = desc + 16 * q;
        let used = (avail + 6 + 2 * q + 4095) & !4095;
        DriverQueue { desc, avail, used, avail_idx: 0, used_seen: 0 }
    }
}

/// A simulated guest with one virtio-net queue pair connected to a vunet port.
pub struct VmSim {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub queue_num: Option<u64>,
    pub config: Option<Vec<u8>>,
    opts: SimOptions,
    tx_next: u16,
    rx_posted: u16,
}

fn memfd_memory() -> std::io::Result<GuestMemoryMmap> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vunet-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM_SIZE as u64)?;
    GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(f, 0)))])
        .map_err(|e| std::io::Error::other(format!("{e:?}")))
}

/// vhost's VHOST_F_LOG_ALL feature bit: the VMM logs dirty pages (a live migration runs).
pub const LOG_ALL: u64 = 1 << 26;

/// The dirty page log a VMM shares with the backend during a live migration (SET_LOG_BASE):
/// one bit per 4 KiB guest page, bit `gpa / 4096`.
pub struct DirtyLog {
    file: File,
    len: usize,
}

impl DirtyLog {
    /// The guest page numbers marked dirty.
    pub fn pages(&self) -> std::collections::BTreeSet<u64> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; self.len];
        self.file.read_exact_at(&mut b, 0).expect("read the log");
        let mut set = std::collections::BTreeSet::new();
        for (i, byte) in b.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    set.insert(i as u64 * 8 + bit);
                }
            }
        }
        set
    }

    /// Clears every bit (as the VMM does after each sync).
    pub fn clear(&self) {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(&vec![0u8; self.len], 0).expect("clear the log");
    }
}

fn err(e: impl std::fmt::Debug) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

impl VmSim {
    /// Whether vunet still holds the vhost-user connection (a peek that reads end-of-file
    /// means it closed it).
    pub fn is_connected(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut b = [0u8; 1];
        // SAFETY: a non-blocking peek into a one-byte buffer on the frontend's own socket.
        let n = unsafe { libc::recv(self.fe.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        n != 0
    }

    /// Connects to a server-mode port's socket (retrying briefly while vunet starts).
    pub fn connect(path: &Path, opts: SimOptions) -> std::io::Result<VmSim> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Self::handshake(sock, opts)
    }

    /// Runs the vhost-user handshake over an established connection (either side listened).
    pub fn handshake(sock: UnixStream, opts: SimOptions) -> std::io::Result<VmSim> {
        let mem = memfd_memory()?;
        let fe = Frontend::from_stream(sock, 2);
        fe.set_owner().map_err(err)?;
        let offered = fe.get_features().map_err(err)?;
        let features = offered & ((opts.accept_features & feat::DRIVER) | PROTOCOL_FEATURES);
        let mut sim = VmSim {
            fe,
            mem,
            rx: DriverQueue::at(RX_RINGS),
            tx: DriverQueue::at(TX_RINGS),
            kicks: [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?],
            calls: [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?],
            features,
            protocol_features: VhostUserProtocolFeatures::empty(),
            queue_num: None,
            config: None,
            opts: opts.clone(),
            tx_next: 0,
            rx_posted: 0,
        };
        let region = VhostUserMemoryRegionInfo::from_guest_region(sim.mem.find_region(GuestAddress(0)).ok_or_else(|| err("no region"))?)
            .map_err(err)?;
        match opts.handshake {
            Handshake::Qemu => {
                if offered & PROTOCOL_FEATURES != 0 {
                    let p = sim.fe.get_protocol_features().map_err(err)?;
                    let want = p & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
                    sim.fe.set_protocol_features(want).map_err(err)?;
                    sim.protocol_features = want;
                    sim.queue_num = Some(sim.fe.get_queue_num().map_err(err)?);
                }
                sim.fe.set_features(features).map_err(err)?;
                sim.fe.set_mem_table(&[region]).map_err(err)?;
                for i in 0..2 {
                    sim.setup_queue(i)?;
                }
                for i in 0..2 {
                    sim.fe.set_vring_enable(i, true).map_err(err)?;
                }
            }
            Handshake::CloudHypervisor => {
                let p = sim.fe.get_protocol_features().map_err(err)?;
                let ch = VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                    | VhostUserProtocolFeatures::LOG_SHMFD
                    | VhostUserProtocolFeatures::DEVICE_STATE
                    | VhostUserProtocolFeatures::CONFIG;
                let want = p & ch;
                sim.fe.set_protocol_features(want).map_err(err)?;
                sim.protocol_features = want;
                sim.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                sim.queue_num = Some(sim.fe.get_queue_num().map_err(err)?);
                let (_, cfg) = sim.fe.get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12]).map_err(err)?;
                sim.config = Some(cfg.to_vec());
                sim.fe.set_features(features).map_err(err)?;
                sim.fe.add_mem_region(&region).map_err(err)?;
                for i in 0..2 {
                    sim.fe.set_vring_num(i, QUEUE_SIZE).map_err(err)?;
                }
                for i in 0..2 {
                    sim.setup_queue_rest(i)?;
                }
                for i in 0..2 {
                    sim.fe.set_vring_enable(i, true).map_err(err)?;
                }
            }
        }
        Ok(sim)
    }

    fn setup_queue(&mut self, i: usize) -> std::io::Result<()> {
        self.fe.set_vring_num(i, QUEUE_SIZE).map_err(err)?;
        self.setup_queue_rest(i)
    }

    fn setup_queue_rest(&mut self, i: usize) -> std::io::Result<()> {
        let q = if i == 0 { &self.rx } else { &self.tx };
        let va = |gpa: u64| self.mem.get_host_address(GuestAddress(gpa)).map(|p| p as u64).map_err(err);
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: va(q.desc)?,
            used_ring_addr: va(q.used)?,
            avail_ring_addr: va(q.avail)?,
            log_addr: None,
        };
        self.fe.set_vring_addr(i, &cfg).map_err(err)?;
        self.fe.set_vring_base(i, 0).map_err(err)?;
        self.fe.set_vring_call(i, &self.calls[i]).map_err(err)?;
        self.fe.set_vring_kick(i, &self.kicks[i]).map_err(err)?;
        Ok(())
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// Starts a live migration's dirty logging as QEMU does: LOG_SHMFD, SET_LOG_BASE with a
    /// memfd log covering guest memory, then SET_FEATURES with VHOST_F_LOG_ALL.
    pub fn start_dirty_log(&mut self) -> std::io::Result<DirtyLog> {
        use std::os::fd::AsRawFd;
        let p = self.protocol_features | VhostUserProtocolFeatures::LOG_SHMFD;
        self.fe.set_protocol_features(p).map_err(err)?;
        self.protocol_features = p;
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"vunet-test-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = (MEM_SIZE / 4096 / 8).next_multiple_of(4096);
        file.set_len(len as u64)?;
        let region = vhost::VhostUserDirtyLogRegion { mmap_size: len as u64, mmap_offset: 0, mmap_handle: file.as_raw_fd() };
        self.fe.set_log_base(0, Some(region)).map_err(err)?;
        self.fe.set_features(self.features | LOG_ALL).map_err(err)?;
        // SET_FEATURES has no reply: one request with a reply behind it returns once vunet
        // has taken it.
        self.fe.get_features().map_err(err)?;
        Ok(DirtyLog { file, len })
    }

    /// Ends dirty logging (a cancelled migration): SET_FEATURES without VHOST_F_LOG_ALL;
    /// returns once vunet has taken it.
    pub fn stop_dirty_log(&mut self) -> std::io::Result<()> {
        self.fe.set_features(self.features).map_err(err)?;
        self.fe.get_features().map(|_| ()).map_err(err)
    }

    /// Guest address of the RX ring's used area, and of receive buffer `i`.
    pub fn rx_used_gpa(&self) -> u64 {
        self.rx.used
    }

    pub fn rx_buf_gpa(&self, i: u16) -> u64 {
        RX_BUFS + (i % QUEUE_SIZE) as u64 * self.opts.rx_buf_size as u64
    }

    /// Length of the virtio-net header on this device.
    pub fn hdr_len(&self) -> usize {
        if self.has(feat::VERSION_1) || self.has(feat::MRG_RXBUF) {
            12
        } else {
            10
        }
    }

    fn write_desc(&self, q_desc: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(q_desc + 16 * index as u64);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).expect("descriptor write");
    }

    fn push_avail(mem: &GuestMemoryMmap, q: &mut DriverQueue, head: u16) {
        let slot = q.avail_idx % QUEUE_SIZE;
        mem.write_obj(head, GuestAddress(q.avail + 4 + 2 * slot as u64)).expect("avail ring");
        fence(Ordering::Release);
        q.avail_idx = q.avail_idx.wrapping_add(1);
        mem.write_obj(q.avail_idx, GuestAddress(q.avail + 2)).expect("avail idx");
        fence(Ordering::SeqCst);
    }

    /// Whether the device wants a kick after the driver moved avail from `old` to `new`
    /// (VRING_USED_F_NO_NOTIFY, or the avail_event index with EVENT_IDX), as Linux decides.
    fn kick_wanted(&self, q: &DriverQueue, old: u16, new: u16) -> bool {
        fence(Ordering::SeqCst);
        if self.has(feat::EVENT_IDX) {
            let ev: u16 = self.mem.read_obj(GuestAddress(q.used + 4 + 8 * QUEUE_SIZE as u64)).unwrap_or(0);
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(q.used)).unwrap_or(0);
            flags & 1 == 0
        }
    }

    fn used_idx(&self, q: &DriverQueue) -> u16 {
        let v: u16 = self.mem.read_obj(GuestAddress(q.used + 2)).expect("used idx");
        fence(Ordering::Acquire);
        v
    }

    fn used_elem(&self, q: &DriverQueue, i: u16) -> (u32, u32) {
        let at = q.used + 4 + 8 * (i % QUEUE_SIZE) as u64;
        (self.mem.read_obj(GuestAddress(at)).expect("used id"), self.mem.read_obj(GuestAddress(at + 4)).expect("used len"))
    }

    /// Posts receive buffers until `n` are outstanding (descriptor i ↔ buffer i).
    pub fn post_rx(&mut self, n: u16) {
        let n = n.min(QUEUE_SIZE);
        if self.rx_posted >= n {
            return;
        }
        let old = self.rx.avail_idx;
        while self.rx_posted < n {
            let i = self.rx.avail_idx % QUEUE_SIZE;
            let addr = RX_BUFS + i as u64 * self.opts.rx_buf_size as u64;
            self.write_desc(self.rx.desc, i, addr, self.opts.rx_buf_size, VIRTQ_DESC_F_WRITE, 0);
            Self::push_avail(&self.mem, &mut self.rx, i);
            self.rx_posted += 1;
        }
        if self.kick_wanted(&self.rx, old, self.rx.avail_idx) {
            let _ = self.kicks[0].write(1);
        }
    }

    /// Sends one frame with the given header, as one descriptor (or two, header apart, when
    /// `split` is true, as Linux does without ANY_LAYOUT tricks).
    pub fn send_with(&mut self, hdr: &VnetHeader, frame: &[u8], split: bool) {
        self.wait_tx_room();
        let slot = self.tx_next % (QUEUE_SIZE / 2);
        self.tx_next = self.tx_next.wrapping_add(1);
        let base = TX_BUFS + slot as u64 * TX_SLOT;
        let hl = self.hdr_len();
        let mut h = [0u8; 12];
        hdr.write(&mut h[..hl]);
        self.mem.write_slice(&h[..hl], GuestAddress(base)).expect("hdr");
        self.mem.write_slice(frame, GuestAddress(base + hl as u64)).expect("frame");
        let d0 = slot * 2;
        if split {
            self.write_desc(self.tx.desc, d0, base, hl as u32, VIRTQ_DESC_F_NEXT, d0 + 1);
            self.write_desc(self.tx.desc, d0 + 1, base + hl as u64, frame.len() as u32, 0, 0);
        } else {
            self.write_desc(self.tx.desc, d0, base, (hl + frame.len()) as u32, 0, 0);
        }
        Self::push_avail(&self.mem, &mut self.tx, d0);
        let _ = self.kicks[1].write(1);
    }

    pub fn send(&mut self, frame: &[u8]) {
        self.send_with(&VnetHeader::default(), frame, false)
    }

    /// Sends a hand-made descriptor chain: `descs` are written at table indices
    /// `first..first+descs.len()` (the slot range a test reserves), `head` goes on the ring.
    pub fn send_raw_chain(&mut self, first: u16, descs: &[(u64, u32, u16, u16)], head: u16) {
        for (k, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.write_desc(self.tx.desc, first + k as u16, addr, len, flags, next);
        }
        Self::push_avail(&self.mem, &mut self.tx, head);
        let _ = self.kicks[1].write(1);
    }

    /// Posts a hand-made receive chain: `descs` are written at RX table indices
    /// `first..first+descs.len()`, `head` goes on the RX ring (a hostile receiver's buffers).
    pub fn post_raw_rx_chain(&mut self, first: u16, descs: &[(u64, u32, u16, u16)], head: u16) {
        let old = self.rx.avail_idx;
        for (k, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.write_desc(self.rx.desc, first + k as u16, addr, len, flags, next);
        }
        Self::push_avail(&self.mem, &mut self.rx, head);
        self.rx_posted += 1;
        if self.kick_wanted(&self.rx, old, self.rx.avail_idx) {
            let _ = self.kicks[0].write(1);
        }
    }

    /// How many receive chains the device has handed back so far (its RX used index).
    pub fn rx_used(&self) -> u16 {
        self.used_idx(&self.rx)
    }

    /// Guest-physical address of a scratch area tests may fill for raw chains.
    pub fn scratch_gpa(&self) -> u64 {
        TX_BUFS + (QUEUE_SIZE as u64 / 2) * TX_SLOT
    }

    /// Writes bytes at a guest-physical address.
    pub fn write_mem(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).expect("write_mem");
    }

    /// Number of TX chains vunet has completed.
    pub fn tx_done(&self) -> u16 {
        self.used_idx(&self.tx)
    }

    /// Waits until vunet has completed every TX chain put on the ring.
    pub fn wait_tx_all(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.used_idx(&self.tx) != self.tx.avail_idx {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::yield_now();
        }
        self.tx.used_seen = self.tx.avail_idx;
        true
    }

    /// Waits until vunet's TX worker has re-armed kicks after the chains put on the ring:
    /// with EVENT_IDX its `avail_event` (behind the used ring) names the next chain, without
    /// it the used ring's NO_NOTIFY flag is clear. That is the worker's last write into this
    /// ring before it sleeps.
    pub fn wait_tx_rearmed(&self, timeout: Duration) -> bool {
        let event_at = GuestAddress(self.tx.used + 4 + 8 * QUEUE_SIZE as u64);
        let event_idx = self.has(feat::EVENT_IDX);
        wait_until(timeout, || {
            if event_idx {
                self.mem.read_obj::<u16>(event_at).expect("avail_event") == self.tx.avail_idx
            } else {
                self.mem.read_obj::<u16>(GuestAddress(self.tx.used)).expect("used flags") & 1 == 0
            }
        })
    }

    fn wait_tx_room(&mut self) {
        // At most QUEUE_SIZE/2 TX chains in flight (two descriptors each).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.tx.avail_idx.wrapping_sub(self.used_idx(&self.tx)) >= QUEUE_SIZE / 2 {
            assert!(Instant::now() < deadline, "vunet stopped completing TX chains");
            std::thread::yield_now();
        }
    }

    /// Receives one frame (header and Ethernet frame), waiting up to `timeout`. With
    /// MRG_RXBUF the frame is reassembled from `num_buffers` buffers. Buffers are re-posted.
    pub fn recv(&mut self, timeout: Duration) -> Option<(VnetHeader, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.used_idx(&self.rx) != self.rx.used_seen {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let hl = self.hdr_len();
        let mut data = Vec::new();
        let (id, len) = self.used_elem(&self.rx, self.rx.used_seen);
        self.rx.used_seen = self.rx.used_seen.wrapping_add(1);
        let buf = |id: u32| RX_BUFS + id as u64 * self.opts.rx_buf_size as u64;
        let mut first = vec![0u8; len as usize];
        self.mem.read_slice(&mut first, GuestAddress(buf(id))).expect("rx read");
        let hdr = VnetHeader::parse(&first[..hl.min(first.len())]);
        data.extend_from_slice(&first[hl.min(first.len())..]);
        let mut consumed = 1u16;
        let nb = if self.has(feat::MRG_RXBUF) { hdr.num_buffers.max(1) } else { 1 };
        while consumed < nb {
            while self.used_idx(&self.rx) == self.rx.used_seen {
                if Instant::now() > deadline {
                    panic!("num_buffers {nb} but only {consumed} buffers used");
                }
                std::thread::yield_now();
            }
            let (id, len) = self.used_elem(&self.rx, self.rx.used_seen);
            self.rx.used_seen = self.rx.used_seen.wrapping_add(1);
            let mut more = vec![0u8; len as usize];
            self.mem.read_slice(&mut more, GuestAddress(buf(id))).expect("rx read");
            data.extend_from_slice(&more);
            consumed += 1;
        }
        self.rx_posted -= consumed;
        self.post_rx(QUEUE_SIZE);
        Some((hdr, data))
    }

    /// Drains every frame that arrives within `quiet` of the previous one.
    pub fn recv_all(&mut self, quiet: Duration) -> Vec<(VnetHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = self.recv(quiet) {
            out.push(f);
        }
        out
    }

    /// Writes `frame` with header `hdr` into every TX slot once, for benchmarks that then only
    /// re-post descriptors (`post_prepared`), so the driver's own copying does not count.
    pub fn prepare_tx(&mut self, hdr: &VnetHeader, frame: &[u8]) {
        let hl = self.hdr_len();
        let mut h = [0u8; 12];
        hdr.write(&mut h[..hl]);
        for slot in 0..QUEUE_SIZE / 2 {
            let base = TX_BUFS + slot as u64 * TX_SLOT;
            self.mem.write_slice(&h[..hl], GuestAddress(base)).expect("hdr");
            self.mem.write_slice(frame, GuestAddress(base + hl as u64)).expect("frame");
            self.write_desc(self.tx.desc, slot * 2, base, (hl + frame.len()) as u32, 0, 0);
        }
    }

    /// Guest-physical address of the frame (after its virtio-net header) in prepared TX slot
    /// `slot` (0..QUEUE_SIZE/2): what a test's second vCPU can rewrite while it is in flight.
    pub fn tx_frame_gpa(&self, slot: u16) -> u64 {
        TX_BUFS + slot as u64 * TX_SLOT + self.hdr_len() as u64
    }

    /// Puts prepared TX chains on the ring until `in_flight` are outstanding; kicks once.
    /// Returns how many were added.
    pub fn post_prepared(&mut self, in_flight: u16) -> u16 {
        let done = self.used_idx(&self.tx);
        let old = self.tx.avail_idx;
        let mut n = 0;
        while self.tx.avail_idx.wrapping_sub(done) < in_flight.min(QUEUE_SIZE / 2) {
            let slot = self.tx_next % (QUEUE_SIZE / 2);
            self.tx_next = self.tx_next.wrapping_add(1);
            let slot_head = slot * 2;
            let q = &mut self.tx;
            let ring_slot = q.avail_idx % QUEUE_SIZE;
            self.mem.write_obj(slot_head, GuestAddress(q.avail + 4 + 2 * ring_slot as u64)).expect("avail ring");
            q.avail_idx = q.avail_idx.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            fence(Ordering::Release);
            self.mem.write_obj(self.tx.avail_idx, GuestAddress(self.tx.avail + 2)).expect("avail idx");
            if self.kick_wanted(&self.tx, old, self.tx.avail_idx) {
                let _ = self.kicks[1].write(1);
            }
        }
        n
    }

    /// Counts frames received without copying them out (benchmarks); re-posts buffers.
    pub fn drain_count(&mut self) -> usize {
        let now = self.used_idx(&self.rx);
        let n = now.wrapping_sub(self.rx.used_seen);
        if n == 0 {
            return 0;
        }
        let mut frames = 0;
        if self.has(feat::MRG_RXBUF) {
            // Count frames by their first buffer's num_buffers.
            let mut i = 0u16;
            while i < n {
                let (id, _) = self.used_elem(&self.rx, self.rx.used_seen.wrapping_add(i));
                let nb: u16 = self.mem.read_obj(GuestAddress(RX_BUFS + id as u64 * self.opts.rx_buf_size as u64 + 10)).unwrap_or(1);
                if i + nb.max(1) > n {
                    break;
                }
                i += nb.max(1);
                frames += 1;
            }
            self.rx.used_seen = self.rx.used_seen.wrapping_add(i);
            self.rx_posted -= i;
        } else {
            self.rx.used_seen = now;
            self.rx_posted -= n;
            frames = n as usize;
        }
        frames
    }

    /// The RX ring after `drain_count`: re-post freed buffers without kicking each time.
    pub fn refill_rx(&mut self) {
        self.post_rx(QUEUE_SIZE);
    }
}

/// A TCP segment of `payload_len` bytes (up to 64 KiB) with a partial checksum, as Linux hands
/// it to virtio-net with TSO, and its virtio-net header (MSS 1448).
pub fn tso_frame(src: [u8; 6], dst: [u8; 6], payload_len: usize) -> (VnetHeader, Vec<u8>) {
    use vunet_switch::checksum::{finish, pseudo_v4};
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 31 % 251) as u8).collect();
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 5201, 7, 64000)
        .ack(1)
        .psh()
        .write(&mut f, &payload)
        .expect("build TCP frame");
    // The full TCP checksum is replaced by the pseudo-header sum, as a CSUM-offloading sender does.
    let partial = !finish(pseudo_v4(&[10, 0, 0, 1], &[10, 0, 0, 2], 6, (f.len() - 34) as u16));
    f[34 + 16..34 + 18].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHeader {
        flags: vunet_switch::vnet::F_NEEDS_CSUM,
        gso_type: vunet_switch::vnet::GSO_TCPV4,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    (hdr, f)
}

/// Polls `cond` until it holds (true) or `timeout` passes (false): a test waits for an event (a
/// counter reaching a value, a port becoming ready, a connection cut), goes on as soon as it
/// happens and fails only after a generous deadline, never after a guessed sleep. Polls every
/// millisecond at first, backing off to every 100 ms, so a condition that runs a command is
/// not run in a tight loop. `cond` is tried once more after the deadline.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// How long a simulated guest's port may take to become ready before a test gives up.
pub const READY: Duration = Duration::from_secs(10);

/// Whether every live guest port of `network` can take frames: its guest is connected and the
/// port's worker has published the guest's receive ring, which it does at the guest's first
/// kick (`post_rx`). Until then frames for the port are dropped (PortDown), so a test that
/// sends to a port waits for this, not for a guessed time.
pub fn network_ready(d: &vunet::Daemon, network: &str) -> bool {
    let Some(n) = d.network(network) else { return false };
    let ports = n.ports.snapshot().to_vec();
    ports
        .iter()
        .filter(|p| p.kind == vunet::PortKind::Vhost && !p.removed.load(Ordering::Acquire))
        .all(|p| p.connected.load(Ordering::Acquire) && p.rx_published())
}

/// Waits until [`network_ready`]; panics, naming the ports that are not, after [`READY`].
pub fn wait_network_ready(d: &vunet::Daemon, network: &str) {
    if wait_until(READY, || network_ready(d, network)) {
        return;
    }
    let n = d.network(network).unwrap_or_else(|| panic!("no network {network}"));
    let ports = n.ports.snapshot().to_vec();
    let states: Vec<String> = ports
        .iter()
        .filter(|p| p.kind == vunet::PortKind::Vhost && !p.removed.load(Ordering::Acquire))
        .map(|p| {
            let published = p.rx_published();
            format!("{}: connected {}, rx ring published {published}", p.name, p.connected.load(Ordering::Acquire))
        })
        .collect();
    panic!("network {network}: ports not ready after {READY:?}: {states:?}");
}

/// A port's counters right now.
pub fn port_counters(d: &vunet::Daemon, network: &str, port: &str) -> vunet_switch::counters::CounterSnapshot {
    d.network(network).and_then(|n| n.port(port)).unwrap_or_else(|| panic!("no port {network}/{port}")).counters.snapshot()
}

/// A port's counters once `ok` holds for them (or after [`READY`], for the caller's assertions
/// to report). A receiver counts a frame just after it put it in the guest's ring, so a test
/// that has just received the frame may read the counter a moment too early: it waits for the
/// count, then asserts on it exactly. (A sender's counters, drops included, are final once its
/// TX chains are completed: `wait_tx_all`.)
pub fn wait_counters(
    d: &vunet::Daemon,
    network: &str,
    port: &str,
    ok: impl Fn(&vunet_switch::counters::CounterSnapshot) -> bool,
) -> vunet_switch::counters::CounterSnapshot {
    wait_until(READY, || ok(&port_counters(d, network, port)));
    port_counters(d, network, port)
}

/// Builds an Ethernet frame.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload_len: usize, fill: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..payload_len).map(|i| fill.wrapping_add(i as u8)));
    f
}

/// A unique scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("vunet-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts an in-process vunet with one isolated network (gateway 10.0.0.1/24) of `ports`
/// server-mode ports named `p0`, `p1`, … in `dir`, with port security off so tests can send
/// arbitrary frames. Returns the daemon and the socket paths.
pub fn start_network(dir: &Path, ports: usize) -> (vunet::Daemon, Vec<PathBuf>) {
    build_network(dir, ports, "", "", "port_security = false\n")
}

/// Like [`start_network`], with extra top-level TOML (e.g. `state_dir`) and extra network
/// TOML appended after the ports (e.g. a `[network.dhcp]` table). Port security is on (the
/// default where a network has a gateway).
pub fn start_network_with(dir: &Path, ports: usize, top: &str, network_extra: &str) -> (vunet::Daemon, Vec<PathBuf>) {
    build_network(dir, ports, top, network_extra, "")
}

fn build_network(dir: &Path, ports: usize, top: &str, network_extra: &str, port_extra: &str) -> (vunet::Daemon, Vec<PathBuf>) {
    let mut toml = format!("{top}\n[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n");
    for i in 0..ports {
        toml.push_str(&format!("[[network.port]]\nname = \"p{i}\"\nsocket = \"p{i}.sock\"\n{port_extra}"));
    }
    toml.push_str(network_extra);
    let cfg = vunet::Config::parse(&toml, "test.toml", dir).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    let socks = (0..ports).map(|i| dir.join(format!("p{i}.sock"))).collect();
    (d, socks)
}
