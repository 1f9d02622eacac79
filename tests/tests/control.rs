//! Running vunet like libvirt or OVS: every control subcommand against a running daemon (and
//! its `--json`), its errors, ports added and removed at run time, capture, metrics, the
//! control socket's permissions, and libvirt XML import. Guests are simulated.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use vunet_dhcp::message::{build_client_message, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, gateway_mac, udp_payload};
use vunet_tests::guest::{vunet_binary, VunetProcess};
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const VM1: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x01];
const VM2: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x02];
const GW: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

fn cli(args: &[&str]) -> Output {
    Command::new(vunet_binary()).args(args).env("RUST_BACKTRACE", "1").output().expect("run vunet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit code 1 and exactly `want` as the one line on stderr.
fn assert_error(o: &Output, want: &str) {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stderr), format!("vunet: {want}\n"));
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// A daemon with network "lab" (isolated, DHCP) and port vm1; returns it and its control
/// socket.
fn daemon(dir: &Path, extra_top: &str) -> (VunetProcess, PathBuf) {
    let cfg = dir.join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"ctl/control.sock\"\n{extra_top}\n[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.9.0.1/24\"\n\
             [network.dhcp]\nrange = [\"10.9.0.10\", \"10.9.0.20\"]\n[network.dns]\nforwarders = []\n\
             [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n"
        ),
    )
    .unwrap();
    let v = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"));
    (v, dir.join("ctl/control.sock"))
}

/// DHCP DISCOVER/REQUEST for `mac`; the address leased.
fn lease(vm: &mut VmSim, mac: [u8; 6]) -> Ipv4Addr {
    let mut ip = None;
    for (t, req) in [(MessageType::Discover, false), (MessageType::Request, true)] {
        let msg = build_client_message(t, mac, 3, if req { ip } else { None }, req.then_some(GW), Some("alpha"));
        let mut f = Vec::new();
        build_udp(&mut f, mac, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
        vm.send(&f);
        let reply = std::iter::from_fn(|| vm.recv(T)).find_map(|(_, f)| udp_payload(&f, CLIENT_PORT).map(|(_, p)| p.to_vec())).unwrap();
        ip = reply_yiaddr(&reply);
    }
    ip.expect("a lease")
}

fn arp_to_gateway(vm: &mut VmSim, mac: [u8; 6], ip: Ipv4Addr) -> bool {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GW.octets());
    vm.send(&f);
    std::iter::from_fn(|| vm.recv(T)).any(|(_, f)| f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2])
}

