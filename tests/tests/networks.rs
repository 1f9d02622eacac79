//! Several networks in one daemon: each is its own switch, and no frame crosses between them.

use std::time::Duration;

use vunet_tests::*;

const T: Duration = Duration::from_secs(10);
/// Silence that shows no frame arrives (for negatives, and to drain frames already there).
const QUIET: Duration = Duration::from_millis(300);

#[test]
fn a_broadcast_storm_on_one_network_never_reaches_another() {
    let dir = TempDir::new("two-networks");
    let toml = "[[network]]\nname = \"a\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n\
                [[network.port]]\nname = \"a0\"\nsocket = \"a0.sock\"\nport_security = false\n\
                [[network.port]]\nname = \"a1\"\nsocket = \"a1.sock\"\nport_security = false\n\
                [[network]]\nname = \"b\"\nmode = \"bridge\"\n\
                [[network.port]]\nname = \"b0\"\nsocket = \"b0.sock\"\n\
                [[network.port]]\nname = \"b1\"\nsocket = \"b1.sock\"\n";
    let cfg = vunet::Config::parse(toml, "two.toml", dir.path()).expect("config");
    let daemon = vunet::Daemon::start(&cfg).expect("start");
    let vm = |n: &str| {
        let mut v = VmSim::connect(&dir.path().join(format!("{n}.sock")), SimOptions::full()).unwrap();
        v.post_rx(QUEUE_SIZE);
        v
    };
    let (mut a0, mut a1, mut b0, mut b1) = (vm("a0"), vm("a1"), vm("b0"), vm("b1"));
    wait_network_ready(&daemon, "a");
    wait_network_ready(&daemon, "b");

    // The same MACs on both networks: learning on one must not affect the other.
    let (m0, m1) = ([2, 0, 0, 0, 0, 0x10], [2, 0, 0, 0, 0, 0x11]);
    let storm = 3000;
    let bc = eth_frame([0xff; 6], m0, 0x88b5, 200, 1);
    for _ in 0..storm {
        a0.send(&bc);
    }
    // Meanwhile network b works as usual, and sees nothing of the storm.
    let hello = eth_frame(m1, m0, 0x88b5, 60, 9);
    b0.send(&hello);
    assert_eq!(b1.recv(T).expect("b0 -> b1 during the storm").1, hello);
    assert!(b1.recv(QUIET).is_none(), "no storm frame on network b");
    assert!(b0.recv(QUIET).is_none(), "no storm frame on network b");

    // Once a0's chains are all completed, every storm frame is in a1's ring, its backlog, or
    // counted as dropped: a1's full ring is there to count.
    assert!(a0.wait_tx_all(Duration::from_secs(60)), "vunet took the whole storm");
    let mut on_a = a1.recv_all(QUIET).len();
    on_a += a1.drain_count();
    assert!(on_a >= 256, "the storm floods network a ({on_a} frames at a1)");
    // The switch's view of network b: one frame in from b0, one out to b1 (counted just after
    // b1 could see it: waited for), nothing dropped.
    let s0 = port_counters(&daemon, "b", "b0");
    let s1 = wait_counters(&daemon, "b", "b1", |s| s.tx_frames >= 1);
    assert_eq!((s0.rx_frames, s0.tx_frames, s1.rx_frames, s1.tx_frames), (1, 0, 0, 1), "b0 {s0}; b1 {s1}");
    assert!(s0.drops.iter().chain(&s1.drops).all(|&d| d == 0), "b0 {s0}; b1 {s1}");
}
