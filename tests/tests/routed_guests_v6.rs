//! IPv6 routed off a network with real guests (QEMU, TCG): a `nat` and a `route` network
//! whose uplinks have an IPv6 address (`address6`), side by side in one vunet. Each uplink is
//! an af-packet on a veth into one LAN namespace, which routes each guest prefix to that
//! network's `address6` (IPv6 is routed, not translated, in both modes, as libvirt does). The
//! guests take SLAAC addresses from vunet's router advertisements, ping a LAN host on the
//! uplink's prefix and the router's uplink address, and fetch a page from a LAN server behind
//! the LAN's link-local router (`router6 = "fe80::1"`), whose CGI prints the client address it
//! sees: the guest's own. From the LAN, the route network's guest is reachable (its firewall's
//! reject rule refuses a port at once); the nat network's guest is not (only replies come in).
//! A third network, route mode with `proxy_ndp`, has its prefix on the LAN's link without a
//! route: the router answers the LAN's neighbour solicitations for the guest.

use std::path::Path;
use std::time::{Duration, Instant};

use vunet_switch::gateway::slaac;
use vunet_tests::guest::{await_listening, serial, Guest, Socket};
use vunet_tests::netns::{veth, wait_until, Background, Netns};
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(240);
/// The LAN server, on the LAN namespace's loopback: reached through `router6` (fe80::1).
const SERVER: &str = "2001:db8:99::1";

struct Lan {
    host: Netns,
    lan: Netns,
    _servers: Vec<Background>,
}

/// The LAN: `lan0` (2001:db8:77::1/64, the nat network's uplink LAN) and `lan1`
/// (2001:db8:78::1/64, the route network's), both also fe80::1; the server address on lo with
/// busybox httpd on 8080 whose `/cgi-bin/whoami` prints `SEEN <client address>`.
fn lan(dir: &Path) -> Lan {
    let host = Netns::new("r6-h");
    let lan = Netns::new("r6-l");
    veth(&host, "up0", &lan, "lan0");
    veth(&host, "up1", &lan, "lan1");
    veth(&host, "up2", &lan, "lan2");
    lan.run("ip link set lo up");
    for (ifname, prefix) in [("lan0", "77"), ("lan1", "78"), ("lan2", "79")] {
        lan.run(&format!("ip -6 addr add 2001:db8:{prefix}::1/64 dev {ifname} nodad"));
        lan.run(&format!("ip -6 addr add fe80::1/64 dev {ifname} nodad"));
    }
    lan.run(&format!("ip -6 addr add {SERVER}/128 dev lo"));
    // The guest prefixes, routed to each network's address6.
    lan.run("ip -6 route add fd00:7675:a::/64 via 2001:db8:77::50 dev lan0");
    lan.run("ip -6 route add fd00:7675:b::/64 via 2001:db8:78::50 dev lan1");
    // The proxied network's prefix is on lan2's link: no router in the way as the LAN sees it.
    lan.run("ip -6 route add fd00:7675:c::/64 dev lan2");
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    let cgi = www.join("cgi-bin/whoami");
    std::fs::write(&cgi, "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"SEEN $REMOTE_ADDR\"\n").unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&cgi).status().unwrap();
    let httpd = lan.spawn(&format!("busybox httpd -f -p 8080 -h {}", www.display()));
    Lan { host, lan, _servers: vec![httpd] }
}

/// Guest-script lines that wait until eth0 has a usable global address in `prefix`.
fn await_slaac(prefix: &str, code: u8) -> String {
    format!(
        "i=0\nuntil ip -6 addr show dev eth0 scope global | grep -v tentative | grep -q 'inet6 {prefix}'; do \
         i=$((i+1)); [ $i -gt 300 ] && {{ ip -6 addr; exit {code}; }}; sleep 0.2; done\n\
         ip -6 route | sed 's/^/ROUTE6 /'\n"
    )
}

/// The guest: SLAAC, ping6 the LAN host on the uplink prefix and the router's address6, fetch
/// the page from the server behind the LAN router, then serve TCP 7000 and 23.
fn guest_script(prefix: &str, lan_host: &str, address6: &str) -> String {
    format!(
        "{}ping6 -c 3 -W 5 {lan_host} || exit 4\nping6 -c 1 -W 5 {address6} || exit 5\n\
         printf 'GET /cgi-bin/whoami HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {SERVER} 8080 || exit 6\n\
         nc -ll -p 7000 -e echo hello-v6 &\nnc -ll -p 23 -e echo telnet-answered &\n{}{}echo GUEST-DONE\nsleep 600\n",
        await_slaac(prefix, 3),
        await_listening("tcp", 7000, 9),
        await_listening("tcp", 23, 9)
    )
}

fn lan_connect(lan: &Lan, to: &str, port: u16) -> (String, Duration) {
    let t = Instant::now();
    let out = lan.lan.try_run(&format!("busybox nc -w 4 {to} {port} </dev/null 2>&1"));
    (String::from_utf8_lossy(&out.stdout).into_owned(), t.elapsed())
}

fn mac(s: &str) -> [u8; 6] {
    vunet_switch::parse_mac(s).unwrap()
}