#[test]
fn every_subcommand_with_and_without_json_and_their_errors() {
    let dir = TempDir::new("control-cli");
    let (v, ctl) = daemon(dir.path(), "");
    let c = ctl.to_str().unwrap();
    let mut vm1 = VmSim::connect(&dir.path().join("vm1.sock"), SimOptions::full()).unwrap();
    vm1.post_rx(QUEUE_SIZE);
    assert!(v.wait_connected("vm1", 1, T), "{}", v.console.text());
    let ip1 = lease(&mut vm1, VM1);

    // net-list
    let text = stdout(&cli(&["net-list", "--control", c]));
    assert!(text.starts_with("NAME") && text.contains("lab") && text.contains("isolated") && text.contains("1/1 connected"), "{text}");
    let nets = json(&cli(&["net-list", "--json", "--control", c]));
    assert_eq!(
        (nets[0]["name"].as_str(), nets[0]["mode"].as_str(), nets[0]["gateway"].as_str()),
        (Some("lab"), Some("isolated"), Some("10.9.0.1/24"))
    );
    assert_eq!((nets[0]["ports"].as_u64(), nets[0]["connected"].as_u64(), nets[0]["state"].as_str()), (Some(1), Some(1), Some("active")));

    // port-list: socket, MAC, IP, connected, features, counters
    let text = stdout(&cli(&["port-list", "lab", "--control", c]));
    assert!(
        text.starts_with("vm1 (vhost-user, server) socket=") && text.contains("connected") && text.contains(&format!("ip={ip1}")),
        "{text}"
    );
    // The ACK is counted as sent just after vm1 could see it: wait for the count.
    let mut ports = Value::Null;
    wait_until(T, || {
        ports = json(&cli(&["port-list", "lab", "--json", "--control", c]));
        ports[0]["tx_frames"].as_u64().is_some_and(|n| n >= 2)
    });
    let p = &ports[0];
    assert_eq!((p["name"].as_str(), p["connected"].as_bool(), p["mac"].as_str()), (Some("vm1"), Some(true), Some("52:54:00:00:00:01")));
    assert_eq!(p["ip"].as_str(), Some(ip1.to_string().as_str()));
    assert!(p["features"].as_array().unwrap().iter().any(|f| f == "VERSION_1"), "{p}");
    assert!(p["rx_frames"].as_u64().unwrap() >= 2 && p["tx_frames"].as_u64().unwrap() >= 2, "{p}");

    // dhcp-leases
    let text = stdout(&cli(&["dhcp-leases", "lab", "--control", c]));
    assert!(
        text.lines().nth(1).is_some_and(|l| l.starts_with("52:54:00:00:00:01") && l.contains(&ip1.to_string()) && l.ends_with("alpha")),
        "{text}"
    );
    let leases = json(&cli(&["dhcp-leases", "lab", "--json", "--control", c]));
    assert_eq!(
        (leases[0]["mac"].as_str(), leases[0]["ip"].as_str(), leases[0]["name"].as_str()),
        (Some("52:54:00:00:00:01"), Some(ip1.to_string().as_str()), Some("alpha"))
    );

    // port-add at run time: a new socket next to the control socket, used at once.
    let added = json(&cli(&["port-add", "lab", "vm2", "--mac", "52:54:00:00:00:02", "--json", "--control", c]));
    let sock2 = PathBuf::from(added["socket"].as_str().unwrap());
    assert_eq!(sock2, dir.path().join("ctl/lab-vm2.sock"));
    let mut vm2 = VmSim::connect(&sock2, SimOptions::full()).unwrap();
    vm2.post_rx(QUEUE_SIZE);
    assert!(v.wait_connected("vm2", 1, T), "{}", v.console.text());
    let ip2 = lease(&mut vm2, VM2);
    assert_ne!(ip1, ip2);
    let hello = eth_frame(VM1, VM2, 0x88b5, 64, 3);
    vm2.send(&hello);
    assert!(std::iter::from_fn(|| vm1.recv(T)).any(|(_, f)| f == hello), "vm2 reaches vm1");

    // port-add mistakes
    assert_error(&cli(&["port-add", "lab", "vm2", "--control", c]), "network \"lab\" already has a port named \"vm2\"");
    assert_error(
        &cli(&["port-add", "lab", "vm3", "--socket", sock2.to_str().unwrap(), "--control", c]),
        &format!("socket {} is used by another port", sock2.display()),
    );
    let taken = dir.path().join("ctl/taken.sock");
    let _other = std::os::unix::net::UnixListener::bind(&taken).unwrap();
    assert_error(
        &cli(&["port-add", "lab", "vm3", "--socket", taken.to_str().unwrap(), "--control", c]),
        &format!("port vm3: socket {} is in use by another process", taken.display()),
    );
    assert_error(
        &cli(&["port-add", "lab", "vm3", "--mac", "01:00:00:00:00:01", "--control", c]),
        "invalid MAC address \"01:00:00:00:00:01\"",
    );
    assert_error(
        &cli(&["port-add", "lab", "vm3", "--mode", "both", "--control", c]),
        "unknown port mode \"both\" (expected server or client)",
    );

    // port-del: only that guest goes; vm1 keeps working.
    let del = cli(&["port-del", "lab", "vm2", "--control", c]);
    assert!(del.status.success() && stdout(&del) == "port vm2 removed\n", "{del:?}");
    assert!(!sock2.exists(), "the removed port's socket is gone");
    assert!(wait_until(T, || !vm2.is_connected()), "vm2's connection was cut");
    assert!(arp_to_gateway(&mut vm1, VM1, ip1), "vm1 still works");
    let ports = json(&cli(&["port-list", "lab", "--json", "--control", c]));
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    assert_error(&cli(&["port-del", "lab", "vm2", "--control", c]), "network \"lab\" has no port named \"vm2\"");
    // The name can be used again.
    assert!(cli(&["port-add", "lab", "vm2", "--control", c]).status.success());

    // Unknown network, on every subcommand that takes one.
    for args in [
        &["port-list", "nope"][..],
        &["dhcp-leases", "nope"],
        &["port-add", "nope", "x"],
        &["port-del", "nope", "x"],
        &["capture", "nope", "x"],
    ] {
        let mut a = args.to_vec();
        a.extend(["--control", c]);
        assert_error(&cli(&a), "no network named \"nope\"");
    }
}

