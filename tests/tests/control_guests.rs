//! The control CLI with real guests (QEMU, TCG): a port added at run time carries a guest, a
//! capture of it opens in tshark, removing it cuts only that guest, and a SIGHUP that adds a
//! network leaves a running iperf3 stream alone.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vunet_tests::guest::{await_listening, await_peer, serial, vunet_binary, Guest, Socket, VunetProcess};
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(240);

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(vunet_binary()).args(args).output().expect("vunet")
}

fn config(dir: &Path, networks: &str) -> std::path::PathBuf {
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{networks}")).unwrap();
    cfg
}

const LAB: &str = "[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.0.0.254/24\"\n[network.dns]\nforwarders = []\n\
                   [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n";

#[test]
fn a_port_added_at_run_time_carries_a_guest_is_captured_and_removing_it_cuts_only_that_guest() {
    let _turn = serial();
    let dir = TempDir::new("ctlg-ports");
    let cfg = config(dir.path(), LAB);
    let ctl = dir.path().join("control.sock");
    let c = ctl.to_str().unwrap();
    let vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let a = Guest::boot(
        "a",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:00:00:0a",
        "",
        // Its 30 s of counted pings start once guest b is there, so the removal of b's port
        // falls in them.
        &format!(
            "ip addr add 10.0.0.1/24 dev eth0\necho A-UP\n{}echo A-SEES-B\nping -c 60 -i 0.5 -W 1 10.0.0.254\n",
            await_peer("10.0.0.2", 9)
        ),
    );
    let added = cli(&["port-add", "lab", "vm2", "--control", c]);
    assert!(added.status.success(), "{added:?}");
    let sock2 = dir.path().join("lab-vm2.sock");
    assert!(sock2.exists());
    let pcap = dir.path().join("vm2.pcap");
    let mut capture = Command::new(vunet_binary())
        .args(["capture", "lab", "vm2", "-w", pcap.to_str().unwrap(), "--control", c])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let b = Guest::boot(
        "b",
        dir.path(),
        &Socket::Connect(sock2),
        "52:54:00:00:00:0b",
        "",
        // After reaching guest a, b pings the gateway (always there) until three pings in a
        // row go unanswered: cut off when its port is removed, whenever the test gets there.
        &format!(
            "ip addr add 10.0.0.2/24 dev eth0\n{}ping -c 3 -W 5 10.0.0.1 || exit 4\necho B-PINGED\n\
             i=0\nwhile ping -c 3 -W 1 10.0.0.254 >/dev/null; do i=$((i+1)); [ $i -gt 150 ] && echo B-STILL-CONNECTED && exit 0; done\necho B-CUT-OFF\n",
            await_peer("10.0.0.1", 9)
        ),
    );
    assert!(b.console.wait_for("B-PINGED", BOOT_AND_RUN), "the guest on the added port reaches the other:\n{}", b.console.text());
    let _ = capture.kill();
    let _ = capture.wait();

    // The capture shows the guest's ping exchange, as tshark reads it.
    let shark = Command::new("tshark").args(["-r", pcap.to_str().unwrap(), "-Y", "icmp"]).output().expect("tshark");
    let shown = String::from_utf8_lossy(&shark.stdout);
    assert!(shark.status.success(), "tshark: {}", String::from_utf8_lossy(&shark.stderr));
    assert!(shown.contains("10.0.0.2 → 10.0.0.1") && shown.contains("Echo (ping) request"), "{shown}");
    assert!(shown.contains("10.0.0.1 → 10.0.0.2") && shown.contains("Echo (ping) reply"), "{shown}");

    // Removing vm2 cuts guest b off; guest a goes on pinging the gateway.
    assert!(a.console.wait_for("A-SEES-B", Duration::from_secs(60)), "{}", a.console.text());
    let del = cli(&["port-del", "lab", "vm2", "--control", c]);
    assert!(del.status.success(), "{del:?}");
    assert!(b.console.wait_for("B-CUT-OFF", Duration::from_secs(60)), "guest b lost its network:\n{}", b.console.text());
    assert_eq!(a.wait_exit(Duration::from_secs(60)), Some(0), "guest a:\n{}", a.console.text());
    let out = a.console.text();
    let received: u32 =
        out.split(" packets received").next().and_then(|s| s.rsplit(", ").next()).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(received >= 55, "guest a kept its network through the removal ({received} of 60 answered):\n{out}");
    let ports = String::from_utf8_lossy(&cli(&["port-list", "lab", "--control", c]).stdout).into_owned();
    assert!(ports.starts_with("vm1 ") && !ports.contains("vm2"), "{ports}");
    assert!(vunet.console.wait_for("port removed", Duration::from_secs(10)), "{}", vunet.console.text());
}

