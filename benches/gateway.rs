//! Gateway services under load, with the frontend driver: 64 simulated guests taking DHCP
//! leases at once (leases per second, time until all are bound; target: all 64 in under 1 s),
//! and DNS answers per second for local names.
//!
//! Run: `cargo bench -p vunet-benches --bench gateway`.

use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vunet_dhcp::dns::{build_query, QTYPE_A};
use vunet_dhcp::message::{build_client_message, reply_type, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, gateway_mac, udp_payload};
use vunet_tests::{start_network_with, SimOptions, TempDir, VmSim, QUEUE_SIZE};

const GUESTS: usize = 64;
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const T: Duration = Duration::from_secs(10);

fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8]
}

fn dhcp(vm: &mut VmSim, m: [u8; 6], t: MessageType, req: Option<Ipv4Addr>) -> Vec<u8> {
    let msg = build_client_message(t, m, 1, req, req.map(|_| GW), Some(&format!("g{}", m[5])));
    let mut f = Vec::new();
    build_udp(&mut f, m, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg);
    vm.send(&f);
    loop {
        let (_, f) = vm.recv(T).expect("DHCP reply");
        if let Some((_, p)) = udp_payload(&f, CLIENT_PORT) {
            return p.to_vec();
        }
    }
}

fn main() {
    let dir = TempDir::new("bench-gw");
    let extra = "[network.dhcp]\nrange = [\"10.0.0.2\", \"10.0.0.254\"]\n[network.dns]\nforwarders = []\n";
    let (d, socks) = start_network_with(dir.path(), GUESTS, "", extra);
    let sims: Vec<VmSim> = socks
        .iter()
        .map(|s| {
            let mut vm = VmSim::connect(s, SimOptions::full()).expect("connect");
            vm.post_rx(QUEUE_SIZE);
            vm
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let start_line = Arc::new(Barrier::new(GUESTS + 1));
    let handles: Vec<_> = sims
        .into_iter()
        .enumerate()
        .map(|(i, mut vm)| {
            let b = start_line.clone();
            std::thread::spawn(move || {
                b.wait();
                let offer = dhcp(&mut vm, mac(i), MessageType::Discover, None);
                let ip = reply_yiaddr(&offer).expect("offer");
                let ack = dhcp(&mut vm, mac(i), MessageType::Request, Some(ip));
                assert_eq!(reply_type(&ack), Some(MessageType::Ack));
                (Instant::now(), vm)
            })
        })
        .collect();
    start_line.wait();
    let t0 = Instant::now();
    let results: Vec<(Instant, VmSim)> = handles.into_iter().map(|h| h.join().expect("guest thread")).collect();
    let all = results.iter().map(|(t, _)| t.duration_since(t0)).max().unwrap_or_default();
    let bound = d.network("test").unwrap().dhcp.as_ref().unwrap().lock().unwrap().leases(0).len();
    assert_eq!(bound, GUESTS, "every guest bound");
    println!(
        "DHCP: {GUESTS} simulated guests at once: all bound in {:.1} ms = {:.0} leases/s (target: all in < 1000 ms)",
        all.as_secs_f64() * 1e3,
        GUESTS as f64 / all.as_secs_f64()
    );

    // DNS: one guest asks for local names, 32 queries in flight at a time.
    let mut vm = results.into_iter().next().map(|(_, vm)| vm).expect("a guest");
    let me = mac(0);
    let my_ip = d.network("test").unwrap().dhcp.as_ref().unwrap().lock().unwrap().ip_of(&me, 1).expect("lease");
    let mut frames = Vec::new();
    for id in 0..32u16 {
        let mut f = Vec::new();
        build_udp(&mut f, me, gateway_mac("test"), my_ip, GW, 40000 + id, 53, &build_query(id, &format!("g{}", id % 64), QTYPE_A));
        frames.push(f);
    }
    let secs: f64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let t0 = Instant::now();
    let mut answers = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for f in &frames {
            vm.send(f);
        }
        let mut got = 0;
        while got < frames.len() {
            let (_, f) = vm.recv(T).expect("DNS answer");
            if f.len() > 42 && f[34..36] == [0, 53] {
                got += 1;
            }
        }
        answers += got as u64;
    }
    println!(
        "DNS: {:.0} answers/s for local names (one guest, 32 queries in flight, {GUESTS} names in the zone)",
        answers as f64 / t0.elapsed().as_secs_f64()
    );
}
