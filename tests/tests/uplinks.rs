//! Uplinks, driven by simulated guests: a "host" namespace where vunet runs and a "LAN"
//! namespace joined to it by a veth pair, both made by the test. The LAN's kernel is the peer:
//! it answers ARP and ping, and counts what arrives.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use vunet_tests::guest::VunetProcess;
use vunet_tests::netns::{veth, Netns};
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 50);
const LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

/// Host and LAN namespaces joined by `up0` (host side) and `lan0` (LAN side, 10.9.0.1/24).
fn lan(tag: &str) -> (Netns, Netns) {
    let host = Netns::new(&format!("{tag}-h"));
    let lan = Netns::new(&format!("{tag}-l"));
    veth(&host, "up0", &lan, "lan0");
    lan.run("ip addr add 10.9.0.1/24 dev lan0");
    (host, lan)
}

/// A bridged network `lan` with `uplink` (TOML lines) and one guest port `vm1`.
fn start_bridged(host: &Netns, dir: &Path, uplink: &str) -> (VunetProcess, std::path::PathBuf) {
    let cfg = dir.join("vunet.toml");
    std::fs::write(
        &cfg,
        format!("[[network]]\nname = \"lan\"\nmode = \"bridge\"\n[network.uplink]\n{uplink}\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n"),
    )
    .unwrap();
    let v = host.vunet(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"));
    (v, dir.join("vm1.sock"))
}

fn arp_request(sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip.octets());
    f
}

/// The MAC that answers ARP for `ip`, asked from the guest.
fn resolve(vm: &mut VmSim, ip: Ipv4Addr) -> Option<[u8; 6]> {
    vm.send(&arp_request(GUEST_IP, ip));
    std::iter::from_fn(|| vm.recv(T)).find_map(|(_, f)| {
        (f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == ip.octets()).then(|| f[22..28].try_into().unwrap())
    })
}

fn echo_request(dst_mac: [u8; 6], dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(GUEST, dst_mac)
        .ipv4(GUEST_IP.octets(), dst.octets(), 64)
        .icmpv4_echo_request(7, seq)
        .write(&mut f, b"vunet")
        .unwrap();
    f
}

/// Waits for an ICMP echo reply (`reply`) or request from `from`.
fn icmp_from(vm: &mut VmSim, from: Ipv4Addr, reply: bool) -> bool {
    std::iter::from_fn(|| vm.recv(T)).any(|(_, f)| {
        let Ok(p) = SlicedPacket::from_ethernet(&f) else { return false };
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { return false };
        if ip.header().source_addr() != from {
            return false;
        }
        match p.transport {
            Some(TransportSlice::Icmpv4(i)) => {
                matches!(i.icmp_type(), etherparse::Icmpv4Type::EchoReply(_)) == reply
                    && matches!(i.icmp_type(), etherparse::Icmpv4Type::EchoReply(_) | etherparse::Icmpv4Type::EchoRequest(_))
            }
            _ => false,
        }
    })
}

/// Guest ↔ LAN through the uplink: ARP both ways, ping both ways, and a 64 KiB TSO frame that
/// arrives whole on the LAN side.
fn guest_reaches_lan(vm: &mut VmSim, lan: &Netns) {
    let lan_mac = resolve(vm, LAN_IP).expect("the LAN answers ARP through the uplink");
    vm.send(&echo_request(lan_mac, LAN_IP, 1));
    assert!(icmp_from(vm, LAN_IP, true), "the LAN answers ping");
    // The LAN pings the guest: it learned the guest's MAC from the ARP request above.
    let pinger = lan.spawn(&format!("busybox ping -c 3 {GUEST_IP}"));
    assert!(icmp_from(vm, LAN_IP, false), "the LAN's echo request reaches the guest");
    drop(pinger);
    let before = lan.rx_bytes("lan0");
    let (hdr, f) = tso_frame(GUEST, lan_mac, 65000);
    vm.send_with(&hdr, &f, true);
    assert!(
        wait_until(T, || lan.rx_bytes("lan0") >= before + 65000),
        "a 64 KiB TSO frame reaches the LAN ({} bytes arrived)",
        lan.rx_bytes("lan0") - before
    );
    // A burst: 128 frames posted at once (one TX batch) all reach the LAN.
    let packets = || lan.run("cat /sys/class/net/lan0/statistics/rx_packets").trim().parse::<u64>().unwrap();
    let before = packets();
    vm.prepare_tx(&vunet_switch::vnet::VnetHeader::default(), &eth_frame(lan_mac, GUEST, 0x88b5, 100, 1));
    assert_eq!(vm.post_prepared(128), 128);
    assert!(wait_until(T, || packets() >= before + 128), "a burst of 128 frames reaches the LAN ({} arrived)", packets() - before);
}

