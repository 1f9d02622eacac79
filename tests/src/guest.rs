//! Real QEMU guests (TCG) for the integration tests and benchmarks: the project's own tiny
//! guest (scripts/build-guest.sh) with a per-test script appended to its initramfs, serial
//! console captured, and the `vunet` binary started as a user would start it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Kernel and base initramfs of the test guest.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (once, cached in guest/) and returns the guest image; installs QEMU, busybox,
/// iperf3 and cpio first if they are missing.
pub fn guest_image() -> &'static GuestImage {
    static IMG: OnceLock<GuestImage> = OnceLock::new();
    IMG.get_or_init(|| {
        let root = repo_root();
        let dir = std::env::var_os("VUNET_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("guest"));
        let st = Command::new("bash")
            .arg(root.join("scripts/build-guest.sh"))
            .env("VUNET_GUEST_DIR", &dir)
            .status()
            .expect("run scripts/build-guest.sh");
        assert!(st.success(), "scripts/build-guest.sh failed");
        GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initramfs.gz") }
    })
}

/// Guests under TCG share two cores: tests that boot guests take turns.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `vunet` binary next to the test executable (target/<profile>/vunet).
pub fn vunet_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VUNET_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("vunet");
    assert!(bin.exists(), "{} not built: run `cargo build -p vunet` first (the README's test command does)", bin.display());
    bin
}

/// Output of a child process, collected line by line by a reader thread.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<String>>);

impl Console {
    fn attach(&self, r: impl std::io::Read + Send + 'static, tee: Option<PathBuf>) {
        let buf = self.0.clone();
        std::thread::spawn(move || {
            let mut log = tee.and_then(|p| std::fs::File::create(p).ok());
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                b.push_str(&line);
                b.push('\n');
            }
        });
    }

    /// Collects another output stream into this console.
    pub fn attach_pub(&self, r: impl std::io::Read + Send + 'static) {
        self.attach(r, None);
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_until(|t| t.contains(needle), timeout)
    }

    /// Waits until `count` lines of the output contain `needle`: an event counted, never a
    /// label whose text depends on timing (iperf3 prints "3.00-4.01" as often as "3.00-4.00").
    pub fn wait_for_lines(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(|t| t.lines().filter(|l| l.contains(needle)).count() >= count, timeout)
    }

    /// Waits until `done` holds for the output so far.
    pub fn wait_until(&self, done: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.text()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// A running `vunet run` process.
pub struct VunetProcess {
    pub child: Child,
    pub console: Console,
}

impl VunetProcess {
    /// Starts `vunet run` with the given arguments and waits for its summary on stdout.
    pub fn start(args: &[&str], log: &Path) -> VunetProcess {
        VunetProcess::start_with(Command::new(vunet_binary()), args, log)
    }

    /// As `start`, with `cmd` as the program that runs vunet (e.g. `ip netns exec NS vunet`).
    pub fn start_with(mut cmd: Command, args: &[&str], log: &Path) -> VunetProcess {
        let mut child = cmd.arg("run").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn vunet");
        let console = Console::default();
        console.attach(child.stdout.take().expect("stdout"), None);
        console.attach(child.stderr.take().expect("stderr"), Some(log.to_path_buf()));
        // The summary on stdout ends with the line naming QEMU; a vunet that exits (a config
        // error) fails the test at once, not after the deadline.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !console.text().contains("QEMU") {
            let exited = child.try_wait().ok().flatten();
            assert!(exited.is_none() && Instant::now() < deadline, "vunet did not start ({exited:?}):\n{}", console.text());
            std::thread::sleep(Duration::from_millis(20));
        }
        VunetProcess { child, console }
    }

    /// Waits until vunet has logged `count` guest connections on port `port` ("guest
    /// connected ... port=NAME"): from then on the port forwards to that guest. A simulated
    /// guest that sends at once could otherwise see its first reply dropped (PortDown).
    pub fn wait_connected(&self, port: &str, count: usize, timeout: Duration) -> bool {
        let field = format!("port={port}");
        self.console.wait_until(
            |t| t.lines().filter(|l| l.contains("guest connected") && l.split_whitespace().any(|w| w == field)).count() >= count,
            timeout,
        )
    }
}

