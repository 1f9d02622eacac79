//! Real guests (QEMU, TCG) behind vunet's router: `nat` (libvirt's default network) and
//! `route` (libvirt's routed network, Xen's network-route with proxy ARP). The LAN is a
//! namespace joined to vunet's namespace by a veth pair, with real servers in it: busybox
//! httpd with a CGI that prints the client address it sees, dnsmasq answering DNS, iperf3.

use std::path::Path;
use std::time::{Duration, Instant};

use vunet_tests::guest::{await_listening, serial, Guest, Socket};
use vunet_tests::netns::{veth, wait_until, Background, Netns};
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(240);

/// The LAN: `lan0` at 10.9.0.1/24 with an HTTP server on 8080 whose `/cgi-bin/whoami` prints
/// `SEEN <client address>`, dnsmasq answering `lanhost.test` (and serving DHCP on
/// 10.9.0.100–150), an iperf3 server; `up0` on vunet's side.
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
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    let cgi = www.join("cgi-bin/whoami");
    std::fs::write(&cgi, "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"SEEN $REMOTE_ADDR\"\n").unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&cgi).status().unwrap();
    let httpd = lan.spawn(&format!("busybox httpd -f -p 8080 -h {}", www.display()));
    let dnsmasq = lan.spawn(&format!(
        "dnsmasq --no-daemon --conf-file=/dev/null --user=root --no-resolv --no-hosts --interface=lan0 --bind-interfaces \
         --host-record=lanhost.test,10.9.0.77 --dhcp-range=10.9.0.100,10.9.0.150,255.255.255.0,1h \
         --dhcp-leasefile={0}/dnsmasq.leases --pid-file={0}/dnsmasq.pid",
        dir.display()
    ));
    let iperf = lan.spawn("iperf3 -s");
    Lan { host, lan, _servers: vec![httpd, dnsmasq, iperf] }
}

/// The guest's DHCP client (from vunet's gateway), with the default route it is given.
const UDHCPC: &str = "cat > /tmp/hook.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface; \
     for r in $router; do ip route add default via $r; done; echo \"LEASED $ip\" ;; esac\nEOF\n\
     chmod +x /tmp/hook.sh\nudhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 || exit 3\n";

fn vunet(lan: &Lan, dir: &Path, network: &str) -> vunet_tests::guest::VunetProcess {
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("state_dir = \"state\"\ncontrol_socket = \"control.sock\"\n{network}")).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    lan.host.vunet(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

/// A LAN client's TCP connection: what it read, and how long it took.
fn lan_connect(lan: &Lan, to: &str, port: u16) -> (String, Duration) {
    let t = Instant::now();
    let out = lan.lan.try_run(&format!("busybox nc -w 4 {to} {port} </dev/null 2>&1"));
    (String::from_utf8_lossy(&out.stdout).into_owned(), t.elapsed())
}

#[test]
fn nat_guests_reach_the_lan_behind_the_uplink_address_and_only_port_forwards_come_in() {
    let _turn = serial();
    let dir = TempDir::new("nat-guests");
    let lan = lan("nat", dir.path());
    let _v = vunet(
        &lan,
        dir.path(),
        "[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n\
         [network.dhcp]\nrange = [\"192.168.122.100\", \"192.168.122.200\"]\n\
         hosts = [{ mac = \"52:54:00:09:00:01\", ip = \"192.168.122.10\" }, { mac = \"52:54:00:09:00:02\", ip = \"192.168.122.11\" }]\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\naddress = \"10.9.0.50/24\"\nrouter = \"10.9.0.1\"\n\
         [[network.port_forward]]\nproto = \"tcp\"\nport = 2222\nto = \"192.168.122.10:22\"\n\
         [[network.port_forward]]\nproto = \"tcp\"\nport = 5201\nto = \"192.168.122.10:5201\"\n\
         [[network.port_forward]]\nproto = \"udp\"\nport = 5201\nto = \"192.168.122.10:5201\"\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n[[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n",
    );
    // Both guests fetch the page at the same time (a barrier on the LAN side: the CGI of the
    // second request is what releases both), then vm1 serves the forwarded ports.
    let client = |extra: &str| {
        format!(
            "{UDHCPC}ping -c 3 -W 5 10.9.0.1 || exit 4\nping -c 1 -W 5 10.9.0.50 || exit 5\n\
             printf 'GET /cgi-bin/whoami HTTP/1.0\\r\\n\\r\\n' | nc -w 20 10.9.0.1 8080 || exit 6\n\
             nslookup -type=a lanhost.test 10.9.0.1 || exit 7\n{extra}echo GUEST-DONE\nsleep 600\n"
        )
    };
    let g1 = Guest::boot(
        "g1",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:09:00:01",
        "",
        // GUEST-DONE once its servers listen (the LAN's one iperf3 run through the forward is
        // not retried).
        &client(&format!(
            "iperf3 -c 10.9.0.1 -t 3 -f m || exit 8\niperf3 -s -D\nnc -ll -p 22 -e echo hello-through-the-forward &\n{}{}",
            await_listening("tcp", 5201, 9),
            await_listening("tcp", 22, 9)
        )),
    );
    let g2 = Guest::boot("g2", dir.path(), &Socket::Connect(dir.path().join("vm2.sock")), "52:54:00:09:00:02", "", &client(""));
    for g in [&g1, &g2] {
        assert!(
            g.console.wait_for("GUEST-DONE", BOOT_AND_RUN) || g.console.text().contains("VUNET-TEST-EXIT"),
            "guest:\n{}\nvunet:\n{}",
            g.console.text(),
            std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default()
        );
        let out = g.console.text();
        assert!(out.contains("GUEST-DONE"), "guest:\n{out}");
        assert!(
            out.contains("SEEN [::ffff:10.9.0.50]") || out.contains("SEEN 10.9.0.50\n"),
            "the LAN server sees the uplink address:\n{out}"
        );
        assert!(out.contains("10.9.0.77"), "dnsmasq on the LAN answered the guest's UDP query:\n{out}");
    }
    assert!(g1.console.text().contains("receiver"), "a TCP stream (TSO frames) runs through NAT:\n{}", g1.console.text());

    // In through the TCP forward.
    let mut got = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            got = lan_connect(&lan, "10.9.0.50", 2222).0;
            got.contains("hello-through-the-forward")
        }),
        "a LAN client reaches vm1 through the port forward: {got:?}"
    );
    // UDP through the forward: iperf3's control connection (TCP 5201) and its UDP stream.
    let udp = lan.lan.try_run("iperf3 -c 10.9.0.50 -u -b 2M -t 2 -f m 2>&1");
    let text = String::from_utf8_lossy(&udp.stdout);
    assert!(udp.status.success() && text.contains("receiver"), "iperf3 UDP through the forward:\n{text}");
    // Nothing else comes in: another port of the uplink address, or a guest's own address
    // even with a route to it.
    let (out, took) = lan_connect(&lan, "10.9.0.50", 2223);
    assert!(!out.contains("hello") && took >= Duration::from_secs(3), "an unforwarded port is silent ({took:?}): {out:?}");
    lan.lan.run("ip route add 192.168.122.0/24 via 10.9.0.50");
    let (out, took) = lan_connect(&lan, "192.168.122.10", 22);
    assert!(!out.contains("hello") && took >= Duration::from_secs(3), "no way to a guest's own address ({took:?}): {out:?}");

    let ports = std::process::Command::new(vunet_tests::guest::vunet_binary())
        .args(["port-list", "default", "--config"])
        .arg(dir.path().join("vunet.toml"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ports.stdout);
    assert!(listing.contains("nat_no_connection"), "the refused inbound packets are counted on the uplink:\n{listing}");
}

