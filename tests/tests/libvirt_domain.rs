//! libvirt for real: a domain defined from docs/libvirt.md's XML (`<interface
//! type='vhostuser'>`, memfd shared memory) on a vunet port, with vunet running as its own
//! unprivileged user and libvirt's QEMU (user `libvirt-qemu`) reaching the socket through
//! `socket_group`. The guest leases an address from vunet and pings the gateway.
//!
//! Needs root (users, groups, libvirtd). Installs libvirt with scripts/install-deps.sh and
//! starts it with scripts/start-libvirtd.sh; skips, saying so, only when that is impossible.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vunet_tests::guest::*;
use vunet_tests::{wait_until, TempDir};

/// The user vunet runs as, and the group it shares with libvirt's QEMU user.
const VUNET_USER: &str = "vunet-test";
const SOCKET_GROUP: &str = "vunet-sock";
const QEMU_USER: &str = "libvirt-qemu";
const MAC: &str = "52:54:00:4c:56:01";
const BOOT_AND_RUN: Duration = Duration::from_secs(180);
const VIRSH_START: Duration = Duration::from_secs(60);

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virsh(args: &[&str]) -> Output {
    run(Command::new("virsh").args(["-q", "-c", "qemu:///system"]).args(args))
}

/// The test's system user and group, made once: `vunet-test` in `vunet-sock`, and libvirt's
/// QEMU user in `vunet-sock` too. Nothing else is shared between them.
fn ensure_users() {
    if run(Command::new("getent").args(["group", SOCKET_GROUP])).stdout.is_empty() {
        ok(Command::new("groupadd").args(["--system", SOCKET_GROUP]));
    }
    if run(Command::new("getent").args(["passwd", VUNET_USER])).stdout.is_empty() {
        ok(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            VUNET_USER,
        ]));
    }
    for user in [VUNET_USER, QEMU_USER] {
        let groups = ok(Command::new("id").args(["-nG", user]));
        if !groups.split_whitespace().any(|g| g == SOCKET_GROUP) {
            ok(Command::new("usermod").args(["-a", "-G", SOCKET_GROUP, user]));
        }
    }
}

