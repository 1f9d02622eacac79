//! The `vunet` command's user errors: one clear line on stderr, exit code 2, no backtrace.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vunet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vunet")).args(args).env("RUST_BACKTRACE", "1").output().expect("run vunet")
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
    let mut first = Command::new(env!("CARGO_BIN_EXE_vunet"))
        .args(["run", "--config", f.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.join("vm1.sock").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = vunet(&["run", "--config", f.to_str().unwrap()]);
    let _ = first.kill();
    let _ = first.wait();
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_vunet"))
        .args(["run", "--config", f.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut connected = false;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            connected = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(connected, "vunet listens on the socket a dead process left behind");
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
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_vunet"))
        .args(["run", "--config", &f])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ctl = d.join("ctl/control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let net = vunet(&["net-list", "--config", &f]);
    let ports = vunet(&["port-list", "lab", "--control", ctl.to_str().unwrap()]);
    let leases = vunet(&["dhcp-leases", "lab", "--config", &f]);
    let unknown = vunet(&["dhcp-leases", "nope", "--config", &f]);
    let _ = daemon.kill();
    let _ = daemon.wait();
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
