//! The VXLAN uplink (docs/vxlan.md).
//!
//! - A simulated guest and a simulated remote endpoint (a UDP socket on loopback): what the
//!   guest sends arrives encapsulated (TSO frames segmented first), what the remote sends
//!   arrives decapsulated, learned endpoints are used for unicast, and malformed datagrams,
//!   unknown VNIs and a flood of source MACs are counted and bounded.
//! - Real guests (QEMU, TCG): two vunet daemons in two network namespaces ("hosts") joined
//!   by an underlay namespace, with a third daemon that receives the flooding; and vunet
//!   against the Linux kernel's own vxlan device.

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use vunet_switch::vxlan;
use vunet_switch::DropReason;
use vunet_tests::guest::{await_peer, iperf3_receiver_bps, serial, Guest, Socket};
use vunet_tests::netns::{veth, Netns};
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const GUEST: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const FAR: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0f];
const VNI: u32 = 42;
const MTU: usize = 1450;

/// An in-process vunet whose bridged network "vx" has one guest port and a vxlan uplink on
/// 127.0.0.1:`port` with 127.0.0.2 as its only remote, and the socket that plays the remote
/// (bound to 127.0.0.2:`port`, where vunet sends).
fn tunnel_to_loopback(dir: &Path) -> (vunet::Daemon, VmSim, UdpSocket, u16) {
    let remote = UdpSocket::bind("127.0.0.2:0").expect("bind the remote endpoint");
    let port = remote.local_addr().unwrap().port();
    remote.set_read_timeout(Some(T)).unwrap();
    let toml = format!(
        "[[network]]\nname = \"vx\"\nmode = \"bridge\"\nmtu = {MTU}\n[network.uplink]\nkind = \"vxlan\"\nvni = {VNI}\n\
         local = \"127.0.0.1\"\nport = {port}\nremotes = [\"127.0.0.2\"]\n[[network.port]]\nname = \"vm\"\nsocket = \"vm.sock\"\n"
    );
    let cfg = vunet::Config::parse(&toml, "test.toml", dir).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    let mut vm = VmSim::connect(&dir.join("vm.sock"), SimOptions::full()).expect("connect");
    vm.post_rx(QUEUE_SIZE);
    wait_network_ready(&d, "vx");
    (d, vm, remote, port)
}

fn uplink(d: &vunet::Daemon) -> std::sync::Arc<vunet::Port> {
    d.network("vx").and_then(|n| n.port(&format!("uplink:vxlan{VNI}"))).expect("the vxlan uplink port")
}

fn encapsulated(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut d = vxlan::header(vni).to_vec();
    d.extend_from_slice(inner);
    d
}

/// Receives datagrams on the remote until one carries an inner frame `want` accepts.
fn recv_inner(remote: &UdpSocket, want: impl Fn(&[u8]) -> bool) -> Option<(Vec<u8>, u16)> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = remote.recv_from(&mut buf).ok()?;
        if n >= 8 + 14 && want(&buf[8..n]) {
            return Some((buf[..n].to_vec(), from.port()));
        }
    }
}

