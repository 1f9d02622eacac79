//! A network as the data path reads it: its ports, its MAC table, its gateway with the
//! services it runs, its DHCP state and its router. Built by the run-time layer, shared by
//! every thread of the network.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwap, Guard};
use std::time::Instant;

use tracing::warn;
use vunet_dhcp::v6::Dhcp6Server;
use vunet_dhcp::{DhcpServer, Holders};
use vunet_switch::gateway::{eui64, Gateway, Gateway6};
use vunet_switch::port_security::MAX_CLAIMS6;
use vunet_switch::router::Router;
use vunet_switch::router6::Router6;
use vunet_switch::{DropReason, Mac, MacTable, PortId};

use super::port::{Port, ShaperWake};
use super::service::GatewayService;
use crate::config::Mode;

/// One virtual network: its ports, its switch, and the gateway services it runs.
pub struct Network {
    pub name: String,
    pub mode: Mode,
    pub mtu: u16,
    /// How long a worker polls its TX ring before it sleeps (µs; 0: not at all).
    pub busy_poll_us: u32,
    /// Most threads of this network that move frames out of guests' TX rings at once (and
    /// most threads one port's queue pairs are kicked on).
    pub workers: usize,
    /// Those threads, and the rings waiting for one (`txring.rs`, `workers.rs`).
    pub tx_workers: super::txring::TxWorkers,
    /// The network's own endpoint at its gateway address, if it has one.
    pub gateway: Option<Gateway>,
    /// Its IPv6 side (`gateway6`): services answer ND, router solicitations, DHCPv6 there.
    pub gateway6: Option<Gateway6>,
    /// Wakes the shaper thread of ports with inbound rate limits.
    pub shaper: Arc<ShaperWake>,
    /// Whether that thread runs (started with the first such port).
    pub shaper_started: AtomicBool,
    /// What answers frames for the gateway, in order (ARP/ICMP, DHCP, DNS...).
    pub services: Vec<Arc<dyn GatewayService>>,
    /// The gateway's DHCP server state (port security and the listings read its leases).
    pub dhcp: Option<Mutex<DhcpServer>>,
    /// The gateway's DHCPv6 server state (its service and the listings share it).
    pub dhcp6: Option<Arc<Mutex<Dhcp6Server>>>,
    /// Bumped by the DHCPv6 service whenever its bindings change: ports re-check their IPv6
    /// claims against the leases once per change, not per frame.
    pub leases6_rev: Arc<AtomicU64>,
    /// Who holds which address, as the DHCP server keeps it (read without its lock).
    holders: OnceLock<Option<Arc<Holders>>>,
    /// IPv6 addresses reserved for a MAC (`[network.dhcp6] hosts`): no other port may claim them.
    pub reserved6: Vec<(Ipv6Addr, Mac)>,
    /// Which port claimed which IPv6 address (first come): an index of the ports' `claims6`,
    /// which are the truth (an entry whose port no longer has the address is stale).
    claims6: Mutex<HashMap<Ipv6Addr, PortId>>,
    pub ports: PortList,
    pub macs: Mutex<MacTable>,
    /// `macs`' version, read without its lock (the workers' `DecisionCache`).
    pub macs_version: Arc<AtomicU64>,
    epoch: Instant,
    /// Set when the network is taken out of a running daemon; its threads end.
    pub stopped: AtomicBool,
    /// The router between the guests and the uplink (nat and route networks).
    pub router: Option<Mutex<Router>>,
    /// The IPv6 router beside it, when the uplink has an IPv6 address (`address6`).
    pub router6: Option<Mutex<Router6>>,
    /// Whether the uplink address comes from a DHCP lease over the uplink.
    pub uplink_dhcp: bool,
}

