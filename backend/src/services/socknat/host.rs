//! The host sockets socket NAT drives: non-blocking TCP and UDP sockets through `socket2`, and
//! the few Linux calls it lacks (`SO_PEEK_OFF`, `SIOCOUTQ`, discarding with `MSG_TRUNC`).
//! Nothing here blocks: every call returns at once, and "no room"/"no data" is 0, not an error.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use vunet_switch::socknat::tcp::HostIo;

/// What a failed `connect()` (or the `SO_ERROR` after one) means for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The remote refused (RST to the guest).
    Refused,
    /// No socket could be made: the process or the host is out of file descriptors or memory.
    /// Refused too (RST, counted apart).
    NoResources,
    /// An ICMP destination unreachable with this code for the guest; None: nothing (the guest
    /// times out as the host did).
    Unreachable(Option<u8>),
}

impl ConnectError {
    /// What `e` from a socket toward `remote` means: as [`ConnectError::of`], except that an
    /// IPv6 flow on a host without IPv6 (see [`no_ipv6`]) is network unreachable.
    pub fn toward(remote: std::net::IpAddr, e: &io::Error) -> ConnectError {
        if remote.is_ipv6() && no_ipv6(e) {
            return ConnectError::Unreachable(Some(0));
        }
        ConnectError::of(e)
    }

    pub fn of(e: &io::Error) -> ConnectError {
        match e.raw_os_error().unwrap_or(0) {
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => ConnectError::NoResources,
            // EAFNOSUPPORT: an IPv6 flow on a host without IPv6 (no AF_INET6 sockets): the
            // network is unreachable from here.
            libc::ENETUNREACH | libc::ENETDOWN | libc::EAFNOSUPPORT => ConnectError::Unreachable(Some(0)),
            libc::EHOSTUNREACH | libc::EHOSTDOWN => ConnectError::Unreachable(Some(1)),
            // Administratively prohibited: a local firewall said no.
            libc::EACCES | libc::EPERM => ConnectError::Unreachable(Some(13)),
            libc::ETIMEDOUT => ConnectError::Unreachable(None),
            _ => ConnectError::Refused,
        }
    }
}

/// Whether an error on an IPv6 socket means the host has no IPv6 to carry it: no AF_INET6
/// sockets (`EAFNOSUPPORT`), no IPv6 address to send from (`EADDRNOTAVAIL`, IPv6 disabled), no
/// route (`ENETUNREACH`).
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::ENETUNREACH))
}

/// A host TCP socket spliced to a guest flow.
pub struct HostTcp {
    sock: Socket,
    /// The kernel's `SO_PEEK_OFF` as we last left it; None where TCP has no peek offset (kernels
    /// before 6.9), in which case a peek reads through a scratch buffer first.
    peek_off: Option<usize>,
    /// A peek returned end of file.
    pub eof: bool,
    /// A call failed for good (reset, broken pipe).
    pub failed: bool,
}

