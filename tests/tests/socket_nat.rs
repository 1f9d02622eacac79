//! Socket NAT with real guests (QEMU, TCG): a `nat` network without an uplink, vunet and QEMU
//! run as an ordinary user (nobody: no capabilities, no groups). "The host" is a namespace
//! the test makes: 10.77.0.1 on a veth interface with an HTTP server, dnsmasq and iperf3, and
//! a second HTTP server on its 127.0.0.1 for `host_loopback`. Nothing leaves that namespace.

use std::path::Path;
use std::time::Duration;

use vunet_tests::guest::{await_listening, serial, unprivileged, Guest, Socket, VunetProcess};
use vunet_tests::netns::{Background, Netns};
use vunet_tests::TempDir;

const NOBODY: u32 = 65534;
const RUN: Duration = Duration::from_secs(420);

struct Host {
    ns: Netns,
    servers: Vec<Background>,
}

/// The host namespace; `pings`: whether `net.ipv4.ping_group_range` (per namespace) lets
/// every group open ping sockets, or none.
fn host(tag: &str, dir: &Path, pings: bool) -> Host {
    let ns = Netns::new(tag);
    ns.run(if pings { "sysctl -qw net.ipv4.ping_group_range='0 2147483647'" } else { "sysctl -qw net.ipv4.ping_group_range='1 0'" });
    // A veth pair with both ends here (no dummy module on every host): the address is one of
    // "the host's" own, not loopback.
    ns.run("ip link add h0 type veth peer name h1 && ip addr add 10.77.0.1/24 dev h0 && ip link set h0 up && ip link set h1 up");
    for (sub, text) in [("www", "HELLO-FROM-THE-HOST"), ("lo-www", "HELLO-FROM-LOOPBACK")] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::write(dir.join(sub).join("hello.txt"), format!("{text}\n")).unwrap();
    }
    let servers = vec![
        ns.spawn(&format!("busybox httpd -f -p 10.77.0.1:8080 -h {}", dir.join("www").display())),
        ns.spawn(&format!("busybox httpd -f -p 127.0.0.1:8081 -h {}", dir.join("lo-www").display())),
        ns.spawn(&format!(
            "dnsmasq --no-daemon --conf-file=/dev/null --user=root --no-resolv --no-hosts --listen-address=10.77.0.1 \
             --bind-interfaces --host-record=far.test,10.77.0.9 --pid-file={}/dnsmasq.pid",
            dir.display()
        )),
        ns.spawn("iperf3 -s -B 10.77.0.1"),
        // Holds one guest connection open, for the listing.
        ns.spawn("busybox nc -l -p 9000 -e sleep 1000"),
        // Prints what one guest connection sends (its stdin held open).
        ns.spawn("sleep 1000 | busybox nc -l -p 9001"),
    ];
    Host { ns, servers }
}

/// `vunet run` as nobody inside the host namespace (the binary copied where nobody reads it).
fn vunet_as_nobody(h: &Host, dir: &Path, network: &str) -> VunetProcess {
    vunet_as_nobody_with(h, dir, network, None)
}

/// As `vunet_as_nobody`, with its open-file limit set to `nofile` (prlimit, before vunet runs).
fn vunet_as_nobody_with(h: &Host, dir: &Path, network: &str, nofile: Option<usize>) -> VunetProcess {
    let bin = dir.join("vunet");
    std::fs::copy(vunet_tests::guest::vunet_binary(), &bin).unwrap();
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{network}")).unwrap();
    chmod(dir, 0o777);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &h.ns.name]);
    if let Some(n) = nofile {
        cmd.args(["prlimit", &format!("--nofile={n}:{n}"), "--"]);
    }
    let inner = unprivileged(NOBODY, bin.to_str().unwrap());
    cmd.arg(inner.get_program()).args(inner.get_args());
    VunetProcess::start_with(cmd, &["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// The effective uid and capabilities of a process, from /proc.
fn uid_and_caps(pid: u32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].trim().to_string()).unwrap_or_default();
    (field("Uid:"), field("CapEff:"))
}

const UDHCPC: &str = "cat > /tmp/hook.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface; \
     for r in $router; do ip route add default via $r; done; echo \"LEASED $ip\" ;; esac\nEOF\n\
     chmod +x /tmp/hook.sh\nudhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 || exit 3\n";

/// A shell function in the guest: `get ADDR PORT` prints /hello.txt from an HTTP server
/// (busybox's static wget crashes in this guest; nc does the same with a plain request).
const GET: &str = "get() { printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 10 $1 $2; }\n";

