//! VLANs driven by simulated guests: access and trunk ports (native VLAN too), tags inserted,
//! stripped and rewritten per receiver, learning and flooding per VLAN, TSO frames across a
//! tag change, and the frames that are dropped and counted (a tag on an access port, a VLAN
//! a trunk does not carry, VID 4095, a truncated tag).

use std::time::Duration;

use vunet_switch::vnet::VnetHeader;
use vunet_switch::DropReason;
use vunet_tests::*;

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xc];
const D: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xd];
const BCAST: [u8; 6] = [0xff; 6];
const T: Duration = Duration::from_secs(10);
/// Silence that shows a frame did NOT arrive.
const QUIET: Duration = Duration::from_millis(400);

/// Ports: `acc10a`, `acc10b` (access 10), `acc20` (access 20), `trunk` (10 and 20, untagged
/// frames on the network's untagged VLAN), `plain` (no VLAN keys), `native` (trunk 20 with
/// native VLAN 10, which leaves untagged).
const PORTS: [(&str, &str); 6] = [
    ("acc10a", "vlan = 10"),
    ("acc10b", "vlan = 10"),
    ("acc20", "vlan = 20"),
    ("trunk", "trunk = [10, 20]"),
    ("plain", ""),
    ("native", "trunk = [20]\nnative_vlan = 10"),
];

fn start(dir: &std::path::Path, opts: &[SimOptions; 6]) -> (vunet::Daemon, Vec<VmSim>) {
    let mut toml = "[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n".to_string();
    for (name, extra) in PORTS {
        toml.push_str(&format!("[[network.port]]\nname = \"{name}\"\nsocket = \"{name}.sock\"\nport_security = false\n{extra}\n"));
    }
    let cfg = vunet::Config::parse(&toml, "test.toml", dir).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    let vms = PORTS
        .iter()
        .zip(opts)
        .map(|((name, _), o)| {
            let mut vm = VmSim::connect(&dir.join(format!("{name}.sock")), o.clone()).expect("connect");
            vm.post_rx(QUEUE_SIZE);
            vm
        })
        .collect();
    wait_network_ready(&d, "test");
    (d, vms)
}

/// `frame` with an 802.1Q tag (TCI `tci`) after its MAC addresses.
fn tagged(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend(0x8100u16.to_be_bytes());
    f.extend(tci.to_be_bytes());
    f.extend(&frame[12..]);
    f
}

/// Asserts that exactly the ports `want` (index, expected frame) get a frame, the others none.
fn expect(vms: &mut [VmSim], want: &[(usize, Vec<u8>)], what: &str) {
    for (i, f) in want {
        let got = vms[*i].recv(T).unwrap_or_else(|| panic!("{what}: port {} gets the frame", PORTS[*i].0)).1;
        assert_eq!(&got, f, "{what}: what port {} gets", PORTS[*i].0);
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        assert!(vm.recv(QUIET).is_none(), "{what}: port {} gets nothing (more)", PORTS[i].0);
    }
}

fn drops(d: &vunet::Daemon, port: &str, r: DropReason) -> u64 {
    port_counters(d, "test", port).drop_count(r)
}

