//! Real guests (QEMU, TCG) on the LAN through each uplink, as in the seeds' bridged
//! scenarios. The "LAN" is a namespace the test makes, joined to vunet's own namespace by a
//! veth pair, with dnsmasq serving DHCP, an iperf3 server, and an nc client in it.

use std::path::Path;
use std::time::Duration;

use vunet_tests::guest::{serial, Guest, Socket};
use vunet_tests::netns::{veth, wait_until, Background, Netns};
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(240);

/// The LAN: `lan0` at 10.9.0.1/24 with dnsmasq handing out 10.9.0.100–150, an iperf3 server;
/// `up0` on vunet's side.
struct Lan {
    host: Netns,
    lan: Netns,
    _servers: Vec<Background>,
}

fn lan(tag: &str, dir: &Path) -> Lan {
    let host = Netns::new(&format!("{tag}-h"));
    let lan = Netns::new(&format!("{tag}-l"));
    veth(&host, "up0", &lan, "lan0");
    lan.run("ip addr add 10.9.0.1/24 dev lan0");
    let dnsmasq = lan.spawn(&format!(
        "dnsmasq --no-daemon --conf-file=/dev/null --user=root --port=0 --interface=lan0 --bind-interfaces \
         --dhcp-range=10.9.0.100,10.9.0.150,255.255.255.0,1h --dhcp-leasefile={0}/dnsmasq.leases --pid-file={0}/dnsmasq.pid",
        dir.display()
    ));
    let iperf = lan.spawn("iperf3 -s");
    Lan { host, lan, _servers: vec![dnsmasq, iperf] }
}

/// The guest's part: lease from the LAN's dnsmasq, ping the LAN, optionally iperf3 to it, then
/// serve one nc connection.
fn lan_guest_script(iperf: bool) -> String {
    format!(
        "cat > /tmp/hook.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface; echo \"LEASED $ip\" ;; esac\nEOF\n\
         chmod +x /tmp/hook.sh\nudhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 || exit 3\n\
         ping -c 3 -W 5 10.9.0.1 || exit 4\n{}\
         echo NC-READY\nnc -l -p 7000 -e echo hello-from-guest || exit 6\n",
        if iperf { "iperf3 -c 10.9.0.1 -t 3 -f m || exit 5\n" } else { "" }
    )
}

/// Boots a guest on `sock` and checks the whole scenario: DHCP from the LAN, ping, iperf3,
/// and a LAN client reaching the guest's nc server.
fn guest_on_the_lan(lan: &Lan, dir: &Path, sock: &Path, iperf: bool) -> String {
    let g = Guest::boot("g", dir, &Socket::Connect(sock.to_path_buf()), "52:54:00:09:00:01", "", &lan_guest_script(iperf));
    // vunet's log goes with a failure: the directory is removed when the test ends.
    let log = || std::fs::read_to_string(dir.join("vunet.log")).unwrap_or_default();
    assert!(g.console.wait_for("NC-READY", BOOT_AND_RUN), "guest:\n{}\nvunet:\n{}", g.console.text(), log());
    let out = g.console.text();
    let ip = out.split("LEASED ").nth(1).and_then(|s| s.split_whitespace().next()).expect("a lease").to_string();
    assert!(ip.starts_with("10.9.0.1"), "leased from dnsmasq's range: {ip}");
    if iperf {
        assert!(out.contains("receiver"), "iperf3 ran to the LAN:\n{out}\nvunet:\n{}", log());
    }
    let mut reply = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            reply = String::from_utf8_lossy(&lan.lan.try_run(&format!("busybox nc -w 3 {ip} 7000 </dev/null")).stdout).into_owned();
            reply.contains("hello-from-guest")
        }),
        "a LAN client reaches the guest's nc server (got {reply:?})\nguest:\n{}",
        g.console.text()
    );
    assert_eq!(g.wait_exit(Duration::from_secs(30)), Some(0), "guest:\n{}", g.console.text());
    out
}

