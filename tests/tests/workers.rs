//! A network's workers (issue 11 point 7): with `workers = 1` one thread at a time moves
//! frames out of the guests' TX rings, serving every ring with frames waiting a burst at a
//! time; three guests sending at once all get through, complete and in order.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use vunet_tests::*;

const T: Duration = Duration::from_secs(20);
/// Frames each guest sends: fewer than its peer's posted receive buffers, so nothing waits
/// for a refill and every frame must arrive.
const FRAMES: u32 = 200;

fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, 0x10 + i as u8]
}

#[test]
fn one_worker_serves_three_guests_sending_at_once_complete_and_in_order() {
    let dir = TempDir::new("workers");
    let mut toml = String::from("[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\nworkers = 1\n");
    for i in 0..3 {
        toml.push_str(&format!("[[network.port]]\nname = \"p{i}\"\nsocket = \"p{i}.sock\"\n"));
    }
    let cfg = vunet::Config::parse(&toml, "test.toml", dir.path()).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    assert_eq!(d.network("test").unwrap().workers, 1);
    let mut vms: Vec<VmSim> = (0..3)
        .map(|i| {
            let mut vm = VmSim::connect(&dir.path().join(format!("p{i}.sock")), SimOptions::full()).expect("connect");
            vm.post_rx(QUEUE_SIZE);
            vm
        })
        .collect();
    wait_network_ready(&d, "test");
    // Each guest says who it is once, so the switch knows every MAC before the flood of
    // unicast starts (and nothing of the test traffic is flooded).
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.send(&eth_frame([0xff; 6], mac(i), 0x88b5, 60, 0));
    }
    for vm in vms.iter_mut() {
        for _ in 0..2 {
            assert!(vm.recv(T).is_some(), "the others' hellos arrive");
        }
    }

    // Guest i sends FRAMES numbered frames to guest i+1, all three at once.
    let start = Arc::new(Barrier::new(3));
    let senders: Vec<_> = vms
        .into_iter()
        .enumerate()
        .map(|(i, mut vm)| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for n in 0..FRAMES {
                    let mut f = eth_frame(mac((i + 1) % 3), mac(i), 0x88b5, 60, i as u8);
                    f[14..18].copy_from_slice(&n.to_be_bytes());
                    vm.send(&f);
                }
                assert!(vm.wait_tx_all(T), "guest {i}'s frames are all taken");
                vm
            })
        })
        .collect();
    let mut vms: Vec<VmSim> = senders.into_iter().map(|h| h.join().expect("sender")).collect();

    // Guest i+1 got guest i's frames, every one, in the order sent.
    for (i, vm) in vms.iter_mut().enumerate() {
        let from = (i + 2) % 3;
        let got: Vec<u32> = (0..FRAMES)
            .map_while(|_| vm.recv(T))
            .map(|(_, f)| {
                assert_eq!(f[6..12], mac(from), "guest {i} hears only guest {from}");
                u32::from_be_bytes(f[14..18].try_into().unwrap())
            })
            .collect();
        assert_eq!(got, (0..FRAMES).collect::<Vec<_>>(), "guest {i} got guest {from}'s frames complete and in order");
    }
    let net = d.network("test").unwrap();
    for i in 0..3 {
        let c = port_counters(&d, "test", &format!("p{i}"));
        assert_eq!(c.rx_frames, FRAMES as u64 + 1, "p{i} took its hello and its frames: {c}");
    }
    eprintln!("rings left to the busy worker: {}", net.tx_workers.handoffs());
}