#[test]
fn access_and_trunk_ports_tag_untag_and_learn_per_vlan() {
    let dir = TempDir::new("vlan-modes");
    let (_d, mut vms) = start(dir.path(), &std::array::from_fn(|_| SimOptions::full()));
    let (acc10a, acc10b, acc20, trunk, plain, native) = (0, 1, 2, 3, 4, 5);

    // A broadcast from an access port of VLAN 10: untagged to the other VLAN 10 access port and
    // to the trunk whose native VLAN is 10, tagged to the trunk; not to VLAN 20 nor untagged.
    let bc = eth_frame(BCAST, A, 0x0800, 60, 1);
    vms[acc10a].send(&bc);
    expect(&mut vms, &[(acc10b, bc.clone()), (trunk, tagged(&bc, 10)), (native, bc.clone())], "VLAN 10 broadcast");

    // Tagged 20 from the trunk: untagged to the VLAN 20 access port, tagged to the native trunk.
    let bc20 = eth_frame(BCAST, C, 0x0800, 60, 2);
    vms[trunk].send(&tagged(&bc20, 20));
    expect(&mut vms, &[(acc20, bc20.clone()), (native, tagged(&bc20, 20))], "VLAN 20 broadcast from the trunk");

    // Untagged from the trunk: the network's untagged VLAN, where the plain port is.
    let bc0 = eth_frame(BCAST, C, 0x0800, 60, 3);
    vms[trunk].send(&bc0);
    expect(&mut vms, &[(plain, bc0.clone())], "untagged broadcast from the trunk");

    // Untagged from the native trunk is VLAN 10.
    let bcn = eth_frame(BCAST, D, 0x0800, 60, 4);
    vms[native].send(&bcn);
    expect(&mut vms, &[(acc10a, bcn.clone()), (acc10b, bcn.clone()), (trunk, tagged(&bcn, 10))], "native VLAN broadcast");

    // Learned per VLAN: A is on acc10a in VLAN 10; B answers A from acc10b: only A's port.
    let ba = eth_frame(A, B, 0x0800, 80, 5);
    vms[acc10b].send(&ba);
    expect(&mut vms, &[(acc10a, ba.clone())], "learned unicast in VLAN 10");
    // The trunk sends to A in VLAN 10: learned, to acc10a only, untagged.
    let ca = eth_frame(A, C, 0x0800, 80, 6);
    vms[trunk].send(&tagged(&ca, 10));
    expect(&mut vms, &[(acc10a, ca.clone())], "trunk to a learned MAC of VLAN 10");
    // In VLAN 20, A is unknown: flooded within VLAN 20 only.
    vms[trunk].send(&tagged(&ca, 20));
    expect(&mut vms, &[(acc20, ca.clone()), (native, tagged(&ca, 20))], "A is unknown in VLAN 20");
    // A appearing in VLAN 20 (on acc20) does not move A of VLAN 10.
    let a20 = eth_frame(BCAST, A, 0x0800, 60, 7);
    vms[acc20].send(&a20);
    expect(&mut vms, &[(trunk, tagged(&a20, 20)), (native, tagged(&a20, 20))], "A in VLAN 20");
    vms[acc10b].send(&ba);
    expect(&mut vms, &[(acc10a, ba.clone())], "A of VLAN 10 stays on acc10a");
}

#[test]
fn port_list_shows_each_ports_vlans() {
    let dir = TempDir::new("vlan-list");
    let (d, _vms) = start(dir.path(), &std::array::from_fn(|_| SimOptions::full()));
    let req = vunet::control::Request::PortList { network: "test".into() };
    let v = vunet::control::answer(vunet::control::Request::PortList { network: "test".into() }, &d.shared).expect("port-list");
    let vlans: Vec<&str> = v.as_array().unwrap().iter().map(|p| p["vlan"].as_str().unwrap()).collect();
    assert_eq!(vlans, ["access 10", "access 10", "access 20", "trunk 10,20", "untagged", "trunk 20 native 10"]);
    let text = vunet::control::render(&req, &v);
    assert!(text.contains("  vlan: trunk 20 native 10\n") && text.matches("  vlan: ").count() == 5, "{text}");
}

#[test]
fn bad_and_disallowed_tags_are_dropped_and_counted() {
    let dir = TempDir::new("vlan-drops");
    let (d, mut vms) = start(dir.path(), &std::array::from_fn(|_| SimOptions::full()));
    let (acc10a, acc10b, trunk, plain) = (0, 1, 3, 4);
    let f = eth_frame(BCAST, A, 0x0800, 60, 1);

    // An access port takes no tags, not even its own VLAN's.
    vms[acc10a].send(&tagged(&f, 10));
    vms[acc10a].send(&tagged(&f, 20));
    // A trunk takes its VLANs only; 4095 is reserved; a tag cut short is no tag.
    vms[trunk].send(&tagged(&f, 30));
    vms[trunk].send(&tagged(&f, 4095));
    vms[trunk].send(&tagged(&f, 10)[..16]);
    // An outer tag of a VLAN the trunk does not carry, over one it does: the outer one decides.
    vms[trunk].send(&tagged(&tagged(&f, 10), 30));
    expect(&mut vms, &[], "nothing passes");
    assert!(wait_until(T, || drops(&d, "acc10a", DropReason::VlanNotAllowed) == 2));
    assert!(wait_until(T, || drops(&d, "trunk", DropReason::VlanNotAllowed) == 2));
    assert_eq!(drops(&d, "trunk", DropReason::BadVlanTag), 2);

    // Double-tagged with the trunk's VLAN outside: VLAN 10, the inner tag is payload.
    vms[trunk].send(&tagged(&tagged(&f, 30), 10));
    expect(&mut vms, &[(acc10a, tagged(&f, 30)), (acc10b, tagged(&f, 30)), (5, tagged(&f, 30))], "double-tagged");

    // A priority tag (VID 0) is untagged: on the trunk, the untagged VLAN, and the tag goes.
    vms[trunk].send(&tagged(&f, 0xa000));
    expect(&mut vms, &[(plain, f.clone())], "priority-tagged from the trunk");
    // From an access port it is that port's VLAN; to the trunk its VID becomes 10, the
    // priority stays.
    vms[acc10a].send(&tagged(&f, 0xa000));
    expect(&mut vms, &[(acc10b, f.clone()), (trunk, tagged(&f, 0xa000 | 10)), (5, f.clone())], "priority-tagged from an access port");

    // A plain port's tags are its guest's business: passed on as they are, on the untagged VLAN.
    vms[plain].send(&tagged(&f, 10));
    expect(&mut vms, &[(trunk, tagged(&f, 10))], "tags from a port without VLANs are payload");

    // A tagged frame of a full-size payload (MTU 1500) passes and arrives whole, untagged.
    let full = eth_frame(BCAST, B, 0x0800, 1500, 9);
    vms[trunk].send(&tagged(&full, 10));
    expect(&mut vms, &[(acc10a, full.clone()), (acc10b, full.clone()), (5, full.clone())], "full-size tagged frame");
    assert_eq!(port_counters(&d, "test", "trunk").drop_count(DropReason::Oversize), 0);
    // And the other way: a full-size frame from an access port reaches the trunk tagged, 1518
    // bytes.
    let full = eth_frame(BCAST, A, 0x0800, 1500, 10);
    vms[acc10a].send(&full);
    expect(&mut vms, &[(acc10b, full.clone()), (trunk, tagged(&full, 10)), (5, full.clone())], "full-size frame tagged on the way");
    assert_eq!(port_counters(&d, "test", "trunk").total_drops(), 4, "only the four refused above");
}

