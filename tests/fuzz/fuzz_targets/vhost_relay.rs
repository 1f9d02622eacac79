//! Bytes and file descriptors from a hostile VMM through vunet's vhost-user relay
//! (`ports/vhost/relay.rs`, the first code that reads what the VMM sends): the real
//! `relay_requests` over socket pairs, as in a running vunet.
//!
//! Input: records `[fd count][length: u16 LE][bytes]`, each sent with one `sendmsg` carrying
//! that many duplicates of a memfd (as SET_MEM_TABLE and SET_VRING_KICK do), so headers,
//! sizes, payloads and descriptors split and merge in every way. Checks: no panic, no
//! descriptor leaked, everything forwarded is whole messages within the size bound, every
//! answer the relay writes itself is a well-formed SET_VRING_ENABLE reply.
#![no_main]
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

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

fuzz_target!(|data: &[u8]| {
    let before = open_fds();
    {
        let (vmm, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, daemon) = UnixStream::pair().unwrap();
        // SAFETY: memfd_create returns a new descriptor (or -1, checked) owned by nobody else.
        let memfd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), 0) };
        assert!(memfd >= 0);
        // SAFETY: just created above, owned here only.
        let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
        for (nfds, bytes) in records(data) {
            if bytes.is_empty() {
                continue;
            }
            let fds = vec![memfd.as_raw_fd(); nfds];
            // The kernel may refuse (too many descriptors in flight): the VMM's bad luck.
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

        let mut forwarded = Vec::new();
        (&daemon).read_to_end(&mut forwarded).unwrap();
        let mut rest = &forwarded[..];
        while !rest.is_empty() {
            assert!(rest.len() >= HDR, "a partial header was forwarded");
            let size = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
            assert!(size <= MAX_PAYLOAD, "an oversized message was forwarded");
            assert!(rest.len() >= HDR + size, "a partial payload was forwarded");
            rest = &rest[HDR + size..];
        }
        let mut replies = Vec::new();
        (&vmm).read_to_end(&mut replies).unwrap();
        assert_eq!(replies.len() % 20, 0);
        for r in replies.chunks(20) {
            assert_eq!(&r[..12], &[18, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
        }
        drop((relay_front, relay_back));
    }
    assert_eq!(open_fds(), before, "file descriptors leaked");
});