impl Network {
    /// A network with no gateway, services, router or ports yet.
    pub fn new(name: impl Into<String>, mode: Mode, mtu: u16) -> Network {
        let macs = MacTable::default();
        Network {
            name: name.into(),
            mode,
            mtu,
            busy_poll_us: 0,
            workers: 1,
            tx_workers: Default::default(),
            gateway: None,
            gateway6: None,
            shaper: Arc::new(ShaperWake::default()),
            shaper_started: AtomicBool::new(false),
            services: Vec::new(),
            dhcp: None,
            dhcp6: None,
            leases6_rev: Arc::new(AtomicU64::new(0)),
            holders: OnceLock::new(),
            reserved6: Vec::new(),
            claims6: Mutex::new(HashMap::new()),
            ports: PortList::default(),
            macs_version: macs.version(),
            macs: Mutex::new(macs),
            epoch: Instant::now(),
            stopped: AtomicBool::new(false),
            router: None,
            router6: None,
            uplink_dhcp: false,
        }
    }

    /// Milliseconds since the network started: the switch's clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Nanoseconds since the network started: the rate limiters' clock.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The live port named `name`.
    pub fn port(&self, name: &str) -> Option<Arc<Port>> {
        self.ports.snapshot().iter().find(|p| p.name == name && !p.removed.load(Ordering::Acquire)).cloned()
    }

    /// The port with id `id`, removed or not.
    pub fn port_by_id(&self, id: PortId) -> Option<Arc<Port>> {
        self.ports.snapshot().get(id).cloned()
    }

    /// The guest that holds `ip` and the port it is on, for frames vunet starts toward it (a
    /// connection through a port forward): the port whose guest leased it, else the MAC the
    /// DHCP server reserved it for, where the switch last saw that MAC.
    pub fn guest_at(&self, ip: Ipv4Addr) -> Option<(Mac, Arc<Port>)> {
        let ports = self.ports.snapshot();
        let live = |p: &&Arc<Port>| !p.removed.load(Ordering::Acquire);
        if let Some((mac, p)) = ports.iter().filter(live).find_map(|p| Some((p.locked_mac()?, p)).filter(|_| p.leased_ip() == Some(ip))) {
            return Some((mac, p.clone()));
        }
        let mac = self.dhcp.as_ref()?.lock().unwrap_or_else(|e| e.into_inner()).holders().holder(ip)?;
        let id = self.macs.lock().unwrap_or_else(|e| e.into_inner()).port_of(&mac, self.now_ms())?;
        ports.get(id).filter(live).map(|p| (mac, p.clone()))
    }

    /// The ports that have not been removed.
    pub fn live_ports(&self) -> Vec<Arc<Port>> {
        self.ports.snapshot().iter().filter(|p| !p.removed.load(Ordering::Acquire)).cloned().collect()
    }

