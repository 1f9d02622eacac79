//! Network namespaces for uplink tests: each test makes its own "host" namespace (where vunet
//! runs and its uplink interfaces live) and "LAN" namespace (servers: dnsmasq, iperf3, nc),
//! joined by veth pairs. Nothing a test sends leaves the namespaces it made; they are deleted,
//! with every process in them, when the test ends.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use crate::guest::{vunet_binary, Console, VunetProcess};

/// A network namespace this test created; deleted (its processes killed) on drop.
pub struct Netns {
    pub name: String,
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

impl Netns {
    /// `vu-TAG-PID`, with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("vu-{tag}-{}", std::process::id());
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        let out = sh(&format!("ip netns add {name}"));
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        let ns = Netns { name };
        ns.run("ip link set lo up");
        ns
    }

    /// Runs a shell command inside; panics with its output if it fails.
    pub fn run(&self, cmd: &str) -> String {
        let out = self.try_run(cmd);
        assert!(
            out.status.success(),
            "in {}: {cmd}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_run(&self, cmd: &str) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", cmd]).output().expect("ip netns exec")
    }

    /// Starts a long-running program inside (killed with the namespace).
    pub fn spawn(&self, cmd: &str) -> Background {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", &format!("exec {cmd}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in netns");
        let console = Console::default();
        console.attach_pub(child.stdout.take().expect("stdout"));
        console.attach_pub(child.stderr.take().expect("stderr"));
        Background { child, console }
    }

    /// Starts `vunet run ARGS` inside and waits for it to be ready.
    pub fn vunet(&self, args: &[&str], log: &Path) -> VunetProcess {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(vunet_binary());
        VunetProcess::start_with(cmd, args, log)
    }

    /// Sends raw Ethernet frames out of interface `ifname` inside the namespace, from a thread
    /// that enters it (AF_PACKET), for input no program there would send.
    pub fn send_raw(&self, ifname: &str, frames: &[Vec<u8>]) {
        let (name, ifname, frames) = (self.name.clone(), ifname.to_string(), frames.to_vec());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns file");
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscalls on descriptors this thread owns; setns moves only this thread.
            unsafe {
                assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(fd >= 0, "packet socket");
                let c = std::ffi::CString::new(ifname).unwrap();
                let index = libc::if_nametoindex(c.as_ptr());
                assert!(index > 0, "interface");
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = index as i32;
                addr.sll_halen = 6;
                for f in &frames {
                    let n = libc::sendto(
                        fd,
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert_eq!(n, f.len() as isize, "sendto");
                }
                libc::close(fd);
            }
        })
        .join()
        .expect("raw sender");
    }

    /// Bytes received on an interface inside.
    pub fn rx_bytes(&self, ifname: &str) -> u64 {
        self.run(&format!("cat /sys/class/net/{ifname}/statistics/rx_bytes")).trim().parse().expect("rx_bytes")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns pids {0} | xargs -r kill -9; ip netns del {0}", self.name));
    }
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    let out = sh(&format!("ip link add {a_if} netns {} type veth peer name {b_if} netns {}", a.name, b.name));
    assert!(out.status.success(), "veth: {}", String::from_utf8_lossy(&out.stderr));
    a.run(&format!("ip link set {a_if} up"));
    b.run(&format!("ip link set {b_if} up"));
}

/// A program running in a namespace.
pub struct Background {
    child: Child,
    pub console: Console,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` is true or `timeout` passes (the crate's [`crate::wait_until`]).
pub use crate::wait_until;