#[test]
fn port_add_creates_and_connects_to_sockets_only_in_the_socket_directory() {
    let dir = TempDir::new("control-confine");
    let (_v, ctl) = daemon(dir.path(), "");
    let c = ctl.to_str().unwrap();
    let ctl_dir = dir.path().join("ctl");
    let outside = |p: &Path, d: &Path| {
        format!(
            "socket {} is outside the socket directory {} (port-add creates and connects to sockets only there; socket_dir in the configuration sets it)",
            p.display(),
            d.display()
        )
    };
    // Next to the configuration's own vm1.sock, but not in the control socket's directory; up
    // and out with `..`; through a link to elsewhere; in client mode to another VM's socket.
    let victim_vm = dir.path().join("other-vm.sock");
    let _victim = std::os::unix::net::UnixListener::bind(&victim_vm).unwrap();
    std::os::unix::fs::symlink(dir.path(), ctl_dir.join("up")).unwrap();
    for (p, mode) in [
        (dir.path().join("vm9.sock"), "server"),
        (ctl_dir.join("../vm9.sock"), "server"),
        (ctl_dir.join("up/vm9.sock"), "server"),
        (victim_vm.clone(), "client"),
    ] {
        assert_error(
            &cli(&["port-add", "lab", "vm9", "--socket", p.to_str().unwrap(), "--mode", mode, "--control", c]),
            &outside(&p, &ctl_dir),
        );
    }
    assert!(!dir.path().join("vm9.sock").exists(), "nothing created outside");
    let ports = json(&cli(&["port-list", "lab", "--json", "--control", c]));
    assert_eq!(ports.as_array().unwrap().len(), 1, "nothing added: {ports}");
    // In the directory: added.
    let inside = ctl_dir.join("vm9.sock");
    let added = json(&cli(&["port-add", "lab", "vm9", "--socket", inside.to_str().unwrap(), "--json", "--control", c]));
    assert_eq!(added["socket"].as_str(), inside.to_str());
    assert!(inside.exists());

    // socket_dir moves the directory (and port-add's default place) elsewhere.
    let dir2 = TempDir::new("control-confine-dir");
    let (_v2, ctl2) = daemon(dir2.path(), "socket_dir = \"guests\"");
    let c2 = ctl2.to_str().unwrap();
    let guests = dir2.path().join("guests");
    let added = json(&cli(&["port-add", "lab", "vm2", "--json", "--control", c2]));
    assert_eq!(added["socket"].as_str(), guests.join("lab-vm2.sock").to_str());
    let next_to_control = dir2.path().join("ctl/vm3.sock");
    assert_error(
        &cli(&["port-add", "lab", "vm3", "--socket", next_to_control.to_str().unwrap(), "--control", c2]),
        &outside(&next_to_control, &guests),
    );
}

