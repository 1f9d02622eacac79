//! An idle network costs nothing: with two guests connected and nothing sent, vunet's workers
//! sleep in epoll (no busy polling by default), so the process's CPU time barely moves.

use std::time::Duration;

use vunet_tests::*;

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const T: Duration = Duration::from_secs(10);
/// The idle window the issue names.
const IDLE: Duration = Duration::from_secs(10);

/// The tests here measure this whole process's CPU time: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// User + system CPU time of this process (vunet runs in it, with the test's driver) so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn two_connected_guests_sending_nothing_cost_under_one_percent_of_a_core() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("idle");
    let (d, socks) = start_network(dir.path(), 2);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
    wait_network_ready(&d, "test");
    // The ports work: a frame each way.
    let (ab, ba) = (eth_frame(B, A, 0x0800, 60, 1), eth_frame(A, B, 0x0800, 60, 2));
    vms[0].send(&ab);
    assert_eq!(vms[1].recv(T).expect("A to B").1, ab);
    vms[1].send(&ba);
    assert_eq!(vms[0].recv(T).expect("B to A").1, ba);
    assert!(vms.iter_mut().all(|vm| vm.wait_tx_all(T)));
    let before = cpu_time();
    std::thread::sleep(IDLE);
    let used = cpu_time() - before;
    eprintln!("CPU time over {IDLE:?} idle: {used:?}");
    assert!(used < IDLE / 100, "vunet used {used:?} of CPU in {IDLE:?} of idle (the limit is 1 % of a core)");
    // And it still forwards after sleeping.
    vms[0].send(&ab);
    assert_eq!(vms[1].recv(T).expect("A to B after the idle time").1, ab);
}

#[test]
fn busy_polling_forwards_and_still_sleeps_when_idle() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("busypoll");
    let toml = "[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\nbusy_poll_us = 200\n\
                [[network.port]]\nname = \"p0\"\nsocket = \"p0.sock\"\n[[network.port]]\nname = \"p1\"\nsocket = \"p1.sock\"\n";
    let d = vunet::Daemon::start(&vunet::Config::parse(toml, "test.toml", dir.path()).expect("config")).expect("start");
    let socks = [dir.path().join("p0.sock"), dir.path().join("p1.sock")];
    assert_eq!(d.network("test").unwrap().busy_poll_us, 200);
    let mut vms: Vec<VmSim> = socks.iter().map(|s| VmSim::connect(s, SimOptions::full()).unwrap()).collect();
    vms.iter_mut().for_each(|vm| vm.post_rx(QUEUE_SIZE));
    wait_network_ready(&d, "test");
    for i in 0..50 {
        let f = eth_frame(B, A, 0x0800, 60, i);
        vms[0].send(&f);
        assert_eq!(vms[1].recv(T).expect("A to B").1, f);
    }
    assert!(vms[0].wait_tx_all(T));
    // Polling lasts 200 µs after the last frame, not forever.
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time() - before;
    assert!(used < Duration::from_millis(30), "{used:?} of CPU in 3 s idle with busy_poll_us = 200");
}