impl HostTcp {
    /// A non-blocking `connect()` to `dst`. Ok(true): connected at once; Ok(false): under way
    /// (wait for EPOLLOUT, then `connect_result`).
    pub fn connect(dst: SocketAddr) -> Result<(HostTcp, bool), io::Error> {
        let sock = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
        // The guest's own stack already coalesces; a second Nagle here only adds delay.
        let _ = sock.set_tcp_nodelay(true);
        let host = HostTcp::wrap(sock);
        match host.sock.connect(&dst.into()) {
            Ok(()) => Ok((host, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((host, false)),
            Err(e) => Err(e),
        }
    }

    /// A connected socket (accepted on a forwarded port).
    pub fn wrap(sock: Socket) -> HostTcp {
        let _ = sock.set_nonblocking(true);
        let peek_off = set_peek_off(sock.as_raw_fd(), 0).then_some(0);
        HostTcp { sock, peek_off, eof: false, failed: false }
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The outcome of a connect that was under way: Ok once connected.
    pub fn connect_result(&self) -> Result<(), io::Error> {
        match self.sock.take_error() {
            Ok(None) => match self.sock.peer_addr() {
                Ok(_) => Ok(()),
                // Not connected and no error: the connect is still going (a spurious wake).
                Err(_) => Err(io::Error::from_raw_os_error(libc::EINPROGRESS)),
            },
            Ok(Some(e)) | Err(e) => Err(e),
        }
    }

    /// The error that ended the socket, if any (`SO_ERROR`).
    pub fn take_error(&self) -> Option<io::Error> {
        self.sock.take_error().ok().flatten()
    }

    /// Free room in the send buffer, in payload bytes: `SO_SNDBUF` less what is queued
    /// (`SIOCOUTQ`). The kernel counts its buffer with per-segment overhead, so an eighth is
    /// kept back: a window the socket cannot take makes the guest resend.
    pub fn send_space(&self) -> usize {
        let sndbuf = self.sock.send_buffer_size().unwrap_or(0);
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer, which is valid for it.
        let r = unsafe { libc::ioctl(self.fd(), libc::TIOCOUTQ, &mut queued) };
        if r < 0 {
            return 0;
        }
        (sndbuf - sndbuf / 8).saturating_sub(queued.max(0) as usize)
    }

    /// Drops `n` bytes the guest acknowledged from the receive buffer, without copying them.
    pub fn discard(&mut self, mut n: usize) {
        while n > 0 {
            // SAFETY: with MSG_TRUNC a TCP recv discards and writes nothing to the buffer.
            let r = unsafe { libc::recv(self.fd(), std::ptr::null_mut(), n, libc::MSG_TRUNC | libc::MSG_DONTWAIT) };
            if r <= 0 {
                break;
            }
            n -= r as usize;
            // The kernel lowers the peek offset by what was consumed.
            if let Some(off) = self.peek_off.as_mut() {
                *off = off.saturating_sub(r as usize);
            }
        }
    }

    pub fn shutdown_write(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }

    /// Closes the socket; with `reset` abortively (the remote end gets RST).
    pub fn close(self, reset: bool) {
        if reset {
            let _ = self.sock.set_linger(Some(Duration::ZERO));
        }
    }
}

impl HostIo for HostTcp {
    fn write(&mut self, data: &[u8]) -> usize {
        // SAFETY: data is a valid readable slice.
        let r = unsafe { libc::send(self.fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if r >= 0 {
            return r as usize;
        }
        if !would_block() {
            self.failed = true;
        }
        0
    }

    fn peek(&mut self, offset: usize, buf: &mut [u8]) -> usize {
        if buf.is_empty() {
            return 0;
        }
        let r = match self.peek_off {
            Some(cur) => {
                if cur != offset {
                    if !set_peek_off(self.fd(), offset) {
                        self.failed = true;
                        return 0;
                    }
                    self.peek_off = Some(offset);
                }
                // SAFETY: buf is a valid writable slice.
                unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) }
            }
            None => peek_through_scratch(self.fd(), offset, buf),
        };
        match r {
            0 => {
                self.eof = true;
                0
            }
            n if n > 0 => {
                if let Some(off) = self.peek_off.as_mut() {
                    *off += n as usize;
                }
                n as usize
            }
            _ => {
                if !would_block() {
                    self.failed = true;
                }
                0
            }
        }
    }
}

fn would_block() -> bool {
    matches!(io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

fn set_peek_off(fd: RawFd, off: usize) -> bool {
    let v = off.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: SO_PEEK_OFF reads one int from a valid pointer.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, (&v as *const libc::c_int).cast(), std::mem::size_of_val(&v) as u32) == 0
    }
}

/// A peek at `offset` without `SO_PEEK_OFF`: the first `offset` bytes go to a scratch buffer
/// (two iovecs, one call). Costs a copy of what is in flight; only on kernels before 6.9.
fn peek_through_scratch(fd: RawFd, offset: usize, buf: &mut [u8]) -> isize {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < offset {
            s.resize(offset, 0);
        }
        let mut iov = [
            libc::iovec { iov_base: s.as_mut_ptr().cast(), iov_len: offset },
            libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() },
        ];
        // SAFETY: a zeroed msghdr with two valid iovecs over live buffers.
        let r = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 2;
            libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        match r {
            r if r < 0 => r,
            r if (r as usize) <= offset => 0,
            r => r - offset as isize,
        }
    })
}

/// A connected UDP socket for one guest flow.
pub struct HostUdp {
    sock: Socket,
}