/// vunet in the host namespace with a bridged network whose uplink is `uplink` (TOML lines).
fn bridged_vunet(lan: &Lan, dir: &Path, uplink: &str) -> vunet_tests::guest::VunetProcess {
    let cfg = dir.join("vunet.toml");
    std::fs::write(
        &cfg,
        format!("[[network]]\nname = \"lan\"\nmode = \"bridge\"\n[network.uplink]\n{uplink}\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n"),
    )
    .unwrap();
    lan.host.vunet(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

#[test]
fn guest_on_an_af_packet_uplink_is_a_lan_host() {
    let _turn = serial();
    let dir = TempDir::new("lan-afp");
    let lan = lan("lafp", dir.path());
    let _v = bridged_vunet(&lan, dir.path(), "kind = \"af-packet\"\ninterface = \"up0\"");
    guest_on_the_lan(&lan, dir.path(), &dir.path().join("vm1.sock"), true);
}

#[test]
fn guest_on_a_macvtap_uplink_is_a_lan_host() {
    let _turn = serial();
    let dir = TempDir::new("lan-mvt");
    let lan = lan("lmvt", dir.path());
    let _v = bridged_vunet(&lan, dir.path(), "kind = \"macvtap\"\ninterface = \"up0\"");
    guest_on_the_lan(&lan, dir.path(), &dir.path().join("vm1.sock"), true);
}

/// Seed 000: the host's LAN NIC is in a kernel bridge br0; vunet attaches to br0 itself.
#[test]
fn seed_000_af_packet_on_an_existing_kernel_bridge() {
    let _turn = serial();
    let dir = TempDir::new("lan-br0-afp");
    let lan = lan("lbra", dir.path());
    lan.host.run("ip link add br0 type bridge && ip link set up0 master br0 && ip link set br0 up");
    let _v = bridged_vunet(&lan, dir.path(), "kind = \"af-packet\"\ninterface = \"br0\"");
    guest_on_the_lan(&lan, dir.path(), &dir.path().join("vm1.sock"), false);
}

/// Seed 000 the other way: vunet's tap is enslaved to br0 next to the LAN NIC.
#[test]
fn seed_000_tap_uplink_enslaved_to_a_kernel_bridge() {
    let _turn = serial();
    let dir = TempDir::new("lan-br0-tap");
    let lan = lan("lbrt", dir.path());
    lan.host.run("ip link add br0 type bridge && ip link set up0 master br0 && ip link set br0 up");
    let _v = bridged_vunet(&lan, dir.path(), "kind = \"tap\"\ninterface = \"vutap0\"");
    lan.host.run("ip link set vutap0 master br0");
    guest_on_the_lan(&lan, dir.path(), &dir.path().join("vm1.sock"), false);
}

/// VirtualBox host-only: an isolated network with vunet's DHCP and a tap the host addresses.
/// The host pings the guest and the guest pings the host.
#[test]
fn tap_uplink_with_a_host_address_reaches_guests_both_ways() {
    let _turn = serial();
    let dir = TempDir::new("tap-hostonly");
    let host = Netns::new("tapho");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"hostonly\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\n\
         [network.dns]\nforwarders = []\n[network.uplink]\nkind = \"tap\"\ninterface = \"vutap0\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    )
    .unwrap();
    let _v = host.vunet(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    host.run("ip addr add 10.0.0.200/24 dev vutap0");
    let g = Guest::boot(
        "g",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:0a:00:01",
        "",
        "cat > /tmp/hook.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface; echo \"LEASED $ip\" ;; esac\nEOF\n\
         chmod +x /tmp/hook.sh\nudhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 || exit 3\nping -c 3 -W 5 10.0.0.200 || exit 4\necho PINGED-HOST\nsleep 600\n",
    );
    // The guest stays up (sleep 600) until the test ends and kills it, however long the host's
    // ping takes to start.
    assert!(g.console.wait_for("PINGED-HOST", BOOT_AND_RUN), "the guest pings the host:\n{}", g.console.text());
    let out = g.console.text();
    let ip = out.split("LEASED ").nth(1).and_then(|s| s.split_whitespace().next()).expect("a lease").to_string();
    let ping = host.try_run(&format!("busybox ping -c 3 -W 5 {ip}"));
    assert!(ping.status.success(), "the host pings the guest at {ip}: {}", String::from_utf8_lossy(&ping.stdout));
}
