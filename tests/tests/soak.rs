//! Soak: vunet under everything at once, for `VUNET_SOAK_SECS` seconds (60 in the test
//! command; `benches/soak.sh` runs 600 and keeps the report). Two QEMU guests run iperf3 both
//! ways; a simulated guest leases, releases and leases again in a loop; a port is added and
//! removed every second; a capture is started and stopped; SIGHUP every 10 s. Then: the stream
//! went through, every DHCP exchange was answered, vunet's memory and open descriptors stayed
//! flat, and its log has no error line.
//!
//! The report (stdout; `--nocapture`) gives RSS and descriptors at each sample and the
//! guests' throughput per interval as iperf3 printed it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vunet_dhcp::message::{build_client_message, reply_type, reply_yiaddr, CLIENT_PORT, SERVER_PORT};
use vunet_dhcp::MessageType;
use vunet_switch::gateway::{build_udp, udp_payload};
use vunet_tests::guest::{await_listening, await_peer, serial, vunet_binary, Guest, Socket, VunetProcess};
use vunet_tests::*;

const BOOT: Duration = Duration::from_secs(240);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const DRIVER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x30];

fn soak_secs() -> u64 {
    std::env::var("VUNET_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60).max(20)
}

/// Whether the soak runs `part` ("dhcp", "ports", "capture", "hup"): all of them unless
/// `VUNET_SOAK_PARTS` lists some (to find which one a growth comes from).
fn runs(part: &str) -> bool {
    std::env::var("VUNET_SOAK_PARTS").map_or(true, |v| v.split(',').any(|p| p.trim() == part))
}

fn cli(ctl: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vunet_binary()).args(args).arg("--control").arg(ctl).output().expect("vunet")
}

/// vunet's resident memory (KiB): all of it, and the anonymous part (its heap and stacks; the
/// rest is pages of the binary, which grow as code runs for the first time); and its open
/// descriptors, the fewest of five readings 20 ms apart (a lease file being written, a control
/// connection closing, are there for an instant).
fn usage(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib =
        |key: &str| status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok());
    let fds = (0..5)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
        })
        .min()
        .unwrap_or(0);
    (kib("VmRSS:").unwrap_or(0), kib("RssAnon:").unwrap_or(0), fds)
}

/// The lowest anonymous memory sampled in `[from, to)` seconds: vunet's memory with its
/// bounded buffers (receive backlogs of up to 4 MiB a queue, capture queues of up to 4 MiB)
/// at their emptiest in that window, which single samples scatter around by megabytes.
fn floor(samples: &[(u64, u64, u64, usize)], from: u64, to: u64) -> Option<(u64, u64)> {
    samples.iter().filter(|s| s.0 >= from && s.0 < to).map(|s| (s.2, s.0)).min()
}