impl Drop for VunetProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: the child has not been reaped (try_wait above), so its pid is still ours.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `dir/initrd.gz`: the guest's initramfs with `script` as its /test.sh (the guest's
/// /init runs it, prints `VUNET-TEST-EXIT <status>` and powers off). Creates `dir`.
pub fn guest_initrd(dir: &Path, script: &str) -> PathBuf {
    let img = guest_image();
    std::fs::create_dir_all(dir.join("add")).expect("guest dir");
    std::fs::write(dir.join("add/test.sh"), script).expect("test.sh");
    let add = Command::new("sh")
        .arg("-c")
        .arg("cd add && echo test.sh | cpio -o -H newc --quiet | gzip -1")
        .current_dir(dir)
        .output()
        .expect("cpio");
    assert!(add.status.success(), "cpio failed: {}", String::from_utf8_lossy(&add.stderr));
    let mut initrd = std::fs::read(&img.initrd).expect("initramfs");
    initrd.extend_from_slice(&add.stdout);
    let initrd_path = dir.join("initrd.gz");
    std::fs::write(&initrd_path, initrd).expect("write initrd");
    initrd_path
}

/// How the guest's vhost-user socket is set up on the QEMU side.
#[derive(Clone, Debug)]
pub enum Socket {
    /// vunet listens (server-mode port); QEMU connects.
    Connect(PathBuf),
    /// QEMU listens (client-mode port); vunet connects.
    Listen(PathBuf),
    /// vunet listens; QEMU connects and reconnects (`reconnect=1`) after vunet restarts.
    Reconnect(PathBuf),
}

/// One QEMU guest.
pub struct Guest {
    pub name: String,
    child: Child,
    pub console: Console,
}

impl Guest {
    /// Boots a guest whose /test.sh is `script`. `device_extra` is appended to the
    /// virtio-net-pci options (e.g. ",guest_tso4=off,guest_csum=off").
    pub fn boot(name: &str, workdir: &Path, socket: &Socket, mac: &str, device_extra: &str, script: &str) -> Guest {
        Guest::boot_with(name, workdir, socket, mac, device_extra, script, 1, 1)
    }

    /// As `boot`, with `cpus` vCPUs and `queues` virtio-net queue pairs (`mq=on` with more
    /// than one).
    #[allow(clippy::too_many_arguments)]
    pub fn boot_with(
        name: &str,
        workdir: &Path,
        socket: &Socket,
        mac: &str,
        device_extra: &str,
        script: &str,
        cpus: u32,
        queues: u32,
    ) -> Guest {
        Guest::spawn(name, workdir, socket, mac, device_extra, script, cpus, queues, None, &[])
    }

    /// As `boot`, with `qemu_extra` appended to QEMU's arguments (e.g. a QMP socket, or
    /// `-incoming` for the destination of a live migration, which then boots nothing: the
    /// guest arrives with its memory, console and script mid-run).
    pub fn boot_extra(
        name: &str,
        workdir: &Path,
        socket: &Socket,
        mac: &str,
        device_extra: &str,
        script: &str,
        qemu_extra: &[String],
    ) -> Guest {
        Guest::spawn(name, workdir, socket, mac, device_extra, script, 1, 1, None, qemu_extra)
    }

    /// As `boot`, with QEMU run as user and group `uid` (e.g. 65534, nobody): no
    /// capabilities, no supplementary groups. The kernel is copied into the guest's directory
    /// (which, like `workdir`, that user must be able to read).
    pub fn boot_as(uid: u32, name: &str, workdir: &Path, socket: &Socket, mac: &str, device_extra: &str, script: &str) -> Guest {
        Guest::spawn(name, workdir, socket, mac, device_extra, script, 1, 1, Some(uid), &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        name: &str,
        workdir: &Path,
        socket: &Socket,
        mac: &str,
        device_extra: &str,
        script: &str,
        cpus: u32,
        queues: u32,
        run_as: Option<u32>,
        qemu_extra: &[String],
    ) -> Guest {
        let img = guest_image();
        let dir = workdir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let initrd_path = guest_initrd(&dir, script);
        let mut kernel = img.kernel.clone();
        let mut qemu = Command::new("qemu-system-x86_64");
        if let Some(uid) = run_as {
            kernel = dir.join("vmlinuz");
            std::fs::copy(&img.kernel, &kernel).expect("copy the guest kernel");
            for p in [&dir, &kernel, &initrd_path] {
                let mode = if p.is_dir() { 0o777 } else { 0o644 };
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
            }
            qemu = unprivileged(uid, "qemu-system-x86_64");
        }
        let chardev = match socket {
            Socket::Connect(p) => format!("socket,id=c0,path={}", p.display()),
            Socket::Listen(p) => format!("socket,id=c0,path={},server=on,wait=on", p.display()),
            Socket::Reconnect(p) => format!("socket,id=c0,path={},reconnect=1", p.display()),
        };
        let mut child = qemu
            .args([
                "-accel",
                "tcg",
                "-machine",
                "memory-backend=mem",
                "-m",
                "512",
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd_path)
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-chardev", &chardev])
            .args(["-smp", &cpus.to_string()])
            .args(["-netdev", &format!("vhost-user,id=n0,chardev=c0,queues={queues}")])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,vectors=0{}{device_extra}", if queues > 1 { ",mq=on" } else { "" }),
            ])
            // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
            // miss its ticks and panic at boot ("IO-APIC + timer doesn't work"); a clean run of
            // the test command failed so once.
            .args(["-append", "console=ttyS0 quiet panic=-1 no_timer_check"])
            .args(qemu_extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/install-deps.sh installs it)");
        let console = Console::default();
        console.attach(child.stdout.take().expect("stdout"), Some(dir.join("console.log")));
        console.attach(child.stderr.take().expect("stderr"), Some(dir.join("qemu.log")));
        Guest { name: name.to_string(), child, console }
    }

