//! The router of a `nat` network under hostile guests, driven by simulated guests: vunet runs
//! in a "host" namespace, the LAN is a namespace behind a veth pair with dnsmasq answering DNS.
//! A flooding guest fills the NAT table only up to its limit, another guest keeps working,
//! vunet's memory stays bounded, and malformed IP headers are dropped and counted.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use etherparse::PacketBuilder;
use vunet_tests::guest::{vunet_binary, VunetProcess};
use vunet_tests::netns::{veth, Background, Netns};
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const FLOODER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const FLOODER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);
const VICTIM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x11];
const VICTIM_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 11);
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
const MAX_ENTRIES: usize = 1000;

struct Setup {
    _host: Netns,
    lan: Netns,
    _dns: Background,
    vunet: VunetProcess,
    cfg: std::path::PathBuf,
}

fn setup(dir: &Path, tag: &str, uplink_kind: &str) -> Setup {
    let host = Netns::new(&format!("{tag}-h"));
    let lan = Netns::new(&format!("{tag}-l"));
    veth(&host, "up0", &lan, "lan0");
    lan.run("ip addr add 10.9.0.1/24 dev lan0");
    let dns = lan.spawn(&format!(
        "dnsmasq --no-daemon --conf-file=/dev/null --user=root --no-resolv --no-hosts --interface=lan0 --bind-interfaces \
         --host-record=lanhost.test,10.9.0.77 --pid-file={}/dnsmasq.pid",
        dir.display()
    ));
    let cfg = dir.join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"control.sock\"\n[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n\
             [network.uplink]\nkind = \"{uplink_kind}\"\ninterface = \"up0\"\naddress = \"10.9.0.50/24\"\nrouter = \"10.9.0.1\"\n\
             [network.nat]\nmax_entries = {MAX_ENTRIES}\n\
             [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n[[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n"
        ),
    )
    .unwrap();
    let vunet = host.vunet(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"));
    Setup { _host: host, lan, _dns: dns, vunet, cfg }
}

/// The gateway's MAC, asked with ARP.
fn gateway_mac(vm: &mut VmSim, mac: [u8; 6], ip: Ipv4Addr) -> [u8; 6] {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY_IP.octets());
    vm.send(&f);
    std::iter::from_fn(|| vm.recv(T))
        .find_map(|(_, f)| (f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]).then(|| f[22..28].try_into().unwrap()))
        .expect("the gateway answers ARP")
}

/// A DNS query for lanhost.test (type A) to the LAN's dnsmasq.
fn dns_query(src_mac: [u8; 6], gw: [u8; 6], src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x07lanhost\x04test\x00\x00\x01\x00\x01");
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, gw).ipv4(src.octets(), [10, 9, 0, 1], 64).udp(sport, 53).write(&mut f, &q).unwrap();
    f
}

/// Whether the answer to a query from `sport` comes back translated to the guest.
fn answered(vm: &mut VmSim, ip: Ipv4Addr, sport: u16) -> bool {
    std::iter::from_fn(|| vm.recv(T)).any(|(_, f)| {
        f.len() > 42
            && f[12..14] == [8, 0]
            && f[26..30] == [10, 9, 0, 1]
            && f[30..34] == ip.octets()
            && f[34..36] == 53u16.to_be_bytes()
            && f[36..38] == sport.to_be_bytes()
            && f.windows(4).any(|w| w == [10, 9, 0, 77])
    })
}