/// One DHCP message from the driver and the server's reply (None: no answer in 10 s).
fn exchange(vm: &mut VmSim, t: MessageType, xid: u32, requested: Option<Ipv4Addr>, ciaddr: Option<Ipv4Addr>) -> Option<Vec<u8>> {
    let mut msg = build_client_message(t, DRIVER_MAC, xid, requested, Some(GW).filter(|_| t != MessageType::Discover), Some("soak"));
    let mut frame = Vec::new();
    let built = match ciaddr {
        // A release goes to the server from the leased address, and gets no answer.
        Some(ip) => {
            msg[12..16].copy_from_slice(&ip.octets());
            build_udp(&mut frame, DRIVER_MAC, [0xff; 6], ip, GW, CLIENT_PORT, SERVER_PORT, &msg)
        }
        None => build_udp(&mut frame, DRIVER_MAC, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, &msg),
    };
    assert!(built, "a DHCP message fits a datagram");
    vm.send(&frame);
    if ciaddr.is_some() {
        return Some(Vec::new());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some((_, f)) = vm.recv(deadline.saturating_duration_since(Instant::now())) {
        vm.refill_rx();
        if let Some((_, payload)) = udp_payload(&f, CLIENT_PORT) {
            if payload.len() > 8 && payload[4..8] == xid.to_be_bytes() {
                return Some(payload.to_vec());
            }
        }
    }
    None
}

/// Leases, releases and leases again until `stop`; counts cycles and unanswered exchanges.
fn dhcp_churn(mut vm: VmSim, stop: Arc<AtomicBool>, cycles: Arc<AtomicU64>, failures: Arc<AtomicU64>) {
    let mut xid = 0x5000u32;
    while !stop.load(Ordering::Relaxed) {
        xid += 1;
        let Some(offer) = exchange(&mut vm, MessageType::Discover, xid, None, None) else {
            failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let ip = reply_yiaddr(&offer).filter(|_| reply_type(&offer) == Some(MessageType::Offer));
        let Some(ip) = ip else {
            failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let ack = exchange(&mut vm, MessageType::Request, xid, Some(ip), None);
        if ack.as_deref().and_then(reply_type) != Some(MessageType::Ack) {
            failures.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        exchange(&mut vm, MessageType::Release, xid, None, Some(ip));
        cycles.fetch_add(1, Ordering::Relaxed);
    }
}

fn capture(ctl: &Path, to: &Path) -> Child {
    Command::new(vunet_binary())
        .args(["capture", "lab", "vm1", "-w"])
        .arg(to)
        .arg("--control")
        .arg(ctl)
        .stderr(Stdio::null())
        .spawn()
        .expect("vunet capture")
}

#[test]
fn vunet_stays_flat_under_traffic_dhcp_port_churn_captures_and_reloads() {
    let _turn = serial();
    let secs = soak_secs();
    let dir = TempDir::new("soak");
    let d = dir.path();
    let cfg = d.join("vunet.toml");
    std::fs::write(
        &cfg,
        "control_socket = \"control.sock\"\n[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.0.0.254/24\"\n\
         [network.dhcp]\nrange = [\"10.0.0.100\", \"10.0.0.150\"]\n[network.dns]\nforwarders = []\n\
         [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n[[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n\
         [[network.port]]\nname = \"driver\"\nsocket = \"driver.sock\"\n",
    )
    .unwrap();
    let ctl = d.join("control.sock");
    // One malloc arena: vunet's memory is then what it holds at its high-water mark. With
    // glibc's default (eight arenas a core, each trimmed and regrown as threads come and go)
    // its RSS swings by megabytes between samples whatever it holds, and no trend can be
    // read from two samples; benches/soak.sh's report says what the default looks like.
    let mut cmd = Command::new(vunet_binary());
    if std::env::var_os("VUNET_SOAK_DEFAULT_MALLOC").is_none() {
        cmd.env("MALLOC_ARENA_MAX", "1");
    }
    let vunet = VunetProcess::start_with(cmd, &["--config", cfg.to_str().unwrap()], &d.join("vunet.log"));
    let pid = vunet.child.id();
    let _server = Guest::boot(
        "srv",
        d,
        &Socket::Connect(d.join("vm1.sock")),
        "52:54:00:00:00:01",
        "",
        &format!("iperf3 -s -1 &\nsrv=$!\n{}ip addr add 10.0.0.1/24 dev eth0\nwait $srv\n", await_listening("tcp", 5201, 8)),
    );
    let interval = if secs >= 300 { 60 } else { 10 };
    let client = Guest::boot(
        "cli",
        d,
        &Socket::Connect(d.join("vm2.sock")),
        "52:54:00:00:00:02",
        "",
        &format!(
            "ip addr add 10.0.0.2/24 dev eth0\n{}echo SOAK-START\niperf3 -c 10.0.0.1 --bidir -t {secs} -i {interval} -f m || exit 5\n",
            await_peer("10.0.0.1", 9)
        ),
    );
    let mut driver = VmSim::connect(&d.join("driver.sock"), SimOptions::full()).unwrap();
    driver.post_rx(QUEUE_SIZE);
    assert!(vunet.wait_connected("driver", 1, Duration::from_secs(10)), "{}", vunet.console.text());
    assert!(client.console.wait_for("SOAK-START", BOOT), "the guests reach each other:\n{}", client.console.text());

    let stop = Arc::new(AtomicBool::new(false));
    let (cycles, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let churn = runs("dhcp").then(|| {
        let (stop, cycles, failures) = (stop.clone(), cycles.clone(), failures.clone());
        std::thread::spawn(move || dhcp_churn(driver, stop, cycles, failures))
    });

    // Samples are taken between two churn steps (no port half-added, no capture open), so
    // the descriptors counted are the steady ones.
    let start = Instant::now();
    let mut samples: Vec<(u64, u64, u64, usize)> = Vec::new();
    let (mut added, mut captures, mut reloads) = (0u32, 0u32, 0u32);
    let mut cap: Option<Child> = None;
    let mut second = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        second += 1;
        if runs("ports") {
            let name = format!("churn{second}");
            let add = cli(&ctl, &["port-add", "lab", &name]);
            assert!(add.status.success(), "port-add: {}", String::from_utf8_lossy(&add.stderr));
            let del = cli(&ctl, &["port-del", "lab", &name]);
            assert!(del.status.success(), "port-del: {}", String::from_utf8_lossy(&del.stderr));
            added += 1;
        }
        if second.is_multiple_of(10) && runs("hup") {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
            reloads += 1;
        }
        match cap.take() {
            Some(mut c) if second % 20 == 10 => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Some(c) => cap = Some(c),
            None if second % 20 == 5 && runs("capture") => {
                // To /dev/null: five seconds of both streams are gigabytes of pcap.
                cap = Some(capture(&ctl, Path::new("/dev/null")));
                captures += 1;
            }
            None => {}
        }
        // A sample every second no capture runs (5 to 10 of every 20 it does): enough of
        // them to catch the moments vunet's bounded buffers are drained.
        if cap.is_none() && !(5..=10).contains(&(second % 20)) {
            let (rss, anon, fds) = usage(pid);
            samples.push((start.elapsed().as_secs(), rss, anon, fds));
        }
        // One step a second, whatever the step took.
        if let Some(wait) = (start + Duration::from_secs(second)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    if let Some(mut c) = cap.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(client.wait_exit(Duration::from_secs(120)), Some(0), "iperf3 went through the soak:\n{}", client.console.text());
    stop.store(true, Ordering::Relaxed);
    if let Some(churn) = churn {
        churn.join().unwrap();
    }

    let out = client.console.text();
    println!("soak report: {secs} s; {added} ports added and removed, {captures} captures, {reloads} SIGHUPs, {} DHCP lease/release cycles ({} exchanges unanswered)", cycles.load(Ordering::Relaxed), failures.load(Ordering::Relaxed));
    println!(
        "  per {}: vunet's anonymous memory lowest / highest (KiB), RSS highest, open descriptors fewest / most",
        if secs >= 300 { "minute" } else { "10 s" }
    );
    let step = if secs >= 300 { 60 } else { 10 };
    for from in (0..secs).step_by(step as usize) {
        let w: Vec<_> = samples.iter().filter(|s| s.0 >= from && s.0 < from + step).collect();
        if let (Some(lo), Some(hi), Some(rss), Some(f0), Some(f1)) = (
            w.iter().map(|s| s.2).min(),
            w.iter().map(|s| s.2).max(),
            w.iter().map(|s| s.1).max(),
            w.iter().map(|s| s.3).min(),
            w.iter().map(|s| s.3).max(),
        ) {
            println!("    {from:>4}-{:<4} s: {lo:>6} / {hi:>6}   RSS {rss:>6}   fds {f0}/{f1}", from + step);
        }
    }
    println!("  iperf3 (both ways, per interval):");
    for l in out.lines().filter(|l| (l.contains("[TX-C]") || l.contains("[RX-C]")) && l.contains("Mbits/sec")) {
        println!("    {l}");
    }

    let log = vunet.console.text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") || l.contains("panicked")).collect();
    assert!(errors.is_empty(), "vunet logged errors:\n{}", errors.join("\n"));
    assert_eq!(failures.load(Ordering::Relaxed), 0, "every DHCP exchange was answered");
    assert!(!runs("dhcp") || cycles.load(Ordering::Relaxed) >= secs / 2, "the DHCP churn ran");
    // Descriptors: the same at the end as at the first sample after the guests settled.
    let settled = samples.iter().find(|s| s.0 >= 20).unwrap_or(&samples[0]);
    let last = samples[samples.len() - 1];
    assert_eq!(last.3, settled.3, "open descriptors stay flat ({} at {} s, {} at {} s)", settled.3, settled.0, last.3, last.0);
    // Memory: what vunet comes back to when its bounded buffers (receive backlogs of up to
    // 4 MiB a queue, capture queues of up to 4 MiB) are drained, i.e. the lowest sample,
    // over the second half of the run against the first (after a minute, or 20 s in a short
    // run). A leak raises it; buffers in use at one sample or another do not. Within 5 % over
    // a long soak; a short one catches only gross growth (half as much again: a leak of 100
    // bytes per DHCP cycle is more).
    let (early, allowed) = if secs >= 300 { ((60, secs / 2), 105) } else { ((20, secs / 2 + 10), 150) };
    let late = (early.1, secs + 1);
    let (Some((m0, t0)), Some((m1, t1))) = (floor(&samples, early.0, early.1), floor(&samples, late.0, late.1)) else {
        panic!("too few samples: {samples:?}")
    };
    println!(
        "  anonymous memory, lowest in {}-{} s: {m0} KiB (at {t0} s); in {}-{} s: {m1} KiB (at {t1} s); ratio {:.3}",
        early.0,
        early.1,
        late.0,
        late.1 - 1,
        m1 as f64 / m0 as f64
    );
    assert!(m1 * 100 <= m0 * allowed, "memory stays flat (within {} %): {m0} KiB, then {m1} KiB (anonymous RSS)", allowed - 100);
}