impl HostUdp {
    pub fn connect(dst: SocketAddr) -> Result<HostUdp, io::Error> {
        let sock = Socket::new(Domain::for_address(dst), Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
        sock.connect(&dst.into())?;
        Ok(HostUdp { sock })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one datagram; a full buffer drops it (UDP may).
    pub fn send(&self, data: &[u8]) -> bool {
        // SAFETY: data is a valid readable slice.
        unsafe { libc::send(self.fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) >= 0 }
    }

    /// Receives one datagram into `buf`. Ok(Some(n)): n bytes (more than `buf.len()` if it was
    /// cut); Ok(None): nothing more now; Err: the error a previous send caused (an ICMP error
    /// such as port unreachable, `ECONNREFUSED`).
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, io::Error> {
        // SAFETY: buf is a valid writable slice; MSG_TRUNC makes the return the datagram's size.
        let r = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if r >= 0 {
            return Ok(Some(r as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        }
    }
}

/// Whether a TCP socket of this kernel keeps a peek offset (Linux 6.9 and later): said once
/// in the log, since without it every retransmission peek copies what is in flight.
pub fn tcp_peek_offset_supported() -> bool {
    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).is_ok_and(|s| set_peek_off(SockRef::from(&s).as_raw_fd(), 0))
}

/// An unprivileged ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`, or `AF_INET6` and
/// `IPPROTO_ICMPV6` for an IPv6 remote) connected to one remote: what
/// `net.ipv4.ping_group_range` allows the process's group to open (it governs both).
pub struct HostPing {
    sock: Socket,
}

impl HostPing {
    pub fn connect(remote: std::net::IpAddr) -> Result<HostPing, io::Error> {
        let proto = if remote.is_ipv6() { Protocol::ICMPV6 } else { Protocol::ICMPV4 };
        let sock = Socket::new(Domain::for_address(SocketAddr::new(remote, 0)), Type::DGRAM.nonblocking(), Some(proto))?;
        sock.connect(&SocketAddr::new(remote, 0).into())?;
        Ok(HostPing { sock })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one ICMP message (the kernel sets the identifier and the checksum).
    pub fn send(&self, message: &[u8]) -> bool {
        // SAFETY: message is a valid readable slice.
        unsafe { libc::send(self.fd(), message.as_ptr().cast(), message.len(), libc::MSG_DONTWAIT) >= 0 }
    }

    /// One ICMP message (no IP header) into `buf`. Ok(None): nothing more now; Err: an error
    /// the socket reported (an ICMP error for what was sent; only echo replies go back).
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, io::Error> {
        // SAFETY: buf is a valid writable slice.
        let r = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(Some(r as usize));
        }
        match would_block() {
            true => Ok(None),
            false => Err(io::Error::last_os_error()),
        }
    }
}

/// A listening socket of a port forward: TCP (accepting) or UDP (receiving from anyone).
pub struct ForwardSocket {
    pub sock: Socket,
}

impl ForwardSocket {
    pub fn bind(tcp: bool, at: SocketAddr) -> Result<ForwardSocket, io::Error> {
        let ty = if tcp { Type::STREAM } else { Type::DGRAM };
        let sock = Socket::new(Domain::for_address(at), ty.nonblocking(), None)?;
        if tcp {
            // A restarted vunet binds again at once, past its old connections' TIME_WAIT.
            sock.set_reuse_address(true)?;
        }
        if at.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.bind(&at.into())?;
        if tcp {
            sock.listen(128)?;
        }
        Ok(ForwardSocket { sock })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The next connection waiting (non-blocking), with its peer.
    pub fn accept(&self) -> Option<(Socket, SocketAddr)> {
        let (s, peer) = self.sock.accept().ok()?;
        Some((s, peer.as_socket()?))
    }

    /// One datagram into `buf` with its sender; Some((n, peer)) with n past `buf.len()` when it
    /// was cut.
    pub fn recv_from(&self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        // SAFETY: the slice is only written by the kernel; u8 and MaybeUninit<u8> share layout.
        let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
        let (n, from) = self.sock.recv_from_with_flags(uninit, libc::MSG_TRUNC).ok()?;
        Some((n, from.as_socket()?))
    }

    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> bool {
        self.sock.send_to_with_flags(data, &to.into(), libc::MSG_DONTWAIT).is_ok()
    }
}
