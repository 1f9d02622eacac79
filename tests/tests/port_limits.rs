//! Issue 15's port isolation, rate limits and address-less networks with real guests (QEMU,
//! TCG): libvirt's `<port isolated='yes'/>` and `<bandwidth>`, and a network without `<ip>`.

use std::time::Duration;

use vunet_tests::guest::*;
use vunet_tests::TempDir;

const RUN: Duration = Duration::from_secs(300);

fn start(dir: &std::path::Path, network: &str) -> VunetProcess {
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{network}")).unwrap();
    VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

/// The receiver's Mbit/s on the summary line of plain `iperf3 -f m` output.
fn receiver_mbits(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("receiver") && l.contains("Mbits/sec"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

const DHCP: &str = "cat > /tmp/h.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr add $ip/$mask dev $interface; echo \"LEASED $ip\" ;; esac\nEOF\n\
     chmod +x /tmp/h.sh\nudhcpc -i eth0 -n -q -t 10 -T 2 -s /tmp/h.sh || exit 3\n";

#[test]
fn isolated_ports_reach_only_the_gateway_and_open_ports_and_a_limited_port_gets_its_rate() {
    let _turn = serial();
    let dir = TempDir::new("port-limits");
    let _v = start(
        dir.path(),
        "[[network]]\nname = \"lim\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n\
         [network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.200\"]\n\
         hosts = [{ mac = \"52:54:00:0f:00:01\", ip = \"10.0.0.11\" }, { mac = \"52:54:00:0f:00:02\", ip = \"10.0.0.12\" }, { mac = \"52:54:00:0f:00:03\", ip = \"10.0.0.13\" }, { mac = \"52:54:00:0f:00:04\", ip = \"10.0.0.14\" }]\n\
         [[network.port]]\nname = \"a\"\nsocket = \"a.sock\"\nisolated = true\n\
         [[network.port]]\nname = \"b\"\nsocket = \"b.sock\"\nisolated = true\n\
         [[network.port]]\nname = \"c\"\nsocket = \"c.sock\"\n\
         [network.port.bandwidth]\ninbound = { average = 12500 }\noutbound = { average = 12500 }\n\
         [[network.port]]\nname = \"d\"\nsocket = \"d.sock\"\n",
    );
    // a and b are isolated from each other; both reach the gateway and c. c (100 Mbit/s each
    // way) runs iperf3 against a, which serves.
    let isolated = |other: &str, extra: &str| {
        format!(
            "{DHCP}iperf3 -s -D\niperf3 -s -D -p 5202\n{}{}ping -c 2 -W 5 10.0.0.1 || exit 4\nping -c 2 -W 5 10.0.0.13 || exit 5\n\
             if ping -c 3 -W 2 {other}; then echo ISOLATION-BROKEN; else echo ISOLATED-OK; fi\n{extra}echo GUEST-DONE\nsleep 1000\n",
            await_listening("tcp", 5201, 6),
            await_peer("10.0.0.13", 7)
        )
    };
    let a = Guest::boot("a", dir.path(), &Socket::Connect(dir.path().join("a.sock")), "52:54:00:0f:00:01", "", &isolated("10.0.0.12", ""));
    let b = Guest::boot("b", dir.path(), &Socket::Connect(dir.path().join("b.sock")), "52:54:00:0f:00:02", "", &isolated("10.0.0.11", ""));
    let c = Guest::boot(
        "c",
        dir.path(),
        &Socket::Connect(dir.path().join("c.sock")),
        "52:54:00:0f:00:03",
        "",
        &format!(
            "{DHCP}{}{}echo OUT-START\niperf3 -c 10.0.0.11 -t 6 -O 1 -f m || exit 8\necho OUT-END\n\
             echo IN-START\niperf3 -c 10.0.0.11 -t 6 -O 1 -f m -R || exit 9\necho IN-END\n",
            await_peer("10.0.0.11", 6),
            // iperf3 answers on a once its server listens (its port, from the guest's side).
            "i=0; until nc -w 2 10.0.0.11 5201 </dev/null; do i=$((i+1)); [ $i -gt 100 ] && exit 7; sleep 0.5; done\n"
        ),
    );
    // d, on the same network without limits, is not held to c's.
    let d = Guest::boot(
        "d",
        dir.path(),
        &Socket::Connect(dir.path().join("d.sock")),
        "52:54:00:0f:00:04",
        "",
        &format!(
            "{DHCP}{}i=0; until nc -w 2 10.0.0.11 5202 </dev/null; do i=$((i+1)); [ $i -gt 100 ] && exit 7; sleep 0.5; done\n\
             iperf3 -c 10.0.0.11 -p 5202 -t 4 -f m || exit 8\n",
            await_peer("10.0.0.11", 6)
        ),
    );
    assert_eq!(
        c.wait_exit(RUN),
        Some(0),
        "c:\n{}\nvunet:\n{}",
        c.console.text(),
        std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default()
    );
    for g in [&a, &b] {
        assert!(g.console.wait_for("GUEST-DONE", RUN), "{}:\n{}", g.name, g.console.text());
        assert!(g.console.text().contains("ISOLATED-OK"), "{} cannot reach the other isolated guest:\n{}", g.name, g.console.text());
    }
    let out = c.console.text();
    let section = |from: &str, to: &str| out[out.find(from).unwrap()..out.find(to).unwrap()].to_string();
    for (dir_name, text) in [("outbound (c's TX)", section("OUT-START", "OUT-END")), ("inbound (to c)", section("IN-START", "IN-END"))] {
        let mbits = receiver_mbits(&text).unwrap_or_else(|| panic!("{dir_name}: no iperf3 result:\n{text}"));
        eprintln!("{dir_name}: {mbits} Mbit/s through a 100 Mbit/s limit");
        assert!((90.0..=110.0).contains(&mbits), "{dir_name}: {mbits} Mbit/s through a 100 Mbit/s limit (±10 %):\n{text}");
    }
    assert_eq!(d.wait_exit(RUN), Some(0), "d:\n{}", d.console.text());
    let free = receiver_mbits(&d.console.text()).expect("d's iperf3 result");
    eprintln!("unlimited port on the same network: {free} Mbit/s");
    assert!(free > 150.0, "an unlimited guest is not held to another port's limit: {free} Mbit/s");
}

#[test]
fn an_isolated_network_without_an_address_is_a_plain_segment() {
    let _turn = serial();
    let dir = TempDir::new("l2-segment");
    let _v = start(
        dir.path(),
        "[[network]]\nname = \"seg\"\nmode = \"isolated\"\n\
         [[network.port]]\nname = \"a\"\nsocket = \"a.sock\"\n[[network.port]]\nname = \"b\"\nsocket = \"b.sock\"\n",
    );
    let script = |me: &str, peer: &str| {
        format!(
            "if udhcpc -i eth0 -n -q -t 2 -T 1 -s /bin/true; then echo GOT-DHCP; else echo NO-DHCP; fi\n\
             ip addr add {me}/24 dev eth0\n{}ping -c 3 -W 5 {peer} || exit 4\n",
            await_peer(peer, 5)
        )
    };
    let a =
        Guest::boot("a", dir.path(), &Socket::Connect(dir.path().join("a.sock")), "52:54:00:0f:01:01", "", &script("10.5.0.1", "10.5.0.2"));
    let b =
        Guest::boot("b", dir.path(), &Socket::Connect(dir.path().join("b.sock")), "52:54:00:0f:01:02", "", &script("10.5.0.2", "10.5.0.1"));
    for g in [&a, &b] {
        assert_eq!(g.wait_exit(RUN), Some(0), "{}:\n{}", g.name, g.console.text());
        let out = g.console.text();
        assert!(out.contains("NO-DHCP") && !out.contains("GOT-DHCP"), "nobody answers DHCP:\n{out}");
        // (The first echo may race the peer's own first ARP; the address answered before.)
        assert!(
            out.contains("3 packets transmitted, 3 packets received") || out.contains("3 packets transmitted, 2 packets received"),
            "the guests reach each other:\n{out}"
        );
    }
}
