//! The `vunet` command's user errors: one clear line on stderr, exit code 2, no backtrace.

use std::io::BufRead;
use std::path::PathBuf;
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
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code, stderr: {err}");
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