#[test]
fn af_packet_uplink_bridges_guests_to_the_lan() {
    let (host, lan) = lan("afp");
    let dir = TempDir::new("uplink-afp");
    let (vunet, sock) = start_bridged(&host, dir.path(), "kind = \"af-packet\"\ninterface = \"up0\"");
    let mut vm = VmSim::connect(&sock, SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    assert!(vunet.wait_connected("vm1", 1, T), "{}", vunet.console.text());
    guest_reaches_lan(&mut vm, &lan);
    assert!(vunet.console.wait_for("uplink af-packet up0 ready (offloads on)", T), "{}", vunet.console.text());
}

#[test]
fn macvtap_uplink_bridges_guests_to_the_lan() {
    let (host, lan) = lan("mvt");
    let dir = TempDir::new("uplink-mvt");
    let (vunet, sock) = start_bridged(&host, dir.path(), "kind = \"macvtap\"\ninterface = \"up0\"");
    let mut vm = VmSim::connect(&sock, SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    assert!(vunet.wait_connected("vm1", 1, T), "{}", vunet.console.text());
    guest_reaches_lan(&mut vm, &lan);
    assert!(host.run("ip -d link show vulan").contains("macvtap"), "vunet made the macvtap vulan on up0");
    drop(vunet);
}

#[test]
fn uplink_that_goes_away_and_comes_back_resumes_and_is_logged_once() {
    let (host, lan) = lan("flap");
    let dir = TempDir::new("uplink-flap");
    let (vunet, sock) = start_bridged(&host, dir.path(), "kind = \"af-packet\"\ninterface = \"up0\"");
    let mut vm = VmSim::connect(&sock, SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    assert!(vunet.wait_connected("vm1", 1, T), "{}", vunet.console.text());
    assert!(resolve(&mut vm, LAN_IP).is_some());

    // Link down and up: logged once each way, traffic resumes.
    host.run("ip link set up0 down");
    assert!(vunet.console.wait_for("link is down", T), "{}", vunet.console.text());
    host.run("ip link set up0 up");
    assert!(vunet.console.wait_for("link is up again", T), "{}", vunet.console.text());
    // Each try waits up to T for an answer: a few tries.
    assert!(wait_until(3 * T, || resolve(&mut vm, LAN_IP).is_some()), "traffic flows after the link came back");

    // Deleted and re-created: the uplink waits, then reopens on the new interface.
    host.run("ip link del up0");
    assert!(vunet.console.wait_for("the interface is gone", T), "{}", vunet.console.text());
    veth(&host, "up0", &lan, "lan0");
    lan.run("ip addr add 10.9.0.1/24 dev lan0");
    assert!(vunet.console.wait_for("uplink up0: back", T), "{}", vunet.console.text());
    assert!(wait_until(3 * T, || resolve(&mut vm, LAN_IP).is_some()), "traffic flows on the new interface");
    let log = vunet.console.text();
    assert_eq!(log.matches("the interface is gone").count(), 1, "logged once:\n{log}");
    assert_eq!(log.matches("link is down").count(), 1, "logged once:\n{log}");
}

#[test]
fn a_missing_uplink_interface_is_a_clear_error_at_start() {
    let host = Netns::new("noif");
    let dir = TempDir::new("uplink-noif");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"lan\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"eth9\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    )
    .unwrap();
    let out = host.try_run(&format!("{} run --config {}", vunet_tests::guest::vunet_binary().display(), cfg.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim(), "vunet: network lan: uplink interface \"eth9\" does not exist");
}

/// Interop: ISC dhclient (not busybox) on vunet's tap takes a lease from vunet's DHCP server.
#[test]
fn isc_dhclient_on_a_tap_uplink_leases_from_vunet() {
    let host = Netns::new("dhcl");
    let dir = TempDir::new("uplink-dhclient");
    let d = dir.path();
    let cfg = d.join("vunet.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"hostonly\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\n\
         [network.dns]\ndomain = \"lab\"\nforwarders = []\n[network.uplink]\nkind = \"tap\"\ninterface = \"vutap0\"\n",
    )
    .unwrap();
    let _v = host.vunet(&["--config", cfg.to_str().unwrap()], &d.join("vunet.log"));
    // dhclient's own script would rewrite /etc/resolv.conf; this one only records the lease.
    let script = d.join("record.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$reason $new_ip_address $new_routers $new_domain_name $new_domain_name_servers\" >> {}/events\n",
            d.display()
        ),
    )
    .unwrap();
    host.run(&format!("chmod +x {}", script.display()));
    let out = host.try_run(&format!(
        "timeout 30 dhclient -1 -v -sf {0}/record.sh -lf {0}/dhclient.leases -pf {0}/dhclient.pid vutap0; kill $(cat {0}/dhclient.pid) 2>/dev/null; true",
        d.display()
    ));
    let events = std::fs::read_to_string(d.join("events")).unwrap_or_default();
    let bound = events
        .lines()
        .find(|l| l.starts_with("BOUND "))
        .unwrap_or_else(|| panic!("dhclient got no lease; events:\n{events}\ndhclient:\n{}", String::from_utf8_lossy(&out.stderr)));
    let f: Vec<&str> = bound.split_whitespace().collect();
    let ip: Ipv4Addr = f[1].parse().unwrap();
    assert!((Ipv4Addr::new(10, 0, 0, 100)..=Ipv4Addr::new(10, 0, 0, 150)).contains(&ip), "{bound}");
    assert_eq!(f[2..], ["lab", "10.0.0.1"], "isolated: no router; the domain and the gateway as DNS server ({bound})");
}

/// macvtap's known limit (seed 000): the host cannot reach guests through the macvtap of its
/// own NIC. The way around it is a tap port in the same network that the host addresses: the
/// guest reaches the LAN through the macvtap and the host through the tap.
#[test]
fn a_tap_port_gives_the_host_a_way_to_guests_behind_a_macvtap() {
    let (host, lan) = lan("mvtap");
    let dir = TempDir::new("uplink-mvtap");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"lan\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"macvtap\"\ninterface = \"up0\"\n\
         [[network.port]]\nname = \"host\"\nkind = \"tap\"\ninterface = \"vuhost0\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    )
    .unwrap();
    let vunet = host.vunet(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    assert!(vunet.console.text().contains("port host: tap vuhost0 on the host"), "{}", vunet.console.text());
    host.run("ip addr add 10.9.0.3/24 dev vuhost0");
    let mut vm = VmSim::connect(&dir.path().join("vm1.sock"), SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    assert!(vunet.wait_connected("vm1", 1, T), "{}", vunet.console.text());
    assert!(resolve(&mut vm, LAN_IP).is_some(), "the LAN through the macvtap");
    let host_ip = Ipv4Addr::new(10, 9, 0, 3);
    let host_mac = resolve(&mut vm, host_ip).expect("the host through the tap port");
    vm.send(&echo_request(host_mac, host_ip, 1));
    assert!(icmp_from(&mut vm, host_ip, true), "the host answers the guest's ping");
    let pinger = host.spawn(&format!("busybox ping -c 3 {GUEST_IP}"));
    assert!(icmp_from(&mut vm, host_ip, false), "the host's ping reaches the guest");
    drop(pinger);
    let _ = lan;
}
