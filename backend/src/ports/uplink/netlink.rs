//! The few rtnetlink requests vunet makes: create a macvtap on a parent interface and delete
//! a link. One request per socket, acknowledged, so errors come back as plain errno values.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_MACVLAN_MODE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

/// A netlink message under construction: header, ifinfomsg, attributes.
struct Request(Vec<u8>);

impl Request {
    fn new(kind: u16, flags: u16, ifindex: i32) -> Request {
        let mut b = vec![0u8; 16 + 16];
        b[4..6].copy_from_slice(&kind.to_ne_bytes());
        b[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // struct ifinfomsg: family, pad, type, index, flags, change.
        b[20..24].copy_from_slice(&ifindex.to_ne_bytes());
        Request(b)
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    /// Starts a nested attribute; `end_nest` fills in its length.
    fn nest(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn send(mut self) -> io::Result<()> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the buffer is valid for its length; a zeroed sockaddr_nl addresses the kernel.
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                fd.as_raw_fd(),
                self.0.as_ptr().cast(),
                self.0.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 4096];
        // SAFETY: reading into a stack buffer of the given size.
        let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
            let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected netlink reply"))
    }
}

/// `ip link add link PARENT name NAME [address MAC] type macvtap mode MODE` (MODE as
/// `IFLA_MACVLAN_MODE`: 4 bridge, 8 passthru).
pub fn create_macvtap(parent_index: u32, name: &str, mac: Option<[u8; 6]>, mode: u32) -> io::Result<()> {
    let mut r = Request::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, 0);
    r.attr(IFLA_LINK, &parent_index.to_ne_bytes());
    let mut ifname = name.as_bytes().to_vec();
    ifname.push(0);
    r.attr(IFLA_IFNAME, &ifname);
    if let Some(mac) = mac {
        r.attr(IFLA_ADDRESS, &mac);
    }
    let info = r.nest(IFLA_LINKINFO);
    r.attr(IFLA_INFO_KIND, b"macvtap");
    let data = r.nest(IFLA_INFO_DATA);
    r.attr(IFLA_MACVLAN_MODE, &mode.to_ne_bytes());
    r.end_nest(data);
    r.end_nest(info);
    r.send()
}