#[test]
fn frames_cross_a_tunnel_to_a_simulated_remote_both_ways() {
    let dir = TempDir::new("vxlan-sim");
    let (d, mut vm, remote, port) = tunnel_to_loopback(dir.path());

    // A broadcast from the guest is flooded to the remote, encapsulated with VNI 42.
    let bcast = eth_frame([0xff; 6], GUEST, 0x0806, 46, 1);
    vm.send(&bcast);
    let (dgram, _) = recv_inner(&remote, |f| f == &bcast[..]).expect("the broadcast reaches the remote");
    assert_eq!(&dgram[..8], &[0x08, 0, 0, 0, 0, 0, VNI as u8, 0], "the I flag and VNI {VNI}");

    // The remote answers with a unicast to the guest: decapsulated and delivered, and the
    // remote's station is learned behind 127.0.0.2.
    let reply = eth_frame(GUEST, FAR, 0x0800, 100, 2);
    remote.send_to(&encapsulated(VNI, &reply), ("127.0.0.1", port)).unwrap();
    let got = std::iter::from_fn(|| vm.recv(T)).find(|(_, f)| f[6..12] == FAR).expect("the guest gets the remote's frame");
    assert_eq!(got.1, reply, "the inner frame, whole");
    let info = uplink(&d).link.as_ref().and_then(|l| l.tunnel()).expect("tunnel info");
    assert_eq!(
        info.learned,
        vec![("52:54:00:00:00:0f".to_string(), "127.0.0.2".to_string(), 0)],
        "the remote's station, learned behind its address"
    );
    assert_eq!(
        (info.vni, info.local.as_str(), info.remotes.clone()),
        (VNI, format!("127.0.0.1:{port}").as_str(), vec!["127.0.0.2".to_string()])
    );

    // A TSO frame from the guest to the learned station: segmented to the MTU before
    // encapsulation, every segment a complete frame, from source ports that depend on the flow.
    let (mut hdr, tso) = tso_frame(GUEST, FAR, 20_000);
    // The MSS a guest with this MTU uses.
    hdr.gso_size = (MTU - 40) as u16;
    vm.send_with(&hdr, &tso, false);
    let mut payload = 0;
    let mut sports = std::collections::HashSet::new();
    while payload < 20_000 {
        let (dgram, sport) = recv_inner(&remote, |f| f[0..6] == FAR && f[12..14] == [8, 0]).expect("every segment arrives");
        let inner = &dgram[8..];
        assert!(inner.len() <= MTU + 14, "a segment of {} bytes fits the MTU", inner.len());
        let ip_len = u16::from_be_bytes([inner[16], inner[17]]) as usize;
        payload += ip_len - 20 - 20;
        sports.insert(sport);
    }
    assert_eq!(payload, 20_000, "the whole TCP payload, segmented");
    assert_eq!(sports.len(), 1, "one flow, one outer source port");
    assert!(sports.iter().all(|&p| p != port), "sent from the senders' ports, not the listening one");
}

#[test]
fn malformed_datagrams_and_unknown_vnis_are_counted_and_a_mac_flood_stays_bounded() {
    let dir = TempDir::new("vxlan-bad");
    let (d, mut vm, remote, port) = tunnel_to_loopback(dir.path());
    let to = ("127.0.0.1", port);
    let ok = eth_frame(GUEST, FAR, 0x0800, 46, 3);
    let mut no_i = encapsulated(VNI, &ok);
    no_i[0] = 0;
    let mut gpe = encapsulated(VNI, &ok);
    gpe[0] |= 0x04;
    let bad: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![0x08, 0, 0], DropReason::VxlanShort),
        (no_i, DropReason::VxlanBadFlags),
        (gpe, DropReason::VxlanBadFlags),
        (encapsulated(VNI + 1, &ok), DropReason::VxlanUnknownVni),
        (encapsulated(7, &ok), DropReason::VxlanUnknownVni),
        (encapsulated(VNI, &ok[..13]), DropReason::ShortFrame),
        (encapsulated(VNI, &eth_frame(GUEST, FAR, 0x0800, MTU + 4 + 1, 4)), DropReason::Oversize),
    ];
    for (dgram, _) in &bad {
        remote.send_to(dgram, to).unwrap();
    }
    let want = |r: DropReason| bad.iter().filter(|(_, w)| *w == r).count() as u64;
    let reasons =
        [DropReason::VxlanShort, DropReason::VxlanBadFlags, DropReason::VxlanUnknownVni, DropReason::ShortFrame, DropReason::Oversize];
    let up = uplink(&d);
    assert!(
        wait_until(T, || reasons.iter().all(|&r| up.counters.snapshot().drop_count(r) == want(r))),
        "each counted by reason: {}",
        up.counters.snapshot()
    );
    // None reached the guest; nothing was learned.
    assert!(vm.recv(Duration::from_millis(300)).is_none(), "no malformed datagram reaches the guest");
    assert!(up.link.as_ref().and_then(|l| l.tunnel()).unwrap().learned.is_empty());

    // A flood of new source MACs from the remote: the tunnel's table keeps the remote within
    // its quota (1024), replacing its own oldest; the frames still reach the guest.
    let flood = 5000u32;
    let rx = || up.counters.rx_frames.load(std::sync::atomic::Ordering::Relaxed);
    let before = rx();
    for i in 0..flood {
        let b = i.to_be_bytes();
        let f = eth_frame(GUEST, [0x02, 0x77, b[0], b[1], b[2], b[3]], 0x0800, 46, 5);
        remote.send_to(&encapsulated(VNI, &f), to).unwrap();
        // A burst larger than the socket buffer would be lost, not counted: in steps of 200,
        // each received before the next.
        if i % 200 == 199 || i == flood - 1 {
            assert!(wait_until(T, || rx() > before + i as u64), "received {} of {}", rx() - before, i + 1);
        }
    }
    let info = up.link.as_ref().and_then(|l| l.tunnel()).unwrap();
    assert_eq!(info.learned.len(), 1024, "bounded at the remote's quota");
    assert_eq!(info.evicted, flood as u64 - 1024, "each new MAC past the quota replaced the remote's oldest");
    assert!(info.learned.iter().any(|(m, _, _)| m == "02:77:00:00:13:87"), "the newest is kept");
}