    /// Whether `ip` belongs to someone other than `port`'s guest (MAC `mac`): the gateway's
    /// address, or one leased to or reserved for another MAC. Port security asks it only about
    /// a source that is not the port's own lease; the answer for the port's last such source is
    /// cached until an address changes holder.
    pub fn held_by_other(&self, port: &Port, mac: &Mac, ip: Ipv4Addr) -> bool {
        if self.gateway.is_some_and(|g| g.ip == ip) {
            return true;
        }
        let holders = self.holders.get_or_init(|| self.dhcp.as_ref().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).holders()));
        let Some(holders) = holders else { return false };
        let revision = holders.revision();
        if port.src_checked(ip, revision) {
            return false;
        }
        if holders.holder(ip).is_some_and(|m| m != *mac) {
            return true;
        }
        port.set_src_checked(ip, revision);
        false
    }

    /// Whether `port`'s guest (MAC `mac`) may send from (or advertise) IPv6 address `ip`, which
    /// is not one of its MAC's EUI-64 addresses: it claimed it before, or nobody else holds it
    /// (the gateway's addresses, another MAC's reservation, another port's EUI-64 address or
    /// claim) and the port claims it now. A claim the port already has costs its own lock.
    pub fn may_use6(&self, port: &Port, mac: &Mac, ip: Ipv6Addr) -> bool {
        let holder = |a: &Ipv6Addr| {
            let d = self.dhcp6.as_ref()?;
            d.lock().unwrap_or_else(|e| e.into_inner()).holder(a, super::unix_now())
        };
        // DHCPv6 leases changed since this port last looked: claims now leased to another
        // MAC go (the lease is the stronger right, as a reservation is).
        let rev = self.leases6_rev.load(Ordering::Acquire);
        if port.claims6_rev.swap(rev, Ordering::AcqRel) != rev {
            let mut claims = port.claims6.lock().unwrap_or_else(|e| e.into_inner());
            let lost: Vec<Ipv6Addr> = claims.iter().filter(|a| holder(a).is_some_and(|m| m != *mac)).collect();
            for a in &lost {
                claims.remove(a);
            }
        }
        if port.claims6.lock().unwrap_or_else(|e| e.into_inner()).contains(&ip) {
            return true;
        }
        if self.gateway6.is_some_and(|g| g.is_mine(&ip)) || self.reserved6.iter().any(|(a, m)| *a == ip && m != mac) {
            return false;
        }
        let leased = holder(&ip);
        if leased.is_some_and(|m| m != *mac) {
            return false;
        }
        let ports = self.ports.snapshot();
        let live = |p: &Arc<Port>| !p.removed.load(Ordering::Acquire);
        if ports.iter().any(|p| p.id != port.id && live(p) && p.locked_mac().is_some_and(|m| ip.octets()[8..] == eui64(&m))) {
            return false;
        }
        let holds = |id: PortId, a: &Ipv6Addr| {
            ports.get(id).is_some_and(|p| live(p) && p.claims6.lock().unwrap_or_else(|e| e.into_inner()).contains(a))
        };
        // Under the index's lock: two ports racing for one address see one winner.
        let mut index = self.claims6.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&other) = index.get(&ip).filter(|&&other| other != port.id && holds(other, &ip)) {
            // The guest leased it: whoever claimed it first (by DAD or use) gives it up.
            if leased != Some(*mac) {
                return false;
            }
            if let Some(p) = ports.get(other) {
                p.claims6.lock().unwrap_or_else(|e| e.into_inner()).remove(&ip);
            }
        }
        let displaced = port.claims6.lock().unwrap_or_else(|e| e.into_inner()).insert(ip);
        index.insert(ip, port.id);
        if let Some(old) = displaced {
            if index.get(&old) == Some(&port.id) {
                index.remove(&old);
            }
        }
        // Guests that left keep stale entries until the index outgrows what live ports can hold.
        if index.len() > ports.len().max(1) * MAX_CLAIMS6 {
            index.retain(|a, id| holds(*id, a));
        }
        true
    }

    /// Moves `mac` to port `to` from the port holding it, if that port's VMM stopped its rings
    /// (GET_VRING_BASE: its guest was migrated away, the holder no longer runs it): the MAC's
    /// pin, the lease found through it and the IPv6 addresses it claimed follow the guest; the
    /// old port keeps nothing. A MAC held by a port whose rings run is never taken. Returns
    /// whether the MAC moved.
    pub fn take_migrated_mac(&self, to: &Port, mac: Mac) -> bool {
        if to.locked_mac().is_some_and(|m| m != mac) {
            return false;
        }
        let ports = self.ports.snapshot();
        let mut table = self.macs.lock().unwrap_or_else(|e| e.into_inner());
        // The pin, not the port's own record: the source QEMU may be gone already (its port
        // forgot the guest, the pin stays while the port exists).
        let holder = table.pinned_port_in(to.vlan.home().unwrap_or(0), &mac);
        let Some(from) = holder.filter(|&id| id != to.id).and_then(|id| ports.get(id)) else { return false };
        if !from.vmm_stopped.load(Ordering::Acquire) {
            return false;
        }
        table.remove_port(from.id);
        let claimed: Vec<Ipv6Addr> = from.claims6.lock().unwrap_or_else(|e| e.into_inner()).iter().collect();
        from.forget_guest();
        drop(table);
        let mut index = self.claims6.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = to.claims6.lock().unwrap_or_else(|e| e.into_inner());
        for ip in claimed {
            if let Some(old) = mine.insert(ip) {
                if index.get(&old) == Some(&to.id) {
                    index.remove(&old);
                }
            }
            index.insert(ip, to.id);
        }
        tracing::info!(network = %self.name, from = %from.name, to = %to.name, mac = %vunet_switch::format_mac(&mac), "guest migrated: its MAC moved");
        true
    }

    /// Logs a dropped frame at most once per second per port: a hostile guest can make drops
    /// at line rate, the log must not follow it.
    pub fn log_drop(&self, port: &Port, r: DropReason) {
        let now = self.now_ms() + 1000;
        let last = port.last_log_ms.load(Ordering::Relaxed);
        if now >= last + 1000 && port.last_log_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            warn!(network = %self.name, port = %port.name, reason = r.name(), "dropped a frame from the guest (further drops counted, logged at most once a second)");
        }
    }
}