#[test]
fn the_control_socket_is_owner_only_unless_a_group_is_given() {
    let dir = TempDir::new("control-perm");
    let (_v, ctl) = daemon(dir.path(), "");
    let c = ctl.to_str().unwrap();
    let mode = std::fs::metadata(&ctl).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap();
    assert_eq!(mode, 0o600);
    // Another user (nobody) is refused by the socket's permissions.
    let as_nobody = |ctl: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(vunet_binary())
            .args(["net-list", "--control", ctl])
            .output()
            .unwrap()
    };
    assert_error(&as_nobody(c), &format!("cannot reach the vunet daemon at {c}: Permission denied"));

    // With control_group, that group's members may use it.
    let dir2 = TempDir::new("control-group");
    let (_v2, ctl2) = daemon(dir2.path(), "control_group = \"nogroup\"");
    let mode = std::fs::metadata(&ctl2).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap();
    assert_eq!(mode, 0o660);
    let out = as_nobody(ctl2.to_str().unwrap());
    assert!(out.status.success() && stdout(&out).contains("lab"), "{out:?}");
}

#[test]
fn capture_writes_both_directions_as_pcap() {
    let dir = TempDir::new("control-capture");
    let (v, ctl) = daemon(dir.path(), "");
    let mut vm1 = VmSim::connect(&dir.path().join("vm1.sock"), SimOptions::full()).unwrap();
    vm1.post_rx(QUEUE_SIZE);
    assert!(v.wait_connected("vm1", 1, T), "{}", v.console.text());
    let ip1 = lease(&mut vm1, VM1);
    let pcap = dir.path().join("vm1.pcap");
    let mut cap = Command::new(vunet_binary())
        .args(["capture", "lab", "vm1", "--count", "2", "-w", pcap.to_str().unwrap(), "--control", ctl.to_str().unwrap()])
        .spawn()
        .unwrap();
    // The capture is on once the daemon says so; then one ARP request and its reply.
    assert!(v.console.wait_for("capture started", T), "{}", v.console.text());
    assert!(arp_to_gateway(&mut vm1, VM1, ip1));
    assert!(wait_until(T, || cap.try_wait().ok().flatten().is_some()), "capture stops after 2 frames");
    assert!(cap.wait().unwrap().success());
    let mut r = pcap_reader(&pcap);
    let a = r.next_packet().unwrap().unwrap().into_owned();
    let b = r.next_packet().unwrap().unwrap().into_owned();
    assert!(r.next_packet().is_none());
    assert_eq!(&a.data[6..12], &VM1, "first the guest's request (from the port)");
    assert_eq!((&a.data[12..14], &a.data[20..22]), (&[8u8, 6][..], &[0u8, 1][..]));
    assert_eq!(&b.data[0..6], &VM1, "then the gateway's reply (to the port)");
    assert_eq!(&b.data[6..12], &gateway_mac("lab"));
    assert!(b.timestamp >= a.timestamp);
}

fn pcap_reader(p: &Path) -> pcap_file::pcap::PcapReader<std::fs::File> {
    pcap_file::pcap::PcapReader::new(std::fs::File::open(p).unwrap()).unwrap()
}

#[test]
fn metrics_in_prometheus_text_format() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = TempDir::new("control-metrics");
    let (v, _ctl) = daemon(dir.path(), &format!("metrics_listen = \"127.0.0.1:{port}\""));
    let mut vm1 = VmSim::connect(&dir.path().join("vm1.sock"), SimOptions::full()).unwrap();
    vm1.post_rx(QUEUE_SIZE);
    assert!(v.wait_connected("vm1", 1, T), "{}", v.console.text());
    lease(&mut vm1, VM1);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let m = get("/metrics");
    assert!(m.starts_with("HTTP/1.0 200 OK\r\n") && m.contains("Content-Type: text/plain; version=0.0.4"), "{m}");
    let value = |metric: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(metric))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{metric} in\n{m}"))
    };
    assert!(value("vunet_port_rx_frames_total{network=\"lab\",port=\"vm1\"}") >= 2);
    assert!(value("vunet_port_tx_bytes_total{network=\"lab\",port=\"vm1\"}") > 0);
    assert_eq!(value("vunet_port_connected{network=\"lab\",port=\"vm1\"}"), 1);
    assert_eq!(value("vunet_dhcp_leases{network=\"lab\"}"), 1);
    assert_eq!(value("vunet_port_drops_total{network=\"lab\",port=\"vm1\",reason=\"spoofed_ip\"}"), 0);
    assert!(m.contains("# TYPE vunet_port_rx_frames_total counter"));
    assert!(get("/other").starts_with("HTTP/1.0 404"));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/libvirt").join(name)
}