/// Two networks of one daemon on one address and port, VNIs 42 and 43: one socket, each
/// datagram to the network of its VNI whichever network's thread read it, a VNI of neither
/// counted.
#[test]
fn two_networks_share_one_socket_told_apart_by_vni() {
    let dir = TempDir::new("vxlan-shared");
    let remote = UdpSocket::bind("127.0.0.2:0").expect("bind the remote endpoint");
    let port = remote.local_addr().unwrap().port();
    remote.set_read_timeout(Some(T)).unwrap();
    let net = |name: &str, vni: u32, guest: &str| {
        format!(
            "[[network]]\nname = \"{name}\"\nmode = \"bridge\"\nmtu = {MTU}\n[network.uplink]\nkind = \"vxlan\"\nvni = {vni}\n\
             local = \"127.0.0.1\"\nport = {port}\nremotes = [\"127.0.0.2\"]\n[[network.port]]\nname = \"{guest}\"\nsocket = \"{guest}.sock\"\n"
        )
    };
    let toml = format!("{}{}", net("vx", 42, "a"), net("vy", 43, "b"));
    let cfg = vunet::Config::parse(&toml, "test.toml", dir.path()).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    let mut vms: Vec<VmSim> = ["a", "b"]
        .iter()
        .map(|g| {
            let mut vm = VmSim::connect(&dir.path().join(format!("{g}.sock")), SimOptions::full()).expect("connect");
            vm.post_rx(QUEUE_SIZE);
            vm
        })
        .collect();
    wait_network_ready(&d, "vx");
    wait_network_ready(&d, "vy");
    let to = ("127.0.0.1", port);
    for round in 0..20u8 {
        for (i, vni) in [42u32, 43].into_iter().enumerate() {
            let f = eth_frame([0xff; 6], [0x52, 0x54, 0, 0, vni as u8, round], 0x0800, 46, round);
            remote.send_to(&encapsulated(vni, &f), to).unwrap();
            let got = std::iter::from_fn(|| vms[i].recv(T)).find(|(_, g)| g[6..12] == f[6..12]);
            assert_eq!(got.map(|(_, g)| g), Some(f), "VNI {vni} reaches its own network's guest (round {round})");
        }
    }
    remote.send_to(&encapsulated(44, &eth_frame([0xff; 6], FAR, 0x0800, 46, 0)), to).unwrap();
    let unknown = |n: &str| {
        d.network(n)
            .and_then(|n| n.ports.snapshot().iter().find(|p| p.kind == vunet::PortKind::Uplink).cloned())
            .unwrap()
            .counters
            .snapshot()
            .drop_count(DropReason::VxlanUnknownVni)
    };
    assert!(wait_until(T, || unknown("vx") + unknown("vy") == 1), "VNI 44 counted once, by the reader");
    for vm in vms.iter_mut() {
        assert!(
            vm.recv_all(Duration::from_millis(300)).iter().all(|(_, f)| f[6..12] != FAR),
            "no guest gets another network's or an unknown VNI's frames"
        );
    }
    // Each network's frames stayed its own: 20 to each guest, none crossed.
    let rx = |n: &str, p: &str| port_counters(&d, n, p).tx_frames;
    assert_eq!((rx("vx", "a"), rx("vy", "b")), (20, 20));
}

