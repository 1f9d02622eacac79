//! Port security on a network with a gateway (the default): a guest keeps to its MAC and,
//! once it has a lease, to its address; it cannot play DHCP server. Each refusal is counted.

use std::net::Ipv4Addr;
use std::time::Duration;

use etherparse::PacketBuilder;
use vunet_dhcp::message::{build_client_message, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, udp_payload};
use vunet_switch::DropReason;
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
/// Silence that shows a frame was NOT let through (for negatives, and to drain frames already
/// there).
const QUIET: Duration = Duration::from_millis(400);
const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DHCP: &str = "[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\n";

fn udp_from(mac: [u8; 6], src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac, [0xff; 6]).ipv4(src, [10, 0, 0, 255], 64).udp(sport, dport).write(&mut f, b"hello").unwrap();
    f
}

fn arp_from(mac: [u8; 6], sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 77]);
    f.resize(60, 0);
    f
}

/// A DHCP exchange from `vm` (MAC A) for client address `chaddr`; the address leased, or None
/// if no answer came within `wait` (T where one must come, QUIET to show none does).
fn dhcp_lease(vm: &mut VmSim, chaddr: [u8; 6], wait: Duration) -> Option<Ipv4Addr> {
    let mut ip = None;
    for (t, req) in [(MessageType::Discover, None), (MessageType::Request, Some(()))] {
        let msg = build_client_message(t, chaddr, 7, req.and(ip), req.map(|_| GW), None);
        let mut f = Vec::new();
        build_udp(&mut f, A, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
        vm.send(&f);
        let reply = std::iter::from_fn(|| vm.recv(wait)).find_map(|(_, f)| udp_payload(&f, CLIENT_PORT).map(|(_, p)| p.to_vec()))?;
        ip = reply_yiaddr(&reply);
    }
    ip
}

fn setup() -> (TempDir, vunet::Daemon, Vec<VmSim>) {
    let dir = TempDir::new("portsec");
    let (d, socks) = start_network_with(dir.path(), 2, "", DHCP);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
    wait_network_ready(&d, "test");
    (dir, d, vms)
}

fn drops(d: &vunet::Daemon, port: &str, r: DropReason) -> u64 {
    d.network("test").unwrap().port(port).unwrap().counters.snapshot().drop_count(r)
}

#[test]
fn a_port_keeps_to_the_first_mac_it_uses() {
    let (_dir, d, mut vms) = setup();
    let ok = udp_from(A, [10, 0, 0, 7], 5000, 5001);
    vms[0].send(&ok);
    assert_eq!(vms[1].recv(T).expect("first MAC passes").1, ok);
    vms[0].send(&udp_from([0x52, 0x54, 0, 0, 0, 0xee], [10, 0, 0, 7], 5000, 5001));
    vms[0].send(&arp_from(A, B, [10, 0, 0, 7]));
    assert!(vms[0].wait_tx_all(T));
    assert!(vms[1].recv(QUIET).is_none(), "neither the foreign MAC nor the ARP with a foreign sender got through");
    // Drops are counted before the chains are completed (wait_tx_all above).
    assert_eq!(drops(&d, "p0", DropReason::SpoofedMac), 2);
    vms[0].send(&ok);
    assert_eq!(vms[1].recv(T).expect("its own MAC still passes").1, ok);
}

#[test]
fn after_a_lease_a_port_keeps_to_its_address() {
    let (_dir, d, mut vms) = setup();
    let ip = dhcp_lease(&mut vms[0], A, T).expect("lease");
    // The DHCP broadcasts flooded to port 1 are in its ring once port 0's chains are
    // completed: drain them.
    assert!(vms[0].wait_tx_all(T));
    vms[1].recv_all(QUIET);
    let own = udp_from(A, ip.octets(), 5000, 5001);
    vms[0].send(&own);
    assert_eq!(vms[1].recv(T).expect("own address passes").1, own);
    vms[0].send(&udp_from(A, [10, 0, 0, 149], 5000, 5001));
    vms[0].send(&arp_from(A, A, [10, 0, 0, 1]));
    assert!(vms[0].wait_tx_all(T));
    assert!(vms[1].recv(QUIET).is_none());
    assert_eq!(drops(&d, "p0", DropReason::SpoofedIp), 2, "a foreign source address and an ARP claiming the gateway");
    vms[0].send(&arp_from(A, A, ip.octets()));
    assert!(vms[1].recv(T).is_some(), "its own ARP passes");
}

#[test]
fn guests_cannot_be_dhcp_servers_or_lease_for_other_macs() {
    let (_dir, d, mut vms) = setup();
    vms[0].send(&udp_from(A, [10, 0, 0, 7], 67, 68));
    assert!(vms[0].wait_tx_all(T));
    assert!(vms[1].recv(QUIET).is_none(), "a DHCP answer from a guest reaches nobody");
    assert_eq!(drops(&d, "p0", DropReason::RogueDhcpServer), 1);
    // Port 0 is locked to A: a DISCOVER for another client address gets no offer.
    assert!(dhcp_lease(&mut vms[0], [0x52, 0x54, 0, 0, 0, 0x77], QUIET).is_none());
    assert!(vms[0].wait_tx_all(T));
    assert!(drops(&d, "p0", DropReason::SpoofedMac) >= 1);
    assert!(dhcp_lease(&mut vms[0], A, T).is_some(), "its own MAC leases");
}

#[test]
fn port_security_can_be_turned_off_per_port() {
    let dir = TempDir::new("portsec-off");
    let toml = format!(
        "[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n[[network.port]]\nname = \"p0\"\nsocket = \"{0}/p0.sock\"\nport_security = false\n[[network.port]]\nname = \"p1\"\nsocket = \"{0}/p1.sock\"\n",
        dir.path().display()
    );
    let cfg = vunet::Config::parse(&toml, "t.toml", dir.path()).unwrap();
    let d = vunet::Daemon::start(&cfg).unwrap();
    let mut a = VmSim::connect(&dir.path().join("p0.sock"), SimOptions::full()).unwrap();
    let mut b = VmSim::connect(&dir.path().join("p1.sock"), SimOptions::full()).unwrap();
    a.post_rx(QUEUE_SIZE);
    b.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "test");
    for mac in [A, [0x52, 0x54, 0, 0, 0, 0xee]] {
        let f = udp_from(mac, [10, 0, 0, 7], 5000, 5001);
        a.send(&f);
        assert_eq!(b.recv(T).unwrap().1, f, "any MAC passes with port_security = false");
    }
}

