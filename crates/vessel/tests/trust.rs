//! What a VMM process owes its host whatever happens inside it: a panic in any thread ends
//! the process loudly with its own exit code (never a hung VM), the control socket is
//! private, and errors keep to the README's exit-code table.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::soak::Console;
use common::*;

#[test]
fn a_panic_in_a_port_handler_ends_the_vm_with_its_own_code_and_names_the_thread() {
    // The bundled guest ends by writing its status to the exit device; the test hook makes
    // that port's handler panic on the vCPU thread, as a device bug would.
    // Before the hook, the vCPU thread ended alone and the VM hung (killed after 60 s).
    let o = vessel_env(
        &["run", "--cpus", "2"],
        &[("VESSEL_TEST_PANIC", "guest-exit")],
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(70), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("vessel: internal error: thread 'vcpu"))
        .unwrap_or_else(|| panic!("no panic line naming a vCPU thread:\n{err}"));
    assert!(line.contains("panicked at"), "{line}");
    assert!(line.contains("VESSEL_TEST_PANIC"), "{line}");
}

#[test]
fn the_api_socket_is_private_whatever_the_umask() {
    let tmp = TempDir::new("trust-sock");
    let sock = tmp.file("api.sock");
    // A permissive umask: the socket must still be the owner's only.
    let mut c = Console::spawn_command(&[
        "sh",
        "-c",
        &format!(
            "umask 000; exec {VESSEL} serve --api-socket {}",
            sock.display()
        ),
    ]);
    wait_for(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    assert_eq!(c.stop(), Some(143));
}

#[test]
fn configuration_errors_exit_2_and_ctl_takes_its_flags_after_the_verb() {
    // A value the parser takes but the configuration refuses.
    let o = vessel(&["run", "--disk", "path=/nonexistent/disk.img"]);
    assert_code(&o, 2);
    assert!(stderr(&o).starts_with("vessel: error: "), "{}", stderr(&o));
    // A snapshot directory that holds no snapshot.
    let tmp = TempDir::new("trust-codes");
    let o = vessel(&["run", "--restore", tmp.0.to_str().unwrap()]);
    assert_code(&o, 2);
    // ctl: no socket is a usage error; the flags work after the verb too.
    let o = vessel(&["ctl", "info"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("--api-socket"), "{}", stderr(&o));
    let sock = tmp.file("api.sock");
    let mut c = Console::spawn(&["serve", "--api-socket", sock.to_str().unwrap()]);
    wait_for(&sock);
    let o = vessel(&[
        "ctl",
        "info",
        "--json",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("\"empty\""), "{}", stdout(&o));
    // A runtime failure (the API refuses: no VM to pause) stays 1.
    let o = vessel(&["ctl", "pause", "--api-socket", sock.to_str().unwrap()]);
    assert_code(&o, 1);
    assert_eq!(c.stop(), Some(143));
}

/// Runs `vessel args` with the seccomp test hook armed for `class`: a thread of that class
/// makes a system call no filter allows once its filter is in place. The process must end
/// with code 71 and name the class and the call.
fn forbidden_call_ends_the_vm(class: &str, args: &[&str]) {
    let o = vessel_env(
        args,
        &[("VESSEL_TEST_SECCOMP", class), ("VESSEL_SECCOMP", "on")],
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(71), "{class}: {err}");
    let want =
        format!("vessel: seccomp: a {class} thread made a forbidden system call: personality");
    assert!(err.contains(&want), "{class}: no '{want}' in:\n{err}");
}

#[test]
fn each_thread_class_is_killed_for_a_forbidden_system_call() {
    let tmp = TempDir::new("trust-seccomp");
    let disk = tmp.file("disk.raw");
    raw_disk(&disk, 16 << 20);
    let disk_spec = format!("path={},engine=threads", disk.display());
    let sock = tmp.file("api.sock");
    let console = format!("socket:{}", tmp.file("console.sock").display());
    // The bundled guest's default run activates its virtio devices (block, entropy).
    for (class, args) in [
        ("main", vec!["run"]),
        ("spawner", vec!["run"]),
        ("vcpu", vec!["run"]),
        ("device", vec!["run", "--rng"]),
        ("block-io", vec!["run", "--disk", &disk_spec]),
        ("console", vec!["run", "--console", &console]),
        ("api", vec!["serve", "--api-socket", sock.to_str().unwrap()]),
    ] {
        forbidden_call_ends_the_vm(class, &args);
    }
    // The pager starts with a restore over userfaultfd: snapshot a running VM first.
    let snap_api = tmp.file("snap-api.sock");
    let snap = tmp.file("snap");
    let mut vm = Console::spawn(&[
        "run",
        "--api-socket",
        snap_api.to_str().unwrap(),
        "--cmdline",
        "action=soak soakms=50",
    ]);
    vm.soak_lines(1, 1);
    assert_code(
        &ctl(&snap_api, &["snapshot", "--dir", snap.to_str().unwrap()]),
        0,
    );
    drop(vm);
    forbidden_call_ends_the_vm(
        "pager",
        &[
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--restore-memory",
            "uffd",
        ],
    );
    // A migration thread starts with `migrate send` (to a port nobody listens on).
    let socket = tmp.file("mig-api.sock");
    let mut vm = Command::new(VESSEL)
        .args([
            "run",
            "--api-socket",
            socket.to_str().unwrap(),
            "--cmdline",
            "action=soak",
        ])
        .env("VESSEL_TEST_SECCOMP", "migration")
        .env("VESSEL_SECCOMP", "on")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&socket);
    // The VM may end before it answers: the thread starts before the reply goes out.
    let _ = ctl(
        &socket,
        &[
            "migrate",
            "send",
            "--token",
            "0123456789abcdef0123456789abcdef",
            "--to",
            "tcp:127.0.0.1:1",
            "--no-wait",
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = vm.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the VM never ended");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut vm.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(71), "{err}");
    assert!(
        err.contains("a migration thread made a forbidden system call: personality"),
        "{err}"
    );
}