/// A `local` that is not this host's address is one clear line, from `check` and at start.
#[test]
fn a_local_address_not_of_this_host_is_refused_in_one_line() {
    let dir = TempDir::new("vxlan-nolocal");
    // 192.0.2.0/24 (TEST-NET-1) is no address of this machine.
    let toml = "[[network]]\nname = \"vx\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"vxlan\"\nvni = 42\nlocal = \"192.0.2.77\"\nremotes = [\"192.0.2.78\"]\n";
    let cfg = vunet::Config::parse(toml, "test.toml", dir.path()).expect("config");
    let want = "network vx: vxlan uplink: local address 192.0.2.77 is not an address of this host";
    assert_eq!(vunet::Daemon::check(&cfg).err().map(|e| e.to_string()).as_deref(), Some(want));
    assert_eq!(vunet::Daemon::start(&cfg).err().map(|e| e.to_string()).as_deref(), Some(want));
}

// ---- Real guests across namespaces ----

const BOOT_AND_RUN: Duration = Duration::from_secs(300);

fn ping_ok(out: &str) -> bool {
    out.contains("3 packets transmitted, 3 packets received")
}

/// vunet in `ns` with a bridged network "vx" whose vxlan uplink is on `local`, to `remotes`,
/// and one guest port `vm` (socket `dir/vm.sock`), control socket `dir/ctl.sock`.
fn vunet_in(ns: &Netns, dir: &Path, local: &str, remotes: &[&str]) -> vunet_tests::guest::VunetProcess {
    let list: Vec<String> = remotes.iter().map(|r| format!("\"{r}\"")).collect();
    vunet_with(ns, dir, local, &format!("remotes = [{}]", list.join(", ")))
}

/// As [`vunet_in`], with `flood` the uplink's line that says where flooding goes.
fn vunet_with(ns: &Netns, dir: &Path, local: &str, flood: &str) -> vunet_tests::guest::VunetProcess {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"ctl.sock\"\n[[network]]\nname = \"vx\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"vxlan\"\nvni = {VNI}\n\
             local = \"{local}\"\n{flood}\n[[network.port]]\nname = \"vm\"\nsocket = \"vm.sock\"\n"
        ),
    )
    .unwrap();
    ns.vunet(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"))
}

/// `vunet ARGS --json` against the daemon whose control socket is in `dir`.
fn cli_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(vunet_tests::guest::vunet_binary())
        .args(args)
        .args(["--json", "--control"])
        .arg(dir.join("ctl.sock"))
        .output()
        .expect("vunet cli");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// `vunet port-list vx` of the daemon whose control socket is in `dir`: its uplink.
fn uplink_row(dir: &Path) -> serde_json::Value {
    let rows = cli_json(dir, &["port-list", "vx"]);
    rows.as_array().and_then(|r| r.iter().find(|p| p["name"] == format!("uplink:vxlan{VNI}")).cloned()).expect("the uplink row")
}