#[test]
fn sighup_adding_a_network_leaves_a_running_iperf3_stream_alone() {
    let _turn = serial();
    let dir = TempDir::new("ctlg-reload");
    let two_ports = "[[network]]\nname = \"lab\"\nmode = \"bridge\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n\
                     [[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n";
    let cfg = config(dir.path(), two_ports);
    let vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let server = Guest::boot(
        "srv",
        dir.path(),
        &Socket::Connect(dir.path().join("vm1.sock")),
        "52:54:00:00:00:01",
        "",
        // iperf3 listens before the address its client waits for is up.
        &format!("iperf3 -s -1 &\nsrv=$!\n{}ip addr add 10.0.0.1/24 dev eth0\nwait $srv\n", await_listening("tcp", 5201, 8)),
    );
    let client = Guest::boot(
        "cli",
        dir.path(),
        &Socket::Connect(dir.path().join("vm2.sock")),
        "52:54:00:00:00:02",
        "",
        &format!(
            "ip addr add 10.0.0.2/24 dev eth0\n{}echo IPERF-START\niperf3 -c 10.0.0.1 -t 12 -i 1 -f m || exit 5\n",
            await_peer("10.0.0.1", 9)
        ),
    );
    assert!(client.console.wait_for("IPERF-START", BOOT_AND_RUN), "{}", client.console.text());
    // Four one-second reports: the stream runs (counted, not matched on iperf3's interval
    // labels, whose end times drift: "3.00-4.01").
    assert!(client.console.wait_for_lines("Mbits/sec", 4, Duration::from_secs(30)), "the stream runs:\n{}", client.console.text());
    // Add a network to the file and tell vunet.
    let more = format!(
        "{two_ports}[[network]]\nname = \"second\"\nmode = \"isolated\"\ngateway = \"10.1.0.1/24\"\n[[network.port]]\nname = \"x1\"\nsocket = \"x1.sock\"\n"
    );
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n{more}")).unwrap();
    // SAFETY: the daemon is our child and still runs.
    unsafe { libc::kill(vunet.child.id() as i32, libc::SIGHUP) };
    assert!(vunet.console.wait_for("reload of", Duration::from_secs(10)), "{}", vunet.console.text());
    assert!(vunet.console.text().contains("reload: network second: added"), "{}", vunet.console.text());
    assert!(std::os::unix::net::UnixStream::connect(dir.path().join("x1.sock")).is_ok(), "the new network's port listens");
    let nets =
        String::from_utf8_lossy(&cli(&["net-list", "--control", dir.path().join("control.sock").to_str().unwrap()]).stdout).into_owned();
    assert!(nets.contains("second") && nets.contains("lab"), "{nets}");

    assert_eq!(client.wait_exit(Duration::from_secs(60)), Some(0), "client:\n{}", client.console.text());
    let out = client.console.text();
    let intervals: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("sec") && l.contains("Mbits/sec") && !l.contains("sender") && !l.contains("receiver"))
        .filter_map(|l| l.split("Mbits/sec").next()?.split_whitespace().last()?.parse().ok())
        .collect();
    assert!(intervals.len() >= 12, "every second reported:\n{out}");
    assert!(intervals.iter().all(|&m| m > 1.0), "no second without traffic across the reload: {intervals:?}\n{out}");
    drop(server);
}