    /// Waits for the test script to finish; returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        if !self.console.wait_for("VUNET-TEST-EXIT", timeout) {
            return None;
        }
        let t = self.console.text();
        let at = t.find("VUNET-TEST-EXIT ")? + "VUNET-TEST-EXIT ".len();
        t[at..].split_whitespace().next()?.parse().ok()
    }

    /// SIGKILL, like a crashed or killed QEMU.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command that runs `program` as user and group `uid` with no capabilities and no
/// supplementary groups (util-linux's setpriv): an ordinary user, as on a desktop.
pub fn unprivileged(uid: u32, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"]);
    c.arg(program);
    c
}

/// Guest-script lines that wait until `ip` answers ping: a peer guest may still be booting (or
/// a restarted vunet not yet back), so what follows counts on the peer, not on boot order or a
/// guessed sleep. The script exits with `code` if no answer comes within about five minutes.
pub fn await_peer(ip: &str, code: u8) -> String {
    format!("i=0\nuntil ping -c 1 -W 1 {ip} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 200 ] && exit {code}; sleep 0.5; done\n")
}

/// Guest-script lines that wait until something in the guest listens on `port` (`proto` "tcp"
/// or "udp", IPv4 or IPv6): a socket bound to that local port with no peer, as /proc/net
/// shows (an old connection to that port elsewhere does not count). A server started in the
/// background is then ready before the script goes on, e.g. before it gives the guest the
/// address its clients wait for. The script exits with `code` after about a minute.
pub fn await_listening(proto: &str, port: u16, code: u8) -> String {
    format!(
        "i=0\nuntil cat /proc/net/{proto} /proc/net/{proto}6 2>/dev/null | grep -q ':{port:04X} [0-9A-F]*:0000 '; do i=$((i+1)); [ $i -gt 300 ] && exit {code}; sleep 0.2; done\n"
    )
}

/// Extracts "N Gbits/sec"-style receiver throughput (bits/s) from `iperf3 -J` output.
pub fn iperf3_receiver_bps(output: &str) -> Option<f64> {
    let at = output.find("\"sum_received\"")?;
    let rest = &output[at..];
    let k = rest.find("\"bits_per_second\"")?;
    let v = rest[k + "\"bits_per_second\"".len()..].trim_start_matches([':', ' ', '\t']);
    let end = v.find([',', '\n', '}']).unwrap_or(v.len());
    v[..end].trim().parse().ok()
}

/// A QMP connection to a QEMU started with `-qmp unix:PATH,server=on,wait=off`.
pub struct Qmp {
    stream: std::os::unix::net::UnixStream,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts), reads the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP socket {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60))).expect("QMP timeout");
        let reader = BufReader::new(stream.try_clone().expect("QMP clone"));
        let mut q = Qmp { stream, reader };
        let greeting = q.line();
        assert!(greeting.contains("QMP"), "QMP greeting: {greeting}");
        q.execute(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        l
    }

    /// Runs one command (JSON text); returns its answer (`return` or `error`), events skipped.
    pub fn execute(&mut self, cmd: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.stream, "{cmd}").expect("QMP write");
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "QMP closed while waiting for the answer to {cmd}");
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }
}