/// Two hosts (namespaces h1 and h2, and h3 with a third daemon) on one underlay (a kernel
/// bridge in a fourth namespace): a guest on each of h1 and h2 pings the other and runs a few
/// seconds of iperf3; h3, in h1's remotes, receives h1's flooding.
#[test]
fn guests_on_two_daemons_reach_each_other_across_the_tunnel() {
    let _turn = serial();
    let dir = TempDir::new("vxlan-hosts");
    let wire = Netns::new("vxw");
    wire.run("ip link add br0 type bridge && ip link set br0 up");
    let hosts: Vec<Netns> = (1..=3).map(|i| Netns::new(&format!("vxh{i}"))).collect();
    for (i, h) in hosts.iter().enumerate() {
        veth(h, "ul0", &wire, &format!("p{i}"));
        wire.run(&format!("ip link set p{i} master br0"));
        h.run(&format!("ip addr add 10.0.0.{}/24 dev ul0", i + 1));
    }
    let dirs: Vec<_> = (1..=3).map(|i| dir.path().join(format!("h{i}"))).collect();
    let _v1 = vunet_in(&hosts[0], &dirs[0], "10.0.0.1", &["10.0.0.2", "10.0.0.3"]);
    let _v2 = vunet_in(&hosts[1], &dirs[1], "10.0.0.2", &["10.0.0.1"]);
    let _v3 = vunet_in(&hosts[2], &dirs[2], "10.0.0.3", &["10.0.0.1"]);
    let log = |i: usize| std::fs::read_to_string(dirs[i].join("vunet.log")).unwrap_or_default();

    let g2 = Guest::boot(
        "g2",
        &dirs[1],
        &Socket::Connect(dirs[1].join("vm.sock")),
        "52:54:00:00:42:02",
        ",host_mtu=1450",
        &format!(
            "ip addr add 192.168.42.2/24 dev eth0\nip link set eth0 up\niperf3 -s -1 >/dev/null &\n{}wait\necho SERVED\nexit 0\n",
            await_peer("192.168.42.1", 8)
        ),
    );
    let g1 = Guest::boot(
        "g1",
        &dirs[0],
        &Socket::Connect(dirs[0].join("vm.sock")),
        "52:54:00:00:42:01",
        ",host_mtu=1450",
        &format!(
            "ip addr add 192.168.42.1/24 dev eth0\nip link set eth0 up\necho \"MTU $(cat /sys/class/net/eth0/mtu)\"\n{}\
             ping -c 3 -W 5 192.168.42.2 || exit 1\niperf3 -c 192.168.42.2 -t 3 -J > /tmp/i.json || exit 2\ncat /tmp/i.json\nexit 0\n",
            await_peer("192.168.42.2", 8)
        ),
    );
    assert_eq!(g1.wait_exit(BOOT_AND_RUN), Some(0), "g1:\n{}\nh1 vunet:\n{}\nh2 vunet:\n{}", g1.console.text(), log(0), log(1));
    let out = g1.console.text();
    // QEMU offers its own `host_mtu` (it does not read a vhost-user backend's config space);
    // the network's MTU is what to give it.
    assert!(out.contains("MTU 1450"), "the guest's MTU, as QEMU offers it:\n{out}");
    assert!(ping_ok(&out), "g1 pings g2:\n{out}");
    let bps = iperf3_receiver_bps(&out).expect("iperf3 result");
    assert!(bps > 0.0, "iperf3 across the tunnel: {bps} bit/s");
    eprintln!("iperf3 across the vxlan tunnel (TCG guests): {:.1} Mbit/s", bps / 1e6);
    assert_eq!(g2.wait_exit(Duration::from_secs(60)), Some(0), "g2:\n{}", g2.console.text());

    let nets = cli_json(&dirs[0], &["net-list"]);
    assert_eq!(nets[0]["mtu"], 1450, "the network's MTU defaults to the underlay's 1500 minus 50: {nets}");
    // h1 learned g2 behind h2; h3 received h1's flooding (g1's ARP broadcasts) and learned g1.
    let r1 = uplink_row(&dirs[0]);
    let learned = r1["vxlan"]["learned"].as_array().cloned().unwrap_or_default();
    assert!(learned.iter().any(|e| e["mac"] == "52:54:00:00:42:02" && e["remote"] == "10.0.0.2"), "h1's learned endpoints: {r1}");
    assert_eq!(r1["vxlan"]["remotes"], serde_json::json!(["10.0.0.2", "10.0.0.3"]));
    let r3 = uplink_row(&dirs[2]);
    assert!(r3["rx_frames"].as_u64().unwrap_or(0) > 0, "the third daemon received the flooding: {r3}");
    let learned3 = r3["vxlan"]["learned"].as_array().cloned().unwrap_or_default();
    assert!(learned3.iter().any(|e| e["mac"] == "52:54:00:00:42:01" && e["remote"] == "10.0.0.1"), "h3 learned g1 behind h1: {r3}");
}

