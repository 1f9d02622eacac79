//! DNS on the gateway, seen from simulated guests: local names from DHCP and configuration,
//! reverse lookups, NXDOMAIN, and forwarding to an upstream resolver (a fake one on loopback).

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use vunet_dhcp::dns::{build_query, read_answers, QTYPE_A, QTYPE_PTR};
use vunet_dhcp::message::{build_client_message, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, gateway_mac, udp_payload};
use vunet_tests::*;

const T: Duration = Duration::from_secs(5);
const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// A fake upstream resolver on loopback: answers every A query with 192.0.2.1.
fn fake_upstream() -> (u16, std::thread::JoinHandle<usize>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let port = s.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut served = 0;
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut r = buf[..n].to_vec();
            r[2] |= 0x80; // response
            r[7] = 1; // one answer
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
            s.send_to(&r, from).unwrap();
            served += 1;
        }
        served
    });
    (port, h)
}

fn query(vm: &mut VmSim, src_ip: Ipv4Addr, id: u16, name: &str, qtype: u16) -> (u16, Vec<Ipv4Addr>, Vec<String>) {
    let mut f = Vec::new();
    build_udp(&mut f, A, gateway_mac("test"), src_ip, GW, 40000, 53, &build_query(id, name, qtype));
    vm.send(&f);
    loop {
        let (_, f) = vm.recv(T).unwrap_or_else(|| panic!("no answer for {name}"));
        if let Some((src, payload)) = udp_payload(&f, 40000) {
            assert_eq!(src, GW);
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), id, "the client's id");
            return read_answers(payload).expect("well-formed answer");
        }
    }
}

#[test]
fn local_names_reverse_lookups_nxdomain_and_forwarding() {
    let (up_port, upstream) = fake_upstream();
    let dir = TempDir::new("dns");
    let extra = format!(
        "[network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\nhosts = [{{ mac = \"52:54:00:00:00:10\", ip = \"10.0.0.10\", name = \"web\" }}]\n[network.dns]\ndomain = \"lab\"\nhosts = [{{ name = \"files\", ip = \"10.0.0.50\" }}]\nforwarders = [\"127.0.0.1:{up_port}\"]\n"
    );
    let (_d, socks) = start_network_with(dir.path(), 1, "", &extra);
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    std::thread::sleep(Duration::from_millis(100));

    // The guest takes a lease under the name "alpha".
    let mut ip = None;
    for (t, req) in [(MessageType::Discover, false), (MessageType::Request, true)] {
        let msg = build_client_message(t, A, 9, if req { ip } else { None }, req.then_some(GW), Some("alpha"));
        let mut f = Vec::new();
        build_udp(&mut f, A, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
        vm.send(&f);
        let reply = std::iter::from_fn(|| vm.recv(T)).find_map(|(_, f)| udp_payload(&f, CLIENT_PORT).map(|(_, p)| p.to_vec())).unwrap();
        ip = reply_yiaddr(&reply);
    }
    let me = ip.unwrap();

    assert_eq!(query(&mut vm, me, 1, "alpha", QTYPE_A), (0, vec![me], vec![]), "a DHCP client's name");
    assert_eq!(query(&mut vm, me, 2, "alpha.lab", QTYPE_A), (0, vec![me], vec![]));
    assert_eq!(query(&mut vm, me, 3, "web.lab", QTYPE_A), (0, vec![Ipv4Addr::new(10, 0, 0, 10)], vec![]), "a static DHCP host");
    assert_eq!(query(&mut vm, me, 4, "files", QTYPE_A), (0, vec![Ipv4Addr::new(10, 0, 0, 50)], vec![]), "a dns.hosts entry");
    assert_eq!(query(&mut vm, me, 5, "nosuch", QTYPE_A).0, 3, "NXDOMAIN");
    assert_eq!(query(&mut vm, me, 6, "nosuch.lab", QTYPE_A).0, 3, "NXDOMAIN");
    let o = me.octets();
    let rev = format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
    assert_eq!(query(&mut vm, me, 7, &rev, QTYPE_PTR), (0, vec![], vec!["alpha.lab".to_string()]));
    // Not ours: forwarded upstream, answered under the client's own id.
    assert_eq!(query(&mut vm, me, 0x4242, "example.org", QTYPE_A), (0, vec![Ipv4Addr::new(192, 0, 2, 1)], vec![]));
    drop(_d);
    assert_eq!(upstream.join().unwrap(), 1, "exactly the one outside name went upstream");
}

#[test]
fn without_an_upstream_outside_names_are_refused() {
    let dir = TempDir::new("dns-refused");
    let (_d, socks) = start_network_with(dir.path(), 1, "", "[network.dns]\nforwarders = []\n");
    let mut vm = VmSim::connect(&socks[0], SimOptions::full()).unwrap();
    vm.post_rx(QUEUE_SIZE);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(query(&mut vm, Ipv4Addr::new(10, 0, 0, 7), 1, "example.org", QTYPE_A).0, 5, "REFUSED");
}