fn port_list(dir: &Path, network: &str) -> String {
    let out = std::process::Command::new(vunet_tests::guest::vunet_binary())
        .args(["port-list", network, "--config"])
        .arg(dir.join("vunet.toml"))
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nat_and_route_guests_reach_the_lan_over_routed_ipv6() {
    let _turn = serial();
    let dir = TempDir::new("routed-v6");
    let lan = lan(dir.path());
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        "control_socket = \"control.sock\"\n\
         [[network]]\nname = \"nat6\"\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\ngateway6 = \"fd00:7675:a::1/64\"\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\naddress = \"10.9.0.50/24\"\n\
         address6 = \"2001:db8:77::50/64\"\nrouter6 = \"fe80::1\"\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n\
         [[network]]\nname = \"rte6\"\nmode = \"route\"\ngateway = \"192.168.100.1/24\"\ngateway6 = \"fd00:7675:b::1/64\"\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up1\"\naddress = \"10.9.1.50/24\"\n\
         address6 = \"2001:db8:78::50/64\"\nrouter6 = \"fe80::1\"\n\
         [[network.firewall]]\naction = \"reject\"\nproto = \"tcp\"\nport = 23\n\
         [[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n\
         [[network]]\nname = \"prx6\"\nmode = \"route\"\ngateway = \"192.168.101.1/24\"\ngateway6 = \"fd00:7675:c::1/64\"\n\
         [network.uplink]\nkind = \"af-packet\"\ninterface = \"up2\"\naddress = \"10.9.2.50/24\"\n\
         address6 = \"2001:db8:79::50/64\"\nrouter6 = \"fe80::1\"\nproxy_ndp = true\n\
         [[network.port]]\nname = \"vm3\"\nsocket = \"vm3.sock\"\n",
    )
    .unwrap();
    let _v = lan.host.vunet(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let (m1, m2, m3) = ("52:54:00:0a:00:01", "52:54:00:0b:00:01", "52:54:00:0c:00:01");
    let a1 = slaac("fd00:7675:a::".parse().unwrap(), &mac(m1)).to_string();
    let a2 = slaac("fd00:7675:b::".parse().unwrap(), &mac(m2)).to_string();
    let a3 = slaac("fd00:7675:c::".parse().unwrap(), &mac(m3)).to_string();
    let g1 = Guest::boot(
        "n6",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        m1,
        "",
        &guest_script("fd00:7675:a:", "2001:db8:77::1", "2001:db8:77::50"),
    );
    let g2 = Guest::boot(
        "r6",
        dir.path(),
        &Socket::Connect(dir.path().join("vm2.sock")),
        m2,
        "",
        &guest_script("fd00:7675:b:", "2001:db8:78::1", "2001:db8:78::50"),
    );
    let g3 = Guest::boot(
        "p6",
        dir.path(),
        &Socket::Connect(dir.path().join("vm3.sock")),
        m3,
        "",
        &guest_script("fd00:7675:c:", "2001:db8:79::1", "2001:db8:79::50"),
    );
    for (g, me) in [(&g1, &a1), (&g2, &a2), (&g3, &a3)] {
        assert!(
            g.console.wait_for("GUEST-DONE", BOOT_AND_RUN),
            "guest:\n{}\nvunet:\n{}",
            g.console.text(),
            std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default()
        );
        let out = g.console.text();
        assert!(out.lines().any(|l| l.starts_with("ROUTE6 default via fe80::")), "the RA names a default router:\n{out}");
        assert_eq!(out.matches("packets transmitted").count(), 2, "{out}");
        assert!(
            out.contains("3 packets transmitted, 3 packets received") && out.contains("1 packets transmitted, 1 packets received"),
            "{out}"
        );
        assert!(
            out.contains(&format!("SEEN [{me}]")) || out.contains(&format!("SEEN {me}\n")),
            "the LAN server sees the guest's own address {me}:\n{out}"
        );
    }

    // The LAN reaches the routed guest at its own address; the reject rule refuses at once.
    let mut got = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            got = lan_connect(&lan, &a2, 7000).0;
            got.contains("hello-v6")
        }),
        "the LAN reaches the route network's guest: {got:?}"
    );
    let (out, took) = lan_connect(&lan, &a2, 23);
    assert!(out.contains("refused") && took < Duration::from_secs(3), "reject: refused at once ({took:?}): {out:?}");
    // The nat network's guest takes no connection it did not start.
    let (out, took) = lan_connect(&lan, &a1, 7000);
    assert!(!out.contains("hello") && took >= Duration::from_secs(3), "nat: unsolicited inbound is dropped ({took:?}): {out:?}");
    // ND proxy: the LAN solicits the guest on lan2's link and the router answers for it.
    assert!(
        wait_until(Duration::from_secs(20), || {
            got = lan_connect(&lan, &a3, 7000).0;
            got.contains("hello-v6")
        }),
        "the LAN reaches the proxied guest without a route via the router: {got:?}"
    );
    let neigh = lan.lan.run(&format!("ip -6 neigh show {a3} dev lan2"));
    // The router's MAC on the uplink (the default for a network without `mac`).
    let router_mac = vunet_switch::format_mac(&vunet_switch::gateway::gateway_mac("prx6/uplink"));
    assert!(neigh.contains(&format!("lladdr {router_mac}")), "the answer is the router's MAC {router_mac}: {neigh}");
    // The router's uplink address answers the LAN (neighbour solicitation, echo).
    let ping = lan.lan.try_run("busybox ping -c 1 -W 5 2001:db8:77::50 2>&1");
    assert!(ping.status.success(), "address6 answers ping: {}", String::from_utf8_lossy(&ping.stdout));

    let nat_ports = port_list(dir.path(), "nat6");
    assert!(nat_ports.contains("ipv6: 2001:db8:77::50"), "port-list shows the uplink's IPv6 address:\n{nat_ports}");
    assert!(nat_ports.contains("firewall="), "the refused inbound packets are counted on the uplink:\n{nat_ports}");
    let nets = std::process::Command::new(vunet_tests::guest::vunet_binary())
        .args(["net-list", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let nets = String::from_utf8_lossy(&nets.stdout);
    assert!(nets.contains("uplink address6 2001:db8:78::50/64"), "net-list shows address6:\n{nets}");
}