/// `ethtool -K IFNAME tx off` inside `ns` (the SIOCETHTOOL ioctl; ethtool itself may not be
/// installed). A veth passes a checksum the kernel left for "hardware" to the other namespace
/// as it is, and the kernel's vxlan device leaves its inner TCP checksums so: with transmit
/// checksumming off the veth completes them, as a real NIC would on the wire.
fn tx_checksum_off(ns: &Netns, ifname: &str) {
    let (name, ifname) = (ns.name.clone(), ifname.to_string());
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns file");
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_STXCSUM: u32 = 0x17;
        let mut v = EthtoolValue { cmd: ETHTOOL_STXCSUM, data: 0 };
        let mut r = IfReq { name: [0; 16], data: &mut v, _pad: [0; 16] };
        r.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        // SAFETY: setns moves only this thread; the ioctl reads an ifreq pointing at `v`.
        unsafe {
            assert_eq!(libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(s >= 0);
            assert_eq!(libc::ioctl(s, SIOCETHTOOL, &mut r), 0, "ETHTOOL_STXCSUM: {}", std::io::Error::last_os_error());
            libc::close(s);
        }
    })
    .join()
    .expect("ethtool thread");
}

/// vunet on one side, the Linux kernel's vxlan device on the other (`ip link add vx0 type
/// vxlan id 42 dstport 4789 local ... remote ...`, addressed): the kernel side pings vunet's
/// guest and the guest pings it, and iperf3 runs both ways.
#[test]
fn a_guest_reaches_a_kernel_vxlan_device_both_ways() {
    let _turn = serial();
    let dir = TempDir::new("vxlan-kernel");
    let h = Netns::new("vxkh");
    let k = Netns::new("vxkk");
    veth(&h, "ul0", &k, "kl0");
    h.run("ip addr add 10.0.0.1/24 dev ul0");
    k.run("ip addr add 10.0.0.2/24 dev kl0");
    tx_checksum_off(&k, "kl0");
    k.run(&format!("ip link add vx0 type vxlan id {VNI} dstport 4789 local 10.0.0.2 remote 10.0.0.1 dev kl0"));
    k.run("ip addr add 192.168.42.9/24 dev vx0 && ip link set vx0 up");
    let _iperf = k.spawn("iperf3 -s");
    let hdir = dir.path().join("h");
    let _v = vunet_in(&h, &hdir, "10.0.0.1", &["10.0.0.2"]);
    let log = || std::fs::read_to_string(hdir.join("vunet.log")).unwrap_or_default();
    let g = Guest::boot(
        "g",
        &hdir,
        &Socket::Connect(hdir.join("vm.sock")),
        "52:54:00:00:42:01",
        "",
        &format!(
            "ip addr add 192.168.42.1/24 dev eth0\nip link set eth0 up\n{}ping -c 3 -W 5 192.168.42.9 || exit 1\n\
             iperf3 -c 192.168.42.9 -t 2 || exit 2\niperf3 -c 192.168.42.9 -t 2 -R || exit 3\necho GUEST-DONE\nsleep 120\n",
            await_peer("192.168.42.9", 8)
        ),
    );
    assert!(g.console.wait_for("GUEST-DONE", BOOT_AND_RUN), "guest:\n{}\nvunet:\n{}", g.console.text(), log());
    let out = g.console.text();
    assert!(ping_ok(&out), "the guest pings the kernel's vx0:\n{out}");
    assert_eq!(out.matches("receiver").count(), 2, "iperf3 ran to and from the kernel side:\n{out}");
    let ping = k.try_run("busybox ping -c 3 -W 5 192.168.42.1");
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(ping_ok(&text), "the kernel side pings the guest:\n{text}\nvunet:\n{}", log());
    // The kernel learned the guest's MAC behind vunet's address.
    let fdb = k.run("bridge fdb show dev vx0");
    assert!(fdb.contains("52:54:00:00:42:01 dst 10.0.0.1"), "the kernel's vxlan FDB: {fdb}");
}