fn vunet_json(cfg: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(vunet_binary()).args(args).arg("--json").arg("--config").arg(cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

#[test]
fn a_flooding_guest_fills_the_nat_table_only_to_its_limit_and_others_keep_working() {
    let dir = TempDir::new("nat-flood");
    let s = setup(dir.path(), "rt", "af-packet");
    let mut flooder = VmSim::connect(&dir.path().join("vm1.sock"), SimOptions::full()).unwrap();
    let mut victim = VmSim::connect(&dir.path().join("vm2.sock"), SimOptions::full()).unwrap();
    flooder.post_rx(QUEUE_SIZE);
    victim.post_rx(QUEUE_SIZE);
    assert!(s.vunet.wait_connected("vm1", 1, T) && s.vunet.wait_connected("vm2", 1, T), "{}", s.vunet.console.text());
    let gw = gateway_mac(&mut victim, VICTIM, VICTIM_IP);
    gateway_mac(&mut flooder, FLOODER, FLOODER_IP);

    // The victim's flow, answered before the flood.
    let mut ok = false;
    for _ in 0..5 {
        victim.send(&dns_query(VICTIM, gw, VICTIM_IP, 40000));
        if answered(&mut victim, VICTIM_IP, 40000) {
            ok = true;
            break;
        }
    }
    assert!(ok, "the LAN's DNS server answers through NAT\nvunet:\n{}", s.vunet.console.text());
    // Two guests, the same source port, the same server port, at the same moment: both answered.
    flooder.send(&dns_query(FLOODER, gw, FLOODER_IP, 40000));
    victim.send(&dns_query(VICTIM, gw, VICTIM_IP, 40000));
    assert!(answered(&mut flooder, FLOODER_IP, 40000) && answered(&mut victim, VICTIM_IP, 40000), "both guests' queries are answered");
    let rss_before = rss_kib(s.vunet.child.id());

    // 100 000 UDP flows and 20 000 SYNs to addresses beyond the LAN's router.
    for i in 0..120_000u32 {
        let mut f = Vec::new();
        let dst = [198, 18, (i >> 8) as u8, i as u8];
        let b = PacketBuilder::ethernet2(FLOODER, gw).ipv4(FLOODER_IP.octets(), dst, 64);
        if i < 100_000 {
            b.udp(1024 + (i % 60000) as u16, 7).write(&mut f, b"flood").unwrap();
        } else {
            b.tcp(2000 + (i % 60000) as u16, 80, i, 1000).syn().write(&mut f, &[]).unwrap();
        }
        flooder.send(&f);
        if i % 4096 == 0 {
            flooder.recv_all(Duration::from_millis(0));
        }
    }
    assert!(flooder.wait_tx_all(Duration::from_secs(60)), "vunet took every frame of the flood");
    let nets = vunet_json(&s.cfg, &["net-list"]);
    let conns = nets[0]["nat_connections"].as_u64().expect("nat_connections");
    assert!(conns <= MAX_ENTRIES as u64 && conns >= MAX_ENTRIES as u64 / 2, "the table is full but bounded: {conns}");
    let rss_after = rss_kib(s.vunet.child.id());
    assert!(rss_after < rss_before + 64 * 1024, "memory stays bounded: {rss_before} KiB → {rss_after} KiB");

    // The other guest keeps working: new flows and its old one.
    for sport in [40001, 40000] {
        let mut ok = false;
        for _ in 0..5 {
            victim.send(&dns_query(VICTIM, gw, VICTIM_IP, sport));
            if answered(&mut victim, VICTIM_IP, sport) {
                ok = true;
                break;
            }
        }
        assert!(ok, "the victim's query from port {sport} is answered after the flood");
    }

    // Malformed IP headers from a guest are dropped and counted.
    let mut good = Vec::new();
    PacketBuilder::ethernet2(FLOODER, gw).ipv4(FLOODER_IP.octets(), [198, 18, 0, 1], 64).udp(5, 5).write(&mut good, b"x").unwrap();
    let mut bad: Vec<Vec<u8>> = Vec::new();
    let mut f = good.clone();
    f[14] = 0x4f; // IHL 60 bytes, beyond the packet
    bad.push(f);
    let mut f = good.clone();
    f[16..18].copy_from_slice(&900u16.to_be_bytes()); // total length beyond the frame
    bad.push(f);
    let mut f = good.clone();
    f[24] ^= 0xff; // header checksum
    bad.push(f);
    let mut f = good[..14 + 20 + 4].to_vec(); // UDP cut to 4 bytes
    f[16..18].copy_from_slice(&24u16.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = vunet_switch::checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    bad.push(f);
    for f in &bad {
        flooder.send(f);
    }
    assert!(flooder.wait_tx_all(T));
    let ports = vunet_json(&s.cfg, &["port-list", "default"]);
    let vm1 = ports.as_array().unwrap().iter().find(|p| p["name"] == "vm1").unwrap();
    let counted = vm1["drops"]["bad_ip_header"].as_u64().unwrap_or(0);
    assert_eq!(counted, bad.len() as u64, "each malformed header is dropped and counted: {vm1}");

    // The same from the LAN, to the router's MAC and the uplink address.
    // A ping makes the LAN resolve the router's MAC; tried until its neighbor table has it.
    let mut neigh = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            neigh = s.lan.run("busybox ping -c 1 -W 2 10.9.0.50 > /dev/null; ip neigh show 10.9.0.50");
            neigh.contains("lladdr")
        }),
        "the router's MAC in the LAN's neighbor table: {neigh:?}"
    );
    let router_mac: [u8; 6] = vunet_switch::parse_mac(neigh.split_whitespace().nth(4).unwrap()).unwrap();
    let lan_mac = vunet_switch::parse_mac(s.lan.run("cat /sys/class/net/lan0/address").trim()).unwrap();
    let from_lan: Vec<Vec<u8>> = bad
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f[0..6].copy_from_slice(&router_mac);
            f[6..12].copy_from_slice(&lan_mac);
            f[26..30].copy_from_slice(&[10, 9, 0, 1]);
            f[30..34].copy_from_slice(&[10, 9, 0, 50]);
            f
        })
        .enumerate()
        .map(|(i, mut f)| {
            if i == 3 {
                // The truncated UDP keeps a valid IP header: it must fail on its UDP header.
                f[24..26].copy_from_slice(&[0, 0]);
                let c = vunet_switch::checksum::checksum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            f
        })
        .collect();
    s.lan.send_raw("lan0", &from_lan);
    let mut seen = 0;
    let uplink_drops = || {
        let ports = vunet_json(&s.cfg, &["port-list", "default"]);
        let up = ports.as_array().unwrap().iter().find(|p| p["name"].as_str().is_some_and(|n| n.starts_with("uplink:"))).cloned().unwrap();
        up["drops"]["bad_ip_header"].as_u64().unwrap_or(0)
    };
    assert!(
        wait_until(T, || {
            seen = uplink_drops();
            seen == from_lan.len() as u64
        }),
        "malformed headers from the LAN are dropped and counted on the uplink: {seen}"
    );
    assert!(vunet_json(&s.cfg, &["net-list"])[0]["name"] == "default", "vunet still answers");
}

