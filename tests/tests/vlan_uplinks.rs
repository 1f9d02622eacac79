//! VLANs over an af-packet uplink, driven by simulated guests: a "host" namespace where vunet
//! runs and a "LAN" namespace joined to it by a veth pair. The LAN sends tagged and untagged
//! frames from a packet socket and captures with tshark (this test machine's kernel has no
//! 8021q for VLAN sub-interfaces; on the wire it is the same). The kernel takes the tag out of
//! what vunet's packet socket receives: these tests show vunet puts it back (PACKET_AUXDATA).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use vunet_tests::guest::VunetProcess;
use vunet_tests::netns::{veth, Background, Netns};
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);
/// The LAN station's source MAC: frames from it are told apart from whatever else the LAN
/// namespace's kernel sends (IPv6 neighbour discovery and the like).
const LAN: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
const BCAST: [u8; 6] = [0xff; 6];

fn namespaces(tag: &str) -> (Netns, Netns) {
    let host = Netns::new(&format!("{tag}-h"));
    let lan = Netns::new(&format!("{tag}-l"));
    veth(&host, "up0", &lan, "lan0");
    (host, lan)
}

/// A bridged network `lan` with an af-packet uplink on `up0` (plus `uplink` TOML lines) and
/// the guest ports `ports` (name, TOML lines).
fn start(host: &Netns, dir: &Path, uplink: &str, ports: &[(&str, &str)]) -> (VunetProcess, Vec<VmSim>) {
    let mut toml =
        format!("[[network]]\nname = \"lan\"\nmode = \"bridge\"\n[network.uplink]\nkind = \"af-packet\"\ninterface = \"up0\"\n{uplink}\n");
    for (name, extra) in ports {
        toml.push_str(&format!("[[network.port]]\nname = \"{name}\"\nsocket = \"{name}.sock\"\n{extra}\n"));
    }
    let cfg = dir.join("vunet.toml");
    std::fs::write(&cfg, toml).unwrap();
    let v = host.vunet(&["--config", cfg.to_str().unwrap()], &dir.join("vunet.log"));
    let vms = ports
        .iter()
        .map(|(name, _)| {
            let mut vm = VmSim::connect(&dir.join(format!("{name}.sock")), SimOptions::full()).unwrap();
            vm.post_rx(QUEUE_SIZE);
            assert!(v.wait_connected(name, 1, T), "{}", v.console.text());
            vm
        })
        .collect();
    assert!(v.console.wait_for("uplink af-packet up0 ready", T), "{}", v.console.text());
    (v, vms)
}

fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend(0x8100u16.to_be_bytes());
    f.extend(vid.to_be_bytes());
    f.extend(&frame[12..]);
    f
}

/// The frames from the LAN station a guest got, by their first payload byte.
fn from_lan(vm: &mut VmSim) -> Vec<Vec<u8>> {
    vm.recv_all(QUIET).into_iter().map(|(_, f)| f).filter(|f| f[6..12] == LAN).collect()
}

/// Sends `frames` from the LAN station until every guest got one (right after a simulated
/// guest connects, its port may not have published its receive ring yet: a frame then is
/// dropped as port_down), and returns the distinct frames each guest got.
fn lan_to_guests(lan: &Netns, vms: &mut [VmSim], frames: &[Vec<u8>]) -> Vec<BTreeSet<Vec<u8>>> {
    let mut got = vec![BTreeSet::new(); vms.len()];
    let deadline = std::time::Instant::now() + T;
    while got.iter().any(|g| g.is_empty()) && std::time::Instant::now() < deadline {
        lan.send_raw("lan0", frames);
        for (g, vm) in got.iter_mut().zip(vms.iter_mut()) {
            g.extend(from_lan(vm));
        }
    }
    got
}