#[test]
fn gateway_serves_the_untagged_vlan_only() {
    let dir = TempDir::new("vlan-gw");
    let (_d, mut vms) = start(dir.path(), &std::array::from_fn(|_| SimOptions::full()));
    let trunk = 3;
    // An ARP request for the gateway's address.
    let mut arp = eth_frame(BCAST, C, 0x0806, 0, 0);
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend(C);
    arp.extend([10, 0, 0, 9]);
    arp.extend([0; 6]);
    arp.extend([10, 0, 0, 1]);
    vms[trunk].send(&tagged(&arp, 10));
    let answers =
        |vm: &mut VmSim| vm.recv_all(QUIET).into_iter().filter(|(_, f)| f.len() >= 42 && f[12..14] == [8, 6] && f[21] == 2).count();
    assert_eq!(answers(&mut vms[trunk]), 0, "no gateway on VLAN 10");
    vms[trunk].send(&arp);
    let (_, reply) = vms[trunk].recv(T).expect("the gateway answers on the untagged VLAN");
    assert_eq!((&reply[12..14], reply[21], &reply[0..6]), (&[8u8, 6][..], 2, &C[..]), "an untagged ARP reply to C");
}

#[test]
fn tso_frames_keep_their_offsets_across_a_tag_change() {
    let dir = TempDir::new("vlan-tso");
    let mut opts: [SimOptions; 6] = std::array::from_fn(|_| SimOptions::full());
    opts[1] = SimOptions::no_offloads();
    let (_d, mut vms) = start(dir.path(), &opts);
    let (acc10a, acc10b, trunk, native) = (0, 1, 3, 5);

    // Tagged TSO frame from the trunk: untagged for access ports, offsets 4 bytes earlier.
    let (hdr, frame) = tso_frame(C, BCAST, 20000);
    let shifted = VnetHeader { csum_start: hdr.csum_start + 4, hdr_len: hdr.hdr_len + 4, ..hdr };
    vms[trunk].send_with(&shifted, &tagged(&frame, 10), true);
    let (h, got) = vms[acc10a].recv(T).expect("TSO guest gets one frame");
    assert_eq!(got, frame, "untagged, whole");
    assert_eq!((h.gso_type, h.gso_size, h.csum_start, h.csum_offset, h.hdr_len), (hdr.gso_type, 1448, 34, 16, 66));
    let (_, got) = vms[native].recv(T).expect("native trunk gets it");
    assert_eq!(got, frame);
    // A guest without offloads gets it segmented, untagged: IPv4 at offset 14.
    let segs = vms[acc10b].recv_all(QUIET);
    assert_eq!(segs.len(), 20000_usize.div_ceil(1448));
    assert!(segs.iter().all(|(h, f)| h.gso_type == 0 && f[12..14] == [8, 0] && f.len() <= 1514));
    assert_eq!(segs.iter().map(|(_, f)| f.len() - 54).sum::<usize>(), 20000);

    // Untagged TSO frame from an access port: tagged for the trunk, offsets 4 bytes later.
    let (hdr, frame) = tso_frame(A, BCAST, 20000);
    vms[acc10a].send_with(&hdr, &frame, true);
    let (h, got) = vms[trunk].recv(T).expect("trunk gets one frame");
    assert_eq!(got, tagged(&frame, 10));
    assert_eq!((h.csum_start, h.csum_offset, h.hdr_len, h.gso_size), (38, 16, 70, 1448));
    let _ = vms.iter_mut().map(|v| v.recv_all(QUIET)).count();
}
