//! IPv6 over socket NAT with a real guest (QEMU, TCG): a `nat` network without an uplink and
//! with `gateway6`, vunet and QEMU as nobody. The guest takes a SLAAC address from the
//! gateway's advertisements and reaches, through vunet's AF_INET6 sockets: an HTTP server on
//! the host's ::1 through the gateway's IPv6 address (`host_loopback`), a DNS server on ::1
//! (one UDP datagram out, its answer back), and the host's own address with ping6 (a ping
//! socket). "The host" is a namespace the test makes; nothing leaves it.

use std::path::Path;
use std::time::Duration;

use vunet_tests::guest::{serial, unprivileged, Guest, Socket, VunetProcess};
use vunet_tests::netns::{Background, Netns};
use vunet_tests::TempDir;

const NOBODY: u32 = 65534;
const RUN: Duration = Duration::from_secs(240);

struct Host {
    ns: Netns,
    _servers: Vec<Background>,
}

/// The host namespace: fd77::1 on a veth interface (one of "the host's" own addresses), an
/// HTTP server and a DNS server on its ::1, ping sockets allowed to every group.
fn host(tag: &str, dir: &Path) -> Host {
    let ns = Netns::new(tag);
    ns.run("sysctl -qw net.ipv4.ping_group_range='0 2147483647'");
    ns.run("ip link add h0 type veth peer name h1 && ip -6 addr add fd77::1/64 dev h0 nodad && ip link set h0 up && ip link set h1 up");
    std::fs::create_dir_all(dir.join("www6")).unwrap();
    std::fs::write(dir.join("www6").join("hello.txt"), "HELLO-FROM-V6-LOOPBACK\n").unwrap();
    let servers = vec![
        ns.spawn(&format!("python3 -m http.server 8086 --bind ::1 --directory {}", dir.join("www6").display())),
        ns.spawn(&format!(
            "dnsmasq --no-daemon --conf-file=/dev/null --user=root --no-resolv --no-hosts --listen-address=::1 \
             --bind-interfaces --port=5353 --host-record=far6.test,fd77::9 --pid-file={}/dnsmasq.pid",
            dir.display()
        )),
    ];
    Host { ns, _servers: servers }
}

