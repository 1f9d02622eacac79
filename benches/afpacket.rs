//! Which AF_PACKET receive and send methods are fastest on this machine, for the af-packet
//! uplink: one `recv` per frame, `recvmmsg` batches of 32 (what the uplink uses), and a
//! TPACKET_V3 mmap ring; one `send` per frame against `sendmmsg` batches of 32.
//!
//! 64-byte frames cross a veth pair inside a network namespace this benchmark creates (and
//! deletes): a sender thread floods one end, the receiver under test reads the other.
//! Needs root. Run: `cargo bench -p vunet-benches --bench afpacket`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUN: Duration = Duration::from_secs(2);
const BATCH: usize = 32;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const TPACKET_V3: libc::c_int = 2;
const TP_STATUS_USER: u32 = 1;

fn sh(cmd: &str) {
    let ok = Command::new("sh").arg("-c").arg(cmd).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "{cmd}");
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2), owned at once; bind to a zeroed sockaddr_ll with family/protocol/index.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32);
        assert!(fd >= 0, "AF_PACKET needs root");
        let fd = OwnedFd::from_raw_fd(fd);
        let name = std::ffi::CString::new(ifname).unwrap();
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        let n = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        assert_eq!(libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), n), 0);
        let big: libc::c_int = 8 << 20;
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&big as *const libc::c_int).cast(), 4);
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, (&big as *const libc::c_int).cast(), 4);
        fd
    }
}

fn frame() -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Sends frames on `fd` until `stop`, one syscall per frame or per batch; returns frames sent
/// and the CPU time used.
fn flood_timed(fd: RawFd, batched: bool, stop: &AtomicBool) -> (u64, Duration) {
    let cpu0 = thread_cpu();
    let n = flood(fd, batched, stop);
    (n, thread_cpu() - cpu0)
}

fn flood(fd: RawFd, batched: bool, stop: &AtomicBool) -> u64 {
    let mut f = frame();
    let mut sent = 0u64;
    let mut iov: Vec<libc::iovec> = (0..BATCH).map(|_| libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: 64 }).collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|i| {
            // SAFETY: a zeroed mmsghdr is valid; it points at one live iovec.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the buffers outlive the calls.
        let n = unsafe {
            if batched {
                libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) as i64
            } else {
                (libc::send(fd, f.as_ptr().cast(), 64, 0) >= 0) as i64
            }
        };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Receives for RUN with one of three methods; returns frames received and the CPU time the
/// receiving thread used.
fn receive(fd: RawFd, method: &str) -> (u64, Duration) {
    let cpu0 = thread_cpu();
    let got = receive_loop(fd, method);
    (got, thread_cpu() - cpu0)
}

fn receive_loop(fd: RawFd, method: &str) -> u64 {
    let deadline = Instant::now() + RUN;
    let mut got = 0u64;
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: a timeval option of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    match method {
        "recv" => {
            let mut b = [0u8; 2048];
            while Instant::now() < deadline {
                // SAFETY: reading into a stack buffer of its size.
                if unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), 0) } > 0 {
                    got += 1;
                }
            }
        }
        "recvmmsg" => {
            let mut bufs = vec![[0u8; 2048]; BATCH];
            let mut iov: Vec<libc::iovec> =
                bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: 2048 }).collect();
            let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|i| {
                    // SAFETY: as in flood.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = &mut iov[i];
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            while Instant::now() < deadline {
                // SAFETY: every mmsghdr points at a live buffer.
                let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0, std::ptr::null_mut()) };
                if n > 0 {
                    got += n as u64;
                }
            }
        }
        _ => got = ring(fd, deadline),
    }
    got
}

