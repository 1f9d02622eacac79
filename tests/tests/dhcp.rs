//! vunet's DHCP server seen from simulated guests: the exchange on the wire, static hosts, and
//! leases that survive a restart (and a corrupt lease file that does not stop one).

use std::net::Ipv4Addr;
use std::time::Duration;

use vunet_dhcp::message::{build_client_message, reply_options, reply_type, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, udp_payload};
use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DHCP: &str = "[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\nhosts = [{ mac = \"52:54:00:00:00:10\", ip = \"10.0.0.10\", name = \"web\" }]\n";

/// Sends a DHCP message from `vm` (MAC `mac`) and returns the reply's DHCP payload.
fn exchange(vm: &mut VmSim, mac: [u8; 6], t: MessageType, requested: Option<Ipv4Addr>, server: Option<Ipv4Addr>) -> Option<Vec<u8>> {
    let msg = build_client_message(t, mac, 0x1234, requested, server, Some("guest"));
    let mut frame = Vec::new();
    build_udp(&mut frame, mac, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
    vm.send(&frame);
    loop {
        let (_, f) = vm.recv(T)?;
        if let Some((src, payload)) = udp_payload(&f, CLIENT_PORT) {
            assert_eq!(src, GW);
            assert!(f[0..6] == mac || f[0..6] == [0xff; 6], "to the client's MAC, or broadcast (NAK)");
            return Some(payload.to_vec());
        }
    }
}

fn lease(vm: &mut VmSim, mac: [u8; 6]) -> Ipv4Addr {
    let offer = exchange(vm, mac, MessageType::Discover, None, None).expect("OFFER");
    assert_eq!(reply_type(&offer), Some(MessageType::Offer));
    let ip = reply_yiaddr(&offer).unwrap();
    let ack = exchange(vm, mac, MessageType::Request, Some(ip), Some(GW)).expect("ACK");
    assert_eq!(reply_type(&ack), Some(MessageType::Ack));
    assert_eq!(reply_yiaddr(&ack), Some(ip));
    ip
}

#[test]
fn guests_get_addresses_from_the_range_and_static_hosts_their_own() {
    let dir = TempDir::new("dhcp");
    let (d, socks) = start_network_with(dir.path(), 3, "", DHCP);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    for vm in vms.iter_mut() {
        vm.post_rx(QUEUE_SIZE);
    }
    wait_network_ready(&d, "test");
    let a = lease(&mut vms[0], [0x52, 0x54, 0, 0, 0, 1]);
    let b = lease(&mut vms[1], [0x52, 0x54, 0, 0, 0, 2]);
    assert_ne!(a, b);
    for ip in [a, b] {
        assert!((Ipv4Addr::new(10, 0, 0, 100)..=Ipv4Addr::new(10, 0, 0, 150)).contains(&ip), "{ip} in the range");
    }
    let web = [0x52, 0x54, 0, 0, 0, 0x10];
    assert_eq!(lease(&mut vms[2], web), Ipv4Addr::new(10, 0, 0, 10));
    let offer = exchange(&mut vms[2], web, MessageType::Discover, None, None).unwrap();
    let opts = reply_options(&offer);
    assert!(opts.contains(&(12, b"web".to_vec())), "static name: {opts:?}");
    assert!(opts.contains(&(1, vec![255, 255, 255, 0])));
    assert!(!opts.iter().any(|(c, _)| *c == 3), "isolated: no router");
    assert!(opts.contains(&(6, GW.octets().to_vec())), "the gateway is the DNS server: {opts:?}");
    // A request for an address that is not the client's is refused.
    let nak = exchange(&mut vms[0], [0x52, 0x54, 0, 0, 0, 1], MessageType::Request, Some(Ipv4Addr::new(10, 0, 0, 10)), None).unwrap();
    assert_eq!(reply_type(&nak), Some(MessageType::Nak));
}

#[test]
fn leases_survive_a_restart_and_a_corrupt_file_does_not_stop_one() {
    let dir = TempDir::new("dhcp-restart");
    let state = dir.path().join("state");
    let top = format!("state_dir = \"{}\"", state.display());
    let mac = [0x52, 0x54, 0, 0, 0, 0x33];
    let first = {
        let sub = dir.path().join("one");
        std::fs::create_dir_all(&sub).unwrap();
        let (d, socks) = start_network_with(&sub, 2, &top, DHCP);
        let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
        vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
        wait_network_ready(&d, "test");
        // Two leases, so the second MAC does not simply get the first free address.
        lease(&mut vms[0], [0x52, 0x54, 0, 0, 0, 0x32]);
        lease(&mut vms[1], mac)
    };
    // Saved by the lease writer's thread, moments after the ACK (the guest does not wait for
    // the disk).
    let saved = || std::fs::read_to_string(state.join("test.leases")).unwrap_or_default();
    assert!(wait_until(T, || saved().contains(&first.to_string())), "lease file written: {}", saved());
    // The leases name every guest: for vunet's user only.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&state), mode(&state.join("test.leases"))), (0o700, 0o600));

    // "Restart": a new daemon with the same state_dir, fresh sockets. The lease comes back,
    // and a different client does not get that address.
    let sub = dir.path().join("two");
    std::fs::create_dir_all(&sub).unwrap();
    let (d2, socks) = start_network_with(&sub, 2, &top, DHCP);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
    wait_network_ready(&d2, "test");
    let other = lease(&mut vms[0], [0x52, 0x54, 0, 0, 0, 0x99]);
    assert_ne!(other, first);
    assert_eq!(lease(&mut vms[1], mac), first, "same address after the restart");
    // What the writer's thread has not saved yet is saved now (as at exit), so it cannot
    // overwrite the damage done below.
    assert_eq!(d2.save_leases(), Vec::<String>::new());

    // A truncated lease file is set aside, and vunet still starts and serves.
    let text = std::fs::read_to_string(state.join("test.leases")).unwrap();
    std::fs::write(state.join("test.leases"), &text[..text.len() / 2]).unwrap();
    let sub = dir.path().join("three");
    std::fs::create_dir_all(&sub).unwrap();
    let (d3, socks) = start_network_with(&sub, 1, &top, DHCP);
    assert!(state.join("test.leases.corrupt").exists(), "corrupt file set aside");
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    wait_network_ready(&d3, "test");
    lease(&mut vm, mac);
}

#[test]
fn a_stopped_network_has_saved_its_leases() {
    let dir = TempDir::new("dhcp-stop");
    let state = dir.path().join("state");
    let (d, socks) = start_network_with(dir.path(), 2, &format!("state_dir = \"{}\"", state.display()), DHCP);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
    wait_network_ready(&d, "test");
    // The second lease comes while the writer waits out its interval after the first.
    lease(&mut vms[0], [0x52, 0x54, 0, 0, 0, 0x41]);
    let second = lease(&mut vms[1], [0x52, 0x54, 0, 0, 0, 0x42]);
    d.shared.stop_network("test").unwrap();
    // A network of that name started now reads the file: both leases are in it already.
    let file = std::fs::read_to_string(state.join("test.leases")).unwrap();
    assert!(file.contains("52:54:00:00:00:41") && file.contains(&format!("52:54:00:00:00:42 {second} ")), "{file}");
}