/// The control socket's answer to `cmd` (`net-list`, `port-list NET`) as JSON.
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
     [network.dhcp]\nrange = [\"192.168.122.100\", \"192.168.122.200\"]\n\
     hosts = [{ mac = \"52:54:00:0a:00:01\", ip = \"192.168.122.10\" }]\n\
     [network.dns]\nforwarders = [\"10.77.0.1\"]\n\
     [network.nat]\nhost_loopback = true\n\
     [[network.port_forward]]\nproto = \"tcp\"\nport = 2222\nto = \"192.168.122.10:22\"\n\
     [[network.port_forward]]\nproto = \"tcp\"\nport = 2223\nlisten = \"127.0.0.1\"\nto = \"192.168.122.10:22\"\n\
     [[network.port_forward]]\nproto = \"tcp\"\nport = 5202\nto = \"192.168.122.10:5201\"\n\
     [[network.port_forward]]\nproto = \"udp\"\nport = 5202\nto = \"192.168.122.10:5201\"\n\
     [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n";

#[test]
fn guests_of_an_unprivileged_vunet_reach_the_host_through_its_sockets() {
    let _turn = serial();
    let dir = TempDir::new("socket-nat");
    let h = host("snat", dir.path(), true);
    let v = vunet_as_nobody(&h, dir.path(), NETWORK);
    let (uid, caps) = uid_and_caps(v.child.id());
    assert!(uid.starts_with("65534"), "vunet runs as nobody: Uid {uid}");
    assert_eq!(caps, "0000000000000000", "vunet has no capabilities");
    let script = format!(
        "{UDHCPC}{GET}\
         get 10.77.0.1 8080 || exit 4\n\
         get 192.168.122.1 8081 || exit 5\n\
         nslookup -type=a far.test 192.168.122.1 || exit 6\n\
         nslookup -type=a far.test 10.77.0.1 | sed 's/^/DIRECT /' || exit 7\n\
         t0=$(date +%s); nc -w 10 10.77.0.1 9 </dev/null; echo \"REFUSED rc=$? in $(( $(date +%s) - t0 ))s\"\n\
         ping -c 3 -W 5 10.77.0.1 || exit 11\n\
         iperf3 -c 10.77.0.1 -t 3 -f m || exit 8\necho GUEST-TO-HOST-DONE\n\
         iperf3 -c 10.77.0.1 -t 3 -f m -R || exit 9\necho HOST-TO-GUEST-DONE\n\
         i=0; while [ $i -lt 1000 ]; do get 10.77.0.1 8080 | grep -q HELLO-FROM-THE-HOST || {{ echo \"CONNECTION $i FAILED\"; exit 10; }}; i=$((i+1)); done\n\
         echo \"CONNECTIONS $i\"\n\
         sleep 1000 | nc 10.77.0.1 9000 &\n\
         nc -ll -p 22 -e echo hello-through-the-forward &\niperf3 -s -D\n{}{}\
         echo GUEST-READY\nsleep 1000\n",
        await_listening("tcp", 22, 12),
        await_listening("tcp", 5201, 12)
    );
    let g = Guest::boot_as(NOBODY, "g1", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:0a:00:01", "", &script);
    let ready = g.console.wait_until(|t| t.contains("GUEST-READY") || t.contains("VUNET-TEST-EXIT"), RUN);
    let out = g.console.text();
    let log = || std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    assert!(ready && out.contains("GUEST-READY"), "guest:\n{out}\nvunet:\n{}", log());
    assert!(out.contains("LEASED 192.168.122.10"), "a DHCP lease:\n{out}");
    assert!(out.contains("HELLO-FROM-THE-HOST"), "a page from a server on the host's address:\n{out}");
    assert!(out.contains("HELLO-FROM-LOOPBACK"), "host_loopback: the gateway's address is the host's 127.0.0.1:\n{out}");
    assert!(out.contains("Address: 10.77.0.9"), "a name the host's resolver answers, through the gateway's DNS:\n{out}");
    assert!(out.contains("DIRECT Address: 10.77.0.9"), "a UDP query to the host's resolver itself and its answer back:\n{out}");
    assert!(out.contains("REFUSED rc=1 in 0s") || out.contains("REFUSED rc=1 in 1s"), "a closed port is refused at once:\n{out}");
    assert!(out.contains("3 packets transmitted, 3 packets received"), "ping through a ping socket:\n{out}");
    assert!(out.contains("GUEST-TO-HOST-DONE") && out.contains("HOST-TO-GUEST-DONE"), "iperf3 both ways:\n{out}");
    assert!(out.contains("CONNECTIONS 1000"), "1,000 short connections in a row:\n{out}");

    // In through the forwards: on all host addresses, on 127.0.0.1 only, TCP and UDP.
    for (addr, port) in [("10.77.0.1", 2222), ("127.0.0.1", 2222), ("127.0.0.1", 2223)] {
        let got = h.ns.run(&format!("busybox nc -w 5 {addr} {port} </dev/null || true"));
        assert!(got.contains("hello-through-the-forward"), "a host client reaches the guest through {addr}:{port}: {got:?}\n{}", log());
    }
    let refused = h.ns.try_run("busybox nc -w 5 10.77.0.1 2223 </dev/null");
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("hello"), "2223 listens on 127.0.0.1 only");
    let udp = h.ns.run("iperf3 -c 127.0.0.1 -p 5202 -u -l 1400 -b 10M -t 1 -f m");
    assert!(udp.contains("receiver"), "iperf3 over UDP through the forwards (TCP control, UDP data and its answers):\n{udp}");
    assert!(!udp.contains(" 0.00 Bytes"), "UDP datagrams reached the guest:\n{udp}");

    // The listings: the open connection to port 9000, and the counters.
    let ports = control(dir.path(), &["port-list", "default"]);
    let flows = &ports[0]["nat_flows"];
    assert!(
        flows["flows"].as_array().unwrap().iter().any(|f| f["remote"] == "10.77.0.1:9000" && f["proto"] == "tcp"),
        "port-list shows the guest's open connection: {flows}"
    );
    let nets = control(dir.path(), &["net-list"]);
    let sn = &nets[0]["socket_nat"];
    assert!(sn["tcp_flows"].as_u64().unwrap() >= 1 && sn["refused"].as_u64().unwrap() >= 1, "net-list counts flows and the refusal: {sn}");
    assert!(sn["forward_accepted"].as_u64().unwrap() >= 3, "net-list counts forwarded connections: {sn}");
}

#[test]
fn pings_are_dropped_and_counted_when_ping_sockets_are_not_allowed() {
    let _turn = serial();
    let dir = TempDir::new("socket-nat-noping");
    let h = host("snatp", dir.path(), false);
    let _v = vunet_as_nobody(&h, dir.path(), NETWORK);
    let script = format!("{UDHCPC}ping -c 2 -W 2 10.77.0.1; {GET}get 10.77.0.1 8080 || exit 4\necho GUEST-READY\nsleep 1000\n");
    let g = Guest::boot_as(NOBODY, "g1", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:0a:00:01", "", &script);
    let log = || std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    assert!(g.console.wait_for("GUEST-READY", RUN), "guest:\n{}\nvunet:\n{}", g.console.text(), log());
    assert!(g.console.text().contains("0 packets received"), "no echo replies:\n{}", g.console.text());
    let nets = control(dir.path(), &["net-list"]);
    assert_eq!(nets[0]["socket_nat"]["drops"]["icmp_not_permitted"], 2, "both echo requests counted: {}", nets[0]);
    assert_eq!(log().matches("ping_group_range does not include").count(), 1, "said once in the log:\n{}", log());
}

#[test]
fn a_vunet_out_of_file_descriptors_refuses_new_connections_and_keeps_the_old_ones() {
    let _turn = serial();
    let dir = TempDir::new("socket-nat-fds");
    let h = host("snatf", dir.path(), true);
    // Room for the guest's connection (its socket, memory regions, kick and call eventfds) and
    // a handful of flows, no more: what vunet opens at start (measured on a first run), plus 30.
    let fds = {
        let v = vunet_as_nobody(&h, dir.path(), NETWORK);
        std::fs::read_dir(format!("/proc/{}/fd", v.child.id())).unwrap().count()
    };
    let _v = vunet_as_nobody_with(&h, dir.path(), NETWORK, Some(fds + 30));
    // The long-lived connection opens first and speaks last, after the exhaustion.
    let script = format!(
        "{UDHCPC}(sleep 8; echo still-alive; sleep 60) | nc 10.77.0.1 9001 &\nsleep 1\n\
         for i in $(seq 60); do sleep 100 | nc 10.77.0.1 8080 > /tmp/c$i 2>&1 & done\nsleep 4\n\
         echo \"REFUSED $(grep -l refused /tmp/c* | wc -l)\"\necho GUEST-READY\nsleep 1000\n"
    );
    let g = Guest::boot_as(NOBODY, "g1", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:0a:00:01", "", &script);
    let log = || std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    assert!(g.console.wait_for("GUEST-READY", RUN), "guest:\n{}\nvunet:\n{}", g.console.text(), log());
    let out = g.console.text();
    let refused: usize = out.lines().find_map(|l| l.strip_prefix("REFUSED ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(refused > 0 && refused < 60, "some new connections refused at once, not all: {refused}\n{out}");
    let nets = control(dir.path(), &["net-list"]);
    assert!(nets[0]["socket_nat"]["drops"]["no_socket"].as_u64().unwrap_or(0) >= refused as u64, "counted: {}", nets[0]);
    assert_eq!(log().matches("cannot open a host socket").count(), 1, "said once:\n{}", log());
    // The connection from before still carries data.
    let printer = &h.servers[h.servers.len() - 1].console;
    assert!(
        printer.wait_for("still-alive", Duration::from_secs(60)),
        "the connection opened before the exhaustion still works: {:?}\nvunet:\n{}",
        printer.text(),
        log()
    );
}
