//! IPv6 with real guests (QEMU, TCG, Linux 6.1): the gateway's router advertisements give
//! each guest a SLAAC address in `gateway6`'s prefix, its neighbour advertisements and echo
//! replies answer the guests, and guests reach each other over IPv6 (ping, iperf3). On an
//! isolated network the advertisement names no default router; on a nat network it does,
//! through the gateway's link-local address.

use std::path::Path;
use std::time::Duration;

use vunet_switch::gateway::{gateway_mac, link_local, slaac};
use vunet_tests::guest::{await_listening, serial, Guest, Socket, VunetProcess};
use vunet_tests::TempDir;

const RUN: Duration = Duration::from_secs(240);

fn vunet(dir: &Path, network: &str) -> VunetProcess {
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{network}")).unwrap();
    VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

/// Guest-script lines that wait (Linux runs duplicate address detection first, about a
/// second) until eth0 has a usable global address in `prefix`, then print it and the routes.
fn await_slaac(prefix: &str, code: u8) -> String {
    format!(
        "i=0\nuntil ip -6 addr show dev eth0 scope global | grep -v tentative | grep -q 'inet6 {prefix}'; do \
         i=$((i+1)); [ $i -gt 300 ] && {{ ip -6 addr; exit {code}; }}; sleep 0.2; done\n\
         echo \"SLAAC $(ip -6 addr show dev eth0 scope global | grep -o 'inet6 [0-9a-f:]*/[0-9]*')\"\n\
         ip -6 route | sed 's/^/ROUTE6 /'\n"
    )
}

/// Guest-script lines that wait until `ip` answers ping6 (the peer may still be booting).
fn await_peer6(ip: &str, code: u8) -> String {
    format!("i=0\nuntil ping6 -c 1 -W 1 {ip} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 200 ] && exit {code}; sleep 0.5; done\n")
}

fn ping_ok(out: &str, count: u32) -> bool {
    out.contains(&format!("{count} packets transmitted, {count} packets received"))
}

fn mac(s: &str) -> [u8; 6] {
    vunet_switch::parse_mac(s).unwrap()
}

#[test]
fn guests_on_an_isolated_network_get_slaac_addresses_and_talk_over_ipv6() {
    let _turn = serial();
    let dir = TempDir::new("ipv6-iso");
    let _v = vunet(
        dir.path(),
        "[[network]]\nname = \"iso6\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\ngateway6 = \"fd00:7675:1::1/64\"\n\
         [network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.200\"]\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n\
         [[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n",
    );
    let (m1, m2) = ("52:54:00:00:00:01", "52:54:00:00:00:02");
    let prefix = "fd00:7675:1::".parse().unwrap();
    // The guests' addresses are their EUI-64 SLAAC addresses (Linux's default).
    let (a1, a2) = (slaac(prefix, &mac(m1)), slaac(prefix, &mac(m2)));
    let server = Guest::boot(
        "v6a",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        m1,
        "",
        &format!(
            "iperf3 -s -1 >/dev/null &\n{}{}\
             ip -6 route | grep -q '^default' && echo HAS-DEFAULT6 || echo NO-DEFAULT6\n\
             ping6 -c 3 -W 5 fd00:7675:1::1 || exit 4\n{}ping6 -c 3 -W 5 {a2} || exit 5\nwait\n",
            await_listening("tcp", 5201, 8),
            await_slaac("fd00:7675:1:", 3),
            await_peer6(&a2.to_string(), 9),
        ),
    );
    let client = Guest::boot(
        "v6b",
        dir.path(),
        &Socket::Connect(dir.path().join("vm2.sock")),
        m2,
        "",
        &format!(
            "{}ip -6 route | grep -q '^default' && echo HAS-DEFAULT6 || echo NO-DEFAULT6\n\
             ping6 -c 3 -W 5 fd00:7675:1::1 || exit 4\n{}ping6 -c 3 -W 5 {a1} || exit 5\n\
             i=0\nuntil iperf3 -6 -c {a1} -t 5 -J >/tmp/iperf.json; do i=$((i+1)); [ $i -gt 30 ] && exit 10; sleep 1; done\ncat /tmp/iperf.json\n",
            await_slaac("fd00:7675:1:", 3),
            await_peer6(&a1.to_string(), 9),
        ),
    );
    assert_eq!(client.wait_exit(RUN), Some(0), "client:\n{}", client.console.text());
    assert_eq!(server.wait_exit(Duration::from_secs(60)), Some(0), "server:\n{}", server.console.text());
    for (g, me) in [(&server, a1), (&client, a2)] {
        let out = g.console.text();
        assert!(out.contains(&format!("SLAAC inet6 {me}/64")), "a SLAAC address from the advertised /64:\n{out}");
        assert!(out.contains("NO-DEFAULT6"), "an isolated network's RA names no default router:\n{out}");
        assert!(out.contains("PING fd00:7675:1::1 "), "pinged the gateway:\n{out}");
        assert_eq!(out.matches("3 packets transmitted, 3 packets received").count(), 2, "gateway and peer answered:\n{out}");
    }
    let out = client.console.text();
    assert!(!out.contains("\"error\""), "iperf3 reported an error:\n{out}");
    let bps = vunet_tests::guest::iperf3_receiver_bps(&out).expect("iperf3 JSON result");
    eprintln!("iperf3 -6 guest->guest through vunet: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 0.0 && ping_ok(&out, 3));
}

#[test]
fn a_nat_network_advertises_the_gateway_as_default_router() {
    let _turn = serial();
    let dir = TempDir::new("ipv6-nat");
    let _v = vunet(
        dir.path(),
        "[[network]]\nname = \"nat6\"\nmode = \"nat\"\ngateway = \"10.0.1.1/24\"\ngateway6 = \"fd00:7675:2::1/64\"\n\
         [network.dhcp]\nrange = [\"10.0.1.100\", \"10.0.1.200\"]\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    );
    let gw_ll = link_local(&gateway_mac("nat6"));
    let guest = Guest::boot(
        "v6nat",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:00:01:01",
        "",
        &format!(
            "{}\
             ip -6 route | grep -q '^default via fe80::' && echo HAS-DEFAULT6 || exit 5\n\
             ping6 -c 2 -W 5 -I eth0 {gw_ll} || exit 6\n\
             ping6 -c 2 -W 5 fd00:7675:2::1 || exit 7\n",
            await_slaac("fd00:7675:2:", 3)
        ),
    );
    assert_eq!(guest.wait_exit(RUN), Some(0), "guest:\n{}", guest.console.text());
    let out = guest.console.text();
    assert!(out.contains("HAS-DEFAULT6"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("ROUTE6 default via") && l.contains(&format!("via {gw_ll} "))),
        "the default route is through the gateway's link-local address {gw_ll}:\n{out}"
    );
    assert_eq!(out.matches("2 packets transmitted, 2 packets received").count(), 2, "gateway's link-local and global answer:\n{out}");
}