fn chown(path: &Path, user: &str, group: &str, mode: u32) {
    ok(Command::new("chown").arg(format!("{user}:{group}")).arg(path));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Undoes what the test set up in libvirt, whatever happened: the domain destroyed and
/// undefined, the daemons this test started stopped (by pid; ones already running are left).
struct Cleanup {
    domain: Option<String>,
    daemons: Vec<(String, i32)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(d) = self.domain.take() {
            let _ = virsh(&["destroy", &d]);
            let _ = virsh(&["undefine", &d]);
        }
        // libvirtd first: virtlogd serves it.
        for (name, pid) in self.daemons.drain(..).rev() {
            // SAFETY: plain syscall; the pid is one start-libvirtd.sh reported starting.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let gone = wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{pid}")).exists());
            if !gone {
                eprintln!("{name} (pid {pid}) did not stop on SIGTERM; killing it");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The domain: docs/libvirt.md's `<memoryBacking>` and `<interface type='vhostuser'>`, TCG,
/// direct kernel boot of the test guest, serial console to a file, and ENVIRONMENT.md's TCG
/// work-around (no MSI-X vectors on the NIC) as a `<qemu:override>` on the interface's alias.
fn domain_xml(name: &str, kernel: &Path, initrd: &Path, socket: &Path, console: &Path) -> String {
    format!(
        r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='vhostuser'>
      <mac address='{MAC}'/>
      <source type='unix' path='{socket}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
      <driver rx_queue_size='1024' tx_queue_size='1024'/>
      <rom enabled='no'/>
      <alias name='ua-net0'/>
    </interface>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console}'/>
      <target type='serial' port='0'/>
    </console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='ua-net0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        socket = socket.display(),
        console = console.display(),
    )
}

#[test]
fn libvirt_domain_on_a_vunet_port_leases_and_pings_the_gateway() {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED libvirt_domain: needs root to install libvirt, start libvirtd and create its users");
        return;
    }
    let root = repo_root();
    let install = run(Command::new("bash").arg(root.join("scripts/install-deps.sh")));
    if !install.status.success() || run(Command::new("sh").args(["-c", "command -v libvirtd virsh"])).stdout.is_empty() {
        eprintln!("SKIPPED libvirt_domain: libvirt cannot be installed here:\n{}", String::from_utf8_lossy(&install.stderr));
        return;
    }
    let _turn = serial();
    let img = guest_image();
    // Declared before the guard, so removed after the domain is gone.
    let dir = TempDir::new("libvirt");
    let mut cleanup = Cleanup { domain: None, daemons: Vec::new() };
    // The daemons it started are recorded before its status is looked at, so a libvirtd that
    // fails to come up does not leave the virtlogd started for it running.
    let started = run(Command::new("bash").arg(root.join("scripts/start-libvirtd.sh")));
    for line in String::from_utf8_lossy(&started.stdout).lines() {
        if let ["started", name, pid] = line.split_whitespace().collect::<Vec<_>>()[..] {
            cleanup.daemons.push((name.to_string(), pid.parse().expect("pid")));
        }
    }
    assert!(started.status.success(), "scripts/start-libvirtd.sh failed:\n{}", String::from_utf8_lossy(&started.stderr));
    // After start-libvirtd.sh, which makes libvirt's QEMU user on a fresh machine (libvirt
    // starts each QEMU with its user's groups of that moment, so joining now is in time).
    ensure_users();

    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // vunet's own directory: its user's, entered by the socket group only (libvirt's QEMU
    // must reach the socket in it); nothing in it is open to others.
    let vdir = dir.path().join("vunet");
    std::fs::create_dir(&vdir).unwrap();
    chown(&vdir, VUNET_USER, SOCKET_GROUP, 0o750);
    // vunet runs from a copy its user can read, whoever owns the build tree.
    let bin = vdir.join("vunet");
    std::fs::copy(vunet_binary(), &bin).unwrap();
    chown(&bin, "root", "root", 0o755);
    let socket = vdir.join("vm1.sock");
    let control = vdir.join("control.sock");
    let config = vdir.join("vunet.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{state}\"\ncontrol_socket = \"{control}\"\n\
             [[network]]\nname = \"lv\"\nmode = \"isolated\"\ngateway = \"192.168.150.1/24\"\nsocket_group = \"{SOCKET_GROUP}\"\n\
             [network.dhcp]\nrange = [\"192.168.150.10\", \"192.168.150.20\"]\n\
             [[network.port]]\nname = \"vm1\"\nsocket = \"{socket}\"\n",
            state = vdir.join("state").display(),
            control = control.display(),
            socket = socket.display(),
        ),
    )
    .unwrap();
    chown(&config, "root", "root", 0o644);
    let mut as_user = Command::new("setpriv");
    as_user.args([&format!("--reuid={VUNET_USER}"), &format!("--regid={VUNET_USER}"), "--init-groups", "--"]).arg(&bin);
    let vunet = VunetProcess::start_with(as_user, &["--config", config.to_str().unwrap()], &dir.path().join("vunet.log"));

    // The socket is vunet's user's, the shared group's, 0660: nothing for anyone else.
    let meta = std::fs::symlink_metadata(&socket).expect("the guest socket");
    let gid = vunet::config::group_id(SOCKET_GROUP).unwrap();
    let uid = ok(Command::new("id").args(["-u", VUNET_USER])).trim().parse::<u32>().unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.permissions().mode() & 0o777), (uid, gid, 0o660), "the guest socket's owner, group, mode");

    // The guest's files, in a directory of the test's: libvirt gives them to its QEMU user
    // while the domain runs (dynamic_ownership) and back afterwards.
    let gdir = dir.path().join("guest");
    let initrd = guest_initrd(
        &gdir,
        "cat > /tmp/hook.sh <<'EOF'\n#!/bin/sh\ncase \"$1\" in bound|renew) ip addr add $ip/$mask dev $interface; echo \"LEASED $ip\" ;; esac\nEOF\n\
         chmod +x /tmp/hook.sh\nudhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 || exit 3\nping -c 3 -W 5 192.168.150.1 || exit 4\n",
    );
    let kernel = gdir.join("vmlinuz");
    std::fs::copy(&img.kernel, &kernel).unwrap();
    for d in [&gdir, &gdir.join("add")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let console = gdir.join("console.log");

    let name = format!("vunet-test-{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_millis());
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, domain_xml(&name, &kernel, &initrd, &socket, &console)).unwrap();
    let defined = virsh(&["define", xml_path.to_str().unwrap()]);
    assert!(defined.status.success(), "virsh define:\n{}", String::from_utf8_lossy(&defined.stderr));
    cleanup.domain = Some(name.clone());
    // `virsh start` returns once QEMU has connected to the vhost-user socket; a QEMU that
    // cannot (the socket's permissions) would keep it waiting, so it gets a deadline.
    let qemu_log = || std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap_or_default();
    let mut start = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "start", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("virsh start");
    let returned = wait_until(VIRSH_START, || start.try_wait().ok().flatten().is_some());
    if !returned {
        let _ = start.kill();
    }
    let start = start.wait_with_output().expect("virsh start");
    assert!(
        returned && start.status.success(),
        "virsh start {}:\n{}\nvunet:\n{}\nQEMU's log:\n{}",
        if returned { "failed" } else { "did not return (QEMU cannot connect to the guest socket?)" },
        String::from_utf8_lossy(&start.stderr),
        vunet.console.text(),
        qemu_log()
    );

    // Done when the guest's script says so on its console, or the domain stops before.
    let text = || std::fs::read_to_string(&console).unwrap_or_default();
    let finished = wait_until(BOOT_AND_RUN, || {
        text().contains("VUNET-TEST-EXIT") || !String::from_utf8_lossy(&virsh(&["domstate", &name]).stdout).contains("running")
    });
    let out = text();
    let diag = || format!("console:\n{out}\nvunet:\n{}\nQEMU's log:\n{}", vunet.console.text(), qemu_log());
    assert!(finished, "the guest did not finish within {BOOT_AND_RUN:?}\n{}", diag());
    assert!(out.contains("VUNET-TEST-EXIT 0"), "the guest's script failed\n{}", diag());
    assert!(out.contains("LEASED 192.168.150.") && out.contains("3 packets transmitted, 3 packets received"), "lease and ping\n{}", diag());
    // vunet's side of it: the lease, for the domain's MAC.
    let leases = ok(Command::new(&bin).args(["dhcp-leases", "lv", "--control", control.to_str().unwrap()]));
    assert!(leases.contains(MAC) && leases.contains("192.168.150."), "vunet's leases:\n{leases}");
    assert!(vunet.console.text().contains("guest connected"), "vunet's log:\n{}", vunet.console.text());
    eprintln!("domain {name}: {}", out.lines().filter(|l| l.contains("LEASED") || l.contains("packets")).collect::<Vec<_>>().join("; "));
    drop(cleanup);
    assert!(!String::from_utf8_lossy(&virsh(&["list", "--all", "--name"]).stdout).contains(&name), "the domain is undefined");
}