/// The same with multicast flooding on both sides (`group 239.1.1.1` on the kernel's device,
/// `group = "239.1.1.1"` and no `remotes` on vunet's uplink): the first ARP each way goes to
/// the group, the rest is learned unicast.
#[test]
fn a_guest_reaches_a_kernel_vxlan_device_over_a_multicast_group() {
    let _turn = serial();
    let dir = TempDir::new("vxlan-mcast");
    let h = Netns::new("vxmh");
    let k = Netns::new("vxmk");
    veth(&h, "ul0", &k, "kl0");
    h.run("ip addr add 10.0.0.1/24 dev ul0");
    k.run("ip addr add 10.0.0.2/24 dev kl0");
    k.run(&format!("ip link add vx0 type vxlan id {VNI} dstport 4789 local 10.0.0.2 group 239.1.1.1 dev kl0"));
    k.run("ip addr add 192.168.42.9/24 dev vx0 && ip link set vx0 up");
    let hdir = dir.path().join("h");
    let _v = vunet_with(&h, &hdir, "10.0.0.1", "group = \"239.1.1.1\"");
    let log = || std::fs::read_to_string(hdir.join("vunet.log")).unwrap_or_default();
    let g = Guest::boot(
        "g",
        &hdir,
        &Socket::Connect(hdir.join("vm.sock")),
        "52:54:00:00:42:01",
        "",
        &format!(
            "ip addr add 192.168.42.1/24 dev eth0\nip link set eth0 up\n{}ping -c 3 -W 5 192.168.42.9 || exit 1\necho GUEST-DONE\nsleep 120\n",
            await_peer("192.168.42.9", 8)
        ),
    );
    assert!(g.console.wait_for("GUEST-DONE", BOOT_AND_RUN), "guest:\n{}\nvunet:\n{}", g.console.text(), log());
    assert!(ping_ok(&g.console.text()), "the guest pings the kernel's vx0:\n{}", g.console.text());
    // A fresh neighbour entry on the kernel side: its ARP request goes to the group again.
    k.run("ip neigh flush dev vx0");
    let ping = k.try_run("busybox ping -c 3 -W 5 192.168.42.1");
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(ping_ok(&text), "the kernel side pings the guest:\n{text}\nvunet:\n{}", log());
    let r = uplink_row(&hdir);
    let learned = r["vxlan"]["learned"].as_array().cloned().unwrap_or_default();
    assert!(learned.iter().any(|e| e["remote"] == "10.0.0.2"), "vunet learned the kernel's vx0 behind its address: {r}");
    assert_eq!(r["vxlan"]["group"], "239.1.1.1");
}

