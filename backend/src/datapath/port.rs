//! A switch port as the data path reads it: its kind, counters, port-security state, and
//! where frames for it go (a guest's RX ring, or a host link).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vunet_dhcp::DhcpServer;
use vunet_switch::gateway::{eui64, link_local};
use vunet_switch::port_security::Claims6;
use vunet_switch::ratelimit::TokenBucket;
use vunet_switch::vlan::PortVlan;
use vunet_switch::vnet::{RxCaps, VnetHeader};
use vunet_switch::{DropReason, Mac, MacTable, PortCounters, PortId};

use super::backlog::Backlog;
use super::link::HostLink;
use super::ring::{GuestMem, Vring};
use super::split::RingCache;
use crate::config::PortMode;

/// What a port is attached to. Read where behaviour differs (listings, removal, the
/// uplink's own thread), never from the port's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A guest NIC served over a vhost-user socket.
    Vhost,
    /// The network's way out: a host link (af-packet, macvtap, tap uplink).
    Uplink,
    /// A tap on the host attached like a guest (`[[network.port]] tap = ...`).
    Tap,
}

/// A captured frame: when, and its bytes.
pub type Captured = (Duration, Vec<u8>);

/// What one capture may hold: frames wait for its reader while their bytes stay under
/// `limit`; the data path drops (and counts) the others rather than wait or grow.
pub struct CaptureBudget {
    pub limit: usize,
    /// Bytes of the frames queued and not yet taken by the reader.
    pub queued: AtomicUsize,
    /// Frames not queued: over the byte limit, or the queue full.
    pub dropped: AtomicU64,
    /// Set by the reader when it ends: the data path forgets the capture.
    pub closed: AtomicBool,
}

impl CaptureBudget {
    pub fn new(limit: usize) -> CaptureBudget {
        CaptureBudget { limit, queued: AtomicUsize::new(0), dropped: AtomicU64::new(0), closed: AtomicBool::new(false) }
    }

    /// The reader took a frame of `len` bytes off the queue.
    pub fn taken(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
    }