/// The same masquerade through a macvtap uplink (bridge mode, with the router's own MAC).
#[test]
fn nat_through_a_macvtap_uplink() {
    let dir = TempDir::new("nat-mvt");
    let s = setup(dir.path(), "rtm", "macvtap");
    let mut vm = VmSim::connect(&dir.path().join("vm2.sock"), SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    assert!(s.vunet.wait_connected("vm2", 1, T), "{}", s.vunet.console.text());
    let gw = gateway_mac(&mut vm, VICTIM, VICTIM_IP);
    let mut ok = false;
    for _ in 0..5 {
        vm.send(&dns_query(VICTIM, gw, VICTIM_IP, 40000));
        if answered(&mut vm, VICTIM_IP, 40000) {
            ok = true;
            break;
        }
    }
    assert!(ok, "the LAN's DNS server answers through NAT over macvtap\nvunet:\n{}", s.vunet.console.text());
    let nets = vunet_json(&s.cfg, &["net-list"]);
    assert_eq!(nets[0]["uplink_address"], "10.9.0.50/24");
    assert!(nets[0]["uplink"].as_str().is_some_and(|u| u.starts_with("macvtap")), "{nets}");
}

/// Issue 12 point 8: a tap port of a nat network is a port like a guest's. The host behind it
/// leases an address from the gateway's DHCP server and reaches the LAN through the NAT.
/// (Before, the tap's frames went to the router as if they came from the LAN, so DHCP got no
/// answer, and the tap's thread ran a second copy of the router's timers.)
#[test]
fn a_tap_port_of_a_nat_network_leases_and_reaches_the_lan_like_a_guest() {
    let dir = TempDir::new("nat-tap");
    let d = dir.path();
    let host = Netns::new("rtt-h");
    let lan = Netns::new("rtt-l");
    veth(&host, "up0", &lan, "lan0");
    lan.run("ip addr add 10.9.0.1/24 dev lan0");
    let cfg = d.join("vunet.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n\
         [network.dhcp]\nrange = [\"192.168.122.100\", \"192.168.122.150\"]\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\naddress = \"10.9.0.50/24\"\nrouter = \"10.9.0.1\"\n\
         [[network.port]]\nname = \"host\"\nkind = \"tap\"\ninterface = \"vutp0\"\n",
    )
    .unwrap();
    let vunet = host.vunet(&["--config", cfg.to_str().unwrap()], &d.join("vunet.log"));
    let out = host.try_run("busybox udhcpc -i vutp0 -n -q -f -t 5 -T 1 -s /bin/true 2>&1");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let ip = text
        .lines()
        .find_map(|l| l.split("lease of ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|a| a.parse::<Ipv4Addr>().ok()))
        .unwrap_or_else(|| panic!("the host on the tap port got no lease:\n{text}\nvunet:\n{}", vunet.console.text()));
    assert!((Ipv4Addr::new(192, 168, 122, 100)..=Ipv4Addr::new(192, 168, 122, 150)).contains(&ip), "{text}");
    host.run(&format!("ip addr add {ip}/24 dev vutp0 && ip route add 10.9.0.0/24 via 192.168.122.1"));
    let ping = host.try_run("busybox ping -c 3 -W 3 10.9.0.1");
    assert!(
        ping.status.success(),
        "the LAN answers the tap host's ping through NAT:\n{}\nvunet:\n{}",
        String::from_utf8_lossy(&ping.stdout),
        vunet.console.text()
    );
}
