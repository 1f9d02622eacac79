//! IPv6 port security with a real guest as the victim: a simulated guest on a secured port
//! sends router advertisements, a DHCPv6 server reply and a neighbour advertisement for the
//! victim's address; none reaches the victim (its routes and addresses stay as it set them),
//! and port-list counts each. The same advertisement from a port without port security does
//! change the victim's routes: the frame is one Linux takes. The victim also resolves a name
//! over IPv6 at the gateway.

use std::net::Ipv6Addr;
use std::time::Duration;

use etherparse::PacketBuilder;
use serde_json::Value;
use vunet::control::{request, Request};
use vunet_switch::checksum::{finish, pseudo_v6, sum};
use vunet_switch::format_mac;
use vunet_switch::gateway::{gateway_mac, link_local};
use vunet_tests::guest::*;
use vunet_tests::*;

const BOOT: Duration = Duration::from_secs(180);
const VICTIM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x20];
const ROGUE: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
const UNGUARDED: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0c];
const VICTIM_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x20);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// An ICMPv6 message from `src` (MAC and address) to `dst`, hop limit 255 as ND requires.
fn icmp6(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let l4 = f.len();
    f.extend_from_slice(body);
    let c = finish(sum(&f[l4..], pseudo_v6(&src.octets(), &dst.octets(), 58, body.len() as u32)));
    f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    f
}

/// A router advertisement from `mac`'s link-local address: a default router for 30 minutes,
/// and the prefix 2001:db8:bad::/64 for SLAAC.
fn router_advert(mac: [u8; 6]) -> Vec<u8> {
    let mut b = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&mac);
    b.extend_from_slice(&[3, 4, 64, 0xc0, 0, 1, 0x51, 0x80, 0, 0, 0x38, 0x40, 0, 0, 0, 0]);
    b.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 0).octets());
    icmp6(mac, [0x33, 0x33, 0, 0, 0, 1], link_local(&mac), ALL_NODES, &b)
}

/// A neighbour solicitation or advertisement from `mac`'s link-local address about `target`,
/// with a link-layer address option for `mac`.
fn nd(ty: u8, mac: [u8; 6], dst_mac: [u8; 6], dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut b = vec![ty, 0, 0, 0, if ty == 136 { 0x20 } else { 0 }, 0, 0, 0];
    b.extend_from_slice(&target.octets());
    b.extend_from_slice(&[if ty == 136 { 2 } else { 1 }, 1]);
    b.extend_from_slice(&mac);
    icmp6(mac, dst_mac, link_local(&mac), dst, &b)
}

/// A DHCPv6 Advertise from `mac`'s link-local address to the victim's.
fn dhcpv6_advertise(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    let msg = [2, 0x12, 0x34, 0x56, 0, 2, 0, 4, 0, 0, 0, 1];
    PacketBuilder::ethernet2(mac, VICTIM)
        .ipv6(link_local(&mac).octets(), link_local(&VICTIM).octets(), 64)
        .udp(547, 546)
        .write(&mut f, &msg)
        .unwrap();
    f
}

/// The console text between two markers.
fn section(text: &str, from: &str, to: &str) -> String {
    let start = text.find(from).map(|i| i + from.len()).unwrap_or(text.len());
    let end = text[start..].find(to).map(|i| start + i).unwrap_or(text.len());
    text[start..end].to_string()
}

