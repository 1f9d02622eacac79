//! Real guests (QEMU under TCG, Linux virtio-net drivers, busybox and iperf3) on a vunet
//! network started from the `vunet` binary, as a user would run it.

use std::time::Duration;

use vunet_tests::guest::*;
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(120);

fn ping_ok(out: &str, count: u32) -> bool {
    out.contains(&format!("{count} packets transmitted, {count} packets received"))
}

#[test]
fn two_guests_ping_each_other_and_the_gateway_and_run_iperf3() {
    let _turn = serial();
    let dir = TempDir::new("guests-iperf");
    let rt = dir.path().join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let _vunet = VunetProcess::start(&["--runtime-dir", rt.to_str().unwrap()], &dir.path().join("vunet.log"));
    // The default network: 192.168.122.0/24 with vunet's gateway at .1.
    let server = Guest::boot(
        "g1",
        dir.path(),
        &Socket::Connect(rt.join("vm1.sock")),
        "52:54:00:00:00:01",
        "",
        // The iperf3 server listens before the address its client waits for is up; the
        // counted pings start once the client answers (it may boot later).
        &format!(
            "iperf3 -s -1 >/dev/null &\n{}ip addr add 192.168.122.11/24 dev eth0\n{}ping -c 3 -W 5 192.168.122.12\nwait\n",
            await_listening("tcp", 5201, 8),
            await_peer("192.168.122.12", 9)
        ),
    );
    let client = Guest::boot(
        "g2",
        dir.path(),
        &Socket::Connect(rt.join("vm2.sock")),
        "52:54:00:00:00:02",
        "",
        &format!(
            "ip addr add 192.168.122.12/24 dev eth0\n{}ping -c 3 -W 5 192.168.122.1 || exit 1\n{}ping -c 3 -W 5 192.168.122.11 || exit 1\niperf3 -c 192.168.122.11 -t 10 -J\n",
            await_peer("192.168.122.1", 8),
            await_peer("192.168.122.11", 9)
        ),
    );
    assert_eq!(client.wait_exit(BOOT_AND_RUN), Some(0), "client guest:\n{}", client.console.text());
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0), "server guest:\n{}", server.console.text());
    let out = client.console.text();
    assert!(out.contains("PING 192.168.122.1 ") && ping_ok(&out, 3), "client pings the gateway and the server:\n{out}");
    assert_eq!(out.matches("3 packets transmitted, 3 packets received").count(), 2, "both pings answered:\n{out}");
    assert!(ping_ok(&server.console.text(), 3), "server ping:\n{}", server.console.text());
    assert!(!out.contains("\"error\""), "iperf3 reported an error:\n{out}");
    let bps = iperf3_receiver_bps(&out).expect("iperf3 JSON result");
    eprintln!("iperf3 guest->guest through vunet: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 0.0);
}