/// TPACKET_V3: the kernel fills 1 MiB blocks of an mmap'd ring; user space walks each block's
/// frames and hands the block back.
fn ring(fd: RawFd, deadline: Instant) -> u64 {
    let (block, nr) = (1usize << 20, 16usize);
    // struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov (ms),
    // sizeof_priv, feature_req_word.
    let req: [u32; 7] = [block as u32, nr as u32, 2048, (block / 2048 * nr) as u32, 10, 0, 0];
    // SAFETY: PACKET_VERSION takes an int, PACKET_RX_RING a tpacket_req3; the ring is mapped
    // with the size the kernel was asked for and read only within it.
    unsafe {
        assert_eq!(libc::setsockopt(fd, libc::SOL_PACKET, PACKET_VERSION, (&TPACKET_V3 as *const libc::c_int).cast(), 4), 0);
        assert_eq!(
            libc::setsockopt(fd, libc::SOL_PACKET, PACKET_RX_RING, req.as_ptr().cast(), 28),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
        let map = libc::mmap(std::ptr::null_mut(), block * nr, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) as *mut u8;
        assert_ne!(map as *mut libc::c_void, libc::MAP_FAILED);
        let mut got = 0u64;
        let mut i = 0usize;
        while Instant::now() < deadline {
            let b = map.add(i * block);
            // struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1:
            // block_status (8), num_pkts (12), offset_to_first_pkt (16).
            let status = std::ptr::read_volatile(b.add(8) as *const u32);
            if status & TP_STATUS_USER == 0 {
                let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                libc::poll(&mut p, 1, 100);
                continue;
            }
            got += std::ptr::read_volatile(b.add(12) as *const u32) as u64;
            std::ptr::write_volatile(b.add(8) as *mut u32, 0);
            i = (i + 1) % nr;
        }
        libc::munmap(map.cast(), block * nr);
        got
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let ns = format!("vuafp{}", std::process::id());
    sh(&format!("ip netns add {ns}"));
    // Everything below runs inside the namespace (threads made later inherit it).
    let nsf = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns on an open namespace file, before any other thread exists.
    assert_eq!(unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    sh("ip link add va type veth peer name vb && ip link set va up && ip link set vb up");
    println!("AF_PACKET on a veth pair, 64-byte frames, {} s per method, {} cores, {}", RUN.as_secs(), num_cpus(), date());

    // Send side alone.
    // CPU nanoseconds per frame is the figure that matters: on 2 cores the sender, the
    // receiver and the kernel's veth work share the machine, so rates alone mostly show who
    // got the CPU.
    let mut send_cost = Vec::new();
    for batched in [false, true] {
        let tx = packet_socket("va");
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let fd = tx.as_raw_fd();
        let h = std::thread::spawn(move || flood_timed(fd, batched, &s2));
        std::thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
        let (n, cpu) = h.join().unwrap();
        let ns = cpu.as_nanos() as f64 / n.max(1) as f64;
        send_cost.push(ns);
        println!(
            "send:    {:<10} {:.2} Mpps, {:.0} ns CPU/frame",
            if batched { "sendmmsg" } else { "send" },
            n as f64 / RUN.as_secs_f64() / 1e6,
            ns
        );
    }
    println!("send cost ratio sendmmsg x{BATCH} / send: {:.2}", send_cost[1] / send_cost[0]);

    // Receive side, with a batched sender flooding the other end.
    let mut recv_cost = Vec::new();
    for method in ["recv", "recvmmsg", "tpacket_v3"] {
        let rx = packet_socket("vb");
        let tx = packet_socket("va");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, sent2, fd) = (stop.clone(), sent.clone(), tx.as_raw_fd());
        let h = std::thread::spawn(move || sent2.store(flood(fd, true, &s2), Ordering::Relaxed));
        let (got, cpu) = receive(rx.as_raw_fd(), method);
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        let ns = cpu.as_nanos() as f64 / got.max(1) as f64;
        recv_cost.push(ns);
        println!(
            "receive: {method:<10} {:.2} Mpps ({:.0}% of what was sent), {:.0} ns CPU/frame",
            got as f64 / RUN.as_secs_f64() / 1e6,
            100.0 * got as f64 / sent.load(Ordering::Relaxed).max(1) as f64,
            ns
        );
    }
    println!(
        "receive cost ratios to one recv per frame: recvmmsg x{BATCH} {:.2}, TPACKET_V3 ring {:.2}",
        recv_cost[1] / recv_cost[0],
        recv_cost[2] / recv_cost[0]
    );
    drop(nsf);
    sh(&format!("ip netns del {ns}"));
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn date() -> String {
    Command::new("date").args(["-u", "+%F"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}