/// A guest's second vCPU rewrites the source MAC and IP of TX buffers that are already on the
/// ring, as fast as it can, while frames flow. vunet reads what it checks once and delivers
/// those checked bytes: not one frame with the other addresses reaches the other port.
#[test]
fn tx_buffers_rewritten_in_flight_never_deliver_a_spoofed_frame() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};
    let (_dir, d, mut vms) = setup();
    // A lease, so the port is held to its IP address as well as to its MAC.
    let ip = dhcp_lease(&mut vms[0], A, T).expect("a lease").octets();
    let ok = udp_from(A, ip, 5000, 5001);
    vms[0].send(&ok);
    while vms[1].recv(QUIET).is_some_and(|(_, f)| f != ok) {}
    let evil = udp_from([0x52, 0x54, 0, 0, 0, 0xee], [10, 0, 0, 66], 5000, 5001);
    // Source MAC (6..12) and the IPv4 header from the source address on (26..34 with the
    // checksum at 24..26 kept consistent by writing the whole header) differ.
    let (good_hdr, evil_hdr) = (ok[6..34].to_vec(), evil[6..34].to_vec());
    vms[0].prepare_tx(&vunet_switch::vnet::VnetHeader::default(), &ok);
    let slots: Vec<u64> = (0..QUEUE_SIZE / 2).map(|s| vms[0].tx_frame_gpa(s)).collect();
    let mem = vms[0].mem.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for &gpa in &slots {
                    let bytes = if flips.is_multiple_of(2) { &evil_hdr } else { &good_hdr };
                    mem.write_slice(bytes, GuestAddress(gpa + 6)).unwrap();
                }
                flips += 1;
            }
            flips
        })
    };
    let (mut sent, mut got, mut spoofed) = (0u64, 0u64, 0u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        sent += vms[0].post_prepared(64) as u64;
        while let Some((_, f)) = vms[1].recv(Duration::from_millis(1)) {
            got += 1;
            if f[6..34] != ok[6..34] {
                spoofed += 1;
            }
        }
        vms[1].refill_rx();
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    assert!(vms[0].wait_tx_all(T));
    while let Some((_, f)) = vms[1].recv(QUIET) {
        got += 1;
        spoofed += u64::from(f[6..34] != ok[6..34]);
    }
    let refused = drops(&d, "p0", DropReason::SpoofedMac) + drops(&d, "p0", DropReason::SpoofedIp);
    eprintln!("sent {sent}, delivered {got}, refused as spoofed {refused}, flips {flips}");
    assert!(flips > 100 && refused > 0, "the rewriting raced with vunet's reads (refused {refused}, flips {flips})");
    assert!(got > 0, "frames read with the good addresses were delivered");
    assert_eq!(spoofed, 0, "frames delivered with addresses that were not checked");
}

