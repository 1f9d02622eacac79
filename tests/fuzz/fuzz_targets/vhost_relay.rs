//! Bytes and file descriptors from a hostile VMM through vunet's vhost-user relay
//! (`ports/vhost/relay.rs`, the first code that reads what the VMM sends): the real
//! `relay_requests` over socket pairs, as in a running vunet.
//!
//! Input: records `[fd count][length: u16 LE][bytes]`, each sent with one `sendmsg` carrying
//! that many duplicates of a memfd (as SET_MEM_TABLE and SET_VRING_KICK do), so headers,
//! sizes, payloads and descriptors split and merge in every way. Checks: no panic, no
//! descriptor leaked, everything forwarded is whole messages within the size bound, every
//! answer the relay writes itself is a well-formed SET_VRING_ENABLE or SEND_RARP reply.
#![no_main]
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR: usize = 12;
const MAX_PAYLOAD: usize = 4096;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn records(mut data: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let nfds = data[0] as usize % 40;
        let len = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
        out.push((nfds, &data[3..3 + len]));
        data = &data[3 + len..];
    }
    out
}

type Drained = (Vec<u8>, Vec<u8>);

/// Reads `daemon` and `vmm` to their ends on the drain thread; the result comes on the channel.
fn drain(daemon: &UnixStream, vmm: &UnixStream) -> Receiver<Drained> {
    static JOBS: OnceLock<Mutex<Sender<(UnixStream, UnixStream, Sender<Drained>)>>> = OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = channel::<(UnixStream, UnixStream, Sender<Drained>)>();
        std::thread::spawn(move || {
            for (daemon, vmm, done) in rx {
                let (mut a, mut b) = (Some((daemon, Vec::new())), Some((vmm, Vec::new())));
                let mut out = (Vec::new(), Vec::new());
                while a.is_some() || b.is_some() {
                    let mut fds: Vec<libc::pollfd> = [&a, &b]
                        .iter()
                        .filter_map(|s| s.as_ref())
                        .map(|(s, _)| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                        .collect();
                    // SAFETY: fds is a valid array of pollfd for the call.
                    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                    for (slot, into) in [(&mut a, &mut out.0), (&mut b, &mut out.1)] {
                        if let Some((s, buf)) = slot {
                            let mut chunk = [0u8; 4096];
                            match (&*s).read(&mut chunk) {
                                Ok(0) => *into = std::mem::take(buf),
                                Ok(n) => {
                                    buf.extend_from_slice(&chunk[..n]);
                                    continue;
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                                Err(e) => panic!("drain: {e}"),
                            }
                            *slot = None;
                        }
                    }
                }
                let _ = done.send(out);
            }
        });
        Mutex::new(tx)
    });
    let (done, result) = channel();
    let (daemon, vmm) = (daemon.try_clone().unwrap(), vmm.try_clone().unwrap());
    // Both before the drain thread reads (the flag is shared with the originals).
    daemon.set_nonblocking(true).unwrap();
    vmm.set_nonblocking(true).unwrap();
    jobs.lock().unwrap().send((daemon, vmm, done)).unwrap();
    result
}

fuzz_target!(|data: &[u8]| {
    // As vunet's main does (Rust's runtime): a write to a closed peer is an error, not a signal.
    static SIGPIPE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler to make safe.
    SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let before = open_fds();
    {
        let (vmm, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, daemon) = UnixStream::pair().unwrap();
        // SAFETY: memfd_create returns a new descriptor (or -1, checked) owned by nobody else.
        let memfd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), 0) };
        assert!(memfd >= 0);
        // SAFETY: just created above, owned here only.
        let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
        // What the relay writes is drained as it goes, by a thread that lives as long as the
        // fuzzer (socket buffers are small, a message per skb: undrained, the relay would block).
        // The VMM writes (nonblocking, like the drain's reads) what the socket takes before
        // the relay reads: with more, it would wait for a relay that is not running yet. A VMM
        // flooding the socket is the same input, cut.
        let drained = drain(&daemon, &vmm);
        for (nfds, bytes) in records(data) {
            if bytes.is_empty() {
                continue;
            }
            let fds = vec![memfd.as_raw_fd(); nfds];
            // Refused: too many descriptors in flight, or the socket is full.
            if vmm.send_with_fds(&[bytes][..], &fds).is_err() {
                break;
            }
        }
        vmm.shutdown(Shutdown::Write).unwrap();
        let _ = vunet::fuzzing::relay_requests(&relay_front, &relay_back);
        // Shut down rather than close: closing a socket with unread input resets the
        // connection, and what the relay wrote could no longer be read.
        let _ = relay_front.shutdown(Shutdown::Both);
        let _ = relay_back.shutdown(Shutdown::Both);
        let (forwarded, replies) = drained.recv().unwrap();
        let mut rest = &forwarded[..];
        while !rest.is_empty() {
            assert!(rest.len() >= HDR, "a partial header was forwarded");
            let size = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
            assert!(size <= MAX_PAYLOAD, "an oversized message was forwarded");
            assert!(rest.len() >= HDR + size, "a partial payload was forwarded");
            rest = &rest[HDR + size..];
        }
        assert_eq!(replies.len() % 20, 0);
        for r in replies.chunks(20) {
            // SET_VRING_ENABLE (18) or SEND_RARP (19), the two the relay answers itself.
            assert!(matches!(r[0], 18 | 19), "a reply to request {}", r[0]);
            assert_eq!(&r[1..12], &[0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
        }
        drop((relay_front, relay_back));
    }
    assert_eq!(open_fds(), before, "file descriptors leaked");
});