/// Open vSwitch's userspace datapath (`datapath_type=netdev`: this kernel has no openvswitch
/// module) with a vxlan port (`options:key=42 options:remote_ip=...`) on the other side, and a
/// tap port of vunet's network addressed on the host: ping both ways. OVS checks the outer UDP
/// checksum of what it decapsulates, so this also shows vunet's is right (zero, as RFC 7348
/// recommends: a veth would hand on a "partial" one unfilled).
#[test]
fn open_vswitch_with_a_vxlan_port_and_vunet_ping_both_ways() {
    let dir = TempDir::new("vxlan-ovs");
    let h = Netns::new("vxoh");
    let o = Netns::new("vxoo");
    veth(&h, "ul0", &o, "kl0");
    h.run("ip addr add 10.0.0.1/24 dev ul0");
    // A private OVS: its database, sockets and logs in the test's directory.
    let run = dir.path().join("ovs");
    std::fs::create_dir_all(&run).unwrap();
    let r = run.display();
    let env = format!("env OVS_RUNDIR={r} OVS_DBDIR={r} OVS_LOGDIR={r} OVS_SYSCONFDIR={r}");
    o.run(&format!("ovsdb-tool create {r}/conf.db /usr/share/openvswitch/vswitch.ovsschema"));
    let _db =
        o.spawn(&format!("{env} ovsdb-server {r}/conf.db --remote=punix:{r}/db.sock --pidfile={r}/ovsdb.pid --log-file={r}/ovsdb.log"));
    assert!(wait_until(T, || run.join("db.sock").exists()), "ovsdb-server did not start");
    let vsctl = format!("{env} ovs-vsctl --db=unix:{r}/db.sock --timeout=60");
    o.run(&format!("{vsctl} --no-wait init"));
    let _vswitchd = o.spawn(&format!("{env} ovs-vswitchd unix:{r}/db.sock --pidfile={r}/vswitchd.pid --log-file={r}/vswitchd.log"));
    // Each ovs-vsctl waits until ovs-vswitchd has applied it.
    o.run(&format!("{vsctl} add-br br-phy -- set bridge br-phy datapath_type=netdev -- add-port br-phy kl0"));
    o.run("ip addr add 10.0.0.2/24 dev br-phy && ip link set br-phy up");
    o.run(&format!(
        "{vsctl} add-br br-int -- set bridge br-int datapath_type=netdev \
         -- add-port br-int vx42 -- set interface vx42 type=vxlan options:key={VNI} options:remote_ip=10.0.0.1 \
         -- add-port br-int int0 -- set interface int0 type=internal"
    ));
    o.run("ip addr add 192.168.42.9/24 dev int0 && ip link set int0 up && ip link set br-int up");

    let hdir = dir.path().join("h");
    std::fs::create_dir_all(&hdir).unwrap();
    let cfg = hdir.join("vunet.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"ctl.sock\"\n[[network]]\nname = \"vx\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"vxlan\"\nvni = {VNI}\n\
             local = \"10.0.0.1\"\nremotes = [\"10.0.0.2\"]\n[[network.port]]\nname = \"host\"\nkind = \"tap\"\ninterface = \"vuhost0\"\n"
        ),
    )
    .unwrap();
    let _v = h.vunet(&["--config", cfg.to_str().unwrap()], &hdir.join("vunet.log"));
    h.run("ip addr add 192.168.42.1/24 dev vuhost0 && ip link set vuhost0 up");
    let log = || {
        format!(
            "vunet:\n{}\novs-vswitchd:\n{}",
            std::fs::read_to_string(hdir.join("vunet.log")).unwrap_or_default(),
            std::fs::read_to_string(run.join("vswitchd.log")).unwrap_or_default()
        )
    };
    let ping = |ns: &Netns, ip: &str| String::from_utf8_lossy(&ns.try_run(&format!("busybox ping -c 3 -W 3 {ip}")).stdout).into_owned();
    // The first pings may go while OVS sets up its datapath flows: retried until 3 of 3 answer.
    let mut out = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            out = ping(&h, "192.168.42.9");
            ping_ok(&out)
        }),
        "vunet's side pings OVS's int0:\n{out}\n{}",
        log()
    );
    let back = ping(&o, "192.168.42.1");
    assert!(ping_ok(&back), "OVS's side pings vunet's tap port:\n{back}\n{}", log());
    let r = uplink_row(&hdir);
    let learned = r["vxlan"]["learned"].as_array().cloned().unwrap_or_default();
    assert!(learned.iter().any(|e| e["remote"] == "10.0.0.2"), "vunet learned int0's MAC behind OVS's address: {r}");
}
