//! Frontend-driver benchmarks: port-to-port through vunet on one worker core, 64-byte frames
//! (Mpps) and 64 KiB TSO frames (Gbit/s), each printed next to references measured in the same
//! run: memcpy bandwidth on this machine, and the same driver against DPDK testpmd
//! (`net_vhost` io forwarding, busy-polling) when `dpdk-testpmd` is installed
//! (`scripts/install-deps.sh --bench`).
//!
//! Run: `cargo bench -p vunet-benches --bench driver` (BENCH_SECS=N to change the duration).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vunet_switch::vnet::VnetHeader;
use vunet_tests::{eth_frame, start_network, tso_frame, SimOptions, TempDir, VmSim, QUEUE_SIZE};

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

fn secs() -> f64 {
    std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0)
}

/// memcpy bandwidth in GB/s for `chunk`-byte copies cycling through `src_total` bytes of
/// source into `dst_total` bytes of destination.
fn memcpy_gbps(chunk: usize, src_total: usize, dst_total: usize) -> f64 {
    let src = vec![1u8; src_total];
    let mut dst = vec![0u8; dst_total];
    let (sn, dn) = (src_total / chunk, dst_total / chunk);
    let deadline = Instant::now() + Duration::from_secs_f64(secs().min(2.0));
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut i = 0;
    while Instant::now() < deadline {
        for _ in 0..1024 {
            let (so, d) = ((i % sn) * chunk, (i % dn) * chunk);
            dst[d..d + chunk].copy_from_slice(&src[so..so + chunk]);
            i += 1;
            bytes += chunk;
        }
    }
    std::hint::black_box(&dst);
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Pushes prepared frames from `tx` and drains `rx` for the benchmark duration; returns
/// (frames received, seconds).
fn pump(tx: &mut VmSim, rx: &mut VmSim, hdr: &VnetHeader, frame: &[u8]) -> (u64, f64) {
    tx.prepare_tx(hdr, frame);
    rx.post_rx(QUEUE_SIZE);
    // Warm up (learning, first interrupts), then measure.
    let run = |tx: &mut VmSim, rx: &mut VmSim, d: Duration| {
        let start = Instant::now();
        let mut got = 0u64;
        while start.elapsed() < d {
            tx.post_prepared(QUEUE_SIZE / 2);
            let n = rx.drain_count();
            if n > 0 {
                got += n as u64;
                rx.refill_rx();
            } else {
                std::hint::spin_loop();
            }
        }
        (got, start.elapsed().as_secs_f64())
    };
    run(tx, rx, Duration::from_millis(300));
    run(tx, rx, Duration::from_secs_f64(secs()))
}

struct Result {
    mpps_64: f64,
    gbps_64k: f64,
}

fn measure(sock_a: &Path, sock_b: &Path, rx_buf: u32) -> Result {
    let opts = SimOptions { rx_buf_size: rx_buf, ..SimOptions::full() };
    let mut a = VmSim::connect(sock_a, opts.clone()).expect("connect a");
    let mut b = VmSim::connect(sock_b, opts).expect("connect b");
    a.post_rx(QUEUE_SIZE);
    b.post_rx(QUEUE_SIZE);
    std::thread::sleep(Duration::from_millis(100));
    // Let the switch learn B so A -> B is unicast.
    b.send(&eth_frame(A, B, 0x0800, 46, 0));
    std::thread::sleep(Duration::from_millis(50));
    a.drain_count();
    a.refill_rx();
    let small = eth_frame(B, A, 0x0800, 46, 1);
    let (n, t) = pump(&mut a, &mut b, &VnetHeader::default(), &small);
    let mpps_64 = n as f64 / t / 1e6;
    let (hdr, big) = tso_frame(A, B, 65000);
    let (n, t) = pump(&mut a, &mut b, &hdr, &big);
    let gbps_64k = n as f64 * big.len() as f64 * 8.0 / t / 1e9;
    Result { mpps_64, gbps_64k }
}

fn vunet_run() -> Result {
    let dir = TempDir::new("bench");
    let (_d, socks) = start_network(dir.path(), 2);
    measure(&socks[0], &socks[1], 4096)
}

/// The same with the network's workers polling their rings `us` µs before they sleep.
fn vunet_run_busy_poll(us: u32) -> Result {
    let dir = TempDir::new("bench-busy");
    let toml = format!(
        "[[network]]\nname = \"test\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\nbusy_poll_us = {us}\n\
         [[network.port]]\nname = \"p0\"\nsocket = \"p0.sock\"\n[[network.port]]\nname = \"p1\"\nsocket = \"p1.sock\"\n"
    );
    let cfg = vunet::Config::parse(&toml, "bench.toml", dir.path()).expect("config");
    let _d = vunet::Daemon::start(&cfg).expect("start");
    measure(&dir.path().join("p0.sock"), &dir.path().join("p1.sock"), 4096)
}

fn testpmd_run() -> Option<Result> {
    let bin = ["dpdk-testpmd", "testpmd"]
        .into_iter()
        .find(|b| Command::new("sh").arg("-c").arg(format!("command -v {b}")).output().map(|o| o.status.success()).unwrap_or(false))?;
    let dir = TempDir::new("testpmd");
    let s0 = dir.path().join("pmd0.sock");
    let s1 = dir.path().join("pmd1.sock");
    let mut child = Command::new(bin)
        .args(["-l", "0-1", "--no-huge", "-m", "1024", "--no-pci", "--file-prefix", &format!("vunetbench{}", std::process::id())])
        .arg("--vdev")
        .arg(format!("net_vhost0,iface={},queues=1", s0.display()))
        .arg("--vdev")
        .arg(format!("net_vhost1,iface={},queues=1", s1.display()))
        .args(["--", "--forward-mode=io", "--auto-start", "--total-num-mbufs=16384", "--nb-cores=1"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(std::env::temp_dir().join("vunet-bench-testpmd.log")).ok()?)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(s0.exists() && s1.exists()) {
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = std::panic::catch_unwind(|| measure(&s0, &s1, 4096));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"\n");
    }
    let _ = child.kill();
    let _ = child.wait();
    r.ok()
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken. VUNET_BENCH_ONLY=vunet measures
    // vunet alone (for profiling).
    if std::env::var("VUNET_BENCH_ONLY").as_deref() == Ok("vunet") {
        let v = vunet_run();
        println!("vunet port->port: 64 B {:.3} Mpps, 64 KiB TSO {:.2} Gbit/s", v.mpps_64, v.gbps_64k);
        return;
    }
    println!(
        "vunet frontend-driver benchmark ({} s per measurement, {} cores)",
        secs(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    const DRAM: usize = 256 << 20;
    let m64 = memcpy_gbps(64, DRAM, DRAM);
    let m1500 = memcpy_gbps(1500, DRAM, DRAM);
    let m64k_dram = memcpy_gbps(65536, DRAM, DRAM);
    // The benchmark's own working set: 128 TX slots of 68 KiB (sender) into 1 MiB of RX
    // buffers (receiver). This is the fair ceiling for the 64 KiB figure.
    let m64k = memcpy_gbps(65536, 128 * vunet_tests::TX_SLOT as usize, 1 << 20);
    println!("memcpy (same run): from DRAM 64 B {m64:.2} GB/s, 1500 B {m1500:.2} GB/s, 64 KiB {m64k_dram:.2} GB/s; 64 KiB in the benchmark's working set {m64k:.2} GB/s");
    let v = vunet_run();
    let busy = vunet_run_busy_poll(50);
    let pmd = testpmd_run();
    println!("vunet port->port, 64 B frames:      {:.3} Mpps", v.mpps_64);
    println!("vunet port->port, 64 KiB TSO frames: {:.2} Gbit/s = {:.2} GB/s = {:.2}x memcpy(64 KiB, same working set), {:.2}x memcpy(64 KiB, DRAM)", v.gbps_64k, v.gbps_64k / 8.0, v.gbps_64k / 8.0 / m64k, v.gbps_64k / 8.0 / m64k_dram);
    match pmd {
        Some(p) => {
            println!("testpmd io-fwd (busy-polling), 64 B: {:.3} Mpps -> vunet/testpmd = {:.2}x", p.mpps_64, v.mpps_64 / p.mpps_64);
            println!("vunet with busy_poll_us = 50, 64 B: {:.3} Mpps -> vunet/testpmd = {:.2}x", busy.mpps_64, busy.mpps_64 / p.mpps_64);
            println!(
                "testpmd io-fwd, 64 KiB TSO frames:   {:.2} Gbit/s -> vunet/testpmd = {:.2}x",
                p.gbps_64k,
                v.gbps_64k / p.gbps_64k.max(1e-9)
            );
        }
        None => {
            println!("vunet with busy_poll_us = 50, 64 B: {:.3} Mpps", busy.mpps_64);
            println!("testpmd: not available (install with scripts/install-deps.sh --bench)")
        }
    }
}
