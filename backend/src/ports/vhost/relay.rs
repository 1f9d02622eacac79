//! A thin relay between the VMM's vhost-user connection and the vhost-user-backend daemon.
//!
//! Why: QEMU's virtio-net sends `SET_VRING_ENABLE` at device reset, before `SET_FEATURES`
//! (`peer_attach` in hw/net/virtio-net.c), which libvhost-user and DPDK accept. The rust-vmm
//! `vhost` crate refuses it ("inactive feature") and drops the connection, so QEMU could never
//! start. The relay answers such an early `SET_VRING_ENABLE` itself (QEMU sends it again, for
//! real, when it starts the device after `SET_FEATURES`) and passes every other message,
//! file descriptors included, through untouched. Control plane only: no frame crosses it.
//!
//! Two more things happen here for live migration:
//! - `SEND_RARP` (after a migration, the destination VMM asks the backend to announce the
//!   guest's MAC) is not dispatched by the vhost crate, which would drop the connection: the
//!   relay takes it, hands the MAC to the port (`on_rarp`) and acknowledges it.
//! - Each `SET_VRING_KICK` fd gets one kick before it is passed on: a migrated guest's rings
//!   already hold buffers and it may not kick again for a while, so the device looks at them
//!   at once (a spare kick only makes it look at a ring with nothing new).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_SEND_RARP: u32 = 19;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const HDR: usize = 12;
/// Larger than any vhost-user request (the biggest, SET_MEM_TABLE, is 8 + 8 * 32 bytes).
const MAX_PAYLOAD: usize = 4096;
const MAX_FDS: usize = 32;

/// Relays between `frontend` (the VMM) and `backend` (the daemon's end) until either closes.
/// `on_rarp` gets the MAC of each SEND_RARP.
pub fn spawn(frontend: UnixStream, backend: UnixStream, name: &str, on_rarp: Box<dyn Fn([u8; 6]) + Send>) -> io::Result<()> {
    let frontend = Arc::new(frontend);
    let backend = Arc::new(backend);
    let (f1, b1) = (frontend.clone(), backend.clone());
    thread::Builder::new().name(format!("vu-relay-{name}")).spawn(move || {
        let _ = relay_requests_with(&f1, &b1, &*on_rarp);
        let _ = f1.shutdown(Shutdown::Both);
        let _ = b1.shutdown(Shutdown::Both);
    })?;
    thread::Builder::new().name(format!("vu-reply-{name}")).spawn(move || {
        // Replies carry no file descriptors (vunet offers no feature that would add any).
        let _ = io::copy(&mut &*backend, &mut &*frontend);
        let _ = frontend.shutdown(Shutdown::Both);
        let _ = backend.shutdown(Shutdown::Both);
    })?;
    Ok(())
}

/// Reads requests from `frontend` and passes them to `backend` until either end closes or a
/// request is malformed (the error). Public for the fuzz target (`vunet::fuzzing`).
pub fn relay_requests(frontend: &UnixStream, backend: &UnixStream) -> io::Result<()> {
    relay_requests_with(frontend, backend, &|_| {})
}

/// `relay_requests`, handing the MAC of each SEND_RARP to `on_rarp`.
pub fn relay_requests_with(frontend: &UnixStream, backend: &UnixStream, on_rarp: &dyn Fn([u8; 6])) -> io::Result<()> {
    let mut acked: u64 = 0;
    // Ring enable states asked for before SET_FEATURES, by ring index.
    let mut early_enable: [Option<u32>; super::device::MAX_QUEUES] = Default::default();
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let mut hdr = [0u8; HDR];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HDR }];
        // SAFETY: the iovec points at `hdr`, which outlives the call and is HDR bytes long.
        let (n, nfds) = unsafe { frontend.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // Own the received descriptors at once so they are closed whatever happens next.
        let fds: Vec<OwnedFd> = raw_fds[..nfds]
            .iter()
            .filter(|&&fd| fd >= 0)
            // SAFETY: recvmsg just installed these descriptors in this process; nothing else
            // refers to them, so each OwnedFd is their only owner.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Ok(());
        }
        if n < HDR {
            (&*frontend).read_exact(&mut hdr[n..])?;
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap_or([0; 4]));
        let (req, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::other("oversized vhost-user message"));
        }
        (&*frontend).read_exact(&mut payload[..size])?;
        tracing::trace!(req, flags, size, nfds = fds.len(), "vhost-user request");
        if req == REQ_SET_FEATURES && size >= 8 {
            acked = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
        }
        if req == REQ_SET_VRING_ENABLE && acked & PROTOCOL_FEATURES == 0 {
            if size >= 8 {
                let index = u32::from_le_bytes(payload[..4].try_into().unwrap_or([0; 4])) as usize;
                let state = u32::from_le_bytes(payload[4..8].try_into().unwrap_or([0; 4]));
                if let Some(slot) = early_enable.get_mut(index) {
                    *slot = Some(state);
                }
            }
            if flags & FLAG_NEED_REPLY != 0 {
                let mut reply = [0u8; HDR + 8];
                reply[0..4].copy_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                reply[8..12].copy_from_slice(&8u32.to_le_bytes());
                (&*frontend).write_all(&reply)?;
            }
            continue;
        }
        if req == REQ_SEND_RARP {
            if size >= 6 {
                on_rarp(payload[..6].try_into().unwrap_or([0; 6]));
            }
            if flags & FLAG_NEED_REPLY != 0 {
                let mut reply = [0u8; HDR + 8];
                reply[0..4].copy_from_slice(&REQ_SEND_RARP.to_le_bytes());
                reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                reply[8..12].copy_from_slice(&8u32.to_le_bytes());
                (&*frontend).write_all(&reply)?;
            }
            continue;
        }
        if req == REQ_SET_VRING_KICK {
            if let Some(fd) = fds.first() {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writes 8 bytes from a live buffer to a descriptor this relay owns; an
                // fd that is not an eventfd just fails the write, which is ignored.
                let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let bufs: [&[u8]; 2] = [&hdr, &payload[..size]];
        let mut sent = backend.send_with_fds(&bufs[..], &raw).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // sendmsg on a stream socket may be partial; the fds went with the first byte.
        let total = HDR + size;
        while sent < total {
            let rest: Vec<u8> = hdr.iter().chain(&payload[..size]).skip(sent).copied().collect();
            sent += (&*backend).write(&rest)?;
        }
        drop(fds);
        if req == REQ_SET_FEATURES && acked & PROTOCOL_FEATURES != 0 {
            for (index, state) in early_enable.iter_mut().enumerate() {
                if let Some(state) = state.take() {
                    let mut msg = [0u8; HDR + 8];
                    msg[0..4].copy_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                    msg[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
                    msg[8..12].copy_from_slice(&8u32.to_le_bytes());
                    msg[12..16].copy_from_slice(&(index as u32).to_le_bytes());
                    msg[16..20].copy_from_slice(&state.to_le_bytes());
                    (&*backend).write_all(&msg)?;
                }
            }
        }
    }
}