#[test]
fn libvirt_seed_networks_import_and_run() {
    // Each seed converts, with its warnings on stderr and the TOML on stdout.
    for (file, want) in [
        (
            "default.xml",
            &["name = \"default\"", "mode = \"nat\"", "gateway = \"192.168.122.1/24\"", "range = [\"192.168.122.2\", \"192.168.122.254\"]"]
                [..],
        ),
        ("routed.xml", &["mode = \"route\"", "gateway = \"192.168.200.1/24\""]),
        (
            "isolated.xml",
            &[
                "mode = \"isolated\"",
                "domain = \"lab\"",
                "{ mac = \"52:54:00:00:00:10\", ip = \"10.11.0.10\", name = \"web\" }",
                "{ name = \"files\", ip = \"10.11.0.50\" }",
                "forwarders = [\"192.0.2.53\"]",
                "mtu = 9000",
            ],
        ),
        ("bridged.xml", &["mode = \"bridge\"", "kind = \"af-packet\"", "interface = \"br0\""]),
    ] {
        let out = cli(&["import-libvirt", fixture(file).to_str().unwrap()]);
        assert!(out.status.success(), "{file}: {out:?}");
        let toml = stdout(&out);
        for w in want {
            assert!(toml.contains(w), "{file}: {w:?} in\n{toml}");
        }
    }
    let warned = String::from_utf8_lossy(&cli(&["import-libvirt", fixture("default.xml").to_str().unwrap()]).stderr).into_owned();
    assert!(warned.lines().all(|l| l.starts_with("vunet: warning: ") && l.contains("default.xml:")), "{warned}");
    assert!(warned.contains("virbr0"), "what cannot be honoured is named: {warned}");

    // The isolated seed runs as it is (XML given to run), and takes a port at run time that a
    // guest gets an address on.
    let dir = TempDir::new("control-libvirt");
    let xml = dir.path().join("isolated.xml");
    std::fs::copy(fixture("isolated.xml"), &xml).unwrap();
    let v = VunetProcess::start(&["--config", xml.to_str().unwrap()], &dir.path().join("vunet.log"));
    // The summary is on stdout, before the line start() waited for: there now.
    assert!(
        v.console.text().contains("network \"isolated\": mode isolated, gateway 10.11.0.1/24, DHCP 10.11.0.100-10.11.0.199, DNS, mtu 9000"),
        "{}",
        v.console.text()
    );
    drop(v);
    // The default (NAT) and routed seeds start too, with their warnings.
    for (file, line) in [("default.xml", "network \"default\": mode nat"), ("routed.xml", "network \"routed\": mode route")] {
        let xml = dir.path().join(file);
        std::fs::copy(fixture(file), &xml).unwrap();
        let v = VunetProcess::start(&["--config", xml.to_str().unwrap()], &dir.path().join(format!("{file}.log")));
        // The warnings are on stderr, read by another thread than the summary start() waited
        // for: wait for them too.
        assert!(v.console.wait_for("warning:", T) && v.console.text().contains(line), "{}", v.console.text());
    }
}

/// The bridged seed runs where br0 exists (a namespace of the test's own with a bridge).
#[test]
fn libvirt_bridged_seed_runs_on_br0() {
    let host = vunet_tests::netns::Netns::new("lvbr");
    host.run("ip link add br0 type bridge && ip link set br0 up");
    let dir = TempDir::new("control-libvirt-br0");
    let xml = dir.path().join("bridged.xml");
    std::fs::copy(fixture("bridged.xml"), &xml).unwrap();
    let v = host.vunet(&["--config", xml.to_str().unwrap()], &dir.path().join("vunet.log"));
    assert!(v.console.wait_for("uplink af-packet br0 ready (offloads on)", T), "{}", v.console.text());
    assert!(v.console.text().contains("network \"host-bridge\": mode bridge"), "{}", v.console.text());
}

