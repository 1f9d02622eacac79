//! Socket NAT with real guests (QEMU, TCG): a `nat` network without an uplink, vunet and QEMU
//! run as an ordinary user (nobody: no capabilities, no groups). "The host" is a namespace
//! the test makes: 10.77.0.1 on a veth interface with an HTTP server, dnsmasq and iperf3, and
//! a second HTTP server on its 127.0.0.1 for `host_loopback`. Nothing leaves that namespace.

use std::path::Path;
use std::time::Duration;

use vunet_tests::guest::{serial, unprivileged, Guest, Socket, VunetProcess};
use vunet_tests::netns::{Background, Netns};
use vunet_tests::TempDir;

const NOBODY: u32 = 65534;
const RUN: Duration = Duration::from_secs(420);

struct Host {
    ns: Netns,
    _servers: Vec<Background>,
}

fn host(tag: &str, dir: &Path) -> Host {
    let ns = Netns::new(tag);
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
    ];
    Host { ns, _servers: servers }
}

/// `vunet run` as nobody inside the host namespace (the binary copied where nobody reads it).
fn vunet_as_nobody(h: &Host, dir: &Path, network: &str) -> VunetProcess {
    let bin = dir.join("vunet");
    std::fs::copy(vunet_tests::guest::vunet_binary(), &bin).unwrap();
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{network}")).unwrap();
    chmod(dir, 0o777);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &h.ns.name]);
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

#[test]
fn guests_of_an_unprivileged_vunet_reach_the_host_through_its_sockets() {
    let _turn = serial();
    let dir = TempDir::new("socket-nat");
    let h = host("snat", dir.path());
    let v = vunet_as_nobody(
        &h,
        dir.path(),
        "[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n\
         [network.dhcp]\nrange = [\"192.168.122.100\", \"192.168.122.200\"]\n\
         [network.dns]\nforwarders = [\"10.77.0.1\"]\n\
         [network.nat]\nhost_loopback = true\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    );
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
         iperf3 -c 10.77.0.1 -t 3 -f m || exit 8\necho GUEST-TO-HOST-DONE\n\
         iperf3 -c 10.77.0.1 -t 3 -f m -R || exit 9\necho HOST-TO-GUEST-DONE\n\
         i=0; while [ $i -lt 1000 ]; do get 10.77.0.1 8080 | grep -q HELLO-FROM-THE-HOST || {{ echo \"CONNECTION $i FAILED\"; exit 10; }}; i=$((i+1)); done\n\
         echo \"CONNECTIONS $i\"\n"
    );
    let g = Guest::boot_as(NOBODY, "g1", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:0a:00:01", "", &script);
    let status = g.wait_exit(RUN);
    let out = g.console.text();
    let log = std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    assert_eq!(status, Some(0), "guest:\n{out}\nvunet:\n{log}");
    assert!(out.contains("LEASED 192.168.122."), "a DHCP lease:\n{out}");
    assert!(out.contains("HELLO-FROM-THE-HOST"), "a page from a server on the host's address:\n{out}");
    assert!(out.contains("HELLO-FROM-LOOPBACK"), "host_loopback: the gateway's address is the host's 127.0.0.1:\n{out}");
    assert!(out.contains("10.77.0.9"), "a name the host's resolver answers, through the gateway's DNS:\n{out}");
    assert!(out.contains("DIRECT Address: 10.77.0.9"), "a UDP query to the host's resolver itself and its answer back:\n{out}");
    assert!(out.contains("REFUSED rc=1 in 0s") || out.contains("REFUSED rc=1 in 1s"), "a closed port is refused at once:\n{out}");
    assert!(out.contains("GUEST-TO-HOST-DONE") && out.contains("HOST-TO-GUEST-DONE"), "iperf3 both ways:\n{out}");
    assert!(out.contains("CONNECTIONS 1000"), "1,000 short connections in a row:\n{out}");
}