    /// Queues a copy of `frame` if it fits; false once the reader is gone.
    fn offer(&self, tx: &SyncSender<Captured>, ts: Duration, frame: &[u8]) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        // Only this port's senders add, under the captures lock: no race past the limit.
        if self.queued.load(Ordering::Relaxed) + frame.len() > self.limit {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.queued.fetch_add(frame.len(), Ordering::Relaxed);
        match tx.try_send((ts, frame.to_vec())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Frames waiting for a rate-limited guest's inbound limit.
pub struct RxShaper {
    pub bucket: TokenBucket,
    pub queue: std::collections::VecDeque<(VnetHeader, Vec<u8>)>,
    pub queued_bytes: usize,
    /// The bucket's clock.
    pub epoch: std::time::Instant,
    /// The network's shaper thread, woken when a queue stops being empty.
    pub wake: Arc<ShaperWake>,
}

/// Wakes a network's shaper thread (`datapath::run_shaper`).
#[derive(Default)]
pub struct ShaperWake {
    pending: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl ShaperWake {
    pub fn notify(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
    }

    /// Waits for a notification or `timeout`.
    pub fn wait(&self, timeout: Duration) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !*p {
            p = self.cv.wait_timeout(p, timeout).unwrap_or_else(|e| e.into_inner()).0;
        }
        *p = false;
    }
}

impl RxShaper {
    pub fn new(bucket: TokenBucket, wake: Arc<ShaperWake>) -> RxShaper {
        RxShaper { bucket, queue: Default::default(), queued_bytes: 0, epoch: std::time::Instant::now(), wake }
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// How much a rate-limited port's inbound queue holds: about 100 ms at 1 Gbit/s, or a few TSO
/// frames (tail drop past it, counted).
pub const SHAPER_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Where a port's senders write: the RX ring and memory of the guest connected right now.
pub struct RxTarget {
    pub vring: Vring,
    pub mem: GuestMem,
    pub caps: RxCaps,
    /// Frames waiting for receive buffers.
    pub backlog: Backlog,
    /// The used index when the guest's interrupt was last considered: the start of the
    /// window EVENT_IDX is checked against.
    pub signalled: u16,
    /// The ring's translation for the current memory table.
    pub cache: Option<RingCache>,
}

/// Most queue pairs a guest port may have (`queues` in the port's config).
pub const MAX_QUEUE_PAIRS: usize = 8;

/// One virtio-net queue pair of a guest port, as the data path sees it.
#[derive(Default)]
pub struct QueuePair {
    /// Where senders write: this pair's RX ring, while a guest is connected.
    pub rx: Mutex<Option<RxTarget>>,
    /// Set while frames wait in this pair's receive backlog, so an RX kick with nothing to
    /// flush does not take the lock the senders are using.
    pub backlogged: AtomicBool,
    /// Frames delivered into this pair's RX ring, and taken from its TX ring.
    pub to_guest: AtomicU64,
    pub from_guest: AtomicU64,
}

/// A switch port: its kind, counters, and where frames for it go (a guest's RX rings, or a
/// host link).
pub struct Port {
    pub id: PortId,
    pub name: String,
    pub kind: PortKind,
    pub socket: PathBuf,
    pub mode: PortMode,
    pub mac: Option<Mac>,
    pub counters: PortCounters,
    /// The guest's queue pairs (one unless the port has `queues = N`).
    pub queues: Vec<QueuePair>,
    /// Port security on this port (own MAC, own leased IP, no DHCP server).
    pub security: bool,
    /// The MAC the port is locked to (bit 48 set when locked): the configured one, else the
    /// first one its guest sends with. Bit 49 is set once the network's MAC table has it
    /// pinned to this port.
    locked_mac: AtomicU64,
    /// The IPv4 address the port's guest holds a lease for (0: none).
    leased_ip: AtomicU32,
    /// The last source address found to be nobody else's, with the revision of the network's
    /// address holders it was checked against (revision << 32 | address): a guest without a
    /// lease sending from its static address looks it up once, not per frame.
    src_ok: AtomicU64,
    /// IPv6 addresses the port's guest claimed first (beyond its EUI-64 ones), bounded; the
    /// network's `claims6` index says which port holds which.
    pub claims6: Mutex<Claims6>,
    /// The network's `leases6_rev` when this port's claims were last checked against the
    /// DHCPv6 leases.
    pub claims6_rev: AtomicU64,
    /// The guest's EUI-64 IPv6 sources as seen (for listings): bit 0 its link-local address,
    /// bit 1 a global one, whose prefix is the upper 64 bits of `seen6_prefix`.
    seen6: AtomicU32,
    seen6_prefix: AtomicU64,
    pub connected: AtomicBool,
    /// Set when the VMM stopped the port's rings (GET_VRING_BASE: the guest stopped or was
    /// migrated away) until rings run again: only then may another port take its MAC.
    pub vmm_stopped: AtomicBool,
    /// Virtio features acked on the current connection.
    pub features: AtomicU64,
    /// Number of vhost-user connections so far (also the id of the latest).
    pub connections: AtomicU64,
    pub(super) last_log_ms: AtomicU64,
    /// Set on uplinks and taps: frames for this port go to a host link, not a guest.
    pub link: Option<Arc<dyn HostLink>>,
    /// The uplink of a nat or route network: not switched at L2 with the guests; its frames
    /// go through the router.
    pub routed: bool,
    /// `isolated = true`: frames between two isolated ports are dropped (libvirt's `<port
    /// isolated='yes'/>`); the gateway, uplinks and other ports are reached as ever.
    pub isolated: bool,
    /// `[network.port.bandwidth] outbound`: the guest's TX waits in its ring past this.
    pub tx_limit: Option<Mutex<TokenBucket>>,
    /// `[network.port.bandwidth] inbound`: frames to the guest past this wait in a bounded
    /// queue that the network's shaper thread releases at the rate, then are dropped.
    pub rx_limit: Option<Mutex<RxShaper>>,
    /// The limits as configured, for `port-list`.
    pub bandwidth: crate::config::Bandwidth,
    /// Set when the port is deleted at run time; its thread ends, its slot stays (port ids
    /// index the network's port list).
    pub removed: AtomicBool,
    /// The current VMM connection, to cut it when the port is removed.
    /// The live VMM connections (id, stream), to cut them when the port is removed: two
    /// while a guest migrates between QEMUs on this port.
    pub conn: Mutex<Vec<(u64, UnixStream)>>,
    /// How many of them are served.
    pub live_conns: AtomicU64,
    /// The connection whose RX rings senders write to (the one whose rings started last).
    pub rx_owner: AtomicU64,
    /// Set while at least one `vunet capture` listens on this port.
    pub capturing: AtomicBool,
    /// The port's VLAN mode: which VLANs its frames belong to and how they leave it.
    pub vlan: PortVlan,
    captures: Mutex<Vec<(SyncSender<Captured>, Arc<CaptureBudget>)>>,
}

/// vhost's feature bit 26: the VMM logs dirty pages while it is acked.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

const LOCKED: u64 = 1 << 48;
const PINNED: u64 = 1 << 49;

fn mac_word(m: &Mac) -> u64 {
    m.iter().fold(LOCKED, |w, &b| (w & !LOCKED) << 8 | b as u64 | LOCKED)
}

/// The MAC of a `locked_mac` word (its low 48 bits).
fn word_mac(w: u64) -> Mac {
    let b = w.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

impl Port {
    /// A port with nothing attached yet: not connected, no security, no link.
    pub fn new(id: PortId, name: impl Into<String>, kind: PortKind) -> Port {
        Port {
            id,
            name: name.into(),
            kind,
            socket: PathBuf::new(),
            mode: PortMode::Server,
            mac: None,
            counters: PortCounters::default(),
            queues: vec![QueuePair::default()],
            security: false,
            locked_mac: AtomicU64::new(0),
            leased_ip: AtomicU32::new(0),
            src_ok: AtomicU64::new(u64::MAX),
            claims6: Mutex::new(Claims6::default()),
            claims6_rev: AtomicU64::new(0),
            seen6: AtomicU32::new(0),
            seen6_prefix: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            vmm_stopped: AtomicBool::new(false),
            features: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            last_log_ms: AtomicU64::new(0),
            link: None,
            routed: false,
            isolated: false,
            tx_limit: None,
            rx_limit: None,
            bandwidth: Default::default(),
            removed: AtomicBool::new(false),
            conn: Mutex::new(Vec::new()),
            live_conns: AtomicU64::new(0),
            rx_owner: AtomicU64::new(0),
            capturing: AtomicBool::new(false),
            vlan: PortVlan::Untagged,
            captures: Mutex::new(Vec::new()),
        }
    }

    /// Gives the port `n` queue pairs (1 to MAX_QUEUE_PAIRS).
    pub fn with_queues(mut self, n: usize) -> Port {
        self.queues = (0..n.clamp(1, MAX_QUEUE_PAIRS)).map(|_| QueuePair::default()).collect();
        self
    }

    /// Whether the port's VMM logs the guest pages vunet writes (VHOST_F_LOG_ALL acked: a live
    /// migration runs). One relaxed load, per burst.
    #[inline]
    pub fn dirty_logging(&self) -> bool {
        self.features.load(Ordering::Relaxed) & VHOST_F_LOG_ALL != 0
    }

    /// Whether frames wait in any of the port's receive backlogs.
    pub fn backlogged(&self) -> bool {
        self.queues.iter().any(|q| q.backlogged.load(Ordering::Acquire))
    }

    /// Whether the guest's first receive ring is reachable for senders.
    pub fn rx_published(&self) -> bool {
        self.queues[0].rx.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Forgets every queue's RX target (the guest left: nobody may write into its memory).
    pub fn unpublish_rx(&self) {
        for q in &self.queues {
            *q.rx.lock().unwrap_or_else(|e| e.into_inner()) = None;
            q.backlogged.store(false, Ordering::Release);
        }
    }

    /// Sets the configured MAC, which the port is locked to from the start.
    pub fn with_mac(mut self, mac: Option<Mac>) -> Port {
        self.mac = mac;
        self.locked_mac = AtomicU64::new(mac.map(|m| mac_word(&m)).unwrap_or(0));
        self
    }

    /// The MAC this port is locked to, locking it to `seen` if it is not yet (the configured
    /// MAC, else the first one the guest sends with). The first lock pins the MAC in the
    /// network's table `macs`, which refuses a MAC another live port holds
    /// ([`DropReason::MacInUse`]: the guest neither takes it nor inherits its lease); once
    /// pinned, the address leased to that MAC (if any) becomes the port's.
    pub fn lock_mac(&self, seen: Mac, macs: &Mutex<MacTable>, dhcp: Option<&Mutex<DhcpServer>>) -> Result<Mac, DropReason> {
        let w = self.locked_mac.load(Ordering::Acquire);
        if w & PINNED != 0 {
            return Ok(word_mac(w));
        }
        let mac = {
            // Under the table's lock: two queues of one port, or two ports, racing for a first
            // MAC see one outcome.
            let mut table = macs.lock().unwrap_or_else(|e| e.into_inner());
            let w = self.locked_mac.load(Ordering::Acquire);
            if w & PINNED != 0 {
                return Ok(word_mac(w));
            }
            let mac = if w & LOCKED != 0 { word_mac(w) } else { seen };
            // Pinned in the port's own VLAN, where its guest's address is.
            table.claim_in(self.vlan.home().unwrap_or(0), mac, self.id)?;
            self.src_ok.store(u64::MAX, Ordering::Relaxed);
            self.locked_mac.store(mac_word(&mac) | PINNED, Ordering::Release);
            mac
        };
        if let Some(ip) = dhcp.and_then(|d| d.lock().unwrap_or_else(|e| e.into_inner()).ip_of(&mac, unix_now())) {
            self.leased_ip.store(u32::from(ip), Ordering::Relaxed);
        }
        Ok(mac)
    }

    /// Whether `ip` was found to be nobody else's at `revision` of the address holders.
    pub fn src_checked(&self, ip: Ipv4Addr, revision: u64) -> bool {
        self.src_ok.load(Ordering::Relaxed) == (revision << 32 | u32::from(ip) as u64)
    }

    /// Remembers that `ip` is nobody else's at `revision`.
    pub fn set_src_checked(&self, ip: Ipv4Addr, revision: u64) {
        self.src_ok.store(revision << 32 | u32::from(ip) as u64, Ordering::Relaxed);
    }

    /// Whether the port's guest holds `mac` (pinned in the network's table).
    pub fn holds_mac(&self, mac: &Mac) -> bool {
        let w = self.locked_mac.load(Ordering::Acquire);
        w & PINNED != 0 && word_mac(w) == *mac
    }

    pub fn locked_mac(&self) -> Option<Mac> {
        let w = self.locked_mac.load(Ordering::Relaxed);
        (w & LOCKED != 0).then(|| word_mac(w))
    }

    /// What the port's receiver negotiated (a guest's first queue pair, or a host link), for
    /// services that build frames for it; None while nobody is connected.
    pub fn rx_caps(&self) -> Option<RxCaps> {
        if let Some(link) = self.link.as_deref() {
            return link.caps();
        }
        self.queues.first()?.rx.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|t| t.caps)
    }

    pub fn leased_ip(&self) -> Option<Ipv4Addr> {
        match self.leased_ip.load(Ordering::Relaxed) {
            0 => None,
            v => Some(Ipv4Addr::from(v)),
        }
    }

    /// Records the address the port's guest leased (None: released, declined).
    pub fn set_leased_ip(&self, ip: Option<Ipv4Addr>) {
        self.leased_ip.store(ip.map_or(0, u32::from), Ordering::Relaxed);
    }

    /// Notes an IPv6 source port security let through, for listings: only an EUI-64 one is
    /// kept here (claimed ones are in `claims6`); a relaxed load when nothing changed.
    pub fn saw_ipv6_source(&self, mac: &Mac, src: Ipv6Addr) {
        let o = src.octets();
        if o[8..] != eui64(mac) {
            return;
        }
        if o[..8] == [0xfe, 0x80, 0, 0, 0, 0, 0, 0] {
            if self.seen6.load(Ordering::Relaxed) & 1 == 0 {
                self.seen6.fetch_or(1, Ordering::Relaxed);
            }
            return;
        }
        let prefix = u64::from_be_bytes(o[..8].try_into().unwrap_or_default());
        if self.seen6.load(Ordering::Relaxed) & 2 == 0 || self.seen6_prefix.load(Ordering::Relaxed) != prefix {
            self.seen6_prefix.store(prefix, Ordering::Relaxed);
            self.seen6.fetch_or(2, Ordering::Relaxed);
        }
    }

    /// The IPv6 addresses the port's guest was seen using: its EUI-64 link-local and global
    /// ones, then those it claimed.
    pub fn ipv6_addresses(&self) -> Vec<Ipv6Addr> {
        let mut v = Vec::new();
        let seen = self.seen6.load(Ordering::Relaxed);
        if let Some(mac) = self.locked_mac() {
            if seen & 1 != 0 {
                v.push(link_local(&mac));
            }
            if seen & 2 != 0 {
                let prefix = Ipv6Addr::from((self.seen6_prefix.load(Ordering::Relaxed) as u128) << 64);
                v.push(vunet_switch::gateway::slaac(prefix, &mac));
            }
        }
        v.extend(self.claims6.lock().unwrap_or_else(|e| e.into_inner()).iter());
        v
    }

    /// Starts sending this port's frames to a capture, within `budget`.
    pub fn add_capture(&self, tx: SyncSender<Captured>, budget: Arc<CaptureBudget>) {
        let mut c = self.captures.lock().unwrap_or_else(|e| e.into_inner());
        c.push((tx, budget));
        self.capturing.store(true, Ordering::Release);
    }

    /// Hands a copy of a frame seen on this port to its captures that have room for it (the
    /// others count a drop); forgets captures whose reader is gone. Never waits for a
    /// reader. Called only while `capturing` is set.
    pub fn capture(&self, frame: &[u8]) {
        let ts = wall_clock();
        let mut c = self.captures.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|(tx, budget)| budget.offer(tx, ts, frame));
        if c.is_empty() {
            self.capturing.store(false, Ordering::Release);
        }
    }

    /// A guest left: the next one may have another MAC and must lease its address anew.
    pub fn forget_guest(&self) {
        self.locked_mac.store(self.mac.map(|m| mac_word(&m)).unwrap_or(0), Ordering::Relaxed);
        self.leased_ip.store(0, Ordering::Relaxed);
        self.src_ok.store(u64::MAX, Ordering::Relaxed);
        self.claims6.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.seen6.store(0, Ordering::Relaxed);
    }
}

/// Seconds since the Unix epoch: the DHCP server's clock, so lease expiries survive restarts.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The current time as a pcap timestamp.
pub fn wall_clock() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}