#[test]
fn libvirt_mistakes_are_one_line() {
    let dir = TempDir::new("control-libvirt-bad");
    let bad = dir.path().join("bad.xml");
    std::fs::write(&bad, "<network>\n  <name>x</name>\n  <ip address='10.0.0.1' prefix='24'>\n</network>\n").unwrap();
    for sub in [&["import-libvirt", bad.to_str().unwrap()][..], &["run", "--config", bad.to_str().unwrap()]] {
        let out = cli(sub);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("vunet: {}:4: malformed XML", bad.display())), "{err}");
    }
    let hostdev = dir.path().join("hostdev.xml");
    std::fs::write(&hostdev, "<network>\n  <name>x</name>\n  <forward mode='hostdev'/>\n</network>\n").unwrap();
    let out = cli(&["import-libvirt", hostdev.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "vunet: {}:3: unknown forward mode \"hostdev\" (expected nat, route, open, bridge, passthrough, private or vepa)\n",
            hostdev.display()
        )
    );
}

#[test]
fn help_is_complete() {
    let out = cli(&["--help"]);
    let top = stdout(&out);
    for sub in ["run", "net-list", "port-list", "dhcp-leases", "port-add", "port-del", "capture", "import-libvirt"] {
        assert!(top.contains(sub), "{sub} in --help:\n{top}");
        let h = cli(&[sub, "--help"]);
        assert!(h.status.success() && stdout(&h).contains("Usage: vunet"), "{sub} --help");
    }
    assert!(stdout(&cli(&["port-add", "--help"])).contains("--socket"));
    assert!(stdout(&cli(&["capture", "--help"])).contains("-w"));
    assert!(stdout(&cli(&["run", "--help"])).contains("SIGHUP"));
}

/// contrib/vunet.service passes `systemd-analyze verify` (with ExecStart pointing at the
/// binary built here).
#[test]
fn systemd_unit_verifies() {
    let dir = TempDir::new("control-systemd");
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/vunet.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/vunet run --config /etc/vunet/vunet.toml"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let here = dir.path().join("vunet.service");
    std::fs::write(&here, unit.replace("/usr/local/bin/vunet", vunet_binary().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (scripts/install-deps.sh installs systemd)");
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn leases_not_yet_saved_are_saved_when_vunet_stops() {
    let dir = TempDir::new("control-exit-leases");
    let state = dir.path().join("state");
    let (v, _ctl) = daemon(dir.path(), &format!("state_dir = \"{}\"", state.display()));
    let mut vm1 = VmSim::connect(&dir.path().join("vm1.sock"), SimOptions::full()).unwrap();
    vm1.post_rx(QUEUE_SIZE);
    assert!(v.wait_connected("vm1", 1, T), "{}", v.console.text());
    let ip = lease(&mut vm1, VM1);
    // A renewal under a new name, ACKed at once, while the lease writer waits out its interval
    // after the first write; then SIGTERM.
    let msg = build_client_message(MessageType::Request, VM1, 4, Some(ip), Some(GW), Some("beta"));
    let mut f = Vec::new();
    build_udp(&mut f, VM1, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
    vm1.send(&f);
    let acked = std::iter::from_fn(|| vm1.recv(T)).find_map(|(_, f)| udp_payload(&f, CLIENT_PORT).map(|(_, p)| p.to_vec())).unwrap();
    assert_eq!(reply_yiaddr(&acked), Some(ip));
    drop(v);
    let file = std::fs::read_to_string(state.join("lab.leases")).unwrap();
    assert!(file.contains(&format!("52:54:00:00:00:01 {ip} ")) && file.contains(" beta\n"), "{file}");
}