#[test]
fn guest_without_receive_offloads_gets_segmented_frames() {
    let _turn = serial();
    let dir = TempDir::new("guests-seg");
    let rt = dir.path().join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let _vunet = VunetProcess::start(&["--runtime-dir", rt.to_str().unwrap()], &dir.path().join("vunet.log"));
    // The receiver refuses TSO and partial checksums: the sender's 64 KiB segments must be
    // cut and checksummed by vunet, or TCP would not get through at all.
    let receiver = Guest::boot(
        "plain",
        dir.path(),
        &Socket::Connect(rt.join("vm1.sock")),
        "52:54:00:00:00:01",
        ",guest_tso4=off,guest_tso6=off,guest_csum=off,mrg_rxbuf=off",
        // iperf3 listens before the address its client waits for is up; its exit status is
        // the script's.
        &format!("iperf3 -s -1 >/dev/null &\nsrv=$!\n{}ip addr add 10.0.0.1/24 dev eth0\nwait $srv\n", await_listening("tcp", 5201, 8)),
    );
    let sender = Guest::boot(
        "tso",
        dir.path(),
        &Socket::Connect(rt.join("vm2.sock")),
        "52:54:00:00:00:02",
        "",
        &format!(
            "ip addr add 10.0.0.2/24 dev eth0\n{}ping -c 2 -W 5 10.0.0.1 || exit 1\niperf3 -c 10.0.0.1 -t 5 -J\n",
            await_peer("10.0.0.1", 9)
        ),
    );
    assert_eq!(sender.wait_exit(BOOT_AND_RUN), Some(0), "sender:\n{}", sender.console.text());
    let out = sender.console.text();
    let bps = iperf3_receiver_bps(&out).expect("iperf3 JSON result");
    eprintln!("iperf3 to a guest without receive offloads: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 0.0);
    assert_eq!(receiver.wait_exit(Duration::from_secs(30)), Some(0), "receiver:\n{}", receiver.console.text());
}

#[test]
fn killed_guest_frees_its_port_and_a_new_one_takes_it_while_others_keep_working() {
    let _turn = serial();
    let dir = TempDir::new("guests-restart");
    let rt = dir.path().join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let vunet = VunetProcess::start(&["--runtime-dir", rt.to_str().unwrap()], &dir.path().join("vunet.log"));
    let server = Guest::boot(
        "server",
        dir.path(),
        &Socket::Connect(rt.join("vm1.sock")),
        "52:54:00:00:00:01",
        "",
        &format!(
            "iperf3 -s >/dev/null &\niperf3 -s -p 5202 >/dev/null &\n{}{}ip addr add 10.0.0.1/24 dev eth0\nsleep 600\n",
            await_listening("tcp", 5201, 8),
            await_listening("tcp", 5202, 8)
        ),
    );
    // A bystander on port 3 pings the server the whole time.
    let bystander = Guest::boot(
        "bystander",
        dir.path(),
        &Socket::Connect(rt.join("vm3.sock")),
        "52:54:00:00:00:03",
        "",
        &format!(
            "ip addr add 10.0.0.3/24 dev eth0\n{}echo BYSTANDER-PINGING\nping -c 40 -i 0.5 -W 3 10.0.0.1\n",
            await_peer("10.0.0.1", 9)
        ),
    );
    let mut victim = Guest::boot(
        "victim",
        dir.path(),
        &Socket::Connect(rt.join("vm2.sock")),
        "52:54:00:00:00:02",
        "",
        &format!("ip addr add 10.0.0.2/24 dev eth0\n{}echo STARTING-IPERF\niperf3 -c 10.0.0.1 -t 60\n", await_peer("10.0.0.1", 9)),
    );
    assert!(victim.console.wait_for("STARTING-IPERF", BOOT_AND_RUN), "victim:\n{}", victim.console.text());
    // The bystander's 20 s of counted pings are under way when the victim dies.
    assert!(bystander.console.wait_for("BYSTANDER-PINGING", BOOT_AND_RUN), "bystander:\n{}", bystander.console.text());
    assert!(victim.console.wait_for_lines("bits/sec", 1, Duration::from_secs(30)), "transfer running:\n{}", victim.console.text());
    // SIGKILL mid-transfer.
    victim.kill();
    assert!(vunet.console.wait_for("guest disconnected", Duration::from_secs(10)), "vunet log:\n{}", vunet.console.text());
    // A new QEMU on the same socket, same vunet. (The dead client's iperf3 session still
    // holds the first server, so the newcomer uses the second.)
    let newcomer = Guest::boot(
        "newcomer",
        dir.path(),
        &Socket::Connect(rt.join("vm2.sock")),
        "52:54:00:00:00:22",
        "",
        &format!(
            "ip addr add 10.0.0.2/24 dev eth0\n{}ping -c 3 -W 5 10.0.0.1 || exit 1\niperf3 -c 10.0.0.1 -p 5202 -t 3\n",
            await_peer("10.0.0.1", 9)
        ),
    );
    assert_eq!(newcomer.wait_exit(BOOT_AND_RUN), Some(0), "newcomer:\n{}", newcomer.console.text());
    assert!(ping_ok(&newcomer.console.text(), 3));
    assert_eq!(bystander.wait_exit(BOOT_AND_RUN), Some(0), "bystander:\n{}", bystander.console.text());
    let b = bystander.console.text();
    let received: u32 = b
        .lines()
        .find(|l| l.contains("packets received"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(received >= 36, "the bystander lost pings while the other guest died and came back ({received}/40):\n{b}");
    drop(server);
}

#[test]
fn client_mode_port_with_qemu_as_the_listener() {
    let _turn = serial();
    let dir = TempDir::new("guests-client");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.0.0.254/24\"\n[[network.port]]\nname = \"a\"\nsocket = \"{0}/a.sock\"\n[[network.port]]\nname = \"b\"\nsocket = \"{0}/qemu-b.sock\"\nmode = \"client\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let _vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let a = Guest::boot(
        "a",
        dir.path(),
        &Socket::Connect(dir.path().join("a.sock")),
        "52:54:00:00:00:0a",
        "",
        // Up until the test ends (and kills it), however long guest b takes.
        "ip addr add 10.0.0.1/24 dev eth0\nsleep 600\n",
    );
    let b = Guest::boot(
        "b",
        dir.path(),
        &Socket::Listen(dir.path().join("qemu-b.sock")),
        "52:54:00:00:00:0b",
        "",
        &format!("ip addr add 10.0.0.2/24 dev eth0\n{}ping -c 3 -W 5 10.0.0.1\n", await_peer("10.0.0.1", 9)),
    );
    assert_eq!(b.wait_exit(BOOT_AND_RUN), Some(0), "client-mode guest:\n{}", b.console.text());
    assert!(ping_ok(&b.console.text(), 3));
    drop(a);
}

#[test]
fn vunet_restarts_under_running_guests_on_client_mode_ports_and_guests_keep_their_addresses() {
    let _turn = serial();
    let dir = TempDir::new("guests-restart-vunet");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.0.0.254/24\"\n[[network.port]]\nname = \"a\"\nsocket = \"{0}/qemu-a.sock\"\nmode = \"client\"\n[[network.port]]\nname = \"b\"\nsocket = \"{0}/qemu-b.sock\"\nmode = \"client\"\n[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\nhosts = [{{ mac = \"52:54:00:00:00:0a\", ip = \"10.0.0.1\" }}]\n[network.dns]\nforwarders = []\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let mut first = VunetProcess::start(&args, &dir.path().join("vunet1.log"));
    let a = Guest::boot(
        "a",
        dir.path(),
        &Socket::Listen(dir.path().join("qemu-a.sock")),
        "52:54:00:00:00:0a",
        "",
        // Up until the test ends (and kills it), however long guest b takes.
        &format!("{}sleep 600\n", udhcpc("a")),
    );
    let b = Guest::boot(
        "b",
        dir.path(),
        &Socket::Listen(dir.path().join("qemu-b.sock")),
        "52:54:00:00:00:0b",
        "",
        // Leases by DHCP, waits until guest a answers (it may still be booting), pings through
        // the restart, then asks DHCP again: the same address.
        &format!(
            "{0}i=0\nuntil ping -c 1 -W 1 10.0.0.1 >/dev/null; do i=$((i+1)); [ $i -gt 120 ] && exit 7; done\necho PEER-UP\nping -c 50 -i 0.5 -W 1 10.0.0.1\n{0}",
            udhcpc("b")
        ),
    );
    assert!(b.console.wait_for("PEER-UP", BOOT_AND_RUN), "guest a answers before the restart:\n{}", b.console.text());
    assert!(b.console.wait_for("64 bytes from", Duration::from_secs(10)), "pings flow before the restart:\n{}", b.console.text());
    // vunet dies (SIGKILL, no cleanup) and a new one starts: it reconnects to both QEMUs,
    // which renegotiate with it while their guests keep running.
    let _ = first.child.kill();
    let _ = first.child.wait();
    // Not a wait for anything: vunet stays down a while, as a crashed one would (this counts
    // against the pings the test allows to be lost).
    std::thread::sleep(Duration::from_secs(2));
    let _second = VunetProcess::start(&args, &dir.path().join("vunet2.log"));
    assert_eq!(b.wait_exit(BOOT_AND_RUN), Some(0), "guest b:\n{}", b.console.text());
    let out = b.console.text();
    let last_seqs: Vec<u32> =
        out.lines().filter_map(|l| l.split("seq=").nth(1)).filter_map(|s| s.split_whitespace().next()?.parse().ok()).collect();
    assert!(last_seqs.iter().any(|&s| s >= 40), "pings answered after the restart:\n{out}");
    assert!(last_seqs.len() >= 35, "at most a few seconds of pings lost ({} of 50 answered):\n{out}", last_seqs.len());
    let leased: Vec<&str> = out.split("LEASED ").skip(1).filter_map(|s| s.split_whitespace().next()).collect();
    assert_eq!(leased.len(), 2, "{out}");
    assert_eq!(leased[0], leased[1], "the guest keeps its address across the restart (lease restored from state_dir)");
    drop(a);
}

/// docs/qemu.md's recipe for server-mode ports: QEMU with `reconnect=1` comes back by itself
/// after vunet restarts, and the guest's traffic resumes.
#[test]
fn qemu_with_reconnect_comes_back_after_vunet_restarts_on_a_server_mode_port() {
    let _turn = serial();
    let dir = TempDir::new("guests-reconnect");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.0.0.254/24\"\n[network.dns]\nforwarders = []\n[[network.port]]\nname = \"a\"\nsocket = \"{}/a.sock\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let mut first = VunetProcess::start(&args, &dir.path().join("vunet1.log"));
    let a = Guest::boot(
        "a",
        dir.path(),
        &Socket::Reconnect(dir.path().join("a.sock")),
        "52:54:00:00:00:0a",
        "",
        // Pings until the test ends: the test waits for answers after the restart, however
        // long the restart takes, not for answers within a fixed count of pings.
        "ip addr add 10.0.0.1/24 dev eth0\nping -i 0.5 -W 1 10.0.0.254\n",
    );
    assert!(a.console.wait_for("64 bytes from", BOOT_AND_RUN), "pings flow before the restart:\n{}", a.console.text());
    let _ = first.child.kill();
    let _ = first.child.wait();
    // The last ping answered by the first vunet (it is dead now). Answers to pings sent five
    // seconds later (10 pings at 0.5 s: far more than an answer in flight and the console's
    // delay) can only come from the second vunet.
    let answered = |t: &str| t.lines().filter_map(|l| l.split("seq=").nth(1)?.split_whitespace().next()?.parse::<u32>().ok()).max();
    let last_before = answered(&a.console.text()).expect("a seq= line");
    // Not a wait for anything: vunet stays down a while, as a crashed one would.
    std::thread::sleep(Duration::from_secs(2));
    let second = VunetProcess::start(&args, &dir.path().join("vunet2.log"));
    assert!(second.console.wait_for("guest connected", Duration::from_secs(60)), "QEMU reconnected:\n{}", second.console.text());
    assert!(
        a.console.wait_until(|t| answered(t).is_some_and(|s| s >= last_before + 10), Duration::from_secs(60)),
        "pings answered after the restart (last one before: seq={last_before}):\n{}",
        a.console.text()
    );
}

/// The DHCP client part of a guest script: busybox udhcpc with a small hook that sets the
/// address it is given and prints it.
fn udhcpc(hostname: &str) -> String {
    format!("cat > /tmp/hook.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface; echo \"LEASED $ip\" ;; esac\nEOF\nchmod +x /tmp/hook.sh\nudhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 -x hostname:{hostname} || exit 3\n")
}

#[test]
fn guests_get_addresses_by_dhcp_and_resolve_each_other_by_name() {
    let _turn = serial();
    let dir = TempDir::new("guests-dhcp");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\ncontrol_socket = \"{0}/control.sock\"\n[[network]]\nname = \"default\"\nmode = \"isolated\"\ngateway = \"192.168.122.1/24\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"{0}/vm1.sock\"\n[[network.port]]\nname = \"vm2\"\nsocket = \"{0}/vm2.sock\"\n[network.dhcp]\nrange = [\"192.168.122.100\", \"192.168.122.199\"]\nhosts = [{{ mac = \"52:54:00:00:00:10\", ip = \"192.168.122.10\", name = \"web\" }}]\n[network.dns]\nforwarders = []\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let _vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let web = Guest::boot(
        "web",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:00:00:10",
        "",
        // Looks the other guest up once it has a lease (it may boot later): tried until the
        // answer has a name, then printed.
        &format!(
            "{}i=0\nuntil nslookup client 192.168.122.1 >/tmp/ns 2>&1; grep -q Name: /tmp/ns; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 1; done\ncat /tmp/ns\necho WEB-LOOKUP-DONE\nsleep 600\n",
            udhcpc("web")
        ),
    );
    let client = Guest::boot(
        "client",
        dir.path(),
        &Socket::Connect(dir.path().join("vm2.sock")),
        "52:54:00:00:00:21",
        "",
        &format!(
            "{}ip -4 addr show dev eth0\nping -c 2 -W 5 192.168.122.1 || exit 4\n{}ping -c 3 -W 5 192.168.122.10 || exit 5\nnslookup web 192.168.122.1 || exit 6\nnslookup nosuch 192.168.122.1\necho NSLOOKUP-NOSUCH-EXIT $?\nsleep 5\n",
            udhcpc("client"),
            await_peer("192.168.122.10", 9)
        ),
    );
    assert_eq!(client.wait_exit(BOOT_AND_RUN), Some(0), "client:\n{}", client.console.text());
    let c = client.console.text();
    let leased: std::net::Ipv4Addr =
        c.split("LEASED ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).expect("client leased an address");
    assert!(
        (std::net::Ipv4Addr::new(192, 168, 122, 100)..=std::net::Ipv4Addr::new(192, 168, 122, 199)).contains(&leased),
        "{leased} from the range"
    );
    assert!(web.console.wait_for("LEASED 192.168.122.10", Duration::from_secs(5)), "static host got its address:\n{}", web.console.text());
    // DNS on the gateway: the static name, the other guest's DHCP name, and a name nobody has.
    assert!(c.contains("Address: 192.168.122.10") || c.contains("Address 1: 192.168.122.10"), "nslookup web:\n{c}");
    assert!(c.contains("NXDOMAIN"), "nslookup nosuch answers NXDOMAIN:\n{c}");
    assert!(web.console.wait_for("WEB-LOOKUP-DONE", BOOT_AND_RUN), "nslookup client from the web guest:\n{}", web.console.text());
    let w = web.console.text();
    assert!(w.contains(&leased.to_string()) && w.contains("Name:"), "nslookup client from the web guest:\n{w}");
    // The daemon lists the leases: MAC, IP, expiry, name.
    let listed =
        std::process::Command::new(vunet_binary()).args(["dhcp-leases", "default", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let line = listed.lines().find(|l| l.starts_with("52:54:00:00:00:21")).unwrap_or_else(|| panic!("client's lease listed:\n{listed}"));
    assert!(line.contains(&leased.to_string()) && line.trim_end().ends_with("client") && line.contains(" 20"), "{line}");
    let leases = std::fs::read_to_string(dir.path().join("state/default.leases")).expect("lease file");
    assert!(leases.contains("52:54:00:00:00:21") && leases.contains(&leased.to_string()), "{leases}");
}

#[test]
fn spoofing_guests_and_a_rogue_dhcp_server_get_nowhere() {
    let _turn = serial();
    let dir = TempDir::new("guests-spoof");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{0}/control.sock\"\n[[network]]\nname = \"default\"\nmode = \"isolated\"\ngateway = \"192.168.122.1/24\"\n[[network.port]]\nname = \"rogue\"\nsocket = \"{0}/vm1.sock\"\n[[network.port]]\nname = \"client\"\nsocket = \"{0}/vm2.sock\"\n[[network.port]]\nname = \"spoofer\"\nsocket = \"{0}/vm3.sock\"\n[network.dhcp]\nrange = [\"192.168.122.100\", \"192.168.122.199\"]\nhosts = [{{ mac = \"52:54:00:00:00:20\", ip = \"192.168.122.20\", name = \"client\" }}]\n[network.dns]\nforwarders = []\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let _vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    // A guest runs busybox udhcpd offering 192.168.122.200-210.
    let rogue = Guest::boot(
        "rogue",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:00:00:66",
        "",
        // ROGUE-UP once udhcpd listens; up until the test ends (and kills it).
        &format!(
            "ip addr add 192.168.122.66/24 dev eth0\nprintf 'start 192.168.122.200\\nend 192.168.122.210\\ninterface eth0\\nlease_file /tmp/udhcpd.leases\\nopt subnet 255.255.255.0\\n' > /tmp/udhcpd.conf\ntouch /tmp/udhcpd.leases\nudhcpd -f /tmp/udhcpd.conf &\n{}echo ROGUE-UP\nsleep 600\n",
            await_listening("udp", 67, 8)
        ),
    );
    assert!(rogue.console.wait_for("ROGUE-UP", BOOT_AND_RUN), "rogue:\n{}", rogue.console.text());
    let client = Guest::boot(
        "client",
        dir.path(),
        &Socket::Connect(dir.path().join("vm2.sock")),
        "52:54:00:00:00:20",
        "",
        // Up until the test ends (and kills it), however long the spoofer takes.
        &format!("{}sleep 600\n", udhcpc("client")),
    );
    let spoofer = Guest::boot(
        "spoofer",
        dir.path(),
        &Socket::Connect(dir.path().join("vm3.sock")),
        "52:54:00:00:00:33",
        "",
        &format!(
            "{}{}ping -c 2 -W 3 192.168.122.20 && echo OWN-ADDRESS-WORKS\nip addr flush dev eth0\nip addr add 192.168.122.150/24 dev eth0\nping -c 2 -W 3 192.168.122.20 || echo FOREIGN-IP-BLOCKED\nip addr flush dev eth0\nip addr add $(cat /tmp/leased)/24 dev eth0\nip link set eth0 down\nip link set eth0 address 52:54:00:99:99:99\nip link set eth0 up\nping -c 2 -W 3 192.168.122.20 || echo FOREIGN-MAC-BLOCKED\n",
            udhcpc("spoofer").replace("echo \"LEASED $ip\"", "echo \"LEASED $ip\"; echo $ip > /tmp/leased"),
            // The client may boot later; the spoofer's own address must reach it first.
            await_peer("192.168.122.20", 9)
        ),
    );
    assert_eq!(spoofer.wait_exit(BOOT_AND_RUN), Some(0), "spoofer:\n{}", spoofer.console.text());
    let s = spoofer.console.text();
    assert!(s.contains("OWN-ADDRESS-WORKS"), "with its own address the spoofer reaches the client:\n{s}");
    assert!(s.contains("FOREIGN-IP-BLOCKED"), "a foreign IP reaches nobody:\n{s}");
    assert!(s.contains("FOREIGN-MAC-BLOCKED"), "a foreign MAC reaches nobody:\n{s}");
    // The client's lease came from vunet (its static address), never from the rogue server.
    let c = client.console.text();
    let leased: Vec<&str> = c.split("LEASED ").skip(1).filter_map(|s| s.split_whitespace().next()).collect();
    assert!(
        !leased.is_empty() && leased.iter().all(|ip| *ip == "192.168.122.20"),
        "only vunet's lease, never the rogue's .200-.210: {leased:?}\n{c}"
    );
    let ports = std::process::Command::new(vunet_binary())
        .args(["port-list", "default", "--json", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let ports: serde_json::Value = serde_json::from_slice(&ports.stdout).expect("port-list --json");
    let drops = |name: &str, reason: &str| {
        ports.as_array().unwrap().iter().find(|p| p["name"] == name).map(|p| p["drops"][reason].as_u64().unwrap_or(0)).unwrap_or(0)
    };
    assert!(drops("rogue", "rogue_dhcp_server") > 0, "the rogue server's offers were dropped:\n{ports:#}");
    assert!(drops("spoofer", "spoofed_ip") > 0 && drops("spoofer", "spoofed_mac") > 0, "{ports:#}");
}