#[test]
fn a_guest_cannot_advertise_routes_or_serve_dhcpv6_to_another() {
    let _turn = serial();
    let dir = TempDir::new("ipv6-guard");
    let toml = "control_socket = \"ctl.sock\"\n[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\ngateway6 = \"fd00:7675:1::1/64\"\n\
                [[network.port]]\nname = \"p0\"\nsocket = \"p0.sock\"\n[[network.port]]\nname = \"p1\"\nsocket = \"p1.sock\"\n\
                [[network.port]]\nname = \"p2\"\nsocket = \"p2.sock\"\nport_security = false\n\
                [network.dns]\nforwarders = []\nhosts = [{ name = \"six\", ip = \"fd00:7675:1::66\" }]\n";
    let cfg = vunet::Config::parse(toml, "test.toml", dir.path()).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    let mut rogue = VmSim::connect(&dir.path().join("p1.sock"), SimOptions::full()).unwrap();
    let mut unguarded = VmSim::connect(&dir.path().join("p2.sock"), SimOptions::full()).unwrap();
    rogue.post_rx(QUEUE_SIZE);
    unguarded.post_rx(QUEUE_SIZE);
    let net = d.network("test").unwrap();
    assert!(wait_until(Duration::from_secs(10), || ["p1", "p2"].iter().all(|p| net.port(p).is_some_and(|p| p.rx_published()))));
    // The victim sets its address (its DAD probe claims it), then waits for the rogue's
    // solicitation, sent after everything else the rogue sends, before it looks at its routes.
    let script = format!(
        "ip link set eth0 up\nip -6 addr add {VICTIM_IP}/64 dev eth0\n\
         i=0; while ip -6 addr show dev eth0 | grep -q tentative; do i=$((i+1)); [ $i -gt 100 ] && exit 2; sleep 0.2; done\n\
         echo PHASE1-READY\n\
         i=0; until ip -6 neigh show dev eth0 | grep -q '{rogue_ll} ' && ip -6 neigh show dev eth0 | grep -q 'fd00:7675:1::1 '; do i=$((i+1)); [ $i -gt 300 ] && exit 3; sleep 0.2; done\n\
         echo ROUTES1-BEGIN; ip -6 route show; ip -6 addr show dev eth0; echo ROUTES1-END\n\
         nslookup -type=AAAA six fd00:7675:1::1\n\
         echo PHASE2-READY\n\
         i=0; until ip -6 route show | grep -q '^default via {unguarded_ll}'; do i=$((i+1)); [ $i -gt 150 ] && exit 4; sleep 0.2; done\n\
         echo ROUTES2-BEGIN; ip -6 route show; echo ROUTES2-END\n",
        rogue_ll = link_local(&ROGUE),
        unguarded_ll = link_local(&UNGUARDED),
    );
    let victim = Guest::boot("victim", dir.path(), &Socket::Connect(dir.path().join("p0.sock")), &format_mac(&VICTIM), "", &script);
    assert!(victim.console.wait_for("PHASE1-READY", BOOT), "victim:\n{}", victim.console.text());
    // Nothing on this network answers neighbour discovery for the gateway's IPv6 address yet:
    // the port without port security puts the gateway's MAC in the victim's neighbour cache
    // (a solicitation from the gateway's address, with its MAC as source link-layer address),
    // so the victim can ask the gateway's DNS over IPv6.
    let solicited = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x20);
    let gw6 = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 1);
    let mut b = vec![135, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&VICTIM_IP.octets());
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&gateway_mac("test"));
    unguarded.send(&icmp6(UNGUARDED, [0x33, 0x33, 0xff, 0, 0, 0x20], gw6, solicited, &b));
    assert!(unguarded.wait_tx_all(Duration::from_secs(10)));
    rogue.send(&router_advert(ROGUE));
    rogue.send(&dhcpv6_advertise(ROGUE));
    // An advertisement that the victim's address is the rogue's.
    rogue.send(&nd(136, ROGUE, [0x33, 0x33, 0, 0, 0, 1], ALL_NODES, VICTIM_IP));
    // Its own solicitation for the victim's address passes: the victim's cue.
    rogue.send(&nd(135, ROGUE, [0x33, 0x33, 0xff, 0, 0, 0x20], solicited, VICTIM_IP));
    assert!(rogue.wait_tx_all(Duration::from_secs(10)));
    assert!(victim.console.wait_for("PHASE2-READY", Duration::from_secs(60)), "victim:\n{}", victim.console.text());
    let text = victim.console.text();
    let routes = section(&text, "ROUTES1-BEGIN", "ROUTES1-END");
    assert!(
        !routes.contains("default") && !routes.contains("2001:db8:bad"),
        "the rogue advertisement changed the victim's routes:\n{text}"
    );
    assert!(routes.contains(&format!("{VICTIM_IP}/64")), "{text}");
    assert!(section(&text, "ROUTES1-END", "PHASE2-READY").contains("fd00:7675:1::66"), "DNS over IPv6 at the gateway:\n{text}");
    // port-list: the rogue's drops by reason, the victim's addresses (while it is there: a
    // guest that leaves takes its addresses with it).
    let ports = request(&dir.path().join("ctl.sock"), &Request::PortList { network: "test".into() }).expect("port-list");
    let port = |name: &str| -> Value { ports.as_array().unwrap().iter().find(|p| p["name"] == name).cloned().unwrap() };
    let drops = &port("p1")["drops"];
    assert_eq!(drops["rogue_router_advert"].as_u64(), Some(1), "{drops}");
    assert_eq!(drops["rogue_dhcp_server"].as_u64(), Some(1), "{drops}");
    assert_eq!(drops["spoofed_ip"].as_u64(), Some(1), "{drops}");
    assert_eq!(port("p2")["drops"]["rogue_router_advert"].as_u64(), None);
    let v6 = port("p0")["ipv6"].clone();
    for a in [link_local(&VICTIM).to_string(), VICTIM_IP.to_string()] {
        assert!(v6.as_array().unwrap().iter().any(|x| x == &a), "{a} in {v6}");
    }
    // The same advertisement from the port without port security is taken.
    unguarded.send(&router_advert(UNGUARDED));
    assert_eq!(victim.wait_exit(Duration::from_secs(60)), Some(0), "victim:\n{}", victim.console.text());
    let text = victim.console.text();
    assert!(section(&text, "ROUTES2-BEGIN", "ROUTES2-END").contains("2001:db8:bad"), "{text}");
    drop(d);
}