/// tshark on the LAN side, printing source MAC and VLAN ID of each frame of EtherType 0x88b5
/// (tagged or not), once it is capturing.
fn capture(lan: &Netns) -> Background {
    let t = lan.spawn("tshark -i lan0 -l -n -T fields -e eth.src -e vlan.id -Y 'eth.type == 0x88b5 || vlan.etype == 0x88b5'");
    // "Capturing on" comes before dumpcap listens; "Capture started" once it does (a frame
    // sent between the two is missed).
    assert!(t.console.wait_for("Capture started", Duration::from_secs(30)), "tshark starts:\n{}", t.console.text());
    t
}

#[test]
fn trunk_uplink_carries_the_listed_vlans_tagged_to_the_right_guests() {
    let (host, lan) = namespaces("vltr");
    let dir = TempDir::new("vlan-trunk-uplink");
    let (_v, mut vms) = start(&host, dir.path(), "trunk = [10, 20]", &[("g10", "vlan = 10"), ("g20", "vlan = 20"), ("g0", "")]);

    // LAN -> guests: each VLAN to its guest, untagged; VLAN 30 to nobody.
    let f = |marker: u8| eth_frame(BCAST, LAN, 0x88b5, 50, marker);
    let got = lan_to_guests(&lan, &mut vms, &[tagged(&f(10), 10), tagged(&f(20), 20), tagged(&f(30), 30), f(0)]);
    assert_eq!(got[0], BTreeSet::from([f(10)]), "g10 gets VLAN 10's frame, untagged");
    assert_eq!(got[1], BTreeSet::from([f(20)]), "g20 gets VLAN 20's frame, untagged");
    assert_eq!(got[2], BTreeSet::from([f(0)]), "the untagged guest gets the untagged frame");

    // Guests -> LAN: tagged with their VLAN, the untagged guest's frame untagged.
    let cap = capture(&lan);
    let macs = [[0x52, 0x54, 0, 0, 0, 0x10], [0x52, 0x54, 0, 0, 0, 0x20], [0x52, 0x54, 0, 0, 0, 0x00]];
    for (vm, mac) in vms.iter_mut().zip(macs) {
        vm.send(&eth_frame(BCAST, mac, 0x88b5, 50, 1));
    }
    for want in ["52:54:00:00:00:10\t10", "52:54:00:00:00:20\t20"] {
        assert!(cap.console.wait_for(want, T), "the LAN sees {want:?}:\n{}", cap.console.text());
    }
    assert!(cap.console.wait_until(|t| t.lines().any(|l| l.trim_end() == "52:54:00:00:00:00"), T), "untagged:\n{}", cap.console.text());
    // Nothing else: no frame with another tag (or untagged from a VLAN guest).
    let seen: std::collections::BTreeSet<String> =
        cap.console.text().lines().filter(|l| l.starts_with("52:54")).map(|l| l.trim_end().to_string()).collect();
    assert_eq!(seen.len(), 3, "{}", cap.console.text());
}

#[test]
fn uplink_vlan_makes_the_network_one_vlan_of_the_lan() {
    let (host, lan) = namespaces("vl100");
    let dir = TempDir::new("vlan-outer-uplink");
    let (_v, mut vms) = start(&host, dir.path(), "vlan = 100", &[("g", "")]);

    // Only VLAN 100 comes in, untagged; untagged LAN frames and other VLANs do not.
    let f = |marker: u8| eth_frame(BCAST, LAN, 0x88b5, 50, marker);
    let got = lan_to_guests(&lan, &mut vms, &[f(0), tagged(&f(101), 101), tagged(&f(100), 100)]);
    assert_eq!(got[0], BTreeSet::from([f(100)]), "only VLAN 100's frame, untagged");

    // What the guest sends leaves tagged 100.
    let cap = capture(&lan);
    vms[0].send(&eth_frame(BCAST, [0x52, 0x54, 0, 0, 0, 0x01], 0x88b5, 50, 1));
    assert!(cap.console.wait_for("52:54:00:00:00:01\t100", T), "tagged 100 on the LAN:\n{}", cap.console.text());
}