/// A network's ports, indexed by `PortId`. Readers (every burst of every TX thread, the
/// uplinks, DNS) take a snapshot without a lock, so a port being added or removed never makes
/// a sender wait, and a busy sender never holds up the control socket. Ports are only ever
/// appended (a removed port stays, marked `removed`), so an id stays valid in every snapshot
/// taken after its port was added.
#[derive(Default)]
pub struct PortList {
    current: ArcSwap<Vec<Arc<Port>>>,
    /// Serializes the (rare) writers, so two adds never take the same id.
    edit: Mutex<()>,
    /// What stands in the slot of a removed port (one for all of them): the port itself is
    /// let go, so ports added and removed all day cost a pointer each, not a port each.
    tombstone: std::sync::OnceLock<Arc<Port>>,
}

impl PortList {
    /// The ports as they are now. Cheap; meant to be held for one burst, not for long.
    pub fn snapshot(&self) -> Guard<Arc<Vec<Arc<Port>>>> {
        self.current.load()
    }

    /// Appends the port `make` builds for the next id, unless `make` refuses, seeing the
    /// current ports. `make` runs under the writers' lock: nothing that blocks goes in it.
    pub fn add<E>(&self, make: impl FnOnce(PortId, &[Arc<Port>]) -> Result<Port, E>) -> Result<Arc<Port>, E> {
        let _edit = self.edit.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let port = Arc::new(make(old.len(), &old)?);
        let mut ports = Vec::with_capacity(old.len() + 1);
        ports.extend(old.iter().cloned());
        ports.push(port.clone());
        self.current.store(Arc::new(ports));
        Ok(port)
    }

    /// Lets go of removed port `id`: its slot keeps a placeholder that is never connected (so
    /// ids stay stable and a late frame for it is dropped as for a port that is down), and the
    /// port goes once its own threads have ended.
    pub fn retire(&self, id: PortId) {
        let _edit = self.edit.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        if !old.get(id).is_some_and(|p| p.removed.load(Ordering::Acquire)) {
            return;
        }
        let tombstone = self.tombstone.get_or_init(|| {
            let t = Port::new(PortId::MAX, "", super::PortKind::Vhost);
            t.removed.store(true, Ordering::Release);
            Arc::new(t)
        });
        let mut ports: Vec<Arc<Port>> = old.iter().cloned().collect();
        ports[id] = tombstone.clone();
        self.current.store(Arc::new(ports));
    }
}

impl From<Vec<Arc<Port>>> for PortList {
    fn from(ports: Vec<Arc<Port>>) -> PortList {
        PortList { current: ArcSwap::from_pointee(ports), edit: Mutex::new(()), tombstone: Default::default() }
    }
}