/// `vunet run` as nobody inside the host namespace (the binary copied where nobody reads it).
fn vunet_as_nobody(h: &Host, dir: &Path, network: &str) -> VunetProcess {
    let bin = dir.join("vunet");
    std::fs::copy(vunet_tests::guest::vunet_binary(), &bin).unwrap();
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{network}")).unwrap();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &h.ns.name]);
    let inner = unprivileged(NOBODY, bin.to_str().unwrap());
    cmd.arg(inner.get_program()).args(inner.get_args());
    VunetProcess::start_with(cmd, &["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

/// The control socket's answer to `args` as JSON.
fn control(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(vunet_tests::guest::vunet_binary())
        .args(args)
        .args(["--json", "--control", dir.join("control.sock").to_str().unwrap()])
        .output()
        .expect("vunet CLI");
    assert!(out.status.success(), "vunet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

const NETWORK: &str = "[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n\
     gateway6 = \"fd00:7675:9::1/64\"\n\
     [network.nat]\nhost_loopback = true\n\
     [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n";

#[test]
fn a_slaac_guest_reaches_the_hosts_ipv6_loopback_and_address_through_host_sockets() {
    let _turn = serial();
    let dir = TempDir::new("socket-nat-v6");
    let h = host("snat6", dir.path());
    let _v = vunet_as_nobody(&h, dir.path(), NETWORK);
    // Wait for a usable SLAAC address (DAD first), then: a page from ::1 through the
    // gateway's IPv6 address, a DNS query to ::1 port 5353 (busybox nslookup takes
    // [addr]:port), ping6 of the host's own address. A connection stays open for the listing.
    let script = "i=0\nuntil ip -6 addr show dev eth0 scope global | grep -v tentative | grep -q 'inet6 fd00:7675:9:'; do \
         i=$((i+1)); [ $i -gt 300 ] && { ip -6 addr; exit 3; }; sleep 0.2; done\n\
         echo \"SLAAC $(ip -6 addr show dev eth0 scope global | grep -o 'inet6 [0-9a-f:]*/[0-9]*')\"\n\
         printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 10 fd00:7675:9::1 8086 || exit 4\n\
         nslookup -type=aaaa far6.test '[fd00:7675:9::1]:5353' | sed 's/^/V6DNS /' || exit 5\n\
         ping6 -c 2 -W 5 fd77::1 || exit 6\n\
         sleep 1000 | nc fd00:7675:9::1 8086 &\nsleep 2\n\
         echo GUEST-READY\nsleep 1000\n";
    let g = Guest::boot_as(NOBODY, "g6", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:0a:00:06", "", script);
    let ready = g.console.wait_until(|t| t.contains("GUEST-READY") || t.contains("VUNET-TEST-EXIT"), RUN);
    let out = g.console.text();
    let log = || std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    assert!(ready && out.contains("GUEST-READY"), "guest:\n{out}\nvunet:\n{}", log());
    assert!(out.contains("SLAAC inet6 fd00:7675:9:"), "a SLAAC address:\n{out}");
    assert!(out.contains("HELLO-FROM-V6-LOOPBACK"), "a page from the host's ::1 through the gateway's IPv6 address:\n{out}");
    assert!(out.contains("V6DNS Address: fd77::9"), "a UDP query to the host's ::1 and its answer back:\n{out}");
    assert!(out.contains("2 packets transmitted, 2 packets received"), "ping6 of the host's address through a ping socket:\n{out}");

    // The listing shows the open IPv6 connection.
    let ports = control(dir.path(), &["port-list", "default"]);
    let flows = &ports[0]["nat_flows"];
    assert!(
        flows["flows"].as_array().unwrap().iter().any(|f| f["remote"] == "[fd00:7675:9::1]:8086" && f["proto"] == "tcp"),
        "port-list shows the guest's IPv6 connection: {flows}"
    );
    let nets = control(dir.path(), &["net-list"]);
    assert!(nets[0]["socket_nat"]["ipv6_flows"].as_u64().unwrap_or(0) >= 1, "net-list counts it as IPv6: {}", nets[0]);
}

#[test]
fn a_host_without_ipv6_answers_the_guests_ipv6_flows_as_unreachable() {
    let _turn = serial();
    let dir = TempDir::new("socket-nat-nov6");
    let ns = Netns::new("snatn6");
    ns.run("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1");
    let h = Host { ns, _servers: Vec::new() };
    let _v = vunet_as_nobody(&h, dir.path(), NETWORK);
    // Two connections to an address the host has no route to: each fails at once, as the
    // host's own connect() did (not after the guest's SYN retries).
    let script = "i=0\nuntil ip -6 addr show dev eth0 scope global | grep -v tentative | grep -q 'inet6 fd00:7675:9:'; do \
         i=$((i+1)); [ $i -gt 300 ] && { ip -6 addr; exit 3; }; sleep 0.2; done\n\
         for n in 1 2; do t0=$(date +%s); nc -w 10 2001:db8::1 80 </dev/null; echo \"V6TCP rc=$? in $(( $(date +%s) - t0 ))s\"; done\n\
         echo GUEST-READY\nsleep 1000\n";
    let g = Guest::boot_as(NOBODY, "g6n", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:0a:00:07", "", script);
    let log = || std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    assert!(g.console.wait_for("GUEST-READY", RUN), "guest:\n{}\nvunet:\n{}", g.console.text(), log());
    let out = g.console.text();
    assert_eq!(out.matches("V6TCP rc=1 in 0s").count() + out.matches("V6TCP rc=1 in 1s").count(), 2, "refused at once:\n{out}");
    assert!(out.contains("Network is unreachable"), "the guest hears 'network unreachable' (ICMPv6 no route):\n{out}");
    let nets = control(dir.path(), &["net-list"]);
    // At least one per connection (a guest may send its SYN again before the error stops it).
    assert!(nets[0]["socket_nat"]["drops"]["no_ipv6"].as_u64().unwrap_or(0) >= 2, "counted: {}", nets[0]);
    assert_eq!(log().matches("cannot carry guests' IPv6 flows").count(), 1, "said once:\n{}", log());
}