/// The guest part of the routed tests: lease, reach the LAN, fetch the page (the server sees
/// the guest's own address), then serve TCP 7000 ("hello-routed"), 22 and 23.
fn routed_guest_script(lan_addr: &str) -> String {
    format!(
        "{UDHCPC}ip addr add 172.20.0.1/32 dev lo\nping -c 3 -W 5 {lan_addr} || exit 4\n\
         printf 'GET /cgi-bin/whoami HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {lan_addr} 8080 || exit 6\n\
         nc -ll -p 7000 -e echo hello-routed &\nnc -ll -p 22 -e echo ssh-answered &\nnc -ll -p 23 -e echo telnet-answered &\n\
         {}{}{}echo GUEST-DONE\nsleep 600\n",
        await_listening("tcp", 7000, 9),
        await_listening("tcp", 22, 9),
        await_listening("tcp", 23, 9)
    )
}

fn guest_done(g: &Guest, dir: &Path) -> String {
    assert!(
        g.console.wait_for("GUEST-DONE", BOOT_AND_RUN),
        "guest:\n{}\nvunet:\n{}",
        g.console.text(),
        std::fs::read_to_string(dir.join("vunet.log")).unwrap_or_default()
    );
    g.console.text()
}

/// The seed's routed walkthrough with its ufw part: the LAN routes the guest subnet to the
/// uplink address; the guest keeps its address both ways; "reject" refuses at once, "deny"
/// times out.
#[test]
fn routed_guest_keeps_its_address_and_the_firewall_rejects_and_denies() {
    let _turn = serial();
    let dir = TempDir::new("route-guests");
    let lan = lan("rte", dir.path());
    let _v = vunet(
        &lan,
        dir.path(),
        "[[network]]\nname = \"routed\"\nmode = \"route\"\ngateway = \"192.168.100.1/24\"\n\
         [network.dhcp]\nrange = [\"192.168.100.100\", \"192.168.100.200\"]\nhosts = [{ mac = \"52:54:00:09:00:01\", ip = \"192.168.100.10\" }]\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\naddress = \"10.9.0.50/24\"\nrouter = \"10.9.0.1\"\n\
         [[network.firewall]]\naction = \"reject\"\nproto = \"tcp\"\nport = 22\n\
         [[network.firewall]]\naction = \"deny\"\nproto = \"tcp\"\nport = 23\n\
         [[network.route]]\naddress = \"172.20.0.0/16\"\nvia = \"192.168.100.10\"\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    );
    lan.lan.run("ip route add 192.168.100.0/24 via 10.9.0.50");
    let g = Guest::boot(
        "g1",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:09:00:01",
        "",
        &routed_guest_script("10.9.0.1"),
    );
    let out = guest_done(&g, dir.path());
    assert!(
        out.contains("SEEN [::ffff:192.168.100.10]") || out.contains("SEEN 192.168.100.10\n"),
        "the LAN sees the guest's own address:\n{out}"
    );
    let mut got = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            got = lan_connect(&lan, "192.168.100.10", 7000).0;
            got.contains("hello-routed")
        }),
        "the LAN reaches the guest at its own address: {got:?}"
    );
    let (out, took) = lan_connect(&lan, "192.168.100.10", 22);
    assert!(out.contains("refused") && took < Duration::from_secs(3), "reject: connection refused at once ({took:?}): {out:?}");
    let (out, took) = lan_connect(&lan, "192.168.100.10", 23);
    assert!(
        !out.contains("answered") && !out.contains("refused") && took >= Duration::from_secs(3),
        "deny: a time-out ({took:?}): {out:?}"
    );
    lan.lan.run("busybox ping -c 2 -W 5 192.168.100.10");
    // A network behind the guest (libvirt <route>): the guest holds 172.20.0.1.
    lan.lan.run("ip route add 172.20.0.0/16 via 10.9.0.50");
    let ping = lan.lan.try_run("busybox ping -c 2 -W 5 172.20.0.1");
    assert!(ping.status.success(), "the LAN reaches the network behind the guest: {}", String::from_utf8_lossy(&ping.stdout));
}