/// A DHCPRELEASE from `vm` (MAC A, address `src`) naming `ciaddr`.
fn dhcp_release(vm: &mut VmSim, src: Ipv4Addr, ciaddr: Ipv4Addr) {
    let mut msg = build_client_message(MessageType::Release, A, 9, None, Some(GW), None);
    msg[12..16].copy_from_slice(&ciaddr.octets());
    let mut f = Vec::new();
    build_udp(&mut f, A, [0xff; 6], src, GW, CLIENT_PORT, SERVER_PORT, &msg);
    vm.send(&f);
}

#[test]
fn a_release_the_server_ignores_leaves_the_port_held_to_its_lease() {
    let (_dir, d, mut vms) = setup();
    let ip = dhcp_lease(&mut vms[0], A, T).expect("lease");
    assert!(vms[0].wait_tx_all(T));
    vms[1].recv_all(QUIET);
    // A release naming an address that is not the guest's: the server keeps the binding, so
    // the port stays held to it.
    dhcp_release(&mut vms[0], ip, Ipv4Addr::new(10, 0, 0, 149));
    assert!(vms[0].wait_tx_all(T));
    vms[1].recv_all(QUIET);
    let p0 = d.network("test").unwrap().port("p0").unwrap();
    assert_eq!(p0.leased_ip(), Some(ip));
    vms[0].send(&udp_from(A, [10, 0, 0, 149], 5000, 5001));
    assert!(vms[0].wait_tx_all(T));
    assert!(vms[1].recv(QUIET).is_none(), "another address, while the lease holds");
    assert_eq!(drops(&d, "p0", DropReason::SpoofedIp), 1);
    // The real release frees the port from its lease, but not to take the gateway's address.
    dhcp_release(&mut vms[0], ip, ip);
    assert!(vms[0].wait_tx_all(T));
    vms[1].recv_all(QUIET);
    assert_eq!(p0.leased_ip(), None);
    let other = udp_from(A, [10, 0, 0, 149], 5000, 5001);
    vms[0].send(&other);
    assert_eq!(vms[1].recv(T).expect("an address nobody holds, without a lease").1, other);
    vms[0].send(&udp_from(A, GW.octets(), 5000, 5001));
    assert!(vms[0].wait_tx_all(T));
    assert!(vms[1].recv(QUIET).is_none(), "the gateway's address");
    assert_eq!(drops(&d, "p0", DropReason::SpoofedIp), 2);
}

#[test]
fn a_mac_another_port_holds_is_refused_until_that_port_is_removed() {
    let dir = TempDir::new("portsec-mac");
    let toml = |ports: &[&str]| {
        let mut t = "[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n".to_string();
        for p in ports {
            t.push_str(&format!("[[network.port]]\nname = \"{p}\"\nsocket = \"{p}.sock\"\n"));
        }
        t.push_str(DHCP);
        vunet::Config::parse(&t, "test.toml", dir.path()).unwrap()
    };
    let d = vunet::Daemon::start(&toml(&["p0", "p1", "p2"])).unwrap();
    let mut vms: Vec<VmSim> =
        ["p0", "p1", "p2"].iter().map(|p| VmSim::connect(&dir.path().join(format!("{p}.sock")), SimOptions::full()).unwrap()).collect();
    vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
    wait_network_ready(&d, "test");
    let ip = dhcp_lease(&mut vms[0], A, T).expect("lease");
    assert!(vms[0].wait_tx_all(T));
    vms[1].recv_all(QUIET);
    vms[2].recv_all(QUIET);
    // p1's guest sends with A: refused, and it does not get A's lease.
    let stolen = udp_from(A, ip.octets(), 5000, 5001);
    vms[1].send(&stolen);
    assert!(vms[1].wait_tx_all(T));
    assert!(vms[2].recv(QUIET).is_none() && vms[0].recv(QUIET).is_none());
    assert_eq!(drops(&d, "p1", DropReason::MacInUse), 1);
    assert_eq!(d.network("test").unwrap().port("p1").unwrap().leased_ip(), None);
    // p0 is removed: its MAC is free for the guest on p1.
    d.apply(&toml(&["p1", "p2"]));
    assert!(wait_until(T, || d.network("test").unwrap().port("p0").is_none()));
    vms[1].send(&stolen);
    assert_eq!(vms[2].recv(T).expect("A, moved to p1").1, stolen);
}
