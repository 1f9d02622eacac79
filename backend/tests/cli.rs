//! The `vunet` command: user errors are one clear line on stderr, exit code 2, no backtrace;
//! the subcommands find the daemon `vunet run` started, with or without flags; `vunet check`
//! validates without starting anything.

use std::io::BufRead;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vunet"));
    c.args(args).env("RUST_BACKTRACE", "1");
    c
}

fn vunet(args: &[&str]) -> Output {
    cmd(args).output().expect("run vunet")
}

/// `vunet` with its runtime directory rules pointed at `xdg` (`$XDG_RUNTIME_DIR/vunet`).
fn vunet_in(xdg: &Path, args: &[&str]) -> Output {
    cmd(args).env("XDG_RUNTIME_DIR", xdg).output().expect("run vunet")
}

/// A `vunet run` in the background, killed when dropped. Its standard output is read on a
/// thread so that a test waits for the line it needs rather than for a guessed time.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    out: String,
    stderr: PathBuf,
}

impl Running {
    fn spawn(c: &mut Command, stderr: PathBuf) -> Running {
        let mut child =
            c.stdout(Stdio::piped()).stderr(std::fs::File::create(&stderr).expect("stderr file")).spawn().expect("start vunet run");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, out: String::new(), stderr }
    }

    /// Waits until a printed line contains `needle`; false if vunet exits or 20 s pass first.
    fn wait_for(&mut self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.out.lines().any(|l| l.contains(needle)) {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.out.push_str(&line);
                    self.out.push('\n');
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Waits for the end of the start-up summary: every socket, the control socket too, is
    /// listening by then.
    fn ready(&mut self) {
        let done = self.wait_for("(guest RAM must be shared");
        assert!(done, "vunet run did not start:\n{}\nstderr: {}", self.out, std::fs::read_to_string(&self.stderr).unwrap_or_default());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vunet-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_user_error(out: &Output, want: &str) {
    assert_one_line_error(out, 2, want);
}

fn assert_one_line_error(out: &Output, code: i32, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code, stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {err:?}");
    assert!(lines[0].starts_with("vunet: ") && lines[0].contains(want), "{:?} should contain {want:?}", lines[0]);
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
}

#[test]
fn unknown_mode_names_file_and_line() {
    let d = tmp("mode");
    let f = d.join("vunet.toml");
    std::fs::write(&f, "[[network]]\nname = \"default\"\n\nmode = \"nta\"\ngateway = \"192.168.122.1/24\"\n").unwrap();
    let out = vunet(&["run", "--config", f.to_str().unwrap()]);
    assert_user_error(&out, &format!("{}:4: unknown mode \"nta\"", f.display()));
}

#[test]
fn unreadable_config() {
    let out = vunet(&["run", "--config", "/nonexistent/vunet.toml"]);
    assert_user_error(&out, "/nonexistent/vunet.toml: cannot read: No such file or directory");
}

#[test]
fn missing_socket_directory() {
    let d = tmp("nodir");
    let f = d.join("vunet.toml");
    std::fs::write(
        &f,
        "[[network]]\nname = \"n\"\nmode = \"bridge\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"/nonexistent/dir/vm1.sock\"\n",
    )
    .unwrap();
    let out = vunet(&["run", "--config", f.to_str().unwrap()]);
    assert_user_error(&out, "port vm1: socket /nonexistent/dir/vm1.sock: directory does not exist");
}

#[test]
fn socket_path_that_is_not_a_socket() {
    let d = tmp("notsock");
    std::fs::write(d.join("vm1.sock"), "x").unwrap();
    let f = d.join("vunet.toml");
    std::fs::write(&f, "[[network]]\nname = \"n\"\nmode = \"bridge\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n").unwrap();
    let out = vunet(&["run", "--config", f.to_str().unwrap()]);
    assert_user_error(&out, "exists and is not a socket");
}

#[test]
fn socket_in_use_by_another_vunet() {
    let d = tmp("inuse");
    let f = d.join("vunet.toml");
    std::fs::write(&f, "[[network]]\nname = \"n\"\nmode = \"bridge\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n").unwrap();
    let mut first = Running::spawn(&mut cmd(&["run", "--config", f.to_str().unwrap()]), d.join("first.log"));
    first.ready();
    let out = vunet(&["run", "--config", f.to_str().unwrap()]);
    drop(first);
    assert_user_error(&out, "port vm1: socket");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use by another process"));
}

#[test]
fn stale_socket_from_a_crash_is_replaced() {
    let d = tmp("stale");
    let sock = d.join("vm1.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let f = d.join("vunet.toml");
    std::fs::write(&f, "[[network]]\nname = \"n\"\nmode = \"bridge\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n").unwrap();
    let mut daemon = Running::spawn(&mut cmd(&["run", "--config", f.to_str().unwrap()]), d.join("vunet.log"));
    daemon.ready();
    let connected = std::os::unix::net::UnixStream::connect(&sock);
    drop(daemon);
    assert!(connected.is_ok(), "vunet listens on the socket a dead process left behind: {connected:?}");
}

#[test]
fn an_unreadable_lease_file_refuses_the_start_rather_than_be_overwritten() {
    let d = tmp("leases");
    let leases = d.join("state/n.leases");
    std::fs::create_dir_all(&leases).unwrap();
    let f = d.join("vunet.toml");
    std::fs::write(
        &f,
        "state_dir = \"state\"\n[[network]]\nname = \"n\"\nmode = \"isolated\"\ngateway = \"10.9.0.1/24\"\n[network.dhcp]\nrange = [\"10.9.0.2\", \"10.9.0.9\"]\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    )
    .unwrap();
    let out = vunet(&["run", "--config", f.to_str().unwrap()]);
    assert_user_error(&out, &format!("lease file {}: cannot read it: Is a directory", leases.display()));
    assert!(leases.is_dir());
}

#[test]
fn bad_command_line_is_exit_2() {
    let out = vunet(&["run", "--confg", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vunet(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_describes_run() {
    let out = vunet(&["run", "--help"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("--config") && s.contains("--runtime-dir"));
}

#[test]
fn subcommands_talk_to_the_running_daemon() {
    let d = tmp("control");
    let f = d.join("vunet.toml");
    std::fs::write(
        &f,
        "control_socket = \"ctl/control.sock\"\n[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.9.0.1/24\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n[network.dhcp]\nrange = [\"10.9.0.10\", \"10.9.0.20\"]\n",
    )
    .unwrap();
    // Relative paths are relative to the config file: the control socket is d/ctl/control.sock.
    let f = f.to_str().unwrap().to_string();
    let mut daemon = Running::spawn(&mut cmd(&["run", "--config", &f]), d.join("vunet.log"));
    let ctl = d.join("ctl/control.sock");
    assert!(daemon.wait_for(&format!("control socket: {} (owner-only; vunet net-list --control", ctl.display())), "{}", daemon.out);
    daemon.ready();
    let net = vunet(&["net-list", "--config", &f]);
    let ports = vunet(&["port-list", "lab", "--control", ctl.to_str().unwrap()]);
    let leases = vunet(&["dhcp-leases", "lab", "--config", &f]);
    let unknown = vunet(&["dhcp-leases", "nope", "--config", &f]);
    drop(daemon);
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        net.status.success() && text(&net).contains("lab") && text(&net).contains("isolated") && text(&net).contains("0/1 connected"),
        "{net:?}"
    );
    assert!(ports.status.success() && text(&ports).starts_with("vm1 ") && text(&ports).contains("waiting"), "{ports:?}");
    assert!(leases.status.success() && text(&leases).starts_with("MAC"), "{leases:?}");
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&unknown.stderr), "vunet: no network named \"nope\"\n");
    let mode = std::fs::metadata(&ctl).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "owner-only control socket");
}

#[test]
fn subcommand_without_a_daemon_is_one_line() {
    let out = vunet(&["net-list", "--control", "/nonexistent/control.sock"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vunet: cannot reach the vunet daemon at /nonexistent/control.sock: No such file or directory\n"
    );
}

/// The system daemon's socket, the CLI's last default place: a test that expects nobody to
/// answer anywhere cannot say so on a machine where a vunet runs as a service.
fn system_daemon_answers() -> bool {
    std::os::unix::net::UnixStream::connect("/run/vunet/control.sock").is_ok()
}

#[test]
fn the_default_network_is_reached_with_no_flags() {
    let xdg = tmp("newcomer");
    let rt = xdg.join("vunet");
    let mut daemon = Running::spawn(cmd(&["run"]).env("XDG_RUNTIME_DIR", &xdg), xdg.join("vunet.log"));
    let ctl = rt.join("control.sock");
    assert!(
        daemon.wait_for(&format!("control socket: {} (owner-only; `vunet net-list` finds it with no flags)", ctl.display())),
        "vunet run prints its control socket:\n{}",
        daemon.out
    );
    daemon.ready();
    // Socket NAT on libvirt's subnet, or the next one free of this host's routes.
    let (n, _) = vunet::config::default_subnet(&vunet::config::read_host_routes());
    assert!(daemon.out.contains(&format!("mode nat, gateway 192.168.{n}.1/24, DHCP 192.168.{n}.2-192.168.{n}.254, DNS")), "{}", daemon.out);
    assert!(daemon.out.contains("out through the host's sockets (socket NAT)"), "{}", daemon.out);
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).to_string();

    let net = vunet_in(&xdg, &["net-list"]);
    assert!(net.status.success() && text(&net).contains(&format!("default          nat       192.168.{n}.1/24")), "{net:?}");
    assert!(text(&net).contains("0/4 connected"), "{net:?}");
    let ports = vunet_in(&xdg, &["port-list", "default"]);
    assert!(ports.status.success(), "{ports:?}");
    for i in 1..=4 {
        assert!(
            text(&ports).contains(&format!("vm{i} (vhost-user, server) socket={}", rt.join(format!("vm{i}.sock")).display())),
            "{ports:?}"
        );
    }
    let added = vunet_in(&xdg, &["port-add", "default", "vm5"]);
    let vm5 = rt.join("default-vm5.sock");
    assert!(added.status.success() && text(&added).contains(&format!("socket={}", vm5.display())), "{added:?}");
    assert!(std::os::unix::net::UnixStream::connect(&vm5).is_ok(), "the added port listens");
    let ports = vunet_in(&xdg, &["port-list", "default", "--json"]);
    assert!(text(&ports).contains("\"name\": \"vm5\""), "{ports:?}");
    let mode = std::fs::metadata(&ctl).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "owner-only control socket");
    drop(daemon);

    // With the daemon gone, the failure names the places looked at, in one line.
    if system_daemon_answers() {
        eprintln!("skipped the no-daemon half: a vunet answers at /run/vunet/control.sock");
        return;
    }
    let gone = vunet_in(&xdg, &["net-list"]);
    assert_one_line_error(&gone, 1, &format!("cannot reach the vunet daemon at {} (", ctl.display()));
    assert!(String::from_utf8_lossy(&gone.stderr).contains(" or /run/vunet/control.sock ("), "{gone:?}");
}

#[test]
fn without_a_daemon_every_default_place_is_named() {
    if system_daemon_answers() {
        eprintln!("skipped: a vunet answers at /run/vunet/control.sock");
        return;
    }
    let xdg = tmp("nodaemon");
    let out = vunet_in(&xdg, &["port-list", "default"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "vunet: cannot reach the vunet daemon at {}/vunet/control.sock (No such file or directory) or /run/vunet/control.sock ({}); start one with `vunet run`, or name its socket with --control or --config\n",
            xdg.display(),
            match std::fs::metadata("/run/vunet/control.sock") {
                Ok(_) => "Connection refused",
                Err(_) => "No such file or directory",
            }
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

/// Runs the vunet binary as user nobody (65534) with no XDG_RUNTIME_DIR: the per-user
/// directory in /tmp is its runtime directory.
fn as_nobody(bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(bin).args(args);
    c.env_remove("XDG_RUNTIME_DIR").env_remove("TMPDIR").env("RUST_BACKTRACE", "1");
    c
}

#[test]
fn another_user_gets_a_private_runtime_directory() {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: switching to user nobody with setpriv needs root");
        return;
    }
    // nobody may not be able to reach the build directory: run a copy it can execute.
    let d = tmp("nobody");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = d.join("vunet");
    std::fs::copy(env!("CARGO_BIN_EXE_vunet"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = PathBuf::from("/tmp/vunet-65534");
    let _ = std::fs::remove_dir_all(&private);
    let nobody = |args: &[&str]| as_nobody(&bin, args).output().expect("setpriv");
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).to_string();

    // A directory another user made first is neither served from nor believed.
    std::fs::create_dir(&private).unwrap();
    std::os::unix::fs::chown(&private, Some(65533), Some(65533)).unwrap();
    assert_user_error(&nobody(&["run"]), "runtime directory /tmp/vunet-65534 belongs to uid 65533, not to you");
    let err = nobody(&["net-list"]);
    assert_eq!(err.status.code(), Some(1), "{err:?}");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("/tmp/vunet-65534/control.sock (its directory belongs to uid 65533, not to you)"),
        "{err:?}"
    );
    std::fs::remove_dir(&private).unwrap();

    let mut daemon = Running::spawn(&mut as_nobody(&bin, &["run"]), d.join("vunet.log"));
    assert!(
        daemon.wait_for("control socket: /tmp/vunet-65534/control.sock (owner-only; `vunet net-list` finds it with no flags)"),
        "{}\nstderr: {}",
        daemon.out,
        std::fs::read_to_string(d.join("vunet.log")).unwrap_or_default()
    );
    daemon.ready();
    let meta = std::fs::symlink_metadata(&private).unwrap();
    assert_eq!((meta.is_dir(), meta.uid(), meta.mode() & 0o777), (true, 65534, 0o700), "a private directory");
    let net = nobody(&["net-list"]);
    assert!(net.status.success() && text(&net).contains("default          nat"), "{net:?}");
    let added = nobody(&["port-add", "default", "vm5"]);
    assert!(added.status.success() && text(&added).contains("socket=/tmp/vunet-65534/default-vm5.sock"), "{added:?}");
    let ports = nobody(&["port-list", "default"]);
    assert!(text(&ports).contains("vm5 (vhost-user, server)") && text(&ports).contains("socket=/tmp/vunet-65534/vm1.sock"), "{ports:?}");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&private);
}

fn libvirt_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/libvirt").join(name)
}

/// A successful check: exit 0, the summary on stdout, each warning one line on stderr, and
/// the last line counts them.
fn assert_checks(out: &Output, file: &Path, summary: &str) {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(summary), "{stdout}");
    assert!(stderr.lines().all(|l| l.starts_with("vunet: warning: ")), "{stderr}");
    let last = format!("{}: valid, {} warning(s); nothing was started", file.display(), stderr.lines().count());
    assert_eq!(stdout.lines().last(), Some(last.as_str()), "{stdout}");
}

#[test]
fn check_takes_the_seed_networks() {
    for (file, summary) in [
        ("default.xml", "network \"default\": mode nat, gateway 192.168.122.1/24, DHCP 192.168.122.2-192.168.122.254, DNS, mtu 1500"),
        ("isolated.xml", "network \"isolated\": mode isolated, gateway 10.11.0.1/24, DHCP 10.11.0.100-10.11.0.199, DNS, mtu 9000"),
        ("routed.xml", "network \"routed\": mode route, gateway 192.168.200.1/24"),
    ] {
        let f = libvirt_fixture(file);
        assert_checks(&vunet(&["check", "--config", f.to_str().unwrap()]), &f, summary);
    }
    let default = vunet(&["check", "--config", libvirt_fixture("default.xml").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&default.stderr).contains("<bridge name='virbr0'> is not created"), "warnings are printed");
    // The bridged seed attaches to br0: the check says what `run` would say on this host.
    let f = libvirt_fixture("bridged.xml");
    let out = vunet(&["check", "--config", f.to_str().unwrap()]);
    if Path::new("/sys/class/net/br0").exists() {
        assert_checks(&out, &f, "network \"host-bridge\": mode bridge");
    } else {
        assert_user_error(&out, "network host-bridge: uplink interface \"br0\" does not exist");
    }
}

#[test]
fn check_refuses_broken_files_in_one_line() {
    let d = tmp("check-bad");
    let write = |name: &str, text: &str| {
        let f = d.join(name);
        std::fs::write(&f, text).unwrap();
        f.to_str().unwrap().to_string()
    };
    let mode = write("mode.toml", "[[network]]\nname = \"default\"\n\nmode = \"nta\"\ngateway = \"192.168.122.1/24\"\n");
    assert_user_error(&vunet(&["check", "--config", &mode]), &format!("{mode}:4: unknown mode \"nta\""));
    assert_user_error(&vunet(&["run", "--check", "--config", &mode]), &format!("{mode}:4: unknown mode \"nta\""));
    let xml = write("broken.xml", "<network>\n  <name>broken</name>\n  <ip address='10.0.0.1' prefix='24'>\n");
    assert_user_error(&vunet(&["check", "--config", &xml]), &format!("{xml}:1: malformed XML: <network> is not closed"));
    let nodir = write(
        "nodir.toml",
        "[[network]]\nname = \"n\"\nmode = \"bridge\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"/nonexistent/dir/vm1.sock\"\n",
    );
    assert_user_error(&vunet(&["check", "--config", &nodir]), "port vm1: socket /nonexistent/dir/vm1.sock: directory does not exist");
    let group = write(
        "group.toml",
        "control_socket = \"control.sock\"\ncontrol_group = \"no-such-group-vunet\"\n[[network]]\nname = \"n\"\nmode = \"bridge\"\n",
    );
    let control = d.join("control.sock");
    assert_user_error(
        &vunet(&["check", "--config", &group]),
        &format!("control socket {}: no group named \"no-such-group-vunet\"", control.display()),
    );
    assert_user_error(
        &vunet(&["check", "--config", "/nonexistent/vunet.toml"]),
        "/nonexistent/vunet.toml: cannot read: No such file or directory",
    );
    let sgroup = write(
        "sgroup.toml",
        "[[network]]\nname = \"n\"\nmode = \"bridge\"\nsocket_group = \"no-such-group-vunet\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n",
    );
    let want = format!("{sgroup}:4: unknown socket_group \"no-such-group-vunet\" (no such group on this host)");
    assert_user_error(&vunet(&["check", "--config", &sgroup]), &want);
    assert_user_error(&vunet(&["run", "--config", &sgroup]), &want);
    let out = vunet(&["check"]);
    assert_eq!(out.status.code(), Some(2), "--config is required");
}

#[test]
fn check_before_a_reload_starts_nothing_and_passes_sockets_in_use() {
    let d = tmp("check-reload");
    let f = d.join("vunet.toml");
    let one = "control_socket = \"control.sock\"\n[[network]]\nname = \"lab\"\nmode = \"isolated\"\ngateway = \"10.9.0.1/24\"\n[[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n";
    std::fs::write(&f, one).unwrap();
    let fs = f.to_str().unwrap();
    let out = vunet(&["check", "--config", fs]);
    assert_checks(&out, &f, &format!("port vm1 (vunet listens): {} (mode 0600)", d.join("vm1.sock").display()));
    assert_eq!(vunet(&["run", "--check", "--config", fs]).stdout, out.stdout, "run --check is check");
    assert!(!d.join("vm1.sock").exists() && !d.join("control.sock").exists(), "a check binds nothing");

    let mut daemon = Running::spawn(&mut cmd(&["run", "--config", fs]), d.join("vunet.log"));
    daemon.ready();
    // The running daemon holds vm1.sock: the check of an edited file does not mind.
    std::fs::write(&f, format!("{one}[[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n")).unwrap();
    assert_checks(&vunet(&["check", "--config", fs]), &f, "port vm2 (vunet listens)");
    assert!(!d.join("vm2.sock").exists(), "a check binds nothing");
    std::fs::write(&f, format!("{one}[[network.port]]\nname = \"vm2\"\nsocket = \"vm1.sock\"\n")).unwrap();
    let out = vunet(&["check", "--config", fs]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with(&format!("vunet: {fs}:")), "{out:?}");
    drop(daemon);
}