/// Xen's network-route with proxy ARP: the guest takes an address of the LAN's own subnet and
/// the LAN reaches it with no route at all.
#[test]
fn proxy_arp_lets_the_lan_reach_a_guest_on_its_own_subnet_without_a_route() {
    let _turn = serial();
    let dir = TempDir::new("route-parp");
    let lan = lan("parp", dir.path());
    let _v = vunet(
        &lan,
        dir.path(),
        "[[network]]\nname = \"xen\"\nmode = \"route\"\ngateway = \"10.9.0.129/25\"\n\
         [network.dhcp]\nrange = [\"10.9.0.200\", \"10.9.0.210\"]\nhosts = [{ mac = \"52:54:00:09:00:01\", ip = \"10.9.0.140\" }]\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\naddress = \"10.9.0.50/24\"\nproxy_arp = true\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    );
    let g = Guest::boot(
        "g1",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:09:00:01",
        "",
        &routed_guest_script("10.9.0.1"),
    );
    let out = guest_done(&g, dir.path());
    assert!(out.contains("SEEN [::ffff:10.9.0.140]") || out.contains("SEEN 10.9.0.140\n"), "{out}");
    assert!(lan.lan.run("ip route").lines().all(|l| !l.contains("via")), "the LAN has no route to the guest");
    let mut got = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            got = lan_connect(&lan, "10.9.0.140", 7000).0;
            got.contains("hello-routed")
        }),
        "the LAN reaches the guest through proxy ARP: {got:?}"
    );
    let neigh = lan.lan.run("ip neigh show 10.9.0.140");
    let up_mac = lan.host.run("cat /sys/class/net/up0/address");
    assert!(!neigh.contains(up_mac.trim()), "the answer is the router's own MAC, not the host's: {neigh}");
}

/// `address = "dhcp"`: the router leases its uplink address from the LAN's dnsmasq, and the
/// LAN reaches it there (ARP and ping on the leased address).
#[test]
fn the_uplink_address_comes_from_the_lans_dhcp_server() {
    let _turn = serial();
    let dir = TempDir::new("nat-dhcp");
    let lan = lan("ndhc", dir.path());
    let v = vunet(
        &lan,
        dir.path(),
        "[[network]]\nname = \"default\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\naddress = \"dhcp\"\nmac = \"52:54:00:0a:0b:0c\"\n",
    );
    let leases = dir.path().join("dnsmasq.leases");
    let mut leased = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            leased = std::fs::read_to_string(&leases).unwrap_or_default();
            leased.contains("52:54:00:0a:0b:0c")
        }),
        "dnsmasq leased to the router's MAC: {leased:?}\nvunet:\n{}",
        std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default()
    );
    let ip = leased.split_whitespace().nth(2).expect("lease address").to_string();
    assert!(ip.starts_with("10.9.0.1"), "{ip}");
    assert!(
        wait_until(Duration::from_secs(10), || lan.lan.try_run(&format!("busybox ping -c 1 -W 2 {ip}")).status.success()),
        "the leased address answers ping"
    );
    // Logged when the lease came (the log file is written behind the console: wait on that).
    assert!(v.console.wait_for(&format!("uplink address {ip}/24 leased from 10.9.0.1"), Duration::from_secs(10)), "{}", v.console.text());
}
